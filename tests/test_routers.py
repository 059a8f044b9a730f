"""The routers behind ``RouterConfig(method=...)``: expert choice, dynamic top-p, Mixture of
Grouped Experts, and top-K unchanged by the ragged ``RoutingDecision``.

Each router: a hand-computed tiny case, the invariant that defines it on random cases, gates
and counts from the decision, layer outputs and gradients of every expert implementation
against a per-token Python reference, and how it composes with the Loss-Free bias.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, RouterConfig
from moe_balance.balancing import dynamic_loss, expert_counts, sequence_aux_loss, switch_aux_loss, update_balancers
from moe_balance.config import DynamicLoss
from moe_balance.controller import flip_margins, solve_static_bias
from moe_balance.experts import grouped_mm_supported
from moe_balance.harness.methods import Method, get_method
from moe_balance.metrics import max_vio
from moe_balance.harness.model import MoETransformer, model_preset
from moe_balance.routing import (ROUTERS, CausalLeakWarning, ExpertChoiceRouter, GroupedRouter, RoutingDecision,
                                 TopKRouter, TopPRouter, build_router, capacity, mask_to_slots, slots_to_mask,
                                 sort_assignments)

IMPLS = ["loop", "bmm"] + (["grouped_mm"] if grouped_mm_supported("cpu", torch.float32) else [])


def router_with_scores(cls, scores, top_k, **config):
    """A router whose forward on torch.eye(E) rows gives these sigmoid scores: weight = logit(s)^T
    (so x = e_t picks row t of the logits). Returns the router and the (T, T) identity input."""
    T, E = scores.shape
    router = cls(T, E, top_k, RouterConfig(**config))
    with torch.no_grad():
        router.weight.copy_(torch.logit(scores.double()).float().T)
    return router, torch.eye(T)


# ------------------------------------------------------------------------------ top-K unchanged

def _old_top_k_decision(router, x_TD, bias_E=None, token_mask_T=None, multiplicative=False):
    """The top-K router's forward before routers were generalised (verbatim in substance):
    every token K slots, padding rows marked -1 after sorting, no empty-slot filtering."""
    from moe_balance.routing import compute_scores, group_limited_mask

    cfg = router.config
    logits_TE = F.linear(x_TD.float(), router.weight.float())
    scores_TE = compute_scores(logits_TE, cfg.score_fn)
    selection_TE = scores_TE if bias_E is None else (scores_TE * bias_E if multiplicative else scores_TE + bias_E)
    if cfg.num_groups is not None:
        selection_TE = group_limited_mask(selection_TE, cfg.num_groups, cfg.topk_groups)
    selected_TK = selection_TE.topk(router.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, selected_TK)
    if cfg.normalize_weights:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    weights_TK = weights_TK * cfg.scaling_factor
    cap = None
    if cfg.capacity_factor is not None:
        num_valid = x_TD.shape[0] if token_mask_T is None else int(token_mask_T.sum())
        cap = capacity(num_valid, router.num_experts, router.top_k, cfg.capacity_factor)
    T, K = selected_TK.shape
    token_ids = torch.arange(T).repeat_interleave(K)
    expert_ids, weights = selected_TK.reshape(-1), weights_TK.reshape(-1)
    priority = weights_TK.detach().reshape(-1) if cap is not None and cfg.drop_policy == "probs" else None
    if token_mask_T is not None:
        keep = token_mask_T.repeat_interleave(K)
        token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
        priority = None if priority is None else priority[keep]
    if priority is not None:
        order = torch.sort(priority, descending=True, stable=True).indices
        token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    order = torch.sort(expert_ids, stable=True).indices
    token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    routed = torch.bincount(expert_ids, minlength=router.num_experts)
    kept = routed
    if cap is not None:
        rank = torch.arange(expert_ids.numel()) - (torch.cumsum(routed, 0) - routed)[expert_ids]
        keep = rank < cap
        token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
        kept = torch.clamp(routed, max=cap)
    if token_mask_T is not None:
        selected_TK = selected_TK.masked_fill(~token_mask_T.unsqueeze(-1), -1)
    return dict(token_ids=token_ids, expert_ids=expert_ids, weights=weights, tokens_per_expert=kept,
                routed_tokens_per_expert=routed, logits=logits_TE, scores=scores_TE, selected=selected_TK)


TOP_K_CONFIGS = [
    dict(),
    dict(score_fn="softmax", normalize_weights=True, scaling_factor=2.5),
    dict(num_groups=4, topk_groups=2),
    dict(capacity_factor=0.75, drop_policy="probs"),
    dict(capacity_factor=1.0, drop_policy="position", normalize_weights=True),
]


@pytest.mark.parametrize("config", TOP_K_CONFIGS)
@pytest.mark.parametrize("bias_mode", [None, "additive", "multiplicative"])
@pytest.mark.parametrize("masked", [False, True])
def test_top_k_routing_is_bit_identical_to_the_pre_ragged_router(config, bias_mode, masked):
    g = torch.Generator().manual_seed(hash((str(config), bias_mode, masked)) % 2**31)
    router = TopKRouter(12, 16, 3, RouterConfig(**config))
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 12, generator=g))
    x = torch.randn(50, 12, generator=g)
    mask = (torch.rand(50, generator=g) < 0.7) if masked else None
    bias = {None: None, "additive": torch.randn(16, generator=g) * 0.1,
            "multiplicative": 0.5 + torch.rand(16, generator=g)}[bias_mode]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    new = router(xa, bias, mask, bias_mode == "multiplicative")
    old = _old_top_k_decision(router, xb, bias, mask, bias_mode == "multiplicative")
    for name, value in old.items():
        assert torch.equal(getattr(new, name), value), name  # bit for bit
    gw = torch.randn(new.weights.shape, generator=g)
    ga, = torch.autograd.grad((new.weights * gw).sum(), xa)
    gb, = torch.autograd.grad((old["weights"] * gw).sum(), xb)
    assert torch.equal(ga, gb)


# ------------------------------------------------------------------------------ ragged decisions

def test_slots_and_masks_convert_both_ways():
    selected = torch.tensor([[2, 0, -1], [-1, -1, -1], [1, 3, 2]])
    mask = slots_to_mask(selected, 4)
    assert mask.tolist() == [[True, False, True, False], [False] * 4, [False, True, True, True]]
    assert mask_to_slots(mask).tolist() == [[0, 2, -1], [-1, -1, -1], [1, 2, 3]]
    assert mask_to_slots(torch.zeros(2, 4, dtype=torch.bool)).shape == (2, 0)


def test_sort_assignments_skips_empty_slots():
    selected = torch.tensor([[1, -1], [0, 1], [-1, -1]])
    weights = torch.tensor([[0.5, 9.0], [0.25, 0.75], [9.0, 9.0]])
    token_ids, expert_ids, w, kept, routed = sort_assignments(selected, weights, 3)
    assert token_ids.tolist() == [1, 0, 1] and expert_ids.tolist() == [0, 1, 1]
    assert w.tolist() == [0.25, 0.5, 0.75] and routed.tolist() == kept.tolist() == [1, 2, 0]
    # capacity 1: expert 1 keeps its highest gate (token 1, 0.75)
    token_ids, expert_ids, w, kept, routed = sort_assignments(selected, weights, 3, capacity_per_expert=1,
                                                              priority_TK=weights)
    assert list(zip(token_ids.tolist(), expert_ids.tolist())) == [(1, 0), (1, 1)]
    assert kept.tolist() == [1, 1, 0] and routed.tolist() == [1, 2, 0]


def test_losses_and_counts_on_a_hand_made_ragged_case():
    # 2 sequences of 2 tokens, 3 experts: token experts {0, 2}, {}, {1}, {0, 1}
    selected_BSK = torch.tensor([[[0, 2], [-1, -1]], [[1, -1], [0, 1]]])
    scores_BSE = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]], [[0.1, 0.8, 0.1], [0.4, 0.4, 0.2]]])
    assert expert_counts(selected_BSK.view(4, 2), 3).tolist() == [2, 2, 1]
    # sequence 0: assignments {0, 2}, f = (1/2, 0, 1/2), P = (0.35, 0.325, 0.325):
    #   3 * (0.175 + 0.1625) = 1.0125; sequence 1: assignments {1, 0, 1}, f = (1/3, 2/3, 0),
    #   P = (0.25, 0.6, 0.15): 3 * (0.25/3 + 0.4) = 1.45. Mean: 1.23125
    assert float(sequence_aux_loss(scores_BSE, selected_BSK)) == pytest.approx(1.23125)
    # micro-batch: f = (2, 2, 1)/5, P = (0.3, 0.4625, 0.2375): 3 * (0.12 + 0.185 + 0.0475) = 1.0575
    assert float(switch_aux_loss(scores_BSE.view(4, 3), selected_BSK.view(4, 2))) == pytest.approx(1.0575)


def test_flip_margins_per_competition_group():
    # two groups of two experts; token chose expert 0 in group 0 and expert 3 in group 1
    selection = torch.tensor([[0.9, 0.6, 0.1, 0.3]])
    selected = torch.tensor([[True, False, False, True]])
    # group 0: 0.9 - 0.6, 0.9 - 0.6; group 1: 0.3 - 0.1, 0.3 - 0.1 (not against group 0)
    torch.testing.assert_close(flip_margins(selection, selected, 2), torch.tensor([[0.3, 0.3, 0.2, 0.2]]))
    # a top-p token with two experts out of four: one competition
    selected = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(flip_margins(selection, selected), torch.tensor([[0.6, 0.3, 0.5, 0.3]]))
    # no expert selected (an expert-choice token left out): nothing can make it join by one step
    assert torch.isinf(flip_margins(selection, torch.zeros_like(selected))).all()


def test_dynamic_loss_is_the_mean_score_entropy():
    uniform = torch.full((3, 4), 0.25)
    assert float(dynamic_loss(uniform)) == pytest.approx(math.log(4))
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert float(dynamic_loss(peaked)) == pytest.approx(0.0, abs=1e-6)
    mixed = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4])  # sigmoid-style: normalised first
    assert float(dynamic_loss(mixed * 3)) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert float(dynamic_loss(mixed, torch.tensor([True, False]))) == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------ expert choice

def test_expert_choice_hand_computed():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.1, 0.95]])
    router, x = router_with_scores(ExpertChoiceRouter, scores, 1, method="expert_choice", capacity_factor=1.0)
    d = router(x)
    # C = ceil(1.0 * 4 / 2) = 2: expert 0 takes tokens 0 and 1, expert 1 takes tokens 3 and 1
    assert d.selected.tolist() == [[0, -1], [0, 1], [-1, -1], [1, -1]]
    assert d.experts_per_token.tolist() == [1, 2, 0, 1]
    assert list(zip(d.token_ids.tolist(), d.expert_ids.tolist())) == [(0, 0), (1, 0), (1, 1), (3, 1)]
    torch.testing.assert_close(d.weights, torch.tensor([0.9, 0.8, 0.7, 0.95]))
    assert d.routed_tokens_per_expert.tolist() == d.tokens_per_expert.tolist() == [2, 2]
    # padding is never chosen and C counts real tokens only: C = ceil(1.0 * 3 / 2) = 2
    d = router(x, token_mask_T=torch.tensor([True, False, True, True]))
    assert d.selected.tolist() == [[0, -1], [-1, -1], [0, 1], [1, -1]]


@pytest.mark.parametrize("seed", range(6))
def test_expert_choice_gives_every_expert_exactly_c_tokens_its_best(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = int(torch.randint(5, 80, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    cf = [0.5, 1.0, 2.0, 3.3, float("inf")][seed % 5]
    router = ExpertChoiceRouter(6, E, 2, RouterConfig(method="expert_choice", capacity_factor=cf,
                                                      score_fn=["sigmoid", "softmax"][seed % 2]))
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 6, generator=g))
    mask = torch.rand(T, generator=g) < 0.8
    d = router(torch.randn(T, 6, generator=g), token_mask_T=mask)
    n = int(mask.sum())
    C = n if math.isinf(cf) else min(n, math.ceil(cf * n / E))
    assert d.routed_tokens_per_expert.tolist() == [C] * E
    chosen = d.selected_mask()
    assert not chosen[~mask].any()
    for e in range(E):  # every chosen token scores at least as high as every real token left out
        inside, outside = d.scores[chosen[:, e], e], d.scores[~chosen[:, e] & mask, e]
        if len(inside) and len(outside):
            assert inside.min() >= outside.max()


def test_expert_choice_routing_batches_and_shuffling():
    E, T = 4, 40
    config = RouterConfig(method="expert_choice", capacity_factor=1.0, routing_batch_size=16)
    router = ExpertChoiceRouter(8, E, 1, config)
    x = torch.randn(T, 8)
    d = router(x)
    # batches of 16, 16, 8 tokens: C = 4, 4, 2 per expert; each batch routed on its own
    assert d.routed_tokens_per_expert.tolist() == [10] * E
    chosen = d.selected_mask()
    for rows, c in ((slice(0, 16), 4), (slice(16, 32), 4), (slice(32, 40), 2)):
        assert chosen[rows].sum(0).tolist() == [c] * E
        alone = router(x[rows])
        assert torch.equal(alone.selected_mask(), chosen[rows])  # the rest of the batch is not read
    # shuffled: the same sizes over a random permutation (reproducible under the torch seed)
    shuffled = ExpertChoiceRouter(8, E, 1, RouterConfig(method="expert_choice", capacity_factor=1.0,
                                                        routing_batch_size=16, shuffle_tokens=True))
    shuffled.load_state_dict(router.state_dict())
    torch.manual_seed(0)
    a = shuffled(x).selected_mask()
    torch.manual_seed(0)
    perm = torch.randperm(T)
    assert a.sum(0).tolist() == [10] * E
    for rows, c in ((perm[:16], 4), (perm[16:32], 4), (perm[32:], 2)):
        assert a[rows].sum(0).tolist() == [c] * E
        assert torch.equal(router(x[rows]).selected_mask(), a[rows])


def test_expert_choice_warns_once_in_a_causal_model_and_never_in_a_plain_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = MoE(MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=8,
                              router=RouterConfig(method="expert_choice")))
        layer(torch.randn(2, 5, 8))
        assert not [w for w in caught if issubclass(w.category, CausalLeakWarning)]
        model = MoETransformer(model_preset("tiny", router=RouterConfig(method="expert_choice"), seq_len=16, n_layers=3))
        tokens = torch.randint(0, 256, (2, 16))
        model(tokens)
        model(tokens)
    leaks = [w for w in caught if issubclass(w.category, CausalLeakWarning)]
    assert len(model.moe_layers) >= 2 and len(leaks) == len(model.moe_layers)  # each layer once...
    assert "future-token leakage" in str(leaks[0].message)
    with warnings.catch_warnings(record=True) as caught:  # ...and the default filter shows one
        warnings.simplefilter("default")
        MoETransformer(model_preset("tiny", router=RouterConfig(method="expert_choice"), seq_len=16, n_layers=3))(tokens)
    assert len([w for w in caught if issubclass(w.category, CausalLeakWarning)]) == 1


def test_expert_choice_leaks_the_future_and_top_k_does_not():
    """Changing the last token of a sequence changes the routing of earlier tokens under expert
    choice, never under top-K (the leak sec. 5.2 of the Loss-Free paper describes)."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    later = x.clone()
    later[-1] = 50 * torch.randn(8)  # one very confident later token
    for method, leaks in (("expert_choice", True), ("top_k", False)):
        router = build_router(8, 4, 1, RouterConfig(method=method, capacity_factor=1.0 if leaks else None))
        with torch.no_grad():
            router.weight.copy_(torch.randn(4, 8))
        before, after = router(x).selected_mask()[:-1], router(later).selected_mask()[:-1]
        assert (not torch.equal(before, after)) == leaks, method


