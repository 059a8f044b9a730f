"""Configuration: frozen, keyword-only dataclasses validated on construction.

Every invalid value raises ``ValueError`` naming the field, the value and what is allowed,
so a typo in an experiment fails at the line that made it, not deep inside a forward pass.

Balancer specs (``LossFree``, ``AuxLoss``, ``ZLoss``) live here as plain data; the stateful
modules that implement them are built from these specs by ``moe_balance.balancing``.

Modules: ``_checks`` (the allowed values and the validation helpers), ``router``
(``RouterConfig``), ``balancers`` (the balancer specs), ``layer`` (``MoEConfig``). Every name is
importable from ``moe_balance.config`` itself.
"""

from ._checks import (AUX_SCOPES, DROP_POLICIES, EXPERT_CHOICE_CAPACITY, EXPERT_IMPLS, LOSS_FREE_BALANCE,
                      LOSS_FREE_FORMS, LOSS_FREE_RULES, ROUTER_METHODS, SCORE_FNS, TOP_P_DEFAULT, _bool, _choice,
                      _non_negative, _positive_int, is_number)
from .balancers import BALANCER_SPECS, AuxLoss, BalancerSpec, DynamicLoss, LossFree, ParameterPenalty, ZLoss
from .layer import MoEConfig, heterogeneous_widths
from .router import RouterConfig
