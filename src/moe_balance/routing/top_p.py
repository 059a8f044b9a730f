"""Dynamic top-p routing: each token takes experts until their scores reach p (``RouterConfig(method="top_p")``)."""

from __future__ import annotations

import torch

from .base import Router, register_router


@register_router("top_p")
class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652).

    With P_t the token's scores normalised to sum 1 (softmax scores as they are), sorted in
    descending order, the token takes n_t experts: the shortest prefix whose mass reaches
    ``top_p`` (the crossing expert included), clamped to [1, ``max_experts``]. A selection
    bias changes *which* n_t experts (the top n_t by biased score), never how many: n_t comes
    from the unbiased scores, so balancing does not change a token's compute. ``top_k`` is
    not used for selection; it is the nominal K of the capacity formula.
    """

    def experts_needed(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """(T,) int64 n_t: 1 + the number of sorted prefixes whose mass is still below p."""
        probs_TE = scores_TE if self.config.score_fn == "softmax" else \
            scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        cumulative_TE = probs_TE.sort(dim=-1, descending=True).values.cumsum(-1)
        cap = self.config.max_experts or self.num_experts
        return ((cumulative_TE < self.config.top_p).sum(-1) + 1).clamp(max=cap)

    def select(self, selection_TE, scores_TE, token_mask_T=None):
        n_T = self.experts_needed(scores_TE)
        if token_mask_T is not None:
            n_T = n_T.masked_fill(~token_mask_T, 0)
        k_max = int(n_T.max()) if n_T.numel() else 0  # host sync: top-p's width is data-dependent
        top_TK = selection_TE.topk(k_max, dim=-1).indices
        slots_TK = torch.arange(k_max, device=selection_TE.device).expand_as(top_TK)
        return top_TK.masked_fill(slots_TK >= n_T.unsqueeze(-1), -1)
