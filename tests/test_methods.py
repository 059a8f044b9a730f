"""Named balancing methods: every recipe builds a working layer; exact recipe values; sweeps."""

import ast
from pathlib import Path

import pytest
import torch

from moe_balance import AuxLoss, LossFree, MoE, RouterConfig, ZLoss, update_balancers
from moe_balance.harness import methods
from moe_balance.harness.methods import SWEEPS, Method, get_method, list_methods, register_method

LAYER = dict(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8, num_shared_experts=1)


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_every_method_builds_a_working_layer(name):
    method = get_method(name)
    assert method.name == name and method.description
    config = method.moe_config(**LAYER)
    assert config.balancers == method.balancers and config.router == method.router
    torch.manual_seed(0)
    layer = MoE(config).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = layer(x)
    loss_specs = [s for s in method.balancers if not isinstance(s, LossFree)]
    assert len(out.losses) == len(loss_specs)
    assert (out.aux_loss.item() == 0.0) == all(s.coeff == 0 for s in loss_specs)
    (out.y.square().mean() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all() and layer.router.weight.grad is not None
    start = None if layer.expert_bias is None else layer.expert_bias.clone()
    update_balancers(layer)
    held = max((s.start_after_steps for s in method.balancers if isinstance(s, LossFree)), default=0)
    for _ in range(held):  # a held bias stays at its start; the next update moves it
        assert torch.equal(layer.expert_bias, start)
        out = layer(x)
        (out.y.square().mean() + out.aux_loss).backward()
        update_balancers(layer)
    if any(isinstance(s, LossFree) for s in method.balancers):
        assert layer.expert_bias.abs().sum() > 0


def test_required_methods_are_registered():
    names = {m.name for m in list_methods()}
    assert {"no_balance", "aux_loss", "aux_loss_1e-2", "aux_loss_1e-4", "seq_aux", "global_aux",
            "loss_free", "loss_free_u1e-2", "loss_free_u1e-4", "loss_free_error", "deepseek_v3",
            "z_loss", "loss_free_u1e-3", "aux_loss_0"} <= names


def test_recipe_values():
    sigmoid = RouterConfig()
    assert get_method("no_balance").balancers == () and get_method("no_balance").router == sigmoid
    assert get_method("aux_loss").balancers == (AuxLoss(coeff=1e-3, scope="micro_batch"),)
    assert get_method("aux_loss").router.score_fn == "sigmoid"
    assert get_method("aux_loss_1e-2").balancers == (AuxLoss(coeff=1e-2),)
    assert get_method("aux_loss_1e-4").balancers == (AuxLoss(coeff=1e-4),)
    assert get_method("seq_aux").balancers == (AuxLoss(coeff=1e-3, scope="sequence"),)
    assert get_method("global_aux").balancers == (AuxLoss(coeff=1e-3, scope="global_batch"),)
    assert get_method("loss_free").balancers == (LossFree(update_rate=1e-3, rule="sign"),)
    assert get_method("loss_free").router == sigmoid
    assert get_method("loss_free_u1e-3").balancers == get_method("loss_free").balancers
    assert get_method("loss_free_u1e-2").balancers == (LossFree(update_rate=1e-2),)
    assert get_method("loss_free_u1e-4").balancers == (LossFree(update_rate=1e-4),)
    assert get_method("loss_free_error").balancers == (LossFree(update_rate=1e-3, rule="error"),)
    assert get_method("z_loss").balancers == (ZLoss(coeff=1e-3), AuxLoss(coeff=1e-3))


def test_deepseek_v3_recipe():
    m = get_method("deepseek_v3")
    assert m.balancers == (LossFree(update_rate=1e-3, rule="sign"), AuxLoss(coeff=1e-4, scope="sequence"))
    assert m.router.score_fn == "sigmoid"
    assert m.router.normalize_weights is True and m.router.scaling_factor == 2.5
    assert "2.5" in m.description and "scale" in m.description


def test_sweeps_hold_the_papers_values():
    rates = [m.balancers[0].update_rate for m in SWEEPS["update_rate"]]
    assert rates == [1e-4, 1e-3, 1e-2]
    assert all(m.balancers == (LossFree(update_rate=m.balancers[0].update_rate),)
               for m in SWEEPS["update_rate"])
    coeffs = [m.balancers[0].coeff for m in SWEEPS["aux_coeff"]]
    assert coeffs == [1e-2, 1e-3, 1e-4, 0.0]
    assert all(m.balancers[0].scope == "micro_batch" for m in SWEEPS["aux_coeff"])
    for sweep in SWEEPS.values():
        assert all(get_method(m.name) == m for m in sweep)  # sweep members are registered
    assert [m.name for m in SWEEPS["update_rate"]] == ["loss_free_u1e-4", "loss_free_u1e-3", "loss_free_u1e-2"]


def test_controller_and_form_recipes():
    # from scratch the adaptive controller holds the bias for 50 steps and uses a faster gain than
    # the library's default; one ablation does not hold, the other keeps the library's gain
    assert get_method("loss_free_adaptive").balancers == (LossFree(rule="adaptive", start_after_steps=50,
                                                                   smoothing=0.7),)
    assert get_method("loss_free_adaptive_nohold").balancers == (LossFree(rule="adaptive", smoothing=0.7),)
    assert get_method("loss_free_adaptive_s09").balancers == (LossFree(rule="adaptive", start_after_steps=50),)
    assert LossFree().smoothing == 0.9  # the library's default is unchanged
    assert get_method("loss_free_mult").balancers == (LossFree(update_rate=1e-3, form="multiplicative"),)
    assert get_method("loss_free_adaptive_mult").balancers == (
        LossFree(rule="adaptive", form="multiplicative", start_after_steps=50, smoothing=0.7),)
    assert get_method("loss_free").balancers == (LossFree(update_rate=1e-3, rule="sign"),)  # the paper's, unchanged
    rules = [(m.balancers[0].rule, m.balancers[0].update_rate, m.balancers[0].start_after_steps,
              m.balancers[0].smoothing) for m in SWEEPS["controller"][1:]]
    assert rules == [("sign", 1e-4, 0, 0.9), ("sign", 1e-3, 0, 0.9), ("sign", 1e-2, 0, 0.9), ("error", 1e-3, 0, 0.9),
                     ("adaptive", 1e-3, 50, 0.7), ("adaptive", 1e-3, 0, 0.7), ("adaptive", 1e-3, 50, 0.9)]
    assert SWEEPS["controller"][0].balancers == (AuxLoss(coeff=1e-3),)
    assert [m.name for m in SWEEPS["controller"]][::2] == ["aux_loss", "loss_free", "loss_free_error",
                                                          "loss_free_adaptive_nohold"]
    assert SWEEPS["controller"][-1].name == "loss_free_adaptive_s09"
    assert [m.balancers[0].form for m in SWEEPS["form"]] == ["additive", "multiplicative"] * 2


def test_get_method_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: .*deepseek_v3.*loss_free"):
        get_method("nope")


def test_register_method(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    custom = Method(name="loss_free_centered", description="centered bias",
                    balancers=(LossFree(center=True),))
    assert register_method(custom) is custom
    assert get_method("loss_free_centered") is custom and list_methods()[-1] is custom
    with pytest.raises(ValueError, match="already registered"):
        register_method(custom)
    replacement = Method(name="loss_free_centered", description="v2", balancers=(LossFree(),))
    register_method(replacement, replace=True)
    assert get_method("loss_free_centered") is replacement
    with pytest.raises(ValueError, match="expects a Method"):
        register_method("loss_free")


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="", description="d"), r"Method.name='' must be a non-empty string"),
    (dict(name="x", description="d", balancers=[LossFree()]), r"must be a tuple"),
    (dict(name="x", description="d", balancers=("aux",)), r"must be a tuple of"),
    (dict(name="x", description="d", router="sigmoid"), r"Method.router must be a RouterConfig"),
])
def test_method_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Method(**kwargs)


def test_methods_imports_only_config():
    """Layering: methods sits below moe and model."""
    tree = ast.parse(Path(methods.__file__).read_text())
    local = [node.module for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert local == ["config"]
