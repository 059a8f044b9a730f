"""Expert-load metrics as pure functions over token counts, plus an evaluation accumulator.

Counts are (E,) for one layer or (L, E) for L layers; every function reduces the last dim.
MaxVio (Wang et al. 2024, arXiv 2408.15664, eq. 4): (max_i load_i - mean load) / mean load.
MaxVio_batch counts one training step; MaxVio_global counts a whole evaluation set.
"""

from __future__ import annotations

import torch


def _float(counts: torch.Tensor) -> torch.Tensor:
    return counts.detach().to(torch.float64)


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """(max - mean) / mean load per layer; 0 when nothing was routed."""
    load = _float(counts)
    mean = load.mean(-1)
    return torch.where(mean > 0, (load.amax(-1) - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


def coefficient_of_variation(counts: torch.Tensor) -> torch.Tensor:
    """Population std / mean of the load per layer; 0 when balanced or empty."""
    load = _float(counts)
    mean = load.mean(-1)
    std = load.std(-1, correction=0)
    return torch.where(mean > 0, std / mean.clamp_min(1e-12), torch.zeros_like(mean))


def dead_experts(counts: torch.Tensor) -> torch.Tensor:
    """Number of experts that received no token, per layer (int64)."""
    return (counts == 0).sum(-1)


def load_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy of the load distribution divided by log(E): 1 = uniform, 0 = one expert."""
    load = _float(counts)
    p = load / load.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return h / torch.log(torch.tensor(float(counts.shape[-1]), dtype=torch.float64)).clamp_min(1e-12)


def router_entropy(scores_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router's normalised scores (low = confident)."""
    p = scores_TE.detach().double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    h_T = -(p * p.clamp_min(1e-300).log()).sum(-1)
    if token_mask_T is not None:
        h_T = h_T[token_mask_T]
    return h_T.mean() if h_T.numel() else h_T.sum()


def drop_fraction(routed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Fraction of routed assignments dropped by capacity, per layer."""
    r = _float(routed).sum(-1)
    return torch.where(r > 0, 1 - _float(kept).sum(-1) / r.clamp_min(1e-12), torch.zeros_like(r))


def load_summary(counts: torch.Tensor) -> dict[str, float]:
    """Min/max/mean load, MaxVio, CV, dead experts and load entropy of one layer's counts (E,)."""
    load = _float(counts)
    return {
        "min": float(load.min()), "max": float(load.max()), "mean": float(load.mean()),
        "maxvio": float(max_vio(counts)), "cv": float(coefficient_of_variation(counts)),
        "dead": int(dead_experts(counts)), "entropy": float(load_entropy(counts)),
    }


class LoadAccumulator:
    """Sums per-layer routed counts over many batches, e.g. a whole validation set.

    ``add(layer_counts)`` takes a list of (E,) counts, one per MoE layer (or an (L, E) tensor).
    """

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def add(self, layer_counts) -> None:
        counts = torch.stack(list(layer_counts)) if not isinstance(layer_counts, torch.Tensor) else layer_counts
        if counts.shape != self.counts.shape:
            raise ValueError(f"LoadAccumulator expects counts of shape {tuple(self.counts.shape)}, "
                             f"got {tuple(counts.shape)}")
        self.counts += counts.detach().to("cpu", torch.int64)

    def maxvio_per_layer(self) -> list[float]:
        return max_vio(self.counts).tolist()

    def maxvio(self) -> float:
        """MaxVio averaged over layers (the paper's MaxVio_global when fed a validation set)."""
        return float(max_vio(self.counts).mean())
