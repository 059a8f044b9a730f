"""The adaptive Loss-Free controller and the multiplicative bias: hand-computed first steps,
causality, convergence on a drifting router, and the static-bias solver."""

import dataclasses

import pytest
import torch

from moe_balance import LossFree, MoE, MoEConfig, max_vio, update_balancers
from moe_balance.controller import (adaptive_gain, flip_margins, margin_edges, margin_histograms,
                                    newton_step, select_top_k, solve_static_bias)

SIG = torch.sigmoid


def identity_layer(spec, num_experts=3, top_k=1):
    """Router logits equal the input."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=num_experts, num_experts=num_experts, top_k=top_k,
                          expert_hidden_size=4, balancers=(spec,)))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts))
    return layer


def train_step(layer, x):
    out = layer(x)
    out.y.sum().backward()
    return out


# ------------------------------------------------------------------------------ pure functions

def test_flip_margins_hand_computed():
    selection = torch.tensor([[0.9, 0.7, 0.4, 0.1]])
    selected = select_top_k(selection, 2)
    assert selected.tolist() == [[True, True, False, False]]
    # selected: distance down to the best unselected (0.4); unselected: up to the worst selected (0.7)
    torch.testing.assert_close(flip_margins(selection, selected), torch.tensor([[0.5, 0.3, 0.3, 0.6]]))
    # multiplicative bias: d selection / d b_i = s_i, so the margins are divided by the scores
    scores = torch.tensor([[0.5, 0.25, 0.5, 0.2]])
    torch.testing.assert_close(flip_margins(selection, selected, slope_TE=scores),
                               torch.tensor([[1.0, 1.2, 0.6, 3.0]]))
    # top_k == E: nothing can ever flip; -inf (masked group) entries never flip either
    assert torch.isinf(flip_margins(selection, torch.ones_like(selected))).all()
    masked = torch.tensor([[0.9, float("-inf"), 0.4, 0.1]])
    m = flip_margins(masked, select_top_k(masked, 1))
    assert torch.isinf(m[0, 1]) and m[0, 0] == pytest.approx(0.5)


def test_margin_histograms_count_each_side_in_its_bins():
    edges = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    margins = torch.tensor([[0.05, 0.15], [0.3, 0.5], [0.08, 0.0]])
    selected = torch.tensor([[True, False], [False, True], [True, False]])
    hist = margin_histograms(margins, selected, edges)
    assert hist.shape == (2, 2, 3)
    # unselected (join when the bias rises): expert 0 has 0.3; expert 1 has 0.15 and 0.0
    assert hist[0].tolist() == [[0, 0, 1], [1, 1, 0]]
    # selected (leave when the bias falls): expert 0 has 0.05 and 0.08 (bins are (lo, hi]
    # with [0, edge_0] first); expert 1 has 0.5, beyond the last edge, so it is not counted
    assert hist[1].tolist() == [[2, 0, 0], [0, 0, 0]]


def test_newton_step_hand_computed():
    edges = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)  # bins [0,.1] (.1,.2] (.2,.4]
    counts = torch.tensor([6, 2, 2, 2])  # mean 3: need = 0.5 * (3 - c) = (-1.5, .5, .5, .5)
    hist = torch.zeros(2, 4, 3, dtype=torch.int64)
    hist[1, 0] = torch.tensor([1, 2, 0])  # expert 0 sheds 1.5 tokens: 1 in bin 0, 0.5 of 2 in bin 1
    hist[0, 1] = torch.tensor([0, 0, 1])  # expert 1 gains 0.5 of the one token in bin 2
    hist[0, 3] = torch.tensor([4, 0, 0])  # expert 3 gains 0.5 of 4 tokens in bin 0
    step = newton_step(counts, hist, edges, gain=0.5, max_step=0.4)
    expected = torch.tensor([-(0.1 + 0.25 * 0.1), 0.2 + 0.5 * 0.2,
                             0.4,  # expert 2: no token within reach, so the capped step
                             0.125 * 0.1], dtype=torch.float64)
    torch.testing.assert_close(step, expected)
    # balanced loads: no step at all
    assert torch.equal(newton_step(torch.tensor([3, 3, 3, 3]), hist, edges, 0.5, 0.4),
                       torch.zeros(4, dtype=torch.float64))


def test_adaptive_gain_is_high_for_persistent_and_low_for_flipping_innovations():
    m, v = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    kw = dict(smoothing=0.5, min_gain=0.05, max_gain=1.0)
    # first update: bias-corrected mean = x, square = x^2, so the signal-to-noise ratio is 1
    g = adaptive_gain(torch.tensor([1.0, 1.0], dtype=torch.float64), m, v, 1, **kw)
    torch.testing.assert_close(g, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # second: expert 0 repeats (+1), expert 1 flips (-1): m = (0.75, -0.25), v = (0.75, 0.75),
    # correction 1 - 0.25 -> m^2 / v = 1 and (1/3)^2 / 1 = 1/9
    g = adaptive_gain(torch.tensor([1.0, -1.0], dtype=torch.float64), m, v, 2, **kw)
    torch.testing.assert_close(g, torch.tensor([1.0, 1 / 9], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([0.75, -0.25], dtype=torch.float64))
    # clipped to [min_gain, max_gain]; all-zero innovations are a full-gain no-op, not a NaN
    z, zz = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    g = adaptive_gain(torch.zeros(1, dtype=torch.float64), z, zz, 1, smoothing=0.5, min_gain=0.1, max_gain=0.5)
    assert g.item() == 0.5
    # alternating noise: m settles at +/-(1 - 0.9) / (1 + 0.9), m^2 / v = 0.0028: the floor
    for t, sign in enumerate((1.0, -1.0) * 50):
        g = adaptive_gain(torch.tensor([sign], dtype=torch.float64), z, zz, t + 2, smoothing=0.9,
                          min_gain=0.1, max_gain=0.5)
    assert g.item() == pytest.approx(0.1)


# ------------------------------------------------------------------------------ through the layer

def test_adaptive_first_update_hand_computed():
    spec = LossFree(rule="adaptive", max_step=1.0, max_gain=0.5)
    layer = identity_layer(spec)
    x = torch.tensor([[2.0, 1, 0], [2, 0, 1], [1, 2, 0], [3, 0, 0]])
    out = train_step(layer, x)
    assert out.decision.routed_tokens_per_expert.tolist() == [3, 1, 0]  # mean 4/3
    # Each expert's innovation is the bias change that would move c̄ - c_i = (-5/3, 1/3, 4/3)
    # tokens across its threshold. Margins (sigmoid differences): m1 = s(2) - s(1) and
    # m2 = s(2) - s(0). Expert 0 sheds: tokens 0 and 1 at m1 (then token 3 further away).
    # Expert 1 gains: token 0 at m1. Expert 2 gains: token 1 at m1, then tokens 0 and 2 at m2.
    m1 = (SIG(torch.tensor(2.0)) - SIG(torch.tensor(1.0))).double()
    m2 = (SIG(torch.tensor(2.0)) - SIG(torch.tensor(0.0))).double()
    edges = margin_edges(1.0)

    def bin_of(m):
        b = int(torch.searchsorted(edges, m))
        return edges[b - 1], edges[b]

    (lo1, hi1), (lo2, hi2) = bin_of(m1), bin_of(m2)
    assert hi1 < lo2 + 1e-12  # m1 and m2 fall in different bins
    innovation = torch.stack([-(lo1 + (5 / 3) / 2 * (hi1 - lo1)),   # 5/3 of the 2 tokens in m1's bin
                              lo1 + (1 / 3) * (hi1 - lo1),           # 1/3 of the 1 token there
                              lo2 + (4 / 3 - 1) / 2 * (hi2 - lo2)])  # 1 in m1's bin, 1/3 of 2 in m2's
    # first update: the gain is max_gain (the innovations have no history yet), then the
    # common mode is removed (only relative biases matter)
    steps = 0.5 * innovation
    expected = steps - steps.mean()
    assert layer.balancers[0].pending_margins.sum().item() == 3 * 4  # every (token, expert) within reach
    update_balancers(layer)
    torch.testing.assert_close(layer.expert_bias, expected.float())
    assert layer.balancers[0].pending_margins.sum().item() == 0  # reset with the counts
    torch.testing.assert_close(layer.balancers[0].innovation_mean, (1 - spec.smoothing) * innovation)  # EMA from 0


@pytest.mark.parametrize("rule", ["adaptive", "sign"])
def test_start_after_steps_holds_the_bias_then_starts_fresh(rule):
    """The held updates leave the bias at its start value and drop their counts (and margins);
    the first real update is then exactly a fresh controller's first update on its step, with
    the adaptive gain's history starting there (its EMA correction counts from 1)."""
    x_held = torch.tensor([[3.0, 0, 0]] * 4)  # every token to expert 0: a collapse
    x = torch.tensor([[2.0, 1, 0], [2, 0, 1], [1, 2, 0], [3, 0, 0]])
    spec = LossFree(rule=rule, update_rate=0.1, max_step=1.0, max_gain=0.5)
    held = identity_layer(dataclasses.replace(spec, start_after_steps=2))
    fresh = identity_layer(spec)
    for _ in range(2):
        train_step(held, x_held)
        update_balancers(held)
        assert held.expert_bias.tolist() == [0.0, 0.0, 0.0]
        assert held.balancers[0].pending_counts.sum() == 0
    assert int(held.balancers[0].num_updates) == 2
    train_step(held, x)
    train_step(fresh, x)
    update_balancers(held)
    update_balancers(fresh)
    assert held.expert_bias.abs().sum() > 0
    torch.testing.assert_close(held.expert_bias, fresh.expert_bias, rtol=0, atol=0)
    if rule == "adaptive":
        for name in ("innovation_mean", "innovation_square"):
            torch.testing.assert_close(getattr(held.balancers[0], name), getattr(fresh.balancers[0], name),
                                       rtol=0, atol=0)
    # and the second real update too: the gain's bias correction counts from the first real one
    train_step(held, x_held)
    train_step(fresh, x_held)
    update_balancers(held)
    update_balancers(fresh)
    torch.testing.assert_close(held.expert_bias, fresh.expert_bias, rtol=0, atol=0)


