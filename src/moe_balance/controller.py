"""The adaptive Loss-Free bias controller, now in ``moe_balance.balancing``: its math and the rule
(``AdaptiveRule``, ``LossFree(rule="adaptive")``) in ``balancing.rules.adaptive``, whose
docstring describes it; the static-bias solver in ``balancing.static_bias``.

This module keeps the names that were imported from ``moe_balance.controller`` before the split.
"""

from .balancing.rules.adaptive import (MIN_STEP_FRACTION, NUM_BINS, adaptive_gain, flip_margins, margin_edges,
                                       margin_histograms, newton_step)
from .balancing.static_bias import select_top_k, solve_static_bias

__all__ = ["MIN_STEP_FRACTION", "NUM_BINS", "adaptive_gain", "flip_margins", "margin_edges", "margin_histograms",
           "newton_step", "select_top_k", "solve_static_bias"]
