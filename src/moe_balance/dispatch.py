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


# Row-wise products on (A, D) tensors are done in blocks of this many elements (32 MiB in
# float32 was the measured problem): torch 2.13's CPU kernel for bf16 x float32 operands is
# not vectorised (about 20x slower than widening first), and every float32 temporary above
# 32 MB is a fresh mmap whose page faults cost more than the product. Blocks of 2^21
# elements (8 MiB in float32) reuse the allocator's memory.
_BLOCK_ELEMENTS = 1 << 21


def _row_blocks(rows: int, width: int):
    """Row slices covering ``rows`` in blocks of about _BLOCK_ELEMENTS elements (one block
    while compiling: inductor fuses the products and keeps no temporaries)."""
    step = max(1, rows if torch.compiler.is_compiling() else _BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [slice(0, 0)]


def scale_rows(x_AD: torch.Tensor, weights_A: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """w_a * x_a for every row, computed in float32 (float64 stays float64) and rounded once to
    x's dtype: (w.float() * x).to(x.dtype), bit for bit. inplace: x is the caller's own
    temporary and is overwritten."""
    acc = torch.promote_types(x_AD.dtype, torch.float32)
    w_A1 = weights_A.unsqueeze(-1).to(acc)
    if x_AD.dtype == acc:
        return x_AD.mul_(w_A1) if inplace else x_AD * w_A1
    out_AD = x_AD if inplace else torch.empty_like(x_AD)
    for rows in _row_blocks(x_AD.shape[0], x_AD.shape[-1]):
        out_AD[rows] = x_AD[rows].to(acc).mul_(w_A1[rows])
    return out_AD


def row_dots(a_AD: torch.Tensor, b_AD: torch.Tensor) -> torch.Tensor:
    """(A,) <a_a, b_a> in float32 (float64 stays float64): the gate gradients."""
    acc = torch.promote_types(torch.promote_types(a_AD.dtype, b_AD.dtype), torch.float32)
    if a_AD.dtype == acc and b_AD.dtype == acc:
        return (a_AD * b_AD).sum(-1)
    return torch.cat([(a_AD[rows].to(acc) * b_AD[rows].to(acc)).sum(-1)
                      for rows in _row_blocks(a_AD.shape[0], a_AD.shape[-1])])


def weighted_sum(y_AD: torch.Tensor, weights_A: torch.Tensor, token_ids_A: torch.Tensor,
                 num_tokens: int, *, scratch: bool = False) -> torch.Tensor:
    """The forward arithmetic of ``weighted_combine``, outside autograd: the products in
    float32, accumulated into a float32 (T, D) in assignment order, cast to y's dtype.

    scratch: y is the caller's temporary; with float32 (or float64) rows it is weighted in
    place, no new (A, D) buffer.
    """
    acc = torch.promote_types(y_AD.dtype, torch.float32)  # float32 (float64 stays float64)
    out_TD = torch.zeros(num_tokens, y_AD.shape[-1], dtype=acc, device=y_AD.device)
    if y_AD.dtype == acc:
        return out_TD.index_add_(0, token_ids_A, scale_rows(y_AD, weights_A, inplace=scratch))
    # bf16/fp16 rows: widen and weight a block at a time (index_add_ adds rows in order, so
    # the blocks give the same sums as one call)
    w_A = weights_A.to(acc)
    for rows in _row_blocks(y_AD.shape[0], y_AD.shape[-1]):
        out_TD.index_add_(0, token_ids_A[rows], y_AD[rows].to(acc).mul_(w_A[rows].unsqueeze(-1)))
    return out_TD.to(y_AD.dtype)


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
        # gather in the incoming dtype (bf16: half the bytes), widen inside the products (exact)
        grad_AD = grad_TD.index_select(0, token_ids_A).to(y_AD.dtype)
        grad_y = grad_w = None
        if ctx.needs_input_grad[1]:  # before grad_AD is weighted in place
            grad_w = row_dots(grad_AD, y_AD).to(weights_A.dtype)
        if ctx.needs_input_grad[0]:
            grad_y = scale_rows(grad_AD, weights_A, inplace=True)  # the gathered rows are ours
        return grad_y, grad_w, None, None
