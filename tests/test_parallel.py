"""Expert parallelism on spawned gloo processes equals one process on the same global batch."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, RouterConfig, ZLoss, update_balancers
from moe_balance.parallel import (clip_grad_norm, expert_ranks, gather_optimizer_state, gather_state_dict,
                                  init_parallel, load_full_optimizer_state, load_full_state_dict, parallelize,
                                  ranks_per_token, shutdown, sync_gradients)
from moe_balance.testing import free_port, init_gloo, spawn

D, B, S = 8, 4, 6  # global batch: B sequences of S tokens, split over the ranks by sequence
CONFIG = MoEConfig(d_model=D, num_experts=8, top_k=2, expert_hidden_size=16, num_shared_experts=1,
                   expert_impl="loop",
                   balancers=(LossFree(rule="adaptive"), AuxLoss(coeff=0.1, scope="global_batch"),
                              AuxLoss(coeff=0.1, scope="sequence"), ZLoss(coeff=1e-3)))


def global_batch(micro=0):
    g = torch.Generator().manual_seed(10 + micro)
    # skewed inputs: a few experts are overloaded, so the bias update is not trivial
    x = torch.randn(B, S, D, generator=g) + torch.linspace(-1, 2, D)
    c = torch.randn(B, S, D, generator=g)
    return x, c


def objective(out, c):
    """Mean over this batch's tokens of <y, c>, plus the balancing losses."""
    return (out.y * c).sum(-1).mean() + out.aux_loss


def rank0_outcome(fn, seconds, *args):
    """Spawn 2 ranks of fn(rank, world, port, results, *args) in which rank 1 goes missing;
    wait up to ``seconds`` for rank 0 to record what it saw, then kill both."""
    results = mp.Manager().dict()
    context = mp.spawn(fn, args=(2, free_port(), results, *args), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while 0 not in results and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in context.processes:
        p.kill()
    assert 0 in results, "rank 0 hung instead of failing"
    return dict(results)


def ep_worker(rank, world, port, results, ep, micro_batches, config):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(ep)
        torch.manual_seed(0)
        layer = parallelize(MoE(config), groups)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        ys, losses = [], []
        for m in range(micro_batches):
            x, c = global_batch(m)
            out = layer(x[rows])
            (objective(out, c[rows]) / micro_batches).backward()
            ys.append(out.y.detach().clone())
            losses.append({k: v.detach().clone() for k, v in out.losses.items()})
        sync_gradients(layer, groups)
        full_grads = {}
        for name, p in layer.named_parameters():
            g = p.grad.contiguous()
            if name.startswith("experts."):
                parts = [torch.empty_like(g) for _ in range(ep)]
                dist.all_gather(parts, g, group=groups.expert)
                g = torch.cat(parts)
            full_grads[name] = g.clone()
        update_balancers(layer)
        results[rank] = {"y": ys, "losses": losses, "grads": full_grads, "bias": layer.expert_bias.clone(),
                         "sent_rows": layer.experts.last_sent_rows if ep > 1 else 0}
        del layer, out, ys
    finally:
        shutdown()


def reference(micro_batches, config=CONFIG):
    torch.manual_seed(0)
    layer = MoE(config)
    ys, losses = [], []
    for m in range(micro_batches):
        x, c = global_batch(m)
        out = layer(x)
        (objective(out, c) / micro_batches).backward()
        ys.append(out.y.detach())
        losses.append(out.losses)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    update_balancers(layer)
    return ys, losses, grads, layer.expert_bias.clone()


@pytest.mark.parametrize("world, ep, micro_batches", [(2, 2, 1), (2, 2, 2), (2, 1, 2)],
                         ids=["ep2", "ep2-grad-accum", "dp2"])
def test_parallel_layer_equals_one_process(world, ep, micro_batches):
    results = spawn(ep_worker, world, ep, micro_batches, CONFIG)
    ys, losses, grads, bias = reference(micro_batches)
    for rank in range(world):
        r = results[rank]
        rows = slice(rank * B // world, (rank + 1) * B // world)
        for m in range(micro_batches):
            torch.testing.assert_close(r["y"][m], ys[m][rows], rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        # the bias is the single process's: counts (and margin histograms) of the global batch
        torch.testing.assert_close(r["bias"], bias, rtol=0, atol=1e-7)
    assert not torch.equal(bias, torch.zeros_like(bias)), "the update should have moved the bias"
    # each loss is a mean over tokens or sequences: the ranks' mean is the single process's
    for m in range(micro_batches):
        for name, value in losses[m].items():
            mean = sum(results[r]["losses"][m][name] for r in range(world)) / world
            torch.testing.assert_close(mean, value.detach(), rtol=1e-5, atol=1e-7, msg=name)
    if ep > 1:  # tokens really crossed ranks, both ways
        assert all(results[r]["sent_rows"] > 0 for r in range(world))


def state_worker(rank, world, port, results):
    """Checkpoint round trip: gathered state dicts equal the single-process ones, and loading
    them back gives each rank its own slice."""
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(2)
        torch.manual_seed(0)
        layer = parallelize(MoE(CONFIG), groups)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        x, c = global_batch()
        objective(layer(x[rank * 2:(rank + 1) * 2]), c[rank * 2:(rank + 1) * 2]).backward()
        sync_gradients(layer, groups)
        norm = clip_grad_norm(layer, 0.05, groups)
        opt.step()
        update_balancers(layer)  # checkpoints are taken after the update: no rank-local pending counts
        state, opt_state = gather_state_dict(layer, groups), gather_optimizer_state(opt, layer, groups)
        # a fresh parallel layer and optimizer take the full state back
        torch.manual_seed(1)
        other = parallelize(MoE(CONFIG), groups)
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
        load_full_state_dict(other, state, groups)
        load_full_optimizer_state(other_opt, other, opt_state, groups)
        same = all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), other.state_dict().values()))
        same_opt = all(torch.equal(a, b) for i in opt.state_dict()["state"]
                       for a, b in zip(opt.state_dict()["state"][i].values(), other_opt.state_dict()["state"][i].values()))
        results[rank] = {"state": state, "opt": opt_state, "norm": norm, "same": same, "same_opt": same_opt}
        del layer, other
    finally:
        shutdown()


