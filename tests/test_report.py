"""Tests for moe_balance.harness.report on hand-made run directories."""

import json
import math
from pathlib import Path

import pytest

from moe_balance.harness import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_LAYERS, N_EXPERTS = 2, 4


def make_run(root: Path, name: str, *, maxvio, val_ppl=10.0, maxvio_global=0.5, bias=False,
             domains=None, truncated=True) -> Path:
    """Write a fake run directory: metrics.jsonl (one line per step) and eval.json."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step, mv in enumerate(maxvio, start=1):
        rec = {"step": step, "loss": 5.0 - 0.1 * step, "lm_loss": 5.0 - 0.1 * step, "aux_loss": 0.0,
               "lr": 1e-3, "tokens_per_second": 100.0, "maxvio_batch": mv,
               "maxvio_batch_layers": [mv, mv], "cv": 0.1, "dead_experts": 0}
        if bias:
            rec["bias"] = [[0.001 * step * (e - 1.5) * (layer + 1) for e in range(N_EXPERTS)]
                           for layer in range(N_LAYERS)]
        if step == 3:  # keys can be missing on some lines
            del rec["maxvio_batch"]
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 99, "loss": 1.0, "maxvio_ba'
    (run / "metrics.jsonl").write_text(text)
    ev = {"val_loss": math.log(val_ppl), "val_ppl": val_ppl, "maxvio_global": maxvio_global,
          "maxvio_global_layers": [maxvio_global] * N_LAYERS,
          "expert_load": [[100, 200, 300, 400], [250, 250, 250, 250]]}
    if domains:
        ev["domain_load"] = {d: [[10 * (i + 1), 5, 5, 5], [5, 5, 5, 10 * (i + 1)]] for i, d in enumerate(domains)}
    (run / "eval.json").write_text(json.dumps(ev))
    return run


# 10 steps; step 3 has no maxvio_batch, so the 9 logged values are 1,2,4,...,10 (x0.1).
MAXVIO = [0.1 * i for i in range(1, 11)]


def test_read_metrics_skips_truncated_last_line(tmp_path):
    records = report.read_metrics(make_run(tmp_path, "r", maxvio=MAXVIO))
    assert [r["step"] for r in records] == list(range(1, 11))


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    run = make_run(tmp_path, "r", maxvio=MAXVIO, truncated=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[4] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 5"):
        report.read_metrics(run)


def test_missing_metrics_names_the_directory(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run"):
        report.read_metrics(empty)
    with pytest.raises(FileNotFoundError, match="empty_run"):
        report.summarize_run(empty, method="m", seed=0, wall_seconds=1.0, train_tokens=1)
    results = [{"method": "m", "seed": 0, "val_ppl": 1.0, "maxvio_global": 0.1}]
    with pytest.raises(FileNotFoundError, match="empty_run"):
        report.write_report(tmp_path / "out", results, {"m": [empty]}, meta={})


def test_summarize_run_values(tmp_path):
    run = make_run(tmp_path, "loss_free_s0", maxvio=MAXVIO, val_ppl=12.5, maxvio_global=0.07)
    row = report.summarize_run(run, method="loss_free", seed=0, wall_seconds=4.0, train_tokens=1000)
    # Logged values 0.1,0.2,0.4..1.0 (9 of them); second half = last 9 - 9//2 = 5 -> 0.6..1.0.
    assert row["maxvio_batch"] == pytest.approx(0.8)
    assert row["tokens_per_second"] == 250.0
    assert row["final_loss"] == pytest.approx(5.0 - 0.1 * 10)
    assert row["val_ppl"] == 12.5
    assert row["val_loss"] == pytest.approx(math.log(12.5))
    assert row["maxvio_global"] == 0.07
    # MaxVio_batch 0.1, 0.2 (< 0.5) then 0.4 at step 4 (step 3 unlogged): never 20 in a row
    assert row["steps_to_balance"] is None and row["steps"] == 10
    assert row["maxvio_batch_late_std"] == pytest.approx(0.05)  # std of the last 2 of 9: 0.9, 1.0
    assert row["run_dir"] == "loss_free_s0"
    assert (row["method"], row["seed"], row["train_tokens"], row["wall_seconds"]) == ("loss_free", 0, 1000, 4.0)


def test_summarize_run_without_eval(tmp_path):
    run = make_run(tmp_path, "r", maxvio=[0.5, 0.3])
    (run / "eval.json").unlink()
    row = report.summarize_run(run, method="m", seed=1, wall_seconds=2.0, train_tokens=10)
    assert row["val_ppl"] is None and row["maxvio_global"] is None
    assert row["maxvio_batch"] == pytest.approx(0.3)


def _rows():
    return [
        {"method": "aux_loss", "seed": 0, "val_ppl": 10.0, "maxvio_global": 0.6, "maxvio_batch": 1.0, "val_loss": 2.0,
         "steps_to_balance": None},
        {"method": "loss_free", "seed": 0, "val_ppl": 9.0, "maxvio_global": 0.05, "maxvio_batch": 0.2, "val_loss": 1.9,
         "maxvio_static_floor": 0.01, "maxvio_shift_floor": 0.03, "maxvio_train_windows": 0.04, "steps_to_balance": 40,
         "maxvio_batch_late_std": 0.05, "maxvio_batch_floor": 0.15},
        {"method": "aux_loss", "seed": 1, "val_ppl": 12.0, "maxvio_global": 0.8, "maxvio_batch": 2.0, "val_loss": 2.2,
         "steps_to_balance": 90},
    ]


def test_steps_to_balance_and_late_oscillation():
    steps = list(range(1, 41))
    # below 0.5 from step 5 on, except for one spike at step 12: the hold restarts at 13
    maxvio = [1.0] * 4 + [0.3] * 7 + [0.9] + [0.2] * 28
    assert report.steps_to_balance(steps, maxvio) == 13
    assert report.steps_to_balance(steps, maxvio, hold=7) == 5
    assert report.steps_to_balance(steps, [0.6] * 40) is None
    assert report.steps_to_balance(steps[:10], [0.1] * 10) is None  # fewer steps than the hold
    # std over the last quarter (10 of 40 values)
    values = [5.0] * 30 + [0.1, 0.3] * 5
    assert report.late_oscillation(values) == pytest.approx(0.1)


def test_aggregate_two_seeds_and_one_seed():
    agg = report.aggregate(_rows())
    assert [a["method"] for a in agg] == ["aux_loss", "loss_free"]  # first-appearance order
    aux, lf = agg
    assert aux["n_seeds"] == 2
    assert aux["val_ppl_mean"] == pytest.approx(11.0)
    assert aux["val_ppl_std"] == pytest.approx(math.sqrt(2.0))  # sample std of {10, 12}
    assert aux["maxvio_global_mean"] == pytest.approx(0.7)
    assert aux["maxvio_global_std"] == pytest.approx(math.sqrt(0.02))
    assert aux["maxvio_batch_mean"] == pytest.approx(1.5)
    assert aux["val_loss_mean"] == pytest.approx(2.1)
    assert lf["n_seeds"] == 1
    assert lf["val_ppl_mean"] == 9.0 and lf["val_ppl_std"] == 0.0


def test_empty_results_raise(tmp_path):
    for call in (lambda: report.aggregate([]), lambda: report.format_table([]),
                 lambda: report.write_report(tmp_path, [], {}, meta={})):
        with pytest.raises(ValueError, match="empty"):
            call()


def test_differences_from_baseline():
    diffs = {(d["method"], d["metric"]): d for d in report.differences_from_baseline(_rows())}
    d = diffs[("loss_free", "maxvio_global")]  # loss_free has one seed: no noise estimate
    assert d["difference"] == pytest.approx(0.05 - 0.7) and d["noise"] is None and d["exceeds"] is None
    rows = _rows() + [{"method": "loss_free", "seed": 1, "val_ppl": 9.0, "maxvio_global": 0.15,
                       "maxvio_batch": 0.2, "val_loss": 1.9}]
    diffs = {(d["method"], d["metric"]): d for d in report.differences_from_baseline(rows)}
    # aux: 0.6, 0.8 (std 0.1414); loss_free: 0.05, 0.15 (std 0.0707); 2 * sqrt(0.02/2 + 0.005/2)
    d = diffs[("loss_free", "maxvio_global")]
    assert d["difference"] == pytest.approx(0.1 - 0.7)
    assert d["noise"] == pytest.approx(2 * math.sqrt(0.02 / 2 + 0.005 / 2))
    assert d["exceeds"] is True
    ppl = diffs[("loss_free", "val_ppl")]  # aux 10, 12 vs 9, 9: -2 against 2 * sqrt(2 / 2) = 2
    assert ppl["difference"] == pytest.approx(-2.0) and ppl["noise"] == pytest.approx(2.0)
    assert ppl["exceeds"] is False
    # same seed: seed 0 -1, seed 1 -3 -> mean -2, 2 * std(ddof=1) / sqrt(2) = 2 * sqrt(2) / sqrt(2) = 2
    assert ppl["paired_seeds"] == 2 and ppl["paired_difference"] == pytest.approx(-2.0)
    assert ppl["paired_noise"] == pytest.approx(2.0) and ppl["paired_exceeds"] is False
    assert ppl["paired_higher"] == 0
    # global: seed 0 -0.55, seed 1 -0.65: mean -0.6, 2 * 0.0707 / sqrt(2) = 0.1: beyond the noise
    d = diffs[("loss_free", "maxvio_global")]
    assert d["paired_difference"] == pytest.approx(-0.6) and d["paired_noise"] == pytest.approx(0.1)
    assert d["paired_exceeds"] is True


def test_paired_differences_use_only_the_seeds_both_methods_ran():
    rows = [{"method": "aux_loss", "seed": s, "val_ppl": v, "maxvio_global": 1.0, "maxvio_batch": 1.0}
            for s, v in ((0, 10.0), (1, 20.0), (2, 30.0))]
    rows += [{"method": "loss_free", "seed": s, "val_ppl": v, "maxvio_global": 0.5, "maxvio_batch": 0.5}
             for s, v in ((1, 21.0), (2, 32.0), (3, 5.0))]
    ppl = next(d for d in report.differences_from_baseline(rows) if d["metric"] == "val_ppl")
    # unpaired: means 20 vs 19.33; paired: seeds 1 and 2 only, +1 and +2
    assert ppl["difference"] == pytest.approx(58 / 3 - 20)
    assert ppl["paired_seeds"] == 2 and ppl["paired_difference"] == pytest.approx(1.5)
    assert ppl["paired_noise"] == pytest.approx(2 * math.sqrt(0.5) / math.sqrt(2))
    assert ppl["paired_higher"] == 2
    table = report._differences_table(rows)
    assert "| loss_free | val PPL | -0.67 | " in table and "| +1.50 ± 1.00 | yes | 2 of 2 |" in table


def test_demo_summary_gives_ratios_and_says_one_seed_is_not_a_measurement():
    rows = [{"method": "aux_loss", "seed": 0, "val_ppl": 180.0, "maxvio_global": 1.6, "maxvio_batch": 2.0},
            {"method": "loss_free_adaptive", "seed": 0, "val_ppl": 190.5, "maxvio_global": 0.32,
             "maxvio_batch": 0.5}]
    lines = report.demo_summary(rows).splitlines()
    assert lines[0] == "loss_free_adaptive against aux_loss (1 seed(s), this machine):"
    assert lines[1].split() == ["val", "PPL", "190.50", "vs", "180.00", "(+10.50)"]
    assert lines[2].split() == ["MaxVio_global", "0.320", "vs", "1.600", "(5.0x", "lower)"]
    assert lines[3].split() == ["MaxVio_batch", "0.500", "vs", "2.000", "(4.0x", "lower)"]
    assert lines[4].startswith("One seed on one machine")
    rows[1]["maxvio_batch"] = 3.0  # worse: said so
    rows += [dict(r, seed=1) for r in rows]  # two seeds: no single-run warning
    lines = report.demo_summary(rows).splitlines()
    assert lines[3].split()[-2:] == ["(1.5x", "higher)"] and len(lines) == 4


def test_balance_steps_say_how_many_seeds_reached_it():
    assert report._fmt_balance_steps([None, None]) == "never (2/2 seeds)"
    assert report._fmt_balance_steps([254, None, 220, 265, None]) == "3/5 seeds, from 220 (mean 246)"
    assert report._fmt_balance_steps([40, 60]) == "50 ± 14"


def test_format_table():
    table = report.format_table(_rows())
    lines = table.splitlines()
    assert lines[0] == ("| method | val PPL | experts/token | MaxVio_global | static floor | shift floor | MaxVio_train | "
                        "MaxVio_batch | batch floor | steps to balance | late std | seeds |")
    assert len(lines) == 2 + 2  # header, separator, one row per method
    assert "| aux_loss | 11.00 ± 1.41 | — | 0.700 ± 0.141 | — | — | — | 1.500 ± 0.707 | — | 1/2 seeds, at 90 | — | 2 |" in lines
    assert "| loss_free | 9.00 | — | 0.050 | 0.010 | 0.030 | 0.040 | 0.200 | 0.150 | 40 | 0.050 | 1 |" in lines


def test_plots_return_none_without_data(tmp_path):
    runs = {"aux_loss": [make_run(tmp_path, "a", maxvio=MAXVIO, domains=["web"])]}
    assert report.plot_biases(runs, tmp_path / "b.png") is None
    assert report.plot_domain_load(runs, tmp_path / "d.png") is None  # one domain is not enough
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "d.png").exists()


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def test_write_report(tmp_path):
    domains = ["web", "code", "math"]
    runs = {
        "aux_loss": [make_run(tmp_path / "runs", f"aux_s{s}", maxvio=[m * (s + 1) for m in MAXVIO],
                              val_ppl=10.0 + s, maxvio_global=0.6, domains=domains) for s in range(2)],
        "loss_free": [make_run(tmp_path / "runs", "lf_s0", maxvio=[m / 20 for m in MAXVIO],
                               val_ppl=9.5, maxvio_global=0.04, bias=True, domains=domains)],
    }
    results = [report.summarize_run(d, method=m, seed=s, wall_seconds=10.0, train_tokens=5000)
               for m, dirs in runs.items() for s, d in enumerate(dirs)]
    meta = {"machine": "test", "command": "moe-balance compare", "config": {"model": {"n_layers": 2}}}
    out = tmp_path / "out"
    md_path = report.write_report(out, results, runs, meta=meta)

    assert md_path == out / "report.md"
    assert json.loads((out / "results.json").read_text()) == results
    md = md_path.read_text()
    assert report.format_table(results) in md
    assert "9.56" in md and "0.04" in md and "Table 1" in md
    assert '"n_layers": 2' in md and "## Configuration" in md
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert sorted(Path(link).name for link in links) == sorted(
        ["maxvio_batch.png", "ppl_vs_maxvio.png", "load_heatmaps.png", "biases.png", "domain_load.png"])
    for link in links:
        assert not Path(link).is_absolute()
        _assert_png(out / link)
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(Path(link).name for link in links)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files behind


def test_rewrite_drops_stale_plots(tmp_path):
    lf = make_run(tmp_path, "lf", maxvio=MAXVIO, bias=True)
    aux = make_run(tmp_path, "aux", maxvio=MAXVIO)
    out = tmp_path / "out"
    rows = [report.summarize_run(lf, method="loss_free", seed=0, wall_seconds=1.0, train_tokens=10)]
    report.write_report(out, rows, {"loss_free": [str(lf)]}, meta={})
    assert (out / "plots" / "biases.png").exists()
    rows = [report.summarize_run(aux, method="aux_loss", seed=0, wall_seconds=1.0, train_tokens=10)]
    md = report.write_report(out, rows, {"aux_loss": [aux]}, meta={}).read_text()
    assert not (out / "plots" / "biases.png").exists() and "biases.png" not in md
    assert "plots/maxvio_batch.png" in md
