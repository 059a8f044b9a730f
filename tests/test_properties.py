"""Property-based tests (hypothesis): routing, dispatch and the MoE layer on random tiny cases.

Every property is checked against a reference computed independently of the library, in
numpy float64 or plain Python, from the inputs and the ``RoutingDecision``: the permutation
round trip, the counts, dropless and capacity semantics, the router's choices (distinct, in
range, group-limited, truly top-K), the gates, finiteness and bit-exact determinism.

Inputs are drawn from a seed (torch.Generator), not element by element: tensors of up to
64 x 16 would make hypothesis slow, and the interesting structure (ties, skew, padding,
groups, capacity) is in the drawn configuration. "Quantized" cases use integer inputs and
router weights, so many logits tie exactly: ties are where top-K and stable sorting break.
"""

import dataclasses
import functools
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moe_balance import LossFree, MoE, MoEConfig, RouterConfig
from moe_balance.balancing import LossFreeBalancer
from moe_balance.config import DROP_POLICIES, LOSS_FREE_FORMS, LOSS_FREE_RULES, SCORE_FNS
from moe_balance.dispatch import permute, unpermute
from moe_balance.experts import grouped_mm_supported
from moe_balance.routing import RoutingDecision, TopKRouter, capacity

# MOE_PROPERTY_EXAMPLES=1000 searches deeper locally; the suite default keeps the file fast.
# No example database: nothing is written into the repository.
PROPERTY = settings(max_examples=int(os.environ.get("MOE_PROPERTY_EXAMPLES", 30)), deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# The token-choice top-K router (with its group-limited variant), whose invariants these are;
# the other routers' invariants (ragged selections) are property-tested in test_routers.py.
ROUTERS = [TopKRouter]
EXPERT_IMPLS = ["loop", "bmm"] + (["grouped_mm"] if grouped_mm_supported("cpu", torch.float32) else [])


def test_impl_choices_are_discovered():
    assert set(EXPERT_IMPLS) >= {"loop", "bmm"}


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    D: int
    E: int
    K: int
    router_cls: type
    config: RouterConfig
    seed: int
    weight_scale: float
    quantized: bool       # integer inputs and weights: exact ties
    mask_mode: str | None  # None, "random", "prefix", "all_padding"
    bias_mode: str | None  # None, "additive", "multiplicative"


capacity_factors = st.one_of(
    st.none(), st.just(float("inf")),
    st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.25, 2.0]),
    st.floats(min_value=0.01, max_value=4.0, allow_nan=False, allow_infinity=False))


@st.composite
def router_configs(draw, E, K):
    grouped = draw(st.booleans())
    num_groups = topk_groups = None
    if grouped:
        num_groups = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
        per_group = E // num_groups
        topk_groups = draw(st.integers(math.ceil(K / per_group), num_groups))
    return RouterConfig(
        score_fn=draw(st.sampled_from(SCORE_FNS)),
        normalize_weights=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.3])),
        num_groups=num_groups, topk_groups=topk_groups,
        capacity_factor=draw(capacity_factors),
        drop_policy=draw(st.sampled_from(DROP_POLICIES)))


@st.composite
def cases(draw, max_tokens=64):
    E = draw(st.integers(1, 16))
    K = draw(st.integers(1, E))
    return Case(
        T=draw(st.integers(0, max_tokens)),  # 0 and 1 also come from EDGE_CASES
        D=draw(st.integers(1, 16)), E=E, K=K,
        router_cls=draw(st.sampled_from(ROUTERS)),
        config=draw(router_configs(E, K)),
        seed=draw(st.integers(0, 2**31 - 1)),
        weight_scale=draw(st.sampled_from([0.02, 0.5, 3.0])),
        quantized=draw(st.booleans()),
        mask_mode=draw(st.sampled_from([None, None, "random", "random", "prefix", "all_padding"])),
        bias_mode=draw(st.sampled_from([None, "additive", "multiplicative"])))


