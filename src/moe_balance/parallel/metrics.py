"""Metrics of the distributed case: ranks per token, assignments that cross ranks, device loads."""

from __future__ import annotations

import torch


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


def device_loads(loads_LE: torch.Tensor, ep_size: int) -> dict:
    """Per-device load from the global batch's (L, E) per-expert counts: the assignments each
    expert-parallel rank's experts process, per layer, and their max / mean (1 = even)."""
    L, E = loads_LE.shape
    per_rank_LR = loads_LE.double().view(L, ep_size, E // ep_size).sum(-1)
    ratio_L = per_rank_LR.max(-1).values / per_rank_LR.mean(-1).clamp_min(1e-12)
    return {"device_loads": per_rank_LR.long().tolist(), "device_load_max_over_mean": float(ratio_L.mean())}


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """What this rank holds: bytes of its parameters (FSDP2 shards counted as their local part),
    of which dense (not routed experts), and of its optimizer state."""
    from .experts import _expert_param_ids
    from .fsdp import local

    def nbytes(t: torch.Tensor) -> int:
        part = local(t)
        return part.numel() * part.element_size()

    experts = _expert_param_ids(model) | {id(p) for n, p in model.named_parameters() if ".experts.w_" in n}
    params = list(model.parameters())
    out = {"param_bytes": sum(nbytes(p) for p in params),
           "dense_param_bytes": sum(nbytes(p) for p in params if id(p) not in experts)}
    if optimizer is not None:
        out["optimizer_bytes"] = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.dim() > 0)
    return out
