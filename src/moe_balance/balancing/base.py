"""The ``Balancer`` base class (the five hooks the MoE layer calls, all no-ops), the registry from
balancer spec type to its module (``balancer_for``, ``build_balancer``), the key of each loss
in ``MoEOutput.losses`` (``loss_name``), the per-step drivers (``update_balancers``,
``discard_pending_counts``, ``register_balancer_update``) and the data-parallel sum the
balancers share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..config import AuxLoss, BalancerSpec, DynamicLoss, ParameterPenalty, ZLoss
from ..routing import RoutingDecision


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ``group``, the ranks whose tokens make one global batch (in place); None: this
    process alone. The group is always explicit (``parallel.parallelize`` sets it), never the
    default group taken implicitly."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


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


_BUILDERS: dict[type, type[Balancer]] = {}  # spec type -> its balancer, filled by balancer_for
_LOSS_NAMES = {ZLoss: "z_loss", DynamicLoss: "dynamic_loss", ParameterPenalty: "parameter_penalty"}


def balancer_for(spec_type: type):
    """Class decorator: ``build_balancer`` builds this ``Balancer`` subclass for specs of
    ``spec_type`` (one of ``config.BALANCER_SPECS``)."""
    def register(cls: type[Balancer]) -> type[Balancer]:
        _BUILDERS[spec_type] = cls
        return cls
    return register


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
