"""Expert placement on devices: the exact planner against brute force, the greedy bound, the
contiguous default layout and the `plan-placement` command."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from moe_balance.harness.cli import main
from moe_balance.placement import contiguous_placement, exact_placement, greedy_placement, plan_placement


def brute_force_optimum(loads, devices):
    """Smallest maximum device load over every split into equal-size groups (small cases)."""
    E, per = len(loads), len(loads) // devices
    best = float("inf")

    def split(remaining, worst):
        nonlocal best
        if worst >= best:
            return
        if not remaining:
            best = worst
            return
        first, rest = remaining[0], remaining[1:]
        for others in itertools.combinations(rest, per - 1):
            group = (first, *others)
            split([e for e in rest if e not in others], max(worst, sum(loads[e] for e in group)))

    split(list(range(E)), 0.0)
    return best


def test_hand_made_loads_have_the_known_optimum():
    loads = [10, 9, 8, 7, 3, 2, 1, 0]
    before = contiguous_placement(loads, 2)
    assert before.device_of == (0, 0, 0, 0, 1, 1, 1, 1) and before.device_loads == (34.0, 6.0)
    after = plan_placement(loads, 2)
    assert after.method == "exact" and after.device_loads == (20.0, 20.0) and after.imbalance == 1.0
    assert sorted(after.device_of.count(d) for d in (0, 1)) == [4, 4]  # 4 experts per device
    assert after.lower_bound == 20.0


@pytest.mark.parametrize("seed", range(8))
def test_exact_matches_brute_force_and_greedy_is_bounded(seed):
    rng = np.random.default_rng(seed)
    E, D = [(8, 2), (8, 4), (9, 3), (12, 3), (6, 2), (12, 4), (10, 2), (8, 8)][seed]
    loads = np.round(rng.exponential(size=E) * 100).tolist()
    optimum = brute_force_optimum(loads, D)
    exact = exact_placement(loads, D)
    greedy = greedy_placement(loads, D)
    assert exact.method == "exact" and exact.max_load == pytest.approx(optimum)
    for p in (exact, greedy):
        assert sorted(p.device_of.count(d) for d in range(D)) == [E // D] * D
        assert sum(p.device_loads) == pytest.approx(sum(loads))
        assert p.max_load >= p.lower_bound - 1e-9
    assert optimum - 1e-9 <= greedy.max_load <= 4 / 3 * optimum + max(loads)


def test_auto_uses_greedy_for_large_cases_and_bad_input_is_refused():
    loads = np.random.default_rng(0).exponential(size=64).tolist()
    assert plan_placement(loads, 8).method == "greedy"
    assert plan_placement(loads[:8], 2).method == "exact"
    with pytest.raises(ValueError, match="8 experts cannot be split evenly over 3 devices"):
        plan_placement(loads[:8], 3)
    with pytest.raises(ValueError, match="loads must be finite and >= 0"):
        plan_placement([1.0, -1.0], 1)
    with pytest.raises(ValueError, match="method='best' is not allowed"):
        plan_placement([1.0, 2.0], 1, method="best")


def test_plan_placement_command(tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps({"expert_load": [[10, 9, 8, 7, 3, 2, 1, 0]]}))
    assert main(["plan-placement", str(tmp_path), "--devices", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["0", "contiguous", "34", "20", "1.700"]
    assert out[2].split() == ["0", "exact", "20", "20", "1.000"]
    with pytest.raises(SystemExit) as stop:  # a bad value: argparse's usage line, exit code 2
        main(["plan-placement", str(tmp_path / "nowhere"), "--devices", "2"])
    assert stop.value.code == 2 and "no eval.json there" in capsys.readouterr().err
