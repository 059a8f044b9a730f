"""Routers: router logits -> scores -> (biased) selection -> gate weights -> assignments.

Shape legend (suffixes on tensor names):
    T tokens, E routed experts, K slots per token (K_max for ragged routers), G expert groups,
    A kept token-expert assignments, C tokens per expert (expert choice).

Vocabulary, used everywhere: ``logits`` are the router output z = x . e_i (float32 always);
``scores`` are sigmoid(z) or softmax(z); ``bias`` is the Loss-Free selection-only offset;
``selection`` is what the choice is made on (scores with the bias); ``weights`` are the gates
actually applied to expert outputs (from unbiased scores).

Four routers share one ``Router.forward`` and differ only in ``select`` (``ROUTERS``):
token-choice top-K, expert choice, dynamic top-p and Mixture of Grouped Experts. Every one
returns the same ``RoutingDecision``, so dispatch, experts, losses, balancers and metrics
have no router-specific code.

Modules: ``decision`` (``RoutingDecision`` and the router-independent steps), ``base`` (the
``Router`` base class, the registry ``ROUTERS``, ``register_router`` and ``build_router``), and
one module per router: ``top_k``, ``expert_choice``, ``top_p``, ``grouped``. A new router is a
module with a ``@register_router("name")`` subclass of ``Router``, imported below, and its name
in ``config.ROUTER_METHODS``. Every name is importable from ``moe_balance.routing`` itself.
"""

from ..config import RouterConfig  # importable from here as before the split
from .base import _NONFINITE, ROUTERS, Router, _blank_padding, _check_finite, build_router, register_router
from .decision import (RoutingDecision, biased_selection, capacity, compute_scores, count_experts,
                       group_limited_mask, mask_to_slots, slots_to_mask, sort_assignments)
# each router registers itself in ROUTERS on import, in this order
from .top_k import TopKRouter
from .expert_choice import CausalLeakWarning, ExpertChoiceRouter
from .top_p import TopPRouter
from .grouped import GroupedRouter
