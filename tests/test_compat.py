"""A run made before the library/harness split resumes after it and continues exactly.

tests/fixtures/run_before_split holds what a process killed after its step-4 checkpoint leaves
behind: config.json, ckpt-00000004.pt and the first 4 lines of metrics.jsonl, all written by
the code before the split (its make_fixture.py says how), and the uninterrupted 8-step run's
metrics and evaluation from the same code. Resuming it with today's code must reproduce steps
5-8 of that run: same losses, same biases, same evaluation.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from corpora import write_two_domain_corpus
from moe_balance.harness.checkpoint import load_checkpoint
from moe_balance.harness.train import TrainConfig, train

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_split"
def write_corpus(root: Path) -> None:
    """The fixture's corpus, regenerated exactly as make_fixture.py wrote it."""
    write_two_domain_corpus(root)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """The fixture's run directory in a fresh working directory with its corpus (the run's
    data and cache paths are relative, as make_fixture.py wrote them)."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "ckpt-00000004.pt", "metrics.jsonl"):
        shutil.copy(FIXTURE / name, run / name)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text())["train"])
    return run, cfg


def test_the_fixture_is_what_it_says():
    state = load_checkpoint(FIXTURE / "ckpt-00000004.pt")
    assert state["step"] == 4
    bias_keys = [k for k in state["model"] if k.endswith("expert_bias")]
    assert bias_keys and all(state["model"][k].dtype == torch.float32 for k in bias_keys)
    assert [r["step"] for r in read_jsonl(FIXTURE / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(FIXTURE / "expected_metrics.jsonl")] == list(range(1, 9))


def test_a_run_from_before_the_split_resumes_and_continues_exactly(old_run):
    run, cfg = old_run
    result = train(cfg, run, resume=True, progress=False)
    got, expected = read_jsonl(run / "metrics.jsonl"), read_jsonl(FIXTURE / "expected_metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert got[:4] == expected[:4]  # the lines before the checkpoint are kept as they were
    for new, old in zip(got[4:], expected[4:]):
        # the same machine kind and code path: equal to float rounding (1e-6 relative), and the
        # bias moves in steps that a different rounding would change by whole steps
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "maxvio_batch"):
            assert math.isclose(new[key], old[key], rel_tol=1e-6, abs_tol=1e-9), (new["step"], key)
        torch.testing.assert_close(torch.tensor(new["bias"]), torch.tensor(old["bias"]), rtol=0, atol=1e-6)
    old_eval = json.loads((FIXTURE / "expected_eval.json").read_text())
    assert math.isclose(result["val_loss"], old_eval["val_loss"], rel_tol=1e-6)
    assert result["expert_load"] == old_eval["expert_load"]
    assert result["maxvio_global"] == old_eval["maxvio_global"]


def test_resuming_the_old_run_equals_a_fresh_run_of_todays_code(old_run, tmp_path):
    """Bit for bit on this machine: resuming changes nothing, whoever wrote the checkpoint."""
    run, cfg = old_run
    train(cfg, run, resume=True, progress=False)
    fresh = tmp_path / "fresh"
    train(cfg, fresh, progress=False)
    drop = lambda r: {k: v for k, v in r.items() if k != "tokens_per_second"}  # noqa: E731
    resumed = [drop(r) for r in read_jsonl(run / "metrics.jsonl")][4:]
    assert resumed == [drop(r) for r in read_jsonl(fresh / "metrics.jsonl")][4:]
