"""Experts sharded over the expert-parallel group, behind an all-to-all, and ``parallelize``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..balancing import Balancer
from ..dispatch import weighted_combine
from ..experts import SwiGLUExperts
from ..moe import moe_layers
from .groups import ParallelGroups


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
        # all_to_all_single takes its split sizes as Python lists (as torchtitan's dispatch does):
        # host sync, the one of the expert-parallel forward (the backward reuses the sizes)
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

