"""Every invalid configuration raises ValueError naming the field, the value and what is allowed."""

import pytest
import torch

from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, RouterConfig, ZLoss

BASE = dict(d_model=16, num_experts=8, top_k=2, expert_hidden_size=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(score_fn="relu"), r"score_fn='relu'.*sigmoid.*softmax"),
    (dict(drop_policy="random"), r"drop_policy='random'.*probs.*position"),
    (dict(scaling_factor=0.0), r"scaling_factor=0.0 must be a finite number > 0"),
    (dict(scaling_factor=float("nan")), r"scaling_factor=nan"),
    (dict(num_groups=4), r"num_groups and RouterConfig.topk_groups go together"),
    (dict(topk_groups=2), r"go together"),
    (dict(num_groups=0, topk_groups=1), r"num_groups=0 must be an integer >= 1"),
    (dict(num_groups=2, topk_groups=3), r"topk_groups=3 must be <= num_groups=2"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be > 0"),
    (dict(capacity_factor=-1.0), r"capacity_factor=-1.0 must be > 0"),
    # booleans are booleans, and a boolean is never a number
    (dict(normalize_weights="no"), r"RouterConfig.normalize_weights='no' must be True or False"),
    (dict(normalize_weights=1), r"RouterConfig.normalize_weights=1 must be True or False"),
    (dict(check_finite=None), r"RouterConfig.check_finite=None must be True or False"),
    (dict(scaling_factor=True), r"scaling_factor=True must be a finite number > 0"),
    (dict(capacity_factor=True), r"capacity_factor=True must be > 0"),
    (dict(num_groups=True, topk_groups=True), r"num_groups=True must be an integer >= 1"),
])
def test_router_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: LossFree(update_rate=-1e-3), r"LossFree.update_rate=-0.001 must be a finite number >= 0"),
    (lambda: LossFree(rule="momentum"), r"LossFree.rule='momentum'.*sign.*error.*adaptive"),
    (lambda: LossFree(form="log"), r"LossFree.form='log'.*additive.*multiplicative"),
    (lambda: LossFree(max_step=0.0), r"LossFree.max_step=0.0 must be a finite number > 0"),
    (lambda: LossFree(max_step=float("inf")), r"LossFree.max_step=inf must be a finite number > 0"),
    (lambda: LossFree(min_gain=0.0), r"LossFree.min_gain=0.0 must be a number in \(0, 1\]"),
    (lambda: LossFree(max_gain=1.5), r"LossFree.max_gain=1.5 must be a number in \(0, 1\]"),
    (lambda: LossFree(min_gain=0.5, max_gain=0.2), r"min_gain=0.5 must be <= max_gain=0.2"),
    (lambda: LossFree(smoothing=1.0), r"LossFree.smoothing=1.0 must be a number in \[0, 1\)"),
    (lambda: LossFree(freeze_after_steps=-1), r"freeze_after_steps=-1 must be an integer >= 0"),
    (lambda: LossFree(update_rate=True), r"LossFree.update_rate=True must be a finite number >= 0"),
    (lambda: LossFree(center="yes"), r"LossFree.center='yes' must be True or False"),
    (lambda: LossFree(max_gain=True), r"LossFree.max_gain=True must be a number in \(0, 1\]"),
    (lambda: LossFree(freeze_after_steps=False), r"freeze_after_steps=False must be an integer >= 0"),
    (lambda: LossFree(start_after_steps=-3), r"start_after_steps=-3 must be an integer >= 0"),
    (lambda: LossFree(start_after_steps=2.5), r"start_after_steps=2.5 must be an integer >= 0"),
    (lambda: AuxLoss(coeff=True), r"AuxLoss.coeff=True must be a finite number >= 0"),
    (lambda: ZLoss(coeff=False), r"ZLoss.coeff=False must be a finite number >= 0"),
    (lambda: AuxLoss(coeff=-1.0), r"AuxLoss.coeff=-1.0 must be a finite number >= 0"),
    (lambda: AuxLoss(coeff=1e-3, scope="token"), r"AuxLoss.scope='token'.*micro_batch.*sequence.*global_batch"),
    (lambda: ZLoss(coeff=float("inf")), r"ZLoss.coeff=inf must be a finite number >= 0"),
])
def test_balancer_spec_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=9), r"top_k=9 must be <= num_experts=8"),
    (dict(top_k=0), r"top_k=0 must be an integer >= 1"),
    (dict(d_model=0), r"d_model=0"),
    (dict(num_experts=2.5), r"num_experts=2.5"),
    (dict(num_shared_experts=-1), r"num_shared_experts=-1 must be an integer >= 0"),
    (dict(expert_impl="cuda"), r"expert_impl='cuda'.*loop"),
    (dict(router=RouterConfig(num_groups=3, topk_groups=1)), r"num_groups=3 must divide MoEConfig.num_experts=8"),
    (dict(top_k=5, router=RouterConfig(num_groups=4, topk_groups=2)),
     r"top_k=5 is not reachable with topk_groups=2 groups of 2 experts \(4 eligible\)"),
    (dict(balancers=[LossFree()]), r"balancers must be a tuple"),
    (dict(balancers=("aux",)), r"balancers contains 'aux'"),
    (dict(balancers=(LossFree(), LossFree())), r"at most one LossFree"),
    (dict(router={"score_fn": "sigmoid"}), r"router must be a RouterConfig"),
])
def test_moe_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **kwargs})


def test_infinite_capacity_and_zero_rates_are_valid():
    MoEConfig(**BASE, router=RouterConfig(capacity_factor=float("inf")))
    MoEConfig(**BASE, balancers=(LossFree(update_rate=0.0), AuxLoss(coeff=0.0), ZLoss(coeff=0.0)))


def test_forward_input_errors():
    layer = MoE(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=r"last dim must be d_model=16; got shape \(4, 12\)"):
        layer(torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"mask shape must equal the input's leading shape \(2, 5\); got \(2, 4\)"):
        layer(torch.randn(2, 5, 16), mask=torch.ones(2, 4, dtype=torch.bool))


def test_configs_are_frozen():
    cfg = MoEConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.top_k = 3
