"""Summaries, tables, plots and the Markdown report for `moe-balance compare`.

Leaf module: it reads run directories (metrics.jsonl, eval.json) and plain dicts
only, and imports nothing from moe_balance. matplotlib is imported lazily inside
the plotting helpers so summaries and tables work without the `train` extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .._files import atomic_write

# The paper's Table 1 (Wang et al., 2024, arXiv 2408.15664), for reference only.
PAPER_RESULTS: list[dict] = [
    {"model": "1B, 100B tokens", "method": "aux_loss (alpha=1e-3)", "val_ppl": 9.56, "maxvio_global": 0.72},
    {"model": "1B, 100B tokens", "method": "loss_free (u=1e-3)", "val_ppl": 9.50, "maxvio_global": 0.04},
    {"model": "3B, 200B tokens", "method": "aux_loss (alpha=1e-3)", "val_ppl": 7.97, "maxvio_global": 0.52},
    {"model": "3B, 200B tokens", "method": "loss_free (u=1e-3)", "val_ppl": 7.92, "maxvio_global": 0.04},
]

_AGG_KEYS = ("val_ppl", "experts_per_token", "ffn_experts_per_token", "ffn_compute_saved", "maxvio_compute",
             "routed_params_per_token", "maxvio_global", "maxvio_static_floor", "maxvio_shift_floor",
             "maxvio_train_windows", "maxvio_batch", "maxvio_batch_floor", "maxvio_batch_late_std", "val_loss")

BALANCE_THRESHOLD, BALANCE_HOLD = 0.5, 20


def steps_to_balance(steps, maxvio, threshold: float = BALANCE_THRESHOLD, hold: int = BALANCE_HOLD) -> int | None:
    """The first step from which MaxVio_batch stays below ``threshold`` for ``hold`` logged
    steps in a row, or None if that never happens."""
    run = 0
    for i, value in enumerate(maxvio):
        run = run + 1 if value < threshold else 0
        if run == hold:
            return int(steps[i - hold + 1])
    return None


def late_oscillation(maxvio) -> float | None:
    """Std of MaxVio_batch over the last 25% of the logged steps (late-training jitter)."""
    tail = np.asarray(maxvio, dtype=float)[-max(1, len(maxvio) // 4):] if len(maxvio) else []
    return float(np.std(tail)) if len(tail) else None


def _metrics_path(run_dir) -> Path:
    """RUN/metrics.jsonl, or FileNotFoundError naming the run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {Path(run_dir)}")
    return path


