"""The allowed values of the configuration's string fields and the validation helpers every
config dataclass uses: each raises ``ValueError`` naming the owner, the field, the value and
what is allowed."""

from __future__ import annotations

import math

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

