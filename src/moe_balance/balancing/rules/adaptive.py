"""The adaptive Loss-Free bias controller: a per-expert Newton step with a noise-adaptive gain.

Shape legend: T tokens, E experts, K top_k, G competition groups, B margin-histogram bins.

The paper's sign rule moves every bias by a constant +/-u. Han and Zhong (2025, arXiv
2512.03915) read that update as a dual (sub)gradient step on the experts' capacity
constraints, where the step size is the whole game: a constant u is too slow early (the router's
preferences outgrow a bias moving 1e-3 a step) and too jumpy late. Measured on the quick preset,
two facts shape this controller: routing is very sensitive (a bias error of 0.01 per expert
costs MaxVio ~0.7, since many tokens sit near each top-K threshold), and each batch's content
moves the per-batch optimal bias of specialist experts by more than that. So the controller
must (a) size its step from how many tokens a unit of bias moves, (b) follow a drifting router
quickly, and (c) average batch noise instead of chasing it. Per expert i, after each step:

1. **Flip margins** (``flip_margins``). For token t, m_{t,i} >= 0 is how far b_i must move
   for t to change its mind about i: for a selected expert, down to the best unselected
   selection score of t; for an unselected one, up to the worst selected score of t. Measured
   in bias units (divided by d selection / d b_i: 1 for the additive form, s_{t,i} for the
   multiplicative one).
2. **Histograms** (``margin_histograms``). The margins of the tokens that would join expert i
   if its bias rose (unselected) and of those that would leave if it fell (selected), counted
   in B geometric bins up to ``max_step``. These (2, E, B) counts add up over micro-batches and
   data-parallel ranks exactly like the loads do.
3. **Innovation** (``newton_step`` with gain 1): y_i = sign(c̄ - c_i) * min(max_step,
   Q_i(|c̄ - c_i|)), where Q_i(n) is the margin of the n-th nearest token on the relevant side
   of expert i's threshold in the last step (linear inside a bin): the bias change that would
   have balanced expert i alone on the last step.
4. **Gain** (``adaptive_gain``): with m_i, v_i exponential moving averages (``smoothing``,
   bias-corrected) of y_i and y_i^2, g_i = clip(m_i^2 / v_i, min_gain, max_gain). Innovations
   that keep their sign (the bias lags a drifting router) give m^2/v -> 1: full steps.
   Zero-mean innovations (batch content) give m^2/v -> (1 - smoothing)/(1 + smoothing):
   small steps, so the bias averages the per-batch optimum over about 1/g batches. This is a
   scalar Kalman filter's gain with the noise ratio estimated online, or Adam's m/sqrt(v).
5. **Update**: b_i += g_i * y_i - mean_j(g_j * y_j). Removing the common mode changes no
   selection (top-K ignores a shift shared by all experts) and keeps the biases centred.
6. **Start** (``LossFree.start_after_steps``, 0 by default, 50 in the harness's
   ``loss_free_adaptive``, which also sets ``smoothing=0.7``): the bias stays at its start for
   that many updates, and the moving averages start with the first real one.

**Causality.** The bias used for a batch comes from earlier batches only: the histograms are
taken in the step's forward passes and used by ``update()`` after the optimizer step, for the
next step's batches.

``solve_static_bias`` (``balancing.static_bias``) iterates the same step to convergence on
cached scores: the best single bias vector for a fixed router (the "static-bias floor" of a
validation set).

``AdaptiveRule`` is ``LossFree(rule="adaptive")``: these functions wired into the Loss-Free
balancer. The controller is this project's own; README.md's section "The adaptive bias
controller" describes it and how it was chosen.
"""

from __future__ import annotations

import torch
from torch import nn

from ...routing import RoutingDecision, count_experts
from .base import BiasRule, register_rule

NUM_BINS = 32
MIN_STEP_FRACTION = 1e-4  # the first bin edge, as a fraction of max_step


def margin_edges(max_step: float, num_bins: int = NUM_BINS, device=None) -> torch.Tensor:
    """(B,) float64 upper bin edges, geometric from max_step * 1e-4 to max_step; the first bin
    also holds margins in [0, edge_0)."""
    # no host sync in fact: CPU scalars made from Python floats, once, when the balancer is built
    return torch.logspace(torch.log10(torch.tensor(max_step * MIN_STEP_FRACTION)).item(),
                          torch.log10(torch.tensor(max_step)).item(), num_bins,
                          dtype=torch.float64, device=device)


