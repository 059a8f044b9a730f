"""Token-choice routing: router logits -> scores -> (biased) top-K selection -> gate weights.

Shape legend (suffixes on tensor names):
    T tokens, E routed experts, K top_k, G expert groups, A kept token-expert assignments.

Vocabulary, used everywhere: ``logits`` are the router output z = x . e_i (float32 always);
``scores`` are sigmoid(z) or softmax(z); ``bias`` is the Loss-Free selection-only offset;
``weights`` are the gates actually applied to expert outputs (from unbiased scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RouterConfig


@dataclass(frozen=True)
class RoutingDecision:
    """Every kept (token, expert, weight) assignment, sorted by expert (stable).

    token_ids (A,) int64: row of the flattened (T, D) input each assignment reads.
    expert_ids (A,) int64: non-decreasing.
    weights (A,) float32: gate applied to that expert's output for that token.
    tokens_per_expert (E,) int64: kept assignments per expert (what dispatch computes).
    routed_tokens_per_expert (E,) int64: assignments the router chose before capacity dropping
        (the expert's demand: what balancing and load metrics count).
    logits, scores (T, E) float32: router output and its sigmoid/softmax, unbiased.
    selected (T, K) int64: the experts each token chose, before dropping (-1 for masked tokens).
    token_mask (T,) bool or None: False for padding tokens, which are never routed.
    """

    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    routed_tokens_per_expert: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    selected: torch.Tensor
    token_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def num_dropped(self) -> int:
        """Assignments the router chose but capacity dropped."""
        return int(self.routed_tokens_per_expert.sum() - self.tokens_per_expert.sum())


def compute_scores(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Router scores from float32 logits: sigmoid (Loss-Free paper, eq. 1) or softmax."""
    if score_fn == "sigmoid":
        return torch.sigmoid(logits_TE)
    return torch.softmax(logits_TE, dim=-1)


def group_limited_mask(selection_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Mask out experts outside each token's best ``topk_groups`` groups (DeepSeek-V3 routing).

    A group's score is the sum of its top-2 selection scores (top-1 for groups of one expert).
    Returns selection_TE with non-selected groups' experts set to -inf.
    """
    T, E = selection_TE.shape
    per_group = E // num_groups
    selection_TGe = selection_TE.view(T, num_groups, per_group)
    group_scores_TG = selection_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    keep_groups_TM = group_scores_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=selection_TE.device)
    keep_TG.scatter_(1, keep_groups_TM, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, num_groups, per_group).reshape(T, E)
    return selection_TE.masked_fill(~keep_TE, float("-inf"))


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert capacity ceil(factor * T * K / E) (Switch Transformer, eq. 3)."""
    if math.isinf(capacity_factor):
        return num_tokens
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def sort_assignments(
    selected_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    *,
    token_mask_T: torch.Tensor | None = None,
    capacity_per_expert: int | None = None,
    priority_TK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten (T, K) choices into assignments sorted by expert, dropping over capacity.

    Within one expert, assignments are ordered by token position, or by descending
    ``priority_TK`` when given; with a capacity, each expert keeps its first
    ``capacity_per_expert`` assignments in that order.
    Returns token_ids (A,), expert_ids (A,), weights (A,), tokens_per_expert (E,),
    routed_tokens_per_expert (E,).
    """
    T, K = selected_TK.shape
    token_ids = torch.arange(T, device=selected_TK.device).repeat_interleave(K)
    expert_ids = selected_TK.reshape(-1)
    weights = weights_TK.reshape(-1)
    if token_mask_T is not None:
        keep = token_mask_T.repeat_interleave(K)
        token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
        if priority_TK is not None:
            priority_TK = priority_TK.reshape(-1)[keep]
    elif priority_TK is not None:
        priority_TK = priority_TK.reshape(-1)
    if priority_TK is not None:
        # Two stable sorts: by priority, then by expert, so each expert sees its best first.
        order = torch.sort(priority_TK, descending=True, stable=True).indices
        token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    order = torch.sort(expert_ids, stable=True).indices
    token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    routed = torch.bincount(expert_ids, minlength=num_experts)
    if capacity_per_expert is None:
        return token_ids, expert_ids, weights, routed, routed
    starts = torch.cumsum(routed, 0) - routed
    rank = torch.arange(expert_ids.numel(), device=expert_ids.device) - starts[expert_ids]
    keep = rank < capacity_per_expert
    kept_tokens = torch.clamp(routed, max=capacity_per_expert)
    return token_ids[keep], expert_ids[keep], weights[keep], kept_tokens, routed


class TopKRouter(nn.Module):
    """Token-choice top-K router with an optional selection-only bias.

    The bias (Loss-Free Balancing, arXiv 2408.15664, eq. 3) is added to the scores only to
    pick the top-K experts; the gate weights gather the unbiased scores.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, config: RouterConfig):
        super().__init__()
        self.num_experts, self.top_k, self.config = num_experts, top_k, config
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def selection(self, scores_TE: torch.Tensor, bias_E: torch.Tensor | None = None,
                  multiplicative: bool = False) -> torch.Tensor:
        """(T, E) scores that top-K is taken on: scores + bias (or scores * bias with
        ``multiplicative``), with experts outside the best groups at -inf (group-limited)."""
        cfg = self.config
        if bias_E is None:
            selection_TE = scores_TE
        else:
            selection_TE = scores_TE * bias_E if multiplicative else scores_TE + bias_E
        if cfg.num_groups is not None:
            selection_TE = group_limited_mask(selection_TE, cfg.num_groups, cfg.topk_groups)
        return selection_TE

    def forward(
        self,
        x_TD: torch.Tensor,
        bias_E: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
        multiplicative: bool = False,
    ) -> RoutingDecision:
        """Route (T, D) tokens. bias_E: selection-only bias, added to the scores (or multiplied
        with them, ``multiplicative``, the paper's multiplicative-bias ablation)."""
        cfg = self.config
        # NOTE: logits in float32 whatever the model dtype: bf16 logits flip near-ties in top-K.
        # Autocast would run this matmul in bf16 even on float32 inputs, so it is switched off.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if cfg.check_finite and not torch.isfinite(logits_TE).all():
            raise FloatingPointError(
                "router logits contain NaN or inf (check the input activations and the router "
                "weight); pass RouterConfig(check_finite=False) to skip this check")
        scores_TE = compute_scores(logits_TE, cfg.score_fn)
        selection_TE = self.selection(scores_TE, bias_E, multiplicative)
        selected_TK = selection_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, selected_TK)
        if cfg.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.scaling_factor

        capacity_per_expert = None
        if cfg.capacity_factor is not None:
            num_valid = x_TD.shape[0] if token_mask_T is None else int(token_mask_T.sum())
            capacity_per_expert = capacity(num_valid, self.num_experts, self.top_k, cfg.capacity_factor)
        by_probs = capacity_per_expert is not None and cfg.drop_policy == "probs"
        token_ids, expert_ids, weights, kept, routed = sort_assignments(
            selected_TK, weights_TK, self.num_experts, token_mask_T=token_mask_T,
            capacity_per_expert=capacity_per_expert,
            priority_TK=weights_TK.detach() if by_probs else None)
        if token_mask_T is not None:
            selected_TK = selected_TK.masked_fill(~token_mask_T.unsqueeze(-1), -1)
        return RoutingDecision(
            token_ids=token_ids, expert_ids=expert_ids, weights=weights,
            tokens_per_expert=kept, routed_tokens_per_expert=routed,
            logits=logits_TE, scores=scores_TE, selected=selected_TK, token_mask=token_mask_T)
