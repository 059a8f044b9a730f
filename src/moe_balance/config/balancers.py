"""Balancer specs as plain data: ``LossFree`` (the Loss-Free bias) and the auxiliary-loss family
(``AuxLoss``, ``ZLoss``, ``DynamicLoss``, ``ParameterPenalty``). The stateful modules that
implement them are built from these specs by ``moe_balance.balancing``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from ._checks import (LOSS_FREE_BALANCE, LOSS_FREE_FORMS, LOSS_FREE_RULES, AUX_SCOPES, _bool, _choice,
                      _non_negative, _positive_int, is_number)


@dataclass(frozen=True, kw_only=True)
class LossFree:
    """Auxiliary-Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664, Algorithm 1).

    After every optimizer step, with c_i the tokens routed to expert i in that step and c̄
    their mean:

    - ``rule="sign"`` (the paper's): b_i += u * sign(c̄ - c_i), u = ``update_rate``;
    - ``rule="error"`` (the paper's raw-error ablation, normalised): b_i += u * (c̄ - c_i) / c̄;
    - ``rule="adaptive"`` (``balancing.rules.adaptive``): b_i += g_i * y_i (common mode removed)
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
    ``center_step`` instead removes the mean of each step from the step, in float32 (the
    bias's dtype), as torchtitan's update does; the bias's mean then stays where it started.
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
    center_step: bool = False
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
        _bool("LossFree", "center_step", self.center_step)
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
