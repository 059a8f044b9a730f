"""Single-process state dicts of a parallelized model and its optimizer, gathered and loaded:
checkpoints hold the single-process layout, so they resume onto any layout."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .experts import _expert_param_ids, _sharded_modules
from .groups import ParallelGroups


def _sharded_keys(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name in _sharded_modules(model) for p in ("w_gate", "w_up", "w_down")}


def _gather_dim0(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _local_slice(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return t.chunk(groups.ep_size)[groups.ep_rank].clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) gathered over its mesh; a plain tensor as it is. Collective."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out like ``like``: this rank's FSDP2 shard of it when ``like`` is a DTensor
    (every rank holds the same ``t``, so each slices its own part: no communication)."""
    if not isinstance(like, DTensor):
        return t
    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def gather_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The single-process state dict of a parallelized model (FSDP2 shards gathered over their
    mesh, experts over the expert-parallel group). Collective: every rank calls it; every rank
    gets it."""
    sharded = _sharded_keys(model)
    return {k: _gather_dim0(_full(v), groups.expert) if k in sharded else _full(v)
            for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Load a single-process state dict into a parallelized model: each rank keeps its experts
    (and, under FSDP2, its shards)."""
    sharded, current = _sharded_keys(model), model.state_dict()
    model.load_state_dict({k: _shard_like(_local_slice(v, groups) if k in sharded else v, current[k])
                           if k in current else v for k, v in state.items()})


def _optimizer_expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    experts = _expert_param_ids(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if id(p) in experts}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, groups: ParallelGroups) -> dict:
    """``optimizer.state_dict()`` as a single process would have it: the sharded experts'
    per-parameter tensors (Adam's moments) gathered over the expert-parallel group. Collective."""
    state = optimizer.state_dict()
    indices = _optimizer_expert_indices(optimizer, model)
    for i in sorted(state["state"]):
        state["state"][i] = {k: _full(v) for k, v in state["state"][i].items()}
    for i in sorted(indices):
        per_param = state["state"].get(i, {})
        state["state"][i] = {k: _gather_dim0(v, groups.expert) if torch.is_tensor(v) and v.dim() > 0 else v
                             for k, v in per_param.items()}
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict,
                              groups: ParallelGroups) -> None:
    """Load a single-process optimizer state dict: each rank keeps its experts' slices."""
    indices = _optimizer_expert_indices(optimizer, model)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def local(i: int, v):
        if not (torch.is_tensor(v) and v.dim() > 0):
            return v  # Adam's step count
        return _shard_like(_local_slice(v, groups) if i in indices else v, params[i])

    optimizer.load_state_dict({**state, "state": {i: {k: local(i, v) for k, v in s.items()}
                                                  for i, s in state["state"].items()}})

