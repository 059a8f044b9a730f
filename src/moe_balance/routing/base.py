"""The ``Router`` base class (logits, scores, gates and assignments every method shares), the
finiteness check on its logits, and the registry of routers by ``RouterConfig.method``
(``ROUTERS``, filled by ``register_router`` in each router's module) with ``build_router``.

Shape legend (suffixes on tensor names):
    T tokens, E routed experts, K slots per token (K_max for ragged routers), G expert groups,
    A kept token-expert assignments, C tokens per expert (expert choice).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig
from .decision import RoutingDecision, biased_selection, capacity, compute_scores, slots_to_mask, sort_assignments


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
            # host sync (masked input only): capacity is counted over real tokens, and dropping
            # makes the number of assignments data-dependent anyway
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
    """FloatingPointError on NaN or inf logits, on the CPU. On an accelerator, and under
    torch.compile, an asynchronous device assertion instead (a RuntimeError at the next
    synchronising call), so the check costs no host synchronisation and no graph break."""
    if torch.compiler.is_compiling() or logits_TE.device.type != "cpu":
        torch._assert_async(torch.isfinite(logits_TE).all(), _NONFINITE)
    elif not torch.isfinite(logits_TE).all():  # CPU: reading a CPU bool is no device sync
        raise FloatingPointError(_NONFINITE)


def _blank_padding(selected_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    return selected_TK if token_mask_T is None else selected_TK.masked_fill(~token_mask_T.unsqueeze(-1), -1)


ROUTERS: dict[str, type[Router]] = {}


def register_router(method: str):
    """Class decorator: make a ``Router`` subclass the router of ``RouterConfig(method=method)``
    (the method must also be one of ``config.ROUTER_METHODS``, which ``RouterConfig`` accepts)."""
    def register(cls: type[Router]) -> type[Router]:
        if method in ROUTERS:
            raise ValueError(f"router method {method!r} is already registered ({ROUTERS[method].__name__})")
        ROUTERS[method] = cls
        return cls
    return register


def build_router(d_model: int, num_experts: int, top_k: int, config: RouterConfig) -> Router:
    """The router for ``config.method`` (``ROUTERS``)."""
    return ROUTERS[config.method](d_model, num_experts, top_k, config)
