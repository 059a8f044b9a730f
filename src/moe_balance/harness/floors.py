"""Balance floors: what the best single bias vector could reach on the same scores.

They separate controller error from what no causal controller can remove: the validation
set's own best bias (static floor), the training windows' best bias on the validation set
(shift floor) and training-sized batches under the best bias (batch floor)."""

from __future__ import annotations

import torch

from ..balancing import LossFreeBalancer
from ..controller import solve_static_bias
from ..metrics import max_vio
from .model import MoETransformer

FLOOR_TOKENS = 32768


def static_bias_floor(model: MoETransformer, scores_per_layer: list[torch.Tensor]) -> list[float]:
    """Per MoE layer, the MaxVio over these scores of the best single bias vector for the final
    router: what a perfect static bias could reach (``controller.solve_static_bias``, warm
    started from the layer's own bias, so it is never above that bias's MaxVio).

    The gap between MaxVio_global and this floor is controller error; the floor itself is what
    the validation data asks for beyond any bias (distribution shift from the training data).
    Solved on at most ``FLOOR_TOKENS`` evenly strided validation tokens. NOTE: each layer is solved on its inputs under the current biases of the layers below it,
    i.e. one layer at a time, not jointly.
    """
    return [_best_static_bias(layer, scores_TE)[1]
            for layer, scores_TE in zip(model.moe_layers, scores_per_layer)]


def shift_floor(model: MoETransformer, train_biases: list[torch.Tensor],
                val_scores_per_layer: list[torch.Tensor]) -> list[float]:
    """Per MoE layer, the MaxVio over the validation scores of the best static bias for the
    training windows (``train_biases``, from ``_best_static_bias`` on their scores).

    A controller that learns from training batches can at best find that bias, so this is the
    floor of MaxVio_global for any such controller: its excess over the static floor (the
    validation set's own best bias) is the shift between training and validation files, and
    MaxVio_global minus it is controller error. (The static floor alone cannot show the
    shift: a bias fitted to the validation set absorbs it.)
    """
    floors = []
    for layer, bias_E, scores_TE in zip(model.moe_layers, train_biases, val_scores_per_layer):
        _, multiplicative = _layer_bias(layer)
        selected_TE = layer.router.select_mask(layer.router.selection(scores_TE, bias_E, multiplicative), scores_TE)
        floors.append(float(max_vio(selected_TE.sum(0))))
    return floors


def _layer_bias(layer) -> tuple[torch.Tensor | None, bool]:
    """(the layer's Loss-Free bias on the CPU or None, whether it multiplies the scores)."""
    balancer = next((b for b in layer.balancers if isinstance(b, LossFreeBalancer)), None)
    return (None, False) if balancer is None else (balancer.expert_bias.cpu(), balancer.multiplicative)


def _best_static_bias(layer, scores_TE: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``solve_static_bias`` on at most FLOOR_TOKENS evenly strided tokens (to keep evaluation
    quick), warm started from the layer's own bias."""
    bias_E, multiplicative = _layer_bias(layer)
    return solve_static_bias(scores_TE[::-(-scores_TE.shape[0] // FLOOR_TOKENS)], layer.config.top_k,
                             multiplicative=multiplicative, initial_bias_E=bias_E, router=layer.router)


def batch_balance(model: MoETransformer, scores_per_layer: list[torch.Tensor], *, seq_len: int,
                  batch_windows: int, seed: int = 0,
                  best_biases: list[torch.Tensor] | None = None) -> tuple[list[float], list[float]]:
    """Per MoE layer, (final, floor): the mean MaxVio over training-sized batches, with the
    layer's final bias and with the best static bias for these tokens.

    scores_per_layer: (W * seq_len, E) scores of W whole windows of training text, in window
    order. The windows are shuffled (``seed``) and grouped ``batch_windows`` at a time, like the
    training batches (windows left over are dropped). The floor shows what no bias computed
    from earlier batches can beat: a batch's own content moves its loads by this much whatever
    the bias, so MaxVio_batch of any causal controller is at least about the floor. The static
    bias is solved on the pooled tokens (``solve_static_bias``, warm started from the layer's
    bias), which is near but not exactly the minimiser of the per-batch mean; ``best_biases``
    gives those solutions when the caller has them already.
    """
    finals, floors = [], []
    for i, (layer, scores_TE) in enumerate(zip(model.moe_layers, scores_per_layer)):
        W = scores_TE.shape[0] // seq_len
        batches = W // batch_windows
        if batches == 0:
            raise ValueError(f"batch_balance needs at least {batch_windows} windows, got {W}")
        order = torch.randperm(W, generator=torch.Generator().manual_seed(seed))[:batches * batch_windows]
        final_bias, multiplicative = _layer_bias(layer)
        best_bias = _best_static_bias(layer, scores_TE)[0] if best_biases is None else best_biases[i]
        per_bias = []
        # each batch is routed on its own, as in training (expert choice reads the whole batch)
        rows_NT = (order.view(batches, batch_windows, 1) * seq_len + torch.arange(seq_len)).view(batches, -1)
        for bias_E in (final_bias, best_bias):
            counts_NE = torch.stack([
                layer.router.select_mask(layer.router.selection(scores_TE[rows], bias_E, multiplicative),
                                         scores_TE[rows]).sum(0) for rows in rows_NT])
            per_bias.append(float(max_vio(counts_NE).mean()))
        finals.append(per_bias[0])
        floors.append(min(per_bias))  # both are single static vectors: the better one bounds the floor
    return finals, floors
