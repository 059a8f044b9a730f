"""``RouterConfig``: how tokens and experts are matched (the router's method and its knobs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._checks import (EXPERT_CHOICE_CAPACITY, DROP_POLICIES, ROUTER_METHODS, SCORE_FNS, TOP_P_DEFAULT, _bool,
                      _choice, _positive_int, is_number)


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
    check_finite: fail on NaN/inf router logits: a FloatingPointError on the CPU; on a GPU an
        asynchronous device assertion (no host sync; the next synchronising call fails with a
        device-side assert, which ends the process's CUDA context: resume from a checkpoint).
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
