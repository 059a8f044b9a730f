"""Balance over growing computation batches (Wang et al. 2024, arXiv 2408.15664, sec. 5.1).

The paper measures MaxVio over the *computation batch* (micro-batch x data-parallel size) and
shows it falls as that batch grows. Here each trained run (``RUNS_DIR/<method>_s<seed>``) is
rebuilt from ``config.json`` and ``model.safetensors`` and routes its fixed validation windows
(``eval_windows``, as ``evaluate`` routes them); the windows are put in one seeded random
order and cut into batches of N windows (the rest dropped), and MaxVio is the mean over those
batches of ``max_vio`` of the batch's summed loads, averaged over layers. N = all windows is
the run's MaxVio_global.
"""

from __future__ import annotations

import errno
import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..metrics import max_vio
from .data import prepare_corpus
from .sampling import eval_windows
from .train import TrainConfig, build_model


def load_run(run_dir: str | Path):
    """(TrainConfig, model in eval mode with the run's final weights) of a finished run."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(errno.ENOENT, f"no {name} in the run directory (not a finished run?)", str(run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    cfg = TrainConfig(**config["train"])
    model = build_model(cfg, config["vocab_size"])
    load_model(model, str(run_dir / "model.safetensors"))
    return cfg, model.eval()


def window_loads(model, cfg: TrainConfig, corpus) -> torch.Tensor:
    """(W, L, E) int64: each validation window's routed tokens per FFN expert in each MoE layer,
    routed batch by batch and domain by domain as ``evaluate`` routes them."""
    layers, E = model.moe_layers, model.config.moe.num_experts
    batches = eval_windows(corpus.val, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                           batch_size=cfg.eval_batch_size)
    loads = torch.zeros(sum(len(b[0]) for b in batches), len(layers), E, dtype=torch.int64)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: captured.append(out.decision.selected))
             for layer in layers]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    first = 0
    try:
        with torch.no_grad(), autocast:
            for tokens_BS1, domain_B in batches:
                for d in domain_B.unique().tolist():
                    rows = (domain_B == d).nonzero().squeeze(1)
                    captured.clear()
                    model(tokens_BS1[rows, :-1])
                    for i, selected_TK in enumerate(captured):  # (n * seq_len, K) expert ids, -1 empty
                        ids_nA = selected_TK.reshape(len(rows), -1)
                        ffn_nA = (ids_nA >= 0) & (ids_nA < E)  # FFN experts only, like layer_loads
                        flat = (torch.arange(len(rows))[:, None] * E + ids_nA.clamp(0, E - 1))[ffn_nA]
                        loads[first + rows, i] = torch.bincount(flat, minlength=len(rows) * E).view(-1, E)
                first += len(tokens_BS1)
    finally:
        for hook in hooks:
            hook.remove()
    return loads


def default_sizes(num_windows: int) -> list[int]:
    """1, 2, 4, ... up to the largest power of two <= num_windows."""
    return [2 ** i for i in range(int(math.log2(num_windows)) + 1)]


def trend(loads_WLE: torch.Tensor, sizes: list[int], seed: int = 0) -> list[float]:
    """For each N in sizes: mean over the batches of N windows (one seeded random order, the
    last incomplete batch dropped) of MaxVio averaged over layers."""
    W = loads_WLE.shape[0]
    for n in sizes:
        if not (isinstance(n, int) and 1 <= n <= W):
            raise ValueError(f"computation batch size {n!r} must be an integer in [1, {W}] (the run has {W} windows)")
    order = torch.randperm(W, generator=torch.Generator().manual_seed(seed))
    result = []
    for n in sizes:
        batches_BNLE = loads_WLE[order[: W // n * n].view(-1, n)]
        result.append(float(max_vio(batches_BNLE.sum(1)).mean(-1).mean()))
    return result


def find_runs(runs_dir: str | Path, methods: list[str]) -> dict[str, list[tuple[int, Path]]]:
    """{method: [(seed, run directory), ...]} of ``runs_dir/<method>_s<seed>``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"{runs_dir}: not a directory of runs")
    found = {}
    for method in methods:
        runs = sorted((int(p.name.rsplit("_s", 1)[1]), p) for p in runs_dir.glob(f"{method}_s*")
                      if p.is_dir() and p.name.rsplit("_s", 1)[1].isdigit() and p.name.rsplit("_s", 1)[0] == method)
        if not runs:
            there = sorted({p.name.rsplit("_s", 1)[0] for p in runs_dir.glob("*_s*") if p.is_dir()})
            raise ValueError(f"no runs {runs_dir}/{method}_s<seed>; methods there: {', '.join(there) or 'none'}")
        found[method] = runs
    return found


