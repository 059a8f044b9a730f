"""The configuration of one training run: ``TrainConfig`` and its presets, the learning-rate
schedule, and the model and optimizer a configuration builds."""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..config import is_number
from .methods import get_method
from .model import ModelConfig, MoETransformer, model_preset

DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when available
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
    dtype: str = "float32"             # "bfloat16": autocast for the forward pass
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
    checkpoint_format: str = "torch"   # "torch": one file gathered on rank 0; "dcp": sharded, each rank its part
    fsdp: bool = False                 # under torchrun: FSDP2 shards parameters, gradients and optimizer state
    device: str = "auto"               # "cpu", "cuda" (nccl between processes), "auto": cuda when available

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
        if self.checkpoint_format not in ("torch", "dcp"):
            raise ValueError(f"TrainConfig.checkpoint_format={self.checkpoint_format!r} must be 'torch' or 'dcp'")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"TrainConfig.fsdp={self.fsdp!r} must be True or False")
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
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device={self.device!r} is not allowed; choose one of {DEVICES}")
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


def run_device(cfg: TrainConfig) -> torch.device:
    """The device this process trains on: ``cfg.device``, "auto" meaning CUDA when available;
    on CUDA under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device='cuda' but this machine has no usable CUDA device (torch "
                         f"{torch.__version__}, built for CUDA {torch.version.cuda}): pass --device cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"process LOCAL_RANK={local_rank} has no GPU of its own: this machine has {count}; "
                         f"launch at most {count} processes per node with --device cuda")
    return torch.device("cuda", local_rank)


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device | str | None = None) -> MoETransformer:
    """The run's model, initialised from ``cfg.seed`` (on the default device: the CPU, so the
    same weights whatever the run's device), then moved to ``device`` when given. Off the CPU
    the routers' NaN check is left to the step's loss check: the router's check is a device
    assertion there, which would end the process instead of letting ``nonfinite`` stop or
    skip the step."""
    config = model_config(cfg, vocab_size)
    device = None if device is None else torch.device(device)
    if device is not None and device.type != "cpu":
        moe = config.moe
        config = dataclasses.replace(config, moe=dataclasses.replace(
            moe, router=dataclasses.replace(moe.router, check_finite=False)))
    torch.manual_seed(cfg.seed)
    model = MoETransformer(config)
    return model if device is None else model.to(device)


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


def _autocast(cfg: TrainConfig, device_type: str = "cpu"):
    if cfg.dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()
