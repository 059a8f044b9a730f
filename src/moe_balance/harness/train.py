"""Training harness: one run (``train``), several methods x seeds (``compare``), evaluation.

A run directory holds: config.json, metrics.jsonl (one line per optimizer step), tb/
(TensorBoard events), ckpt-<step>.pt (the newest complete checkpoints), eval.json (final
evaluation) and model.safetensors (final weights and balancer buffers).

Every run with the same seed sees the same initial weights and the same batches, whatever
the method: the sampler is a pure function of (seed, batch index) and the model is built
right after seeding, so methods differ only in how they balance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import parallel as par
from ._files import LOCK_NAME, RunDirectoryError, exclusive_lock, remove_if_unused
from .._optional import require
from ..balancing import LossFreeBalancer, discard_pending_counts, update_balancers
from .checkpoint import atomic_write, latest_valid_checkpoint, remove_orphan_temporaries, save_checkpoint
from ..config import MoEConfig, is_number
from ..controller import solve_static_bias
from .data import TokenizedCorpus, prepare_corpus
from .methods import get_method
from ..metrics import LoadAccumulator, coefficient_of_variation, dead_experts, max_vio
from .model import EXPERT_KINDS, ModelConfig, MoETransformer, model_preset
from .report import format_table, summarize_run, write_report
from .sampling import BatchSampler, eval_windows

DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
# "skip" gives up after this many consecutive skipped steps: the weights are then damaged, not noisy
MAX_CONSECUTIVE_SKIPS = 10


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. ``preset`` names the model architecture (``model.PRESETS``)."""

    preset: str = "quick"
    method: str = "loss_free"
    seed: int = 0
    data: str | None = None            # None: the Python standard library source
    vocab_size: int = 8192
    val_fraction: float = 0.15         # share of the files held out for validation
    max_train_tokens: int | None = None
    cache_dir: str = ".cache/moe_balance"
    steps: int = 300
    batch_size: int = 32               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1          # cosine decay to 10% of the peak, as in the paper
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"             # "bfloat16": CPU autocast for the forward pass
    eval_tokens: int = 131072
    eval_batch_size: int = 32
    eval_every: int = 0                # 0: evaluate at the end only
    checkpoint_every: int = 100        # 0: only the final checkpoint
    log_every: int = 1
    nonfinite: str = "stop"            # NaN/inf loss, gradient or router logits: "stop" or "skip" the step
    # MoE++ (None: what the method says; see methods.moe_plus_plus)
    zero_experts: int | None = None    # zero-computation experts that output 0
    copy_experts: int | None = None    # ... that output their input
    constant_experts: int | None = None  # ... that output a learned vector mixed with the input
    gating_residual: bool | None = None  # add the previous MoE layer's router logits (MoE++)
    expert_width_ratios: str | None = None  # HMoE: e.g. "0.5,1.5": expert widths x the preset's, repeated
    locality_bonus: float = 0.0        # expert parallel: selection bonus for the token's own rank's experts

    def __post_init__(self) -> None:
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value) -> bool:
            return is_number(value) and math.isfinite(value)

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "eval_tokens",
                     "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not (integer(value) and value >= 1):
                raise ValueError(f"TrainConfig.{name}={value!r} must be an integer >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not (integer(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value!r} must be an integer >= 0")
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            value = getattr(self, name)
            if value is not None and not (integer(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name}={value!r} must be an integer >= 0 or None")
        if self.gating_residual is not None and not isinstance(self.gating_residual, bool):
            raise ValueError(f"TrainConfig.gating_residual={self.gating_residual!r} must be True, False or None")
        if self.max_train_tokens is not None and not (integer(self.max_train_tokens) and self.max_train_tokens >= 1):
            raise ValueError(f"TrainConfig.max_train_tokens={self.max_train_tokens!r} must be an integer >= 1 or None")
        for name in ("lr", "grad_clip"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be a finite number > 0")
        if not (number(self.val_fraction) and 0 < self.val_fraction < 1):
            raise ValueError(f"TrainConfig.val_fraction={self.val_fraction!r} must be a number in (0, 1)")
        if not (number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r} must be a number in [0, 1]")
        if not (number(self.locality_bonus) and self.locality_bonus >= 0):
            raise ValueError(f"TrainConfig.locality_bonus={self.locality_bonus!r} must be a finite number >= 0")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay!r} must be a finite number >= 0")
        for name in ("preset", "method", "cache_dir"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be a non-empty string")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"TrainConfig.nonfinite={self.nonfinite!r} is not allowed; choose one "
                             f"of {NONFINITE_POLICIES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r} is not allowed; choose one of {DTYPES}")
        get_method(self.method)  # ValueError listing the known methods
        model_preset(self.preset)  # ValueError listing the known presets
        model_config(self)  # the method's layer with the MoE++ flags: ValueError naming a bad field


# Training budgets per preset (the architecture is in model.PRESETS). Measured on the
# 2-core reference machine; see README "Results".
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(preset="tiny", vocab_size=512, max_train_tokens=200_000, steps=20, batch_size=8,
                 seq_len=32, warmup_steps=2, eval_tokens=4096, checkpoint_every=10),
    # lr 1e-3 as in the paper: at 2e-3 each early step moves router scores by ~0.007, more than
    # the bias precision balance needs (~0.01 of bias costs MaxVio ~0.7 here), for every method.
    "quick": dict(preset="quick", steps=300, batch_size=32, seq_len=64, warmup_steps=30,
                  lr=1e-3, eval_tokens=131072, checkpoint_every=100),
    "standard": dict(preset="standard", steps=800, batch_size=32, seq_len=128, warmup_steps=80,
                     lr=1e-3, eval_tokens=262144, checkpoint_every=200),
    "paper-1b": dict(preset="paper-1b", vocab_size=32000, steps=100_000, batch_size=1152,
                     seq_len=2048, warmup_steps=1000, lr=1e-3, eval_tokens=10_000_000,
                     checkpoint_every=1000),
}


