"""Load-balancing strategies: the Loss-Free bias and the auxiliary-loss family.

Shape legend: T tokens, E experts, K top_k, B sequences, S sequence length.

Each balancer is a small ``nn.Module`` with five hooks that the MoE layer calls:
    selection_bias() -> (E,) float32 or None   added to the scores for top-K selection only
                        (multiplied with them when ``multiplicative`` is True)
    loss(decision, batch_shape) -> 0-dim or None   added to the layer's ``aux_loss``
    routing_stats(decision, router) -> tensor or None   extra statistics of a training forward
                        (the adaptive controller's margin histograms), handed to ``observe``
    observe(counts_E, stats)   routed tokens per expert of one real training forward (called
                        from the backward pass, so checkpoint recomputation never counts twice)
    update()            once per optimizer step (``update_balancers``)

The loss formulas are pure functions with their paper's equation in the docstring.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import controller
from .config import AuxLoss, BalancerSpec, DynamicLoss, LossFree, ParameterPenalty, ZLoss
from .routing import RoutingDecision, count_experts


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ``group``, the ranks whose tokens make one global batch (in place); None: this
    process alone. The group is always explicit (``parallel.parallelize`` sets it), never the
    default group taken implicitly."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# --------------------------------------------------------------------------------------------
# Loss formulas (coefficient not included)
# --------------------------------------------------------------------------------------------

def normalized_probs(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores renormalised over all experts (DeepSeek-V3 eq. 19; a no-op for softmax)."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape[:-1], dtype=like.dtype, device=like.device) if mask is None \
        else mask.to(like.dtype)


def switch_loss_from_counts(probs_TE: torch.Tensor, counts_E: torch.Tensor,
                            token_mask_T: torch.Tensor | None = None,
                            expert_weights_E: torch.Tensor | None = None) -> torch.Tensor:
    """N * sum_i eta_i f_i P_i with f_i = counts_i / sum(counts) and P_i = mean_t probs_{t,i}.

    Switch Transformer eq. 4 / GShard; sum(counts) = K * T for dropless top-K routing, so f is
    the fraction of the K*T assignments. Equals 1 at perfect balance. Padding tokens (mask
    False) are left out of P; leave them out of ``counts`` too. eta (``expert_weights_E``,
    default 1): MoE++'s per-kind weights (tau for zero-computation experts).
    """
    valid_T = _valid(token_mask_T, probs_TE)
    p_E = (probs_TE * valid_T.unsqueeze(-1)).sum(0) / valid_T.sum().clamp_min(1)
    f_E = counts_E.float() / counts_E.sum().clamp_min(1).float()
    terms_E = f_E * p_E
    if expert_weights_E is not None:
        terms_E = terms_E * expert_weights_E
    return probs_TE.shape[-1] * terms_E.sum()


def switch_aux_loss(scores_TE: torch.Tensor, selected_TK: torch.Tensor,
                    token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Micro-batch Switch/GShard loss from the router's scores and top-K choices."""
    return switch_loss_from_counts(normalized_probs(scores_TE),
                                   expert_counts(selected_TK, scores_TE.shape[-1], token_mask_T),
                                   token_mask_T)


