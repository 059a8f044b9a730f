"""Dispatch and combine as pure functions over a ``RoutingDecision`` (no learnable state).

permute: gather each assignment's token row, in expert order, so every expert's inputs are
one contiguous block. unpermute: scale each expert output by its gate in float32 and
scatter-add it back to its token row. Dropped assignments are simply absent, so they
contribute nothing: the block's residual connection carries those tokens.
"""

from __future__ import annotations

import torch

from .routing import RoutingDecision


def permute(x_TD: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
    """(T, D) tokens -> (A, D) assignment inputs, grouped by expert."""
    return x_TD.index_select(0, decision.token_ids)


def unpermute(y_AD: torch.Tensor, decision: RoutingDecision, num_tokens: int) -> torch.Tensor:
    """(A, D) expert outputs -> (T, D): sum over each token's experts of weight * output.

    The weighted sum is accumulated in float32 (bf16 accumulation over top-K outputs loses
    precision) and cast back to the input dtype.
    """
    weighted_AD = y_AD.float() * decision.weights.unsqueeze(-1)
    out_TD = torch.zeros(num_tokens, y_AD.shape[-1], dtype=torch.float32, device=y_AD.device)
    return out_TD.index_add(0, decision.token_ids, weighted_AD).to(y_AD.dtype)
