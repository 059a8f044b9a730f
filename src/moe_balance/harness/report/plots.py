"""Every matplotlib figure of the report, written as PNG files into the report's plots/ folder.

MaxVio_batch over training (paper Fig. 3), perplexity against MaxVio_global (Figs. 1-2), the
validation expert load per layer, the loss-free biases over training and the load by data
domain. matplotlib is imported lazily inside the helpers, so the summaries and tables work
without the `train` extra; figures use the Agg canvas directly, never pyplot's global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .._files import atomic_write
from .summary import _read_eval, _series, read_metrics
from .tables import LEAK_MARK


def _figure(nrows: int, ncols: int, panel: tuple[float, float]):
    """A pyplot-free Agg figure with a squeezed-off grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: no display, no global pyplot state
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path) -> Path:
    """Atomically save a figure as PNG."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _grouped_axes(group_sizes: list[int], panel: tuple[float, float], max_cols: int = 4):
    """A figure where each group of panels starts on a new row, wrapping at max_cols."""
    ncols = min(max_cols, max(group_sizes))
    group_rows = [math.ceil(n / ncols) for n in group_sizes]
    fig, axes = _figure(sum(group_rows), ncols, panel)
    groups, row = [], 0
    for n, nrows in zip(group_sizes, group_rows):
        cells = [axes[row + i // ncols][i % ncols] for i in range(nrows * ncols)]
        for ax in cells[n:]:
            ax.set_visible(False)
        groups.append(cells[:n])
        row += nrows
    return fig, groups


def _colors(methods) -> dict[str, str]:
    """A stable colour per method, in order of appearance."""
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(methods))}


def _first_runs(runs: dict) -> dict[str, Path]:
    """The first seed's run directory for each method that has one."""
    return {m: Path(dirs[0]) for m, dirs in runs.items() if dirs}


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centred moving average over ~2% of the points, renormalised at the edges."""
    w = max(1, len(y) // 50)
    kernel = np.ones(w)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones_like(y), kernel, mode="same")


def _plain_log_ticks(axis) -> None:
    """Label a log axis with plain numbers at 1-2-5 steps (default 3x10^-1 labels collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _maybe_log(ax, which: str, values) -> None:
    """Put ax's `which` ("x"/"y") axis on a log scale if values are positive and span > 1 decade."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
        getattr(ax, f"set_{which}scale")("log")
        _plain_log_ticks(ax.xaxis if which == "x" else ax.yaxis)


def _expert_axis(ax) -> None:
    """Integer expert indices on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert", fontsize="small")


def _mean_over_seeds(run_dirs) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean MaxVio_batch over seeds), on the union of logged steps."""
    per_seed = [dict(zip(*_series(read_metrics(d), "maxvio_batch"))) for d in run_dirs]
    steps = np.array(sorted(set().union(*per_seed)))
    if not len(steps):
        return steps, steps
    table = np.array([[s.get(x, np.nan) for x in steps] for s in per_seed])
    return steps, np.nanmean(table, axis=0)


def plot_maxvio_batch(runs: dict[str, list[Path]], path) -> Path | None:
    """Paper Fig. 3: MaxVio_batch vs training step, one line per method (mean over seeds)."""
    curves = {m: _mean_over_seeds(dirs) for m, dirs in runs.items() if dirs}
    curves = {m: c for m, c in curves.items() if len(c[0])}
    if not curves:
        return None
    colors = _colors(curves)
    fig, axes = _figure(1, 1, (8, 4.5))
    ax = axes[0][0]
    for method, (steps, y) in curves.items():
        ax.plot(steps, y, color=colors[method], alpha=0.2, lw=0.8)
        ax.plot(steps, _smooth(y), color=colors[method], lw=1.8, label=method)
    _maybe_log(ax, "y", np.concatenate([y for _, y in curves.values()]))
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over layers)")
    ax.set_title("Per-batch load violation during training (lower is better)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_ppl_vs_maxvio(results: list[dict], path) -> Path | None:
    """Paper Figs 1-2: validation PPL vs MaxVio_global, one marker per run."""
    rows = [r for r in results if r.get("val_ppl") is not None and r.get("maxvio_global") is not None]
    if not rows:
        return None
    colors = _colors(r["method"] for r in rows)
    fig, axes = _figure(1, 1, (7, 5))
    ax = axes[0][0]
    for method, color in colors.items():
        mine = [r for r in rows if r["method"] == method]
        leaks = any(r.get("leaks_future") for r in mine)  # its perplexity is not comparable
        ax.scatter([r["maxvio_global"] for r in mine], [r["val_ppl"] for r in mine],
                   color=color, s=60, edgecolor="black", lw=0.5, zorder=3, marker="X" if leaks else "o",
                   label=f"{method} {LEAK_MARK} (reads future tokens)" if leaks else method)
    _maybe_log(ax, "x", [r["maxvio_global"] for r in rows])
    ax.set_xlabel("MaxVio_global on validation set (lower = more balanced)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("Perplexity vs load balance (lower-left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _normalised_load(load) -> np.ndarray:
    """[layer x expert] load divided by each layer's mean load (1.0 = balanced)."""
    load = np.asarray(load, dtype=float)
    mean = load.mean(axis=1, keepdims=True)
    return np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)


