"""Summaries, tables, plots and the Markdown report for `moe-balance compare`.

Leaf package: it reads run directories (metrics.jsonl, eval.json) and plain dicts
only, and imports nothing from moe_balance. matplotlib is imported lazily inside
the plotting helpers so summaries and tables work without the `train` extra.

Modules, each importing only those above it:

- ``summary``: run directories -> one results row per run; ``aggregate`` per method.
- ``tables``: every Markdown table, the differences from the first method, the demo summary.
- ``plots``: every matplotlib figure.
- ``document``: ``write_report`` (results.json, plots, report.md) and report.md's text.

The names below are re-exported so that ``from moe_balance.harness.report import X`` and
``report.X`` keep working for every X callers and tests use.
"""

from .document import write_report
from .plots import (plot_biases, plot_domain_load, plot_load_heatmaps, plot_maxvio_batch, plot_ppl_vs_maxvio,
                    write_plots)
from .summary import (BALANCE_HOLD, BALANCE_THRESHOLD, aggregate, late_oscillation, read_metrics, steps_to_balance,
                      summarize_run)
# _differences_table and _fmt_balance_steps: private, but tests/test_report.py calls them as report.X.
from .tables import (EXPERT_BUCKETS, LEAK_MARK, LEAK_NOTE, PAPER_RESULTS, TABLE_HEADER, _differences_table,
                     _fmt_balance_steps, compute_table, demo_summary, differences_from_baseline,
                     experts_per_token_table, format_table)

__all__ = [
    "BALANCE_HOLD", "BALANCE_THRESHOLD", "EXPERT_BUCKETS", "LEAK_MARK", "LEAK_NOTE", "PAPER_RESULTS", "TABLE_HEADER",
    "aggregate", "compute_table", "demo_summary", "differences_from_baseline", "experts_per_token_table",
    "format_table", "late_oscillation", "plot_biases", "plot_domain_load", "plot_load_heatmaps", "plot_maxvio_batch",
    "plot_ppl_vs_maxvio", "read_metrics", "steps_to_balance", "summarize_run", "write_plots", "write_report",
]
