"""Several methods x seeds on the same data and initial weights, then the report."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .. import parallel as par
from .methods import get_method
from .report import format_table, summarize_run, write_report
from .state import _prepare
from .train_config import TrainConfig


def compare(methods: list[str], seeds: list[int], base: TrainConfig, out_dir: str | Path, *,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            command: str | None = None, parallel: par.ParallelGroups | None = None) -> list[dict]:
    """Train every (method, seed) on the same data and init; write results and the report.

    Each run lives in ``out_dir/<method>_s<seed>`` under ``train``'s rules: ``resume`` continues
    (or only re-evaluates) existing runs, ``overwrite`` replaces them, neither refuses them.
    parallel: every run is a parallel run (``train``); rank 0 writes the report, the other
    ranks return an empty list.
    """
    from .train import train  # here, not at the top: train.py re-exports compare

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


def machine_info() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
