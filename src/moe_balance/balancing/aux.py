"""The auxiliary-loss balancers: the Switch/GShard loss in three scopes, the router z-loss, dynamic
top-p's entropy loss and HMoE's parameter penalty. Each adds a loss to the layer's ``aux_loss``;
only the global-batch Switch loss keeps state (this step's counts so far).
"""

from __future__ import annotations

import torch

from ..config import AuxLoss, DynamicLoss, ParameterPenalty, ZLoss
from ..routing import RoutingDecision
from .base import Balancer, _all_reduce_sum, balancer_for
from .losses import dynamic_loss, normalized_probs, sequence_aux_loss, switch_loss_from_counts, z_loss


@balancer_for(AuxLoss)
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


@balancer_for(ZLoss)
class ZLossBalancer(Balancer):
    """Router z-loss: coeff * mean_t logsumexp(z_t)^2 (ST-MoE, eq. 5)."""

    def __init__(self, spec: ZLoss, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        return self.spec.coeff * z_loss(decision.logits, decision.token_mask)



@balancer_for(DynamicLoss)
class DynamicLossBalancer(Balancer):
    """Dynamic top-p's entropy penalty: coeff * mean_t H(P_t) (Huang et al. 2024, eq. 6)."""

    def __init__(self, spec: DynamicLoss, num_experts: int, num_ffn_experts: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec

    def loss(self, decision: RoutingDecision, batch_shape: torch.Size) -> torch.Tensor:
        return self.spec.coeff * dynamic_loss(decision.scores, decision.token_mask)



@balancer_for(ParameterPenalty)
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
