"""Summaries, tables, plots and the Markdown report for `moe-balance compare`."""

from .plots import (  # noqa: F401
    BALANCE_HOLD, BALANCE_THRESHOLD, EXPERT_BUCKETS, LEAK_MARK, LEAK_NOTE, PAPER_RESULTS, TABLE_HEADER,
    _differences_table, _fmt_balance_steps, aggregate, compute_table, demo_summary, differences_from_baseline,
    experts_per_token_table, format_table, late_oscillation, plot_biases, plot_domain_load, plot_load_heatmaps,
    plot_maxvio_batch, plot_ppl_vs_maxvio, read_metrics, steps_to_balance, summarize_run, write_report,
)
