"""Checkpoints that lose nothing: atomic writes and the newest complete checkpoint.

A checkpoint is one ``torch.save`` file ``ckpt-<step>.pt`` holding whatever state dict the
trainer gives (model, optimizer, scheduler, balancer buffers, step, RNG states). It is written
to a temporary name and renamed into place, so a run killed mid-write leaves either the old
set of checkpoints or the new one, never a truncated file that looks complete.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ._files import atomic_write

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    path = atomic_write(checkpoint_path(out_dir, step), lambda tmp: torch.save(state, tmp))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` onto the CPU (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
