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

Modules: ``losses`` (the loss formulas), ``base`` (``Balancer``, ``build_balancer`` and the
per-step drivers), ``loss_free`` (``LossFreeBalancer``, ``target_shares``), ``rules`` (the
Loss-Free bias update rules, one module per rule: ``sign``, ``error``, ``adaptive``, behind the
registry ``rules.RULES``), ``aux`` (the auxiliary-loss balancers) and ``static_bias`` (the
best fixed bias for cached scores). Every name is importable from ``moe_balance.balancing``.
"""

from ..config import AuxLoss, BalancerSpec, DynamicLoss, LossFree, ParameterPenalty, ZLoss
from ..routing import RoutingDecision, count_experts
from .base import (_BUILDERS, _LOSS_NAMES, Balancer, _all_reduce_sum, balancer_for, build_balancer,
                   discard_pending_counts, loss_name, register_balancer_update, update_balancers)
from .losses import (_valid, dynamic_loss, expert_counts, normalized_probs, sequence_aux_loss, switch_aux_loss,
                     switch_loss_from_counts, z_loss)
from .rules import RULES, BiasRule, build_rule, register_rule
# each balancer registers itself in _BUILDERS (build_balancer) on import
from .loss_free import LossFreeBalancer, target_shares
from .aux import AuxLossBalancer, DynamicLossBalancer, ParameterPenaltyBalancer, ZLossBalancer
from .static_bias import select_top_k, solve_static_bias
