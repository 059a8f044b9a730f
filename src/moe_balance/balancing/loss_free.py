"""The Loss-Free balancer: a selection-only bias per expert, updated once per optimizer step from
the step's routed counts by one of the bias rules of ``balancing.rules`` (``LossFree.rule``),
and ``target_shares``, each expert's target share of the load (MoE++ zero-computation experts,
HMoE compute balance).

Shape legend: T tokens, E experts, B margin-histogram bins.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LossFree
from ..routing import RoutingDecision
from .base import Balancer, _all_reduce_sum, balancer_for
from .rules import build_rule


def target_shares(spec: LossFree, num_experts: int, num_ffn_experts: int | None = None,
                  hidden_sizes: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """(E,) float64 target share of the assignments per expert, summing to 1, or None for equal
    shares. The zero-computation experts (numbered after the FFN ones) share
    ``zero_computation_share`` equally; the FFN experts share the rest equally, or in
    proportion to 1 / H_i with ``balance="compute"`` (equal tokens x width)."""
    ffn = num_experts if num_ffn_experts is None else num_ffn_experts
    share = spec.zero_computation_share
    if share is None and spec.balance == "tokens":
        return None
    if share is not None and ffn >= num_experts:
        raise ValueError("LossFree.zero_computation_share needs zero-computation experts")
    weights = torch.ones(ffn, dtype=torch.float64)
    if spec.balance == "compute":
        if hidden_sizes is None or len(hidden_sizes) != ffn:
            raise ValueError("LossFree(balance='compute') needs one hidden size per FFN expert")
        weights = 1 / torch.tensor(hidden_sizes, dtype=torch.float64)
    if share is None:  # no zero-computation target: they stay at equal shares with the FFN experts
        share = (num_experts - ffn) / num_experts
    ffn_share = (1 - share) * weights / weights.sum()
    rest = num_experts - ffn
    return torch.cat([ffn_share, torch.full((rest,), share / max(rest, 1), dtype=torch.float64)])


@balancer_for(LossFree)
class LossFreeBalancer(Balancer):
    """Auxiliary-Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664, Algorithm 1).

    Buffers (all in the state dict): ``expert_bias`` (E,) float32, kept float32 through
    ``module.to(dtype)`` (0 at start, 1 for the multiplicative form); ``pending_counts`` (E,)
    int64, tokens routed to each expert by the real training forwards since the last update;
    ``num_updates`` () int64; then the rule's own buffers (``BiasRule.state_buffers``): for the
    adaptive rule, ``pending_margins`` (2, E, B) int64, the flip-margin histograms of the same
    forwards, and the moving averages ``innovation_mean``, ``innovation_square`` (E,) float64
    (``rules.adaptive``).

    ``rule``: the ``BiasRule`` of ``spec.rule`` (``rules.RULES``). The balancer does what every
    rule shares (the data-parallel sum, hold and freeze, the target loads, the additive or
    multiplicative form, clamping and centring); the rule turns the step's loads into the
    bias change.
    """

    observes_counts = True

    def __init__(self, spec: LossFree, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec
        self.multiplicative = spec.form == "multiplicative"
        self.target_share = target_shares(spec, num_experts, num_ffn_experts, hidden_sizes)
        start = torch.ones if self.multiplicative else torch.zeros
        self.register_buffer("expert_bias", start(num_experts, dtype=torch.float32))
        self.register_buffer("pending_counts", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.last_counts: torch.Tensor | None = None  # (E,) int64 counts of the last update
        self.rule = build_rule(spec)
        # NOTE: the rule's state lives in buffers of this module, not of a submodule, so their
        # state-dict keys (e.g. balancers.0.pending_margins) are the ones checkpoints hold.
        for name, (value, persistent) in self.rule.state_buffers(num_experts).items():
            self.register_buffer(name, value, persistent=persistent)

    def _apply(self, fn, recurse=True):
        # NOTE: model.to(torch.bfloat16) would cast the bias: a bf16 bias cannot represent
        # 1e-3 steps around values near 1 (a bug users report in other frameworks). Every
        # buffer here is controller state: keep its dtype and value, follow the device only.
        kept = dict(self.named_buffers(recurse=False))
        super()._apply(fn, recurse)
        for name, value in kept.items():
            current = getattr(self, name)
            if current.dtype != value.dtype:
                setattr(self, name, value.to(device=current.device))
        return self

    def selection_bias(self) -> torch.Tensor:
        return self.expert_bias

    @torch.no_grad()
    def routing_stats(self, decision: RoutingDecision, router: nn.Module,
                      fixed_bias_E: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rule's statistics of this forward: (2, E, B) flip-margin histograms for the adaptive
        rule, None for the others (``BiasRule.routing_stats``)."""
        return self.rule.routing_stats(self, decision, router, fixed_bias_E)

    @torch.no_grad()
    def margin_stats(self, scores_TE: torch.Tensor, selection_TE: torch.Tensor, selected_TE: torch.Tensor,
                     groups: int = 1, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """(2, E, B) flip-margin histograms from a forward's unbiased scores, the biased
        selection scores it ranked and its (T, E) bool choices (``rules.adaptive.flip_margins``);
        padding rows (token_mask False) are left out. For routers outside ``MoE`` (the
        transformers integration). Adaptive rule only."""
        return self.rule.margin_stats(self, scores_TE, selection_TE, selected_TE, groups, token_mask_T)

    def observe(self, counts_E: torch.Tensor, stats: torch.Tensor | None = None) -> None:
        self.pending_counts += counts_E.to(self.pending_counts.device)
        if stats is not None:
            self.rule.observe(self, stats)

    @torch.no_grad()
    def update(self) -> None:
        """One bias update from the whole step's counts (see ``LossFree``), then reset them.

        Counts (and the rule's pending statistics, e.g. margin histograms) are summed over
        data-parallel ranks first, so every rank applies the same update. No counts (e.g. a step
        without a training forward) means no update.
        """
        pending = [self.pending_counts] + [getattr(self, name) for name in self.rule.pending]
        flat = _all_reduce_sum(torch.cat([buffer.view(-1) for buffer in pending]), self.process_group)
        for buffer in pending:
            buffer.zero_()
        counts_E, *summed = flat.split([buffer.numel() for buffer in pending])
        self.last_counts = counts_E  # the step's counts over the whole computation batch, for metrics
        # host sync, once per optimizer step (not in the forward or backward): whether to update
        if int(counts_E.sum()) == 0:
            return
        spec = self.spec
        done = int(self.num_updates)
        frozen = spec.freeze_after_steps is not None and done >= spec.freeze_after_steps
        held = done < spec.start_after_steps  # the bias keeps its start value; these counts are dropped
        if not frozen and not held:
            load_E = counts_E.double()
            # each expert's target load: the mean, or its share of the step's assignments
            target_E = load_E.mean() if self.target_share is None else \
                load_E.sum() * self.target_share.to(load_E.device)
            stats = {name: sum_.view_as(getattr(self, name)) for name, sum_ in zip(self.rule.pending, summed)}
            step_E = self.rule.step(self, load_E, target_E, stats).float()
            if spec.center_step:  # zero-mean steps, in float32 (torchtitan's update)
                step_E = step_E - step_E.mean()
            self.expert_bias += step_E
            if self.multiplicative:
                self.expert_bias.clamp_(min=1e-3)
            if spec.center:
                if self.multiplicative:
                    self.expert_bias /= self.expert_bias.mean()
                else:
                    self.expert_bias -= self.expert_bias.mean()
        self.num_updates += 1
