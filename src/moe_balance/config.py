"""Configuration: frozen, keyword-only dataclasses validated on construction.

Every invalid value raises ``ValueError`` naming the field, the value and what is allowed,
so a typo in an experiment fails at the line that made it, not deep inside a forward pass.

Balancer specs (``LossFree``, ``AuxLoss``, ``ZLoss``) live here as plain data; the stateful
modules that implement them are built from these specs by ``moe_balance.balancing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

SCORE_FNS = ("sigmoid", "softmax")
DROP_POLICIES = ("probs", "position")
LOSS_FREE_RULES = ("sign", "error", "adaptive")
LOSS_FREE_FORMS = ("additive", "multiplicative")
LOSS_FREE_BALANCE = ("tokens", "compute")
AUX_SCOPES = ("micro_batch", "sequence", "global_batch")
EXPERT_IMPLS = ("auto", "loop", "bmm", "grouped_mm")
ROUTER_METHODS = ("top_k", "expert_choice", "top_p", "grouped")
EXPERT_CHOICE_CAPACITY = 2.0  # Zhou et al. 2022's EC-CF2
TOP_P_DEFAULT = 0.4  # Huang et al. 2024


def _choice(owner: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not allowed; choose one of {allowed}")


def is_number(value) -> bool:
    """An int or float that is not a bool (``True`` is an int in Python, never a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} must be True or False")


def _non_negative(owner: str, name: str, value: float) -> None:
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number >= 0")


