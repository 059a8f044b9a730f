"""Mixture of Grouped Experts: top-K/M experts in each of M groups (``RouterConfig(method="grouped")``)."""

from __future__ import annotations

import torch

from .base import Router, _blank_padding, register_router


@register_router("grouped")
class GroupedRouter(Router):
    """Mixture of Grouped Experts (Pangu Pro MoE, Tang et al. 2025, arXiv 2505.21411).

    The E experts form M = ``num_groups`` equal groups of E/M (in deployment, one group per
    device) and every token takes its top K/M experts (by biased score) inside each group, so
    each group receives exactly T * K / M assignments: group loads are equal by construction,
    and only balance inside a group is left to the balancers.
    """

    fills_every_slot = True

    @property
    def competition_groups(self) -> int:
        return self.config.num_groups

    def select(self, selection_TE, scores_TE, token_mask_T=None):
        T, E = selection_TE.shape
        M = self.config.num_groups
        per_group, k_per_group = E // M, self.top_k // M
        local_TMk = selection_TE.view(T, M, per_group).topk(k_per_group, dim=-1).indices
        offsets_M1 = torch.arange(0, E, per_group, device=selection_TE.device).unsqueeze(-1)
        return _blank_padding((local_TMk + offsets_M1).reshape(T, self.top_k), token_mask_T)
