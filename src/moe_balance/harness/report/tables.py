"""Every Markdown table of the report and the numbers behind them, plus the demo's plain summary.

The results table (one row per method), the per-run table, the differences from the first
method (seed noise and same-seed pairs), compute per token, experts per token and the paper's
Table 1; `demo_summary` gives the ratios that `moe-balance demo` prints. Reads results rows and
their aggregate (`summary`) only.
"""

from __future__ import annotations

import math

import numpy as np

from .summary import aggregate

# The paper's Table 1 (Wang et al., 2024, arXiv 2408.15664), for reference only.
PAPER_RESULTS: list[dict] = [
    {"model": "1B, 100B tokens", "method": "aux_loss (alpha=1e-3)", "val_ppl": 9.56, "maxvio_global": 0.72},
    {"model": "1B, 100B tokens", "method": "loss_free (u=1e-3)", "val_ppl": 9.50, "maxvio_global": 0.04},
    {"model": "3B, 200B tokens", "method": "aux_loss (alpha=1e-3)", "val_ppl": 7.97, "maxvio_global": 0.52},
    {"model": "3B, 200B tokens", "method": "loss_free (u=1e-3)", "val_ppl": 7.92, "maxvio_global": 0.04},
]


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


def _seed_noise(base: dict, row: dict, key: str) -> float | None:
    """2 * the standard error of the difference of two methods' seed means; None with one seed."""
    if base["n_seeds"] > 1 and row["n_seeds"] > 1:
        return 2 * math.sqrt(base[f"{key}_std"] ** 2 / base["n_seeds"]
                             + row[f"{key}_std"] ** 2 / row["n_seeds"])
    return None


def _same_seed_differences(by_seed: dict, method: str, baseline: str, key: str) -> np.ndarray:
    """method's value minus baseline's, for each seed both ran and both recorded `key`."""
    both = [(by_seed[(method, s)].get(key), by_seed[(baseline, s)].get(key))
            for (m, s) in by_seed if m == method and (baseline, s) in by_seed]
    return np.array([x - y for x, y in both if x is not None and y is not None], dtype=float)


def _difference(method: str, baseline: str, key: str, difference: float, noise: float | None,
                pairs: np.ndarray) -> dict:
    """One differences_from_baseline entry from the difference of the means, its noise and the
    same-seed differences."""
    paired_noise = 2 * float(pairs.std(ddof=1)) / math.sqrt(len(pairs)) if len(pairs) > 1 else None
    paired = float(pairs.mean()) if len(pairs) else None
    return {"method": method, "baseline": baseline, "metric": key,
            "difference": difference, "noise": noise,
            "exceeds": None if noise is None else abs(difference) > noise,
            "paired_seeds": len(pairs), "paired_difference": paired, "paired_noise": paired_noise,
            "paired_exceeds": None if paired_noise is None else abs(paired) > paired_noise,
            "paired_higher": int((pairs > 0).sum())}


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
            pairs = _same_seed_differences(by_seed, row["method"], base["method"], key)
            out.append(_difference(row["method"], base["method"], key, b - a, _seed_noise(base, row, key), pairs))
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


def _demo_verdict(key: str, a: float, b: float, digits: int) -> str:
    """b against the first method's a: the perplexity difference, or a balance ratio."""
    if key == "val_ppl":
        return f"{b - a:+.{digits}f}"
    if b < a:
        return f"{a / b:.1f}x lower" if b > 0 else "lower"
    if b > a:
        return f"{b / a:.1f}x higher" if a > 0 else "higher"
    return "equal"


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
            lines.append(f"  {label:<14} {b:.{digits}f} vs {a:.{digits}f}  ({_demo_verdict(key, a, b, digits)})")
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


def _experts_histograms(results: list[dict]) -> dict[str, np.ndarray]:
    """Per method, the experts-per-token histograms of its runs summed (runs without one skipped)."""
    by_method: dict[str, np.ndarray] = {}
    for r in results:
        hist = r.get("experts_per_token_hist")
        if hist:
            h = np.asarray(hist, dtype=float)
            prev = by_method.get(r["method"])
            by_method[r["method"]] = h if prev is None else prev + h
    return by_method


def _experts_row(method: str, h: np.ndarray) -> list[str]:
    """Method, mean experts per token, the share in each of EXPERT_BUCKETS, and the maximum."""
    share = h / max(h.sum(), 1.0)
    mean = float((share * np.arange(len(h))).sum())
    cells = [f"{100 * share[lo:(len(h) if hi is None else hi + 1)].sum():.1f}%" for lo, hi in EXPERT_BUCKETS]
    return [method, f"{mean:.2f}", *cells, str(int(np.flatnonzero(h).max()) if h.any() else 0)]


def experts_per_token_table(results: list[dict]) -> str | None:
    """Share of tokens (all layers, all seeds) by number of experts chosen, per method; None
    when no run recorded the distribution."""
    by_method = _experts_histograms(results)
    if not by_method:
        return None
    rows = [_experts_row(method, h) for method, h in by_method.items()]
    labels = [str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}") for lo, hi in EXPERT_BUCKETS]
    return _markdown_table(["method", "mean", *labels, "max"], rows)


def _paper_table() -> str:
    """The paper's Table 1 as Markdown."""
    rows = [[p["model"], p["method"], f"{p['val_ppl']:.2f}", f"{p['maxvio_global']:.2f}"]
            for p in PAPER_RESULTS]
    return _markdown_table(["model", "method", "val PPL", "MaxVio_global"], rows)
