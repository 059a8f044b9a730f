"""The examples run as a user runs them (a subprocess each, small sizes) and show what they say."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(*command: str, timeout: float = 240) -> dict:
    """Run a command from the repository root; returns the JSON of its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the examples' processes share 2 cores
    done = subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_examples_are_short_documented_scripts():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert [p.name for p in scripts] == ["drop_in_layer.py", "finetune_transformers.py", "two_processes.py"]
    for path in scripts:
        text = path.read_text()
        assert 40 <= len(text.splitlines()) <= 120, path.name
        assert text.startswith('"""') and "Run it:" in text.split('"""')[1], path.name
        assert "def main(" in text and '__name__ == "__main__"' in text, path.name


def test_drop_in_layer_balances_where_no_balancer_does_not():
    r = run_example(sys.executable, str(EXAMPLES / "drop_in_layer.py"), "--steps", "100", "--json")
    assert r["steps"] == 100 and r["update_rate"] == 1e-3
    # Zipf tokens make the untrained routing skewed; both runs start from the same model
    assert r["maxvio_start"] > 0.5
    assert r["maxvio_end"] < 0.5 * r["maxvio_start"]
    assert r["maxvio_end"] < 0.5 * r["maxvio_end_no_balancer"]


def test_finetune_transformers_balances_and_saves_the_bias(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "mixtral"
    r = run_example(sys.executable, str(EXAMPLES / "finetune_transformers.py"), "--steps", "60", "--out", str(out),
                    "--json")
    assert r["maxvio_after"] < 0.75 * r["maxvio_before"]
    assert r["maxvio_after"] < 0.75 * r["maxvio_after_frozen_bias"]
    # one float32 bias per MoE layer in the saved files, nonzero, equal to the trained one
    saved = r["saved_bias"]
    assert len(saved) == 2 and all(k.endswith("gate.e_score_correction_bias") for k in saved)
    by_layer = [saved[k] for k in sorted(saved, key=lambda k: int(k.split("layers.")[1].split(".")[0]))]
    for bias, trained in zip(by_layer, r["trained_bias"]):
        assert bias["dtype"] == "torch.float32"
        assert len(bias["values"]) == 8 and any(v != 0 for v in bias["values"])
        assert bias["values"] == trained
    assert r["reloaded_bias"] == r["trained_bias"]  # from_pretrained + bias_from= routes with it
    assert any(out.glob("*.safetensors")) and (out / "config.json").is_file()


def test_two_processes_share_the_single_process_bias():
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    r = run_example(*launcher, "--standalone", "--nproc_per_node=2", str(EXAMPLES / "two_processes.py"),
                    "--steps", "5", "--json")
    first, second = r["bias_per_rank"]
    assert first == second and r["max_diff_between_ranks"] == 0
    assert r["max_diff_to_single_process"] <= 1e-6
    assert max(abs(v - w) for v, w in zip(first, r["single_process_bias"])) <= 1e-6
    assert any(v != 0 for v in first)  # the bias moved: the equality is not that of zeros
    # counting one rank's tokens alone gives another bias: the counts really were summed
    assert r["max_diff_to_own_half"] > 1e-4