def flip_margins(selection_TE: torch.Tensor, selected_TE: torch.Tensor, groups: int = 1,
                 slope_TE: torch.Tensor | None = None) -> torch.Tensor:
    """(T, E) bias change each (token, expert) needs to flip: >= 0, inf where it never flips.

    selection_TE: the (biased) scores the choice was made on, -inf for ineligible experts.
    selected_TE: bool, the experts each token chose (any number per token: top-K, top-p).
    groups: the experts compete for a token's slots in this many equal groups of consecutive
    experts (1 for top-K and top-p; M for Mixture of Grouped Experts, which fills each group
    separately). A selected expert flips out when its selection falls below the best unselected
    one of its group; an unselected one flips in when it rises above the worst selected one.
    slope_TE: d selection / d bias (None = 1, the additive bias; the scores for the
    multiplicative one).
    """
    T, E = selection_TE.shape
    selection_TGe = selection_TE.view(T, groups, E // groups)
    selected_TGe = selected_TE.view(T, groups, E // groups)
    inf = float("inf")
    worst_selected_TG1 = selection_TGe.masked_fill(~selected_TGe, inf).amin(-1, keepdim=True)
    best_unselected_TG1 = selection_TGe.masked_fill(selected_TGe, -inf).amax(-1, keepdim=True)
    margins_TE = torch.where(selected_TGe, selection_TGe - best_unselected_TG1,
                             worst_selected_TG1 - selection_TGe).view(T, E)
    if slope_TE is not None:
        margins_TE = margins_TE / slope_TE.clamp_min(1e-12)
    margins_TE = margins_TE.clamp_min(0)
    return torch.nan_to_num(margins_TE, nan=float("inf"), posinf=float("inf"))  # -inf - -inf: never


def margin_histograms(margins_TE: torch.Tensor, selected_TE: torch.Tensor,
                      edges_B: torch.Tensor) -> torch.Tensor:
    """(2, E, B) int64: [0] margins of unselected tokens (they join when the bias rises),
    [1] margins of selected tokens (they leave when it falls). Bins are (edge_{b-1}, edge_b],
    the first one [0, edge_0]; margins past the last edge are not counted (the step is capped
    there). The edges must be geometric (``margin_edges``): a bin index is then
    ceil(log(m / edge_0) / log(ratio)), much cheaper than a search.
    """
    T, E = margins_TE.shape
    B = edges_B.numel()
    # float64 then float32 tensors, as Python floats would be: no host sync (torch.compile)
    log_edges = edges_B.double().log()
    log_first, log_ratio = log_edges[0], (log_edges[-1] - log_edges[0]) / max(B - 1, 1)
    logs_TE = margins_TE.float().clamp_min(1e-30).log()
    bins_TE = ((logs_TE - log_first.float()) / log_ratio.float()).ceil_().clamp_(0, B).to(torch.int32)  # B = beyond
    experts_E = torch.arange(E, device=margins_TE.device, dtype=torch.int32)
    flat = ((selected_TE.to(torch.int32) * E + experts_E) * (B + 1) + bins_TE).reshape(-1).long()
    hist = count_experts(flat, 2 * E * (B + 1))  # a bincount of fixed length
    return hist.view(2, E, B + 1)[..., :B]


def newton_step(counts_E: torch.Tensor, hist_2EB: torch.Tensor, edges_B: torch.Tensor,
                gain: float, max_step: float, target_E: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) float64 bias change: sign(c̄ - c_i) * min(max_step, Q_i(gain * |c̄ - c_i|)).

    Q_i(n): the margin by which n tokens on the relevant side of expert i's threshold would
    flip, read off the cumulative histogram with linear interpolation inside a bin. c̄ is the
    mean load, or ``target_E`` (each expert's own target load) when given.
    """
    load_E = counts_E.double()
    need_E = gain * ((load_E.mean() if target_E is None else target_E) - load_E)
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


def adaptive_gain(innovation_E: torch.Tensor, mean_E: torch.Tensor, square_E: torch.Tensor,
                  count: int, *, smoothing: float, min_gain: float, max_gain: float) -> torch.Tensor:
    """Per-expert gain from the signal-to-noise ratio of the innovations (updated in place).

    innovation: the full Newton step (the bias that would have balanced the last step, minus
    the current one). mean, square: its exponential moving averages (bias-corrected after
    ``count`` updates, as in Adam). gain = m^2 / v clipped to [min_gain, max_gain]: near 1 when
    the innovations keep their sign (the bias lags a drifting router: follow it fast), near
    (1 - smoothing) / (1 + smoothing) when they are zero-mean noise (batch content: average it).
    """
    mean_E.mul_(smoothing).add_((1 - smoothing) * innovation_E)
    square_E.mul_(smoothing).add_((1 - smoothing) * innovation_E.square())
    correction = 1 - smoothing ** count
    m_E, v_E = mean_E / correction, square_E / correction
    snr_E = m_E.square() / v_E.clamp_min(1e-30)
    return torch.where(v_E > 0, snr_E, torch.ones_like(snr_E)).clamp(min_gain, max_gain)


@register_rule("adaptive")
class AdaptiveRule(BiasRule):
    """The adaptive controller (this module's docstring; ours, described in README.md's "The
    adaptive bias controller"). With c_i the step's load of expert i and c̄_i its target:

        y_i = sign(c̄_i - c_i) * min(max_step, Q_i(|c̄_i - c_i|))         (``newton_step``)
        g_i = max(clip(m_i^2 / v_i, min_gain, max_gain),                  (``adaptive_gain``)
                  clip(|c_i - c̄_i| / c̄_i - trust_error, 0, max_gain))
        b_i += g_i * y_i - mean_j(g_j * y_j)

    Q_i reads the step's flip-margin histograms (``pending_margins``, taken in the forwards by
    ``routing_stats``); m_i, v_i are the moving averages ``innovation_mean``,
    ``innovation_square``, bias-corrected from the first update after ``start_after_steps``.
    ``LossFree.update_rate`` is not used.
    """

    pending = ("pending_margins",)

    def state_buffers(self, num_experts: int) -> dict[str, tuple[torch.Tensor, bool]]:
        return {
            "margin_edges": (margin_edges(self.spec.max_step), False),
            "pending_margins": (torch.zeros(2, num_experts, NUM_BINS, dtype=torch.int64), True),
            "innovation_mean": (torch.zeros(num_experts, dtype=torch.float64), True),
            "innovation_square": (torch.zeros(num_experts, dtype=torch.float64), True),
        }

    def routing_stats(self, balancer, decision: RoutingDecision, router: nn.Module,
                      fixed_bias_E: torch.Tensor | None = None) -> torch.Tensor:
        """(2, E, B) flip-margin histograms of this forward, on the selection it ranked (the
        balancer's bias plus ``fixed_bias_E``)."""
        scores_TE = decision.scores.detach()
        bias_E = balancer.expert_bias if fixed_bias_E is None else balancer.expert_bias + fixed_bias_E
        selection_TE = router.selection(scores_TE, bias_E, balancer.multiplicative)
        return self.margin_stats(balancer, scores_TE, selection_TE, decision.selected_mask(),
                                 router.competition_groups, decision.token_mask)

    def margin_stats(self, balancer, scores_TE: torch.Tensor, selection_TE: torch.Tensor,
                     selected_TE: torch.Tensor, groups: int = 1,
                     token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """(2, E, B) flip-margin histograms (``LossFreeBalancer.margin_stats``)."""
        margins_TE = flip_margins(selection_TE, selected_TE, groups,
                                  scores_TE if balancer.multiplicative else None)
        if token_mask_T is not None:
            margins_TE = margins_TE.masked_fill(~token_mask_T.unsqueeze(-1), float("inf"))
        return margin_histograms(margins_TE, selected_TE, balancer.margin_edges)

    def observe(self, balancer, stats: torch.Tensor) -> None:
        balancer.pending_margins += stats.to(balancer.pending_margins.device)

    def step(self, balancer, load_E: torch.Tensor, target_E: torch.Tensor,
             pending: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        innovation_E = newton_step(load_E, pending["pending_margins"], balancer.margin_edges, 1.0, spec.max_step,
                                   target_E=target_E)
        gain_E = adaptive_gain(
            innovation_E, balancer.innovation_mean, balancer.innovation_square,
            int(balancer.num_updates) - spec.start_after_steps + 1,
            smoothing=spec.smoothing, min_gain=spec.min_gain, max_gain=spec.max_gain)
        # far from balance, trust the step whatever the noise estimate says: an expert
        # that just became the overloaded one has a history of the opposite sign
        error_E = (load_E - target_E).abs() / target_E
        gain_E = torch.maximum(gain_E, (error_E - spec.trust_error).clamp(0, spec.max_gain))
        delta_E = gain_E * innovation_E
        return delta_E - delta_E.mean()  # only relative biases matter: no common mode