def train_config(preset: str = "quick", **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a named training preset with field overrides."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[preset], **overrides})


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it (paper sec. 4.1)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def _ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        ratios = ()
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"TrainConfig.expert_width_ratios={text!r} must be comma-separated positive "
                         "numbers, e.g. '0.5,1.5'")
    return ratios


def model_config(cfg: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The preset's architecture with the method's router, balancers and layer options, and
    the run's MoE++ flags (when set) over those."""
    method = get_method(cfg.method)
    layer = dict(method.layer)
    for name in ("zero_experts", "copy_experts", "constant_experts"):
        if getattr(cfg, name) is not None:
            layer[name] = getattr(cfg, name)
    if cfg.expert_width_ratios is not None:
        layer["expert_width_ratios"] = _ratios(cfg.expert_width_ratios)
    router = method.router
    if cfg.gating_residual is not None:
        router = dataclasses.replace(router, gating_residual=cfg.gating_residual)
    return model_preset(cfg.preset, vocab_size=vocab_size, seq_len=cfg.seq_len, balancers=method.balancers,
                        router=router, moe_overrides=layer)


def build_model(cfg: TrainConfig, vocab_size: int) -> MoETransformer:
    config = model_config(cfg, vocab_size)
    torch.manual_seed(cfg.seed)
    return MoETransformer(config)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with weight decay on matrices only (norms and 1-d tensors are not decayed).

    The Loss-Free bias is a buffer, not a parameter: the optimizer never sees it.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def _autocast(cfg: TrainConfig):
    if cfg.dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _loss_free_biases(model: MoETransformer) -> list[list[float]] | None:
    biases = [layer.expert_bias for layer in model.moe_layers]
    if any(b is None for b in biases):
        return None
    return [b.tolist() for b in biases]


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
    for tokens_BS1, domain_B in eval_windows(corpus.val, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                                             batch_size=cfg.eval_batch_size):
        for d in domain_B.unique().tolist():
            rows = domain_B == d
            with _autocast(cfg):
                out = model(tokens_BS1[rows, :-1], tokens_BS1[rows, 1:])
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
        with _autocast(cfg):
            train_windows.add(model(tokens_BS1[:, :-1]).layer_loads)
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
        W, E = scores_TE.shape[0] // seq_len, scores_TE.shape[1]
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


@contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM back for a few statements (delivered on exit), where the OS
    allows it: so a log line and the counter that names it change together."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _training_state(model, optimizer, scheduler, step: int, parallel: par.ParallelGroups | None) -> dict:
    """The checkpoint's content, always in the single-process layout (a parallel run gathers
    its experts and their optimizer moments: collective), so any layout can resume it."""
    if parallel is None:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    else:
        model_state = par.gather_state_dict(model, parallel)
        optimizer_state = par.gather_optimizer_state(optimizer, model, parallel)
    return {"step": step, "model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}


def _load_training_state(model, optimizer, scheduler, state: dict, parallel: par.ParallelGroups | None) -> None:
    if parallel is None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    else:
        par.load_full_state_dict(model, state["model"], parallel)
        par.load_full_optimizer_state(optimizer, model, state["optimizer"], parallel)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])


