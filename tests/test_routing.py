"""Routing: hand-computed selections and gates, bias semantics, capacity, masks, precision."""

import math

import pytest
import torch

from moe_balance import MoE, MoEConfig, RouterConfig
from moe_balance.routing import TopKRouter, capacity


def identity_router(num_experts, top_k, **router_kwargs):
    """A router whose logits equal its input (weight = identity), for hand-computed cases."""
    router = TopKRouter(num_experts, num_experts, top_k, RouterConfig(**router_kwargs))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


LOGITS = torch.tensor([[2.0, -1.0, 0.5, 1.0],
                       [0.0, 3.0, -2.0, 1.5],
                       [-1.0, -0.5, 0.25, 0.0]])


def test_sigmoid_top2_hand_computed():
    d = identity_router(4, 2, score_fn="sigmoid")(LOGITS)
    # token 0 -> experts 0 (2.0), 3 (1.0); token 1 -> 1 (3.0), 3 (1.5); token 2 -> 2 (0.25), 3 (0.0)
    assert d.selected.tolist() == [[0, 3], [1, 3], [2, 3]]
    assert d.tokens_per_expert.tolist() == [1, 1, 1, 3]
    assert d.expert_ids.tolist() == [0, 1, 2, 3, 3, 3]
    assert d.token_ids.tolist() == [0, 1, 2, 0, 1, 2]
    sig = lambda v: 1 / (1 + math.exp(-v))
    expected = [sig(2.0), sig(3.0), sig(0.25), sig(1.0), sig(1.5), sig(0.0)]
    torch.testing.assert_close(d.weights, torch.tensor(expected))
    torch.testing.assert_close(d.scores, torch.sigmoid(LOGITS))


def test_softmax_gates_are_unnormalised_softmax_probs():
    d = identity_router(4, 2, score_fn="softmax")(LOGITS)
    probs = torch.softmax(LOGITS, -1)
    assert d.selected.tolist() == [[0, 3], [1, 3], [2, 3]]
    expected = torch.stack([probs[0, 0], probs[1, 1], probs[2, 2], probs[0, 3], probs[1, 3], probs[2, 3]])
    torch.testing.assert_close(d.weights, expected)


def test_normalised_and_scaled_gates():
    d = identity_router(4, 2, score_fn="sigmoid", normalize_weights=True, scaling_factor=2.5)(LOGITS)
    s = torch.sigmoid(LOGITS)
    t0 = 2.5 * torch.stack([s[0, 0], s[0, 3]]) / (s[0, 0] + s[0, 3])
    # assignments are sorted by expert: token 0's gates sit at positions 0 (expert 0), 3 (expert 3)
    torch.testing.assert_close(d.weights[[0, 3]], t0)
    # every token's gates sum to the scaling factor
    per_token = torch.zeros(3).index_add(0, d.token_ids, d.weights)
    torch.testing.assert_close(per_token, torch.full((3,), 2.5))


def test_group_limited_routing_hand_computed():
    # 8 experts in 4 groups of 2; keep the best 2 groups (by sum of the group's top-2 scores).
    logits = torch.tensor([[3.0, -5.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0]])
    router = identity_router(8, 2, score_fn="sigmoid", num_groups=4, topk_groups=2)
    d = router(logits)
    s = torch.sigmoid(logits[0])
    group_scores = [s[0] + s[1], s[2] + s[3], s[4] + s[5], s[6] + s[7]]
    # groups 1 and 2 win (1.46, 1.76) over group 0 (0.96) despite expert 0 being the best single one
    assert sorted(torch.stack(group_scores).topk(2).indices.tolist()) == [1, 2]
    assert sorted(d.selected[0].tolist()) == [4, 5]
    # without group limiting expert 0 would be chosen
    assert 0 in identity_router(8, 2, score_fn="sigmoid")(logits).selected[0].tolist()