def _heatmap_panel(ax, method: str, norm_load: np.ndarray, ev: dict, norm):
    """One method's [layer x expert] load on `ax`, titled with its MaxVio_global; returns the image."""
    image = ax.imshow(np.clip(norm_load, norm.vmin, None), cmap="RdBu_r", norm=norm,
                      aspect="auto", interpolation="nearest")
    maxvio = ev.get("maxvio_global")
    if maxvio is None:  # fall back to the definition when eval.json lacks the summary
        maxvio = float((norm_load.max(axis=1) - 1.0).mean())
    ax.set_title(f"{method}\nMaxVio_global = {maxvio:.3f}", fontsize="medium")
    _expert_axis(ax)
    ax.set_ylabel("layer")
    return image


def plot_load_heatmaps(runs: dict[str, list[Path]], path) -> Path | None:
    """Validation expert load per method (first seed) as [layer x expert] heatmaps."""
    evals = {m: _read_eval(d) for m, d in _first_runs(runs).items()}
    loads = {m: _normalised_load(ev["expert_load"]) for m, ev in evals.items() if ev.get("expert_load")}
    if not loads:
        return None
    from matplotlib.colors import LogNorm

    # Diverging map on a log scale symmetric around 1.0, so x2 and x0.5 look equally far off:
    # blue = under-loaded, white = balanced, red = overloaded. Dead experts clip to darkest blue.
    top = max(2.0, max(a.max() for a in loads.values()))
    norm = LogNorm(vmin=1.0 / top, vmax=top)
    ncols = math.ceil(math.sqrt(len(loads)))
    fig, axes = _figure(math.ceil(len(loads) / ncols), ncols, (4.5, 3.2))
    flat = [ax for row in axes for ax in row]
    for ax, (method, norm_load) in zip(flat, loads.items()):
        image = _heatmap_panel(ax, method, norm_load, evals[method], norm)
    for ax in flat[len(loads):]:
        ax.set_visible(False)
    bar = fig.colorbar(image, ax=flat[:len(loads)], label="load / mean load (log scale, 1 = balanced)")
    _plain_log_ticks(bar.ax.yaxis)
    fig.suptitle("Validation expert load per layer (first seed)")
    return _save(fig, path)


def _bias_history(run_dir) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, biases[step, layer, expert]) from a run's metrics, or None if never logged."""
    records = [r for r in read_metrics(run_dir) if r.get("bias") and "step" in r]
    if not records:
        return None
    records.sort(key=lambda r: r["step"])
    return np.array([r["step"] for r in records]), np.array([r["bias"] for r in records], dtype=float)


