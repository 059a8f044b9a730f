"""Expert-choice routing: each expert takes its best C tokens (``RouterConfig(method="expert_choice")``),
and the warning for its causal leak."""

from __future__ import annotations

import math
import warnings

import torch

from .base import Router, register_router
from .decision import mask_to_slots


class CausalLeakWarning(UserWarning):
    """Expert-choice routing in a causal model: a token's routing reads later tokens."""


@register_router("expert_choice")
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
            n = int(valid_N.sum())  # host sync: each group's capacity counts its real tokens
            if n == 0:
                continue
            per_expert = n if math.isinf(cfg.capacity_factor) else min(n, math.ceil(cfg.capacity_factor * n / E))
            candidates_NE = selection_TE[rows_N].masked_fill(~valid_N.unsqueeze(-1), float("-inf"))
            top_CE = candidates_NE.topk(per_expert, dim=0).indices
            chosen_TE[rows_N[top_CE], experts_E.expand_as(top_CE)] = True
        return mask_to_slots(chosen_TE)