def _full_model(model: MoETransformer, parallel: par.ParallelGroups | None) -> MoETransformer | None:
    """The single-process model with this run's weights: ``model`` itself, or for a parallel
    run a copy assembled on rank 0 from every rank's experts (collective; None elsewhere)."""
    if parallel is None:
        return model
    state = par.gather_state_dict(model, parallel)
    if parallel.data_rank != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the run's RNG alone
        full = MoETransformer(model.config)
    full.load_state_dict(state)
    return full.train(model.training)


def _prepare(cfg: TrainConfig, progress: bool, parallel: par.ParallelGroups | None) -> TokenizedCorpus:
    """The run's corpus; in a parallel run rank 0 builds (and caches) it first, the others then
    read the cache, so no two processes write it at once."""
    def prepare(show: bool) -> TokenizedCorpus:
        return prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, cache_dir=Path(cfg.cache_dir),
                              val_fraction=cfg.val_fraction, max_train_tokens=cfg.max_train_tokens, progress=show)

    if parallel is None:
        return prepare(progress)
    corpus = prepare(progress) if parallel.data_rank == 0 else None
    par.broadcast_from_first(None, parallel)  # rank 0 is done with the cache
    return corpus if corpus is not None else prepare(False)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics of steps <= last_step (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    kept, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            damaged += 1  # a line cut by a kill or damaged on disk: drop it, keep the others
    if damaged:
        print(f"moe-balance: dropped {damaged} unreadable line(s) from {path}", file=sys.stderr)
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))


# Fields that change no result: a resumed run may set them differently.
# may change on --resume: they do not change what is trained (nonfinite: a run stopped by a NaN
# can be resumed with --nonfinite skip)
_RESUME_FREE_FIELDS = {"checkpoint_every", "log_every", "cache_dir", "eval_every", "nonfinite"}


def _check_same_config(out_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run directory that was trained with a different configuration."""
    path = out_dir / "config.json"
    if not path.exists():
        return
    # a field added after the run started was, in effect, at its default
    old = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | json.loads(path.read_text())["train"]
    new = dataclasses.asdict(cfg)
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
               if k not in _RESUME_FREE_FIELDS and old.get(k) != v]
    if changed:
        raise ValueError(f"cannot resume {out_dir}: it was trained with a different configuration "
                         f"({'; '.join(changed)}); use another --out or remove the directory")


class NonFiniteTraining(FloatingPointError):
    """A training step produced NaN or inf (``TrainConfig.nonfinite="stop"``, or too many
    consecutive skipped steps); the message names the step, and the layer when a router saw it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: ``step`` optimizer steps were done (the newest checkpoint may be
    older; ``--resume`` continues from it exactly)."""

    def __init__(self, step: int, out_dir: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.out_dir = step, out_dir


def _claim_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty run directory unless resuming it or told to overwrite it (called
    with the directory's lock held, so two processes cannot both find it empty)."""
    entries = [e for e in out_dir.iterdir() if e.name != LOCK_NAME]
    if not entries or resume:
        return
    if not overwrite:
        raise RunDirectoryError(
            f"run directory {out_dir} is not empty; pass --resume to continue the run in it or "
            "--overwrite to replace it")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          corpus: TokenizedCorpus | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None,
          parallel: par.ParallelGroups | None = None) -> dict:
    """Train one model; returns the final evaluation plus wall time and token counts.

    resume: continue from the newest complete checkpoint in ``out_dir`` (fresh start if none);
    the resumed run's later steps equal the uninterrupted run's. Without ``resume`` a
    non-empty ``out_dir`` is refused unless ``overwrite`` (which first deletes its contents).
    The run holds an exclusive lock on ``out_dir`` (``RunDirectoryError`` if another process
    has it). on_step(step, record) is called after each optimizer step (used by tests to
    simulate a crash).

    parallel: run on every rank of these groups (``parallel.launch`` under torchrun): each rank
    trains on its share of every global batch, the experts sharded over ``parallel.expert``.
    Rank 0 alone owns ``out_dir`` (lock, logs, checkpoints, evaluation); every rank returns
    the same result.
    """
    if parallel is not None:
        _check_parallel(cfg, parallel)
        if parallel.data_rank != 0:
            refused = par.broadcast_from_first(None, parallel)
            if refused is not None:
                raise RunDirectoryError(refused)
            return _train(cfg, Path(out_dir), resume=resume, corpus=corpus, progress=False, on_step=on_step,
                          parallel=parallel)
        with ExitStack() as stack:
            try:
                out_dir, created = stack.enter_context(_claim(out_dir, resume=resume, overwrite=overwrite))
            except (RunDirectoryError, OSError) as err:  # the others must not wait for a run that never starts
                par.broadcast_from_first(str(err), parallel)
                raise
            par.broadcast_from_first(None, parallel)
            return _guarded(out_dir, created, lambda: _train(cfg, out_dir, resume=resume, corpus=corpus,
                                                             progress=progress, on_step=on_step, parallel=parallel))
    with _claim(out_dir, resume=resume, overwrite=overwrite) as (out_dir, created):
        return _guarded(out_dir, created, lambda: _train(cfg, out_dir, resume=resume, corpus=corpus,
                                                         progress=progress, on_step=on_step, parallel=None))