def test_gathered_state_is_the_single_process_state():
    results = spawn(state_worker, 2)
    torch.manual_seed(0)
    layer = MoE(CONFIG)
    # SGD with momentum, not Adam: Adam's first step turns gradients at rounding level (an
    # expert's weight that barely matters) into full-size steps whose sign is noise
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x, c = global_batch()
    objective(layer(x), c).backward()
    norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.05)
    assert norm > 0.05, "the clip must bite for this test to check it"
    opt.step()
    update_balancers(layer)
    for rank in range(2):
        r = results[rank]
        assert r["same"] and r["same_opt"]
        torch.testing.assert_close(r["norm"], norm, rtol=1e-5, atol=0)
        assert r["state"].keys() == layer.state_dict().keys()
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        for i, per_param in opt.state_dict()["state"].items():
            for k, v in per_param.items():
                torch.testing.assert_close(r["opt"]["state"][i][k], v, rtol=1e-4, atol=1e-6)


def locality_worker(rank, world, port, results, bonus):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(2)
        torch.manual_seed(0)
        config = MoEConfig(d_model=D, num_experts=8, top_k=2, expert_hidden_size=16, expert_impl="loop")
        layer = parallelize(MoE(config), groups, locality_bonus=bonus)
        x, _ = global_batch()
        decision = layer(x[rank * 2:(rank + 1) * 2]).decision
        ranks_E = expert_ranks(8, 2)
        results[rank] = {"selected": decision.selected.clone(),
                         "cross": float((ranks_E[decision.selected] != rank).float().mean()),
                         "ranks": ranks_per_token(decision.selected, ranks_E).clone()}
        del layer, decision
    finally:
        shutdown()


def test_locality_bonus_keeps_tokens_on_their_rank():
    plain, local = spawn(locality_worker, 2, 0.0), spawn(locality_worker, 2, 10.0)
    torch.manual_seed(0)
    reference_layer = MoE(MoEConfig(d_model=D, num_experts=8, top_k=2, expert_hidden_size=16, expert_impl="loop"))
    x, _ = global_batch()
    selected = reference_layer(x).decision.selected
    for rank in range(2):
        # no bonus: the single process's choices; a large bonus: only local experts
        assert torch.equal(plain[rank]["selected"], selected[rank * 12:(rank + 1) * 12])
        assert plain[rank]["cross"] > 0.2
        assert local[rank]["cross"] == 0.0
        assert torch.equal(local[rank]["ranks"], torch.ones(12, dtype=torch.int64))