# ------------------------------------------------------------------------------ top-p

def test_top_p_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()  # softmax(logits) == probs

    def route(p, bias=None, max_experts=None):
        router = TopPRouter(3, 4, 2, RouterConfig(method="top_p", score_fn="softmax", top_p=p,
                                                  max_experts=max_experts))
        with torch.no_grad():
            router.weight.copy_(logits.T)
        return router(torch.eye(3), bias).selected.tolist()

    # p = 0.45: 0.5 crosses at once; 0.4 < 0.45 so the second row needs 0.4 + 0.3; 0.97 at once
    assert route(0.45) == [[0, -1], [3, 2], [0, -1]]
    # p = 0.75: 0.5 + 0.3; 0.4 + 0.3 + 0.2; 0.97
    assert route(0.75) == [[0, 1, -1], [3, 2, 1], [0, -1, -1]]
    assert route(0.75, max_experts=2) == [[0, 1], [3, 2], [0, -1]]
    # a bias picks *which* experts, never how many: +1 on expert 2 (third slot count unchanged)
    assert route(0.75, bias=torch.tensor([0.0, 0.0, 1.0, 0.0])) == [[2, 0, -1], [2, 3, 1], [2, -1, -1]]


@pytest.mark.parametrize("seed", range(6))
def test_top_p_keeps_the_shortest_prefix_reaching_p(seed):
    g = torch.Generator().manual_seed(seed)
    E, p = int(torch.randint(2, 17, (1,), generator=g)), [0.1, 0.4, 0.6, 0.9, 1.0, 0.4][seed]
    score_fn = ["softmax", "sigmoid"][seed % 2]
    router = TopPRouter(6, E, 1, RouterConfig(method="top_p", top_p=p, score_fn=score_fn))
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, 6, generator=g) * 2)
    d = router(torch.randn(60, 6, generator=g))
    probs = (d.scores / d.scores.sum(-1, keepdim=True)).double()
    chosen = d.selected_mask()
    for t in range(60):
        ordered = probs[t].sort(descending=True)
        n = int(chosen[t].sum())
        assert 1 <= n <= E
        assert set(ordered.indices[:n].tolist()) == set(torch.nonzero(chosen[t]).flatten().tolist())
        mass = ordered.values.cumsum(0)
        assert mass[n - 1] >= p - 1e-6 or n == E  # reaches p ...
        assert n == 1 or mass[n - 2] < p + 1e-6  # ... and one fewer does not


