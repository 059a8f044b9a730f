"""The torchtitan integration on torchtitan's own MoE layers: its sign rule reproduces
torchtitan's update bit for bit, the adaptive controller balances better, the conformance suite
passes, and the bias and the controller state survive a DCP checkpoint."""

import io
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import torchtitan.models.common.moe  # noqa: F401  (installed by `make`: see the Makefile)

from moe_balance import LossFree, update_balancers
from moe_balance.integrations.torchtitan import enable_balancing, torchtitan_moe_layers
from moe_balance.metrics import max_vio
from moe_balance.testing import init_gloo, spawn
from moe_balance.testing.conformance import CHECKS, Subject

from torchtitan_models import TinyTitan

TORCHTITAN_SIGN = LossFree(rule="sign", update_rate=1e-3, center_step=True)  # load_balance_coeff=1e-3


def _train(model, optimizer, batches, read_counts=None):
    """Train on the batches; each step's biases (and, with read_counts, the step's counts)."""
    biases, counts = [], []
    for tokens in batches:
        model.loss(tokens).backward()
        if read_counts is not None:
            counts.append(read_counts(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        biases.append([block.moe.expert_bias_E.clone() for block in model.layers.values()])
    return biases, counts


def _torchtitan_hook(model, optimizer):
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.distributed.parallel_dims import ParallelDims

    register_moe_load_balancing_hook(optimizer, [model], ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1,
                                                                       ep=1, world_size=1))


def _random_batches(steps=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (8, 17), generator=g) for _ in range(steps)]


def trajectory_worker(rank, world, port, results):
    init_gloo(rank, world, port)  # torchtitan's hook reads its "loss" mesh: a process group must exist
    try:
        out = {}
        for name, spec in (("torchtitan", None), ("ours", TORCHTITAN_SIGN),
                           ("ours_uncentred", LossFree(rule="sign", update_rate=1e-3))):
            torch.manual_seed(0)
            model = TinyTitan()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            _torchtitan_hook(model, optimizer)  # what torchtitan's trainer registers
            if spec is not None:
                enable_balancing(model, optimizer, spec=spec)  # removes it, adds ours
                out[f"{name}_hooks"] = len(optimizer._optimizer_step_pre_hooks)
            out[name] = _train(model, optimizer, _random_batches())[0]
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_the_sign_rule_reproduces_torchtitans_update_bit_for_bit():
    out = spawn(trajectory_worker, 1)[0]
    theirs, ours = out["torchtitan"], out["ours"]
    assert out["ours_hooks"] == 0  # torchtitan's pre-hook was removed: no double update
    assert len(theirs) == 20 and any(b.abs().sum() > 0 for b in theirs[-1])
    for step, (a, b) in enumerate(zip(theirs, ours), 1):
        for layer, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (step, layer)
    # without torchtitan's zero-mean step the trajectories part (the check is not vacuous)
    assert not all(torch.equal(x, y) for a, b in zip(theirs, out["ours_uncentred"]) for x, y in zip(a, b))


def _subject(spec=None) -> Subject:
    spec = spec or LossFree(update_rate=1e-2)

    def build(experts, score_fn):
        model = TinyTitan(experts=tuple(experts), score_func=score_fn)
        enable_balancing(model, spec=spec)
        return model

    def save_load(model):
        experts = [layer.router.num_experts for layer in torchtitan_moe_layers(model)]
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save(get_model_state_dict(model), checkpoint_id=tmp)  # torchtitan's checkpoint format
            fresh = build(experts, torchtitan_moe_layers(model)[0].router.score_func)
            state = get_model_state_dict(fresh)
            dcp.load(state, checkpoint_id=tmp)
            set_model_state_dict(fresh, state)
        return fresh

    return Subject(
        name=f"torchtitan integration ({spec.rule})", build=build, forward=lambda m, x, mask: m.hidden(x),
        biases=lambda m: [layer.expert_bias_E for layer in torchtitan_moe_layers(m)],
        pending=lambda m: [layer.router.balancer.pending_counts for layer in torchtitan_moe_layers(m)],
        update=update_balancers, save_load=save_load, d_model=32, top_k=2,
        unsupported={"padding_is_not_counted": "torchtitan's MoE takes no padding mask (its data loaders pack "
                                               "documents, so there is no padding)"})


@pytest.mark.parametrize("rule", ["sign", "adaptive"])
@pytest.mark.parametrize("check", CHECKS)
def test_the_torchtitan_integration_conforms(check, rule):
    subject = _subject(LossFree(rule=rule, update_rate=1e-2))
    if check in subject.unsupported:
        with pytest.raises(AssertionError):  # the declared limitation is real
            CHECKS[check](subject)
    else:
        CHECKS[check](subject)


def test_the_state_dict_keeps_torchtitans_key_and_the_controller_state_resumes():
    torch.manual_seed(0)
    model = TinyTitan()
    balancing = enable_balancing(model, torch.optim.SGD(model.parameters(), lr=0.1), spec=LossFree(rule="adaptive"))
    for tokens in _random_batches(3):
        model.loss(tokens).backward()
        update_balancers(model)
    state = model.state_dict()
    assert "layers.0.moe.expert_bias_E" in state and "layers.0.moe.router.balancer.expert_bias" not in state
    assert int(state["layers.0.moe.router.balancer.num_updates"]) == 3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    torch.manual_seed(1)
    fresh = TinyTitan()
    enable_balancing(fresh, spec=LossFree(rule="adaptive"))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for a, b in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    metrics = balancing.metrics()
    counts = [b.last_counts for b in balancing.balancers]
    assert metrics["maxvio_batch_layers"] == [float(max_vio(c)) for c in counts]
    assert [sum(row) for row in metrics["loads"]] == [8 * 16 * 2] * 2  # the last step's T K per layer
    with balancing.record_loads() as loads:  # held-out counting: eval forwards count here only
        model.eval()
        with torch.no_grad():
            model(_random_batches(1, seed=9)[0])
    assert [int(x.sum()) for x in loads] == [8 * 17 * 2] * 2
    assert all(int(b.pending_counts.sum()) == 0 for b in balancing.balancers)


def test_enable_balancing_refuses_what_it_cannot_balance():
    with pytest.raises(ValueError, match="found no torchtitan MoE layer"):
        enable_balancing(torch.nn.Linear(2, 2))
    model = TinyTitan()
    enable_balancing(model)
    with pytest.raises(ValueError, match="already enabled"):
        enable_balancing(model)
    with pytest.raises(ValueError, match="takes a LossFree spec"):
        enable_balancing(TinyTitan(), spec="adaptive")
