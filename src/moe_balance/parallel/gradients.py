"""Gradients of the global batch: dense ones averaged over the data group, sharded experts'
summed over the expert-data group; the gradient norm over the whole model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .experts import _expert_param_ids
from .fsdp import is_sharded, local
from .groups import ParallelGroups


def _reduce(tensors: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """In place: sum over ``group`` (one flat all-reduce), times ``scale``."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Make every gradient the global batch's (module docstring): dense ones averaged over the
    data group, sharded experts' summed over the expert-data group and divided by its size x
    ep. A parameter without a gradient on this rank (unused this step) gets zeros, so every
    rank reduces the same list. Parameters that FSDP2 shards (DTensors, ``fully_shard_model``)
    were reduced by FSDP2's reduce-scatter in the backward and are left alone."""
    experts = _expert_param_ids(model)
    dense, sharded = [], []
    for p in model.parameters():
        if not p.requires_grad or isinstance(p, DTensor):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (sharded if id(p) in experts else dense).append(p.grad)
    scale = 1.0 / groups.data_size
    _reduce(dense, groups.data, scale)
    _reduce(sharded, groups.expert_data, scale)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, sharded experts included (their
    squared norm is summed over the expert-parallel group). Call after ``sync_gradients``.

    Under FSDP2 every gradient element lives on exactly one rank (dense shards over the data
    group, expert shards over expert-data x expert, unsharded experts on their expert rank),
    so the squared norm is the sum of every rank's local squares over the data group."""
    experts = _expert_param_ids(model)
    with_grad = [p for p in model.parameters() if p.grad is not None]
    grads = [local(p.grad) for p in with_grad]

    def square_norm(grads):  # float64: the sum of squares of many float32 gradients
        return sum((g.detach().double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64))

    if is_sharded(model):
        total_sq = square_norm(grads)
        dist.all_reduce(total_sq, group=groups.data)
    else:
        dense_sq = square_norm([g for p, g in zip(with_grad, grads) if id(p) not in experts])
        expert_sq = square_norm([g for p, g in zip(with_grad, grads) if id(p) in experts])
        if groups.ep_size > 1:
            dist.all_reduce(expert_sq, group=groups.expert)
        total_sq = dense_sq + expert_sq
    total = total_sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for g in grads:  # a DTensor's local shard is its storage: scaling it scales the gradient
        g.mul_(coef.to(g.device))
    return total

