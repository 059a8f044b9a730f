"""MoE++ (Jin et al. 2024, arXiv 2410.07348): zero-computation experts, gating residuals,
heterogeneous balance (tau in the aux loss, per-kind targets for Loss-Free), kind metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, RouterConfig
from moe_balance.balancing import switch_loss_from_counts, update_balancers
from moe_balance.harness.methods import get_method
from moe_balance.metrics import max_vio
from moe_balance.harness.model import MoETransformer, kind_loads, model_preset
from moe_balance.harness.train import kind_metrics, model_config, train_config


def one_of_each(**kw) -> MoE:
    """1 FFN expert (0), 1 zero (1), 1 copy (2), 1 constant (3) expert, top-1, d_model 4."""
    return MoE(MoEConfig(d_model=4, num_experts=1, top_k=1, expert_hidden_size=4, zero_experts=1,
                         copy_experts=1, constant_experts=1, **kw))


def route_token_t_to_expert_t(layer: MoE) -> torch.Tensor:
    """Router weight 10 * identity: input row t = e_t sends token t to expert t; returns x (4, 4)."""
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    return torch.eye(4) * 2


def test_each_zero_computation_kind_hand_computed():
    layer = one_of_each()
    x = route_token_t_to_expert_t(layer)
    out = layer(x)
    assert out.decision.selected.flatten().tolist() == [0, 1, 2, 3]
    g = torch.sigmoid(torch.tensor(20.0))  # sigmoid score of the chosen expert: logit 10 * 2
    w = layer.experts
    ffn = (F.silu(x[0] @ w.w_gate[0]) * (x[0] @ w.w_up[0])) @ w.w_down[0]
    torch.testing.assert_close(out.y[0], g * ffn)                   # FFN expert
    torch.testing.assert_close(out.y[1], torch.zeros(4))            # zero expert: discarded
    torch.testing.assert_close(out.y[2], g * x[2])                  # copy expert: identity
    v, mix = layer.constant_experts.vectors[0], layer.constant_experts.mix[0]
    a = torch.softmax(mix @ x[3], dim=0)                            # (a1, a2) = softmax(W_c x)
    torch.testing.assert_close(out.y[3], g * (a[0] * x[3] + a[1] * v))  # constant expert
    # gradients reach the constant expert's vector and mixing weights
    out.y.sum().backward()
    assert layer.constant_experts.vectors.grad.abs().sum() > 0 and layer.constant_experts.mix.grad.abs().sum() > 0


def test_only_ffn_assignments_reach_the_ffn_path():
    layer = one_of_each()
    x = route_token_t_to_expert_t(layer)
    rows = []
    layer.experts.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    layer(x)
    assert rows == [1]  # only token 0 chose the FFN expert
    rows.clear()
    y = layer(x[1:]).y  # tokens routed only to zero, copy and constant experts: no FFN call at all
    assert rows == []
    y.sum().backward()  # and the backward works without the FFN path
    two = MoE(MoEConfig(d_model=4, num_experts=2, top_k=2, expert_hidden_size=4, zero_experts=1, copy_experts=1))
    two.experts.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    d = two(torch.randn(30, 4)).decision
    assert rows[-1] == int(d.routed_tokens_per_expert[:2].sum())


def test_outputs_and_gradients_match_a_per_assignment_reference():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=8, num_experts=3, top_k=2, expert_hidden_size=8, zero_experts=1,
                          copy_experts=1, constant_experts=2, num_shared_experts=1, expert_impl="loop"))
    x = torch.randn(40, 8, requires_grad=True)
    out = layer(x)
    d = out.decision
    kinds = layer.config.expert_kinds()
    w, ce = layer.experts, layer.constant_experts
    ref = [layer.shared_experts(x[t:t + 1])[0] for t in range(40)]
    for t, e, g in zip(d.token_ids.tolist(), d.expert_ids.tolist(), d.weights):
        if kinds[e] == "ffn":
            y = (F.silu(x[t] @ w.w_gate[e]) * (x[t] @ w.w_up[e])) @ w.w_down[e]
        elif kinds[e] == "zero":
            y = torch.zeros(8)
        elif kinds[e] == "copy":
            y = x[t]
        else:
            j = e - kinds.index("constant")
            a = torch.softmax(ce.mix[j] @ x[t], dim=0)
            y = a[0] * x[t] + a[1] * ce.vectors[j]
        ref[t] = ref[t] + g * y
    ref = torch.stack(ref)
    assert set(kinds[e] for e in d.expert_ids.tolist()) == {"ffn", "zero", "copy", "constant"}
    torch.testing.assert_close(out.y, ref)
    up = torch.randn_like(ref)
    got = torch.autograd.grad((out.y * up).sum(), [x, *layer.parameters()], retain_graph=True)
    want = torch.autograd.grad((ref * up).sum(), [x, *layer.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gating_residual_adds_the_previous_layers_logits():
    torch.manual_seed(1)
    layer = MoE(MoEConfig(d_model=6, num_experts=4, top_k=2, expert_hidden_size=4,
                          router=RouterConfig(gating_residual=True)))
    x, prev = torch.randn(5, 6), torch.randn(5, 4)
    own = x @ layer.router.weight.T
    torch.testing.assert_close(layer(x).decision.logits, own)  # first layer: nothing to add
    torch.testing.assert_close(layer(x, prev_logits=prev).decision.logits, own + prev)  # W_g = I at start
    with torch.no_grad():
        layer.router.residual_weight.copy_(torch.arange(16.0).view(4, 4) / 10)
    torch.testing.assert_close(layer(x, prev_logits=prev).decision.logits,
                               own + prev @ layer.router.residual_weight.T)
    off = MoE(MoEConfig(d_model=6, num_experts=4, top_k=2, expert_hidden_size=4))
    off.load_state_dict({k: v for k, v in layer.state_dict().items() if "residual" not in k})
    torch.testing.assert_close(off(x, prev_logits=prev).decision.logits, own)  # option off: ignored
    with pytest.raises(ValueError, match="prev_logits shape \\(5, 3\\) must equal this layer's logits shape \\(5, 4\\)"):
        layer(x, prev_logits=torch.randn(5, 3))


def test_gating_residual_is_wired_through_the_model():
    torch.manual_seed(2)
    config = model_preset("tiny", router=RouterConfig(gating_residual=True), seq_len=16, n_layers=3)
    model = MoETransformer(config)
    assert all(torch.equal(m.router.residual_weight, torch.eye(8)) for m in model.moe_layers)  # kept by init
    logits, inputs = [], []

    def keep(mod, args, out):
        inputs.append(args[0])
        logits.append(out.decision.logits)

    for m in model.moe_layers:
        m.register_forward_hook(keep)
    model(torch.randint(0, 256, (2, 16)))
    first, second = model.moe_layers
    torch.testing.assert_close(logits[0], inputs[0].reshape(-1, 64) @ first.router.weight.T)
    torch.testing.assert_close(logits[1], inputs[1].reshape(-1, 64) @ second.router.weight.T + logits[0])


def test_tau_weights_the_zero_computation_terms():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]])
    counts = torch.tensor([1, 1, 1, 1])
    eta = torch.tensor([1.0, 1.0, 0.5, 0.5])
    # f = 1/4 each, P = (0.3, 0.25, 0.2, 0.25): 4 * (0.3 + 0.25 + 0.5 * (0.2 + 0.25)) / 4 = 0.775
    assert float(switch_loss_from_counts(probs, counts, expert_weights_E=eta)) == pytest.approx(0.775)
    layer = MoE(MoEConfig(d_model=4, num_experts=2, top_k=1, expert_hidden_size=4, zero_experts=1,
                          copy_experts=1, balancers=(AuxLoss(coeff=1.0, zero_computation_weight=0.5),)))
    out = layer(torch.randn(10, 4))
    d = out.decision
    expected = switch_loss_from_counts(d.scores / d.scores.sum(-1, keepdim=True), d.routed_tokens_per_expert,
                                       expert_weights_E=eta)
    torch.testing.assert_close(out.aux_loss, expected)


@pytest.mark.parametrize("rule,update_rate,steps,ffn_vio", [("sign", 5e-3, 300, 0.15), ("adaptive", 0.0, 150, 0.05)])
def test_loss_free_drives_each_kind_to_its_target(rule, update_rate, steps, ffn_vio):
    """A skewed router that prefers the zero-computation experts: the bias brings them to the
    20% the user asked for and spreads the rest evenly over the FFN experts."""
    torch.manual_seed(3)
    layer = MoE(MoEConfig(d_model=16, num_experts=6, top_k=2, expert_hidden_size=8, zero_experts=1, copy_experts=1,
                          balancers=(LossFree(rule=rule, update_rate=update_rate, zero_computation_share=0.2),)))
    with torch.no_grad():
        layer.router.weight[6:] += 1.0  # the zero and copy experts score high for every token
    skew = torch.randn(16) * 0.5 + 0.5
    history = []
    for _ in range(steps):
        x = (torch.randn(512, 16) + skew).requires_grad_()
        out = layer(x)
        out.y.sum().backward()
        update_balancers(layer)
        history.append(out.decision.routed_tokens_per_expert.double())
    start = history[0][6:].sum() / history[0].sum()
    counts = torch.stack(history[-20:]).sum(0)
    share = counts[6:].sum() / counts.sum()
    assert start > 0.6 and share == pytest.approx(0.2, abs=0.02)
    assert counts[6] / counts[6:].sum() == pytest.approx(0.5, abs=0.05)  # split evenly between them
    assert float(max_vio(counts[:6])) < ffn_vio  # the FFN experts share the rest evenly


def test_kind_loads_and_metrics():
    config = MoEConfig(d_model=4, num_experts=3, top_k=2, expert_hidden_size=4, zero_experts=1, constant_experts=2)
    assert config.num_routed_experts == 6 and config.expert_kinds() == ("ffn",) * 3 + ("zero", "constant", "constant")
    assert kind_loads(torch.tensor([5, 4, 3, 2, 1, 1]), config).tolist() == [12, 2, 0, 2]
    # two layers, 10 tokens of top-2: layer 0 sends 12 of 20 to FFN, layer 1 sends 16
    metrics = kind_metrics(torch.tensor([[12, 2, 0, 6], [16, 4, 0, 0]]), config, tokens=10)
    assert metrics["kind_fraction_ffn"] == pytest.approx((0.6 + 0.8) / 2)
    assert metrics["kind_fraction_constant"] == pytest.approx(0.15)
    assert metrics["ffn_compute_saved"] == pytest.approx(1 - 1.4 / 2)  # 1.4 FFN experts per token of 2
    assert kind_metrics(torch.tensor([[20, 0, 0, 0]]), MoEConfig(d_model=4, num_experts=3, top_k=2,
                                                                 expert_hidden_size=4), tokens=10) == {}


def test_state_dict_round_trip():
    torch.manual_seed(4)
    config = MoEConfig(d_model=8, num_experts=3, top_k=2, expert_hidden_size=8, zero_experts=1, copy_experts=1,
                       constant_experts=1, router=RouterConfig(gating_residual=True),
                       balancers=(LossFree(zero_computation_share=0.3),))
    a, b = MoE(config), MoE(config)
    with torch.no_grad():
        a.router.residual_weight.add_(torch.randn(6, 6))
        a.balancers[0].expert_bias.copy_(torch.randn(6))
    b.load_state_dict(a.state_dict())
    x, prev = torch.randn(20, 8), torch.randn(20, 6)
    torch.testing.assert_close(b(x, prev_logits=prev).y, a(x, prev_logits=prev).y)
    assert {"constant_experts.vectors", "constant_experts.mix", "router.residual_weight"} <= set(a.state_dict())


def test_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="LossFree.zero_computation_share needs zero-computation experts"):
        MoEConfig(d_model=4, num_experts=3, top_k=2, expert_hidden_size=4,
                  balancers=(LossFree(zero_computation_share=0.2),))
    with pytest.raises(ValueError, match="AuxLoss.zero_computation_weight weights zero-computation experts"):
        MoEConfig(d_model=4, num_experts=3, top_k=2, expert_hidden_size=4,
                  balancers=(AuxLoss(coeff=1e-3, zero_computation_weight=0.5),))
    with pytest.raises(ValueError, match="LossFree.zero_computation_share=1.0 must be a number in \\(0, 1\\)"):
        LossFree(zero_computation_share=1.0)
    with pytest.raises(ValueError, match="MoEConfig.copy_experts=-1 must be an integer >= 0"):
        MoEConfig(d_model=4, num_experts=3, top_k=2, expert_hidden_size=4, copy_experts=-1)
    with pytest.raises(ValueError, match="MoEConfig.top_k=5 must be <= num_experts=3 \\+ 1 zero-computation experts"):
        MoEConfig(d_model=4, num_experts=3, top_k=5, expert_hidden_size=4, zero_experts=1)
    with pytest.raises(ValueError, match="TrainConfig.zero_experts=-2 must be an integer >= 0 or None"):
        train_config("tiny", zero_experts=-2)


def test_methods_and_harness_flags():
    m = get_method("moe_plus_plus")
    assert m.layer == {"zero_experts": 1, "copy_experts": 1, "constant_experts": 2} and m.router.gating_residual
    config = model_config(train_config("quick", method="moe_plus_plus_loss_free")).moe
    assert config.num_routed_experts == 36 and config.balancers[0].zero_computation_share == 0.2
    # flags override the method: plain Loss-Free with two zero experts and the gating residual
    config = model_config(train_config("quick", method="loss_free", zero_experts=2, gating_residual=True)).moe
    assert config.expert_kinds()[-2:] == ("zero", "zero") and config.router.gating_residual
    assert model_config(train_config("quick", method="moe_plus_plus", constant_experts=0)).moe.constant_experts == 0
