"""Training harness: one run (``train``), several methods x seeds (``compare``), evaluation.

A run directory holds: config.json, metrics.jsonl (one line per optimizer step), tb/
(TensorBoard events), ckpt-<step>.pt (the newest complete checkpoints), eval.json (final
evaluation) and model.safetensors (final weights and balancer buffers).

Every run with the same seed sees the same initial weights and the same batches, whatever
the method: the sampler is a pure function of (seed, batch index) and the model is built
right after seeding, so methods differ only in how they balance.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .. import parallel as par
from .._optional import require
from ._files import RunDirectoryError
from .checkpoint import atomic_write, latest_valid_checkpoint, save_checkpoint
from .data import TokenizedCorpus
from .evaluation import compute_metrics, evaluate, kind_metrics  # noqa: F401
from .floors import _best_static_bias, batch_balance, shift_floor, static_bias_floor  # noqa: F401
from .rundir import _check_same_config, _claim, _guarded, _truncate_metrics, _write_run_config
from .sampling import BatchSampler
from .state import (
    _full_model,
    _load_training_state,
    _prepare,
    _save_weights,
    _training_state,
)
from .sharded import load_sharded_checkpoint, newest_sharded, save_sharded_checkpoint
from .step import DistributedFailure, NonFiniteTraining, _RankStats, _train_step
from .train_config import (  # noqa: F401
    MAX_CONSECUTIVE_SKIPS,
    TRAIN_PRESETS,
    TrainConfig,
    build_model,
    build_optimizer,
    lr_factor,
    model_config,
    run_device,
    train_config,
)


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: ``step`` optimizer steps were done (the newest checkpoint may be
    older; ``--resume`` continues from it exactly)."""

    def __init__(self, step: int, out_dir: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.out_dir = step, out_dir


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
    if parallel is None and cfg.fsdp:
        raise ValueError("TrainConfig.fsdp shards the model over processes: launch them with torchrun, e.g. "
                         "torchrun --standalone --nproc_per_node=2 -m moe_balance train --fsdp ...")
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
    device, mesh_device = run_device(cfg).type, parallel.mesh.device_type
    if device != mesh_device:
        raise ValueError(f"TrainConfig.device resolves to {device!r} but the process groups were made for "
                         f"{mesh_device!r}: launch them for the run's device (parallel.launch(..., device="
                         f"{device!r}); the command line does)")
    if cfg.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the {world} "
                         "processes: each trains on an equal share of every batch")
    experts = model_config(cfg).moe.num_experts
    if experts % ep:
        raise ValueError(f"the model's {experts} experts cannot be split over --expert-parallel {ep}: "
                         f"choose a divisor of {experts}")


def _train(cfg: TrainConfig, out_dir: Path, *, resume: bool, corpus: TokenizedCorpus | None,
           progress: bool, on_step: Callable[[int, dict], None] | None,
           parallel: par.ParallelGroups | None = None) -> dict:
    main = parallel is None or parallel.data_rank == 0  # the rank that owns out_dir
    if main:
        require("tensorboard", "TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

    tqdm = require("tqdm", "progress bars").tqdm
    device = run_device(cfg)
    if corpus is None:
        corpus = _prepare(cfg, progress, parallel)
    model = build_model(cfg, corpus.vocab_size, device)
    params = model.param_counts()  # of the full model: counted before any sharding
    if parallel is not None:  # every rank built the same full model: each keeps its experts
        par.parallelize(model, parallel, locality_bonus=cfg.locality_bonus)
        if cfg.fsdp:  # and, of the rest, its shard (the optimizer, built next, holds the shards' state)
            par.fully_shard_model(model, parallel)
    optimizer, scheduler = build_optimizer(model, cfg)
    start_step, wall_before = 0, 0.0
    state = _resume_state(cfg, out_dir, parallel) if resume else None
    sharded = newest_sharded(out_dir, parallel) if resume else None
    if sharded is not None and (state is None or sharded[0] > state["step"]):  # the newer of the two kinds
        if main:
            _check_same_config(out_dir, cfg)
        resumed = load_sharded_checkpoint(sharded[1], model, optimizer, scheduler, parallel)
        start_step, wall_before = resumed["step"], resumed["wall_seconds"]
    elif state is not None:
        _load_training_state(model, optimizer, scheduler, state, parallel)
        start_step, wall_before = state["step"], state.get("wall_seconds", 0.0)
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start_step)  # a fresh start (step 0) keeps no line
        _write_run_config(out_dir, cfg, model, params, corpus.vocab_size, parallel)

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
                record = _step_naming_the_rank(model, optimizer, scheduler, sampler, cfg, step, parallel, routing)
                record["tokens_per_second"] = tokens_per_step / (time.perf_counter() - t0)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    _evaluate_into(record, model, corpus, cfg, parallel)
                if not main:  # rank 0 logs and saves; the others take part in the gathering only
                    done = step
                    if _checkpoint_due(cfg, step):
                        _save_checkpoint(cfg, out_dir, step, model, optimizer, scheduler, parallel, 0.0)
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
                    _log_scalars(writer, record, step)
                if not record.get("skipped"):
                    bar.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{record['maxvio_batch']:.2f}")
                if _checkpoint_due(cfg, step):
                    _save_checkpoint(cfg, out_dir, step, model, optimizer, scheduler, parallel,
                                     wall_before + time.perf_counter() - started)
                if on_step is not None:
                    on_step(step, record)
    except KeyboardInterrupt:
        raise TrainingInterrupted(done, out_dir) from None
    finally:
        if routing is not None:
            routing.remove()
    wall_seconds = wall_before + time.perf_counter() - started
    return _finish(model, corpus, cfg, out_dir, writer, parallel, wall_seconds=wall_seconds,
                   train_tokens=tokens_per_step * cfg.steps, params=params,
                   memory_per_rank=_memory_per_rank(model, optimizer, parallel))