# ------------------------------------------------------------------------------ grouped (MoGE)

def test_grouped_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
    router, x = router_with_scores(GroupedRouter, scores, 3, method="grouped", num_groups=3)
    assert router(x).selected.tolist() == [[0, 3, 5], [1, 3, 4]]
    router, x = router_with_scores(GroupedRouter, scores, 4, method="grouped", num_groups=2)
    # groups {0,1,2} and {3,4,5}, two each: plain top-4 would have taken 0, 1, 4, 5 for token 0
    assert router(x).selected.tolist() == [[0, 1, 5, 4], [2, 1, 3, 4]]


@pytest.mark.parametrize("M,K", [(1, 3), (2, 2), (2, 6), (4, 4), (8, 8)])
def test_grouped_takes_exactly_k_over_m_in_every_group(M, K):
    E, T = 8, 50
    router = GroupedRouter(6, E, K, RouterConfig(method="grouped", num_groups=M))
    bias = torch.randn(E) * 0.1
    d = router(torch.randn(T, 6) * 3, bias)
    chosen = d.selected_mask().view(T, M, E // M)
    assert (chosen.sum(-1) == K // M).all()
    selection = (d.scores + bias).view(T, M, E // M)
    inside = selection.masked_fill(~chosen, float("inf")).amin(-1)
    outside = selection.masked_fill(chosen, float("-inf")).amax(-1)
    assert (inside >= outside).all()  # the best K/M of each group
    group_loads = d.routed_tokens_per_expert.view(M, E // M).sum(-1)
    assert group_loads.tolist() == [T * K // M] * M  # equal group loads by construction


# ------------------------------------------------------------------------------ every router

ROUTER_CONFIGS = {
    "top_k": dict(),
    "top_k_grouped_limited": dict(num_groups=2, topk_groups=1),
    "expert_choice": dict(method="expert_choice"),
    "expert_choice_batches": dict(method="expert_choice", routing_batch_size=7, capacity_factor=1.5),
    "top_p": dict(method="top_p", score_fn="softmax", top_p=0.5),
    "top_p_capped": dict(method="top_p", top_p=0.9, max_experts=3, capacity_factor=1.0),
    "grouped": dict(method="grouped", num_groups=2, normalize_weights=True, scaling_factor=2.5),
}


def test_the_registry_has_every_router():
    assert ROUTERS == {"top_k": TopKRouter, "expert_choice": ExpertChoiceRouter, "top_p": TopPRouter,
                       "grouped": GroupedRouter}
    for method, cls in ROUTERS.items():
        layer = MoE(MoEConfig(d_model=8, num_experts=4, top_k=2, expert_hidden_size=8,
                              router=RouterConfig(method=method, **({"num_groups": 2} if method == "grouped" else {}))))
        assert type(layer.router) is cls


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_decision_counts_gates_and_padding_for_every_router(name):
    torch.manual_seed(1)
    config = RouterConfig(**ROUTER_CONFIGS[name])
    router = build_router(8, 6, 2, config)
    T = 30
    mask = torch.rand(T) < 0.75
    d = router(torch.randn(T, 8), token_mask_T=mask)
    chosen = d.selected_mask()
    assert not chosen[~mask].any() and (d.experts_per_token[~mask] == 0).all()
    assert torch.equal(d.routed_tokens_per_expert, chosen.sum(0))
    assert torch.equal(d.experts_per_token, chosen.sum(-1))
    assert int(d.routed_tokens_per_expert.sum()) - d.num_dropped == d.token_ids.numel()
    assert all(mask[t] and chosen[t, e] for t, e in zip(d.token_ids.tolist(), d.expert_ids.tolist()))
    # gates: the unbiased scores of the token's experts, normalised over them when asked, scaled
    gates = torch.where(chosen, d.scores, torch.zeros(()))
    if config.normalize_weights:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    gates = gates * config.scaling_factor
    torch.testing.assert_close(d.weights, gates[d.token_ids, d.expert_ids])


def reference_layer(layer: MoE, x_TD: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
    """y_t = shared(x_t) + sum over the kept experts i of token t of g_{t,i} SwiGLU_i(x_t), one
    token and one expert at a time from the layer's weights."""
    w_gate, w_up, w_down = layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down
    rows = []
    for t in range(x_TD.shape[0]):
        y = layer.shared_experts(x_TD[t:t + 1])[0] if layer.shared_experts is not None else torch.zeros_like(x_TD[t])
        for a in torch.nonzero(decision.token_ids == t).flatten().tolist():
            e = int(decision.expert_ids[a])
            h = F.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])
            y = y + decision.weights[a] * (h @ w_down[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_layer_output_and_gradients_match_the_per_token_reference(name, impl):
    torch.manual_seed(2)
    config = MoEConfig(d_model=16, num_experts=6, top_k=2, expert_hidden_size=8,
                       num_shared_experts=1, router=RouterConfig(**ROUTER_CONFIGS[name]), expert_impl=impl)
    layer = MoE(config)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    layer_ref = MoE(dataclass_replace(config, expert_impl="loop"))
    layer_ref.load_state_dict(layer.state_dict())
    y_ref = reference_layer(layer_ref, x_ref.reshape(-1, 16), layer_ref(x_ref).decision).view_as(x_ref)
    if "expert_choice" in name and "batches" not in name:
        assert (out.decision.experts_per_token == 0).any() or (out.decision.experts_per_token > 1).any()
    torch.testing.assert_close(out.y, y_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out.y)
    grads = torch.autograd.grad((out.y * upstream).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), [x_ref, *layer_ref.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ------------------------------------------------------------------------------ Loss-Free composes

@pytest.mark.parametrize("method", ["top_p", "grouped"])
def test_loss_free_bias_steers_top_p_and_grouped_selection(method):
    extra = {"num_groups": 2} if method == "grouped" else {"top_p": 0.5}
    layer = MoE(MoEConfig(d_model=8, num_experts=4, top_k=2, expert_hidden_size=8,
                          router=RouterConfig(method=method, **extra), balancers=(LossFree(),)))
    x = torch.randn(40, 8)
    counts_before = layer(x).decision.experts_per_token
    layer.balancers[0].expert_bias[1] = 10.0  # expert 1 wins every slot it competes for
    d = layer(x).decision
    assert d.selected_mask()[:, 1].all()
    assert torch.equal(d.experts_per_token, counts_before)  # top-p: which, not how many


@pytest.mark.parametrize("name", ["top_p", "grouped"])
def test_adaptive_controller_balances_ragged_and_grouped_routers(name):
    """A skewed fixed router: the adaptive Loss-Free bias brings MaxVio of the routed counts
    down by a large factor within 60 updates (margins per competition group, ragged counts)."""
    torch.manual_seed(3)
    extra = {"num_groups": 2} if name == "grouped" else {"top_p": 0.3, "score_fn": "softmax"}
    layer = MoE(MoEConfig(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8,
                          router=RouterConfig(method=name, **extra), balancers=(LossFree(rule="adaptive"),)))
    skew = torch.randn(16) * 2
    first = last = None
    for step in range(60):
        x = torch.randn(256, 16) + skew
        out = layer(x.requires_grad_())
        out.y.sum().backward()
        update_balancers(layer)
        vio = float(max_vio(out.decision.routed_tokens_per_expert))
        first = vio if first is None else first
        last = vio
    assert first > 0.8 and last < 0.25 * first, (first, last)


@pytest.mark.parametrize("name", ["top_p", "grouped"])
def test_static_bias_solver_uses_the_router_rule(name):
    torch.manual_seed(4)
    extra = {"num_groups": 2} if name == "grouped" else {"top_p": 0.3, "score_fn": "softmax"}
    router = build_router(16, 8, 2, RouterConfig(method=name, **extra))
    scores = router(torch.randn(2000, 16) + torch.randn(16) * 2).scores.detach()
    unbiased = float(max_vio(router.select_mask(scores, scores).sum(0)))
    bias, vio = solve_static_bias(scores, 2, router=router)
    counts = router.select_mask(router.selection(scores, bias), scores).sum(0)
    assert vio == pytest.approx(float(max_vio(counts)))
    assert unbiased > 0.5 and vio < 0.1 * unbiased
    if name == "grouped":
        assert (router.select_mask(scores + bias, scores).view(-1, 2, 4).sum(-1) == 1).all()


def test_loss_free_is_refused_for_expert_choice_in_configs_and_methods():
    with pytest.raises(ValueError, match="LossFree does not apply to RouterConfig\\(method='expert_choice'\\)"):
        MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=8,
                  router=RouterConfig(method="expert_choice"), balancers=(LossFree(),))
    with pytest.raises(ValueError, match="LossFree does not apply to expert-choice routing"):
        Method(name="x", description="x", router=RouterConfig(method="expert_choice"), balancers=(LossFree(),))
    # the aux loss composes with every router
    MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=8,
              router=RouterConfig(method="expert_choice"), balancers=(AuxLoss(coeff=1e-2),))


# ------------------------------------------------------------------------------ configuration

def test_router_config_defaults_per_method():
    assert RouterConfig(method="expert_choice").capacity_factor == 2.0
    assert RouterConfig(method="top_p").top_p == 0.4 and RouterConfig(method="top_p").max_experts is None
    assert RouterConfig().method == "top_k" and RouterConfig().top_p is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="top_p", top_p=0.0), "RouterConfig.top_p=0.0 must be a number in (0, 1]"),
    (dict(method="top_p", top_p=1.5), "RouterConfig.top_p=1.5 must be a number in (0, 1]"),
    (dict(method="top_p", max_experts=0), "RouterConfig.max_experts=0 must be an integer >= 1"),
    (dict(max_experts=2), "RouterConfig.max_experts=2 applies to method='top_p' only"),
    (dict(routing_batch_size=64), "RouterConfig.routing_batch_size=64 applies to method='expert_choice' only"),
    (dict(method="grouped"), "RouterConfig(method='grouped') needs num_groups"),
    (dict(method="top_p", num_groups=2, topk_groups=1), "apply to method='top_k' (group-limited routing) and "
                                                         "'grouped' only"),
    (dict(method="expert_choice", routing_batch_size=0), "RouterConfig.routing_batch_size=0 must be an integer >= 1"),
])
def test_invalid_router_configs_name_the_fields(kwargs, message):
    with pytest.raises(ValueError) as err:
        RouterConfig(**kwargs)
    assert message in str(err.value)


def test_moe_config_checks_router_against_layer():
    with pytest.raises(ValueError, match="RouterConfig.max_experts=5 must be <= MoEConfig.num_experts=4"):
        MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=8,
                  router=RouterConfig(method="top_p", max_experts=5))
    with pytest.raises(ValueError, match="num_groups to divide both MoEConfig.num_experts=6"):
        MoEConfig(d_model=8, num_experts=6, top_k=2, expert_hidden_size=8,
                  router=RouterConfig(method="grouped", num_groups=4))


def test_registered_router_methods():
    ec, tp, tpl = get_method("expert_choice"), get_method("top_p"), get_method("top_p_loss_free")
    assert ec.leaks_future and ec.router.method == "expert_choice" and not ec.balancers
    assert tp.router.method == "top_p" and any(isinstance(b, DynamicLoss) for b in tp.balancers)
    assert any(isinstance(b, LossFree) and b.rule == "adaptive" for b in tpl.balancers)
    for name in ("moge", "moge_loss_free"):
        m = get_method(name)
        assert m.router.method == "grouped" and not m.leaks_future
        for preset in ("tiny", "quick", "standard"):  # the group count fits every preset
            model_preset(preset, router=m.router, balancers=m.balancers)
    assert not get_method("loss_free").leaks_future