def plot_biases(runs: dict[str, list[Path]], path) -> Path | None:
    """Loss-free expert biases over training: one panel per (method, layer), one line per expert."""
    histories = {m: _bias_history(d) for m, d in _first_runs(runs).items()}
    histories = {m: h for m, h in histories.items() if h is not None}
    if not histories:
        return None
    fig, groups = _grouped_axes([h[1].shape[1] for h in histories.values()], panel=(3.6, 2.6))
    for (method, (steps, bias)), axes in zip(histories.items(), groups):
        for layer, ax in enumerate(axes):
            ax.plot(steps, bias[:, layer, :], lw=0.6, alpha=0.8)
            ax.set_title(f"{method}: layer {layer}", fontsize="small")
            ax.set_xlabel("step", fontsize="small")
            ax.set_ylabel("bias", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.grid(True, alpha=0.3)
    fig.suptitle("Loss-free routing biases over training (one line per expert)")
    return _save(fig, path)


def _domain_fractions(domain_load: dict) -> np.ndarray:
    """[layer, domain, expert] share of each domain's routed tokens that each expert receives."""
    counts = np.array(list(domain_load.values()), dtype=float).transpose(1, 0, 2)
    totals = counts.sum(axis=2, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _domain_data(runs: dict[str, list[Path]]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per method (first seed) with >= 2 domains in eval.json: (domain names, _domain_fractions)."""
    data = {}
    for method, run_dir in _first_runs(runs).items():
        domain_load = _read_eval(run_dir).get("domain_load") or {}
        if len(domain_load) >= 2:
            data[method] = (list(domain_load), _domain_fractions(domain_load))
    return data


def plot_domain_load(runs: dict[str, list[Path]], path) -> Path | None:
    """Per method and layer, each domain's token distribution over experts (specialisation)."""
    data = _domain_data(runs)
    if not data:
        return None
    vmax = max(f.max() for _, f in data.values())
    cols = 8  # one row per method for models with up to 8 MoE layers
    fig, groups = _grouped_axes([f.shape[0] for _, f in data.values()], panel=(2.6, 1.8), max_cols=cols)
    for (method, (domains, fractions)), axes in zip(data.items(), groups):
        for layer, ax in enumerate(axes):
            image = ax.imshow(fractions[layer], cmap="viridis", vmin=0.0, vmax=vmax,
                              aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(domains)), domains if layer % cols == 0 else [], fontsize="x-small")
            ax.set_title(f"{method}: layer {layer}", fontsize="small")
            _expert_axis(ax)
            ax.tick_params(axis="x", labelsize="x-small")
    fig.colorbar(image, ax=[ax for axes in groups for ax in axes], label="share of domain's tokens")
    fig.suptitle("Expert load by data domain (validation set, first seed)")
    return _save(fig, path)


def write_plots(plot_dir: Path, results: list[dict], runs: dict[str, list[Path]]) -> dict[str, Path]:
    """Draw every figure into plot_dir/NAME.png; return {name: path} of those drawn, in order.

    A figure without data is not drawn, and its file from an earlier report is removed.
    """
    makers = {
        "maxvio_batch": lambda p: plot_maxvio_batch(runs, p),
        "ppl_vs_maxvio": lambda p: plot_ppl_vs_maxvio(results, p),
        "load_heatmaps": lambda p: plot_load_heatmaps(runs, p),
        "biases": lambda p: plot_biases(runs, p),
        "domain_load": lambda p: plot_domain_load(runs, p),
    }
    plots = {}
    for name, make in makers.items():
        path = make(plot_dir / f"{name}.png")
        if path is None:  # drop a stale plot from an earlier report in the same out_dir
            (plot_dir / f"{name}.png").unlink(missing_ok=True)
        else:
            plots[name] = path
    return plots
