"""Training harness: schedule, exact resume, metrics schema, CLI, a tiny end-to-end compare."""

import json
import math

import pytest
import torch

from corpora import write_two_domain_corpus
from moe_balance.harness.checkpoint import list_checkpoints, load_checkpoint
from moe_balance.harness.cli import main
from moe_balance.harness.data import prepare_corpus
from moe_balance.harness.train import TrainConfig, compare, lr_factor, train, train_config



@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small two-domain corpus: pseudo-code and pseudo-prose files."""
    return write_two_domain_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base(corpus_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return train_config("tiny", data=str(corpus_dir), vocab_size=300, cache_dir=str(cache), steps=12,
                        checkpoint_every=4, eval_tokens=2048, max_train_tokens=None)


@pytest.fixture(scope="module")
def corpus(base):
    return prepare_corpus(base.data, vocab_size=base.vocab_size, cache_dir=base.cache_dir,
                          val_fraction=base.val_fraction, progress=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(steps=110, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_train_config_errors():
    with pytest.raises(ValueError, match=r"TrainConfig.steps=0 must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"TrainConfig.dtype='float16' is not allowed"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match=r"unknown method 'lossfree'"):
        TrainConfig(method="lossfree")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        train_config("huge")
    for kwargs, match in [
        (dict(steps=True), r"TrainConfig.steps=True must be an integer >= 1"),
        (dict(seed=False), r"TrainConfig.seed=False must be an integer >= 0"),
        (dict(lr=float("inf")), r"TrainConfig.lr=inf must be a finite number > 0"),
        (dict(lr=float("nan")), r"TrainConfig.lr=nan must be a finite number > 0"),
        (dict(lr=True), r"TrainConfig.lr=True must be a finite number > 0"),
        (dict(grad_clip="1"), r"TrainConfig.grad_clip='1' must be a finite number > 0"),
        (dict(weight_decay=float("nan")), r"TrainConfig.weight_decay=nan must be a finite number >= 0"),
        (dict(weight_decay=float("inf")), r"TrainConfig.weight_decay=inf must be a finite number >= 0"),
        (dict(min_lr_ratio=float("nan")), r"TrainConfig.min_lr_ratio=nan must be a number in \[0, 1\]"),
        (dict(val_fraction=1.0), r"TrainConfig.val_fraction=1.0 must be a number in \(0, 1\)"),
        (dict(max_train_tokens=0), r"TrainConfig.max_train_tokens=0 must be an integer >= 1 or None"),
        (dict(cache_dir=""), r"TrainConfig.cache_dir='' must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


class Crash(RuntimeError):
    """A simulated crash in the middle of training."""


def test_resume_after_a_crash_between_checkpoints_continues_exactly(base, corpus, tmp_path):
    full = tmp_path / "full"
    train(base, full, corpus=corpus, progress=False)

    crashed = tmp_path / "crashed"

    def crash_at_10(step, record):
        if step == 10:  # checkpoints exist for steps 4 and 8; step 9-10 progress is lost
            raise Crash

    with pytest.raises(Crash):
        train(base, crashed, corpus=corpus, progress=False, on_step=crash_at_10)
    assert [s for s, _ in list_checkpoints(crashed)] == [4, 8]
    orphan = crashed / ".ckpt-00000012.pt.1.dead.tmp"
    orphan.write_bytes(b"half a checkpoint")  # a writer killed mid-checkpoint
    train(base, crashed, corpus=corpus, progress=False, resume=True)
    assert not orphan.exists()  # removed by the resumed run, which holds the lock

    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(crashed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 13))  # steps 9-10 rewritten, not duplicated
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "aux_loss", "lr", "maxvio_batch", "bias"):
            assert ra[key] == rb[key], (ra["step"], key)
    ea, eb = json.loads((full / "eval.json").read_text()), json.loads((crashed / "eval.json").read_text())
    assert ea["val_loss"] == eb["val_loss"] and ea["expert_load"] == eb["expert_load"]
    sa = load_checkpoint(full / "ckpt-00000012.pt")["model"]
    sb = load_checkpoint(crashed / "ckpt-00000012.pt")["model"]
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_metrics_schema_and_eval_contents(base, corpus, tmp_path):
    cfg = base.__class__(**{**base.__dict__, "method": "aux_loss", "steps": 4, "checkpoint_every": 0})
    result = train(cfg, tmp_path, corpus=corpus, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"])
        assert r["aux_loss"] > 0 and "bias" not in r  # aux-loss method: a loss, no bias
        assert len(r["maxvio_batch_layers"]) == 1 and r["maxvio_batch"] >= 0
        for key in ("lr", "tokens_per_second", "cv", "dead_experts", "grad_norm"):
            assert key in r
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    load = torch.tensor(result["expert_load"])
    assert load.shape == (1, 8) and load.sum() == result["val_tokens"] * 2  # top-2
    assert set(result["domain_load"]) == set(corpus.domains) == {"py", "txt"}
    assert sum(torch.tensor(v).sum() for v in result["domain_load"].values()) == load.sum()
    # the static-bias floor: warm-started from the router's own routing, never above it, and
    # here (a collapsed 4-step router on 2K tokens) far below it
    for floor, vio in zip(result["maxvio_static_floor_layers"], result["maxvio_global_layers"]):
        assert floor <= vio + 1e-12
    assert result["maxvio_static_floor"] < 0.5 * result["maxvio_global"]
    # the shift floor: a bias from the training windows, measured on the validation set
    assert len(result["maxvio_shift_floor_layers"]) == 1 and 0 <= result["maxvio_shift_floor"] <= 8 / 2 - 1
    # train windows: the same kind of measurement on other data (the training files)
    assert 0 <= result["maxvio_train_windows"] <= 8 / 2 - 1
    assert result["maxvio_train_windows"] != result["maxvio_global"]
    # batches of training windows: the better of two static biases is never above the final one
    assert 0 <= result["maxvio_batch_floor"] <= result["maxvio_batch_final"] <= 8 / 2 - 1
    assert len(result["maxvio_batch_floor_layers"]) == 1
    assert [p.name for p in sorted(tmp_path.glob("ckpt-*.pt"))] == ["ckpt-00000004.pt"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "model.safetensors").stat().st_size > 0


def test_cli_train_writes_metrics(base, corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "5", "--out", str(out), "--data", str(corpus_dir),
                 "--vocab-size", "300", "--cache-dir", base.cache_dir, "--eval-tokens", "1024"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 5
    assert {"step", "loss", "lm_loss", "aux_loss", "maxvio_batch"} <= set(records[0])
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 5


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--steps", "ten"])
    assert "invalid int value: 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--method", "nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_tiny_compare_end_to_end(base, tmp_path):
    cfg = base.__class__(**{**base.__dict__, "steps": 30, "lr": 3e-3, "checkpoint_every": 0})
    results = compare(["aux_loss", "loss_free", "loss_free_adaptive"], [0], cfg, tmp_path, progress=False)
    assert [r["method"] for r in results] == ["aux_loss", "loss_free", "loss_free_adaptive"]
    for r in results:
        for key in ("seed", "val_loss", "val_ppl", "maxvio_global", "maxvio_batch", "train_tokens",
                    "wall_seconds", "tokens_per_second", "maxvio_static_floor", "maxvio_train_windows",
                    "steps_to_balance", "maxvio_batch_late_std", "maxvio_batch_floor"):
            assert key in r
        assert r["maxvio_static_floor"] <= r["maxvio_global"]
        losses = [x["lm_loss"] for x in read_jsonl(tmp_path / f"{r['method']}_s0" / "metrics.jsonl")]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns
    assert json.loads((tmp_path / "results.json").read_text()) == results
    report = (tmp_path / "report.md").read_text()
    assert "loss_free" in report and "9.56" in report
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 4
    # same seed, same data and init: the first step's LM loss is identical across methods
    first = [read_jsonl(tmp_path / f"{m}_s0" / "metrics.jsonl")[0]["lm_loss"] for m in ("aux_loss", "loss_free")]
    assert first[0] == first[1]


def test_tiny_compare_of_the_routers(base, tmp_path):
    """expert choice, top-p and MoGE through the harness: experts per token measured, expert
    choice's perplexity marked as leaking, its loads exactly balanced."""
    import warnings

    from moe_balance.routing import CausalLeakWarning

    cfg = base.__class__(**{**base.__dict__, "steps": 6, "checkpoint_every": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CausalLeakWarning)
        results = compare(["expert_choice", "top_p_loss_free", "moge", "moe_plus_plus_loss_free", "hmoe_loss_free"],
                          [0], cfg, tmp_path, progress=False)
    rows = {r["method"]: r for r in results}
    # HMoE (tiny: widths 8, 24, 40, 56 twice, d_model 64, top-2, one MoE layer): compute metrics
    hm, mg_row = rows["hmoe_loss_free"], rows["moge"]
    assert hm["maxvio_compute"] != hm["maxvio_global"] and mg_row["maxvio_compute"] == pytest.approx(mg_row["maxvio_global"])
    assert mg_row["routed_params_per_token"] == pytest.approx(2 * 3 * 64 * 32)  # 2 experts of width 32
    assert 2 * 3 * 64 * 8 <= hm["routed_params_per_token"] <= 2 * 3 * 64 * 56
    assert "maxvio_compute" in read_jsonl(tmp_path / "hmoe_loss_free_s0" / "metrics.jsonl")[-1]
    assert hm["maxvio_static_floor"] is None and mg_row["maxvio_static_floor"] is not None  # compute targets
    # MoE++: kind fractions sum to 1, FFN experts per token = top_k * (1 - saved), 4 more experts routed
    pp = rows["moe_plus_plus_loss_free"]
    assert sum(pp[f"kind_fraction_{k}"] for k in ("ffn", "zero", "copy", "constant")) == pytest.approx(1.0)
    assert pp["ffn_experts_per_token"] == pytest.approx(2 * (1 - pp["ffn_compute_saved"]))
    assert pp["experts_per_token"] == 2.0 and len(pp["experts_per_token_hist"]) == 8 + 4 + 1
    assert pp["maxvio_static_floor"] is None  # not defined for per-kind targets
    pp_record = read_jsonl(tmp_path / "moe_plus_plus_loss_free_s0" / "metrics.jsonl")[-1]
    assert 0 <= pp_record["ffn_compute_saved"] <= 1 and "kind_fraction_zero" in pp_record
    assert "ffn_compute_saved" not in read_jsonl(tmp_path / "moge_s0" / "metrics.jsonl")[-1]
    assert rows["moge"]["ffn_experts_per_token"] == rows["moge"]["experts_per_token"] == 2.0
    ec, tp, mg = rows["expert_choice"], rows["top_p_loss_free"], rows["moge"]
    assert ec["leaks_future"] and not tp["leaks_future"] and not mg["leaks_future"]
    # tiny: 8 experts, capacity factor 2 -> each expert takes 2T/8 tokens of every eval batch
    assert ec["experts_per_token"] == pytest.approx(2.0) and ec["maxvio_global"] == 0.0
    assert mg["experts_per_token"] == 2.0 and mg["experts_per_token_hist"][2] == sum(mg["experts_per_token_hist"])
    assert sum(tp["experts_per_token_hist"]) == sum(mg["experts_per_token_hist"])
    assert tp["experts_per_token"] == pytest.approx(
        sum(n * c for n, c in enumerate(tp["experts_per_token_hist"])) / sum(tp["experts_per_token_hist"]))
    records = read_jsonl(tmp_path / "top_p_loss_free_s0" / "metrics.jsonl")
    assert all(1 <= r["experts_per_token"] <= 8 for r in records)
    report = (tmp_path / "report.md").read_text()
    ec_line = next(line for line in report.splitlines() if line.startswith("| expert_choice |"))
    assert "†" in ec_line and "2.00" in ec_line
    assert "not comparable" in report and "### Experts per token" in report and "### Compute per token" in report
    pp_line = next(line for line in report.splitlines() if line.startswith("| moe_plus_plus_loss_free |"))
    assert f"2.00 (FFN {pp['ffn_experts_per_token']:.2f})" in pp_line


def test_resume_after_sigkill_of_the_cli(base, corpus, tmp_path):
    """A real kill -9 between checkpoints, then `--resume`: the same losses as one clean run."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    steps, every = 30, 5
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moe_balance.harness.cli", "train", "--preset", "tiny", "--out", str(out),
           "--data", base.data, "--vocab-size", str(base.vocab_size), "--cache-dir", base.cache_dir,
           "--eval-tokens", str(base.eval_tokens), "--steps", str(steps), "--checkpoint-every", str(every)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 * every - 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(metrics.read_text().splitlines())
    assert every < done < steps
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    reference = tmp_path / "clean"
    train(dataclasses.replace(base, steps=steps, checkpoint_every=every), reference, corpus=corpus, progress=False)
    a, b = read_jsonl(reference / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["bias"] for r in a] == [r["bias"] for r in b]


def test_grad_accumulation_averages_exactly_the_indexed_micro_batches(base, corpus, tmp_path):
    import dataclasses

    from moe_balance.harness.sampling import BatchSampler
    from moe_balance.harness.train import build_model

    cfg = dataclasses.replace(base, steps=1, grad_accum=2, batch_size=4, checkpoint_every=0)
    train(cfg, tmp_path, corpus=corpus, progress=False)
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    model = build_model(cfg, corpus.vocab_size)  # same seed: the run's initial weights
    sampler = BatchSampler(corpus.train, seq_len=cfg.seq_len, batch_size=4, seed=cfg.seed)
    with torch.no_grad():
        outs = [model(t[:, :-1], t[:, 1:]) for t, _ in (sampler.batch(0), sampler.batch(1))]
    assert record["lm_loss"] == pytest.approx(sum(o.lm_loss.item() for o in outs) / 2, rel=1e-5)
    loads = outs[0].layer_loads[0] + outs[1].layer_loads[0]
    from moe_balance.metrics import max_vio
    assert record["maxvio_batch"] == pytest.approx(max_vio(loads).item())  # the whole step's load


def test_periodic_evaluation_is_logged(base, corpus, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(base, steps=4, eval_every=2, checkpoint_every=0)
    final = train(cfg, tmp_path, corpus=corpus, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert "val_loss" in records[1] and "val_loss" not in records[0]
    assert "val_loss" not in records[3]  # the last step's evaluation is eval.json
    assert records[1]["val_ppl"] == pytest.approx(math.exp(records[1]["val_loss"]))
    assert final["val_loss"] != records[1]["val_loss"]


def test_resume_refuses_a_different_configuration(base, corpus, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(base, steps=2, checkpoint_every=0)
    train(cfg, tmp_path, corpus=corpus, progress=False)
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0.001 -> 0.002\)"):
        train(dataclasses.replace(cfg, lr=2e-3), tmp_path, corpus=corpus, progress=False, resume=True)
    # a finished run resumed with the same configuration only re-evaluates: same result
    first = json.loads((tmp_path / "eval.json").read_text())
    again = train(dataclasses.replace(cfg, checkpoint_every=5), tmp_path, corpus=corpus, progress=False, resume=True)
    assert again["val_loss"] == first["val_loss"]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    # a run written before a field existed resumes when the field is at its default, and the
    # non-finite policy may change on resume (a run stopped by a NaN continues with skip)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["train"]["nonfinite"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = train(dataclasses.replace(cfg, nonfinite="skip"), tmp_path, corpus=corpus, progress=False, resume=True)
    assert again["val_loss"] == first["val_loss"]


# ------------------------------------------------------------------------------ run directories

def _tiny(base, **kw):
    return base.__class__(**{**base.__dict__, "steps": 2, "checkpoint_every": 0, **kw})


def test_a_non_empty_run_directory_is_refused_without_resume_or_overwrite(base, corpus, tmp_path):
    from moe_balance.harness._files import RunDirectoryError

    train(_tiny(base), tmp_path, corpus=corpus, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunDirectoryError, match=r"is not empty; pass --resume .* or --overwrite"):
        train(_tiny(base, lr=5e-3), tmp_path, corpus=corpus, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing touched
    (tmp_path / "stale.txt").write_text("old run")
    train(_tiny(base, lr=5e-3), tmp_path, corpus=corpus, progress=False, overwrite=True)
    assert not (tmp_path / "stale.txt").exists()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 5e-3
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    with pytest.raises(RunDirectoryError, match="non-empty path"):
        train(_tiny(base), "", corpus=corpus, progress=False)


def test_cli_refuses_an_existing_run_directory_in_one_line(base, corpus_dir, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path), "--preset", "tiny", "--data", str(corpus_dir),
            "--vocab-size", "300", "--cache-dir", base.cache_dir, "--steps", "1",
            "--max-train-tokens", "none", "--eval-tokens", "512"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty; pass --resume" in err and "Traceback" not in err


def test_a_locked_run_directory_is_refused_and_a_killed_holder_leaves_no_stale_lock(base, corpus, tmp_path):
    import signal
    import subprocess
    import sys

    from moe_balance.harness._files import RunDirectoryError

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from moe_balance.harness._files import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1])):\n"
        "    print('locked', flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"in use by another process \(pid {holder.pid}\)"):
            train(_tiny(base), tmp_path, corpus=corpus, progress=False)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # the file stays, the lock died with its holder
    train(_tiny(base), tmp_path, corpus=corpus, progress=False)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


# ------------------------------------------------------------------------------ damaged checkpoints

def _train_to_8_with_checkpoints(base, corpus, out):
    cfg = base.__class__(**{**base.__dict__, "steps": 8, "checkpoint_every": 4})
    train(cfg, out, corpus=corpus, progress=False)
    return cfg


def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(base, corpus, tmp_path, capsys):
    cfg = _train_to_8_with_checkpoints(base, corpus, tmp_path / "clean")
    damaged = tmp_path / "damaged"
    _train_to_8_with_checkpoints(base, corpus, damaged)
    newest = damaged / "ckpt-00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    train(cfg, damaged, corpus=corpus, progress=False, resume=True)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest} is truncated" in err
    assert f"resuming from {damaged / 'ckpt-00000004.pt'}" in err
    # steps 5-8 were trained again from step 4: the same result as the clean run
    a = load_checkpoint(tmp_path / "clean" / "ckpt-00000008.pt")["model"]
    b = load_checkpoint(newest)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(damaged / "metrics.jsonl")] == list(range(1, 9))


def test_damaged_and_foreign_checkpoints_are_named_with_the_problem(base, corpus, tmp_path):
    from moe_balance.harness.checkpoint import MAGIC, CheckpointError, latest_valid_checkpoint, save_checkpoint

    good = save_checkpoint(tmp_path, 1, {"step": 1, "x": torch.arange(4)})
    assert torch.equal(load_checkpoint(good)["x"], torch.arange(4))
    data = good.read_bytes()
    cases = {
        "garbage": (b"\x00\x01 not a checkpoint" * 10, "is not a readable moe_balance checkpoint"),
        "flipped": (data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:], "damaged \\(checksum mismatch\\)"),
        "truncated": (data[:-10], "is truncated"),
        "header": (MAGIC + b"{not json\n" + data, "damaged header"),
        "newer": (data.replace(b'"format": 2', b'"format": 9', 1), "has format 9; this version reads format 2"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    legacy = tmp_path / "legacy.pt"  # format 1: a bare torch.save file still loads
    torch.save({"step": 3, "x": torch.ones(2)}, legacy)
    assert load_checkpoint(legacy)["step"] == 3
    # nothing usable: resume starts from step 0 and says why
    (tmp_path / "ckpt-00000009.pt").write_bytes(b"garbage")
    good.unlink()
    state, path, skipped = latest_valid_checkpoint(tmp_path)
    assert state is None and path is None and len(skipped) == 1 and "ckpt-00000009.pt" in skipped[0]


def test_a_corrupt_metrics_line_drops_only_that_line_on_resume(base, corpus, tmp_path, capsys):
    cfg = _train_to_8_with_checkpoints(base, corpus, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20] + "\x00garbage"  # step 2 damaged on disk
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ckpt-00000008.pt").unlink()  # resume from step 4
    capsys.readouterr()
    train(cfg, tmp_path, corpus=corpus, progress=False, resume=True)
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------ non-finite steps

class _Poison:
    """Wraps build_model/build_optimizer so a test can make chosen training forwards non-finite:
    ``where`` "loss" poisons the LM head output, "router" the input of the last block's router."""

    def __init__(self, monkeypatch, steps: set[int], where: str):
        import moe_balance.harness.train as train_module

        self.steps, self.where, self.calls = steps, where, 0
        self.model = self.optimizer = None
        build_model, build_optimizer = train_module.build_model, train_module.build_optimizer

        def poisoned_model(cfg, vocab_size, device=None):
            self.model = build_model(cfg, vocab_size, device)
            target = self.model.lm_head if where == "loss" else self.model.blocks[-1].ffn_norm
            target.register_forward_hook(self._hook)
            return self.model

        def kept_optimizer(model, cfg):
            self.optimizer, scheduler = build_optimizer(model, cfg)
            return self.optimizer, scheduler

        monkeypatch.setattr(train_module, "build_model", poisoned_model)
        monkeypatch.setattr(train_module, "build_optimizer", kept_optimizer)

    def _hook(self, module, args, output):
        if not torch.is_grad_enabled():  # evaluation: leave it alone
            return None
        self.calls += 1  # grad_accum 1: the n-th training forward is step n
        return output * float("nan") if self.calls in self.steps else None

    def snapshot(self) -> dict:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for i, s in self.optimizer.state_dict()["state"].items():
            for k, v in s.items():
                state[f"optim.{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
        return state


def test_skip_policy_leaves_weights_optimizer_and_bias_untouched(base, corpus, tmp_path, monkeypatch):
    poison = _Poison(monkeypatch, steps={5}, where="loss")
    snapshots = {}
    cfg = _tiny(base, steps=8, method="loss_free_adaptive", nonfinite="skip")
    result = train(cfg, tmp_path, corpus=corpus, progress=False,
                   on_step=lambda step, record: snapshots.__setitem__(step, poison.snapshot()))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("skipped", False) for r in records] == [False] * 4 + [True] + [False] * 3
    assert records[4]["loss"] is None and "loss nan" in records[4]["nonfinite"]
    # the schedule still advanced: step s runs at lr_factor(s - 1), skipped or not
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(8)])
    before, after = snapshots[4], snapshots[5]
    assert before.keys() == after.keys() and any(k.endswith("expert_bias") for k in before)
    for key in before:  # weights, Adam moments and step counts, biases, controller statistics
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(snapshots[5][next(iter(before))], snapshots[6][next(iter(before))])
    assert math.isfinite(result["val_loss"]) and all(math.isfinite(r["loss"]) for r in records[5:])
    for key, value in after.items():  # the skipped step's counts were discarded, not carried over
        if "pending" in key:
            assert int(value.sum()) == 0, key


