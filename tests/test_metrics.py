"""Load metrics against hand-computed values."""

import math

import pytest
import torch

from moe_balance.metrics import (LoadAccumulator, coefficient_of_variation, dead_experts,
                                 drop_fraction, load_entropy, load_summary, max_vio, router_entropy)


def test_max_vio_paper_definition():
    # loads (4, 2, 2, 0): mean 2, max 4 -> (4 - 2) / 2 = 1
    assert max_vio(torch.tensor([4, 2, 2, 0])).item() == pytest.approx(1.0)
    assert max_vio(torch.tensor([3, 3, 3])).item() == 0.0
    assert max_vio(torch.zeros(4, dtype=torch.int64)).item() == 0.0
    per_layer = max_vio(torch.tensor([[4, 2, 2, 0], [1, 1, 1, 5]]))
    torch.testing.assert_close(per_layer, torch.tensor([1.0, 1.5], dtype=torch.float64))


def test_cv_dead_entropy_drop():
    counts = torch.tensor([4, 2, 2, 0])
    std = math.sqrt(((4 - 2) ** 2 + 0 + 0 + (0 - 2) ** 2) / 4)
    assert coefficient_of_variation(counts).item() == pytest.approx(std / 2)
    assert dead_experts(counts).item() == 1
    p = [0.5, 0.25, 0.25]
    assert load_entropy(counts).item() == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    assert load_entropy(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(1.0)
    assert load_entropy(torch.tensor([9, 0, 0, 0])).item() == pytest.approx(0.0)
    assert drop_fraction(torch.tensor([4, 4]), torch.tensor([4, 2])).item() == pytest.approx(0.25)
    assert drop_fraction(torch.tensor([0, 0]), torch.tensor([0, 0])).item() == 0.0


def test_router_entropy():
    uniform = torch.full((3, 4), 0.5)
    assert router_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert router_entropy(peaked).item() == pytest.approx(math.log(2) / 2)
    assert router_entropy(peaked, torch.tensor([True, False])).item() == pytest.approx(0.0)


def test_load_summary():
    s = load_summary(torch.tensor([4, 2, 2, 0]))
    assert s == pytest.approx({"min": 0.0, "max": 4.0, "mean": 2.0, "maxvio": 1.0,
                               "cv": math.sqrt(2) / 2, "dead": 1, "entropy": s["entropy"]})


def test_accumulator_gives_global_maxvio_not_mean_of_batches():
    acc = LoadAccumulator(num_layers=2, num_experts=2)
    # two batches each imbalanced in opposite directions: globally balanced in layer 0
    acc.add([torch.tensor([3, 1]), torch.tensor([2, 2])])
    acc.add(torch.tensor([[1, 3], [4, 0]]))
    assert acc.counts.tolist() == [[4, 4], [6, 2]]
    assert acc.maxvio_per_layer() == pytest.approx([0.0, 0.5])
    assert acc.maxvio() == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"expects counts of shape \(2, 2\), got \(3, 2\)"):
        acc.add(torch.zeros(3, 2, dtype=torch.int64))
