"""What every router returns and the router-independent steps that make it: scores from logits,
the (group-limited, biased) selection scores, slot/mask conversions, capacity, and the
flattening of (T, K) choices into expert-sorted assignments (``RoutingDecision``).

Shape legend (suffixes on tensor names):
    T tokens, E routed experts, K slots per token (K_max for ragged routers), G expert groups,
    A kept token-expert assignments, C tokens per expert (expert choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    selected (T, K) int64: the experts each token chose, before dropping, in its first slots;
        -1 fills the rest. Top-K and grouped routing fill all K = top_k slots of every real
        token; top-p and expert choice give each token its own number (K = the most any token
        got, possibly 0); padding tokens (token_mask False) have only -1.
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
    def slot_mask(self) -> torch.Tensor:
        """(T, K) bool: which slots of ``selected`` hold an expert."""
        return self.selected >= 0

    @property
    def experts_per_token(self) -> torch.Tensor:
        """(T,) int64: experts each token chose (0 for padding)."""
        return self.slot_mask.sum(-1)

    def selected_mask(self) -> torch.Tensor:
        """(T, E) bool: True where the token chose the expert."""
        return slots_to_mask(self.selected, self.num_experts)

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


def slots_to_mask(selected_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, K) expert ids padded with -1 -> (T, E) bool membership."""
    T = selected_TK.shape[0]
    mask_TE1 = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=selected_TK.device)
    mask_TE1.scatter_(1, torch.where(selected_TK >= 0, selected_TK, num_experts), True)
    return mask_TE1[:, :num_experts]


def mask_to_slots(selected_TE: torch.Tensor) -> torch.Tensor:
    """(T, E) bool membership -> (T, K) expert ids in increasing order, -1 padded, K the most
    experts any token has (0 when none has any)."""
    T, E = selected_TE.shape
    k_max = int(selected_TE.sum(-1).max()) if T else 0  # host sync: the width is data-dependent
    ids_TE = torch.where(selected_TE, torch.arange(E, device=selected_TE.device), E)
    slots_TK = ids_TE.sort(dim=-1).values[:, :k_max]
    return slots_TK.masked_fill(slots_TK == E, -1)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert capacity ceil(factor * T * K / E) (Switch Transformer, eq. 3)."""
    if math.isinf(capacity_factor):
        return num_tokens
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def count_experts(expert_ids_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 occurrences of each expert id in (A,) ids, all in [0, E). Not ``bincount``:
    its output length depends on the data, which torch.compile cannot trace."""
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_ids_A.device).scatter_add_(
        0, expert_ids_A, torch.ones_like(expert_ids_A))


def sort_assignments(
    selected_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    *,
    token_mask_T: torch.Tensor | None = None,
    capacity_per_expert: int | None = None,
    priority_TK: torch.Tensor | None = None,
    all_filled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten (T, K) choices (-1 = empty slot) into assignments sorted by expert, dropping
    over capacity.

    Within one expert, assignments are ordered by token position, or by descending
    ``priority_TK`` when given; with a capacity, each expert keeps its first
    ``capacity_per_expert`` assignments in that order.
    Returns token_ids (A,), expert_ids (A,), weights (A,), tokens_per_expert (E,),
    routed_tokens_per_expert (E,).

    all_filled: every slot holds an expert and every token is real (top-K and grouped routing
    without padding), so nothing is filtered: no data-dependent shape, which lets
    ``torch.compile`` trace the dropless path in one graph.
    """
    T, K = selected_TK.shape
    token_ids = torch.arange(T, device=selected_TK.device).repeat_interleave(K)
    expert_ids = selected_TK.reshape(-1)
    weights = weights_TK.reshape(-1)
    if priority_TK is not None:
        priority_TK = priority_TK.reshape(-1)
    if not all_filled:  # host sync (boolean indexing): ragged routers and padding masks only
        keep = expert_ids >= 0  # empty slots (-1) of ragged routers and padding tokens
        if token_mask_T is not None:
            keep = keep & token_mask_T.repeat_interleave(K)
        token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
        if priority_TK is not None:
            priority_TK = priority_TK[keep]
    if priority_TK is not None:
        # Two stable sorts: by priority, then by expert, so each expert sees its best first.
        order = torch.sort(priority_TK, descending=True, stable=True).indices
        token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    order = torch.sort(expert_ids, stable=True).indices
    token_ids, expert_ids, weights = token_ids[order], expert_ids[order], weights[order]
    routed = count_experts(expert_ids, num_experts)
    if capacity_per_expert is None:
        return token_ids, expert_ids, weights, routed, routed
    starts = torch.cumsum(routed, 0) - routed
    rank = torch.arange(expert_ids.numel(), device=expert_ids.device) - starts[expert_ids]
    keep = rank < capacity_per_expert  # host sync (boolean indexing): dropping is data-dependent
    kept_tokens = torch.clamp(routed, max=capacity_per_expert)
    return token_ids[keep], expert_ids[keep], weights[keep], kept_tokens, routed


def biased_selection(scores_TE: torch.Tensor, bias_E: torch.Tensor | None = None, *,
                     num_groups: int | None = None, topk_groups: int | None = None,
                     multiplicative: bool = False) -> torch.Tensor:
    """(T, E) the scores top-K selection ranks: scores + bias (scores * bias when
    ``multiplicative``), then, with ``num_groups``/``topk_groups``, experts outside each token's
    best groups at -inf (DeepSeek-V3 group-limited routing, ``group_limited_mask``).

    The building block of Loss-Free selection: the gates are always gathered from the unbiased
    scores. ``TopKRouter`` and the transformers integration both select with it.
    """
    selection_TE = scores_TE
    if bias_E is not None:
        selection_TE = scores_TE * bias_E if multiplicative else scores_TE + bias_E
    if num_groups is not None:
        selection_TE = group_limited_mask(selection_TE, num_groups, topk_groups)
    return selection_TE
