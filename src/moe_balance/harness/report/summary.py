"""Reading finished run directories: one results row per run, one aggregate row per method.

A run directory holds metrics.jsonl (one JSON line per logged training step) and, after the
final evaluation, eval.json. `summarize_run` turns them into the row that results.json keeps;
`aggregate` reduces the rows of all seeds of a method to means and sample stds. The bottom of
the report package: it imports nothing from the package or from moe_balance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

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


def _val_ppl(ev: dict) -> float | None:
    """The evaluation's perplexity, or exp(val_loss) when only the loss was saved."""
    val_ppl = ev.get("val_ppl")
    if val_ppl is None and ev.get("val_loss") is not None:
        val_ppl = math.exp(ev["val_loss"])
    return val_ppl


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
    return {
        "method": method,
        "seed": seed,
        "val_loss": ev.get("val_loss"),
        "val_ppl": _val_ppl(ev),
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


def _rows_by_method(results: list[dict]) -> dict[str, list[dict]]:
    """The results rows grouped by method, in order of first appearance."""
    by_method: dict[str, list[dict]] = {}
    for row in results:
        by_method.setdefault(row["method"], []).append(row)
    return by_method


def _aggregate_method(method: str, rows: list[dict]) -> dict:
    """One method's aggregate row: n_seeds, leaks_future, steps_to_balance per seed and the
    mean/std of every key metric."""
    agg = {"method": method, "n_seeds": len(rows), "leaks_future": any(r.get("leaks_future") for r in rows)}
    balanced = [r.get("steps_to_balance") for r in rows]
    agg["steps_to_balance"] = balanced
    for key in _AGG_KEYS:
        vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
        agg[f"{key}_mean"] = float(vals.mean()) if len(vals) else None
        # Sample std (ddof=1): the seeds are a sample of possible runs.
        agg[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
    return agg


def aggregate(results: list[dict]) -> list[dict]:
    """One row per method (first-appearance order): n_seeds and mean/std of the key metrics."""
    _require_results(results)
    return [_aggregate_method(method, rows) for method, rows in _rows_by_method(results).items()]
