"""Sharded DCP checkpoints (``parallel.save_sharded`` / ``load_sharded``): written by 2 ranks in
one layout, read back exactly by another layout and by one process."""

import torch
import torch.distributed as dist

from moe_balance import update_balancers
from moe_balance.parallel import (fully_shard_model, gather_optimizer_state, gather_state_dict, init_parallel,
                                  parallelize, sync_gradients)
from moe_balance.parallel.dcp import load_sharded, save_sharded
from moe_balance.testing import init_gloo, spawn

from test_fsdp import tiny_model


def train_two_steps(model, optimizer, groups, rank, world):
    for step in range(2):
        tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step))
        mine = tokens.chunk(world)[rank]
        model(mine[:, :-1], mine[:, 1:]).loss.backward()
        if groups is not None:
            sync_gradients(model, groups)
        optimizer.step(); optimizer.zero_grad(); update_balancers(model)


def layout(groups, ep, fsdp):
    model = parallelize(tiny_model(), groups)
    if fsdp:
        fully_shard_model(model, groups)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def save_worker(rank, world, port, results, path, ep, fsdp):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(ep)
        model, optimizer = layout(groups, ep, fsdp)
        train_two_steps(model, optimizer, groups, rank, world)
        save_sharded(path, model, optimizer, groups, extra={"step": 2, "rng": torch.arange(3)})
        results[rank] = {"model": gather_state_dict(model, groups),
                         "optimizer": gather_optimizer_state(optimizer, model, groups)["state"]}
    finally:
        dist.destroy_process_group()


def load_worker(rank, world, port, results, path, ep, fsdp):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(ep)
        model, optimizer = layout(groups, ep, fsdp)
        extra = load_sharded(path, model, optimizer, groups, extra={"step": 0, "rng": torch.zeros(3, dtype=torch.int64)})
        results[rank] = {"model": gather_state_dict(model, groups),
                         "optimizer": gather_optimizer_state(optimizer, model, groups)["state"], "extra": extra}
    finally:
        dist.destroy_process_group()


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for i in a["optimizer"]:
        for name, v in a["optimizer"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"][i][name])), (i, name)


def test_a_sharded_checkpoint_loads_on_another_layout_and_on_one_process(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = spawn(save_worker, 2, path, 2, True)[0]  # expert parallel 2 with FSDP2
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert any(k.endswith("experts.w_gate") for k in saved["model"])
    for ep, fsdp in ((1, True), (2, False), (1, False)):
        loaded = spawn(load_worker, 2, path, ep, fsdp)
        for r in loaded.values():
            assert_same_state(saved, r)
            assert r["extra"]["step"] == 2 and torch.equal(r["extra"]["rng"], torch.arange(3))
    model = tiny_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trained = [k for k in init if not torch.equal(init[k], saved["model"][k])]
    assert any(k.endswith("experts.w_gate") for k in trained) and any(k.endswith("expert_bias") for k in trained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = load_sharded(path, model, optimizer, extra={"step": 0, "rng": torch.zeros(3, dtype=torch.int64)})
    assert extra["step"] == 2
    one = {"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]}
    assert_same_state(saved, one)
