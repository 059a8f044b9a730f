"""Token-choice top-K routing, the Loss-Free paper's router (``RouterConfig(method="top_k")``)."""

from __future__ import annotations

import torch

from .base import Router, _blank_padding, register_router
from .decision import biased_selection


@register_router("top_k")
class TopKRouter(Router):
    """Token-choice top-K router with an optional selection-only bias.

    The bias (Loss-Free Balancing, arXiv 2408.15664, eq. 3) is added to the scores only to
    pick the top-K experts; the gate weights gather the unbiased scores. With
    ``num_groups``/``topk_groups``, experts outside each token's best groups are ineligible
    (DeepSeek-V3 group-limited routing).
    """

    fills_every_slot = True

    def selection(self, scores_TE: torch.Tensor, bias_E: torch.Tensor | None = None,
                  multiplicative: bool = False) -> torch.Tensor:
        """scores (+ or *) bias, with experts outside the best groups at -inf (group-limited)."""
        return biased_selection(scores_TE, bias_E, num_groups=self.config.num_groups,
                                topk_groups=self.config.topk_groups, multiplicative=multiplicative)

    def select(self, selection_TE, scores_TE, token_mask_T=None):
        return _blank_padding(selection_TE.topk(self.top_k, dim=-1).indices, token_mask_T)
