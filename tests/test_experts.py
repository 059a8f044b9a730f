"""Experts and dispatch: fast paths against the loop reference, dense equivalence, permutation."""

import pytest
import torch

from moe_balance import MoE, MoEConfig, RouterConfig
from moe_balance.dispatch import permute, unpermute
from moe_balance.experts import SwiGLU, SwiGLUExperts, grouped_mm_supported
from moe_balance.routing import TopKRouter

FAST_IMPLS = ["bmm"] + (["grouped_mm"] if grouped_mm_supported("cpu", torch.float32) else [])


def run_layer(layer, x):
    """Forward + backward with a non-trivial upstream gradient; returns output and all grads."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    weight = torch.linspace(-1, 1, out.y.numel()).view_as(out.y)
    ((out.y * weight).sum() + out.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.y.detach(), x.grad.clone(), grads


def test_grouped_mm_is_available_on_this_torch():
    # The CPU reference machine runs torch 2.13, whose CPU _grouped_mm works in fp32: if this
    # ever fails the "auto" path silently falls back to bmm, which should be noticed.
    assert grouped_mm_supported("cpu", torch.float32)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_fast_path_matches_loop_reference(impl, capacity_factor):
    torch.manual_seed(0)
    base = dict(d_model=24, num_experts=8, top_k=3, expert_hidden_size=16, num_shared_experts=1,
                router=RouterConfig(capacity_factor=capacity_factor, normalize_weights=True))
    reference = MoE(MoEConfig(**base, expert_impl="loop"))
    fast = MoE(MoEConfig(**base, expert_impl=impl))
    fast.load_state_dict(reference.state_dict())
    # a skewed input makes experts unequally loaded (some get nothing), the hard case for padding
    x = torch.randn(3, 20, 24) + 2.0 * reference.router.weight[0].detach() / reference.router.weight[0].norm()
    y_ref, gx_ref, g_ref = run_layer(reference, x)
    y, gx, g = run_layer(fast, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and "router.weight" in g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_with_no_tokens_gets_zero_gradient():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=4, expert_impl="bmm"))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0  # every positive-sum token picks expert 2 ...
    x = torch.rand(10, 8)             # ... and all of these have a positive sum
    out = layer(x)
    assert out.decision.tokens_per_expert.tolist() == [0, 0, 10, 0]
    out.y.sum().backward()
    assert torch.all(layer.experts.w_up.grad[[0, 1, 3]] == 0)
    assert layer.experts.w_up.grad[2].abs().sum() > 0


@pytest.mark.parametrize("impl", ["loop"] + FAST_IMPLS)
def test_one_expert_top1_equals_dense_swiglu(impl):
    torch.manual_seed(0)
    # softmax over one expert gives gate 1.0 exactly
    layer = MoE(MoEConfig(d_model=16, num_experts=1, top_k=1, expert_hidden_size=32,
                          router=RouterConfig(score_fn="softmax"), expert_impl=impl))
    dense = SwiGLU(16, 32)
    with torch.no_grad():
        # nn.Linear stores (out, in); the stacked experts store (in, out)
        dense.w_gate.weight.copy_(layer.experts.w_gate[0].T)
        dense.w_up.weight.copy_(layer.experts.w_up[0].T)
        dense.w_down.weight.copy_(layer.experts.w_down[0].T)
    x = torch.randn(5, 7, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_moe, y_dense = layer(x).y, dense(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    y_moe.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w_down.grad[0], dense.w_down.weight.grad.T, rtol=1e-5, atol=1e-6)


def test_shared_experts_are_always_on():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=4, num_shared_experts=2,
                          router=RouterConfig(capacity_factor=1e-6)))  # capacity 1: almost all dropped
    x = torch.randn(12, 8)
    out = layer(x)
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[out.decision.token_ids] = False
    torch.testing.assert_close(out.y[dropped], layer.shared_experts(x[dropped]))
    assert layer.shared_experts.w_up.weight.shape == (2 * 4, 8)  # two experts of width 4


@pytest.mark.parametrize("top_k", [1, 3])
def test_permute_then_unpermute_is_identity_with_gradients(top_k):
    torch.manual_seed(0)
    router = TopKRouter(8, 6, top_k, RouterConfig(score_fn="softmax", normalize_weights=True))
    x = torch.randn(30, 8, requires_grad=True)
    decision = router(x.detach())
    x_AD = permute(x, decision)
    # rows come out grouped by expert: each expert's block is contiguous and in expert order
    assert torch.equal(x_AD, x.detach()[decision.token_ids])
    assert torch.all(decision.expert_ids[1:] >= decision.expert_ids[:-1])
    # gates sum to one per token, so combining the untouched rows gives x back
    y = unpermute(x_AD, decision, 30)
    torch.testing.assert_close(y, x.detach())
    upstream = torch.randn(30, 8)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)


def test_unpermute_accumulates_in_float32():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, RouterConfig())
    x = torch.randn(10, 8)
    decision = router(x)
    y_bf16 = unpermute(permute(x, decision).bfloat16(), decision, 10)
    y_fp32 = unpermute(permute(x, decision).bfloat16().float(), decision, 10)
    assert y_bf16.dtype == torch.bfloat16
    assert torch.equal(y_bf16, y_fp32.bfloat16())  # one rounding at the end, not one per add


def test_bench_rows_are_ratios_to_the_dense_reference_of_the_same_run():
    from moe_balance.harness.bench import auto_choice, bench, parse_shape

    shape = parse_shape("16,8,4,2,1")  # d 16, hidden 8, 4 experts, top-2, 1 shared
    assert shape.active_rows == 3
    rows = bench([shape], ["float32", "bfloat16"], tokens=64, rounds=1, peers=True)
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if r.dtype == dtype]
        names = [r.implementation for r in mine]
        assert names[0] == "dense (same active FLOPs)" and mine[0].ratio_to_dense == 1.0
        assert {"moe_balance auto", "moe_balance bmm", "moe_balance loop"} <= set(names)
        assert "transformers deepseek_v3 grouped_mm" in names  # the one peer family with a shared expert
        dense_ms = mine[0].median_ms
        for r in mine:  # one round: the median ratio is that round's ratio
            assert r.median_ms > 0 and r.ratio_to_dense == pytest.approx(r.median_ms / dense_ms, rel=1e-6)
            assert r.saved_ratio_to_dense == pytest.approx(r.saved_mib / mine[0].saved_mib)
        defaults = {r.implementation for r in mine if r.is_default}
        assert defaults == {"moe_balance auto", f"moe_balance {auto_choice(shape, getattr(torch, dtype))}"}


def test_bench_counts_the_bytes_saved_for_backward_once_per_storage():
    from moe_balance.harness.bench import _saved_bytes

    x = torch.randn(100, 10)
    assert _saved_bytes(lambda t: t.exp(), x) == 100 * 10 * 4  # exp saves its result
    assert _saved_bytes(lambda t: (lambda u: u * u)(t + 1), x) == 100 * 10 * 4  # one storage, saved twice
    assert _saved_bytes(lambda t: t * t, x) == 0  # the input itself exists anyway: not counted


def test_the_combine_saves_the_outputs_gates_and_ids_only():
    """One (A, D) tensor: (y * w).index_add would also keep the product for its backward."""
    from moe_balance.harness.bench import _saved_bytes
    from moe_balance.dispatch import _WeightedCombine

    A, D, T = 12, 8, 5
    ids = torch.randint(0, T, (A,), generator=torch.Generator().manual_seed(0))
    w = torch.rand(A)
    y = torch.randn(A, D)
    assert _saved_bytes(lambda t: _WeightedCombine.apply(t * 1, w, ids, T), y) == A * D * 4 + A * 4 + A * 8
    y64, w64 = torch.randn(A, D, dtype=torch.float64, requires_grad=True), torch.rand(A, dtype=torch.float64,
                                                                                         requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _WeightedCombine.apply(a, b, ids, T), (y64, w64))


def _fused_case(dtype):
    """Grouped experts (one with no rows) and their inputs: 5 tokens x top-4 of 4 experts."""
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, 16, 32, impl="grouped_mm").to(dtype)
    T, A = 5, 20
    counts = torch.tensor([6, 0, 9, 5])
    ids = torch.randint(0, T, (A,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(A, 16, dtype=dtype)
    w = torch.rand(A)
    return experts, counts, ids, x, w, T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_down_projection_and_combine_match_the_loop(dtype):
    """(torch 2.13's CPU _grouped_mm runs fp32 and bf16: test_grouped_mm_is_available_on_this_torch.)
    weighted_sum on the grouped path (one function for down projection + combine) against
    the loop's outputs through the plain combine: output, and the gradients of the inputs, the
    gate weights and every expert weight. fp32 to rounding; bf16 within its precision."""
    from moe_balance.dispatch import weighted_combine

    experts, counts, ids, x, w, T = _fused_case(dtype)
    upstream = torch.randn(T, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for fused in (True, False):
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = experts.weighted_sum(xi, counts, wi, ids, T) if fused else \
            weighted_combine(experts(xi, counts, "loop"), wi, ids, T)
        (y.float() * upstream.float()).sum().backward()
        results.append([y.detach(), xi.grad, wi.grad] + [p.grad.clone() for p in experts.parameters()])
    tolerance = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    for name, got, want in zip(["y", "x", "weights", "w_gate", "w_up", "w_down"], *results):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **tolerance, msg=name)
    assert results[0][5][1].abs().max() == 0  # the expert with no rows: zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 7 * 16])
def test_row_products_equal_the_plain_float32_formulas_bit_for_bit(monkeypatch, dtype, block):
    """scale_rows, row_dots and weighted_sum (products in float32, done a block of rows at a
    time and in place where allowed) give exactly the plain formulas' bits: one block, and
    blocks of 7 rows (with a ragged last block)."""
    from moe_balance import dispatch

    if block is not None:
        monkeypatch.setattr(dispatch, "_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(0)
    A, D, T = 45, 16, 12
    x = torch.randn(A, D, generator=gen).to(dtype)
    y = torch.randn(A, D, generator=gen).to(dtype)
    w = torch.rand(A, generator=gen)
    ids = torch.randint(0, T, (A,), generator=gen)
    plain_scaled = (w.unsqueeze(-1) * x.float()).to(dtype)
    assert torch.equal(dispatch.scale_rows(x, w), plain_scaled)
    assert torch.equal(dispatch.row_dots(x, y), (x.float() * y.float()).sum(-1))
    plain_sum = torch.zeros(T, D).index_add_(0, ids, w.unsqueeze(-1) * x.float()).to(dtype)
    assert torch.equal(dispatch.weighted_sum(x, w, ids, T), plain_sum)
    scratch = x.clone()
    assert torch.equal(dispatch.weighted_sum(scratch, w, ids, T, scratch=True), plain_sum)
    assert torch.equal(dispatch.scale_rows(x, w), plain_scaled) and not torch.equal(x, plain_scaled)  # x kept
    mine = x.clone()
    out = dispatch.scale_rows(mine, w, inplace=True)
    assert out.data_ptr() == mine.data_ptr() and torch.equal(mine, plain_scaled)
    # no rows (an empty shard or batch)
    assert dispatch.row_dots(x[:0], y[:0]).shape == (0,) and dispatch.scale_rows(x[:0], w[:0]).shape == (0, D)
    assert torch.equal(dispatch.weighted_sum(x[:0], w[:0], ids[:0], T), torch.zeros(T, D, dtype=dtype))


def test_fused_path_keeps_no_expert_outputs_for_the_backward():
    """Exactly one (A, D) tensor fewer than the grouped experts followed by the combine."""
    from moe_balance.harness.bench import _saved_bytes
    from moe_balance.dispatch import weighted_combine

    experts, counts, ids, x, w, T = _fused_case(torch.float32)
    fused = _saved_bytes(lambda t: experts.weighted_sum(t, counts, w, ids, T), x)
    apart = _saved_bytes(lambda t: weighted_combine(experts(t, counts, "grouped_mm"), w, ids, T), x)
    assert apart - fused == x.shape[0] * 16 * 4


def test_bench_shapes_and_json(capsys):
    import json

    from moe_balance.harness.bench import SHAPES, parse_shape
    from moe_balance.harness.cli import main

    assert parse_shape("Bs") == SHAPES["Bs"] and SHAPES["Bs"].shared == 1
    for bad in ("C", "1,2,3", "16,8,4,5", "a,b,c,d"):
        with pytest.raises(ValueError, match="is not allowed"):
            parse_shape(bad)
    assert main(["bench", "--shape", "16,8,4,2", "--dtypes", "float32", "--tokens", "32", "--rounds", "1",
                 "--no-peers", "--no-extras", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"implementation", "shape", "dtype", "median_ms", "ratio_to_dense", "is_default"} <= set(rows[0])
    assert [r["implementation"] for r in rows][:2] == ["dense (same active FLOPs)", "moe_balance auto"]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grouped_mm_probe_does_not_depend_on_grad_mode(mode):
    """A first probe under no_grad (evaluation before training) must not cache False."""
    from moe_balance.experts import _GROUPED_MM_SUPPORT, grouped_mm_supported

    saved = dict(_GROUPED_MM_SUPPORT)
    _GROUPED_MM_SUPPORT.clear()
    try:
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with context:
            inside = grouped_mm_supported("cpu", torch.float32)
        assert inside is True  # torch 2.13 runs _grouped_mm forward and backward on CPU
        assert grouped_mm_supported("cpu", torch.float32) is True
    finally:
        _GROUPED_MM_SUPPORT.clear()
        _GROUPED_MM_SUPPORT.update(saved)


def test_building_a_layer_leaves_the_global_rng_alone_whatever_the_probe_cache():
    """The grouped_mm probe runs while experts are built: it must not draw random numbers, or
    the same seed would give different weights in a fresh process and in a warm one."""
    from moe_balance.experts import _GROUPED_MM_SUPPORT

    saved = dict(_GROUPED_MM_SUPPORT)
    try:
        states = []
        for cold in (True, False):
            if cold:
                _GROUPED_MM_SUPPORT.clear()
            torch.manual_seed(0)
            SwiGLUExperts(4, 8, 8)
            states.append(torch.get_rng_state())
        assert torch.equal(states[0], states[1])
    finally:
        _GROUPED_MM_SUPPORT.clear()
        _GROUPED_MM_SUPPORT.update(saved)


@pytest.mark.parametrize("d_model, dtype, supported, expected", [
    (16, torch.float32, True, "grouped_mm"),    # 64-byte rows, probe says yes
    (16, torch.float32, False, "bmm"),          # the device or dtype cannot run _grouped_mm
    (6, torch.float32, True, "bmm"),            # 24-byte rows: not 16-byte aligned
    (8, torch.bfloat16, True, "grouped_mm"),    # 16-byte bf16 rows
    (4, torch.bfloat16, True, "bmm"),           # 8-byte bf16 rows
], ids=["aligned", "unsupported", "unaligned-fp32", "aligned-bf16", "unaligned-bf16"])
def test_auto_falls_back_to_bmm_where_grouped_mm_cannot_run(monkeypatch, d_model, dtype, supported, expected):
    """Every device-dependent choice of expert_impl="auto", checked on the CPU (the GPU takes
    the same decisions from the same probe and alignment rule)."""
    import moe_balance.experts as ex
    from moe_balance.harness.bench import Shape, auto_choice

    experts = SwiGLUExperts(4, d_model, 8).to(dtype)
    monkeypatch.setitem(ex._GROUPED_MM_SUPPORT, ("cpu", dtype), supported)
    taken = []
    real_grouped, real_bmm = ex._grouped, ex._bmm_swiglu
    monkeypatch.setattr(ex, "_grouped", lambda *a: taken.append("grouped_mm") or real_grouped(*a))
    monkeypatch.setattr(ex, "_bmm_swiglu", lambda *a: taken.append("bmm") or real_bmm(*a))
    x = torch.randn(10, d_model).to(dtype)
    counts = torch.tensor([3, 0, 5, 2])
    y = experts(x, counts, impl="auto")
    assert set(taken) == {expected}
    tolerance = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, experts(x, counts, impl="loop"), **tolerance)
    if supported:  # the benchmark marks the same path as the default
        assert auto_choice(Shape("s", d_model, 8, 4, 2), dtype) == expected


def test_the_probe_says_no_without_grouped_mm(monkeypatch):
    from moe_balance.experts import _probe_grouped_mm

    monkeypatch.delattr(torch, "_grouped_mm")
    assert _probe_grouped_mm("cpu", torch.float32) is False