def _memory_per_rank(model, optimizer, parallel: par.ParallelGroups | None) -> list[dict]:
    """Each rank's parameter and optimizer-state bytes and its peak resident memory so far (the
    final evaluation, which gathers the model on rank 0, comes after). Collective."""
    import resource

    mine = {**par.state_bytes(model, optimizer),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    device = next(model.parameters()).device
    if device.type == "cuda":
        mine["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if parallel is None:
        return [mine]
    everyone = [None] * parallel.data_size
    dist.all_gather_object(everyone, mine, group=parallel.data)
    return everyone


def _resume_state(cfg: TrainConfig, out_dir: Path, parallel: par.ParallelGroups | None) -> dict | None:
    """The newest usable checkpoint's state (None: start from step 0), read by the rank that
    owns ``out_dir`` and sent to the others; says which damaged checkpoints were skipped."""
    state = None
    if parallel is None or parallel.data_rank == 0:
        state, checkpoint, skipped = latest_valid_checkpoint(out_dir)
        for reason in skipped:
            print(f"moe-balance: skipping {reason}", file=sys.stderr)
        if skipped:
            print(f"moe-balance: resuming from {checkpoint}" if checkpoint is not None
                  else "moe-balance: no usable checkpoint; starting from step 0", file=sys.stderr)
        if state is not None:
            _check_same_config(out_dir, cfg)
    return state if parallel is None else par.broadcast_from_first(state, parallel)


def _step_naming_the_rank(model, optimizer, scheduler, sampler, cfg: TrainConfig, step: int,
                          parallel: par.ParallelGroups | None, routing: _RankStats | None) -> dict:
    """``_train_step``; in a parallel run a failed collective is re-raised naming step and rank."""
    try:
        return _train_step(model, optimizer, scheduler, sampler, cfg, step, parallel, routing)
    except RuntimeError as err:
        if parallel is None:
            raise
        raise DistributedFailure(
            f"step {step} failed on rank {parallel.data_rank}: {err} (in a distributed run this "
            "usually means another rank died or hung longer than --dist-timeout: read its log)") from err


def _evaluate_into(record: dict, model, corpus: TokenizedCorpus, cfg: TrainConfig,
                   parallel: par.ParallelGroups | None) -> None:
    """A periodic evaluation (``eval_every``): its loss, perplexity and MaxVio_global go into the
    step's record (every rank takes part in gathering the model; rank 0 evaluates)."""
    full = _full_model(model, parallel)
    if parallel is None or parallel.data_rank == 0:
        ev = evaluate(full, corpus, cfg)
        record.update(val_loss=ev["val_loss"], val_ppl=ev["val_ppl"], maxvio_global=ev["maxvio_global"])


def _log_scalars(writer, record: dict, step: int) -> None:
    """The step's TensorBoard scalars (the parallel ones only in expert-parallel runs)."""
    for key in ("loss", "lm_loss", "aux_loss", "lr", "maxvio_batch", "cv", "tokens_per_second"):
        writer.add_scalar(f"train/{key}", record[key], step)
    for key in ("device_load_max_over_mean", "ranks_per_token", "cross_rank_fraction", "all_to_all_bytes"):
        if key in record:
            writer.add_scalar(f"parallel/{key}", record[key], step)


def _finish(model, corpus: TokenizedCorpus, cfg: TrainConfig, out_dir: Path, writer,
            parallel: par.ParallelGroups | None, **totals) -> dict:
    """The final evaluation, eval.json and model.safetensors (rank 0); every rank returns it."""
    full = _full_model(model, parallel)
    result = None
    if parallel is None or parallel.data_rank == 0:
        result = evaluate(full, corpus, cfg)
        for key in ("val_loss", "val_ppl", "maxvio_global"):
            writer.add_scalar(f"eval/{key}", result[key], cfg.steps)
        writer.close()
        result.update(**totals)
        atomic_write(out_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        _save_weights(full, out_dir / "model.safetensors")
    return result if parallel is None else par.broadcast_from_first(result, parallel)


def _save_checkpoint(cfg: TrainConfig, out_dir: Path, step: int, model, optimizer, scheduler,
                     parallel: par.ParallelGroups | None, wall_seconds: float) -> None:
    """Step ``step``'s checkpoint: sharded (every rank writes its part) or one file gathered on
    rank 0, which alone writes it (the others take part in the gathering). Collective."""
    if cfg.checkpoint_format == "dcp":
        save_sharded_checkpoint(out_dir, step, model, optimizer, scheduler, parallel, wall_seconds)
        return
    state = _training_state(model, optimizer, scheduler, step, parallel)
    if parallel is None or parallel.data_rank == 0:
        state["wall_seconds"] = wall_seconds
        save_checkpoint(out_dir, step, state)


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps


# Re-exported last: compare builds on train (its import of train is inside the function).
from .compare import compare  # noqa: E402,F401
