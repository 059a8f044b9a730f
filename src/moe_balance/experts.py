"""SwiGLU experts stored as stacked weights, with interchangeable compute paths.

Shape legend: E experts, A assignments (rows grouped by expert), D d_model, H expert hidden,
C padded rows per expert.

``loop`` is the reference implementation, kept forever: a plain Python loop over experts
(each at its own width for heterogeneous experts).
``bmm`` pads every expert's rows to the largest group and runs one batched matmul.
``grouped_mm`` uses ``torch._grouped_mm`` (one kernel over ragged groups) where the device and
dtype support it. Tests check the fast paths against ``loop``, gradients included.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from .config import EXPERT_IMPLS
from .dispatch import row_dots, scale_rows, weighted_combine, weighted_sum


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


class _GroupedDownCombine(torch.autograd.Function):
    """out = weighted_combine(_grouped_mm(h, w_down), weights, token_ids): the down projection
    and the weighted sum in one function, with the same forward arithmetic.

    Apart, the combine keeps the (A, D) expert outputs y for the gate gradient
    (dL/dw_a = <g_a, y_a>, g_a the output gradient of a's token). Here that gradient is read off
    the hidden the down projection keeps anyway: <g_a, h_a W> = <g_a W^T, h_a>, and g_a W^T is
    the product the down projection's backward needs: one (A, D) tensor fewer is kept, and
    the backward runs the same two grouped matmuls.
    """

    @staticmethod
    def forward(ctx, h_AH, w_down_EHD, offs_E, weights_A, token_ids_A, num_tokens):
        ctx.save_for_backward(h_AH, w_down_EHD, offs_E, weights_A, token_ids_A)
        y_AD = torch._grouped_mm(h_AH, w_down_EHD, offs=offs_E)
        return weighted_sum(y_AD, weights_A, token_ids_A, num_tokens, scratch=True)  # y is ours

    @staticmethod
    def backward(ctx, grad_TD):
        h_AH, w_down_EHD, offs_E, weights_A, token_ids_A = ctx.saved_tensors
        g_AD = grad_TD.index_select(0, token_ids_A).to(h_AH.dtype)  # contiguous: _grouped_mm's CPU backward needs it
        gu_AH = torch._grouped_mm(g_AD, w_down_EHD.transpose(-2, -1), offs=offs_E)  # g W^T, unweighted
        grad_h = grad_w_down = grad_weights = None
        if ctx.needs_input_grad[3]:  # before gu is weighted in place
            grad_weights = row_dots(gu_AH, h_AH).to(weights_A.dtype)
        # g and gu are this backward's own temporaries: weighted in place (dispatch.scale_rows)
        if ctx.needs_input_grad[0]:
            grad_h = scale_rows(gu_AH, weights_A, inplace=True)
        if ctx.needs_input_grad[1]:
            grad_w_down = torch._grouped_mm(h_AH.t(), scale_rows(g_AD, weights_A, inplace=True), offs=offs_E)
        return grad_h, grad_w_down, None, grad_weights, None, None


_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) for this device and dtype.

    The answer is cached for the process, so the probe must not depend on the caller's grad
    mode: a first call under ``torch.no_grad()`` or ``inference_mode`` (an evaluation before
    any training) would otherwise cache False and send every later training step down the
    slower ``bmm`` path. Under ``torch.compile`` the cached answer is a constant (the experts
    probe their device's dtypes when built or moved, ``_RoutedExperts.probe``); a probe
    inside a compiled region could not be traced.
    """
    key = (device_type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        _GROUPED_MM_SUPPORT[key] = _probe_grouped_mm(device_type, dtype)
    return _GROUPED_MM_SUPPORT[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # constants, not randn: the probe runs while layers are built and must not move
            # the global RNG (the weights built after it would depend on the probe cache)
            x = torch.ones(6, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 6], device=device_type, dtype=torch.int32)
            _grouped(x, w, offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class _RoutedExperts(nn.Module, abc.ABC):
    """The compute paths shared by equal-width and heterogeneous experts. A subclass gives
    ``expert_weights(e)`` (expert e's own w_gate (D, H_e), w_up (D, H_e), w_down (H_e, D)),
    ``stacked()`` ((E, D, H), (E, D, H), (E, H, D), zero-padded to the widest expert) and
    ``num_experts``. Zero padding is exact: a padded unit has silu(0) * up = 0 and a zero row
    of w_down, so it adds nothing and receives zero gradient."""

    impl: str

    def probe(self) -> None:
        """Answer ``grouped_mm_supported`` now, for the weights' device and dtype and the
        autocast dtypes, so a compiled forward finds the answer cached."""
        for p in self.parameters():
            for dtype in {p.dtype, torch.bfloat16, torch.float16}:
                grouped_mm_supported(p.device.type, dtype)
            break

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.probe()  # moved to another device or dtype
        return self

    @abc.abstractmethod
    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's own w_gate (D, H_e), w_up (D, H_e), w_down (H_e, D)."""

    @abc.abstractmethod
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All experts' weights stacked, zero-padded to the widest: (E, D, H), (E, D, H), (E, H, D)."""

    def forward(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor, impl: str | None = None
                ) -> torch.Tensor:
        """Apply expert e to its block of rows; rows are grouped by expert in order."""
        impl = self._resolve(x_AD, impl)
        if impl == "loop":
            return self._loop(x_AD, tokens_per_expert)
        if impl == "bmm":
            return _bmm_swiglu(x_AD, tokens_per_expert, *self.stacked())
        h_AH, w_down, offs = self._grouped_hidden(x_AD, tokens_per_expert)
        return _grouped(h_AH, w_down, offs)

    def weighted_sum(self, x_AD: torch.Tensor, tokens_per_expert: torch.Tensor, weights_A: torch.Tensor,
                     token_ids_A: torch.Tensor, num_tokens: int, impl: str | None = None) -> torch.Tensor:
        """(T, D): each token's sum of gate weight x expert output over its assignments,
        ``weighted_combine(self(x_AD, tokens_per_expert), weights_A, token_ids_A, num_tokens)``.

        On the grouped_mm path the down projection and the sum are one autograd function
        (``_GroupedDownCombine``), which keeps no (A, D) expert outputs for the backward.
        """
        impl = self._resolve(x_AD, impl)
        if impl != "grouped_mm":
            return weighted_combine(self(x_AD, tokens_per_expert, impl), weights_A, token_ids_A, num_tokens)
        h_AH, w_down, offs = self._grouped_hidden(x_AD, tokens_per_expert)
        if w_down.dtype != h_AH.dtype:  # autocast (see _grouped)
            w_down = w_down.to(h_AH.dtype)
        return _GroupedDownCombine.apply(h_AH, w_down, offs, weights_A, token_ids_A, num_tokens)

    def _grouped_hidden(self, x_AD, tokens_per_expert):
        """The grouped path up to the down projection: (silu(x W_gate) * x W_up, W_down, offsets)."""
        w_gate, w_up, w_down = self.stacked()
        offs = torch.cumsum(tokens_per_expert, 0).to(device=x_AD.device, dtype=torch.int32)
        return F.silu(_grouped(x_AD, w_gate, offs)) * _grouped(x_AD, w_up, offs), w_down, offs

    def _resolve(self, x_AD: torch.Tensor, impl: str | None) -> str:
        """The compute path for these rows: ``impl`` (or the module's), with auto decided."""
        impl = impl or self.impl
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl={impl!r} is not allowed; choose loop, bmm, grouped_mm or auto")
        if impl == "auto":
            # _grouped_mm wants 16-byte aligned rows (D and H multiples of 8 in bf16); the
            # stacked weights are (E, D, H_max)
            aligned = all(n * x_AD.element_size() % 16 == 0 for n in (x_AD.shape[-1], max(self.hidden_sizes)))
            usable = aligned and grouped_mm_supported(x_AD.device.type, x_AD.dtype)
            # NOTE: torch 2.13's fake-tensor rule for _grouped_mm (what torch.compile traces
            # with) accepts bf16 only, though the CPU kernel runs float32: compiled float32
            # takes bmm, whose padded size is the one data-dependent step (a graph break)
            if torch.compiler.is_compiling() and x_AD.dtype != torch.bfloat16:
                usable = False
            impl = "grouped_mm" if usable else "bmm"
        return impl

    def _loop(self, x_AD, tokens_per_expert):
        outputs = []
        # host sync: the reference loop splits by the counts on the host (use grouped_mm on a GPU)
        for e, x_e in enumerate(torch.split(x_AD, tokens_per_expert.tolist())):
            outputs.append(_swiglu(x_e, *self.expert_weights(e)))
        return torch.cat(outputs) if outputs else x_AD.new_zeros(0, x_AD.shape[-1])


def _bmm_swiglu(x_AD, tokens_per_expert, w_gate, w_up, w_down):
    """Pad every expert's rows to the largest group, then one batched matmul per weight."""
    E, A = w_gate.shape[0], x_AD.shape[0]
    if A == 0:
        return x_AD.new_zeros(0, w_down.shape[-1])
    counts = tokens_per_expert.to(x_AD.device)
    expert_ids = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts, output_size=A)
    rank = torch.arange(A, device=x_AD.device) - (torch.cumsum(counts, 0) - counts)[expert_ids]
    C = int(counts.max())  # host sync: the padded width; grouped_mm (the GPU path) needs none
    x_ECD = x_AD.new_zeros(E, C, x_AD.shape[-1]).index_put((expert_ids, rank), x_AD)
    h_ECH = F.silu(torch.bmm(x_ECD, w_gate)) * torch.bmm(x_ECD, w_up)
    y_ECD = torch.bmm(h_ECH, w_down)
    return y_ECD[expert_ids, rank]


class SwiGLUExperts(_RoutedExperts):
    """E routed SwiGLU experts with weights w_gate, w_up (E, D, H) and w_down (E, H, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden_size: int, impl: str = "auto",
                 init_std: float = 0.02):
        super().__init__()
        self.impl = impl
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * init_std)
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, hidden_size) * init_std)
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden_size, d_model) * init_std)
        self.probe()

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return (self.w_gate.shape[-1],) * self.num_experts

    def expert_weights(self, e):
        return self.w_gate[e], self.w_up[e], self.w_down[e]

    def stacked(self):
        return self.w_gate, self.w_up, self.w_down


class HeterogeneousSwiGLUExperts(_RoutedExperts):
    """E routed SwiGLU experts of different widths (HMoE, Wang et al. 2024, arXiv 2408.10681):
    expert e has its own w_gate_e, w_up_e (D, H_e) and w_down_e (H_e, D), stored at their true
    sizes (parameter counts are exact). ``loop`` runs each at its width (the reference); ``bmm``
    and ``grouped_mm`` run on weights zero-padded to the widest expert, which is exact."""

    def __init__(self, d_model: int, hidden_sizes: tuple[int, ...], impl: str = "auto", init_std: float = 0.02):
        super().__init__()
        self.impl = impl
        self.hidden_sizes = tuple(hidden_sizes)
        self.w_gate = nn.ParameterList(nn.Parameter(torch.randn(d_model, h) * init_std) for h in self.hidden_sizes)
        self.w_up = nn.ParameterList(nn.Parameter(torch.randn(d_model, h) * init_std) for h in self.hidden_sizes)
        self.w_down = nn.ParameterList(nn.Parameter(torch.randn(h, d_model) * init_std) for h in self.hidden_sizes)
        self.probe()

    @property
    def num_experts(self) -> int:
        return len(self.hidden_sizes)

    def expert_weights(self, e):
        return self.w_gate[e], self.w_up[e], self.w_down[e]

    def stacked(self):
        widest = max(self.hidden_sizes)
        pad_cols = [F.pad(w, (0, widest - w.shape[1])) for w in self.w_gate], \
            [F.pad(w, (0, widest - w.shape[1])) for w in self.w_up]
        down = [F.pad(w, (0, 0, 0, widest - w.shape[0])) for w in self.w_down]
        return torch.stack(pad_cols[0]), torch.stack(pad_cols[1]), torch.stack(down)


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