def _case(T, E, K, seed=0, **kw):
    config = RouterConfig(**{k: kw.pop(k) for k in list(kw) if k in RouterConfig.__dataclass_fields__})
    defaults = dict(D=8, router_cls=TopKRouter, weight_scale=0.5, quantized=False, mask_mode=None,
                    bias_mode=None)
    return Case(T=T, E=E, K=K, config=config, seed=seed, **{**defaults, **kw})


# Always run, whatever hypothesis draws: the boundaries (no token, one token, nothing but
# padding, every expert chosen) and a tie-heavy grouped case with capacity.
EDGE_CASES = [
    _case(0, 4, 2, num_groups=2, topk_groups=1, capacity_factor=1.0),
    _case(0, 3, 1, mask_mode="all_padding", bias_mode="additive"),
    _case(1, 1, 1, D=1, normalize_weights=True, capacity_factor=float("inf")),
    _case(1, 16, 16, num_groups=4, topk_groups=4, score_fn="softmax", normalize_weights=True,
          scaling_factor=2.5, bias_mode="multiplicative"),
    _case(8, 4, 2, mask_mode="all_padding", capacity_factor=0.5),
    _case(33, 8, 3, seed=3, quantized=True, num_groups=4, topk_groups=2, capacity_factor=0.5,
          mask_mode="random"),
    _case(40, 8, 3, seed=4, quantized=True, capacity_factor=0.75, drop_policy="position",
          mask_mode="prefix", bias_mode="additive"),
    _case(20, 6, 2, seed=5, num_groups=6, topk_groups=2, weight_scale=3.0, bias_mode="additive"),
]


def with_edge_cases(test, keep=lambda case: True):
    for edge in reversed(EDGE_CASES):
        if keep(edge):
            test = example(edge)(test)
    return test


def has_finite_capacity(case):
    return case.config.capacity_factor is not None and not math.isinf(case.config.capacity_factor)


def _fill_router(router, case, g):
    """Random (or integer, for ties) router parameters, drawn from g."""
    with torch.no_grad():
        for p in router.parameters():
            if case.quantized:
                p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * case.weight_scale)


def make_inputs(case):
    """(x (T, D), mask (T,) bool or None, bias (E,) or None, multiplicative), from the seed."""
    g = torch.Generator().manual_seed(case.seed)
    if case.quantized:
        x = torch.randint(-2, 3, (case.T, case.D), generator=g).float()
    else:
        x = torch.randn(case.T, case.D, generator=g) + torch.randn(case.D, generator=g)  # skewed
    mask = None
    if case.mask_mode == "random":
        mask = torch.rand(case.T, generator=g) < 0.7
    elif case.mask_mode == "prefix":  # left padding
        mask = torch.arange(case.T) >= case.T // 3
    elif case.mask_mode == "all_padding":
        mask = torch.zeros(case.T, dtype=torch.bool)
    bias = None
    if case.bias_mode == "additive":
        bias = (torch.rand(case.E, generator=g) - 0.5) * 0.4
    elif case.bias_mode == "multiplicative":
        bias = 0.5 + torch.rand(case.E, generator=g)
    return x, mask, bias, case.bias_mode == "multiplicative", g


def make_router(case):
    x, mask, bias, mult, g = make_inputs(case)
    router = case.router_cls(case.D, case.E, case.K, case.config)
    _fill_router(router, case, g)
    return router, x, mask, bias, mult


def route(case):
    router, x, mask, bias, mult = make_router(case)
    with torch.no_grad():
        decision = router(x, bias, mask, mult)
    return router, x, mask, bias, mult, decision


# --------------------------------------------------------------------------------------------
# Reference computations (numpy / Python, independent of the library's code paths)
# --------------------------------------------------------------------------------------------

def valid_tokens(mask, T):
    return np.ones(T, dtype=bool) if mask is None else mask.numpy().astype(bool)


