"""The training harness under torchrun: the issue's contract, resume, and failures that say why."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moe_balance.harness.checkpoint import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(args, *, procs=1, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "moe_balance", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def train_args(out, cache, *extra):
    return ["train", "--preset", "tiny", "--steps", "20", "--out", str(out), "--cache-dir", cache, *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def resume_from_step_10(run_dir, out, cache, procs, extra, reference):
    """Copy a finished 20-step run without its last checkpoint and results, resume it from step
    10 on ``procs`` processes with ``extra`` flags: steps 11-20 must equal ``reference``'s."""
    shutil.copytree(run_dir, out)
    for name in ("ckpt-00000020.pt", "eval.json", "model.safetensors"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "ckpt-00000020.dcp", ignore_errors=True)  # a sharded run's last checkpoint
    proc = run(train_args(out, cache, "--resume", *extra), procs=procs)
    assert proc.returncode == 0, proc.stderr
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for a, b in zip(reference[10:], resumed[10:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        torch.testing.assert_close(torch.tensor(b["bias"]), torch.tensor(a["bias"]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """The issue's contract: one process, and torchrun with 2 expert-parallel processes."""
    root = tmp_path_factory.mktemp("runs")
    single = run(train_args(root / "single", cache))
    assert single.returncode == 0, single.stderr
    parallel = run(train_args(root / "ep2", cache, "--expert-parallel", "2"), procs=2)
    assert parallel.returncode == 0, parallel.stderr
    return root, parallel


def test_two_expert_parallel_processes_train_exactly_like_one(runs):
    root, _ = runs
    one, two = metrics(root / "single"), metrics(root / "ep2")
    assert [r["step"] for r in two] == list(range(1, 21))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["maxvio_batch"] == pytest.approx(a["maxvio_batch"], abs=1e-6)  # the global batch's loads
        torch.testing.assert_close(torch.tensor(b["bias"]), torch.tensor(a["bias"]), rtol=0, atol=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ev1, ev2 = (json.loads((root / d / "eval.json").read_text()) for d in ("single", "ep2"))
    assert ev2["val_loss"] == pytest.approx(ev1["val_loss"], rel=1e-4)
    assert ev2["params"] == ev1["params"]  # the gathered model, not one rank's shard
    assert json.loads((root / "ep2" / "config.json").read_text())["parallel"] == {"processes": 2, "expert_parallel": 2}


def test_expert_parallel_records_device_loads_and_traffic(runs):
    root, _ = runs
    for r in metrics(root / "ep2"):
        loads = r["device_loads"]  # per MoE layer, the assignments each rank's experts processed
        tokens = 8 * 32  # tiny: 8 sequences of 32 tokens, top-2
        assert all(sum(layer) == 2 * tokens for layer in loads)
        ratio = sum(max(layer) / (sum(layer) / 2) for layer in loads) / len(loads)
        assert r["device_load_max_over_mean"] == pytest.approx(ratio)
        assert 1 <= r["ranks_per_token"] <= 2
        assert 0 < r["cross_rank_fraction"] < 1 and r["all_to_all_bytes"] > 0
    assert "device_loads" not in metrics(root / "single")[0]


def test_rank_zero_alone_prints_and_writes(runs):
    root, proc = runs
    assert proc.stdout.count("val_loss") == 1
    names = sorted(p.name for p in (root / "ep2").iterdir())
    assert names == sorted(p.name for p in (root / "single").iterdir())


def test_a_parallel_checkpoint_resumes_in_any_layout(runs, cache, tmp_path):
    """Checkpoints hold the single-process state: resuming step 10's onto 2 processes or onto
    one continues exactly like the uninterrupted run."""
    root, _ = runs
    full = load_checkpoint(root / "ep2" / "ckpt-00000010.pt")
    single = load_checkpoint(root / "single" / "ckpt-00000010.pt")
    for key, value in single["model"].items():
        torch.testing.assert_close(full["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for procs, extra in ((2, ["--expert-parallel", "2"]), (1, [])):
        resume_from_step_10(root / "ep2", tmp_path / f"resumed{procs}", cache, procs, extra, metrics(root / "single"))


def test_bad_layouts_fail_with_a_clear_error(cache, tmp_path):
    alone = run(train_args(tmp_path / "a", cache, "--expert-parallel", "2"))
    assert alone.returncode == 2
    assert "--expert-parallel 2 needs a multiple of 2 processes" in alone.stderr
    assert "torchrun --nproc_per_node=2" in alone.stderr
    odd = run(train_args(tmp_path / "b", cache, "--expert-parallel", "2", "--batch-size", "5"), procs=2)
    assert odd.returncode != 0 and "batch_size=5 must be divisible by the 2 processes" in odd.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_refused_run_directory_stops_every_rank(runs, cache):
    """Rank 0 owns the directory; when it refuses it, the other ranks stop too, at once."""
    root, _ = runs
    proc = run(train_args(root / "ep2", cache, "--expert-parallel", "2", "--dist-timeout", "600"), procs=2,
               timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("is not empty; pass --resume") == 2  # both ranks say why
