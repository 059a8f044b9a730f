"""Routers: router logits -> scores -> (biased) selection -> gate weights -> assignments.

Shape legend (suffixes on tensor names):
    T tokens, E routed experts, K slots per token (K_max for ragged routers), G expert groups,
    A kept token-expert assignments, C tokens per expert (expert choice).

Vocabulary, used everywhere: ``logits`` are the router output z = x . e_i (float32 always);
``scores`` are sigmoid(z) or softmax(z); ``bias`` is the Loss-Free selection-only offset;
``selection`` is what the choice is made on (scores with the bias); ``weights`` are the gates
actually applied to expert outputs (from unbiased scores).

Four routers share one ``Router.forward`` and differ only in ``select`` (``ROUTERS``):
token-choice top-K, expert choice, dynamic top-p and Mixture of Grouped Experts. Every one
returns the same ``RoutingDecision``, so dispatch, experts, losses, balancers and metrics
have no router-specific code.
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RouterConfig


class CausalLeakWarning(UserWarning):
    """Expert-choice routing in a causal model: a token's routing reads later tokens."""


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
    k_max = int(selected_TE.sum(-1).max()) if T else 0
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
    if not all_filled:
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
    keep = rank < capacity_per_expert
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


class Router(nn.Module, abc.ABC):
    """Base router: the logits, scores, gates and assignments every method shares.

    A subclass implements ``select``: which experts each token takes, given the selection
    scores. ``competition_groups`` tells the Loss-Free controller which experts compete for a
    token's slots (1: all of them; M: each of M groups separately).
    """

    competition_groups = 1
    uses_capacity = True  # RouterConfig.capacity_factor caps each expert's assignments
    fills_every_slot = False  # every real token has an expert in each of its K slots

    def __init__(self, d_model: int, num_experts: int, top_k: int, config: RouterConfig):
        super().__init__()
        self.num_experts, self.top_k, self.config = num_experts, top_k, config
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        # MoE++ gating residual: logits += prev_logits @ residual_weight^T, identity at start
        self.residual_weight = nn.Parameter(torch.eye(num_experts)) if config.gating_residual else None

    def selection(self, scores_TE: torch.Tensor, bias_E: torch.Tensor | None = None,
                  multiplicative: bool = False) -> torch.Tensor:
        """(T, E) scores the choice is made on: scores + bias (or scores * bias with
        ``multiplicative``)."""
        return biased_selection(scores_TE, bias_E, multiplicative=multiplicative)

    @abc.abstractmethod
    def select(self, selection_TE: torch.Tensor, scores_TE: torch.Tensor,
               token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """(T, K) int64 experts per token, -1 for empty slots and on every padding row."""

    def select_mask(self, selection_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """(T, E) bool: ``select`` as membership (every token real)."""
        return slots_to_mask(self.select(selection_TE, scores_TE), self.num_experts)

    def forward(
        self,
        x_TD: torch.Tensor,
        bias_E: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
        multiplicative: bool = False,
        prev_logits_TE: torch.Tensor | None = None,
    ) -> RoutingDecision:
        """Route (T, D) tokens. bias_E: selection-only bias, added to the scores (or multiplied
        with them, ``multiplicative``, the paper's multiplicative-bias ablation).
        prev_logits_TE: the previous MoE layer's logits, added through ``residual_weight`` when
        ``RouterConfig.gating_residual`` (MoE++), ignored otherwise."""
        cfg = self.config
        # NOTE: logits in float32 whatever the model dtype: bf16 logits flip near-ties in top-K.
        # Autocast would run this matmul in bf16 even on float32 inputs, so it is switched off.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            if self.residual_weight is not None and prev_logits_TE is not None:
                if prev_logits_TE.shape != logits_TE.shape:
                    raise ValueError(f"prev_logits shape {tuple(prev_logits_TE.shape)} must equal this "
                                     f"layer's logits shape {tuple(logits_TE.shape)} (same tokens, same experts)")
                logits_TE = logits_TE + F.linear(prev_logits_TE.float(), self.residual_weight.float())
        if cfg.check_finite:
            _check_finite(logits_TE)
        scores_TE = compute_scores(logits_TE, cfg.score_fn)
        selection_TE = self.selection(scores_TE, bias_E, multiplicative)
        selected_TK = self.select(selection_TE, scores_TE, token_mask_T)
        empty_TK = selected_TK < 0
        weights_TK = scores_TE.gather(1, selected_TK.clamp_min(0)).masked_fill(empty_TK, 0.0)
        if cfg.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.scaling_factor

        capacity_per_expert = None
        if cfg.capacity_factor is not None and self.uses_capacity:
            num_valid = x_TD.shape[0] if token_mask_T is None else int(token_mask_T.sum())
            capacity_per_expert = capacity(num_valid, self.num_experts, self.top_k, cfg.capacity_factor)
        by_probs = capacity_per_expert is not None and cfg.drop_policy == "probs"
        token_ids, expert_ids, weights, kept, routed = sort_assignments(
            selected_TK, weights_TK, self.num_experts, capacity_per_expert=capacity_per_expert,
            priority_TK=weights_TK.detach() if by_probs else None,
            all_filled=self.fills_every_slot and token_mask_T is None)
        return RoutingDecision(
            token_ids=token_ids, expert_ids=expert_ids, weights=weights,
            tokens_per_expert=kept, routed_tokens_per_expert=routed,
            logits=logits_TE, scores=scores_TE, selected=selected_TK, token_mask=token_mask_T)


_NONFINITE = ("router logits contain NaN or inf (check the input activations and the router weight); "
              "pass RouterConfig(check_finite=False) to skip this check")


def _check_finite(logits_TE: torch.Tensor) -> None:
    """FloatingPointError on NaN or inf logits. Under torch.compile an asynchronous device
    assertion instead (a RuntimeError carrying the same words), so the check costs no host
    synchronisation and no graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(logits_TE).all(), _NONFINITE)
    elif not torch.isfinite(logits_TE).all():
        raise FloatingPointError(_NONFINITE)


def _blank_padding(selected_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    return selected_TK if token_mask_T is None else selected_TK.masked_fill(~token_mask_T.unsqueeze(-1), -1)


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
        k_max = int(n_T.max()) if n_T.numel() else 0
        top_TK = selection_TE.topk(k_max, dim=-1).indices
        slots_TK = torch.arange(k_max, device=selection_TE.device).expand_as(top_TK)
        return top_TK.masked_fill(slots_TK >= n_T.unsqueeze(-1), -1)


class ExpertChoiceRouter(Router):
    """Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368).

    Each expert takes its C = min(n, ceil(capacity_factor * n / E)) best tokens by score among
    the n real tokens of a routing batch (all tokens of the forward, or ``routing_batch_size``
    of them, formed after a random permutation with ``shuffle_tokens``). Every expert gets
    exactly C tokens, so load is balanced by construction; a token gets 0..E experts (with 0,
    the residual connection carries it). No bias applies (LossFree is refused).

    **The causal leak.** Whether token t is chosen depends on the scores of every token in the
    batch, including the tokens after t in its own sequence: in a causal language model,
    position t's output reads the future, so training loss and perplexity are not comparable
    with causal routers (Wang et al. 2024, sec. 5.2). ``causal = True`` (set by
    ``MoETransformer``) makes the first forward warn with ``CausalLeakWarning``.
    """

    uses_capacity = False  # C is the method itself, applied in select
    causal = False
    _warned = False  # the causal-leak warning, once per router

    def select(self, selection_TE, scores_TE, token_mask_T=None):
        if self.causal and not self._warned:
            self._warned = True
            warnings.warn("expert-choice routing in a causal model: each token's routing depends on "
                          "later tokens of its sequence (future-token leakage), so its loss and "
                          "perplexity are not comparable with token-choice routers",
                          CausalLeakWarning, stacklevel=2)
        T, E = selection_TE.shape
        cfg = self.config
        valid_T = torch.ones(T, dtype=torch.bool, device=selection_TE.device) if token_mask_T is None \
            else token_mask_T
        if cfg.routing_batch_size is None:
            batches = [torch.arange(T, device=selection_TE.device)]
        else:
            order = torch.randperm(T, device=selection_TE.device) if cfg.shuffle_tokens \
                else torch.arange(T, device=selection_TE.device)
            batches = order.split(cfg.routing_batch_size)
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=selection_TE.device)
        experts_E = torch.arange(E, device=selection_TE.device)
        for rows_N in batches:
            valid_N = valid_T[rows_N]
            n = int(valid_N.sum())
            if n == 0:
                continue
            per_expert = n if math.isinf(cfg.capacity_factor) else min(n, math.ceil(cfg.capacity_factor * n / E))
            candidates_NE = selection_TE[rows_N].masked_fill(~valid_N.unsqueeze(-1), float("-inf"))
            top_CE = candidates_NE.topk(per_expert, dim=0).indices
            chosen_TE[rows_N[top_CE], experts_E.expand_as(top_CE)] = True
        return mask_to_slots(chosen_TE)


ROUTERS: dict[str, type[Router]] = {
    "top_k": TopKRouter, "expert_choice": ExpertChoiceRouter, "top_p": TopPRouter, "grouped": GroupedRouter,
}


def build_router(d_model: int, num_experts: int, top_k: int, config: RouterConfig) -> Router:
    """The router for ``config.method`` (``ROUTERS``)."""
    return ROUTERS[config.method](d_model, num_experts, top_k, config)
