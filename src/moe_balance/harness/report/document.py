"""The report itself: results.json, the figures and report.md for `moe-balance compare`.

`write_report` checks every run's log, writes results.json and the plots, then assembles
report.md from the explanation of the columns, the tables, the paper's Table 1, the figures
and the configuration. The top of the report package: it imports summary, tables and plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._files import atomic_write
from .plots import write_plots
from .summary import BALANCE_HOLD, BALANCE_THRESHOLD, _metrics_path, _require_results
from .tables import (LEAK_NOTE, _differences_table, _paper_table, _per_run_table, compute_table,
                     experts_per_token_table, format_table)


def _write_text(path: Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


_CAPTIONS = {
    "maxvio_batch": "MaxVio_batch during training (cf. paper Fig. 3)",
    "ppl_vs_maxvio": "Validation perplexity vs MaxVio_global (cf. paper Figs. 1-2)",
    "load_heatmaps": "Validation expert load per layer, normalised by the mean load",
    "biases": "Loss-free routing biases over training",
    "domain_load": "Expert load by data domain",
}


def _results_section(results: list[dict]) -> list[str]:
    """The "Our results" section: the table per method, the differences from the first, per run."""
    return [
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


def _compute_section(results: list[dict]) -> list[str]:
    """Compute per token, and experts per token when any run recorded its distribution."""
    parts = ["### Compute per token",
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
    return parts


def _paper_section() -> list[str]:
    """The paper's Table 1, with why it is not comparable in absolute terms."""
    return [
        "## The paper's Table 1 (for reference)",
        "Numbers reported by Wang et al. (2024) for 1B and 3B models trained on 100B-200B tokens. "
        "They are **not comparable in absolute terms** with the small runs above; compare the "
        "*direction* of the differences between methods.\n\n" + _paper_table(),
    ]


def _plots_section(plots: dict[str, Path]) -> list[str]:
    """One captioned image per figure drawn, linked relative to report.md."""
    return ["## Plots"] + [f"### {_CAPTIONS[name]}\n\n![{_CAPTIONS[name]}](plots/{p.name})"
                           for name, p in plots.items()]


def _report_markdown(results: list[dict], plots: dict[str, Path], meta: dict) -> str:
    """The text of report.md."""
    parts = [
        "# Auxiliary-Loss-Free Load Balancing: reproduction report",
        _EXPLANATION,
        *_results_section(results),
        *_compute_section(results),
        *_paper_section(),
        *_plots_section(plots),
        "## Configuration",
        "```json\n" + json.dumps(meta, indent=2, default=str) + "\n```",
    ]
    return "\n\n".join(parts) + "\n"


def _check_run_logs(runs: dict[str, list[Path]]) -> None:
    """FileNotFoundError naming the first run directory without a metrics.jsonl."""
    for dirs in runs.values():
        for d in dirs:
            _metrics_path(d)


def write_report(out_dir, results: list[dict], runs: dict[str, list[Path]], *, meta: dict) -> Path:
    """Write results.json, plots/*.png and report.md into out_dir; return the report.md path."""
    _require_results(results)
    out_dir = Path(out_dir)
    runs = {m: [Path(d) for d in dirs] for m, dirs in runs.items()}
    _check_run_logs(runs)  # fail before writing anything if a run is missing its log
    _write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plots = write_plots(out_dir / "plots", results, runs)
    return _write_text(out_dir / "report.md", _report_markdown(results, plots, meta))
