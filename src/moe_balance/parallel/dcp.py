"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes only what it
holds, and any layout (another process count, another expert-parallel size, one process, with
or without FSDP2) loads it.

The state comes from DCP's ``get_state_dict`` and goes back through ``set_state_dict``. One
change makes it layout-free: the routed experts' weights (and their optimizer moments) are
stored one entry per expert, ``<module>.w_gate#<e>``. An expert-parallel rank's experts are a
plain (E/ep, ...) tensor, or an FSDP2 shard of one, not a tensor of the global shape that DCP
could reshard; but every rank's rows are whole experts (FSDP2 shards along dim 0, the expert
dimension), so each rank can name the experts it owns, write those, and read the ones it needs.
Everything else (dense FSDP2 shards, replicated tensors, the balancers' buffers, scalars) is
left to DCP: its planner writes a replicated entry once and reshards DTensors on load.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..experts import SwiGLUExperts
from .experts import ShardedSwiGLUExperts
from .groups import ParallelGroups

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def _expert_keys(model: nn.Module) -> dict[str, nn.Module]:
    """state-dict key -> its experts module, for every routed expert weight."""
    return {f"{name}.{w}": m for name, m in model.named_modules() if isinstance(m, SwiGLUExperts)
            for w in EXPERT_WEIGHTS}


def _first_expert(t: torch.Tensor, module: nn.Module, groups: ParallelGroups | None) -> int:
    """The global index of the first expert among this rank's rows of ``t``."""
    first = 0
    if isinstance(module, ShardedSwiGLUExperts):
        first = groups.ep_rank * module.num_experts
    if isinstance(t, DTensor):
        rows = t.shape[0]
        for mesh_dim, placement in enumerate(t.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise ValueError(f"expert weights sharded along dim {placement.dim}; only 0 is supported")
                n, c = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
                size = math.ceil(rows / n)  # torch.chunk's split, as Shard(0) uses it
                first += min(c * size, rows)
                rows = max(0, min(size, rows - c * size))
    return first


def _split(value: torch.Tensor, key: str, module: nn.Module, groups) -> dict[str, torch.Tensor]:
    rows = value.to_local() if isinstance(value, DTensor) else value
    first = _first_expert(value, module, groups)
    return {f"{key}#{first + i}": rows[i].clone() for i in range(rows.shape[0])}


def _join(parts: dict[str, torch.Tensor], like: torch.Tensor, key: str, module: nn.Module, groups) -> torch.Tensor:
    rows = like.to_local() if isinstance(like, DTensor) else like
    first = _first_expert(like, module, groups)
    local = torch.stack([parts[f"{key}#{first + i}"] for i in range(rows.shape[0])]) if rows.shape[0] \
        else torch.empty_like(rows)
    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return local


def _layout_free(model: nn.Module, optimizer, groups) -> dict:
    """DCP's model and optimizer state with the expert weights split per expert."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    experts = _expert_keys(model)
    out_model = {}
    for k, v in model_sd.items():
        out_model.update(_split(v, k, experts[k], groups) if k in experts else {k: v})
    out_state = {}
    for k, per_param in optim_sd["state"].items():
        out_state[k] = {}
        for name, v in per_param.items():
            split = k in experts and torch.is_tensor(v) and v.dim() > 0
            out_state[k].update(_split(v, name, experts[k], groups) if split else {name: v})
    return {"model": out_model, "optimizer": {"state": out_state, "param_groups": optim_sd["param_groups"]}}


@contextlib.contextmanager
def _one_process_is_fine():
    """Silence DCP's warning that it runs without torch.distributed: one process is a layout too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 groups: ParallelGroups | None = None, extra: dict | None = None) -> None:
    """Write the model, the optimizer and ``extra`` (any tensors or picklable values: step,
    scheduler, RNG) as a DCP checkpoint directory. Collective under ``torch.distributed``."""
    import torch.distributed.checkpoint as dcp

    state = _layout_free(model, optimizer, groups)
    state["extra"] = extra or {}
    with _one_process_is_fine():
        dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 groups: ParallelGroups | None = None, extra: dict | None = None) -> dict:
    """Load a ``save_sharded`` checkpoint written by any layout into this one; ``extra`` names
    the extra entries to read with a value of their type (tensors are filled in place).
    Returns the extra entries. Collective under ``torch.distributed``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = _layout_free(model, optimizer, groups)
    state["extra"] = dict(extra or {})
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    experts = _expert_keys(model)
    for k in experts:
        model_sd[k] = _join(state["model"], model_sd[k], k, experts[k], groups)
    for k, v in state["model"].items():
        if "#" not in k:
            model_sd[k] = v
    for k, per_param in optim_sd["state"].items():
        loaded = state["optimizer"]["state"][k]
        for name, v in per_param.items():
            if k in experts and torch.is_tensor(v) and v.dim() > 0:
                per_param[name] = _join(loaded, v, name, experts[k], groups)
            else:
                per_param[name] = loaded[name]
    optim_sd["param_groups"] = state["optimizer"]["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return state["extra"]
