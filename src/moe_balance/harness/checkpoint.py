"""Checkpoints that lose nothing: atomic writes, a checksum, and the newest *valid* checkpoint.

A checkpoint ``ckpt-<step>.pt`` holds whatever state dict the trainer gives (model, optimizer,
scheduler, balancer buffers, step, RNG states). On disk it is a magic line, a one-line JSON
header (format version, payload length, SHA-256 of the payload) and the ``torch.save`` payload.
It is written to a temporary name and renamed into place, so a run killed mid-write never
leaves a partial file under a checkpoint's name; the checksum catches what the rename cannot
(a disk that truncated or corrupted a file later, a foreign file with a checkpoint's name).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import torch

from ._files import atomic_write

FORMAT = 2
MAGIC = b"moe_balance checkpoint\n"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, truncated, foreign or from a newer format."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint files in ``out_dir`` as (step, path), oldest first (not yet verified)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint file by step, or None (see ``latest_valid_checkpoint``)."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _encode(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = {"format": FORMAT, "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def save_checkpoint(out_dir: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    data = _encode(state)
    path = atomic_write(checkpoint_path(out_dir, step), lambda tmp: tmp.write_bytes(data))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Verify and load a checkpoint onto the CPU (tensors and plain data only).

    Raises ``CheckpointError`` naming the file and what is wrong with it. Files written before
    checkpoints had a header (format 1, a bare ``torch.save``) still load, unverified.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from err
    if data.startswith(MAGIC):
        header_line, _, payload = data[len(MAGIC):].partition(b"\n")
        try:
            header = json.loads(header_line)
            fmt, length, digest = header["format"], header["length"], header["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} has a damaged header") from err
        if fmt != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {fmt!r}; this version reads format {FORMAT}")
        if len(payload) != length:
            raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {length} payload bytes)")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(f"checkpoint {path} is damaged (checksum mismatch)")
        source = io.BytesIO(payload)
    else:
        source = io.BytesIO(data)  # format 1: a bare torch.save file
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"checkpoint {path} is not a readable moe_balance checkpoint "
                              f"({type(err).__name__})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} holds no training state")
    return state


def latest_valid_checkpoint(out_dir: str | Path) -> tuple[dict | None, Path | None, list[str]]:
    """The newest checkpoint that verifies and loads: (state, path, reasons the newer ones were
    skipped). (None, None, reasons) when none is usable."""
    skipped = []
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path), path, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, None, skipped


def remove_orphan_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a killed writer (call with the run's lock held)."""
    out_dir = Path(out_dir)
    orphans = [p for p in out_dir.glob(".ckpt-*.tmp")] if out_dir.is_dir() else []
    for p in orphans:
        p.unlink(missing_ok=True)
    partial = [p for p in out_dir.glob(".ckpt-*.dcp.partial")] if out_dir.is_dir() else []
    for p in partial:  # a sharded save that was killed (harness.sharded)
        shutil.rmtree(p, ignore_errors=True)
    return orphans + partial
