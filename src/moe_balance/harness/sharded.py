"""Sharded checkpoints in a run directory (``--checkpoint-format dcp``): ``ckpt-<step>.dcp/``,
a ``torch.distributed.checkpoint`` directory that every rank writes its own part of
(``parallel.save_sharded``) and any layout resumes (``parallel.load_sharded``).

Atomic like the single-file checkpoints: the ranks write into ``.ckpt-<step>.dcp.partial/``,
and rank 0 renames it into place only after every rank has finished, so a save killed midway
leaves the previous checkpoint as the newest one. A checkpoint directory without DCP's
``.metadata`` (written last) is never used.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from .. import parallel as par
from .state import _rng_states, _set_rng_states

_NAME = re.compile(r"^ckpt-(\d{8})\.dcp$")


def sharded_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.dcp"


def list_sharded(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete sharded checkpoints in ``out_dir`` as (step, path), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in out_dir.iterdir()
                  if (m := _NAME.match(p.name)) and (p / ".metadata").is_file())


def _sync(parallel: par.ParallelGroups | None) -> None:
    if parallel is not None:
        par.broadcast_from_first(None, parallel)


def save_sharded_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler,
                            parallel: par.ParallelGroups | None, wall_seconds: float, keep: int = 2) -> Path:
    """Every rank writes its part of step ``step``'s checkpoint; rank 0 then renames it into
    place and keeps the newest ``keep``. Collective."""
    main = parallel is None or parallel.data_rank == 0
    final, partial = sharded_path(out_dir, step), Path(out_dir) / f".ckpt-{step:08d}.dcp.partial"
    if main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed save
    _sync(parallel)
    extra = {"step": step, "scheduler": scheduler.state_dict(), **_rng_extra(_rng_states()), "wall_seconds": wall_seconds}
    par.save_sharded(partial, model, optimizer, parallel, extra=extra)
    _sync(parallel)  # every rank's files are on disk
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for _, old in list_sharded(out_dir)[:-keep]:
            shutil.rmtree(old)
    _sync(parallel)
    return final


def newest_sharded(out_dir: Path, parallel: par.ParallelGroups | None) -> tuple[int, Path] | None:
    """The newest complete sharded checkpoint, as rank 0 sees it, on every rank. Collective."""
    found = None
    if parallel is None or parallel.data_rank == 0:
        complete = list_sharded(out_dir)
        found = complete[-1] if complete else None
    return found if parallel is None else par.broadcast_from_first(found, parallel)


def _rng_extra(states: dict) -> dict:
    """RNG states as DCP extra entries: the GPU's as bytes (b"" for none), so that a checkpoint
    of a CPU run and one of a GPU run have the same entries and load into either."""
    cuda = states.get("cuda_rng")
    return {"torch_rng": states["torch_rng"], "cuda_rng": b"" if cuda is None else cuda.cpu().numpy().tobytes()}


def _rng_from_extra(extra: dict) -> dict:
    states = {"torch_rng": extra["torch_rng"]}
    if extra.get("cuda_rng"):
        states["cuda_rng"] = torch.frombuffer(bytearray(extra["cuda_rng"]), dtype=torch.uint8)
    return states


def load_sharded_checkpoint(path: Path, model, optimizer, scheduler, parallel: par.ParallelGroups | None,
                            rng_out: dict | None = None) -> dict:
    """Load a sharded checkpoint written by any layout; returns its step and wall seconds.
    rng_out: filled with the checkpoint's RNG entries (``_rng_extra``'s form)."""
    extra = {"step": 0, "scheduler": scheduler.state_dict(), **_rng_extra(_rng_states()), "wall_seconds": 0.0}
    extra = par.load_sharded(path, model, optimizer, parallel, extra=extra)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_states(_rng_from_extra(extra))
    if rng_out is not None:
        rng_out.update(torch_rng=extra["torch_rng"], cuda_rng=extra["cuda_rng"])
    return {"step": int(extra["step"]), "wall_seconds": float(extra["wall_seconds"])}


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A run's checkpoint in the other format: a sharded ``ckpt-<step>.dcp`` directory becomes a
    single file (``ckpt-<step>.pt``'s format), a single file a sharded directory. The run's
    ``config.json`` (beside ``src``) says what model and optimizer to build. One process; the
    content is the same training state, so the round trip is exact."""
    import dataclasses
    import json

    from .checkpoint import _encode, atomic_write, load_checkpoint
    from .state import _load_training_state, _training_state
    from .train_config import TrainConfig, build_model, build_optimizer

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ValueError(f"convert-checkpoint: {dst} exists; choose a new name")
    config_path = src.parent / "config.json"
    if not config_path.is_file():
        raise ValueError(f"convert-checkpoint: {src} is not in a run directory (no {config_path})")
    run = json.loads(config_path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in run["train"].items() if k in names})
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the checkpoint's RNG state wins
        model = build_model(cfg, run["vocab_size"])
    optimizer, scheduler = build_optimizer(model, cfg)
    if src.is_dir():
        if not (src / ".metadata").is_file():
            raise ValueError(f"convert-checkpoint: {src} is not a complete sharded checkpoint (no .metadata)")
        rng = {"torch_rng": torch.get_rng_state(), "cuda_rng": b""}
        resumed = load_sharded_checkpoint(src, model, optimizer, scheduler, None, rng_out=rng)
        state = _training_state(model, optimizer, scheduler, resumed["step"], None)
        state.update(_rng_from_extra(rng))  # the checkpoint's, the GPU's included
        state["wall_seconds"] = resumed["wall_seconds"]
        atomic_write(dst, lambda tmp: tmp.write_bytes(_encode(state)))
        return dst
    state = load_checkpoint(src)
    _load_training_state(model, optimizer, scheduler, state, None)
    partial = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    extra = {"step": state["step"], "scheduler": scheduler.state_dict(), **_rng_extra(state),
             "wall_seconds": state.get("wall_seconds", 0.0)}
    par.save_sharded(partial, model, optimizer, None, extra=extra)
    os.replace(partial, dst)
    return dst
