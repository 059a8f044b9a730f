"""Expert and data parallelism on torch.distributed (gloo on CPU, NCCL on GPU).

Shape legend: A assignments (rows grouped by expert), D d_model, E experts, L local experts
(E / ep), R ranks of the expert-parallel group, T tokens.

The layout (Megatron-Core's and torchtitan's): W ranks each see different tokens (the *data*
group, all W ranks); they form W/ep expert-parallel groups of ep consecutive ranks, and each
rank of such a group holds L = E/ep consecutive experts (rank r holds experts r*L ... r*L+L-1).
Ranks that hold the same experts form an *expert-data* group (W/ep ranks). Nothing here takes
the default group implicitly: the groups are built once by ``init_parallel`` and handed to
``parallelize``, which stores them in the layers that use them.

    forward, per MoE layer:  route locally -> sort assignments by expert -> all-to-all the
    rows to their experts' ranks (split sizes exchanged first) -> local experts -> all-to-all
    back -> combine with the gates locally.

Gradients: every rank's loss is the mean over its own tokens, so the global loss is the mean
over the data group. A dense parameter's gradient is averaged over the data group; an expert's
gradient already sums every rank of its expert-parallel group (the all-to-all's backward brings
it home), so it is summed over the expert-data group and divided by the data group's size.
``sync_gradients`` does both; ``clip_grad_norm`` clips by the norm of all experts' gradients.

The balancers count over the data group (``LossFree`` counts and ``global_batch`` aux-loss
statistics are all-reduced over ``groups.data``), so every rank's bias stays identical and
equals a single process's bias for the same global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .balancing import Balancer
from .dispatch import weighted_combine
from .experts import SwiGLUExperts
from .moe import moe_layers


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one parallel layout (see the module docstring).

    data: every rank (tokens differ on each); expert: this rank's expert-parallel group;
    expert_data: the ranks that hold the same experts as this one.
    """

    data: dist.ProcessGroup
    expert: dist.ProcessGroup
    expert_data: dist.ProcessGroup

    @property
    def data_size(self) -> int:
        return dist.get_world_size(self.data)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.expert)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.expert)

    @property
    def data_rank(self) -> int:
        return dist.get_rank(self.data)


def init_parallel(expert_parallel: int = 1, timeout: datetime.timedelta | None = None) -> ParallelGroups:
    """Build the groups for ``expert_parallel`` ranks per expert-parallel group over the
    initialised world (``torch.distributed.init_process_group`` first). Collective: every rank
    calls it, in the same order.

    timeout: how long a collective of the new groups waits for a lost rank before failing;
    pass the one given to ``init_process_group`` (new groups do not inherit it: None is
    torch's default, 30 minutes on gloo).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_parallel needs torch.distributed initialised: call "
                           "torch.distributed.init_process_group first (torchrun sets the environment)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not (isinstance(expert_parallel, int) and expert_parallel >= 1 and world % expert_parallel == 0):
        raise ValueError(f"expert_parallel={expert_parallel!r} must be a positive divisor of the world "
                         f"size {world}")
    expert = expert_data = None
    for first in range(0, world, expert_parallel):  # new_group is collective: every rank makes every group
        group = dist.new_group(list(range(first, first + expert_parallel)), timeout=timeout)
        if first <= rank < first + expert_parallel:
            expert = group
    for offset in range(expert_parallel):
        group = dist.new_group(list(range(offset, world, expert_parallel)), timeout=timeout)
        if rank % expert_parallel == offset:
            expert_data = group
    return ParallelGroups(data=dist.group.WORLD, expert=expert, expert_data=expert_data)


def launch(expert_parallel: int = 1, timeout_seconds: float = 600.0) -> ParallelGroups | None:
    """For the command line: join the processes torchrun started (its environment variables:
    WORLD_SIZE, RANK, MASTER_ADDR, ...) over gloo and build the groups; None for a single
    process without ``expert_parallel``. A collective that waits longer than
    ``timeout_seconds`` for a lost rank fails with an error instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (isinstance(expert_parallel, int) and expert_parallel >= 1):
        raise ValueError(f"--expert-parallel {expert_parallel!r} must be an integer >= 1")
    if not (timeout_seconds > 0):
        raise ValueError(f"--dist-timeout {timeout_seconds!r} must be a number of seconds > 0")
    if world == 1 and expert_parallel == 1:
        return None
    if world % expert_parallel:
        hint = (f"launch {expert_parallel} processes: torchrun --nproc_per_node={expert_parallel} -m moe_balance ..."
                if world == 1 else f"choose a divisor of {world}")
        raise ValueError(f"--expert-parallel {expert_parallel} needs a multiple of {expert_parallel} processes; "
                         f"there are {world}: {hint}")
    timeout = datetime.timedelta(seconds=timeout_seconds)
    # NOTE: the harness trains on the CPU, so gloo; a GPU trainer would pass "nccl" (the layer
    # itself works with either: it only calls all_to_all_single and all_reduce)
    dist.init_process_group("gloo", timeout=timeout)
    return init_parallel(expert_parallel, timeout)