def _check_parallel(cfg: TrainConfig, parallel: par.ParallelGroups) -> None:
    world, ep = parallel.data_size, parallel.ep_size
    if cfg.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the {world} "
                         "processes: each trains on an equal share of every batch")
    experts = model_config(cfg).moe.num_experts
    if experts % ep:
        raise ValueError(f"the model's {experts} experts cannot be split over --expert-parallel {ep}: "
                         f"choose a divisor of {experts}")


def _guarded(out_dir: Path, created: bool, run: Callable[[], dict]) -> dict:
    try:
        return run()
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty directory
            remove_if_unused(out_dir)
        raise


@contextmanager
def _claim(out_dir: str | Path, *, resume: bool, overwrite: bool):
    """Lock the run directory and check it may be used (``_claim_run_dir``); yields
    (path, whether this call created it)."""
    if not str(out_dir).strip():
        raise RunDirectoryError("the run directory (--out) must be a non-empty path")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"the run directory {out_dir} exists and is not a directory")
    created = not out_dir.exists()
    with exclusive_lock(out_dir):
        try:
            _claim_run_dir(out_dir, resume=resume, overwrite=overwrite)
            remove_orphan_temporaries(out_dir)  # from a writer killed mid-checkpoint; we hold the lock
        except BaseException:
            if created:
                remove_if_unused(out_dir)
            raise
        yield out_dir, created


