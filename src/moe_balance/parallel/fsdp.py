"""FSDP2 over the parallel layout: ZeRO-3 sharding of parameters, gradients and optimizer
state with ``torch.distributed.fsdp.fully_shard``, beside expert parallelism (torchtitan's
EP x dp_shard layout).

- The dense parameters (embeddings, attention, norms, routers, shared experts, the head) are
  sharded over every rank (``groups.data_mesh``), one FSDP unit per block plus the root.
- Sharded experts (``ShardedSwiGLUExperts``, expert parallelism) are their own FSDP unit over
  the ranks that hold the same experts (``groups.mesh["expert_data"]``). Their gradient must be
  the sum over that group divided by the whole data group's size (``parallel`` module
  docstring), so the unit's reduce-scatter divides by W instead of by its own size. With one
  rank per expert-data group there is nothing to shard: the experts stay plain tensors, left
  out of every FSDP unit, and ``sync_gradients`` scales their gradients as without FSDP.
- Without expert parallelism the experts belong to their block's unit like any dense
  parameter: every rank holds every expert's shard and the gradient is the data group's mean.
- The balancers hold buffers, not parameters: FSDP2 shards, gathers and reduces parameters
  only, so the bias, the pending counts and the controller's statistics stay plain float32 /
  int64 tensors on every rank, identical because their updates all-reduce the counts over
  ``groups.data`` exactly once per optimizer step (``update_balancers``), as without FSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..moe import moe_layers
from .experts import ShardedSwiGLUExperts
from .groups import ParallelGroups


def fully_shard_model(model: nn.Module, groups: ParallelGroups, *, blocks: list[nn.Module] | None = None,
                      reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to a model that ``parallelize`` has prepared. In place; returns the model.

    blocks: the FSDP units besides the root (default: the modules of the model's first
    ``nn.ModuleList`` child, e.g. its transformer blocks). Build the optimizer afterwards: its
    parameters are then the shards (DTensors).
    """
    from torch.distributed.fsdp import fully_shard

    if groups.mesh is None or groups.data_mesh is None:
        raise ValueError("fully_shard_model needs the meshes of init_parallel's ParallelGroups")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model is already sharded")
    if blocks is None:
        lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
        blocks = list(lists[0]) if lists else []
    expert_data = groups.mesh["expert_data"]
    plain_experts: set[nn.Parameter] = set()  # expert shards FSDP has nothing to shard over
    for layer in moe_layers(model):
        if not isinstance(layer.experts, ShardedSwiGLUExperts):
            continue  # no expert parallelism: the experts are dense parameters of the block
        if expert_data.size() > 1:
            fully_shard(layer.experts, mesh=expert_data, reshard_after_forward=reshard_after_forward)
            layer.experts.set_gradient_divide_factor(float(groups.data_size))
            # NOTE: a divide factor other than the mesh size is a PREMUL_SUM reduce-scatter, which
            # gloo lacks; a plain SUM with the division done around it is the same on any backend
            layer.experts.set_force_sum_reduction_for_comms(True)
        else:
            plain_experts.update(layer.experts.parameters())
    for block in blocks:
        fully_shard(block, mesh=groups.data_mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=plain_experts & set(block.parameters()) or None)
    fully_shard(model, mesh=groups.data_mesh, reshard_after_forward=reshard_after_forward,
                ignored_params=plain_experts or None)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages some of the model's parameters (they are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t