def expert_ranks(num_experts: int, ep_size: int) -> torch.Tensor:
    """(E,) int64: the expert-parallel rank holding each expert (consecutive blocks of E/ep)."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel size {ep_size}")
    return torch.arange(num_experts) // (num_experts // ep_size)


class ShardedSwiGLUExperts(SwiGLUExperts):
    """This rank's L = E/ep experts of a ``SwiGLUExperts``, with the all-to-all around them.

    Called like the unsharded module: rows grouped by *global* expert and the (E,) counts;
    returns each row's expert output in the same order. Parameters keep the unsharded names
    (w_gate, w_up, w_down) with a first dimension of L, so a state dict differs from the
    single-process one only in that dimension (``gather_state_dict`` puts it back).

    ``last_sent_rows``: rows this rank sent to other ranks in its last forward's dispatch
    (the combine returns them); ``last_sent_bytes``: the bytes this rank sent in that forward's
    dispatch and combine (the backward's two all-to-alls send as many again).
    """

    def __init__(self, full: SwiGLUExperts, group: dist.ProcessGroup):
        nn.Module.__init__(self)
        self.impl, self.group = full.impl, group
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_global_experts = full.num_experts
        local = expert_ranks(full.num_experts, ep) == rank
        for name in ("w_gate", "w_up", "w_down"):
            setattr(self, name, nn.Parameter(getattr(full, name).detach()[local].clone()))
        self.last_sent_rows = self.last_sent_bytes = 0

    def weighted_sum(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor, weights_A: torch.Tensor,
                     token_ids_A: torch.Tensor, num_tokens: int, impl: str | None = None) -> torch.Tensor:
        # the outputs come back through the all-to-all: no fused down projection and combine
        return weighted_combine(self(x_AD, tokens_per_expert, impl), weights_A, token_ids_A, num_tokens)

    def forward(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep, rank, L = dist.get_world_size(self.group), dist.get_rank(self.group), self.num_experts
        counts_E = tokens_per_expert.to(torch.int64)
        if counts_E.numel() != self.num_global_experts:
            raise ValueError(f"expected counts for {self.num_global_experts} experts; got {counts_E.numel()}")
        # 1. exchange the split sizes: rank r receives every rank's counts for its L experts
        received_RL = torch.empty_like(counts_E)
        dist.all_to_all_single(received_RL, counts_E.contiguous(), group=self.group)
        received_RL = received_RL.view(ep, L)
        send_R = counts_E.view(ep, L).sum(1).tolist()
        recv_R = received_RL.sum(1).tolist()
        self.last_sent_rows = sum(send_R) - send_R[rank]
        combine_rows = sum(recv_R) - recv_R[rank]  # the rows other ranks sent here go back
        self.last_sent_bytes = (self.last_sent_rows + combine_rows) * x_AD.shape[-1] * x_AD.element_size()
        # 2. dispatch: the rows arrive grouped by (source rank, local expert)
        x_recv = all_to_all_single_autograd(x_AD.contiguous(), recv_R, send_R, self.group)
        # 3. regroup by local expert (stable: by source rank within an expert), run, restore
        expert_of_row = torch.repeat_interleave(torch.arange(L, device=x_AD.device).repeat(ep),
                                                received_RL.flatten().to(x_AD.device))
        order = torch.argsort(expert_of_row, stable=True)
        y_local = super().forward(x_recv.index_select(0, order), received_RL.sum(0), impl)
        y_recv = y_local.index_select(0, torch.argsort(order))
        # 4. combine: each row goes back to the rank that sent it
        return all_to_all_single_autograd(y_recv.contiguous(), send_R, recv_R, self.group)


def parallelize(model: nn.Module, groups: ParallelGroups, *, locality_bonus: float = 0.0) -> nn.Module:
    """Shard every MoE layer's experts over ``groups.expert`` (when it has more than one rank)
    and make the balancers count over ``groups.data``. In place; returns the model.

    Build the full model with the same seed on every rank first: each rank keeps its slice
    of the same initial experts, so the run starts from the single-process weights.
    locality_bonus: added to the selection scores (selection only, like the Loss-Free bias)
    of the experts on a token's own rank, so near-equal scores prefer the local expert
    (LocMoE); 0 changes nothing.
    """
    if not (isinstance(locality_bonus, (int, float)) and locality_bonus >= 0):
        raise ValueError(f"locality_bonus={locality_bonus!r} must be a number >= 0")
    for layer in moe_layers(model):
        if groups.ep_size > 1:
            if type(layer.experts) is not SwiGLUExperts:
                raise ValueError(f"expert parallelism shards equal-width SwiGLU experts; this layer has "
                                 f"{type(layer.experts).__name__} (HMoE's experts of different widths are "
                                 "not sharded yet: use --expert-parallel 1)")
            if isinstance(layer.experts, ShardedSwiGLUExperts):
                raise ValueError("the model is already parallelized")
            layer.experts = ShardedSwiGLUExperts(layer.experts, groups.expert)
        if locality_bonus:
            if any(b.multiplicative for b in layer.balancers):
                raise ValueError("locality_bonus adds to the selection scores; the multiplicative "
                                 "Loss-Free form multiplies them: use one or the other")
            ranks_E = expert_ranks(layer.config.num_experts, groups.ep_size)
            bonus = torch.zeros(layer.config.num_routed_experts)
            # MoE++ zero-computation experts are computed where the token is: always local
            bonus[:layer.config.num_experts] = locality_bonus * (ranks_E == groups.ep_rank).float()
            bonus[layer.config.num_experts:] = locality_bonus
            layer.locality_bias = bonus
        for module in layer.modules():
            if isinstance(module, Balancer):
                module.process_group = groups.data
    return model


def _sharded_modules(model: nn.Module) -> dict[str, ShardedSwiGLUExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedSwiGLUExperts)}


def _expert_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in _sharded_modules(model).values() for p in m.parameters()}


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
    rank reduces the same list."""
    experts = _expert_param_ids(model)
    dense, sharded = [], []
    for p in model.parameters():
        if not p.requires_grad:
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
    squared norm is summed over the expert-parallel group). Call after ``sync_gradients``."""
    experts = _expert_param_ids(model)
    with_grad = [p for p in model.parameters() if p.grad is not None]
    dense = [p.grad for p in with_grad if id(p) not in experts]
    sharded = [p.grad for p in with_grad if id(p) in experts]

    def square_norm(grads):  # float64: the sum of squares of many float32 gradients
        return sum((g.detach().double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64))

    dense_sq, expert_sq = square_norm(dense), square_norm(sharded)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.expert)
    total = (dense_sq + expert_sq).sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for p in with_grad:
        p.grad.mul_(coef.to(p.grad.device))
    return total


def _sharded_keys(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name in _sharded_modules(model) for p in ("w_gate", "w_up", "w_down")}


def _gather_dim0(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _local_slice(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return t.chunk(groups.ep_size)[groups.ep_rank].clone()


def gather_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The single-process state dict of a parallelized model (experts gathered over the
    expert-parallel group). Collective: every rank calls it; every rank gets it."""
    sharded = _sharded_keys(model)
    return {k: _gather_dim0(v, groups.expert) if k in sharded else v
            for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Load a single-process state dict into a parallelized model: each rank keeps its experts."""
    sharded = _sharded_keys(model)
    model.load_state_dict({k: _local_slice(v, groups) if k in sharded else v for k, v in state.items()})


def _optimizer_expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    experts = _expert_param_ids(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if id(p) in experts}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, groups: ParallelGroups) -> dict:
    """``optimizer.state_dict()`` as a single process would have it: the sharded experts'
    per-parameter tensors (Adam's moments) gathered over the expert-parallel group. Collective."""
    state = optimizer.state_dict()
    indices = _optimizer_expert_indices(optimizer, model)
    for i in sorted(indices):
        per_param = state["state"].get(i, {})
        state["state"][i] = {k: _gather_dim0(v, groups.expert) if torch.is_tensor(v) and v.dim() > 0 else v
                             for k, v in per_param.items()}
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict,
                              groups: ParallelGroups) -> None:
    """Load a single-process optimizer state dict: each rank keeps its experts' slices."""
    indices = _optimizer_expert_indices(optimizer, model)
    local = {**state, "state": {i: ({k: _local_slice(v, groups) if torch.is_tensor(v) and v.dim() > 0 else v
                                     for k, v in s.items()} if i in indices else s)
                                for i, s in state["state"].items()}}
    optimizer.load_state_dict(local)


def _slot_ranks(selected_TK: torch.Tensor, ranks_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) rank of each slot's expert and (T, K) bool: the slot holds an FFN expert (slots of
    -1 and zero-computation experts, numbered from ``len(ranks_E)``, need no rank)."""
    E = ranks_E.numel()
    ffn_TK = (selected_TK >= 0) & (selected_TK < E)
    return ranks_E.to(selected_TK.device)[selected_TK.clamp(0, E - 1)], ffn_TK


def ranks_per_token(selected_TK: torch.Tensor, ranks_E: torch.Tensor) -> torch.Tensor:
    """(T,) int64: how many different ranks hold each token's selected FFN experts."""
    T, E = selected_TK.shape[0], ranks_E.numel()
    R = int(ranks_E.max()) + 1 if E else 1
    rank_TK, ffn_TK = _slot_ranks(selected_TK, ranks_E)
    hit_TR = torch.zeros(T, R, dtype=torch.int64, device=selected_TK.device)
    hit_TR.scatter_add_(1, rank_TK.masked_fill(~ffn_TK, 0), ffn_TK.long())
    return (hit_TR > 0).sum(1)