def sequence_aux_loss(scores_BSE: torch.Tensor, selected_BSK: torch.Tensor,
                      token_mask_BS: torch.Tensor | None = None,
                      expert_weights_E: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (eqs. 17-20), averaged over the B sequences.

    Per sequence: N/(K*S) * sum_i count_i * P_i with P over that sequence's tokens, i.e. the
    Switch loss computed on each sequence alone; K*S is the sequence's number of assignments
    (its filled slots, for routers with a variable number of experts per token, -1 marking an
    empty slot). Sequences that are all padding are skipped.
    """
    B, S, E = scores_BSE.shape
    K = selected_BSK.shape[-1]
    probs_BSE = normalized_probs(scores_BSE)
    valid_BS = _valid(token_mask_BS, probs_BSE)
    n_valid_B = valid_BS.sum(1)
    p_BE = (probs_BSE * valid_BS.unsqueeze(-1)).sum(1) / n_valid_B.clamp_min(1).unsqueeze(-1)
    filled_BSK = (selected_BSK >= 0).to(probs_BSE.dtype) * valid_BS.unsqueeze(-1)
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, selected_BSK.clamp_min(0).reshape(B, S * K), filled_BSK.reshape(B, S * K))
    f_BE = counts_BE / filled_BSK.sum((1, 2)).clamp_min(1).unsqueeze(-1)
    terms_BE = f_BE * p_BE
    if expert_weights_E is not None:  # MoE++'s tau for zero-computation experts
        terms_BE = terms_BE * expert_weights_E
    per_seq_B = E * terms_BE.sum(-1)
    has_tokens_B = n_valid_B > 0
    return per_seq_B[has_tokens_B].mean() if has_tokens_B.any() else per_seq_B.sum() * 0


def dynamic_loss(scores_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Huang et al. 2024's dynamic loss (eq. 6): mean_t -sum_i P_{t,i} log P_{t,i}, the entropy
    of each token's scores normalised over the experts."""
    probs_TE = normalized_probs(scores_TE)
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
    valid_T = _valid(token_mask_T, scores_TE)
    return (entropy_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t logsumexp(z_t)^2."""
    valid_T = _valid(token_mask_T, logits_TE)
    lse2_T = torch.logsumexp(logits_TE, dim=-1).square()
    return (lse2_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def expert_counts(selected_TK: torch.Tensor, num_experts: int,
                  token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) int64 number of tokens that chose each expert (padding rows and empty slots, -1,
    left out)."""
    if token_mask_T is not None:
        selected_TK = selected_TK[token_mask_T]
    selected_A = selected_TK.reshape(-1)
    return count_experts(selected_A[selected_A >= 0], num_experts)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

class Balancer(nn.Module):
    """Base class: every hook is a no-op; strategies override the ones they use.

    ``process_group``: the data-parallel group whose counts make the global batch (None: one
    process). Set by ``parallel.parallelize``.
    """

    observes_counts = False
    multiplicative = False
    process_group: dist.ProcessGroup | None = None

    def selection_bias(self) -> torch.Tensor | None:
        return None

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor | None:
        return None

    def routing_stats(self, decision: RoutingDecision, router: nn.Module,
                      fixed_bias_E: torch.Tensor | None = None) -> torch.Tensor | None:
        """Default: no statistics beyond the routed counts. fixed_bias_E: a constant selection
        bias the layer added to this balancer's (the expert-parallel locality bonus)."""
        return None

    def observe(self, counts_E: torch.Tensor, stats: torch.Tensor | None = None) -> None:
        """Default: this strategy does not need the routed counts."""

    def update(self) -> None:
        """Default: this strategy has no per-step state."""

    def discard_pending(self) -> None:
        """Forget what ``observe`` collected since the last update (a skipped step)."""
        for name, buffer in self.named_buffers(recurse=False):
            if name.startswith(("pending_", "accumulated_")):
                buffer.zero_()


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


class LossFreeBalancer(Balancer):
    """Auxiliary-Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664, Algorithm 1).

    Buffers (all in the state dict): ``expert_bias`` (E,) float32, kept float32 through
    ``module.to(dtype)`` (0 at start, 1 for the multiplicative form); ``pending_counts`` (E,)
    int64, tokens routed to each expert by the real training forwards since the last update;
    ``num_updates`` () int64; for the adaptive rule, ``pending_margins`` (2, E, B) int64, the
    flip-margin histograms of the same forwards (``moe_balance.controller``).
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
        if spec.rule == "adaptive":
            self.register_buffer("margin_edges", controller.margin_edges(spec.max_step), persistent=False)
            self.register_buffer("pending_margins", torch.zeros(
                2, num_experts, controller.NUM_BINS, dtype=torch.int64))
            self.register_buffer("innovation_mean", torch.zeros(num_experts, dtype=torch.float64))
            self.register_buffer("innovation_square", torch.zeros(num_experts, dtype=torch.float64))

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
        """(2, E, B) flip-margin histograms of this forward (adaptive rule only)."""
        if self.spec.rule != "adaptive":
            return None
        scores_TE = decision.scores.detach()
        bias_E = self.expert_bias if fixed_bias_E is None else self.expert_bias + fixed_bias_E
        selection_TE = router.selection(scores_TE, bias_E, self.multiplicative)
        return self.margin_stats(scores_TE, selection_TE, decision.selected_mask(), router.competition_groups,
                                 decision.token_mask)

    @torch.no_grad()
    def margin_stats(self, scores_TE: torch.Tensor, selection_TE: torch.Tensor, selected_TE: torch.Tensor,
                     groups: int = 1, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """(2, E, B) flip-margin histograms from a forward's unbiased scores, the biased
        selection scores it ranked and its (T, E) bool choices (``controller.flip_margins``);
        padding rows (token_mask False) are left out. For routers outside ``MoE`` (the
        transformers integration)."""
        margins_TE = controller.flip_margins(selection_TE, selected_TE, groups,
                                             scores_TE if self.multiplicative else None)
        if token_mask_T is not None:
            margins_TE = margins_TE.masked_fill(~token_mask_T.unsqueeze(-1), float("inf"))
        return controller.margin_histograms(margins_TE, selected_TE, self.margin_edges)

    def observe(self, counts_E: torch.Tensor, stats: torch.Tensor | None = None) -> None:
        self.pending_counts += counts_E.to(self.pending_counts.device)
        if stats is not None:
            self.pending_margins += stats.to(self.pending_margins.device)

    @torch.no_grad()
    def update(self) -> None:
        """One bias update from the whole step's counts (see ``LossFree``), then reset them.

        Counts (and margin histograms) are summed over data-parallel ranks first, so every rank
        applies the same update. No counts (e.g. a step without a training forward) means no
        update.
        """
        adaptive = self.spec.rule == "adaptive"
        E = self.pending_counts.numel()
        pending = [self.pending_counts] + ([self.pending_margins.view(-1)] if adaptive else [])
        flat = _all_reduce_sum(torch.cat(pending), self.process_group)
        for buffer in pending:
            buffer.zero_()
        counts_E = flat[:E]
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
            if adaptive:
                hist = flat[E:].view_as(self.pending_margins)
                innovation_E = controller.newton_step(counts_E, hist, self.margin_edges, 1.0, spec.max_step,
                                                      target_E=target_E)
                gain_E = controller.adaptive_gain(
                    innovation_E, self.innovation_mean, self.innovation_square, done - spec.start_after_steps + 1,
                    smoothing=spec.smoothing, min_gain=spec.min_gain, max_gain=spec.max_gain)
                # far from balance, trust the step whatever the noise estimate says: an expert
                # that just became the overloaded one has a history of the opposite sign
                error_E = (load_E - target_E).abs() / target_E
                gain_E = torch.maximum(gain_E, (error_E - spec.trust_error).clamp(0, spec.max_gain))
                delta_E = gain_E * innovation_E
                delta_E = delta_E - delta_E.mean()  # only relative biases matter: no common mode
            else:
                error_E = target_E - load_E
                delta_E = spec.update_rate * (error_E.sign() if spec.rule == "sign" else error_E / target_E)
            self.expert_bias += delta_E.float()
            if self.multiplicative:
                self.expert_bias.clamp_(min=1e-3)
            if spec.center:
                if self.multiplicative:
                    self.expert_bias /= self.expert_bias.mean()
                else:
                    self.expert_bias -= self.expert_bias.mean()
        self.num_updates += 1


class AuxLossBalancer(Balancer):
    """Switch/GShard auxiliary loss, coeff * N * sum_i f_i P_i, in one of three scopes.

    "global_batch" keeps ``accumulated_counts`` (E,) int64: the routed counts of this step's
    earlier micro-batches on this rank; each forward all-reduces (accumulated + current) so f
    covers the global batch seen so far (Qiu et al. 2025, arXiv 2501.11873).
    """

    def __init__(self, spec: AuxLoss, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec
        self.observes_counts = spec.scope == "global_batch"
        # MoE++ eta: 1 for FFN experts, tau for the zero-computation experts numbered after them
        self.expert_weights = None
        if spec.zero_computation_weight != 1.0 and num_ffn_experts is not None and num_ffn_experts < num_experts:
            self.expert_weights = torch.ones(num_experts)
            self.expert_weights[num_ffn_experts:] = spec.zero_computation_weight
        if self.observes_counts:
            self.register_buffer("accumulated_counts", torch.zeros(num_experts, dtype=torch.int64))

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        scope, mask_T = self.spec.scope, decision.token_mask
        eta_E = None if self.expert_weights is None else self.expert_weights.to(decision.scores.device)
        if scope == "micro_batch":
            value = switch_loss_from_counts(
                normalized_probs(decision.scores), decision.routed_tokens_per_expert, mask_T, eta_E)
        elif scope == "sequence":
            S = batch_shape[-1] if batch_shape else 1  # (..., S) sequences; 1-D input: one sequence
            E, K = decision.num_experts, decision.selected.shape[-1]  # K: slots, -1 when empty
            value = sequence_aux_loss(
                decision.scores.view(-1, S, E), decision.selected.view(-1, S, K),
                None if mask_T is None else mask_T.view(-1, S), eta_E)
        else:
            counts_E = decision.routed_tokens_per_expert.to(self.accumulated_counts.device)
            global_E = _all_reduce_sum(self.accumulated_counts + counts_E, self.process_group)
            value = switch_loss_from_counts(normalized_probs(decision.scores), global_E, mask_T, eta_E)
        return self.spec.coeff * value

    def observe(self, counts_E: torch.Tensor, stats: torch.Tensor | None = None) -> None:
        self.accumulated_counts += counts_E.to(self.accumulated_counts.device)

    def update(self) -> None:
        if self.observes_counts:
            self.accumulated_counts.zero_()


class ZLossBalancer(Balancer):
    """Router z-loss: coeff * mean_t logsumexp(z_t)^2 (ST-MoE, eq. 5)."""

    def __init__(self, spec: ZLoss, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        return self.spec.coeff * z_loss(decision.logits, decision.token_mask)


class DynamicLossBalancer(Balancer):
    """Dynamic top-p's entropy penalty: coeff * mean_t H(P_t) (Huang et al. 2024, eq. 6)."""

    def __init__(self, spec: DynamicLoss, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        return self.spec.coeff * dynamic_loss(decision.scores, decision.token_mask)


class ParameterPenaltyBalancer(Balancer):
    """HMoE's parameter penalty: coeff * N * sum_i (H_i / mean H) f_i P_i (``ParameterPenalty``)."""

    def __init__(self, spec: ParameterPenalty, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec
        if hidden_sizes is None:
            raise ValueError("ParameterPenalty needs the experts' hidden sizes")
        sizes = torch.tensor(hidden_sizes, dtype=torch.float32)
        self.size_weights = torch.cat([sizes / sizes.mean(), torch.zeros(num_experts - len(hidden_sizes))])

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        return self.spec.coeff * switch_loss_from_counts(
            normalized_probs(decision.scores), decision.routed_tokens_per_expert, decision.token_mask,
            self.size_weights.to(decision.scores.device))


_BUILDERS = {LossFree: LossFreeBalancer, AuxLoss: AuxLossBalancer, ZLoss: ZLossBalancer,
             DynamicLoss: DynamicLossBalancer, ParameterPenalty: ParameterPenaltyBalancer}
_LOSS_NAMES = {ZLoss: "z_loss", DynamicLoss: "dynamic_loss", ParameterPenalty: "parameter_penalty"}


def build_balancer(spec: BalancerSpec, num_experts: int, num_ffn_experts: int | None = None,
                   hidden_sizes: tuple[int, ...] | None = None) -> Balancer:
    """The stateful module implementing a balancer spec for a router over ``num_experts``
    experts, the first ``num_ffn_experts`` of them FFN experts (default: all; MoE++
    zero-computation experts come after them) of widths ``hidden_sizes`` (HMoE)."""
    return _BUILDERS[type(spec)](spec, num_experts, num_ffn_experts, hidden_sizes)


def loss_name(spec: BalancerSpec) -> str:
    """Key of a balancer's loss in ``MoEOutput.losses``."""
    return f"aux_loss/{spec.scope}" if isinstance(spec, AuxLoss) else _LOSS_NAMES.get(type(spec), "loss_free")


@torch.no_grad()
def update_balancers(model: nn.Module) -> None:
    """Apply every balancer's per-step update; call once after each ``optimizer.step()``."""
    for module in model.modules():
        if isinstance(module, Balancer):
            module.update()


@torch.no_grad()
def discard_pending_counts(model: nn.Module) -> None:
    """Drop every balancer's counts observed since the last update, leaving its state (bias,
    controller statistics, number of updates) as it was: call instead of ``update_balancers``
    when an optimizer step is skipped."""
    for module in model.modules():
        if isinstance(module, Balancer):
            module.discard_pending()


def register_balancer_update(optimizer: torch.optim.Optimizer, models: nn.Module | Iterable[nn.Module]):
    """Run ``update_balancers`` after every ``optimizer.step()``; returns the hook handle."""
    models = [models] if isinstance(models, nn.Module) else list(models)

    def hook(opt, args, kwargs):
        for m in models:
            update_balancers(m)

    return optimizer.register_step_post_hook(hook)
