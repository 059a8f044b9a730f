"""The loss formulas as pure functions (coefficient not included), each with its paper's equation
in the docstring: the Switch/GShard loss from counts, per micro-batch and per sequence
(DeepSeek-V3), the dynamic (entropy) loss of top-p routing, the router z-loss, and the
per-expert counts they read.

Shape legend: T tokens, E experts, K top_k, B sequences, S sequence length.
"""

from __future__ import annotations

import torch

from ..routing import count_experts


def normalized_probs(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores renormalised over all experts (DeepSeek-V3 eq. 19; a no-op for softmax)."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape[:-1], dtype=like.dtype, device=like.device) if mask is None \
        else mask.to(like.dtype)


def switch_loss_from_counts(probs_TE: torch.Tensor, counts_E: torch.Tensor,
                            token_mask_T: torch.Tensor | None = None,
                            expert_weights_E: torch.Tensor | None = None) -> torch.Tensor:
    """N * sum_i eta_i f_i P_i with f_i = counts_i / sum(counts) and P_i = mean_t probs_{t,i}.

    Switch Transformer eq. 4 / GShard; sum(counts) = K * T for dropless top-K routing, so f is
    the fraction of the K*T assignments. Equals 1 at perfect balance. Padding tokens (mask
    False) are left out of P; leave them out of ``counts`` too. eta (``expert_weights_E``,
    default 1): MoE++'s per-kind weights (tau for zero-computation experts).
    """
    valid_T = _valid(token_mask_T, probs_TE)
    p_E = (probs_TE * valid_T.unsqueeze(-1)).sum(0) / valid_T.sum().clamp_min(1)
    f_E = counts_E.float() / counts_E.sum().clamp_min(1).float()
    terms_E = f_E * p_E
    if expert_weights_E is not None:
        terms_E = terms_E * expert_weights_E
    return probs_TE.shape[-1] * terms_E.sum()


def switch_aux_loss(scores_TE: torch.Tensor, selected_TK: torch.Tensor,
                    token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Micro-batch Switch/GShard loss from the router's scores and top-K choices."""
    return switch_loss_from_counts(normalized_probs(scores_TE),
                                   expert_counts(selected_TK, scores_TE.shape[-1], token_mask_T),
                                   token_mask_T)


def sequence_aux_loss(scores_BSE: torch.Tensor, selected_BSK: torch.Tensor,
                      token_mask_BS: torch.Tensor | None = None,
                      expert_weights_E: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (eqs. 17-20), averaged over the B sequences.

    Per sequence: N/(K*S) * sum_i count_i * P_i with P over that sequence's tokens, i.e. the
    Switch loss computed on each sequence alone; K*S is the sequence's number of assignments
    (its filled slots, for routers with a variable number of experts per token, -1 marking an
    empty slot). Sequences that are all padding are skipped.
    """
    B, S, E = scores_BSE.shape
    K = selected_BSK.shape[-1]
    probs_BSE = normalized_probs(scores_BSE)
    valid_BS = _valid(token_mask_BS, probs_BSE)
    n_valid_B = valid_BS.sum(1)
    p_BE = (probs_BSE * valid_BS.unsqueeze(-1)).sum(1) / n_valid_B.clamp_min(1).unsqueeze(-1)
    filled_BSK = (selected_BSK >= 0).to(probs_BSE.dtype) * valid_BS.unsqueeze(-1)
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, selected_BSK.clamp_min(0).reshape(B, S * K), filled_BSK.reshape(B, S * K))
    f_BE = counts_BE / filled_BSK.sum((1, 2)).clamp_min(1).unsqueeze(-1)
    terms_BE = f_BE * p_BE
    if expert_weights_E is not None:  # MoE++'s tau for zero-computation experts
        terms_BE = terms_BE * expert_weights_E
    per_seq_B = E * terms_BE.sum(-1)
    has_tokens_B = n_valid_B > 0
    # the mean over sequences with tokens (0 when none has any), without a host sync
    return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1)


def dynamic_loss(scores_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Huang et al. 2024's dynamic loss (eq. 6): mean_t -sum_i P_{t,i} log P_{t,i}, the entropy
    of each token's scores normalised over the experts."""
    probs_TE = normalized_probs(scores_TE)
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
    valid_T = _valid(token_mask_T, scores_TE)
    return (entropy_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t logsumexp(z_t)^2."""
    valid_T = _valid(token_mask_T, logits_TE)
    lse2_T = torch.logsumexp(logits_TE, dim=-1).square()
    return (lse2_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def expert_counts(selected_TK: torch.Tensor, num_experts: int,
                  token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) int64 number of tokens that chose each expert (padding rows and empty slots, -1,
    left out)."""
    if token_mask_T is not None:
        selected_TK = selected_TK[token_mask_T]
    selected_A = selected_TK.reshape(-1)
    return count_experts(selected_A[selected_A >= 0], num_experts)
