"""SwiGLU experts stored as stacked weights, with interchangeable compute paths.

Shape legend: E experts, A assignments (rows grouped by expert), D d_model, H expert hidden,
C padded rows per expert.

``loop`` is the reference implementation, kept forever: a plain Python loop over experts.
``bmm`` pads every expert's rows to the largest group and runs one batched matmul.
``grouped_mm`` uses ``torch._grouped_mm`` (one kernel over ragged groups) where the device and
dtype support it. Tests check the fast paths against ``loop``, gradients included.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: down(silu(x @ gate) * (x @ up)) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, d_model: int, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden_size, bias=False)
        self.w_up = nn.Linear(d_model, hidden_size, bias=False)
        self.w_down = nn.Linear(hidden_size, d_model, bias=False)
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    NOTE: ``torch._grouped_mm``'s CPU backward (torch 2.13) rejects expanded gradients with
    zero strides, such as the one ``y.sum().backward()`` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped(x, w, offs):
    if x.dtype != w.dtype:  # only under autocast (MoE checks otherwise): _grouped_mm has no autocast rule
        w = w.to(x.dtype)
    return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) for this device and dtype.

    The answer is cached for the process, so the probe must not depend on the caller's grad
    mode: a first call under ``torch.no_grad()`` or ``inference_mode`` (an evaluation before
    any training) would otherwise cache False and send every later training step down the
    slower ``bmm`` path.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(6, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 6], device=device_type, dtype=torch.int32)
            _grouped(x, w, offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class SwiGLUExperts(nn.Module):
    """E routed SwiGLU experts with weights w_gate, w_up (E, D, H) and w_down (E, H, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden_size: int, impl: str = "auto",
                 init_std: float = 0.02):
        super().__init__()
        self.impl = impl
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * init_std)
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * init_std)
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden_size, d_model) * init_std)

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor, impl: str | None = None
                ) -> torch.Tensor:
        """Apply expert e to its block of rows; rows are grouped by expert in order."""
        impl = impl or self.impl
        if impl == "auto":
            # _grouped_mm wants 16-byte aligned rows (D and H multiples of 8 in bf16).
            aligned = all(n * x_AD.element_size() % 16 == 0 for n in self.w_up.shape[1:])
            usable = aligned and grouped_mm_supported(x_AD.device.type, x_AD.dtype)
            impl = "grouped_mm" if usable else "bmm"
        if impl == "loop":
            return self._loop(x_AD, tokens_per_expert)
        if impl == "bmm":
            return self._bmm(x_AD, tokens_per_expert)
        if impl == "grouped_mm":
            return self._grouped_mm(x_AD, tokens_per_expert)
        raise ValueError(f"expert impl={impl!r} is not allowed; choose loop, bmm, grouped_mm or auto")

    def _loop(self, x_AD, tokens_per_expert):
        outputs = []
        for e, x_e in enumerate(torch.split(x_AD, tokens_per_expert.tolist())):
            outputs.append(_swiglu(x_e, self.w_gate[e], self.w_up[e], self.w_down[e]))
        return torch.cat(outputs) if outputs else x_AD.new_zeros(0, self.w_down.shape[-1])

    def _bmm(self, x_AD, tokens_per_expert):
        E, A = self.num_experts, x_AD.shape[0]
        if A == 0:
            return x_AD.new_zeros(0, self.w_down.shape[-1])
        counts = tokens_per_expert.to(x_AD.device)
        expert_ids = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts, output_size=A)
        rank = torch.arange(A, device=x_AD.device) - (torch.cumsum(counts, 0) - counts)[expert_ids]
        C = int(counts.max())
        x_ECD = x_AD.new_zeros(E, C, x_AD.shape[-1]).index_put((expert_ids, rank), x_AD)
        h_ECH = F.silu(torch.bmm(x_ECD, self.w_gate)) * torch.bmm(x_ECD, self.w_up)
        y_ECD = torch.bmm(h_ECH, self.w_down)
        return y_ECD[expert_ids, rank]

    def _grouped_mm(self, x_AD, tokens_per_expert):
        offs = torch.cumsum(tokens_per_expert, 0).to(device=x_AD.device, dtype=torch.int32)
        h_AH = F.silu(_grouped(x_AD, self.w_gate, offs)) * _grouped(x_AD, self.w_up, offs)
        return _grouped(h_AH, self.w_down, offs)


class ConstantExperts(nn.Module):
    """MoE++ constant experts (Jin et al. 2024, arXiv 2410.07348, eq. 6): expert j maps x to
    a1 * x + a2 * v_j with (a1, a2) = softmax(W_j x): a learned vector v_j (D,) mixed with the
    input by a learned 2-way gate W_j (2, D). No FFN matmul: O(D) work per assignment."""

    def __init__(self, num_experts: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_experts, d_model) * init_std)
        self.mix = nn.Parameter(torch.randn(num_experts, 2, d_model) * init_std)

    def forward(self, x_AD: torch.Tensor, expert_A: torch.Tensor) -> torch.Tensor:
        """x_AD: the assignments' inputs; expert_A: each one's constant expert (0-based)."""
        alpha_A2 = torch.softmax(torch.einsum("ad,akd->ak", x_AD, self.mix[expert_A].to(x_AD.dtype)), dim=-1)
        return alpha_A2[:, :1] * x_AD + alpha_A2[:, 1:] * self.vectors[expert_A].to(x_AD.dtype)