def test_ranks_per_token_counts_distinct_ranks():
    ranks_E = expert_ranks(8, 4)  # experts 0-1 on rank 0, 2-3 on rank 1, ...
    selected = torch.tensor([[0, 1, -1], [0, 2, 7], [3, 2, 8], [-1, -1, -1]])  # 8: a zero-computation expert
    assert ranks_per_token(selected, ranks_E).tolist() == [1, 3, 1, 0]
    with pytest.raises(ValueError, match="divisible"):
        expert_ranks(6, 4)


def device_limited_worker(rank, world, port, results):
    """DeepSeek-V3 device-limited routing: groups mapped onto ranks bound the ranks per token."""
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(2)
        torch.manual_seed(0)
        config = MoEConfig(d_model=D, num_experts=8, top_k=4, expert_hidden_size=16, expert_impl="loop",
                           router=RouterConfig(num_groups=2, topk_groups=1))
        layer = parallelize(MoE(config), groups)
        x, _ = global_batch()
        results[rank] = ranks_per_token(layer(x[rank * 2:(rank + 1) * 2]).decision.selected, expert_ranks(8, 2)).clone()
        del layer
    finally:
        shutdown()


def test_group_limited_routing_on_rank_groups_reaches_one_rank():
    results = spawn(device_limited_worker, 2)
    for rank in range(2):
        assert torch.equal(results[rank], torch.ones(12, dtype=torch.int64))


def dying_worker(rank, world, port, results, how):
    init_gloo(rank, world, port, timeout=8)
    groups = init_parallel(2, timeout=datetime.timedelta(seconds=8))
    torch.manual_seed(0)
    layer = parallelize(MoE(CONFIG), groups)
    if rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(40)  # hangs
        os._exit(0)
    started = time.monotonic()
    try:
        layer(global_batch()[0][:2])
    except Exception as err:  # noqa: BLE001 - the type is the backend's; the test reads the message
        results[rank] = {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - started}
    else:
        results[rank] = {"error": None, "seconds": time.monotonic() - started}
    os._exit(0)  # the group cannot be destroyed cleanly with a dead peer


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_lost_rank_fails_the_others_within_the_timeout(how):
    results = rank0_outcome(dying_worker, 60, how)
    assert results[0]["error"] is not None
    assert ("by peer" if how == "dies" else "Timed out") in results[0]["error"]  # closed or reset by peer
    assert results[0]["seconds"] < 30


def refusal_worker(rank, world, port, results):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(2)
        errors = []
        hmoe = MoEConfig(d_model=D, num_experts=4, top_k=2, expert_hidden_sizes=(8, 8, 16, 16))
        multiplicative = MoEConfig(d_model=D, num_experts=4, top_k=2, expert_hidden_size=8,
                                   balancers=(LossFree(form="multiplicative"),))
        for config, bonus in ((hmoe, 0.0), (multiplicative, 0.1)):
            try:
                parallelize(MoE(config), groups, locality_bonus=bonus)
            except ValueError as err:
                errors.append(str(err))
        results[rank] = errors
    finally:
        shutdown()


def test_layers_expert_parallelism_cannot_shard_are_refused():
    errors = spawn(refusal_worker, 2)[0]
    assert len(errors) == 2
    assert "expert parallelism shards equal-width SwiGLU experts" in errors[0] and "HMoE" in errors[0]
    assert "the multiplicative Loss-Free form multiplies them" in errors[1]


def training_worker(rank, world, port, results, data, cache, out):
    """The harness itself (train) on 2 ranks; rank 1 dies after step 3."""
    from moe_balance.harness.train import train, train_config

    init_gloo(rank, world, port, timeout=10)
    groups = init_parallel(2, timeout=datetime.timedelta(seconds=10))
    cfg = train_config("tiny", data=data, vocab_size=300, cache_dir=cache, steps=50, checkpoint_every=0)

    def on_step(step, record):
        if rank == 1 and step == 3:
            os._exit(7)

    started = time.monotonic()
    try:
        train(cfg, out, progress=False, on_step=on_step, parallel=groups)
    except Exception as err:  # noqa: BLE001 - recorded for the test to read
        results[rank] = {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - started}
    os._exit(0)


def test_the_harness_names_the_lost_rank_instead_of_hanging(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.txt").write_text(" ".join(f"word{j % 50}" for j in range(i, 3000 + i)))
    results = rank0_outcome(training_worker, 120, str(data), str(tmp_path / "cache"), str(tmp_path / "run"))
    assert results[0]["type"] == "DistributedFailure"
    message = results[0]["message"]
    assert "step 4 failed on rank 0" in message
    assert "another rank died or hung longer than --dist-timeout" in message
    # what rank 0 logged before the loss is kept: steps 1-3
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 3
