"""Loss-Free balancing for torchtitan MoE models (torchtitan >= 0.3, ``models/common/moe.py``).

    from moe_balance import LossFree
    from moe_balance.integrations.torchtitan import enable_balancing

    balancing = enable_balancing(model, optimizer, spec=LossFree(rule="adaptive"),
                                 process_group=loss_mesh.get_group() if loss_mesh else None)
    ...  # torchtitan's training loop, unchanged
    metrics = balancing.metrics()   # {"maxvio_batch": ..., "maxvio_batch_layers": [...], "loads": [...]}

``enable_balancing`` replaces torchtitan's expert-bias update with this library's, in place:

- every torchtitan ``MoE`` layer gets a ``LossFreeBalancer`` (any rule and form); its float32
  bias is what the router ranks with (``MoE.expert_bias_E`` now reads it) and what the state
  dict holds under torchtitan's key ``expert_bias_E``; the balancer's other state (update
  counter, the adaptive rule's statistics) sits beside it under ``router.balancer.*``, so a
  DCP checkpoint of the model resumes the controller exactly;
- tokens are counted on the backward pass of training forwards (``observe_on_backward``):
  once under activation checkpointing of either kind, never in eval or ``no_grad`` forwards,
  summed over gradient-accumulation micro-batches; torchtitan's own counter
  (``tokens_per_expert_E``, counted in the forward) is no longer read;
- the update runs after every ``optimizer.step()`` (a step post-hook), its counts all-reduced
  over ``process_group`` (torchtitan's "loss" mesh: the data-parallel ranks); torchtitan's own
  pre-hook (``register_moe_load_balancing_hook``) is removed from the optimizer if present.

Call it after the model's weights are initialised (``init_states``) or loaded: a bias already
in the layer is the starting point. Load a plain torchtitan checkpoint (one without the
``router.balancer.*`` entries) before enabling, not after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .._optional import require
from ..balancing import LossFreeBalancer, register_balancer_update
from ..config import LossFree
from ..metrics import max_vio
from ..moe import observe_on_backward
from ..routing import slots_to_mask
from ..routing.decision import count_experts
from ._loads import recording_loads

BIAS = "expert_bias_E"


def _torchtitan_moe():
    return require("torchtitan.models.common.moe", "the torchtitan integration")


def torchtitan_moe_layers(model: nn.Module) -> list[nn.Module]:
    """Every torchtitan ``MoE`` layer of ``model``, in module order."""
    moe_class = _torchtitan_moe().MoE
    return [m for m in model.modules() if isinstance(m, moe_class)]


class _BalancedRouter:
    """Mixed into torchtitan's ``TokenChoiceTopKRouter`` by ``enable_balancing``: ranks with the
    balancer's bias and reports the forward's counts on its backward."""

    balancer: LossFreeBalancer
    recorded_loads: torch.Tensor | None

    def forward(self, x_BLD: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        bias_E = self.balancer.expert_bias
        topk_scores_BLK, topk_ids_BLK, scores_BLE = super().forward(x_BLD, bias_E)
        observed = self.training and torch.is_grad_enabled()
        if self.recorded_loads is None and not observed:
            return topk_scores_BLK, topk_ids_BLK, scores_BLE
        E = self.num_experts
        counts_E = count_experts(topk_ids_BLK.reshape(-1), E)
        if self.recorded_loads is not None:
            self.recorded_loads += counts_E.to(self.recorded_loads.device)
        if observed:
            stats = None
            if self.balancer.spec.rule == "adaptive":
                scores_TE = scores_BLE.detach().reshape(-1, E)
                selection_BLE = scores_BLE.detach() + bias_E
                if self.num_expert_groups is not None:  # the groups the router kept, as it ranked them
                    selection_BLE = self._get_node_limited_routing_scores(selection_BLE)
                selected_TE = slots_to_mask(topk_ids_BLK.reshape(-1, topk_ids_BLK.shape[-1]), E)
                stats = self.balancer.margin_stats(scores_TE, selection_BLE.reshape(-1, E), selected_TE)
            topk_scores_BLK = observe_on_backward(topk_scores_BLK, counts_E.detach(), [self.balancer], [stats],
                                                  anchor=x_BLD)
        return topk_scores_BLK, topk_ids_BLK, scores_BLE


class _BalancedMoE:
    """Mixed into torchtitan's ``MoE``: ``expert_bias_E`` is the balancer's bias (assigning it,
    as ``init_states`` does, writes into that tensor)."""

    @property
    def expert_bias_E(self) -> torch.Tensor:
        return self.router.balancer.expert_bias

    @expert_bias_E.setter
    def expert_bias_E(self, value: torch.Tensor | None) -> None:
        if value is not None:
            with torch.no_grad():
                self.router.balancer.expert_bias.copy_(value)


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """The bias under torchtitan's key; the balancer's other state beside it."""
    state_dict[prefix + BIAS] = state_dict.pop(prefix + "router.balancer.expert_bias")
    return state_dict


def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + BIAS in state_dict:
        state_dict[prefix + "router.balancer.expert_bias"] = state_dict.pop(prefix + BIAS).float()


_CLASSES: dict[tuple[type, type], type] = {}


def _mixed(mixin: type, base: type) -> type:
    if (mixin, base) not in _CLASSES:
        _CLASSES[(mixin, base)] = type(f"Balanced{base.__name__}", (mixin, base), {})
    return _CLASSES[(mixin, base)]


class TorchtitanBalancing:
    """What ``enable_balancing`` returns: the balancers, in layer order, and their metrics."""

    def __init__(self, layers: list[nn.Module], hook):
        self.layers, self.hook = layers, hook

    @property
    def balancers(self) -> list[LossFreeBalancer]:
        return [layer.router.balancer for layer in self.layers]

    def metrics(self) -> dict:
        """The last update's load over the whole computation batch: MaxVio_batch per layer and
        its mean, and each layer's per-expert counts (empty before the first update)."""
        counts = [b.last_counts for b in self.balancers]
        if any(c is None for c in counts):
            return {}
        vio = [float(max_vio(c)) for c in counts]
        return {"maxvio_batch": sum(vio) / len(vio), "maxvio_batch_layers": vio,
                "loads": [c.tolist() for c in counts]}

    @contextmanager
    def record_loads(self):
        """Count every forward inside the block (eval ones too: for a held-out set's
        MaxVio_global, ``max_vio`` of the stacked loads); yields a list filled on exit with each
        layer's (E,) int64 loads."""
        with recording_loads([layer.router for layer in self.layers]) as loads:
            yield loads


