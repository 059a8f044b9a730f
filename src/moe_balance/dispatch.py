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
    return weighted_combine(y_AD, decision.weights, decision.token_ids, num_tokens)


def weighted_combine(y_AD: torch.Tensor, weights_A: torch.Tensor, token_ids_A: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """(T, D): out[t] = sum over assignments a with token_ids_A[a] == t of weights_A[a] * y_AD[a],
    accumulated in float32 and cast to y's dtype (``unpermute`` without a ``RoutingDecision``)."""
    return _WeightedCombine.apply(y_AD, weights_A, token_ids_A, num_tokens)


def weighted_sum(y_AD: torch.Tensor, weights_A: torch.Tensor, token_ids_A: torch.Tensor,
                 num_tokens: int) -> torch.Tensor:
    """The forward arithmetic of ``weighted_combine``, outside autograd."""
    acc = torch.promote_types(y_AD.dtype, torch.float32)  # float32 (float64 stays float64)
    # type promotion widens y element by element (exact): no separate float32 copy of y
    # NOTE: (A, 1) * (A, D) in this order: torch 2.13's CPU kernel is about 3x slower for
    # (A, D) * (A, 1) (same values, the product commutes exactly)
    weighted_AD = weights_A.unsqueeze(-1).to(acc) * y_AD
    out_TD = torch.zeros(num_tokens, y_AD.shape[-1], dtype=acc, device=y_AD.device)
    return out_TD.index_add_(0, token_ids_A, weighted_AD).to(y_AD.dtype)


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum over assignments a of token t of w_a * y_a, in float32, cast to y's dtype.

    One function instead of (y.float() * w).index_add(...): autograd would save both y and the
    (A, D) product (index_add's backward keeps its source for its shape); this saves y, w and
    the token ids only, one (A, D) tensor fewer.
    """

    @staticmethod
    def forward(ctx, y_AD, weights_A, token_ids_A, num_tokens):
        ctx.save_for_backward(y_AD, weights_A, token_ids_A)
        return weighted_sum(y_AD, weights_A, token_ids_A, num_tokens)

    @staticmethod
    def backward(ctx, grad_TD):
        y_AD, weights_A, token_ids_A = ctx.saved_tensors
        acc = torch.promote_types(y_AD.dtype, torch.float32)
        # gather in the incoming dtype (bf16: half the bytes), widen inside the products (exact)
        grad_AD = grad_TD.index_select(0, token_ids_A)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (weights_A.unsqueeze(-1).to(acc) * grad_AD).to(y_AD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_AD.to(acc) * y_AD).sum(-1).to(weights_A.dtype)
        return grad_y, grad_w, None, None
