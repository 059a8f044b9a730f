"""``MoEConfig``: one MoE layer's experts, router and balancers, checked together (the
constraints that span fields, e.g. ``top_k`` against the experts a router can reach), and
``heterogeneous_widths`` for HMoE's expert widths."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import EXPERT_IMPLS, _choice, _positive_int
from .balancers import BALANCER_SPECS, AuxLoss, BalancerSpec, LossFree, ParameterPenalty
from .router import RouterConfig


def heterogeneous_widths(ratios, num_experts: int, width: int) -> tuple[int, ...]:
    """HMoE widths: ``ratios`` repeated over the experts, times ``width``, rounded to a multiple
    of 8 (at least 8; grouped_mm wants aligned widths). Ratios with mean 1 keep the total expert
    parameters of ``num_experts`` experts of ``width``."""
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not (r > 0) for r in ratios):
        raise ValueError(f"expert width ratios must be positive numbers; got {ratios!r}")
    return tuple(max(8, 8 * round(ratios[e % len(ratios)] * width / 8)) for e in range(num_experts))


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer: N routed SwiGLU experts (top-K of them per token) plus shared experts.

    expert_hidden_size: hidden width of each routed expert (fine-grained experts are narrow).
    expert_hidden_sizes: instead, one width per routed FFN expert (HMoE's heterogeneous experts,
        Wang et al. 2024, arXiv 2408.10681); exactly one of the two is given.
    shared_expert_hidden_size: width of each shared expert (default: expert_hidden_size, or the
        mean of expert_hidden_sizes rounded).
    expert_impl: "loop" (reference), "bmm" (padded batched matmul), "grouped_mm"
        (``torch._grouped_mm``, where the device supports it) or "auto" (fastest available).
    zero_experts, copy_experts, constant_experts: MoE++ zero-computation experts (Jin et al.
        2024, arXiv 2410.07348) beside the ``num_experts`` FFN experts: a zero expert outputs 0
        (the token is discarded), a copy expert outputs its input, a constant expert outputs
        a1 * x + a2 * v with v a learned vector and (a1, a2) = softmax(W_c x). They are
        numbered after the FFN experts: the router has ``num_routed_experts`` outputs.
    """

    d_model: int
    num_experts: int
    top_k: int
    expert_hidden_size: int | None = None
    expert_hidden_sizes: tuple[int, ...] | None = None
    num_shared_experts: int = 0
    shared_expert_hidden_size: int | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    balancers: tuple[BalancerSpec, ...] = ()
    expert_impl: str = "auto"
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0

    @property
    def num_zero_computation_experts(self) -> int:
        return self.zero_experts + self.copy_experts + self.constant_experts

    @property
    def num_routed_experts(self) -> int:
        """The router's width: FFN experts, then zero, copy and constant experts."""
        return self.num_experts + self.num_zero_computation_experts

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """Each routed FFN expert's hidden width."""
        return self.expert_hidden_sizes or (self.expert_hidden_size,) * self.num_experts

    @property
    def default_shared_hidden_size(self) -> int:
        return self.shared_expert_hidden_size or round(sum(self.hidden_sizes) / self.num_experts)

    @property
    def kind_sizes(self) -> tuple[int, int, int, int]:
        """How many routed experts of each kind, in routing order: FFN, zero, copy, constant."""
        return (self.num_experts, self.zero_experts, self.copy_experts, self.constant_experts)

    def expert_kinds(self) -> tuple[str, ...]:
        """Each routed expert's kind, in routing order: "ffn", "zero", "copy" or "constant"."""
        return tuple(kind for kind, n in zip(("ffn", "zero", "copy", "constant"), self.kind_sizes)
                     for _ in range(n))

    def __post_init__(self) -> None:
        _positive_int("MoEConfig", "d_model", self.d_model)
        _positive_int("MoEConfig", "num_experts", self.num_experts)
        _positive_int("MoEConfig", "top_k", self.top_k)
        if (self.expert_hidden_size is None) == (self.expert_hidden_sizes is None):
            raise ValueError("MoEConfig needs exactly one of expert_hidden_size (every expert the same width) "
                             "and expert_hidden_sizes (one width per expert, HMoE); got "
                             f"expert_hidden_size={self.expert_hidden_size!r}, "
                             f"expert_hidden_sizes={self.expert_hidden_sizes!r}")
        if self.expert_hidden_size is not None:
            _positive_int("MoEConfig", "expert_hidden_size", self.expert_hidden_size)
        else:
            if not (isinstance(self.expert_hidden_sizes, tuple) and len(self.expert_hidden_sizes) == self.num_experts
                    and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.expert_hidden_sizes)):
                raise ValueError(f"MoEConfig.expert_hidden_sizes={self.expert_hidden_sizes!r} must be a tuple of "
                                 f"num_experts={self.num_experts} integers >= 1")
        _positive_int("MoEConfig", "num_shared_experts", self.num_shared_experts, minimum=0)
        if self.shared_expert_hidden_size is not None:
            _positive_int("MoEConfig", "shared_expert_hidden_size", self.shared_expert_hidden_size)
        _choice("MoEConfig", "expert_impl", self.expert_impl, EXPERT_IMPLS)
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            _positive_int("MoEConfig", name, getattr(self, name), minimum=0)
        Z = self.num_zero_computation_experts
        R = self.num_routed_experts
        if self.top_k > R:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts}"
                + (f" + {Z} zero-computation experts" if Z else ""))
        widest = max(self.hidden_sizes)  # heterogeneous experts run zero-padded to the widest
        if self.expert_impl == "grouped_mm" and (self.d_model % 8 or widest % 8):
            # torch._grouped_mm needs 16-byte aligned rows: multiples of 8 elements cover bf16 too
            raise ValueError(f"MoEConfig.expert_impl='grouped_mm' needs d_model and expert_hidden_size "
                             f"to be multiples of 8 (got {self.d_model} and {widest}); "
                             "use expert_impl='auto', which falls back to 'bmm'")
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"MoEConfig.router must be a RouterConfig, got {type(self.router).__name__}")
        if not isinstance(self.balancers, tuple):
            raise ValueError(
                f"MoEConfig.balancers must be a tuple of balancer specs, got {type(self.balancers).__name__}")
        for spec in self.balancers:
            if not isinstance(spec, BALANCER_SPECS):
                raise ValueError(
                    f"MoEConfig.balancers contains {spec!r}; allowed: LossFree, AuxLoss, ZLoss, DynamicLoss, "
                    "ParameterPenalty")
        if sum(isinstance(s, LossFree) for s in self.balancers) > 1:
            raise ValueError("MoEConfig.balancers may contain at most one LossFree balancer")
        router = self.router
        groups, topk_groups = router.num_groups, router.topk_groups
        if router.method == "expert_choice" and any(isinstance(s, LossFree) for s in self.balancers):
            raise ValueError("LossFree does not apply to RouterConfig(method='expert_choice'): expert "
                             "choice is balanced by construction (every expert takes exactly C tokens); "
                             "remove the LossFree balancer or use method 'top_k', 'top_p' or 'grouped'")
        if router.method == "top_p" and router.max_experts is not None and router.max_experts > R:
            raise ValueError(f"RouterConfig.max_experts={router.max_experts} must be <= "
                             f"MoEConfig.num_experts={self.num_experts}" + (f" + {Z} zero-computation experts" if Z else ""))
        if router.method == "grouped":
            if R % groups or self.top_k % groups:
                raise ValueError(
                    f"RouterConfig(method='grouped', num_groups={groups}) needs num_groups to divide both "
                    f"MoEConfig.num_experts={R} and MoEConfig.top_k={self.top_k} "
                    "(each token takes top_k / num_groups experts in every group)")
        elif groups is not None:
            if R % groups:
                raise ValueError(
                    f"RouterConfig.num_groups={groups} must divide "
                    f"MoEConfig.num_experts={R}" + (" (FFN and zero-computation experts)" if Z else ""))
            reachable = topk_groups * (R // groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"MoEConfig.top_k={self.top_k} is not reachable with topk_groups={topk_groups} "
                    f"groups of {R // groups} experts ({reachable} eligible); "
                    "raise topk_groups or lower top_k")
        for spec in self.balancers:
            if isinstance(spec, LossFree) and spec.zero_computation_share is not None and not Z:
                raise ValueError("LossFree.zero_computation_share needs zero-computation experts: set "
                                 "MoEConfig zero_experts, copy_experts or constant_experts")
            if isinstance(spec, AuxLoss) and spec.zero_computation_weight != 1.0 and not Z:
                raise ValueError("AuxLoss.zero_computation_weight weights zero-computation experts: set "
                                 "MoEConfig zero_experts, copy_experts or constant_experts")
            if isinstance(spec, ParameterPenalty) and self.expert_hidden_sizes is None:
                raise ValueError("ParameterPenalty weights experts by their size: it needs "
                                 "MoEConfig.expert_hidden_sizes (heterogeneous experts)")
            if isinstance(spec, LossFree) and spec.balance == "compute" and self.expert_hidden_sizes is None:
                raise ValueError("LossFree(balance='compute') needs MoEConfig.expert_hidden_sizes: with equal "
                                 "widths, equal compute is equal tokens (use the default balance='tokens')")