def read_metrics(run_dir) -> list[dict]:
    """Parse RUN/metrics.jsonl into a list of dicts, skipping a truncated last line."""
    path = _metrics_path(run_dir)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # the trainer was killed mid-write: drop that line only
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_eval(run_dir) -> dict:
    """Load RUN/eval.json, or {} when the run has no final evaluation."""
    path = Path(run_dir) / "eval.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key`, sorted by step."""
    pairs = sorted((r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r)
    steps = np.array([p[0] for p in pairs], dtype=float)
    return steps, np.array([p[1] for p in pairs], dtype=float)


def summarize_run(run_dir, *, method: str, seed: int, wall_seconds: float, train_tokens: int) -> dict:
    """One results.json row for a finished run."""
    if wall_seconds <= 0:
        raise ValueError(f"wall_seconds must be positive, got {wall_seconds}")
    records = read_metrics(run_dir)
    ev = _read_eval(run_dir)
    steps, maxvio = _series(records, "maxvio_batch")
    # The last ceil(n/2) logged values: skips the early transient where every method is unbalanced.
    second_half = maxvio[len(maxvio) // 2:]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    val_ppl = ev.get("val_ppl")
    if val_ppl is None and ev.get("val_loss") is not None:
        val_ppl = math.exp(ev["val_loss"])
    return {
        "method": method,
        "seed": seed,
        "val_loss": ev.get("val_loss"),
        "val_ppl": val_ppl,
        "maxvio_global": ev.get("maxvio_global"),
        "maxvio_static_floor": ev.get("maxvio_static_floor"),
        "maxvio_shift_floor": ev.get("maxvio_shift_floor"),
        "maxvio_train_windows": ev.get("maxvio_train_windows"),
        "maxvio_batch": float(second_half.mean()) if len(second_half) else None,
        "maxvio_batch_floor": ev.get("maxvio_batch_floor"),
        "maxvio_batch_late_std": late_oscillation(maxvio),
        "steps_to_balance": steps_to_balance(steps, maxvio),
        "steps": int(steps[-1]) if len(steps) else 0,
        "train_tokens": train_tokens,
        "wall_seconds": wall_seconds,
        "tokens_per_second": train_tokens / wall_seconds,
        "final_loss": losses[-1] if losses else None,
        "experts_per_token": ev.get("experts_per_token"),
        "ffn_experts_per_token": ev.get("ffn_experts_per_token"),
        "ffn_compute_saved": ev.get("ffn_compute_saved"),
        "maxvio_compute": ev.get("maxvio_compute"),
        "routed_params_per_token": ev.get("routed_params_per_token"),
        **{k: v for k, v in ev.items() if k.startswith("kind_fraction_")},
        "experts_per_token_hist": ev.get("experts_per_token_hist"),
        "leaks_future": bool(ev.get("leaks_future", False)),
        "run_dir": Path(run_dir).name,
    }


def _require_results(results: list[dict]) -> None:
    """Refuse an empty results list with a clear message."""
    if not results:
        raise ValueError("results is empty: no finished runs to report on")


def aggregate(results: list[dict]) -> list[dict]:
    """One row per method (first-appearance order): n_seeds and mean/std of the key metrics."""
    _require_results(results)
    by_method: dict[str, list[dict]] = {}
    for row in results:
        by_method.setdefault(row["method"], []).append(row)
    out = []
    for method, rows in by_method.items():
        agg = {"method": method, "n_seeds": len(rows), "leaks_future": any(r.get("leaks_future") for r in rows)}
        balanced = [r.get("steps_to_balance") for r in rows]
        agg["steps_to_balance"] = balanced
        for key in _AGG_KEYS:
            vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            agg[f"{key}_mean"] = float(vals.mean()) if len(vals) else None
            # Sample std (ddof=1): the seeds are a sample of possible runs.
            agg[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
        out.append(agg)
    return out


def _fmt(value, digits: int) -> str:
    """A number with fixed decimals, or an em dash when missing."""
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_stat(row: dict, key: str, digits: int) -> str:
    """'mean ± std' for several seeds, 'mean' for one."""
    mean = _fmt(row[f"{key}_mean"], digits)
    return f"{mean} ± {_fmt(row[f'{key}_std'], digits)}" if row["n_seeds"] > 1 and mean != "—" else mean


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt_balance_steps(values: list) -> str:
    """Mean ± std of the steps to balance; when some seeds never balanced, how many did, from
    which step at the earliest and at which on average."""
    reached = np.array([v for v in values if v is not None], dtype=float)
    never = len(values) - len(reached)
    if never:
        if not len(reached):
            return f"never ({never}/{len(values)} seeds)"
        if len(reached) == 1:
            return f"1/{len(values)} seeds, at {reached[0]:.0f}"
        return f"{len(reached)}/{len(values)} seeds, from {reached.min():.0f} (mean {reached.mean():.0f})"
    if len(reached) > 1:
        return f"{reached.mean():.0f} ± {reached.std(ddof=1):.0f}"
    return f"{reached[0]:.0f}"


LEAK_MARK = "†"
LEAK_NOTE = (f"{LEAK_MARK} Expert choice reads later tokens of each sequence to route a token (future-token "
             "leakage in a causal LM): its perplexity is not comparable with the other methods.")

TABLE_HEADER = ["method", "val PPL", "experts/token", "MaxVio_global", "static floor", "shift floor", "MaxVio_train",
                "MaxVio_batch", "batch floor", "steps to balance", "late std", "seeds"]


def _fmt_experts(row: dict) -> str:
    """Experts per token; with MoE++ zero-computation experts also the FFN experts among them."""
    cell = _fmt_stat(row, "experts_per_token", 2)
    ffn, total = row.get("ffn_experts_per_token_mean"), row.get("experts_per_token_mean")
    if ffn is not None and total is not None and abs(ffn - total) > 1e-9:
        cell += f" (FFN {ffn:.2f})"
    return cell


def format_table(results: list[dict]) -> str:
    """Markdown table of aggregate(results), one row per method."""
    rows = [
        [a["method"], _fmt_stat(a, "val_ppl", 2) + (f" {LEAK_MARK}" if a["leaks_future"] else ""),
         _fmt_experts(a), _fmt_stat(a, "maxvio_global", 3),
         _fmt_stat(a, "maxvio_static_floor", 3), _fmt_stat(a, "maxvio_shift_floor", 3),
         _fmt_stat(a, "maxvio_train_windows", 3),
         _fmt_stat(a, "maxvio_batch", 3), _fmt_stat(a, "maxvio_batch_floor", 3),
         _fmt_balance_steps(a["steps_to_balance"]), _fmt_stat(a, "maxvio_batch_late_std", 3),
         str(a["n_seeds"])]
        for a in aggregate(results)
    ]
    return _markdown_table(TABLE_HEADER, rows)


_DIFF_KEYS = (("val_ppl", "val PPL", 2), ("maxvio_global", "MaxVio_global", 3),
              ("maxvio_batch", "MaxVio_batch", 3))


def differences_from_baseline(results: list[dict]) -> list[dict]:
    """Each method against the first one: difference of the seed means and its noise, and the
    same difference taken seed by seed.

    noise = 2 * sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% interval of the difference, from the
    sample std over seeds); ``exceeds`` says whether |difference| > noise. None with one seed.

    Runs of the same seed share the initial weights and the order of the training batches, so
    much of what moves one seed's perplexity moves both methods'. The paired columns use only the
    seeds both methods ran: ``paired_seeds`` (n), ``paired_difference`` (mean of the per-seed
    differences), ``paired_noise`` (2 * their sample std / sqrt(n); None below 2 seeds),
    ``paired_exceeds`` and ``paired_higher`` (in how many of the n seeds the method's value is
    higher than the first method's).
    """
    rows = aggregate(results)
    base, out = rows[0], []
    by_seed = {(r["method"], r["seed"]): r for r in results}
    for row in rows[1:]:
        for key, _, _ in _DIFF_KEYS:
            a, b = base.get(f"{key}_mean"), row.get(f"{key}_mean")
            if a is None or b is None:
                continue
            noise = None
            if base["n_seeds"] > 1 and row["n_seeds"] > 1:
                noise = 2 * math.sqrt(base[f"{key}_std"] ** 2 / base["n_seeds"]
                                      + row[f"{key}_std"] ** 2 / row["n_seeds"])
            both = [(by_seed[(row["method"], s)].get(key), by_seed[(base["method"], s)].get(key))
                    for (m, s) in by_seed if m == row["method"] and (base["method"], s) in by_seed]
            pairs = np.array([x - y for x, y in both if x is not None and y is not None], dtype=float)
            paired_noise = 2 * float(pairs.std(ddof=1)) / math.sqrt(len(pairs)) if len(pairs) > 1 else None
            paired = float(pairs.mean()) if len(pairs) else None
            out.append({"method": row["method"], "baseline": base["method"], "metric": key,
                        "difference": b - a, "noise": noise,
                        "exceeds": None if noise is None else abs(b - a) > noise,
                        "paired_seeds": len(pairs), "paired_difference": paired, "paired_noise": paired_noise,
                        "paired_exceeds": None if paired_noise is None else abs(paired) > paired_noise,
                        "paired_higher": int((pairs > 0).sum())})
    return out


def _yes_no(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def _differences_table(results: list[dict]) -> str:
    digits = {key: d for key, _, d in _DIFF_KEYS}
    labels = {key: label for key, label, _ in _DIFF_KEYS}
    rows = [[d["method"], labels[d["metric"]], f"{d['difference']:+.{digits[d['metric']]}f}",
             _fmt(d["noise"], digits[d["metric"]]), _yes_no(d["exceeds"]),
             "—" if d["paired_difference"] is None else
             f"{d['paired_difference']:+.{digits[d['metric']]}f} ± {_fmt(d['paired_noise'], digits[d['metric']])}",
             _yes_no(d["paired_exceeds"]), f"{d['paired_higher']} of {d['paired_seeds']}"]
            for d in differences_from_baseline(results)]
    return _markdown_table(["method", "metric", "difference", "seed noise (2 SE)", "exceeds noise",
                            "same-seed difference ± 2 SE", "exceeds", "higher in"], rows)


def demo_summary(results: list[dict]) -> str:
    """Plain lines for ``moe-balance demo``: each method's balance against the first method's as
    ratios, and the perplexity difference, with what one run can and cannot show."""
    rows = aggregate(results)
    base, lines = rows[0], []
    for row in rows[1:]:
        lines.append(f"{row['method']} against {base['method']} ({row['n_seeds']} seed(s), this machine):")
        for key, label, digits in _DIFF_KEYS:
            a, b = base.get(f"{key}_mean"), row.get(f"{key}_mean")
            if a is None or b is None:
                continue
            if key == "val_ppl":
                verdict = f"{b - a:+.{digits}f}"
            elif b < a:
                verdict = f"{a / b:.1f}x lower" if b > 0 else "lower"
            elif b > a:
                verdict = f"{b / a:.1f}x higher" if a > 0 else "higher"
            else:
                verdict = "equal"
            lines.append(f"  {label:<14} {b:.{digits}f} vs {a:.{digits}f}  ({verdict})")
    if min(r["n_seeds"] for r in rows) < 2:
        lines.append("One seed on one machine: compare it with the README's multi-seed tables, not with their "
                     "means; a single run's perplexity can fall well outside their spread.")
    return "\n".join(lines)


def _per_run_table(results: list[dict]) -> str:
    """Markdown table with one row per run (seed)."""
    rows = [
        [str(r["method"]), str(r["seed"]), _fmt(r.get("val_ppl"), 2), _fmt(r.get("maxvio_global"), 3),
         _fmt(r.get("maxvio_static_floor"), 3), _fmt(r.get("maxvio_shift_floor"), 3),
         _fmt(r.get("maxvio_train_windows"), 3),
         _fmt(r.get("maxvio_batch"), 3), _fmt(r.get("maxvio_batch_floor"), 3),
         _fmt_balance_steps([r.get("steps_to_balance")]), _fmt(r.get("maxvio_batch_late_std"), 3),
         _fmt(r.get("tokens_per_second"), 0), _fmt(r.get("wall_seconds"), 0)]
        for r in results
    ]
    header = ["method", "seed", "val PPL", "MaxVio_global", "static floor", "shift floor", "MaxVio_train", "MaxVio_batch",
              "batch floor", "steps to balance", "late std", "tokens/s", "wall s"]
    return _markdown_table(header, rows)


def compute_table(results: list[dict]) -> str:
    """Compute per token beside balance in tokens and in compute, one row per method."""
    rows = [[a["method"], _fmt_stat(a, "routed_params_per_token", 0), _fmt_stat(a, "ffn_experts_per_token", 2),
             _fmt_stat(a, "ffn_compute_saved", 3), _fmt_stat(a, "maxvio_global", 3), _fmt_stat(a, "maxvio_compute", 3),
             _fmt_stat(a, "val_ppl", 2)]
            for a in aggregate(results)]
    return _markdown_table(["method", "routed params/token", "FFN experts/token", "FFN compute saved",
                            "MaxVio_global (tokens)", "MaxVio_compute", "val PPL"], rows)


EXPERT_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, None))


def experts_per_token_table(results: list[dict]) -> str | None:
    """Share of tokens (all layers, all seeds) by number of experts chosen, per method; None
    when no run recorded the distribution."""
    by_method: dict[str, np.ndarray] = {}
    for r in results:
        hist = r.get("experts_per_token_hist")
        if hist:
            h = np.asarray(hist, dtype=float)
            prev = by_method.get(r["method"])
            by_method[r["method"]] = h if prev is None else prev + h
    if not by_method:
        return None
    rows = []
    for method, h in by_method.items():
        share = h / max(h.sum(), 1.0)
        mean = float((share * np.arange(len(h))).sum())
        cells = [f"{100 * share[lo:(len(h) if hi is None else hi + 1)].sum():.1f}%" for lo, hi in EXPERT_BUCKETS]
        rows.append([method, f"{mean:.2f}", *cells, str(int(np.flatnonzero(h).max()) if h.any() else 0)])
    labels = [str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}") for lo, hi in EXPERT_BUCKETS]
    return _markdown_table(["method", "mean", *labels, "max"], rows)


def _paper_table() -> str:
    """The paper's Table 1 as Markdown."""
    rows = [[p["model"], p["method"], f"{p['val_ppl']:.2f}", f"{p['maxvio_global']:.2f}"]
            for p in PAPER_RESULTS]
    return _markdown_table(["model", "method", "val PPL", "MaxVio_global"], rows)


def _write_text(path: Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _figure(nrows: int, ncols: int, panel: tuple[float, float]):
    """A pyplot-free Agg figure with a squeezed-off grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: no display, no global pyplot state
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path) -> Path:
    """Atomically save a figure as PNG."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _grouped_axes(group_sizes: list[int], panel: tuple[float, float], max_cols: int = 4):
    """A figure where each group of panels starts on a new row, wrapping at max_cols."""
    ncols = min(max_cols, max(group_sizes))
    group_rows = [math.ceil(n / ncols) for n in group_sizes]
    fig, axes = _figure(sum(group_rows), ncols, panel)
    groups, row = [], 0
    for n, nrows in zip(group_sizes, group_rows):
        cells = [axes[row + i // ncols][i % ncols] for i in range(nrows * ncols)]
        for ax in cells[n:]:
            ax.set_visible(False)
        groups.append(cells[:n])
        row += nrows
    return fig, groups


def _colors(methods) -> dict[str, str]:
    """A stable colour per method, in order of appearance."""
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(methods))}


def _first_runs(runs: dict) -> dict[str, Path]:
    """The first seed's run directory for each method that has one."""
    return {m: Path(dirs[0]) for m, dirs in runs.items() if dirs}


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centred moving average over ~2% of the points, renormalised at the edges."""
    w = max(1, len(y) // 50)
    kernel = np.ones(w)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def _plain_log_ticks(axis) -> None:
    """Label a log axis with plain numbers at 1-2-5 steps (default 3x10^-1 labels collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _maybe_log(ax, which: str, values) -> None:
    """Put ax's `which` ("x"/"y") axis on a log scale if values are positive and span > 1 decade."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
        getattr(ax, f"set_{which}scale")("log")
        _plain_log_ticks(ax.xaxis if which == "x" else ax.yaxis)


def _expert_axis(ax) -> None:
    """Integer expert indices on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert", fontsize="small")


def _mean_over_seeds(run_dirs) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean MaxVio_batch over seeds), on the union of logged steps."""
    per_seed = [dict(zip(*_series(read_metrics(d), "maxvio_batch"))) for d in run_dirs]
    steps = np.array(sorted(set().union(*per_seed)))
    if not len(steps):
        return steps, steps
    table = np.array([[s.get(x, np.nan) for x in steps] for s in per_seed])
    return steps, np.nanmean(table, axis=0)


def plot_maxvio_batch(runs: dict[str, list[Path]], path) -> Path | None:
    """Paper Fig. 3: MaxVio_batch vs training step, one line per method (mean over seeds)."""
    curves = {m: _mean_over_seeds(dirs) for m, dirs in runs.items() if dirs}
    curves = {m: c for m, c in curves.items() if len(c[0])}
    if not curves:
        return None
    colors = _colors(curves)
    fig, axes = _figure(1, 1, (8, 4.5))
    ax = axes[0][0]
    for method, (steps, y) in curves.items():
        ax.plot(steps, y, color=colors[method], alpha=0.2, lw=0.8)
        ax.plot(steps, _smooth(y), color=colors[method], lw=1.8, label=method)
    _maybe_log(ax, "y", np.concatenate([y for _, y in curves.values()]))
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over layers)")
    ax.set_title("Per-batch load violation during training (lower is better)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_ppl_vs_maxvio(results: list[dict], path) -> Path | None:
    """Paper Figs 1-2: validation PPL vs MaxVio_global, one marker per run."""
    rows = [r for r in results if r.get("val_ppl") is not None and r.get("maxvio_global") is not None]
    if not rows:
        return None
    colors = _colors(r["method"] for r in rows)
    fig, axes = _figure(1, 1, (7, 5))
    ax = axes[0][0]
    for method, color in colors.items():
        mine = [r for r in rows if r["method"] == method]
        leaks = any(r.get("leaks_future") for r in mine)  # its perplexity is not comparable
        ax.scatter([r["maxvio_global"] for r in mine], [r["val_ppl"] for r in mine],
                   color=color, s=60, edgecolor="black", lw=0.5, zorder=3, marker="X" if leaks else "o",
                   label=f"{method} {LEAK_MARK} (reads future tokens)" if leaks else method)
    _maybe_log(ax, "x", [r["maxvio_global"] for r in rows])
    ax.set_xlabel("MaxVio_global on validation set (lower = more balanced)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("Perplexity vs load balance (lower-left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _normalised_load(load) -> np.ndarray:
    """[layer x expert] load divided by each layer's mean load (1.0 = balanced)."""
    load = np.asarray(load, dtype=float)
    mean = load.mean(axis=1, keepdims=True)
    return np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)


def plot_load_heatmaps(runs: dict[str, list[Path]], path) -> Path | None:
    """Validation expert load per method (first seed) as [layer x expert] heatmaps."""
    evals = {m: _read_eval(d) for m, d in _first_runs(runs).items()}
    loads = {m: _normalised_load(ev["expert_load"]) for m, ev in evals.items() if ev.get("expert_load")}
    if not loads:
        return None
    from matplotlib.colors import LogNorm

    # Diverging map on a log scale symmetric around 1.0, so x2 and x0.5 look equally far off:
    # blue = under-loaded, white = balanced, red = overloaded. Dead experts clip to darkest blue.
    top = max(2.0, max(a.max() for a in loads.values()))
    norm = LogNorm(vmin=1.0 / top, vmax=top)
    ncols = math.ceil(math.sqrt(len(loads)))
    fig, axes = _figure(math.ceil(len(loads) / ncols), ncols, (4.5, 3.2))
    flat = [ax for row in axes for ax in row]
    for ax, (method, norm_load) in zip(flat, loads.items()):
        image = ax.imshow(np.clip(norm_load, norm.vmin, None), cmap="RdBu_r", norm=norm,
                          aspect="auto", interpolation="nearest")
        maxvio = evals[method].get("maxvio_global")
        if maxvio is None:  # fall back to the definition when eval.json lacks the summary
            maxvio = float((norm_load.max(axis=1) - 1.0).mean())
        ax.set_title(f"{method}\nMaxVio_global = {maxvio:.3f}", fontsize="medium")
        _expert_axis(ax)
        ax.set_ylabel("layer")
    for ax in flat[len(loads):]:
        ax.set_visible(False)
    bar = fig.colorbar(image, ax=flat[:len(loads)], label="load / mean load (log scale, 1 = balanced)")
    _plain_log_ticks(bar.ax.yaxis)
    fig.suptitle("Validation expert load per layer (first seed)")
    return _save(fig, path)


def _bias_history(run_dir) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, biases[step, layer, expert]) from a run's metrics, or None if never logged."""
    records = [r for r in read_metrics(run_dir) if r.get("bias") and "step" in r]
    if not records:
        return None
    records.sort(key=lambda r: r["step"])
    return np.array([r["step"] for r in records]), np.array([r["bias"] for r in records], dtype=float)


def plot_biases(runs: dict[str, list[Path]], path) -> Path | None:
    """Loss-free expert biases over training: one panel per (method, layer), one line per expert."""
    histories = {m: _bias_history(d) for m, d in _first_runs(runs).items()}
    histories = {m: h for m, h in histories.items() if h is not None}
    if not histories:
        return None
    fig, groups = _grouped_axes([h[1].shape[1] for h in histories.values()], panel=(3.6, 2.6))
    for (method, (steps, bias)), axes in zip(histories.items(), groups):
        for layer, ax in enumerate(axes):
            ax.plot(steps, bias[:, layer, :], lw=0.6, alpha=0.8)
            ax.set_title(f"{method}: layer {layer}", fontsize="small")
            ax.set_xlabel("step", fontsize="small")
            ax.set_ylabel("bias", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.grid(True, alpha=0.3)
    fig.suptitle("Loss-free routing biases over training (one line per expert)")
    return _save(fig, path)


def _domain_fractions(domain_load: dict) -> np.ndarray:
    """[layer, domain, expert] share of each domain's routed tokens that each expert receives."""
    counts = np.array(list(domain_load.values()), dtype=float).transpose(1, 0, 2)
    totals = counts.sum(axis=2, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_domain_load(runs: dict[str, list[Path]], path) -> Path | None:
    """Per method and layer, each domain's token distribution over experts (specialisation)."""
    data = {}
    for method, run_dir in _first_runs(runs).items():
        domain_load = _read_eval(run_dir).get("domain_load") or {}
        if len(domain_load) >= 2:
            data[method] = (list(domain_load), _domain_fractions(domain_load))
    if not data:
        return None
    vmax = max(f.max() for _, f in data.values())
    cols = 8  # one row per method for models with up to 8 MoE layers
    fig, groups = _grouped_axes([f.shape[0] for _, f in data.values()], panel=(2.6, 1.8), max_cols=cols)
    for (method, (domains, fractions)), axes in zip(data.items(), groups):
        for layer, ax in enumerate(axes):
            image = ax.imshow(fractions[layer], cmap="viridis", vmin=0.0, vmax=vmax,
                              aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(domains)), domains if layer % cols == 0 else [], fontsize="x-small")
            ax.set_title(f"{method}: layer {layer}", fontsize="small")
            _expert_axis(ax)
            ax.tick_params(axis="x", labelsize="x-small")
    fig.colorbar(image, ax=[ax for axes in groups for ax in axes], label="share of domain's tokens")
    fig.suptitle("Expert load by data domain (validation set, first seed)")
    return _save(fig, path)


_EXPLANATION = (
    "Each method trains the same Mixture-of-Experts language model and differs only in how it balances "
    "expert load. `no_balance` routes purely by the gating scores; `aux_loss` adds the usual "
    "auxiliary balance loss (weight alpha) to the language-model loss; `loss_free` (Auxiliary-Loss-Free "
    "Balancing, Wang et al. 2024) adds a per-expert bias to the router scores *only* for top-K "
    "selection (gating weights still use the raw scores) and, after every step, moves each bias by "
    "u toward balance (up for under-loaded experts, down for overloaded ones), so no interfering "
    "gradient is added; `loss_free_adaptive` moves each bias by a gain times the step that would have "
    "balanced its expert on the last step, the gain high while those steps keep their sign and low "
    "while they are batch noise. MaxVio = (max_i load_i - mean load) / mean load, averaged over MoE "
    "layers (0 = perfectly balanced). Columns: **MaxVio_global** over the whole validation set; "
    "**static floor**, the MaxVio on the validation set of the best single bias vector for the final "
    "router, solved on the validation set itself (what a perfect static bias could reach); **shift "
    "floor**, the MaxVio on the validation set of the best single bias for windows of the training "
    "files: no controller that learns from training batches can do better on the validation set, so "
    "shift floor minus static floor is the difference between training and validation files, and "
    "MaxVio_global minus shift floor is controller error; **MaxVio_train**, MaxVio_global's "
    "measurement on windows of the training files (in distribution); **MaxVio_batch**, per training "
    "step, mean over the second half of training; **batch floor**, the mean MaxVio over random "
    "training-sized batches of training windows with the best single bias for the final router: a "
    "batch's own content moves its loads this much whatever bias earlier batches chose, so no causal "
    "controller's MaxVio_batch can go much below it; **steps to balance**, the first step from which "
    f"MaxVio_batch stays below {BALANCE_THRESHOLD} for {BALANCE_HOLD} steps; **late std**, the std of "
    "MaxVio_batch over the last 25% of steps (late oscillation); **experts/token**, the mean number "
    "of routed experts a validation token took (top-K: exactly K; with MoE++ zero-computation "
    "experts, the FFN experts among them, its FFN compute, in brackets). Validation "
    "perplexity is exp(validation loss). Lower is better for every column but experts/token."
)


def _report_markdown(results: list[dict], plots: dict[str, Path], meta: dict) -> str:
    """The text of report.md."""
    captions = {
        "maxvio_batch": "MaxVio_batch during training (cf. paper Fig. 3)",
        "ppl_vs_maxvio": "Validation perplexity vs MaxVio_global (cf. paper Figs. 1-2)",
        "load_heatmaps": "Validation expert load per layer, normalised by the mean load",
        "biases": "Loss-free routing biases over training",
        "domain_load": "Expert load by data domain",
    }
    parts = [
        "# Auxiliary-Loss-Free Load Balancing: reproduction report",
        _EXPLANATION,
        "## Our results",
        "Mean ± sample standard deviation over seeds.\n\n" + format_table(results)
        + ("\n\n" + LEAK_NOTE if any(r.get("leaks_future") for r in results) else ""),
        "### Differences from the first method",
        "Difference of the seed means; it exceeds the seed noise when larger than twice its "
        "standard error. The same-seed columns compare runs of the same seed (same initial weights "
        "and batch order): the mean of the per-seed differences with twice its standard error, and "
        "in how many seeds the method's value was the higher one.\n\n" + _differences_table(results),
        "### Per run",
        _per_run_table(results),
    ]
    parts += ["### Compute per token",
              "Routed-expert parameters one token activates, summed over the MoE layers (3 x d_model x "
              "width per FFN expert, 3 x d_model per MoE++ constant expert, 0 for zero and copy experts); "
              "MaxVio_compute is MaxVio of tokens x width per FFN expert, which differs from MaxVio "
              "only for experts of different widths (HMoE).\n\n" + compute_table(results)]
    experts = experts_per_token_table(results)
    if experts is not None:
        parts += ["### Experts per token",
                  "Share of validation tokens (over layers and seeds) by the number of routed experts "
                  "they took: fixed for top-K and grouped routing, variable for top-p and expert "
                  "choice (0: only the residual and shared experts carry the token).\n\n" + experts]
    parts += [
        "## The paper's Table 1 (for reference)",
        "Numbers reported by Wang et al. (2024) for 1B and 3B models trained on 100B-200B tokens. "
        "They are **not comparable in absolute terms** with the small runs above; compare the "
        "*direction* of the differences between methods.\n\n" + _paper_table(),
        "## Plots",
    ]
    parts += [f"### {captions[name]}\n\n![{captions[name]}](plots/{p.name})" for name, p in plots.items()]
    parts += ["## Configuration", "```json\n" + json.dumps(meta, indent=2, default=str) + "\n```"]
    return "\n\n".join(parts) + "\n"


def write_report(out_dir, results: list[dict], runs: dict[str, list[Path]], *, meta: dict) -> Path:
    """Write results.json, plots/*.png and report.md into out_dir; return the report.md path."""
    _require_results(results)
    out_dir = Path(out_dir)
    runs = {m: [Path(d) for d in dirs] for m, dirs in runs.items()}
    for dirs in runs.values():  # fail before writing anything if a run is missing its log
        for d in dirs:
            _metrics_path(d)
    _write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plot_dir = out_dir / "plots"
    makers = {
        "maxvio_batch": lambda p: plot_maxvio_batch(runs, p),
        "ppl_vs_maxvio": lambda p: plot_ppl_vs_maxvio(results, p),
        "load_heatmaps": lambda p: plot_load_heatmaps(runs, p),
        "biases": lambda p: plot_biases(runs, p),
        "domain_load": lambda p: plot_domain_load(runs, p),
    }
    plots = {}
    for name, make in makers.items():
        path = make(plot_dir / f"{name}.png")
        if path is None:  # drop a stale plot from an earlier report in the same out_dir
            (plot_dir / f"{name}.png").unlink(missing_ok=True)
        else:
            plots[name] = path
    return _write_text(out_dir / "report.md", _report_markdown(results, plots, meta))
