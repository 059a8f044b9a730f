"""The error rule: a bias step proportional to the relative load error (``LossFree(rule="error")``)."""

from __future__ import annotations

import torch

from .base import BiasRule, register_rule


@register_rule("error")
class ErrorRule(BiasRule):
    """The Loss-Free paper's raw-error ablation (Wang et al. 2024, arXiv 2408.15664: the load
    error in place of its sign), normalised by the target load:

        b_i += u * (c̄_i - c_i) / c̄_i,   u = ``LossFree.update_rate``,

    c_i the tokens routed to expert i in the step, c̄_i its target load (the mean load by
    default). The step shrinks as the expert nears balance; no state beyond the bias.
    """

    def step(self, balancer, load_E: torch.Tensor, target_E: torch.Tensor,
             pending: dict[str, torch.Tensor]) -> torch.Tensor:
        error_E = target_E - load_E
        return self.spec.update_rate * (error_E / target_E)
