"""The registry of Loss-Free bias update rules: ``BiasRule`` (what a rule implements), ``RULES``
(rule name -> rule class), ``register_rule`` and ``build_rule``.

A rule turns one step's loads into a bias change. The ``LossFreeBalancer`` around it does what
every rule shares: it sums the pending counts (and the rule's pending statistics) over
data-parallel ranks, holds or freezes the bias (``start_after_steps``, ``freeze_after_steps``),
computes each expert's target load c̄_i (the mean load, or its share with
``zero_computation_share`` / ``balance="compute"``), adds the change (the multiplicative form
then clamps at 1e-3) and centres.

Adding a rule: a module in this package with a ``@register_rule("name")`` subclass of
``BiasRule`` whose docstring states its update equation and where it comes from, its import in
``rules/__init__.py``, and the name in ``config.LOSS_FREE_RULES`` (what ``LossFree(rule=...)``
accepts: the config floor cannot import this one; ``tests/test_rules_registry.py`` checks that
the two name the same rules, in the same order).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...config import LossFree
from ...routing import RoutingDecision

if TYPE_CHECKING:
    from ..loss_free import LossFreeBalancer


class BiasRule(abc.ABC):
    """One Loss-Free bias update rule, built from the ``LossFree`` spec (``self.spec``).

    The hooks get the balancer, whose buffers hold the rule's state: ``state_buffers`` names
    them, and those names are state-dict keys beside ``expert_bias``, so keep them when
    changing a rule (older checkpoints load by name).
    """

    name = ""  # set by register_rule
    pending: tuple[str, ...] = ()  # buffers (named pending_*) that the forwards add to: summed
    # over data-parallel ranks with the counts at each update, handed to ``step``, then zeroed

    def __init__(self, spec: LossFree):
        self.spec = spec

    def state_buffers(self, num_experts: int) -> dict[str, tuple[torch.Tensor, bool]]:
        """The rule's state, registered on the balancer in this order: name -> (initial value,
        persistent). Default: none."""
        return {}

    def routing_stats(self, balancer: LossFreeBalancer, decision: RoutingDecision, router: nn.Module,
                      fixed_bias_E: torch.Tensor | None = None) -> torch.Tensor | None:
        """Statistics of one training forward beyond the routed counts, handed to ``observe``
        (see ``Balancer.routing_stats``). Default: None."""
        return None

    def observe(self, balancer: LossFreeBalancer, stats: torch.Tensor) -> None:
        """Add one forward's ``routing_stats`` to the ``pending`` buffers. Default: nothing."""

    @abc.abstractmethod
    def step(self, balancer: LossFreeBalancer, load_E: torch.Tensor, target_E: torch.Tensor,
             pending: dict[str, torch.Tensor]) -> torch.Tensor:
        """(E,) float64 bias change of one update.

        load_E (E,) float64: c_i, the tokens routed to each expert in the step (all ranks).
        target_E () or (E,) float64: c̄_i, each expert's target load (the mean load when ()).
        pending: the ``pending`` buffers summed over ranks, by name (already zeroed on the
        balancer). ``balancer.num_updates`` counts the updates before this one.
        """


RULES: dict[str, type[BiasRule]] = {}


def register_rule(name: str):
    """Class decorator: make a ``BiasRule`` subclass the rule of ``LossFree(rule=name)``."""
    def register(cls: type[BiasRule]) -> type[BiasRule]:
        if name in RULES:
            raise ValueError(f"bias rule {name!r} is already registered ({RULES[name].__name__})")
        cls.name = name
        RULES[name] = cls
        return cls
    return register


def build_rule(spec: LossFree) -> BiasRule:
    """The rule of ``spec.rule``, built from the spec."""
    if spec.rule not in RULES:
        raise ValueError(f"LossFree.rule={spec.rule!r} has no registered bias rule; registered: {tuple(RULES)}")
    return RULES[spec.rule](spec)
