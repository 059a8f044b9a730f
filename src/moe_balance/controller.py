"""The adaptive Loss-Free bias controller: a damped Newton step on each expert's bias.

Shape legend: T tokens, E experts, K top_k, B margin-histogram bins.

The paper's sign rule moves every bias by a constant +/-u. Han and Zhong (2025, arXiv
2512.03915) read that update as a dual (sub)gradient step on the experts' capacity
constraints, where the step size is the whole game: a constant u is too slow early (the router's
preferences outgrow a bias moving 1e-3 a step) and too jumpy late. This controller chooses each
expert's step from the routing of the step just finished:

1. **Flip margins** (``flip_margins``). For token t and expert i, m_{t,i} >= 0 is how far b_i
   must move for t to change its mind about i: for a selected expert, down to the best
   unselected selection score of t; for an unselected one, up to the worst selected score of t.
   Measured in bias units (divided by d selection / d b_i: 1 for the additive form, s_{t,i}
   for the multiplicative one).
2. **Histograms** (``margin_histograms``). Per expert, the margins of the tokens that would
   join it if its bias rose (unselected) and of those that would leave it if its bias fell
   (selected), counted in B geometric bins up to ``max_step``. These (2, E, B) counts add up
   over micro-batches and data-parallel ranks exactly like the loads do.
3. **Newton step** (``newton_step``). With loads c_i and mean load c̄, expert i should gain
   n_i = gain * (c̄ - c_i) assignments. Its step is the smallest |Δb_i| whose margin
   histogram holds |n_i| tokens (linear inside a bin), in the direction of sign(n_i), capped at
   ``max_step``:

       Δb_i = sign(c̄ - c_i) * min(max_step, Q_i(gain * |c̄ - c_i|))

   where Q_i(n) is the margin of the n-th nearest token on the relevant side of expert i's
   top-K threshold in the last step. Far from balance the step is large (up to ``max_step``);
   near balance it is the few thousandths that move the few tokens still in excess, so there is
   no limit cycle of +/-u. ``gain`` < 1 damps the step because every expert moves at once and a
   token leaving one expert joins another (with gain 1/2, two experts trading the same tokens
   close their gap once, not twice over).

**Causality.** The bias used for a batch comes from earlier batches only: the histograms are
taken in the step's forward passes and used by ``update()`` after the optimizer step, for the
next step's batches.

``solve_static_bias`` runs the same step to convergence on cached scores: the best single bias
vector for a fixed router (the "static-bias floor" of a validation set).
"""

from __future__ import annotations

import torch

from .metrics import max_vio

NUM_BINS = 32
MIN_STEP_FRACTION = 1e-4  # the first bin edge, as a fraction of max_step


def margin_edges(max_step: float, num_bins: int = NUM_BINS, device=None) -> torch.Tensor:
    """(B,) float64 upper bin edges, geometric from max_step * 1e-4 to max_step; the first bin
    also holds margins in [0, edge_0)."""
    return torch.logspace(torch.log10(torch.tensor(max_step * MIN_STEP_FRACTION)).item(),
                          torch.log10(torch.tensor(max_step)).item(), num_bins,
                          dtype=torch.float64, device=device)


def flip_margins(selection_TE: torch.Tensor, selected_TE: torch.Tensor, top_k: int,
                 slope_TE: torch.Tensor | None = None) -> torch.Tensor:
    """(T, E) bias change each (token, expert) needs to flip: >= 0, inf where it never flips.

    selection_TE: the (biased) scores top-K was taken on, -inf for ineligible experts.
    selected_TE: bool, the K experts each token chose. slope_TE: d selection / d bias
    (None = 1, the additive bias; the scores for the multiplicative one).
    """
    T, E = selection_TE.shape
    if top_k >= E:  # every expert always selected: no bias can change anything
        return torch.full_like(selection_TE, float("inf"))
    values_TK1 = selection_TE.topk(top_k + 1, dim=-1).values
    worst_selected_T, best_unselected_T = values_TK1[:, top_k - 1], values_TK1[:, top_k]
    margins_TE = torch.where(selected_TE, selection_TE - best_unselected_T.unsqueeze(-1),
                             worst_selected_T.unsqueeze(-1) - selection_TE)
    if slope_TE is not None:
        margins_TE = margins_TE / slope_TE.clamp_min(1e-12)
    margins_TE = margins_TE.clamp_min(0)
    return torch.nan_to_num(margins_TE, nan=float("inf"), posinf=float("inf"))  # -inf - -inf: never


def margin_histograms(margins_TE: torch.Tensor, selected_TE: torch.Tensor,
                      edges_B: torch.Tensor) -> torch.Tensor:
    """(2, E, B) int64: [0] margins of unselected tokens (they join when the bias rises),
    [1] margins of selected tokens (they leave when it falls). Margins past the last edge
    are not counted (the step is capped there)."""
    T, E = margins_TE.shape
    B = edges_B.numel()
    bins_TE = torch.bucketize(margins_TE.double(), edges_B.to(margins_TE.device))  # B = beyond
    side_TE = selected_TE.long()
    flat = (side_TE * E + torch.arange(E, device=margins_TE.device)) * (B + 1) + bins_TE
    hist = torch.bincount(flat.reshape(-1), minlength=2 * E * (B + 1))
    return hist.view(2, E, B + 1)[..., :B]