def test_trust_error_gives_full_steps_to_an_expert_that_just_became_overloaded():
    """After an update in which expert 0 was under-loaded, a batch that overloads it: its
    innovation flips sign, so the noise gain is small, but its load error (2.0) is far above
    trust_error (0.5), so it takes min(max_gain, 2.0 - 0.5) = max_gain of the Newton step."""
    spec = LossFree(rule="adaptive", max_step=1.0)
    layer = identity_layer(spec)
    train_step(layer, torch.tensor([[0.0, 2, 1], [0, 1, 2], [0, 2, 1]]))  # expert 0 gets nothing
    update_balancers(layer)
    balancer = layer.balancers[0]
    assert balancer.innovation_mean[0] > 0  # it was pushed up
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    train_step(layer, torch.tensor([[3.0, 0, 0], [3, 1, 0], [3, 0, 1]]))  # now it gets everything
    counts = balancer.pending_counts.clone()
    assert counts.tolist() == [3, 0, 0]
    innovation = newton_step(counts, balancer.pending_margins, balancer.margin_edges, 1.0, spec.max_step)
    noise_gain = adaptive_gain(innovation, state["innovation_mean"].clone(), state["innovation_square"].clone(),
                               2, smoothing=spec.smoothing, min_gain=spec.min_gain, max_gain=spec.max_gain)
    assert innovation[0] < 0 and noise_gain[0] < 0.3  # the history says "noise"
    error = (counts.double() - 1).abs()  # |c_i - c̄| / c̄ with c̄ = 1: (2, 1, 1)
    gain = torch.maximum(noise_gain, (error - spec.trust_error).clamp(0, spec.max_gain))
    assert gain.tolist() == pytest.approx([1.0, max(0.5, noise_gain[1].item()), max(0.5, noise_gain[2].item())])
    step = gain * innovation
    before = balancer.expert_bias.clone()
    update_balancers(layer)
    torch.testing.assert_close(balancer.expert_bias - before, (step - step.mean()).float())