def test_bias_changes_selection_only():
    router = identity_router(4, 2, score_fn="sigmoid")
    bias = torch.tensor([0.0, 0.0, 0.0, -10.0])  # push expert 3 out of every top-2
    d = router(LOGITS, bias)
    assert d.selected.tolist() == [[0, 2], [1, 0], [2, 1]]
    s = torch.sigmoid(LOGITS)
    # gates are the UNBIASED scores of the newly selected experts
    for t, experts in enumerate(d.selected.tolist()):
        for e in experts:
            i = ((d.token_ids == t) & (d.expert_ids == e)).nonzero().item()
            assert d.weights[i].item() == pytest.approx(s[t, e].item(), abs=0)
    torch.testing.assert_close(d.scores, s)  # scores themselves never see the bias


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_zero_bias_is_exactly_no_bias(score_fn):
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 3, RouterConfig(score_fn=score_fn))
    x = torch.randn(64, 16)
    a, b = router(x), router(x, torch.zeros(8))
    for name in ("token_ids", "expert_ids", "weights", "tokens_per_expert"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_capacity_formula():
    assert capacity(10, 4, 2, 1.0) == 5
    assert capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
    assert capacity(10, 4, 2, float("inf")) == 10


def test_capacity_drop_policies_hand_computed():
    # 4 tokens all prefer expert 0 (top-1), capacity = ceil(0.5 * 4 * 1 / 2) = 1.
    logits = torch.tensor([[0.5, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    by_position = identity_router(2, 1, capacity_factor=0.5, drop_policy="position")(logits)
    assert by_position.token_ids.tolist() == [0]  # the earliest token keeps its slot
    by_probs = identity_router(2, 1, capacity_factor=0.5, drop_policy="probs")(logits)
    assert by_probs.token_ids.tolist() == [3]  # the highest gate keeps its slot
    for d in (by_position, by_probs):
        assert d.routed_tokens_per_expert.tolist() == [4, 0]  # demand is counted before dropping
        assert d.tokens_per_expert.tolist() == [1, 0]
        assert d.num_dropped == 3


def test_infinite_capacity_equals_dropless_layer():
    torch.manual_seed(0)
    base = dict(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8)
    dropless = MoE(MoEConfig(**base))
    capped = MoE(MoEConfig(**base, router=RouterConfig(capacity_factor=float("inf"))))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 32, 16)
    a, b = dropless(x), capped(x)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    assert torch.equal(a.decision.tokens_per_expert, b.decision.tokens_per_expert)


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    base = dict(d_model=16, num_experts=4, top_k=1, expert_hidden_size=8)
    layer = MoE(MoEConfig(**base, router=RouterConfig(capacity_factor=0.25, drop_policy="position")))
    x = torch.randn(40, 16)
    out = layer(x)
    kept = torch.zeros(40, dtype=torch.bool)
    kept[out.decision.token_ids] = True
    assert (~kept).any()
    assert torch.all(out.y[~kept] == 0)  # dropped tokens get no routed output (residual only)
    assert out.decision.tokens_per_expert.max() <= capacity(40, 4, 1, 0.25)


def test_mask_excludes_padding_from_routing():
    router = identity_router(4, 2)
    mask = torch.tensor([True, False, True])
    d = router(LOGITS, token_mask_T=mask)
    assert 1 not in d.token_ids.tolist()
    assert d.routed_tokens_per_expert.tolist() == [1, 0, 1, 2]
    assert d.selected[1].tolist() == [-1, -1]


def test_logits_are_float32_for_bfloat16_models():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8)).to(torch.bfloat16)
    out = layer(torch.randn(4, 16, dtype=torch.bfloat16))
    assert out.decision.logits.dtype == torch.float32
    assert out.decision.scores.dtype == torch.float32
    assert out.decision.weights.dtype == torch.float32
    assert out.y.dtype == torch.bfloat16
    assert out.decision.tokens_per_expert.dtype == torch.int64


def test_logits_stay_float32_under_autocast():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8))
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.decision.logits.dtype == torch.float32
    torch.testing.assert_close(out.decision.logits, x @ layer.router.weight.detach().T, rtol=0, atol=1e-6)
    assert torch.equal(out.decision.selected, layer(x).decision.selected)


def test_non_finite_logits_raise_unless_disabled():
    router = identity_router(4, 2)
    bad = LOGITS.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        router(bad)
    unchecked = identity_router(4, 2, check_finite=False)
    assert unchecked(bad).selected.shape == (3, 2)
