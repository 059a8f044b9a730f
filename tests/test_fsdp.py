"""FSDP2 over the parallel layout (``parallel.fully_shard_model``, ``--fsdp``): what is sharded,
what is not, and training that equals one process step by step."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moe_balance import LossFree, MoEConfig, RouterConfig, update_balancers
from moe_balance.harness.checkpoint import load_checkpoint
from moe_balance.harness.model import ModelConfig, MoETransformer
from moe_balance.parallel import (fully_shard_model, gather_state_dict, init_parallel, is_sharded, parallelize,
                                  sync_gradients)
from moe_balance.testing import init_gloo, spawn

from test_parallel_harness import ENV, metrics, resume_from_step_10, run, train_args


def tiny_model() -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, num_experts=4, top_k=2, expert_hidden_size=16, num_shared_experts=1,
                    router=RouterConfig(score_fn="sigmoid"), balancers=(LossFree(update_rate=1e-2),))
    return MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=8,
                                      dense_ffn_hidden=64, moe=moe, n_dense_layers=0))


def shard_worker(rank, world, port, results, ep):
    init_gloo(rank, world, port)
    try:
        groups = init_parallel(ep)
        model = parallelize(tiny_model(), groups)
        full = {k: v.clone() for k, v in gather_state_dict(model, groups).items()}
        fully_shard_model(model, groups)
        buffers = {name: b for name, b in model.named_buffers() if "balancers" in name}
        tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
        mine = tokens.chunk(world)[rank]
        model(mine[:, :-1], mine[:, 1:]).loss.backward()
        sync_gradients(model, groups)
        update_balancers(model)
        results[rank] = {
            "sharded": is_sharded(model),
            "dense_dtensor": all(isinstance(p, DTensor) for n, p in model.named_parameters() if "experts.w_" not in n),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                               for p in model.parameters()),
            "buffers_plain": all(not isinstance(b, DTensor) for b in buffers.values()),
            "bias": [b.clone() for n, b in buffers.items() if n.endswith("expert_bias")],
            "bias_dtype": {str(b.dtype) for n, b in buffers.items() if n.endswith("expert_bias")},
            "same_after_gather": all(torch.equal(v, full[k]) for k, v in gather_state_dict(model, groups).items()
                                     if "balancers" not in k),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_shards_parameters_not_the_balancers(ep):
    results = spawn(shard_worker, 2, ep)
    total = sum(p.numel() for p in tiny_model().parameters())
    for r in results.values():
        assert r["sharded"] and r["dense_dtensor"] and r["buffers_plain"]
        assert r["bias_dtype"] == {"torch.float32"}
        assert r["same_after_gather"]  # gathering the shards gives back the unsharded weights
        assert r["local_numel"] < 0.6 * total  # each rank holds about half (dim-0 shards round up)
    biases0, biases1 = results[0]["bias"], results[1]["bias"]
    assert all(torch.equal(a, b) for a, b in zip(biases0, biases1))  # one update from the global counts
    assert any(b.abs().sum() > 0 for b in biases0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, cache):
    """The issue's contract with FSDP2: one process, then 2 processes with expert parallelism,
    2 without, and 4 with 2 x 2 (experts sharded by FSDP2 over the expert-data dimension too)."""
    root = tmp_path_factory.mktemp("runs")
    for name, procs, extra in (("single", 1, []), ("fsdp_ep2", 2, ["--fsdp", "--expert-parallel", "2"]),
                               ("fsdp_dp2", 2, ["--fsdp"]), ("fsdp_ep2x2", 4, ["--fsdp", "--expert-parallel", "2"]),
                               ("dcp_ep2", 2, ["--fsdp", "--expert-parallel", "2", "--checkpoint-format", "dcp"])):
        proc = run(train_args(root / name, cache, *extra), procs=procs, timeout=400)
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.parametrize("name", ["fsdp_ep2", "fsdp_dp2", "fsdp_ep2x2", "dcp_ep2"])
def test_fsdp_trains_exactly_like_one_process(fsdp_runs, name):
    one, many = metrics(fsdp_runs / "single"), metrics(fsdp_runs / name)
    assert [r["step"] for r in many] == list(range(1, 21))
    for a, b in zip(one, many):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["maxvio_batch"] == pytest.approx(a["maxvio_batch"], abs=1e-6)
        torch.testing.assert_close(torch.tensor(b["bias"]), torch.tensor(a["bias"]), rtol=0, atol=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ev1, ev2 = (json.loads((fsdp_runs / d / "eval.json").read_text()) for d in ("single", name))
    assert ev2["val_loss"] == pytest.approx(ev1["val_loss"], rel=1e-4)
    assert ev2["params"] == ev1["params"]
    assert json.loads((fsdp_runs / name / "config.json").read_text())["train"]["fsdp"] is True


def test_an_fsdp_checkpoint_resumes_on_one_process_and_on_another_layout(fsdp_runs, cache, tmp_path):
    for procs, extra in ((1, []), (2, ["--fsdp"]), (2, ["--expert-parallel", "2"])):
        resume_from_step_10(fsdp_runs / "fsdp_ep2", tmp_path / f"resumed{procs}{''.join(extra)}", cache, procs,
                            extra, metrics(fsdp_runs / "single"))


def test_a_sharded_checkpoint_has_one_file_per_rank_and_resumes_on_any_layout(fsdp_runs, cache, tmp_path):
    run_dir = fsdp_runs / "dcp_ep2"
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-00000010.dcp", "ckpt-00000020.dcp"]
    assert sorted(p.name for p in (run_dir / "ckpt-00000010.dcp").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own part
    for procs, extra in ((1, []), (2, ["--fsdp", "--checkpoint-format", "dcp"]), (2, ["--expert-parallel", "2"])):
        resume_from_step_10(run_dir, tmp_path / f"resumed{procs}{''.join(extra)}", cache, procs, extra,
                            metrics(fsdp_runs / "single"))


def test_a_killed_sharded_save_leaves_the_previous_checkpoint(fsdp_runs, cache, tmp_path):
    """What a rank killed during step 20's save leaves (simulated: the ranks' partial directory,
    never renamed into place; a directory with the checkpoint's name but no DCP metadata):
    the resume takes step 10's checkpoint, removes the debris and continues exactly."""
    source = tmp_path / "source"
    shutil.copytree(fsdp_runs / "dcp_ep2", source)
    partial = source / ".ckpt-00000020.dcp.partial"
    shutil.move(source / "ckpt-00000020.dcp", partial)
    (partial / ".metadata").unlink()
    (source / "ckpt-00000030.dcp").mkdir()
    (source / "ckpt-00000030.dcp" / "__0_0.distcp").write_bytes(b"cut")
    resume_from_step_10(source, tmp_path / "resumed", cache, 2, ["--fsdp", "--checkpoint-format", "dcp"],
                        metrics(fsdp_runs / "single"))
    assert not (tmp_path / "resumed" / ".ckpt-00000020.dcp.partial").exists()