def crossing_assignments(selected_TK: torch.Tensor, ranks_E: torch.Tensor, own_rank: int) -> tuple[int, int]:
    """(FFN assignments whose expert is on another rank than ``own_rank``, FFN assignments)."""
    rank_TK, ffn_TK = _slot_ranks(selected_TK, ranks_E)
    return int(((rank_TK != own_rank) & ffn_TK).sum()), int(ffn_TK.sum())


def shutdown() -> None:
    """Collect garbage, then destroy the process group. Drop your references to the model and
    its outputs first: on gloo (torch 2.13) a process can abort at exit when an all-to-all's
    tensors outlive the group."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_first(obj, groups: ParallelGroups):
    """Rank 0's ``obj`` (any picklable object) on every rank of the data group. Collective."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.data, 0), group=groups.data)
    return box[0]


def sum_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """A copy of ``t`` summed over the data group. Collective."""
    total = t.clone()
    dist.all_reduce(total, group=groups.data)
    return total


def device_loads(loads_LE: torch.Tensor, ep_size: int) -> dict:
    """Per-device load from the global batch's (L, E) per-expert counts: the assignments each
    expert-parallel rank's experts process, per layer, and their max / mean (1 = even)."""
    L, E = loads_LE.shape
    per_rank_LR = loads_LE.double().view(L, ep_size, E // ep_size).sum(-1)
    ratio_L = per_rank_LR.max(-1).values / per_rank_LR.mean(-1).clamp_min(1e-12)
    return {"device_loads": per_rank_LR.long().tolist(), "device_load_max_over_mean": float(ratio_L.mean())}
