"""OUT/summary.md from what scripts/gpu_check.sh left in OUT: the machine, each stage's exit
status and seconds, the test counts (and every skip or failure by name), the bench table and
the comparison's perplexity and balance. Usage: python scripts/gpu_summary.py OUT"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def machine() -> list[str]:
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    return [f"- GPU: {gpu}", f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
            f"- host: {platform.node()}, {__import__('os').cpu_count()} CPUs"]


def stages(out: Path) -> list[str]:
    path = out / "stages.txt"
    if not path.is_file():
        return ["no stage ran (no stages.txt)"]
    lines = ["| stage | exit | seconds |", "|---|---|---|"]
    for row in path.read_text().split("\n"):
        if row.strip():
            name, rc, seconds = row.split()
            lines.append(f"| {name} | {rc}{'' if rc == '0' else ' FAILED'} | {seconds} |")
    return lines


def tests(out: Path) -> list[str]:
    path = out / "pytest.xml"
    if not path.is_file():
        return ["no pytest.xml: the suite did not run to the end (see tests.log)"]
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
             f"in {float(suite.get('time', 0)):.0f} s"]
    cuda = [case for case in suite.iter("testcase") if case.get("classname", "").endswith("test_cuda")]
    ran = [case for case in cuda if not list(case)]
    lines.append(f"CUDA tests: {len(ran)} of {len(cuda)} passed")
    for case in suite.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
                lines.append(f"- {child.tag}: {case.get('classname')}::{case.get('name')}: {message}")
    return lines


def bench(out: Path) -> list[str]:
    path = out / "bench.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["no bench.json (see bench.log)"]
    lines = ["| implementation | shape | dtype | median ms | ratio to dense |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("ratio_to_dense") is not None:
            mark = " (auto)" if r.get("is_default") and r["implementation"] != "moe_balance auto" else ""
            lines.append(f"| {r['implementation']}{mark} | {r['shape']} | {r['dtype']} | {r['median_ms']:.2f} | "
                         f"{r['ratio_to_dense']:.2f} |")
    for r in rows:
        if "fraction_of_layer" in r:
            lines.append(f"- router + Loss-Free balancing, shape {r['shape']}: {100 * r['fraction_of_layer']:.1f}% "
                         "of the layer's forward+backward")
        if "tokens_per_second" in r:
            lines.append(f"- training step, quick preset: MoE {r['tokens_per_second']:,.0f} tokens/s, dense "
                         f"{r['dense_tokens_per_second']:,.0f} tokens/s (MoE step / dense step "
                         f"{r['ratio_to_dense']:.2f})")
    return lines


def compare(out: Path) -> list[str]:
    path = out / "compare" / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["no compare/results.json (see compare.log)"]
    lines = ["| method | seed | val PPL | MaxVio_global | MaxVio_batch | tokens/s |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['seed']} | {r['val_ppl']:.1f} | {r['maxvio_global']:.3f} | "
                     f"{r['maxvio_batch']:.3f} | {r['tokens_per_second']:,.0f} |")
    return lines


def summary(out: Path) -> str:
    parts = ["# GPU check", "", *machine(), "", "## Stages", "", *stages(out), "", "## Test suite", "", *tests(out),
             "", "## Bench (CUDA)", "", *bench(out), "", "## Quick preset, 200 steps (CUDA)", "", *compare(out), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_summary.py OUT")
    out = Path(sys.argv[1])
    (out / "summary.md").write_text(summary(out))