def test_stop_policy_names_the_step_and_the_router_layer(base, corpus, tmp_path, monkeypatch):
    from moe_balance.harness.train import NonFiniteTraining

    _Poison(monkeypatch, steps={3}, where="router")
    with pytest.raises(NonFiniteTraining, match=r"^step 3: layer 1: router logits contain NaN or inf.*"
                                                r"pass --nonfinite skip to skip such steps"):
        train(_tiny(base, steps=6), tmp_path / "run", corpus=corpus, progress=False)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_skip_policy_gives_up_after_consecutive_skips(base, corpus, tmp_path, monkeypatch):
    from moe_balance.harness.train import MAX_CONSECUTIVE_SKIPS, NonFiniteTraining

    _Poison(monkeypatch, steps=set(range(3, 100)), where="router")
    with pytest.raises(NonFiniteTraining, match=rf"step {2 + MAX_CONSECUTIVE_SKIPS}: "
                                                rf"{MAX_CONSECUTIVE_SKIPS} consecutive steps"):
        train(_tiny(base, steps=20, nonfinite="skip"), tmp_path, corpus=corpus, progress=False)


def test_cli_nonfinite_flag_is_validated_and_stop_is_one_line(base, corpus_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "a"), "--nonfinite", "ignore"])
    assert info.value.code == 2
    assert "TrainConfig.nonfinite='ignore' is not allowed; choose one of ('stop', 'skip')" in capsys.readouterr().err
    _Poison(monkeypatch, steps={2}, where="loss")
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "b"), "--data", str(corpus_dir),
                 "--vocab-size", "300", "--cache-dir", base.cache_dir, "--max-train-tokens", "none",
                 "--steps", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("moe-balance: error: step 2: loss nan, gradient norm nan")