def newton_step(counts_E: torch.Tensor, hist_2EB: torch.Tensor, edges_B: torch.Tensor,
                gain: float, max_step: float) -> torch.Tensor:
    """(E,) float64 bias change: sign(c̄ - c_i) * min(max_step, Q_i(gain * |c̄ - c_i|)).

    Q_i(n): the margin by which n tokens on the relevant side of expert i's threshold would
    flip, read off the cumulative histogram with linear interpolation inside a bin.
    """
    load_E = counts_E.double()
    need_E = gain * (load_E.mean() - load_E)
    side_E = (need_E < 0).long()  # 0: gain tokens (raise bias), 1: shed tokens (lower it)
    E = load_E.numel()
    hist_EB = hist_2EB.double()[side_E, torch.arange(E)]
    cum_EB = hist_EB.cumsum(-1)
    target_E = need_E.abs()
    # first bin whose cumulative count reaches the target (B when none does)
    bin_E = torch.searchsorted(cum_EB, target_E.unsqueeze(-1)).squeeze(-1)
    edges = edges_B.to(load_E.device)
    lower_B = torch.cat([edges.new_zeros(1), edges[:-1]])
    inside_E = bin_E < edges.numel()
    b = bin_E.clamp(max=edges.numel() - 1)
    before_E = torch.where(b > 0, cum_EB.gather(-1, (b - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                           torch.zeros_like(target_E))
    in_bin_E = hist_EB.gather(-1, b.unsqueeze(-1)).squeeze(-1)
    frac_E = ((target_E - before_E) / in_bin_E.clamp_min(1e-12)).clamp(0, 1)
    step_E = torch.where(inside_E, lower_B[b] + frac_E * (edges[b] - lower_B[b]),
                         torch.full_like(target_E, max_step))
    return torch.where(need_E == 0, torch.zeros_like(step_E), need_E.sign() * step_E)


def track_trend(step_E: torch.Tensor, velocity_E: torch.Tensor, trend: float,
                max_step: float) -> torch.Tensor:
    """Second integrator: velocity += trend * step (in place), return step + velocity.

    A drifting router needs a bias that keeps moving; the Newton step alone follows a drift of
    r per update with a constant lag of r / gain. The velocity learns r. Anti-windup: steps
    capped at ``max_step`` (far from balance) are not integrated, and |velocity| stays below
    max_step / 4.
    """
    unsaturated_E = step_E.abs() < max_step
    velocity_E += torch.where(unsaturated_E, trend * step_E, torch.zeros_like(step_E))
    velocity_E.clamp_(-max_step / 4, max_step / 4)
    return step_E + velocity_E


def select_top_k(selection_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, E) bool mask of each row's top-K entries."""
    selected_TE = torch.zeros_like(selection_TE, dtype=torch.bool)
    return selected_TE.scatter_(1, selection_TE.topk(top_k, dim=-1).indices, True)


@torch.no_grad()
def solve_static_bias(scores_TE: torch.Tensor, top_k: int, *, multiplicative: bool = False,
                      iterations: int = 60, max_step: float = 0.25,
                      initial_bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The best single bias vector for fixed scores: (bias (E,), MaxVio it reaches).

    Iterates the Newton step on the whole set with the gain decaying from 1/2 and keeps the
    best MaxVio seen, so the result is an upper bound on the floor, typically within noise of
    it. Used for the static-bias floor of a validation set.
    """
    scores_TE = scores_TE.float()
    E = scores_TE.shape[-1]
    bias_E = (torch.ones(E) if multiplicative else torch.zeros(E)) if initial_bias_E is None \
        else initial_bias_E.detach().float().cpu().clone()
    edges_B = margin_edges(max_step)
    best_bias, best = bias_E.clone(), float("inf")
    for it in range(iterations):
        selection_TE = scores_TE * bias_E if multiplicative else scores_TE + bias_E
        selected_TE = select_top_k(selection_TE, top_k)
        counts_E = selected_TE.sum(0)
        vio = float(max_vio(counts_E))
        if vio < best:
            best, best_bias = vio, bias_E.clone()
        margins_TE = flip_margins(selection_TE, selected_TE, top_k,
                                  scores_TE if multiplicative else None)
        hist = margin_histograms(margins_TE, selected_TE, edges_B)
        gain = 0.5 / (1 + it / 20)
        bias_E = bias_E + newton_step(counts_E, hist, edges_B, gain, max_step).float()
        if multiplicative:
            bias_E = bias_E.clamp_min(1e-3)
    return best_bias, best
