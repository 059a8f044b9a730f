"""scripts/gpu_check.sh without a GPU: it refuses in one line; and its summary writer, fed the
artefacts the real stages write (a pytest junit file, ``bench --json``, a comparison), reports
their figures."""

import json
import subprocess
import sys
from pathlib import Path

from corpora import write_two_domain_corpus
from moe_balance.harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # conftest hides any GPU from it
    assert proc.returncode == 2
    assert "sees no CUDA GPU" in proc.stderr and "install a CUDA build of torch" in proc.stderr
    assert not (tmp_path / "out" / "stages.txt").exists()  # no stage ran


SAMPLE_TESTS = """
import pytest
def test_ok(): assert 1 + 1 == 2
def test_bad(): assert 1 + 1 == 3
@pytest.mark.skip(reason="needs a CUDA GPU here")
def test_skipped(): pass
"""


def test_the_summary_reports_what_the_stages_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stages.txt").write_text("tests 1 42\nbench 0 7\ncompare 0 99\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_sample.py"),
                    "--junitxml", str(out / "pytest.xml")], capture_output=True, timeout=120, cwd=tmp_path)
    assert main(["bench", "--device", "cpu", "--json", "--shape", "16,8,4,2", "--dtypes", "float32",
                 "--tokens", "32", "--rounds", "1", "--no-peers"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (out / "bench.json").write_text(json.dumps(rows))
    corpus = write_two_domain_corpus(tmp_path / "corpus")
    assert main(["compare", "--preset", "tiny", "--steps", "3", "--methods", "aux_loss,loss_free", "--out",
                 str(out / "compare"), "--data", str(corpus), "--vocab-size", "300", "--cache-dir",
                 str(tmp_path / "cache"), "--eval-tokens", "1024", "--device", "cpu"]) == 0
    results = json.loads((out / "compare" / "results.json").read_text())

    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(out)], check=True, timeout=120)
    text = (out / "summary.md").read_text()
    assert "| tests | 1 FAILED | 42 |" in text and "| bench | 0 | 7 |" in text
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "- skipped: test_sample::test_skipped: needs a CUDA GPU here" in text
    assert "- failure: test_sample::test_bad" in text
    dense = next(r for r in rows if r["implementation"] == "dense (same active FLOPs)")
    assert f"| dense (same active FLOPs) | 16,8,4,2 | float32 | {dense['median_ms']:.2f} | 1.00 |" in text
    step = next(r for r in rows if "tokens_per_second" in r)
    assert f"MoE {step['tokens_per_second']:,.0f} tokens/s" in text
    for r in results:
        assert f"| {r['method']} | 0 | {r['val_ppl']:.1f} | {r['maxvio_global']:.3f} |" in text