KILL_RANK_1_IN_SECOND_SAVE = """
import os, sys
import torch.distributed.checkpoint.filesystem as fs
from moe_balance.harness.cli import main

if os.environ["RANK"] == "1":
    write, saves = fs.FileSystemWriter.write_data, []

    def write_then_die(self, plan, planner):
        saves.append(1)
        if len(saves) == 2:  # step 20's checkpoint: this rank dies while writing its part
            os._exit(9)
        return write(self, plan, planner)

    fs.FileSystemWriter.write_data = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(fsdp_runs, cache, tmp_path):
    """A real death: rank 1 of a 2-rank EP + FSDP2 run exits in the middle of step 20's DCP
    save. Step 10's checkpoint stays complete; one process resumes from it exactly."""
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_RANK_1_IN_SECOND_SAVE)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), *train_args(out, cache, "--fsdp", "--expert-parallel", "2",
                                                    "--checkpoint-format", "dcp")],
                          capture_output=True, text=True, env=ENV, timeout=400)
    assert proc.returncode != 0
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000010.dcp"]  # never renamed into place
    assert (out / ".ckpt-00000020.dcp.partial").is_dir() and not (out / "eval.json").exists()
    resumed = run(train_args(out, cache, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    reference, after = metrics(fsdp_runs / "single"), metrics(out)
    assert [r["step"] for r in after] == list(range(1, 21))
    for a, b in zip(reference[10:], after[10:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        torch.testing.assert_close(torch.tensor(b["bias"]), torch.tensor(a["bias"]), rtol=0, atol=1e-6)
    assert not (out / ".ckpt-00000020.dcp.partial").exists()  # the resumed run cleared the debris


def test_fsdp_without_processes_says_how_to_launch(cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_balance", *train_args(tmp_path / "x", cache, "--fsdp")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "TrainConfig.fsdp shards the model over processes" in proc.stderr and "torchrun" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_fsdp_holds_a_share_of_the_parameters_and_optimizer_state_per_rank(fsdp_runs):
    """eval.json's memory_per_rank: with FSDP2 over N ranks each holds about 1/N of the dense
    parameters and of the optimizer state; all of it on one process."""
    def memory(name):
        return json.loads((fsdp_runs / name / "eval.json").read_text())["memory_per_rank"]

    (one,) = memory("single")
    assert one["param_bytes"] == 4 * 155456 and one["optimizer_bytes"] == 2 * one["param_bytes"]  # fp32, Adam
    for name, n in (("fsdp_dp2", 2), ("fsdp_ep2", 2), ("fsdp_ep2x2", 4)):
        ranks = memory(name)
        assert len(ranks) == n
        for r in ranks:
            assert one["dense_param_bytes"] / n <= r["dense_param_bytes"] <= 1.1 * one["dense_param_bytes"] / n
            assert r["optimizer_bytes"] == 2 * r["param_bytes"] and r["peak_rss_bytes"] > 0
        assert sum(r["param_bytes"] for r in ranks) >= one["param_bytes"]  # every element is somewhere


def test_convert_checkpoint_round_trip_is_exact_and_the_converted_file_resumes(fsdp_runs, cache, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_runs / "dcp_ep2", run_dir)

    def convert(src, dst):
        proc = subprocess.run([sys.executable, "-m", "moe_balance", "convert-checkpoint", str(src), str(dst)],
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "torch.distributed is disabled" not in proc.stderr
        return proc

    one_file = run_dir / "ckpt-00000010.pt"
    convert(run_dir / "ckpt-00000010.dcp", one_file)
    convert(one_file, run_dir / "again.dcp")
    convert(run_dir / "again.dcp", run_dir / "again.pt")
    assert (run_dir / "again.pt").read_bytes() == one_file.read_bytes()  # the round trip is exact
    state, single = load_checkpoint(one_file), load_checkpoint(fsdp_runs / "single" / "ckpt-00000010.pt")
    assert state["step"] == 10
    for key, value in single["model"].items():  # the single-process layout, the same weights
        torch.testing.assert_close(state["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    refused = subprocess.run([sys.executable, "-m", "moe_balance", "convert-checkpoint", str(one_file),
                              str(run_dir / "again.pt")], capture_output=True, text=True, env=ENV, timeout=120)
    assert refused.returncode == 2 and "exists; choose a new name" in refused.stderr
    for name in ("ckpt-00000010.dcp", "again.dcp"):  # resume from the converted single file
        shutil.rmtree(run_dir / name)
    (run_dir / "again.pt").unlink()
    resume_from_step_10(run_dir, tmp_path / "resumed", cache, 1, [], metrics(fsdp_runs / "single"))