def batch_trend(runs_dir: str | Path, methods: list[str], sizes: list[int] | None = None,
                seed: int = 0) -> dict:
    """MaxVio per computation batch size for every run, and per method mean and sample std
    (ddof=1) over seeds. Every run must have the same number of windows and seq_len."""
    runs, corpora, per_run = find_runs(runs_dir, methods), {}, {}
    for method, seeded in runs.items():
        for run_seed, run_dir in seeded:
            cfg, model = load_run(run_dir)
            if cfg.method != method:
                raise ValueError(f"{run_dir}: config.json says method {cfg.method!r}, the directory {method!r}")
            key = (cfg.data, cfg.vocab_size, cfg.cache_dir, cfg.val_fraction, cfg.max_train_tokens)
            if key not in corpora:
                corpora[key] = prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, cache_dir=Path(cfg.cache_dir),
                                              val_fraction=cfg.val_fraction, max_train_tokens=cfg.max_train_tokens,
                                              progress=False)
            loads = window_loads(model, cfg, corpora[key])
            shape = (loads.shape[0], cfg.seq_len)
            if per_run and shape != next(iter(per_run.values()))["shape"]:
                raise ValueError(f"{run_dir}: {shape[0]} windows of {shape[1]} tokens, unlike the other runs")
            run_sizes = sizes or default_sizes(loads.shape[0])
            per_run[run_dir.name] = {"method": method, "seed": run_seed, "shape": shape,
                                     "maxvio": trend(loads, run_sizes, seed)}
    windows, seq_len = next(iter(per_run.values()))["shape"]
    sizes = sizes or default_sizes(windows)
    summary = {}
    for method in methods:
        table = np.array([r["maxvio"] for r in per_run.values() if r["method"] == method])
        std = table.std(0, ddof=1) if len(table) > 1 else np.zeros(len(sizes))
        summary[method] = {"seeds": [r["seed"] for r in per_run.values() if r["method"] == method],
                           "mean": table.mean(0).tolist(), "std": std.tolist()}
    for r in per_run.values():
        del r["shape"]
    return {"windows": windows, "seq_len": seq_len, "order_seed": seed, "sizes": sizes,
            "tokens": [n * seq_len for n in sizes], "methods": summary, "runs": per_run}


def format_table(result: dict) -> str:
    """Markdown: one row per computation batch size, mean ± std over seeds per method."""
    methods = list(result["methods"])
    lines = ["| windows | tokens | " + " | ".join(f"{m} MaxVio" for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for i, (n, tokens) in enumerate(zip(result["sizes"], result["tokens"])):
        cells = [f"{result['methods'][m]['mean'][i]:.3f} ± {result['methods'][m]['std'][i]:.3f}" for m in methods]
        lines.append(f"| {n} | {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """MaxVio against computation batch tokens (log x), one line per method, a ±1 std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)  # no display, no pyplot state
    ax, x = fig.subplots(), np.array(result["tokens"])
    for i, (method, s) in enumerate(result["methods"].items()):
        mean, std = np.array(s["mean"]), np.array(s["std"])
        ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=f"{method} ({len(s['seeds'])} seeds)")
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"computation batch (tokens; windows of {result['seq_len']})")
    ax.set_ylabel("MaxVio (mean over batches and layers)")
    ax.set_title("Balance over the computation batch (paper sec. 5.1)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png", dpi=110)
    return Path(path)


def write(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """batch_trend.json and batch_trend.png in out_dir (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batch_trend.json").write_text(json.dumps(result, indent=1))
    return out_dir / "batch_trend.json", plot(result, out_dir / "batch_trend.png")
