"""Expert placement: which device hosts which expert, so the busiest device has the least work.

Shape legend: E experts, D devices (expert-parallel ranks), each hosting E / D experts.

With expert parallelism a step takes as long as its busiest device, so what matters is the
maximum over devices of the load its experts receive, not the balance of single experts
(MoETuner, Go and Mahajan 2025; LocMoE). Given per-expert loads (tokens or compute, e.g. the
``expert_load`` of a run's ``eval.json``), ``plan_placement`` assigns E / D experts to every
device minimising the maximum device load:

- ``"exact"``: a mixed-integer program solved with SciPy's ``milp`` (HiGHS): binary x[e, d]
  (expert e on device d), continuous z; minimise z subject to sum_d x[e, d] = 1,
  sum_e x[e, d] = E / D and sum_e load_e x[e, d] <= z. Optimal, for small cases.
- ``"greedy"``: the longest-processing-time rule with the E / D slots per device: experts in
  decreasing load, each to the least-loaded device with a free slot. Fast for any size; its
  maximum is at most 4/3 of the optimum plus one expert's load, usually near the lower bound.
- ``"auto"``: exact up to ``EXACT_LIMIT`` binary variables, greedy beyond (equal-size
  partitioning is NP-hard: 64 experts on 8 devices can take the solver minutes).

The exact solver stops after ``time_limit`` seconds; its placement is then labelled
"exact (time limit)" and is never worse than the greedy one.

The default layout of an expert-parallel run, experts [d * E/D, (d + 1) * E/D) on device d,
is reported as "contiguous" for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._optional import require

PLACEMENT_METHODS = ("auto", "exact", "greedy")
EXACT_LIMIT = 128  # binary variables E * D that "auto" hands to the exact solver
TIME_LIMIT = 10.0  # seconds the exact solver may take; then its best placement so far


@dataclass(frozen=True)
class Placement:
    """device_of[e]: the device hosting expert e. device_loads (D,): the load each device gets.
    method: "exact", "greedy" or "contiguous". lower_bound: no placement can have a smaller
    maximum (max(mean device load, the largest expert load))."""

    device_of: tuple[int, ...]
    device_loads: tuple[float, ...]
    method: str
    lower_bound: float

    @property
    def max_load(self) -> float:
        return max(self.device_loads)

    @property
    def mean_load(self) -> float:
        return sum(self.device_loads) / len(self.device_loads)

    @property
    def imbalance(self) -> float:
        """max / mean device load (1 = every device equally busy)."""
        return self.max_load / self.mean_load if self.mean_load > 0 else 1.0


def _check(loads, devices: int) -> np.ndarray:
    loads = np.asarray(loads, dtype=float)
    if loads.ndim != 1 or loads.size == 0:
        raise ValueError(f"loads must be a non-empty 1-D sequence of per-expert loads, got shape {loads.shape}")
    if not np.all(np.isfinite(loads)) or (loads < 0).any():
        raise ValueError("loads must be finite and >= 0")
    if not (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1):
        raise ValueError(f"devices={devices!r} must be an integer >= 1")
    if loads.size % devices:
        raise ValueError(f"{loads.size} experts cannot be split evenly over {devices} devices: every device "
                         "hosts the same number of experts; choose a device count that divides it")
    return loads


def _placement(loads: np.ndarray, device_of, devices: int, method: str) -> Placement:
    device_loads = np.zeros(devices)
    np.add.at(device_loads, np.asarray(device_of), loads)
    bound = max(float(loads.sum()) / devices, float(loads.max()))
    return Placement(tuple(int(d) for d in device_of), tuple(float(x) for x in device_loads), method, bound)


def contiguous_placement(loads, devices: int) -> Placement:
    """The default expert-parallel layout: expert e on device e // (E / D)."""
    loads = _check(loads, devices)
    return _placement(loads, np.arange(loads.size) // (loads.size // devices), devices, "contiguous")


def greedy_placement(loads, devices: int) -> Placement:
    """Longest processing time first, with E / D slots per device."""
    loads = _check(loads, devices)
    slots = loads.size // devices
    device_loads, free = np.zeros(devices), np.full(devices, slots)
    device_of = np.empty(loads.size, dtype=int)
    for e in np.argsort(-loads, kind="stable"):
        open_devices = np.flatnonzero(free > 0)
        d = open_devices[np.argmin(device_loads[open_devices])]
        device_of[e], device_loads[d], free[d] = d, device_loads[d] + loads[e], free[d] - 1
    return _placement(loads, device_of, devices, "greedy")


def exact_placement(loads, devices: int, time_limit: float = TIME_LIMIT) -> Placement:
    """The optimal placement by mixed-integer programming (SciPy ``milp``), or the best found
    within ``time_limit`` seconds."""
    loads = _check(loads, devices)
    optimize = require("scipy.optimize", "exact expert placement")
    sparse = require("scipy.sparse", "exact expert placement")
    E, D = loads.size, devices
    n = E * D  # x[e, d] at e * D + d, then z
    c = np.zeros(n + 1)
    c[-1] = 1.0
    rows, cols, vals, lo, hi = [], [], [], [], []

    def constraint(entries, lower, upper):
        r = len(lo)
        for col, val in entries:
            rows.append(r), cols.append(col), vals.append(val)
        lo.append(lower), hi.append(upper)

    for e in range(E):  # every expert on exactly one device
        constraint([(e * D + d, 1.0) for d in range(D)], 1, 1)
    for d in range(D):  # E / D experts per device, and its load below z
        constraint([(e * D + d, 1.0) for e in range(E)], E // D, E // D)
        constraint([(e * D + d, loads[e]) for e in range(E)] + [(n, -1.0)], -np.inf, 0)
    A = sparse.csr_array((vals, (rows, cols)), shape=(len(lo), n + 1))
    integrality = np.r_[np.ones(n), 0]
    bounds = optimize.Bounds(np.zeros(n + 1), np.r_[np.ones(n), np.inf])
    greedy = greedy_placement(loads, devices)
    result = optimize.milp(c, constraints=optimize.LinearConstraint(A, lo, hi), integrality=integrality,
                           bounds=bounds, options={"time_limit": time_limit})
    if result.x is None:  # nothing found in time
        return greedy
    x = np.round(result.x[:n]).reshape(E, D)
    placement = _placement(loads, x.argmax(1), devices, "exact" if result.status == 0 else "exact (time limit)")
    return placement if placement.max_load <= greedy.max_load else greedy


def plan_placement(loads, devices: int, method: str = "auto", time_limit: float = TIME_LIMIT) -> Placement:
    """The placement of ``loads`` (E,) on ``devices`` devices minimising the maximum device load."""
    if method not in PLACEMENT_METHODS:
        raise ValueError(f"method={method!r} is not allowed; choose one of {PLACEMENT_METHODS}")
    loads = _check(loads, devices)
    if method == "greedy" or (method == "auto" and loads.size * devices > EXACT_LIMIT):
        return greedy_placement(loads, devices)
    return exact_placement(loads, devices, time_limit)
