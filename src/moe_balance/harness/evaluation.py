"""Evaluation of a trained model: validation loss and perplexity, MaxVio_global, the floors,
per-expert and per-domain loads, and the compute-weighted metrics of HMoE and MoE++."""

from __future__ import annotations

import math

import torch

from ..balancing import LossFreeBalancer
from ..config import MoEConfig
from ..metrics import LoadAccumulator, max_vio
from .data import TokenizedCorpus
from .floors import _best_static_bias, batch_balance, shift_floor, static_bias_floor
from .methods import get_method
from .model import EXPERT_KINDS, MoETransformer
from .sampling import eval_windows
from .train_config import TrainConfig, _autocast


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: TokenizedCorpus, cfg: TrainConfig) -> dict:
    """Validation loss, perplexity and MaxVio_global over a fixed token budget.

    Also the per-layer per-expert load over the whole set and, when the corpus has several
    domains, the load of each domain's tokens separately (to show expert specialisation).
    """
    was_training = model.training
    model.eval()
    layers, experts = len(model.moe_layers), model.config.moe.num_experts
    total = LoadAccumulator(layers, experts)
    per_domain = {d: LoadAccumulator(layers, experts) for d in corpus.domains}
    loss_sum, token_count = 0.0, 0
    scores = [[] for _ in model.moe_layers]  # each layer's (T, E) validation scores
    # tokens by number of experts chosen (0..E), summed over layers: top-p and expert choice vary
    routed = model.config.moe.num_routed_experts  # FFN experts plus MoE++ zero-computation ones
    experts_hist = torch.zeros(routed + 1, dtype=torch.int64)
    kinds_L4 = torch.zeros(layers, 4, dtype=torch.int64)

    def record(i, decision):
        scores[i].append(decision.scores.cpu())
        experts_hist.add_(torch.bincount(decision.experts_per_token.cpu(), minlength=routed + 1))

    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: record(i, out.decision))
             for i, layer in enumerate(model.moe_layers)]
    device = next(model.parameters()).device
    for tokens_BS1, domain_B in eval_windows(corpus.val, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                                             batch_size=cfg.eval_batch_size):
        for d in domain_B.unique().tolist():
            rows = domain_B == d
            tokens = tokens_BS1[rows].to(device)
            with _autocast(cfg, device.type):
                out = model(tokens[:, :-1], tokens[:, 1:])
            n = int(rows.sum()) * cfg.seq_len
            loss_sum += float(out.lm_loss) * n
            token_count += n
            total.add(out.layer_loads)
            per_domain[corpus.domains[d]].add(out.layer_loads)
            kinds_L4 += torch.stack(out.layer_kind_loads).cpu()
    for hook in hooks:
        hook.remove()
    # The same budget of fixed windows from the training files: balance in distribution.
    # NOTE: fixed positions, not excluded from training; a 300-step quick run samples about
    # 20% of the training tokens, so most of these windows were never trained on.
    train_windows = LoadAccumulator(layers, experts)
    train_scores = [[] for _ in model.moe_layers]
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: train_scores[i].append(out.decision.scores.cpu()))
             for i, layer in enumerate(model.moe_layers)]
    for tokens_BS1, _ in eval_windows(corpus.train, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                                      batch_size=cfg.eval_batch_size):
        with _autocast(cfg, device.type):
            train_windows.add(model(tokens_BS1[:, :-1].to(device)).layer_loads)
    for hook in hooks:
        hook.remove()
    model.train(was_training)
    val_loss = loss_sum / max(1, token_count)
    floor_L = shift_L = final_L = batch_floor_L = None
    # NOTE: the floors solve for equal token loads over every routed expert; with MoE++ experts
    # (tau, zero_computation_share) or compute targets (HMoE) the goal differs: not reported
    equal_targets = not model.config.moe.num_zero_computation_experts and all(
        b.target_share is None for layer in model.moe_layers for b in layer.balancers
        if isinstance(b, LossFreeBalancer))
    if equal_targets:
        val_scores, train_scores = [torch.cat(s) for s in scores], [torch.cat(s) for s in train_scores]
        floor_L = static_bias_floor(model, val_scores)
        train_best = [_best_static_bias(layer, s)[0] for layer, s in zip(model.moe_layers, train_scores)]
        shift_L = shift_floor(model, train_best, val_scores)
        final_L, batch_floor_L = batch_balance(model, train_scores, seq_len=cfg.seq_len,
                                               batch_windows=cfg.batch_size, best_biases=train_best)
    mean = lambda xs: None if xs is None else sum(xs) / len(xs)  # noqa: E731
    result = {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": token_count,
        "maxvio_global": total.maxvio(), "maxvio_global_layers": total.maxvio_per_layer(),
        "maxvio_static_floor": mean(floor_L), "maxvio_static_floor_layers": floor_L,
        "maxvio_shift_floor": mean(shift_L), "maxvio_shift_floor_layers": shift_L,
        "maxvio_train_windows": train_windows.maxvio(),
        "maxvio_batch_final": mean(final_L),
        "maxvio_batch_floor": mean(batch_floor_L), "maxvio_batch_floor_layers": batch_floor_L,
        "expert_load": total.counts.tolist(),
        "experts_per_token": float((experts_hist * torch.arange(routed + 1)).sum() / experts_hist.sum().clamp_min(1)),
        "experts_per_token_hist": experts_hist.tolist(),
        "ffn_experts_per_token": float(kinds_L4[:, 0].double().mean()) / max(token_count, 1),
        **compute_metrics(total.counts, kinds_L4, model.config.moe, token_count),
        "leaks_future": get_method(cfg.method).leaks_future,
        **kind_metrics(kinds_L4, model.config.moe, token_count),
    }
    if len(corpus.domains) > 1:
        result["domain_load"] = {d: acc.counts.tolist() for d, acc in per_domain.items()}
    return result


def compute_metrics(counts_LE: torch.Tensor, kinds_L4: torch.Tensor, moe: MoEConfig, tokens: int) -> dict:
    """Balance and cost in compute rather than tokens. ``maxvio_compute``: MaxVio of each FFN
    expert's tokens x hidden width (equal to MaxVio for equal widths; HMoE), averaged over
    layers. ``routed_params_per_token``: the routed-expert parameters one token activates,
    summed over the MoE layers (an FFN expert 3 * D * H_i, a constant expert 3 * D, zero and copy
    experts none); the shared experts and the rest of the model come on top."""
    widths = torch.tensor(moe.hidden_sizes, dtype=torch.float64)
    counts = counts_LE.double()
    params = (counts * widths).sum() * 3 * moe.d_model + kinds_L4[:, 3].double().sum() * 3 * moe.d_model
    return {"maxvio_compute": float(max_vio(counts * widths).mean()),
            "routed_params_per_token": float(params) / max(tokens, 1)}


def kind_metrics(kinds_L4: torch.Tensor, moe: MoEConfig, tokens: int) -> dict:
    """For layers with MoE++ zero-computation experts: the fraction of assignments each expert
    kind took and the FFN compute saved per token against top_k FFN experts,
    1 - (FFN assignments per token) / top_k, averaged over layers. Empty for plain layers."""
    if not moe.num_zero_computation_experts:
        return {}
    kinds = kinds_L4.double()
    fractions = (kinds / kinds.sum(-1, keepdim=True).clamp_min(1)).mean(0)
    ffn_per_token = kinds[:, 0].mean() / max(tokens, 1)
    return {**{f"kind_fraction_{kind}": float(f) for kind, f in zip(EXPERT_KINDS, fractions)},
            "ffn_compute_saved": float(1 - ffn_per_token / moe.top_k)}
