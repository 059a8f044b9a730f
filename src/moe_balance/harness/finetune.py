"""``moe-balance finetune``: continue training a local transformers MoE checkpoint with
Loss-Free Balancing, and report the expert balance before and after.

The model is loaded with ``AutoModelForCausalLM.from_pretrained`` (float32, CPU), its routers
get a Loss-Free bias (``integrations.transformers.enable_loss_free``), and a plain PyTorch loop
trains it on ``--data`` (the same corpus specs as ``train``). The text is tokenized with the
checkpoint's own ``tokenizer.json`` when it has one, else with a byte-level BPE trained to the
model's vocabulary size (for randomly initialised checkpoints). MaxVio and the loss are
measured on fixed validation windows before the first step and after the last.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._files import RunDirectoryError, atomic_write
from .._optional import require
from ..balancing import update_balancers
from .data import prepare_corpus
from ..metrics import max_vio
from .sampling import BatchSampler, eval_windows


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    data: str | None = None
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-4
    update_rate: float = 1e-3
    rule: str = "adaptive"
    eval_tokens: int = 32768
    seed: int = 0
    cache_dir: str = ".cache/moe_balance"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"finetune {name}={value!r} must be an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"finetune lr={self.lr!r} must be a finite number > 0")


@torch.no_grad()
def _measure(model, windows) -> dict:
    from ..integrations.transformers import record_loads

    model.eval()
    loss_sum = count = 0
    with record_loads(model) as loads:
        for tokens_BS1, _ in windows:
            x = tokens_BS1[:, :-1]
            loss_sum += float(model(input_ids=x, labels=x).loss) * x.numel()
            count += x.numel()
    vio_L = max_vio(torch.stack(loads))
    return {"val_loss": loss_sum / count, "maxvio_global": float(vio_L.mean()),
            "maxvio_global_layers": vio_L.tolist(), "expert_load": torch.stack(loads).tolist()}


def finetune(model_dir: str | Path, cfg: FinetuneConfig, out: str | Path | None = None, *,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune ``model_dir`` with Loss-Free Balancing; returns (and with ``out`` saves, next
    to the fine-tuned checkpoint, as ``finetune.json``) the metrics before and after."""
    transformers = require("transformers", "moe-balance finetune")
    from ..integrations.transformers import enable_loss_free

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a transformers checkpoint directory (no config.json)")
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RunDirectoryError(f"output directory {out} is not empty; pass --overwrite to replace it")
    torch.manual_seed(cfg.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    tokenizer_file = model_dir / "tokenizer.json"
    corpus = prepare_corpus(cfg.data, vocab_size=vocab, cache_dir=Path(cfg.cache_dir), progress=progress,
                            tokenizer_file=tokenizer_file if tokenizer_file.is_file() else None)
    if corpus.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {corpus.vocab_size} tokens, more than the model's {vocab}")
    enable_loss_free(model, cfg.update_rate, rule=cfg.rule)
    windows = eval_windows(corpus.val, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens, batch_size=cfg.batch_size)
    before = _measure(model, windows)

    sampler = BatchSampler(corpus.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    tqdm = require("tqdm", "progress bars").tqdm
    started = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc="finetune", disable=not progress):
        x = sampler.batch(step)[0][:, :-1]  # transformers shifts the labels itself
        loss = model(input_ids=x, labels=x).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"finetune step {step + 1}: loss {loss.item()}; lower --lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_balancers(model)  # after the step: the bias only ever sees past loads
    after = _measure(model, windows)
    result = {"model": str(model_dir), "config": asdict(cfg), "before": before, "after": after,
              "train_seconds": time.perf_counter() - started}
    if out is not None:
        model.save_pretrained(out)  # the biases under <router>.e_score_correction_bias
        atomic_write(out / "finetune.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return result


def format_finetune(result: dict) -> str:
    b, a = result["before"], result["after"]
    rows = [("", "before", "after"),
            ("val loss", f"{b['val_loss']:.4f}", f"{a['val_loss']:.4f}"),
            ("MaxVio_global", f"{b['maxvio_global']:.3f}", f"{a['maxvio_global']:.3f}")]
    for i, (vb, va) in enumerate(zip(b["maxvio_global_layers"], a["maxvio_global_layers"])):
        rows.append((f"  MoE layer {i}", f"{vb:.3f}", f"{va:.3f}"))
    return "\n".join(f"{r[0]:<16}{r[1]:>10}{r[2]:>10}" for r in rows)
