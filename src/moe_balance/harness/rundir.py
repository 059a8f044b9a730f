"""Run directories: claiming one (lock, empty or resume or overwrite), refusing to resume a
different configuration, and trimming metrics.jsonl to the step a resumed run restarts from."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ._files import LOCK_NAME, RunDirectoryError, exclusive_lock, remove_if_unused
from .checkpoint import atomic_write, remove_orphan_temporaries
from .train_config import TrainConfig


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
# can be resumed with --nonfinite skip; fsdp: checkpoints hold the single-process layout;
# checkpoint_format: resume reads the newest checkpoint of either kind; device: checkpoints are
# read onto the CPU and moved, so a GPU run continues on the CPU and back)
_RESUME_FREE_FIELDS = {"checkpoint_every", "log_every", "cache_dir", "eval_every", "nonfinite", "fsdp",
                       "checkpoint_format", "device"}


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


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {"type": type(obj).__name__, **{f.name: _jsonable(getattr(obj, f.name))
                                               for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _write_run_config(out_dir: Path, cfg: TrainConfig, model, params: dict, vocab_size: int,
                      parallel) -> None:
    """config.json: the training configuration (what ``_check_same_config`` compares on resume),
    the model's, its parameter counts, the vocabulary and the process layout."""
    layout = None if parallel is None else {"processes": parallel.data_size, "expert_parallel": parallel.ep_size}
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(
        {"train": dataclasses.asdict(cfg), "model": _jsonable(model.config),
         "params": params, "vocab_size": vocab_size, "parallel": layout}, indent=2)))