def _train(cfg: TrainConfig, out_dir: Path, *, resume: bool, corpus: TokenizedCorpus | None,
           progress: bool, on_step: Callable[[int, dict], None] | None,
           parallel: par.ParallelGroups | None = None) -> dict:
    main = parallel is None or parallel.data_rank == 0  # the rank that owns out_dir
    if main:
        require("tensorboard", "TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

    tqdm = require("tqdm", "progress bars").tqdm
    if corpus is None:
        corpus = _prepare(cfg, progress, parallel)
    model = build_model(cfg, corpus.vocab_size)
    params = model.param_counts()  # of the full model: counted before any sharding
    if parallel is not None:  # every rank built the same full model: each keeps its experts
        par.parallelize(model, parallel, locality_bonus=cfg.locality_bonus)
    optimizer, scheduler = build_optimizer(model, cfg)
    start_step, wall_before = 0, 0.0
    state = None
    if resume and main:
        state, checkpoint, skipped = latest_valid_checkpoint(out_dir)
        for reason in skipped:
            print(f"moe-balance: skipping {reason}", file=sys.stderr)
        if skipped:
            print(f"moe-balance: resuming from {checkpoint}" if checkpoint is not None
                  else "moe-balance: no usable checkpoint; starting from step 0", file=sys.stderr)
        if state is not None:
            _check_same_config(out_dir, cfg)
    if resume and parallel is not None:
        state = par.broadcast_from_first(state, parallel)
    if state is not None:
        _load_training_state(model, optimizer, scheduler, state, parallel)
        start_step, wall_before = state["step"], state.get("wall_seconds", 0.0)
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start_step)  # a fresh start (step 0) keeps no line
        layout = None if parallel is None else {"processes": parallel.data_size, "expert_parallel": parallel.ep_size}
        atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(
            {"train": dataclasses.asdict(cfg), "model": _jsonable(model.config),
             "params": params, "vocab_size": corpus.vocab_size, "parallel": layout}, indent=2)))

    sampler = BatchSampler(corpus.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1) if main else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    model.train()
    started = time.perf_counter()
    bar = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps,
               desc=f"{cfg.method} s{cfg.seed}", disable=not (progress and main), dynamic_ncols=True)
    done = start_step  # optimizer steps finished (for the message if Ctrl-C stops the run)
    skipped_in_a_row = 0
    routing = _RankStats(model, parallel) if parallel is not None and parallel.ep_size > 1 else None
    try:
        with open(metrics_path, "a") if main else nullcontext() as metrics_file:
            for step in bar:
                t0 = time.perf_counter()
                try:
                    record = _train_step(model, optimizer, scheduler, sampler, cfg, step, parallel, routing)
                except RuntimeError as err:
                    if parallel is None:
                        raise
                    raise DistributedFailure(
                        f"step {step} failed on rank {parallel.data_rank}: {err} (in a distributed run this "
                        "usually means another rank died or hung longer than --dist-timeout: read its log)") from err
                record["tokens_per_second"] = tokens_per_step / (time.perf_counter() - t0)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    full = _full_model(model, parallel)
                    if main:
                        ev = evaluate(full, corpus, cfg)
                        record.update(val_loss=ev["val_loss"], val_ppl=ev["val_ppl"], maxvio_global=ev["maxvio_global"])
                    del full
                if not main:  # rank 0 logs and saves; the others take part in the gathering only
                    done = step
                    if _checkpoint_due(cfg, step):
                        _training_state(model, optimizer, scheduler, step, parallel)
                    if on_step is not None:
                        on_step(step, record)
                    continue
                with _signals_deferred():  # a Ctrl-C lands before or after the line, never between
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    done = step  # logged: the step a Ctrl-C message names
                skipped_in_a_row = skipped_in_a_row + 1 if record.get("skipped") else 0
                if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteTraining(
                        f"step {step}: {MAX_CONSECUTIVE_SKIPS} consecutive steps were non-finite and "
                        f"skipped (last: {record['nonfinite']}); the weights are damaged, resume from "
                        "an earlier checkpoint with a lower --lr")
                if record.get("skipped"):
                    bar.set_postfix(skipped=step)
                elif step % cfg.log_every == 0:
                    for key in ("loss", "lm_loss", "aux_loss", "lr", "maxvio_batch", "cv", "tokens_per_second"):
                        writer.add_scalar(f"train/{key}", record[key], step)
                    for key in ("device_load_max_over_mean", "ranks_per_token", "cross_rank_fraction",
                                "all_to_all_bytes"):  # expert-parallel runs only
                        if key in record:
                            writer.add_scalar(f"parallel/{key}", record[key], step)
                if not record.get("skipped"):
                    bar.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{record['maxvio_batch']:.2f}")
                if _checkpoint_due(cfg, step):
                    state = _training_state(model, optimizer, scheduler, step, parallel)
                    state["wall_seconds"] = wall_before + time.perf_counter() - started
                    save_checkpoint(out_dir, step, state)
                if on_step is not None:
                    on_step(step, record)
    except KeyboardInterrupt:
        raise TrainingInterrupted(done, out_dir) from None
    finally:
        if routing is not None:
            routing.remove()
    wall_seconds = wall_before + time.perf_counter() - started

    full = _full_model(model, parallel)
    result = None
    if main:
        result = evaluate(full, corpus, cfg)
        for key in ("val_loss", "val_ppl", "maxvio_global"):
            writer.add_scalar(f"eval/{key}", result[key], cfg.steps)
        writer.close()
        result.update(wall_seconds=wall_seconds, train_tokens=tokens_per_step * cfg.steps,
                      params=params)
        atomic_write(out_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        _save_weights(full, out_dir / "model.safetensors")
    return result if parallel is None else par.broadcast_from_first(result, parallel)


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps


class DistributedFailure(RuntimeError):
    """A parallel run's step failed on this rank: mostly a collective that lost another rank
    (it died, or hung past the process group's timeout); the message names step and rank."""


class _RankStats:
    """Expert-parallel routing metrics gathered by forward hooks on the MoE layers during
    training forwards: ranks per token (device-limited routing's count), the fraction of FFN
    assignments that leave their token's rank, and bytes sent by the all-to-alls."""

    def __init__(self, model: MoETransformer, parallel: par.ParallelGroups):
        self.parallel = parallel
        self.ranks_E = par.expert_ranks(model.config.moe.num_experts, parallel.ep_size)
        self.totals = torch.zeros(5, dtype=torch.float64)  # ranks, tokens, crossing, FFN assignments, bytes
        self.hooks = [layer.register_forward_hook(self._record) for layer in model.moe_layers]

    def _record(self, layer, args, out) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        selected_TK = out.decision.selected.detach().cpu()
        if out.decision.token_mask is not None:
            selected_TK = selected_TK[out.decision.token_mask.cpu()]
        crossing, assignments = par.crossing_assignments(selected_TK, self.ranks_E, self.parallel.ep_rank)
        self.totals += torch.tensor([float(par.ranks_per_token(selected_TK, self.ranks_E).sum()),
                                     selected_TK.shape[0], crossing, assignments,
                                     2.0 * layer.experts.last_sent_bytes])  # 2: the backward sends as much

    def collect(self) -> dict:
        """This step's metrics over every rank (collective), then reset."""
        totals = self.totals.clone()
        dist.all_reduce(totals, group=self.parallel.data)
        self.totals.zero_()
        ranks, tokens, crossing, assignments, sent = totals.tolist()
        return {"ranks_per_token": ranks / max(tokens, 1), "cross_rank_fraction": crossing / max(assignments, 1),
                "all_to_all_bytes": sent}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _train_step(model, optimizer, scheduler, sampler, cfg: TrainConfig, step: int,
                parallel: par.ParallelGroups | None = None, routing: _RankStats | None = None) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches, then the balancer update.

    In a parallel run each rank trains on its share of every micro-batch; gradients, losses
    and loads are then those of the whole global batch (``parallel.sync_gradients``), and the
    record's ``maxvio_batch`` is over the computation batch (paper section 5.1).

    A NaN or inf loss, gradient norm or router logit stops training (``cfg.nonfinite="stop"``)
    or skips the step (``"skip"``): gradients and the balancers' pending counts are discarded,
    the optimizer and the biases are untouched, the learning-rate schedule still advances (the
    rate at step s stays the schedule's value at s), and the record says ``"skipped": true``.
    """
    loads_LE = kinds_L4 = None
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
    lr = optimizer.param_groups[0]["lr"]
    problem = None
    try:
        for micro in range(cfg.grad_accum):
            tokens_BS1, _ = sampler.batch((step - 1) * cfg.grad_accum + micro)
            if parallel is not None:  # this rank's equal share of the global batch
                tokens_BS1 = tokens_BS1.chunk(parallel.data_size)[parallel.data_rank]
            with _autocast(cfg):
                out = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:])
            (out.loss / cfg.grad_accum).backward()
            for key in sums:
                sums[key] += getattr(out, key).item() / cfg.grad_accum
            loads = torch.stack(out.layer_loads)
            loads_LE = loads if loads_LE is None else loads_LE + loads
            kinds = torch.stack(out.layer_kind_loads)
            kinds_L4 = kinds if kinds_L4 is None else kinds_L4 + kinds
    except FloatingPointError as err:  # the router's check_finite, with the layer it happened in
        problem = str(err)
        grad_norm = float("nan")
    else:
        if parallel is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            par.sync_gradients(model, parallel)
            grad_norm = float(par.clip_grad_norm(model, cfg.grad_clip, parallel))
            means = par.sum_over_ranks(torch.tensor(list(sums.values()), dtype=torch.float64), parallel)
            sums = dict(zip(sums, (means / parallel.data_size).tolist()))
            loads_LE, kinds_L4 = par.sum_over_ranks(loads_LE, parallel), par.sum_over_ranks(kinds_L4, parallel)
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            problem = f"loss {sums['loss']}, gradient norm {grad_norm}"
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        discard_pending_counts(model)
        if cfg.nonfinite == "stop":
            raise NonFiniteTraining(f"step {step}: {problem}; lower --lr, or pass --nonfinite skip "
                                    "to skip such steps")
        scheduler.step()
        return {"step": step, "skipped": True, "nonfinite": problem, "lr": lr, "loss": None,
                "lm_loss": None, "aux_loss": None, "maxvio_batch": None}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    update_balancers(model)  # after the step: the bias only ever sees past loads

    vio_L = max_vio(loads_LE)
    tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len  # training windows have no padding
    record = {"step": step, **sums, "lr": lr, "grad_norm": grad_norm,
              "experts_per_token": float(kinds_L4.sum()) / (kinds_L4.shape[0] * tokens),
              **kind_metrics(kinds_L4, model.config.moe, tokens),
              **({"maxvio_compute": compute_metrics(loads_LE, kinds_L4, model.config.moe, tokens)["maxvio_compute"]}
                 if model.config.moe.expert_hidden_sizes is not None else {}),
              "maxvio_batch": float(vio_L.mean()), "maxvio_batch_layers": vio_L.tolist(),
              "cv": float(coefficient_of_variation(loads_LE).mean()),
              "dead_experts": int(dead_experts(loads_LE).sum())}
    if routing is not None:
        record.update(**routing.collect(), **par.device_loads(loads_LE, parallel.ep_size))
    biases = _loss_free_biases(model)
    if biases is not None:
        record["bias"] = biases
        record["bias_min"] = min(min(b) for b in biases)
        record["bias_max"] = max(max(b) for b in biases)
    return record


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """Final weights and buffers (the Loss-Free bias included) as safetensors."""
    save_model = require("safetensors.torch", "saving weights").save_model

    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {"type": type(obj).__name__, **{f.name: _jsonable(getattr(obj, f.name))
                                               for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def machine_info() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def compare(methods: list[str], seeds: list[int], base: TrainConfig, out_dir: str | Path, *,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            command: str | None = None, parallel: par.ParallelGroups | None = None) -> list[dict]:
    """Train every (method, seed) on the same data and init; write results and the report.

    Each run lives in ``out_dir/<method>_s<seed>`` under ``train``'s rules: ``resume`` continues
    (or only re-evaluates) existing runs, ``overwrite`` replaces them, neither refuses them.
    parallel: every run is a parallel run (``train``); rank 0 writes the report, the other
    ranks return an empty list.
    """
    for m in methods:
        get_method(m)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    main = parallel is None or parallel.data_rank == 0
    corpus = _prepare(base, progress, parallel)
    results, runs = [], {}
    for method in methods:
        for seed in seeds:
            cfg = dataclasses.replace(base, method=method, seed=seed)
            run_dir = out_dir / f"{method}_s{seed}"
            ev = train(cfg, run_dir, resume=resume, overwrite=overwrite, corpus=corpus, progress=progress,
                       parallel=parallel)
            if not main:
                continue
            results.append(summarize_run(run_dir, method=method, seed=seed, wall_seconds=ev["wall_seconds"],
                                         train_tokens=ev["train_tokens"]))
            runs.setdefault(method, []).append(run_dir)
    if not main:
        return []
    meta = {"command": command, "machine": machine_info(), "config": dataclasses.asdict(base),
            "parallel": None if parallel is None else {"processes": parallel.data_size,
                                                       "expert_parallel": parallel.ep_size},
            "methods": {m: get_method(m).description for m in methods}, "seeds": seeds,
            "corpus": {"spec": base.data or "stdlib", "vocab_size": corpus.vocab_size,
                       "train_tokens": int(len(corpus.train.tokens)), "val_tokens": int(len(corpus.val.tokens)),
                       "domains": corpus.domains},
            "wall_seconds_total": time.perf_counter() - started}
    write_report(out_dir, results, runs, meta=meta)
    if progress:
        print(format_table(results))
    return results