def _positive_int(owner: str, name: str, value: int, minimum: int = 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{owner}.{name}={value!r} must be an integer >= {minimum}")


def heterogeneous_widths(ratios, num_experts: int, width: int) -> tuple[int, ...]:
    """HMoE widths: ``ratios`` repeated over the experts, times ``width``, rounded to a multiple
    of 8 (at least 8; grouped_mm wants aligned widths). Ratios with mean 1 keep the total expert
    parameters of ``num_experts`` experts of ``width``."""
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not (r > 0) for r in ratios):
        raise ValueError(f"expert width ratios must be positive numbers; got {ratios!r}")
    return tuple(max(8, 8 * round(ratios[e % len(ratios)] * width / 8)) for e in range(num_experts))


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """How tokens and experts are matched.

    method: which router (``moe_balance.routing.ROUTERS``):
        "top_k" (default): each token takes the K experts with the best (biased) scores;
        "expert_choice" (Zhou et al. 2022): each expert takes its best C = ceil(capacity_factor *
            T / E) tokens of the routing batch, so a token gets 0..E experts. It reads every
            token of the batch, later ones included: in a causal LM a token's output depends on
            the future (see ``docs/routers.md``);
        "top_p" (Huang et al. 2024): each token takes experts in descending score order until
            their normalised scores sum to ``top_p`` (the crossing expert included), 1 to
            ``max_experts`` of them;
        "grouped" (Mixture of Grouped Experts, Pangu Pro MoE 2025): the E experts form
            ``num_groups`` equal groups and each token takes top_k / num_groups in every group.
    score_fn: "sigmoid" (Loss-Free paper and DeepSeek-V3) or "softmax" over all experts.
    normalize_weights: divide the selected gates by their sum (DeepSeek-V3 does, for sigmoid).
    scaling_factor: multiply the gates after normalisation (DeepSeek-V3: 2.5).
    num_groups / topk_groups: for "top_k", group-limited routing (DeepSeek-V3 node-limited
        routing): experts are split into ``num_groups`` equal groups, a group's score is the
        sum of its top-2 biased scores, only the best ``topk_groups`` groups stay eligible for
        the top-K. For "grouped", ``num_groups`` alone (every group is used).
    capacity_factor: None = dropless; otherwise each expert keeps at most
        ceil(capacity_factor * tokens * top_k / num_experts) assignments (``inf`` keeps all).
        For "expert_choice" it sets C (default 2.0) and nothing is dropped beyond it.
    drop_policy: which assignments an over-capacity expert keeps: "probs" (highest gate
        scores) or "position" (earliest tokens, as in Switch/GShard).
    top_p, max_experts: "top_p" only: the score mass to reach (default 0.4) and the most
        experts a token may take (default: all).
    gating_residual: MoE++'s pathway-aware router (Jin et al. 2024, arXiv 2410.07348, eq. 8):
        this layer's logits plus a learned (E, E) map (initialised to the identity) of the
        previous MoE layer's logits, so routing decisions are informed by the last layer's.
        The first MoE layer of a model has no previous logits and routes as without it.
    routing_batch_size, shuffle_tokens: "expert_choice" only: route groups of this many tokens
        separately (default: every token of the forward at once), formed from a random
        permutation of the tokens with ``shuffle_tokens`` (the Loss-Free paper's mitigation
        test, sec. 5.2: the leak is diluted, not removed).
    check_finite: raise on NaN/inf router logits (costs one device sync per forward).
    """

    method: str = "top_k"
    score_fn: str = "sigmoid"
    normalize_weights: bool = False
    scaling_factor: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    top_p: float | None = None
    max_experts: int | None = None
    routing_batch_size: int | None = None
    shuffle_tokens: bool = False
    gating_residual: bool = False
    check_finite: bool = True

    def _only_for(self, method: str, *names: str) -> None:
        """Fields that mean something for one method only must stay unset for the others."""
        if self.method != method:
            for name in names:
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"RouterConfig.{name}={getattr(self, name)!r} applies to "
                                     f"method='{method}' only; got method={self.method!r}")

    def __post_init__(self) -> None:
        _choice("RouterConfig", "method", self.method, ROUTER_METHODS)
        _choice("RouterConfig", "score_fn", self.score_fn, SCORE_FNS)
        _choice("RouterConfig", "drop_policy", self.drop_policy, DROP_POLICIES)
        _bool("RouterConfig", "normalize_weights", self.normalize_weights)
        _bool("RouterConfig", "check_finite", self.check_finite)
        _bool("RouterConfig", "shuffle_tokens", self.shuffle_tokens)
        _bool("RouterConfig", "gating_residual", self.gating_residual)
        if not (is_number(self.scaling_factor) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ValueError(
                f"RouterConfig.scaling_factor={self.scaling_factor!r} must be a finite number > 0")
        self._only_for("top_p", "top_p", "max_experts")
        self._only_for("expert_choice", "routing_batch_size", "shuffle_tokens")
        if self.method == "grouped":
            if self.num_groups is None or self.topk_groups is not None:
                raise ValueError(
                    "RouterConfig(method='grouped') needs num_groups (the number of expert groups) "
                    f"and no topk_groups, since every group is used (got num_groups={self.num_groups!r}, "
                    f"topk_groups={self.topk_groups!r})")
            _positive_int("RouterConfig", "num_groups", self.num_groups)
        elif self.method != "top_k" and (self.num_groups is not None or self.topk_groups is not None):
            raise ValueError(f"RouterConfig.num_groups/topk_groups apply to method='top_k' (group-limited "
                             f"routing) and 'grouped' only; got method={self.method!r}")
        elif (self.num_groups is None) != (self.topk_groups is None):
            raise ValueError(
                "RouterConfig.num_groups and RouterConfig.topk_groups go together: set both "
                f"or neither (got num_groups={self.num_groups!r}, topk_groups={self.topk_groups!r}); "
                "for exactly top_k / num_groups experts in every group use method='grouped'")
        elif self.num_groups is not None:
            _positive_int("RouterConfig", "num_groups", self.num_groups)
            _positive_int("RouterConfig", "topk_groups", self.topk_groups)
            if self.topk_groups > self.num_groups:
                raise ValueError(
                    f"RouterConfig.topk_groups={self.topk_groups} must be <= "
                    f"num_groups={self.num_groups}")
        if self.method == "expert_choice" and self.capacity_factor is None:
            object.__setattr__(self, "capacity_factor", EXPERT_CHOICE_CAPACITY)
        if self.capacity_factor is not None and not (
                is_number(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(
                f"RouterConfig.capacity_factor={self.capacity_factor!r} must be > 0 "
                "(float('inf') keeps every assignment), or None for dropless routing")
        if self.method == "top_p":
            if self.top_p is None:
                object.__setattr__(self, "top_p", TOP_P_DEFAULT)
            if not (is_number(self.top_p) and 0 < self.top_p <= 1):
                raise ValueError(f"RouterConfig.top_p={self.top_p!r} must be a number in (0, 1]")
            if self.max_experts is not None:
                _positive_int("RouterConfig", "max_experts", self.max_experts)
        if self.method == "expert_choice":
            if self.routing_batch_size is not None:
                _positive_int("RouterConfig", "routing_batch_size", self.routing_batch_size)
            if self.shuffle_tokens and self.routing_batch_size is None:
                raise ValueError("RouterConfig.shuffle_tokens=True needs routing_batch_size: routing "
                                 "all tokens at once does not depend on their order")


@dataclass(frozen=True, kw_only=True)
class LossFree:
    """Auxiliary-Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664, Algorithm 1).

    After every optimizer step, with c_i the tokens routed to expert i in that step and c̄
    their mean:

    - ``rule="sign"`` (the paper's): b_i += u * sign(c̄ - c_i), u = ``update_rate``;
    - ``rule="error"`` (the paper's raw-error ablation, normalised): b_i += u * (c̄ - c_i) / c̄;
    - ``rule="adaptive"`` (``moe_balance.controller``): b_i += g_i * y_i (common mode removed)
      with the innovation y_i = sign(c̄ - c_i) * min(max_step, Q_i(|c̄ - c_i|)), Q_i(n) the
      bias change that would have moved n of the last step's tokens across expert i's top-K
      threshold, and the gain g_i = clip(m_i^2 / v_i, min_gain, max_gain) from moving averages
      (``smoothing``) of y_i and y_i^2: near 1 while the innovations keep their sign (follow a
      drifting router), near min_gain while they are batch noise (average it); and never below
      |c_i - c̄| / c̄ - ``trust_error`` (capped at max_gain), so an expert far from balance takes
      full steps even when its history says noise (an expert that just became the overloaded
      one has innovations of the opposite sign behind it). Large steps far from balance, tiny
      ones near it; ``update_rate`` is not used.

    ``form="additive"`` selects top-K on s + b (b starts at 0); ``"multiplicative"`` on s * b
    (the paper's multiplicative-bias ablation: b starts at 1 and is kept >= 1e-3, so a bias
    never flips the order of scores). ``center`` re-centres after each update (additive:
    subtract the mean; multiplicative: divide by it), since only relative biases matter.
    ``freeze_after_steps`` stops updating after that many updates (DeepSeek-V3 sets u = 0 for
    the end of training). ``start_after_steps`` holds the bias at its start value for that many
    updates (their counts are discarded), then every rule starts as if fresh. Training from
    scratch, the first tens of steps collapse every token onto a few experts whatever the bias
    does; chasing that collapse with large bias moves cost the quick preset's adaptive runs
    perplexity without balancing them, so the harness's ``loss_free_adaptive`` holds for 50 steps
    (and uses ``smoothing=0.7``, which balanced each batch better there than 0.9; the library's
    defaults, 0 and 0.9, suit a router that is already trained).

    ``zero_computation_share`` (layers with MoE++ zero-computation experts only): the fraction of
    all assignments the zero-computation experts should take together, split equally among
    them; the FFN experts share the rest equally. Every rule above then compares each expert's
    load with its own target instead of the mean (None: every expert the same target).

    ``balance="compute"`` (heterogeneous experts, ``MoEConfig.expert_hidden_sizes``): the FFN
    experts' targets are proportional to 1 / H_i, so each expert's compute (tokens x width) is
    equal rather than its token count; "tokens" (default) equalises tokens.
    """

    update_rate: float = 1e-3
    rule: str = "sign"
    form: str = "additive"
    max_step: float = 0.05
    min_gain: float = 0.05
    max_gain: float = 1.0
    smoothing: float = 0.9
    trust_error: float = 0.5
    center: bool = False
    freeze_after_steps: int | None = None
    start_after_steps: int = 0
    zero_computation_share: float | None = None
    balance: str = "tokens"

    def __post_init__(self) -> None:
        _non_negative("LossFree", "update_rate", self.update_rate)
        _choice("LossFree", "balance", self.balance, LOSS_FREE_BALANCE)
        if self.zero_computation_share is not None and not (
                is_number(self.zero_computation_share) and 0 < self.zero_computation_share < 1):
            raise ValueError(f"LossFree.zero_computation_share={self.zero_computation_share!r} must be a "
                             "number in (0, 1), or None")
        _choice("LossFree", "rule", self.rule, LOSS_FREE_RULES)
        _choice("LossFree", "form", self.form, LOSS_FREE_FORMS)
        _bool("LossFree", "center", self.center)
        for name in ("min_gain", "max_gain"):
            value = getattr(self, name)
            if not (is_number(value) and 0 < value <= 1):
                raise ValueError(f"LossFree.{name}={value!r} must be a number in (0, 1]")
        if self.min_gain > self.max_gain:
            raise ValueError(f"LossFree.min_gain={self.min_gain!r} must be <= max_gain={self.max_gain!r}")
        if not (is_number(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"LossFree.smoothing={self.smoothing!r} must be a number in [0, 1)")
        if not (is_number(self.trust_error) and self.trust_error >= 0):  # inf: the noise gain only
            raise ValueError(f"LossFree.trust_error={self.trust_error!r} must be a number >= 0 (inf to disable)")
        if not (is_number(self.max_step) and math.isfinite(self.max_step)
                and self.max_step > 0):
            raise ValueError(f"LossFree.max_step={self.max_step!r} must be a finite number > 0")
        if self.freeze_after_steps is not None:
            _positive_int("LossFree", "freeze_after_steps", self.freeze_after_steps, minimum=0)
        _positive_int("LossFree", "start_after_steps", self.start_after_steps, minimum=0)


@dataclass(frozen=True, kw_only=True)
class AuxLoss:
    """Switch/GShard load-balancing loss alpha * N * sum_i f_i P_i (equals alpha when balanced).

    scope "micro_batch": f and P over the tokens of this forward; "sequence": DeepSeek-V3's
    sequence-wise loss, averaged over sequences; "global_batch": f over every micro-batch of
    the step so far and every data-parallel rank ("Demons in the Detail", arXiv 2501.11873).

    ``zero_computation_weight`` is MoE++'s tau (heterogeneous load balance, Jin et al. 2024,
    eq. 9): the terms of zero-computation experts are weighted by tau, those of FFN experts by
    1, i.e. alpha * N * sum_i eta_i f_i P_i. tau < 1 lets the zero-computation experts take more
    than an equal share of the tokens.
    """

    coeff: float
    scope: str = "micro_batch"
    zero_computation_weight: float = 1.0

    def __post_init__(self) -> None:
        _non_negative("AuxLoss", "coeff", self.coeff)
        _non_negative("AuxLoss", "zero_computation_weight", self.zero_computation_weight)
        _choice("AuxLoss", "scope", self.scope, AUX_SCOPES)


@dataclass(frozen=True, kw_only=True)
class ZLoss:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): coeff * mean_t logsumexp(z_t)^2."""

    coeff: float = 1e-3

    def __post_init__(self) -> None:
        _non_negative("ZLoss", "coeff", self.coeff)


@dataclass(frozen=True, kw_only=True)
class DynamicLoss:
    """The dynamic loss of dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More
    Experts", eq. 6): coeff * mean_t -sum_i P_{t,i} log P_{t,i}, the entropy of each token's
    normalised router scores. Lower entropy concentrates the mass on fewer experts, so top-p
    routing takes fewer of them (the paper uses coeff 1e-4 beside an aux loss of 1e-2)."""

    coeff: float = 1e-4

    def __post_init__(self) -> None:
        _non_negative("DynamicLoss", "coeff", self.coeff)


@dataclass(frozen=True, kw_only=True)
class ParameterPenalty:
    """HMoE's parameter penalty (Wang et al. 2024, arXiv 2408.10681): the Switch loss with each
    expert's load fraction weighted by its size, coeff * N * sum_i (H_i / mean(H)) f_i P_i over the
    FFN experts (H_i: hidden width), so routing a token to a large expert costs more than to a
    small one and the router learns to favour small experts. Needs
    ``MoEConfig.expert_hidden_sizes``; zero-computation experts (no parameters) weigh 0."""

    coeff: float = 1e-3

    def __post_init__(self) -> None:
        _non_negative("ParameterPenalty", "coeff", self.coeff)


BalancerSpec = Union[LossFree, AuxLoss, ZLoss, DynamicLoss, ParameterPenalty]
BALANCER_SPECS = (LossFree, AuxLoss, ZLoss, DynamicLoss, ParameterPenalty)


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