def reference_capacity(cf, num_valid, K, E):
    """ceil(cf * T * K / E) in exact rational arithmetic (None: no capacity)."""
    if cf is None:
        return None
    if math.isinf(cf):
        return num_valid
    return math.ceil(Fraction(cf) * num_valid * K / E)


def kept_pairs(d):
    return list(zip(d.token_ids.tolist(), d.expert_ids.tolist()))


def reference_weights(d, config):
    """(T, E) float64 gate each (token, selected expert) should get: the unbiased score,
    divided by the sum over the token's K selected experts when normalising, times the
    scaling factor. NaN where not selected."""
    s = d.scores.double().numpy()
    sel = d.selected.numpy()
    T, E = s.shape
    w = np.full((T, E), np.nan)
    for t in range(T):
        if sel[t, 0] < 0:
            continue
        denom = max(s[t, sel[t]].sum(), 1e-20) if config.normalize_weights else 1.0
        w[t, sel[t]] = s[t, sel[t]] / denom * config.scaling_factor
    return w


def group_scores(sel_TE, num_groups):
    """(T, G) float64: sum of each group's top-2 selection scores (top-1 for singletons)."""
    T, E = sel_TE.shape
    per = E // num_groups
    grouped = np.sort(sel_TE.reshape(T, num_groups, per), axis=-1)[..., ::-1]
    return grouped[..., :min(2, per)].sum(-1)


# --------------------------------------------------------------------------------------------
# Router properties
# --------------------------------------------------------------------------------------------