def _remove_torchtitan_hooks(optimizer) -> int:
    """Drop torchtitan's expert-bias pre-hook from the optimizer; how many were removed."""
    hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {})
    theirs = [k for k, fn in hooks.items()
              if getattr(fn, "__qualname__", "").startswith("register_moe_load_balancing_hook")]
    for k in theirs:
        del hooks[k]
    return len(theirs)


def enable_balancing(model: nn.Module | list[nn.Module], optimizer: torch.optim.Optimizer | None = None, *,
                     spec: LossFree | None = None, process_group=None) -> TorchtitanBalancing:
    """Give every torchtitan ``MoE`` layer of ``model`` (a module, or torchtitan's list of model
    parts) this library's Loss-Free balancing; in place (see the module docstring).

    spec: the controller (default ``LossFree(rule="adaptive")``); ``LossFree(rule="sign",
    update_rate=u, center_step=True)`` is torchtitan's own update with ``load_balance_coeff=u``.
    optimizer: the update runs after each of its steps (None: call ``update_balancers(model)``
    yourself after each step). process_group: the data-parallel group whose counts make the
    global batch (torchtitan's "loss" mesh; None on one process).

    Raises ValueError when there is no torchtitan MoE layer, or balancing is already enabled.
    """
    spec = spec if spec is not None else LossFree(rule="adaptive")
    if not isinstance(spec, LossFree):
        raise ValueError(f"enable_balancing takes a LossFree spec; got {spec!r}")
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    layers = [layer for part in parts for layer in torchtitan_moe_layers(part)]
    if not layers:
        raise ValueError("enable_balancing found no torchtitan MoE layer (torchtitan.models.common.moe.MoE) in "
                         f"{', '.join(type(p).__name__ for p in parts)}")
    if any(isinstance(layer, _BalancedMoE) for layer in layers):
        raise ValueError("balancing is already enabled on this model")
    for layer in layers:
        router = layer.router
        balancer = LossFreeBalancer(spec, router.num_experts).to(router.gate.weight.device)
        balancer.process_group = process_group
        start = layer._buffers.pop(BIAS, None) if BIAS in layer._buffers else None
        if start is not None:
            balancer.expert_bias.copy_(start.float())
        layer.__dict__.pop(BIAS, None)  # load_balance_coeff=None leaves a plain None attribute
        if layer.load_balance_coeff is None:  # torchtitan's flag for "biased routing on"
            layer.load_balance_coeff = spec.update_rate or 1e-3
        router.__class__ = _mixed(_BalancedRouter, type(router))
        router.balancer = balancer
        router.recorded_loads = None
        layer.__class__ = _mixed(_BalancedMoE, type(layer))
        layer._register_state_dict_hook(_state_dict_hook)
        layer.register_load_state_dict_pre_hook(_load_hook)
    hook = None
    if optimizer is not None:
        _remove_torchtitan_hooks(optimizer)
        hook = register_balancer_update(optimizer, parts)
    return TorchtitanBalancing(layers, hook)
