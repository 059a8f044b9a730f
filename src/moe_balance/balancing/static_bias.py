"""The static-bias floor: the best single bias vector for a fixed router on cached scores,
found by iterating the adaptive rule's Newton step (``rules.adaptive``) to convergence.

Shape legend: T tokens, E experts, K top_k, B margin-histogram bins.
"""

from __future__ import annotations

import torch

from ..metrics import max_vio
from ..routing import Router
from .rules.adaptive import flip_margins, margin_edges, margin_histograms, newton_step


def select_top_k(selection_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, E) bool mask of each row's top-K entries."""
    selected_TE = torch.zeros_like(selection_TE, dtype=torch.bool)
    return selected_TE.scatter_(1, selection_TE.topk(top_k, dim=-1).indices, True)


@torch.no_grad()
def solve_static_bias(scores_TE: torch.Tensor, top_k: int, *, multiplicative: bool = False,
                      iterations: int = 100, max_step: float = 1.0, patience: int = 15,
                      initial_bias_E: torch.Tensor | None = None,
                      router: Router | None = None) -> tuple[torch.Tensor, float]:
    """The best single bias vector for fixed scores: (bias (E,), MaxVio it reaches).

    Iterates the Newton step on the whole set, the gain 1/2 for the first 40 iterations and
    then decaying, and keeps the best MaxVio seen (stopping after ``patience`` iterations
    without improvement): an upper bound on the floor, reached to about 1e-3 on the quick
    preset's validation set. Used for the static-bias floor. ``router``: the layer's router,
    whose selection and choice rule are used (top-p, grouped, group-limited top-K); None is
    plain top-K with ``top_k``.
    """
    scores_TE = scores_TE.float()
    T, E = scores_TE.shape
    if router is None and top_k >= E:  # every expert always selected: nothing to balance
        return (torch.ones(E) if multiplicative else torch.zeros(E)), 0.0
    groups = 1 if router is None else router.competition_groups
    bias_E = (torch.ones(E) if multiplicative else torch.zeros(E)) if initial_bias_E is None \
        else initial_bias_E.detach().float().cpu().clone()
    edges_B = margin_edges(max_step)
    best_bias, best, since_best = bias_E.clone(), float("inf"), 0
    for it in range(iterations):
        if router is None:
            selection_TE = scores_TE * bias_E if multiplicative else scores_TE + bias_E
            selected_TE = select_top_k(selection_TE, top_k)
        else:
            selection_TE = router.selection(scores_TE, bias_E, multiplicative)
            selected_TE = router.select_mask(selection_TE, scores_TE)
        counts_E = selected_TE.sum(0)
        vio = float(max_vio(counts_E))
        if vio < best:
            best, best_bias, since_best = vio, bias_E.clone(), 0
        else:
            since_best += 1
        if best * float(counts_E.double().mean()) <= 1.0 or since_best >= patience:
            break  # within one token of perfect (the metric's resolution), or stuck
        margins_TE = flip_margins(selection_TE, selected_TE, groups, scores_TE if multiplicative else None)
        hist = margin_histograms(margins_TE, selected_TE, edges_B)
        gain = 0.5 / (1 + max(0, it - 40) / 10)
        bias_E = bias_E + newton_step(counts_E, hist, edges_B, gain, max_step).float()
        if multiplicative:
            bias_E = bias_E.clamp_min(1e-3)
    return best_bias, best