@PROPERTY
@given(cases())
@with_edge_cases
def test_router_choices_are_distinct_in_range_group_limited_and_top_k(case):
    router, x, mask, bias, mult, d = route(case)
    T, E, K, cfg = case.T, case.E, case.K, case.config
    valid = valid_tokens(mask, T)
    assert d.selected.shape == (T, K) and d.selected.dtype == torch.int64
    sel = d.selected.numpy()
    assert (sel[~valid] == -1).all(), "padding tokens must be marked -1"

    # logits and scores: x . W^T in float32, then sigmoid / softmax, unbiased
    W = router.weight.detach().double().numpy()
    logits = x.double().numpy() @ W.T
    np.testing.assert_allclose(d.logits.double().numpy(), logits, rtol=1e-5, atol=1e-4)
    z = d.logits.double().numpy()
    if cfg.score_fn == "sigmoid":
        scores = 1 / (1 + np.exp(-z))
    else:
        ez = np.exp(z - z.max(-1, keepdims=True, initial=-np.inf))
        scores = ez / ez.sum(-1, keepdims=True)
    np.testing.assert_allclose(d.scores.double().numpy(), scores, rtol=1e-5, atol=1e-6)

    # the values top-K was taken on: the router's own float32 scores with the bias applied
    s32 = d.scores
    if bias is None:
        selection = s32
    else:
        selection = s32 * bias if mult else s32 + bias
    selection = selection.double().numpy()
    for t in np.flatnonzero(valid):
        chosen = sel[t].tolist()
        assert all(0 <= e < E for e in chosen), (t, chosen)
        assert len(set(chosen)) == K, f"token {t} chose an expert twice: {chosen}"
        unchosen = [e for e in range(E) if e not in chosen]
        worst_chosen = selection[t, chosen].min()
        if cfg.num_groups is None:
            if unchosen:
                assert selection[t, unchosen].max() <= worst_chosen, (t, chosen, selection[t])
            continue
        per = E // cfg.num_groups
        gs = group_scores(selection[t:t + 1], cfg.num_groups)[0]
        threshold = np.sort(gs)[::-1][cfg.topk_groups - 1]  # the topk_groups-th best group score
        chosen_groups = {e // per for e in chosen}
        assert len(chosen_groups) <= cfg.topk_groups, (t, chosen, cfg)
        for grp in chosen_groups:
            assert gs[grp] >= threshold - 1e-6, f"token {t} used group {grp} outside its best groups"
        # top-K within the eligible experts: every unchosen expert of a group that was kept
        # (it holds a chosen expert, or it strictly beats the threshold) scores no higher
        for e in unchosen:
            if e // per in chosen_groups or gs[e // per] > threshold + 1e-6:
                assert selection[t, e] <= worst_chosen, (t, e, chosen)


@PROPERTY
@given(cases())
@with_edge_cases
def test_gates_are_unbiased_scores_normalised_and_scaled(case):
    router, x, mask, bias, mult, d = route(case)
    cfg = case.config
    assert d.weights.dtype == torch.float32
    expected = reference_weights(d, cfg)
    pairs = kept_pairs(d)
    got = d.weights.double().numpy()
    for a, (t, e) in enumerate(pairs):
        assert not np.isnan(expected[t, e]), f"kept assignment ({t}, {e}) was not selected"
        assert got[a] == pytest.approx(expected[t, e], rel=1e-5, abs=1e-12), (t, e)
    valid = valid_tokens(mask, case.T)
    dropless = cfg.capacity_factor is None or math.isinf(cfg.capacity_factor)
    if cfg.normalize_weights and dropless:
        per_token = np.zeros(case.T)
        np.add.at(per_token, d.token_ids.numpy(), got)
        s = d.scores.double().numpy()
        for t in np.flatnonzero(valid):
            if s[t, d.selected[t].numpy()].sum() >= 1e-6:  # below 1e-20 the sum is clamped
                assert per_token[t] == pytest.approx(cfg.scaling_factor, rel=1e-5), t


@PROPERTY
@given(cases())
@with_edge_cases
def test_counts_match_bincounts_and_padding_is_never_counted(case):
    router, x, mask, bias, mult, d = route(case)
    T, E, K = case.T, case.E, case.K
    valid = valid_tokens(mask, T)
    A = d.token_ids.numel()
    assert d.token_ids.shape == d.expert_ids.shape == d.weights.shape == (A,)
    assert d.tokens_per_expert.dtype == d.routed_tokens_per_expert.dtype == torch.int64
    kept = d.tokens_per_expert.numpy()
    routed = d.routed_tokens_per_expert.numpy()
    assert kept.shape == routed.shape == (E,)
    # kept counts: one per kept assignment, by expert
    assert kept.sum() == A
    np.testing.assert_array_equal(kept, np.bincount(d.expert_ids.numpy(), minlength=E))
    # routed (demand) counts: every valid token's K choices, before capacity
    np.testing.assert_array_equal(routed, np.bincount(d.selected.numpy()[valid].reshape(-1), minlength=E))
    assert routed.sum() == valid.sum() * K
    assert (kept <= routed).all()
    assert d.num_dropped == routed.sum() - kept.sum()
    # padding tokens are never routed; kept pairs are distinct (token, chosen expert) pairs
    pairs = kept_pairs(d)
    assert len(set(pairs)) == len(pairs)
    sel = d.selected.numpy()
    for t, e in pairs:
        assert valid[t], f"padding token {t} was routed"
        assert e in sel[t]
    # sorted by expert, so each expert's rows are one contiguous block
    assert (np.diff(d.expert_ids.numpy()) >= 0).all()


@PROPERTY
@given(cases())
@with_edge_cases
def test_dropless_keeps_every_assignment_and_capacity_is_never_exceeded(case):
    router, x, mask, bias, mult, d = route(case)
    cf = case.config.capacity_factor
    valid = valid_tokens(mask, case.T)
    num_valid = int(valid.sum())
    kept = d.tokens_per_expert.numpy()
    routed = d.routed_tokens_per_expert.numpy()
    if cf is None or math.isinf(cf):
        assert d.token_ids.numel() == num_valid * case.K
        assert d.num_dropped == 0
        np.testing.assert_array_equal(kept, routed)
        sel = d.selected.numpy()
        assert set(kept_pairs(d)) == {(t, int(e)) for t in np.flatnonzero(valid) for e in sel[t]}
        return
    cap = reference_capacity(cf, num_valid, case.K, case.E)
    lib_cap = capacity(num_valid, case.E, case.K, cf)
    exact = Fraction(cf) * num_valid * case.K / case.E
    # float rounding may move ceil by one only when cf*T*K/E is within rounding of an integer
    assert lib_cap == cap or (abs(exact - round(exact)) < Fraction(1, 10**9) and abs(lib_cap - cap) == 1)
    assert kept.max(initial=0) <= lib_cap
    np.testing.assert_array_equal(kept, np.minimum(routed, lib_cap))


@PROPERTY
@given(cases().filter(has_finite_capacity))
@functools.partial(with_edge_cases, keep=has_finite_capacity)
def test_capacity_keeps_what_the_drop_policy_says(case):
    """"position": each expert keeps its earliest tokens; "probs": its highest gates. Within an
    expert the kept rows are in that order."""
    router, x, mask, bias, mult, d = route(case)
    cap = capacity(int(valid_tokens(mask, case.T).sum()), case.E, case.K, case.config.capacity_factor)
    sel = d.selected.numpy()
    w = reference_weights(d, case.config)
    token_ids, expert_ids, weights = d.token_ids.numpy(), d.expert_ids.numpy(), d.weights.numpy()
    for e in range(case.E):
        candidates = [t for t in range(case.T) if e in sel[t]]  # valid tokens that chose e, by position
        block = expert_ids == e
        kept_tokens = token_ids[block].tolist()
        assert len(kept_tokens) == min(len(candidates), cap)
        if case.config.drop_policy == "position":
            assert kept_tokens == candidates[:cap]
        else:
            assert (np.diff(weights[block]) <= 0).all(), "kept rows not in descending gate order"
            dropped = [t for t in candidates if t not in kept_tokens]
            if kept_tokens and dropped:
                assert min(w[t, e] for t in kept_tokens) >= max(w[t, e] for t in dropped) - 1e-6


@PROPERTY
@given(cases())
@with_edge_cases
def test_padding_does_not_change_the_routing_of_real_tokens(case):
    """Dropless routing of the valid tokens alone equals their routing inside a padded batch."""
    case = dataclasses.replace(case, config=dataclasses.replace(case.config, capacity_factor=None))
    router, x, mask, bias, mult, d = route(case)
    valid = torch.from_numpy(valid_tokens(mask, case.T))
    with torch.no_grad():
        alone = router(x[valid], bias, None, mult)
    # NOTE: a matmul over a different number of rows may round differently (measured: a few
    # ulps), so a token whose top-K (or top groups) is within rounding of a tie may flip.
    torch.testing.assert_close(alone.logits, d.logits[valid], rtol=1e-5, atol=1e-5)
    selection_t = router.selection(d.scores, bias, mult)[valid]
    same_row = (router.selection(alone.scores, bias, mult) == selection_t).all(-1).numpy()
    selection = selection_t.double().numpy()
    gaps = np.full(len(selection), np.inf)
    if case.K < case.E:
        ordered = -np.sort(-selection, axis=-1)
        gaps = np.minimum(gaps, ordered[:, case.K - 1] - ordered[:, case.K])
    cfg = case.config
    if cfg.num_groups is not None and cfg.topk_groups < cfg.num_groups:
        unmasked = (d.scores * bias if mult else d.scores + bias) if bias is not None else d.scores
        ordered = -np.sort(-group_scores(unmasked[valid].double().numpy(), cfg.num_groups), axis=-1)
        gaps = np.minimum(gaps, ordered[:, cfg.topk_groups - 1] - ordered[:, cfg.topk_groups])
    comparable = same_row | (gaps > 1e-4)
    # same choices as a set per token (the order inside a token's K may differ on exact ties)
    a, b = alone.selected.numpy()[comparable], d.selected.numpy()[valid.numpy()][comparable]
    assert [sorted(r) for r in a.tolist()] == [sorted(r) for r in b.tolist()]
    if case.weight_scale < 1 and len(comparable) >= 16:  # saturated sigmoids tie far more often
        assert comparable.mean() >= 0.5, "too few tokens clear of a tie: the check is vacuous"
    if comparable.all():
        np.testing.assert_array_equal(alone.routed_tokens_per_expert.numpy(),
                                      d.routed_tokens_per_expert.numpy())


# --------------------------------------------------------------------------------------------
# Dispatch: permute / unpermute
# --------------------------------------------------------------------------------------------

@PROPERTY
@given(cases())
@with_edge_cases
def test_permute_then_unpermute_is_the_identity_on_kept_assignments(case):
    router, x, mask, bias, mult, d = route(case)
    T = case.T
    x_np = x.double().numpy()
    pairs = kept_pairs(d)
    # permute: row a is the input row of assignment a
    permuted = permute(x, d)
    assert permuted.shape == (len(pairs), case.D)
    for a, (t, e) in enumerate(pairs):
        assert np.array_equal(permuted[a].numpy(), x[t].numpy())
    # unit gates, identity experts: each token comes back once per kept assignment
    unit = dataclasses.replace(d, weights=torch.ones_like(d.weights))
    out = unpermute(permute(x, unit), unit, T)
    times_kept = np.zeros(T)
    for t, _ in pairs:
        times_kept[t] += 1
    expected = times_kept[:, None] * x_np
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    if not has_finite_capacity(case):  # dropless: every valid token exactly K times
        valid = valid_tokens(mask, T)
        np.testing.assert_array_equal(times_kept, np.where(valid, case.K, 0))
    # real gates: sum of the token's kept gates times its row; tokens with nothing kept get 0
    out = unpermute(permute(x, d), d, T)
    gate_sum = np.zeros(T)
    for a, (t, _) in enumerate(pairs):
        gate_sum[t] += float(d.weights[a])
    np.testing.assert_allclose(out.double().numpy(), gate_sum[:, None] * x_np, rtol=1e-5, atol=1e-6)
    assert out.dtype == x.dtype


# --------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------

def grouped_mm_aligned(d_model, hidden):
    """torch._grouped_mm needs 16-byte aligned rows; MoEConfig asks multiples of 8 for an
    explicit "grouped_mm" (bf16 included; "auto" checks and falls back to bmm)."""
    return d_model % 8 == 0 and hidden % 8 == 0


@st.composite
def layer_cases(draw, all_impls=False):
    case = draw(cases(max_tokens=48))
    impl = draw(st.sampled_from(EXPERT_IMPLS))
    hidden = draw(st.integers(1, 16))
    if impl == "grouped_mm" or all_impls:
        case = dataclasses.replace(case, D=8 * math.ceil(case.D / 8))
        hidden = 8 * math.ceil(hidden / 8)
    assert impl != "grouped_mm" or grouped_mm_aligned(case.D, hidden)
    return case, dict(
        impl=impl,
        hidden=hidden,
        shared=draw(st.sampled_from([0, 1, 2])),
        batch=draw(st.sampled_from(["flat", "2d", "scalar"])),
        nan_padding=draw(st.booleans()),
    )


def with_layer_edge_cases(test):
    """EDGE_CASES through the layer, cycling the expert impls, shapes and padding values."""
    for i, edge in reversed(list(enumerate(EDGE_CASES))):
        edge = dataclasses.replace(edge, D=8 * math.ceil(edge.D / 8))  # grouped_mm-aligned
        opts = dict(impl=EXPERT_IMPLS[i % len(EXPERT_IMPLS)], hidden=8 * (1 + i % 2), shared=i % 3,
                    batch=("flat", "2d", "scalar")[i % 3], nan_padding=i % 2 == 0)
        test = example((edge, opts))(test)
    return test


def make_layer(case, opts):
    """A MoE layer built from the seed, its input (batch shape as drawn) and mask."""
    x, mask, bias, mult, g = make_inputs(case)
    balancers = () if case.bias_mode is None else (LossFree(form=case.bias_mode),)
    torch.manual_seed(case.seed)
    layer = MoE(MoEConfig(d_model=case.D, num_experts=case.E, top_k=case.K,
                          expert_hidden_size=opts["hidden"], num_shared_experts=opts["shared"],
                          router=case.config, balancers=balancers, expert_impl=opts["impl"]))
    if not isinstance(layer.router, case.router_cls):
        layer.router = case.router_cls(case.D, case.E, case.K, case.config)
    _fill_router(layer.router, case, g)
    with torch.no_grad():
        for p in list(layer.experts.parameters()) + ([] if layer.shared_experts is None
                                                    else list(layer.shared_experts.parameters())):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if bias is not None:
            layer.balancers[0].expert_bias.copy_(bias)
    if mask is not None and opts["nan_padding"]:
        x = x.masked_fill(~mask[:, None], float("nan"))  # padding values are never read
    T = case.T
    if opts["batch"] == "2d" and T % 2 == 0:
        x, mask = x.view(2, T // 2, case.D), None if mask is None else mask.view(2, T // 2)
    elif opts["batch"] == "scalar" and T == 1:
        x, mask = x.view(case.D), None if mask is None else mask.view(())
    return layer, x, mask


def swiglu_np(x, w_gate, w_up, w_down):
    a = x @ w_gate
    return ((a / (1 + np.exp(-a))) * (x @ w_up)) @ w_down


@PROPERTY
@given(layer_cases())
@with_layer_edge_cases
def test_layer_output_is_the_gated_sum_of_its_kept_experts(case_opts):
    """y_t = shared(x_t) + sum over kept (t, e) of g_{t,e} FFN_e(x_t), each term recomputed by
    hand in float64, for every expert implementation; padding rows are 0; all finite."""
    case, opts = case_opts
    layer, x, mask = make_layer(case, opts)
    with torch.no_grad():
        out = layer(x, mask)
    d = out.decision
    assert out.y.shape == x.shape and out.y.dtype == x.dtype
    y = out.y.reshape(-1, case.D).double().numpy()
    assert np.isfinite(y).all()
    x_np = x.reshape(-1, case.D).double().numpy()
    valid = valid_tokens(None if mask is None else mask.reshape(-1), case.T)
    ex = {n: p.detach().double().numpy() for n, p in layer.experts.named_parameters()}
    expected = np.zeros_like(y)
    for a, (t, e) in enumerate(kept_pairs(d)):
        expected[t] += float(d.weights[a]) * swiglu_np(x_np[t], ex["w_gate"][e], ex["w_up"][e], ex["w_down"][e])
    if layer.shared_experts is not None:
        sh = layer.shared_experts
        ws = [m.weight.detach().double().numpy().T for m in (sh.w_gate, sh.w_up, sh.w_down)]
        expected[valid] += swiglu_np(x_np[valid], *ws)
    expected[~valid] = 0.0  # no routed output, and the shared experts of a zeroed row are 0
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # the layer's counts are the router's: demand counts only the valid tokens
    assert int(d.routed_tokens_per_expert.sum()) == int(valid.sum()) * case.K


@PROPERTY
@given(layer_cases())
@with_layer_edge_cases
def test_same_seed_and_input_give_bit_identical_outputs(case_opts):
    case, opts = case_opts
    first, x, mask = make_layer(case, opts)
    second, x2, mask2 = make_layer(case, opts)
    assert torch.equal(x.nan_to_num(), x2.nan_to_num())
    with torch.no_grad():
        a, b, again = first(x, mask), second(x2, mask2), first(x, mask)
    for other in (b, again):
        assert torch.equal(a.y, other.y)
        for f in dataclasses.fields(RoutingDecision):
            va, vb = getattr(a.decision, f.name), getattr(other.decision, f.name)
            assert (va is None and vb is None) or torch.equal(va, vb), f.name


@PROPERTY
@given(layer_cases(all_impls=True))
@with_layer_edge_cases
def test_expert_implementations_agree(case_opts):
    case, opts = case_opts
    outputs = []
    for impl in EXPERT_IMPLS:
        layer, x, mask = make_layer(case, dict(opts, impl=impl))
        with torch.no_grad():
            outputs.append(layer(x, mask).y)
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The Loss-Free update
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", LOSS_FREE_FORMS)
@pytest.mark.parametrize("rule", LOSS_FREE_RULES)
@settings(PROPERTY, max_examples=max(PROPERTY.max_examples // 3, 10))
@given(case=cases().filter(lambda c: c.T > 0), center=st.booleans(),
       rate=st.sampled_from([1e-3, 1e-2, 0.3]))
@example(case=EDGE_CASES[5], center=False, rate=1e-2)
@example(case=EDGE_CASES[7], center=True, rate=0.3)
def test_loss_free_update_follows_its_rule(case, rule, form, center, rate):
    """One update from a real forward's counts: sign and error by hand; adaptive bounded by
    its max step with no common mode; multiplicative stays >= 1e-3; centring holds."""
    router, x, mask, _, _ = make_router(case)
    spec = LossFree(rule=rule, form=form, center=center, update_rate=rate)
    balancer = LossFreeBalancer(spec, case.E)
    g = torch.Generator().manual_seed(case.seed + 1)
    with torch.no_grad():
        if form == "multiplicative":
            balancer.expert_bias.copy_(0.5 + torch.rand(case.E, generator=g))
        else:
            balancer.expert_bias.copy_(torch.rand(case.E, generator=g) - 0.5)
        before = balancer.expert_bias.double().clone()
        d = router(x, balancer.selection_bias(), mask, balancer.multiplicative)
        balancer.observe(d.routed_tokens_per_expert, balancer.routing_stats(d, router))
        balancer.update()
    bias = balancer.expert_bias.double()
    c = d.routed_tokens_per_expert.double()
    assert int(balancer.pending_counts.abs().sum()) == 0  # reset by the update
    assert torch.isfinite(bias).all()
    if c.sum() == 0:  # nothing routed (all padding): no update at all
        assert torch.equal(bias, before) and int(balancer.num_updates) == 0
        return
    assert int(balancer.num_updates) == 1
    if rule == "sign":
        expected = before + rate * torch.sign(c.mean() - c)
    elif rule == "error":
        expected = before + rate * (c.mean() - c) / c.mean()
    if rule != "adaptive":
        if form == "multiplicative":
            expected = expected.clamp(min=1e-3)
            if center:
                expected = expected / expected.mean()
        elif center:
            expected = expected - expected.mean()
        torch.testing.assert_close(bias, expected, rtol=1e-5, atol=1e-6)
    else:
        delta = bias - before
        if (c == c.mean()).all():
            assert torch.equal(bias, before) or center  # balanced: nothing to correct
        if form == "additive" and not center:
            assert abs(float(delta.sum())) <= 1e-5, "the adaptive step must carry no common mode"
            # |g_i y_i - mean_j g_j y_j| <= 2 max_gain max_step
            assert float(delta.abs().max()) <= 2 * spec.max_gain * spec.max_step + 1e-6
    if form == "multiplicative":
        assert (bias > 0).all()
        if center:
            assert float(bias.mean()) == pytest.approx(1.0, rel=1e-5)
    elif center:
        assert abs(float(bias.mean())) <= 1e-6