# ------------------------------------------------------------------------------ batch floor

def _one_layer(bias):
    from types import SimpleNamespace

    from moe_balance.balancing import LossFreeBalancer
    from moe_balance.config import LossFree, RouterConfig
    from moe_balance.routing import TopKRouter

    balancer = LossFreeBalancer(LossFree(), 2)
    balancer.expert_bias.copy_(torch.tensor(bias))
    return SimpleNamespace(moe_layers=[SimpleNamespace(balancers=[balancer], config=SimpleNamespace(top_k=1),
                                                       router=TopKRouter(4, 2, 1, RouterConfig()))])


def test_batch_floor_is_zero_when_each_window_is_balanced_and_the_final_bias_is_not():
    from moe_balance.harness.train import batch_balance

    # every window: one token prefers expert 0, the other expert 1
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(8, 1)
    final, floor = batch_balance(_one_layer([1.5, -1.5]), [scores], seq_len=2, batch_windows=2)
    assert final == [pytest.approx(1.0)]  # the bias sends all 4 tokens of a batch to expert 0
    assert floor == [pytest.approx(0.0)]


def test_batch_floor_is_the_content_imbalance_of_random_batches():
    from moe_balance.harness.train import batch_balance

    # 4 windows whose two tokens both prefer expert 0, then 4 that prefer expert 1: pooled the
    # load is balanced, but a batch of two windows is balanced only when it mixes the kinds
    a, b = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2)
    scores = torch.cat([a] * 4 + [b] * 4)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3)).view(4, 2)
    kinds = (order >= 4).sum(1)  # windows of the second kind per batch: 0, 1 or 2
    expected = float((kinds != 1).float().mean())  # MaxVio 1 for a one-kind batch, 0 for a mixed one
    final, floor = batch_balance(_one_layer([0.0, 0.0]), [scores], seq_len=2, batch_windows=2, seed=3)
    assert final == [pytest.approx(expected)] and floor == [pytest.approx(expected)]
    assert 0 < expected < 1  # this seed mixes some batches and not others


def test_shift_floor_applies_the_training_windows_best_bias_to_the_validation_set():
    from moe_balance.harness.train import _best_static_bias, shift_floor

    model = _one_layer([0.0, 0.0])
    layer = model.moe_layers[0]
    # training windows: half the tokens prefer each expert by 1, so no bias is needed
    train_scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    # validation: three of four tokens prefer expert 0, one of them only by 0.1
    val_scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.55, 0.45], [0.0, 1.0]])
    train_bias, train_vio = _best_static_bias(layer, train_scores)
    assert train_vio == 0 and torch.equal(train_bias, torch.zeros(2))
    # that bias leaves the validation loads at (3, 1): MaxVio (3 - 2) / 2
    assert shift_floor(model, [train_bias], [val_scores]) == [pytest.approx(0.5)]
    # a bias fitted to the validation set itself would move the 0.55/0.45 token: (2, 2)
    assert shift_floor(model, [torch.tensor([0.0, 0.2])], [val_scores]) == [pytest.approx(0.0)]