def test_multiplicative_bias_selects_on_score_times_bias():
    layer = identity_layer(LossFree(update_rate=0.1, form="multiplicative"), num_experts=4)
    assert layer.expert_bias.tolist() == [1.0, 1.0, 1.0, 1.0]
    x = torch.tensor([[3.0, 0, 0, 0]] * 3 + [[0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    train_step(layer, x)
    update_balancers(layer)  # counts (3, 1, 1, 0), mean 1.25: sign rule on a bias starting at 1
    torch.testing.assert_close(layer.expert_bias, torch.tensor([0.9, 1.1, 1.1, 1.1]))
    # sigmoid(0.1) * 0.9 = 0.472 < sigmoid(0.05) * 1.1 = 0.564: expert 1 wins, gated unbiased
    out = layer(torch.tensor([[0.1, 0.05, -1.0, -1.0]]))
    assert out.decision.expert_ids.tolist() == [1]
    torch.testing.assert_close(out.decision.weights, SIG(torch.tensor([0.05])))
    # a confident token keeps its expert: sigmoid(3) * 0.9 = 0.857 > 0.5 * 1.1
    assert layer(torch.tensor([[3.0, 0, 0, 0]])).decision.expert_ids.tolist() == [0]


def test_multiplicative_bias_stays_positive_and_centres_by_division():
    layer = identity_layer(LossFree(update_rate=2.0, form="multiplicative"), num_experts=4)
    x = torch.tensor([[3.0, 0, 0, 0]] * 3 + [[0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    train_step(layer, x)
    update_balancers(layer)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([1e-3, 3.0, 3.0, 3.0]))
    centred = identity_layer(LossFree(update_rate=0.1, form="multiplicative", center=True), num_experts=4)
    train_step(centred, x)
    update_balancers(centred)
    torch.testing.assert_close(centred.expert_bias, torch.tensor([0.9, 1.1, 1.1, 1.1]) / 1.05)


@pytest.mark.parametrize("spec", [LossFree(rule="adaptive"), LossFree(rule="adaptive", form="multiplicative")])
def test_routing_of_a_token_never_depends_on_later_tokens(spec):
    """The bias for a batch comes from earlier steps only: routing a prefix alone gives the
    same experts as routing it inside the whole batch, before and after updates."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=8, num_experts=8, top_k=2, expert_hidden_size=4, balancers=(spec,)))
    for _ in range(3):
        x = torch.randn(64, 8) + 1.0
        full = train_step(layer, x)
        prefix = layer(x[:16])
        torch.testing.assert_close(full.decision.selected[:16], prefix.decision.selected)
        update_balancers(layer)
    assert layer.balancers[0].num_updates.item() == 3


def test_adaptive_state_dict_round_trip():
    spec = LossFree(rule="adaptive")
    layer = identity_layer(spec, num_experts=4)
    x = torch.randn(32, 4) + torch.tensor([1.0, 0, 0, 0])
    for _ in range(3):
        train_step(layer, x)
        update_balancers(layer)
    train_step(layer, x)  # pending counts and margins mid-step
    state = layer.state_dict()
    assert {k for k in state if "balancers" in k} == {
        "balancers.0.expert_bias", "balancers.0.pending_counts", "balancers.0.num_updates",
        "balancers.0.pending_margins", "balancers.0.innovation_mean", "balancers.0.innovation_square"}
    restored = identity_layer(spec, num_experts=4)
    restored.load_state_dict(state)
    update_balancers(layer)
    update_balancers(restored)
    assert torch.equal(restored.expert_bias, layer.expert_bias)
    assert torch.equal(restored.balancers[0].innovation_square, layer.balancers[0].innovation_square)


def test_margin_edges_survive_dtype_casts():
    layer = identity_layer(LossFree(rule="adaptive"))
    edges = layer.balancers[0].margin_edges.clone()
    layer.to(torch.bfloat16)
    assert layer.balancers[0].margin_edges.dtype == torch.float64
    assert torch.equal(layer.balancers[0].margin_edges, edges)


# ------------------------------------------------------------------------------ convergence

def drifting_router(spec, steps=120, seed=0, tokens=4096, num_experts=16, drift=0.001):
    """MaxVio_batch per update of a layer whose router starts strongly skewed (3 experts
    aligned with the inputs' mean: MaxVio > 4 without balancing) and keeps drifting toward
    them (a stand-in for learning: the hot experts' logits rise by ~4e-3 per step, their
    scores by ~1e-3). With 4096 tokens, sampling noise alone gives MaxVio ~0.09."""
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(d_model=16, num_experts=num_experts, top_k=2, expert_hidden_size=4,
                          balancers=(spec,)))
    g = torch.Generator().manual_seed(seed + 100)
    skew = torch.randn(16, generator=g)
    direction = skew / skew.norm()
    with torch.no_grad():
        layer.router.weight[:3] += 0.5 * direction
    vios = []
    for _ in range(steps):
        out = train_step(layer, torch.randn(tokens, 16, generator=g) + skew)
        vios.append(float(max_vio(out.decision.routed_tokens_per_expert)))
        update_balancers(layer)
        with torch.no_grad():
            layer.router.weight[:3] += drift * direction
            layer.router.weight[3:6] -= drift * direction
    return vios


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_balances_a_drifting_router_where_the_sign_rule_cannot(seed):
    # Measured over seeds 0-2 (120 updates): adaptive first reaches <= 0.2 by update 20-30,
    # stays <= 0.26 from update 50 on and averages 0.10-0.11 over the last 20 (the noise floor
    # is 0.09); excursions to 0.2-0.25 around updates 50-75 are its lag behind the constant
    # drift. The sign rule at u = 1e-3 stays above 4: the bias it can build in 120 steps
    # (0.12) is far below the skew it must undo.
    adaptive = drifting_router(LossFree(rule="adaptive"), seed=seed)
    assert adaptive[0] > 4
    assert min(adaptive[:50]) <= 0.2
    assert max(adaptive[50:]) <= 0.3
    assert sum(adaptive[-20:]) / 20 <= 0.13
    sign = drifting_router(LossFree(update_rate=1e-3), seed=seed)
    assert min(sign[50:]) > 2


def test_static_bias_solver_reaches_the_floor_of_skewed_scores():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8192, 16, generator=g) + torch.linspace(-2, 2, 16)  # strong preference
    scores = torch.sigmoid(logits)
    assert max_vio(select_top_k(scores, 2).sum(0)).item() > 2
    for multiplicative in (False, True):
        bias, vio = solve_static_bias(scores, 2, multiplicative=multiplicative)
        selection = scores * bias if multiplicative else scores + bias
        assert max_vio(select_top_k(selection, 2).sum(0)).item() == pytest.approx(vio)
        assert vio < 0.02
