"""The sign rule: the Loss-Free paper's constant-size bias step (``LossFree(rule="sign")``)."""

from __future__ import annotations

import torch

from .base import BiasRule, register_rule


@register_rule("sign")
class SignRule(BiasRule):
    """Auxiliary-Loss-Free Balancing's update (Wang et al. 2024, arXiv 2408.15664, Algorithm 1):

        b_i += u * sign(c̄_i - c_i),   u = ``LossFree.update_rate``,

    c_i the tokens routed to expert i in the step, c̄_i its target load (the mean load by
    default). Every bias moves by exactly u, towards balance; no state beyond the bias.
    """

    def step(self, balancer, load_E: torch.Tensor, target_E: torch.Tensor,
             pending: dict[str, torch.Tensor]) -> torch.Tensor:
        error_E = target_E - load_E
        return self.spec.update_rate * error_E.sign()
