"""HMoE (Wang et al. 2024, arXiv 2408.10681): experts of different widths, the parameter
penalty, Loss-Free balancing compute, and compute metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_balance import LossFree, MoE, MoEConfig
from moe_balance.balancing import normalized_probs, switch_loss_from_counts, target_shares, update_balancers
from moe_balance.config import ParameterPenalty
from moe_balance.experts import HeterogeneousSwiGLUExperts, grouped_mm_supported
from moe_balance.metrics import max_vio
from moe_balance.config import heterogeneous_widths
from moe_balance.harness.model import MoETransformer, model_preset
from moe_balance.harness.train import compute_metrics, model_config, train_config

IMPLS = ["loop", "bmm"] + (["grouped_mm"] if grouped_mm_supported("cpu", torch.float32) else [])
WIDTHS = (8, 24, 16, 8, 32)


def hmoe_layer(impl="loop", **kw) -> MoE:
    return MoE(MoEConfig(d_model=16, num_experts=5, top_k=2, expert_hidden_sizes=WIDTHS, expert_impl=impl, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_and_gradients_match_a_loop_over_experts_of_their_own_width(impl):
    torch.manual_seed(0)
    layer = hmoe_layer(impl, num_shared_experts=1)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = layer(x)
    d, ex = out.decision, layer.experts
    assert [ex.w_gate[e].shape[1] for e in range(5)] == list(WIDTHS)
    x_TD = x.reshape(-1, 16)
    ref = [layer.shared_experts(x_TD[t:t + 1])[0] for t in range(21)]
    for t, e, g in zip(d.token_ids.tolist(), d.expert_ids.tolist(), d.weights):
        ref[t] = ref[t] + g * ((F.silu(x_TD[t] @ ex.w_gate[e]) * (x_TD[t] @ ex.w_up[e])) @ ex.w_down[e])
    ref = torch.stack(ref).view_as(x)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    up = torch.randn_like(ref)
    got = torch.autograd.grad((out.y * up).sum(), [x, *layer.parameters()], retain_graph=True)
    want = torch.autograd.grad((ref * up).sum(), [x, *layer.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_padding_to_the_widest_expert_is_exact():
    experts = HeterogeneousSwiGLUExperts(6, (2, 5, 3))
    w_gate, w_up, w_down = experts.stacked()
    assert w_gate.shape == w_up.shape == (3, 6, 5) and w_down.shape == (3, 5, 6)
    assert (w_gate[0, :, 2:] == 0).all() and (w_down[2, 3:] == 0).all()
    torch.testing.assert_close(w_gate[1], experts.w_gate[1])
    x = torch.randn(9, 6)
    counts = torch.tensor([4, 0, 5])
    torch.testing.assert_close(experts(x, counts, impl="bmm"), experts(x, counts, impl="loop"))


def test_parameter_counts_with_ragged_widths():
    layer = hmoe_layer()
    assert sum(p.numel() for p in layer.experts.parameters()) == 3 * 16 * sum(WIDTHS)
    # the harness keeps the homogeneous total: widths 0.25..1.75 x 32 (tiny) average to 32
    homogeneous = MoETransformer(model_preset("tiny"))
    hetero = MoETransformer(model_preset("tiny", moe_overrides={"expert_width_ratios": (0.25, 0.75, 1.25, 1.75)}))
    assert hetero.config.moe.hidden_sizes == (8, 24, 40, 56) * 2
    assert hetero.param_counts()["total"] == homogeneous.param_counts()["total"]


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a, b = hmoe_layer(), hmoe_layer()
    b.load_state_dict(a.state_dict())
    x = torch.randn(12, 16)
    torch.testing.assert_close(a(x).y, b(x).y)
    assert "experts.w_gate.4" in a.state_dict() and a.state_dict()["experts.w_down.1"].shape == (24, 16)


def test_parameter_penalty_weights_loads_by_size():
    torch.manual_seed(2)
    layer = hmoe_layer(balancers=(ParameterPenalty(coeff=1.0),))
    out = layer(torch.randn(30, 16))
    d = out.decision
    sizes = torch.tensor(WIDTHS, dtype=torch.float32)
    expected = switch_loss_from_counts(normalized_probs(d.scores), d.routed_tokens_per_expert,
                                       expert_weights_E=sizes / sizes.mean())
    torch.testing.assert_close(out.losses["parameter_penalty"], expected)
    # by hand: two experts of widths 1 and 3, all tokens on the small one, P = (0.5, 0.5)
    probs, counts = torch.tensor([[0.5, 0.5]]), torch.tensor([4, 0])
    assert float(switch_loss_from_counts(probs, counts, expert_weights_E=torch.tensor([0.5, 1.5]))) == 0.5
    assert float(switch_loss_from_counts(probs, torch.tensor([0, 4]), expert_weights_E=torch.tensor([0.5, 1.5]))) == 1.5


def test_compute_targets_and_loss_free_reaches_equal_compute():
    shares = target_shares(LossFree(balance="compute"), 3, 3, (8, 16, 32))
    torch.testing.assert_close(shares, torch.tensor([4, 2, 1], dtype=torch.float64) / 7)
    torch.manual_seed(3)
    layer = hmoe_layer(balancers=(LossFree(rule="adaptive", balance="compute"),))
    skew = torch.randn(16)
    history = []
    for _ in range(150):
        x = (torch.randn(512, 16) + skew).requires_grad_()
        out = layer(x)
        out.y.sum().backward()
        update_balancers(layer)
        history.append(out.decision.routed_tokens_per_expert.double())
    widths = torch.tensor(WIDTHS, dtype=torch.float64)
    first, last = history[0], torch.stack(history[-20:]).sum(0)
    assert float(max_vio(first * widths)) > 0.5
    assert float(max_vio(last * widths)) < 0.1  # equal compute, so very unequal tokens:
    assert last[0] / last[4] == pytest.approx(32 / 8, rel=0.15)


def test_compute_metrics_hand_computed():
    moe = MoEConfig(d_model=2, num_experts=2, top_k=1, expert_hidden_sizes=(1, 3), constant_experts=1)
    counts = torch.tensor([[3, 1]])  # one layer: 3 tokens on the width-1 expert, 1 on width 3
    kinds = torch.tensor([[4, 0, 0, 2]])  # and 2 on the constant expert, 6 tokens in all
    m = compute_metrics(counts, kinds, moe, tokens=6)
    assert m["maxvio_compute"] == pytest.approx(0.0)  # 3 x 1 == 1 x 3
    assert m["routed_params_per_token"] == pytest.approx((3 * 1 + 1 * 3) * 3 * 2 / 6 + 2 * 3 * 2 / 6)


def test_widths_and_config_errors():
    assert heterogeneous_widths((0.25, 0.75, 1.25, 1.75), 8, 96) == (24, 72, 120, 168) * 2
    assert heterogeneous_widths((0.01,), 2, 96) == (8, 8)
    with pytest.raises(ValueError, match="exactly one of expert_hidden_size .* and expert_hidden_sizes"):
        MoEConfig(d_model=4, num_experts=2, top_k=1, expert_hidden_size=4, expert_hidden_sizes=(4, 4))
    with pytest.raises(ValueError, match="expert_hidden_sizes=\\(4,\\) must be a tuple of num_experts=2 integers"):
        MoEConfig(d_model=4, num_experts=2, top_k=1, expert_hidden_sizes=(4,))
    with pytest.raises(ValueError, match="ParameterPenalty weights experts by their size"):
        MoEConfig(d_model=4, num_experts=2, top_k=1, expert_hidden_size=4, balancers=(ParameterPenalty(),))
    with pytest.raises(ValueError, match="LossFree\\(balance='compute'\\) needs MoEConfig.expert_hidden_sizes"):
        MoEConfig(d_model=4, num_experts=2, top_k=1, expert_hidden_size=4, balancers=(LossFree(balance="compute"),))
    with pytest.raises(ValueError, match="expert_impl='grouped_mm' needs d_model and expert_hidden_size to be "
                                         "multiples of 8 \\(got 16 and 12\\)"):
        MoEConfig(d_model=16, num_experts=2, top_k=1, expert_hidden_sizes=(8, 12), expert_impl="grouped_mm")
    with pytest.raises(ValueError, match="TrainConfig.expert_width_ratios='0,1' must be comma-separated positive"):
        train_config("tiny", expert_width_ratios="0,1")


def test_methods_and_flags():
    c = model_config(train_config("quick", method="hmoe")).moe
    assert c.hidden_sizes[:4] == (24, 72, 120, 168) and sum(c.hidden_sizes) == 32 * 96
    assert any(isinstance(b, ParameterPenalty) for b in c.balancers)
    assert model_config(train_config("quick", method="hmoe_loss_free")).moe.balancers[0].balance == "compute"
    c = model_config(train_config("tiny", method="loss_free", expert_width_ratios="0.5,1.5")).moe
    assert c.hidden_sizes == (16, 48) * 4
