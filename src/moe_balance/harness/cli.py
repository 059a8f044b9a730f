"""Command-line interface: ``moe-balance {demo,train,compare,sweep,bench,finetune,batch-trend,methods,params,plan-placement}``.

Every ``TrainConfig`` field is a typed flag (``--steps 500``, ``--lr 2e-3``, ``--data mixed``)
that overrides the chosen ``--preset``; unknown or mistyped values fail with the field's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from .._optional import missing_dependency_message
from .methods import SWEEPS, list_methods
from ..parallel import launch, shutdown
from .report import demo_summary
from .train import (TRAIN_PRESETS, DistributedFailure, NonFiniteTraining, TrainConfig, TrainingInterrupted, build_model, compare,
                    train, train_config)

DEFAULT_METHODS = ("aux_loss", "loss_free", "loss_free_adaptive")
# The demo fits `make demo` in 10 minutes on 2 cores: the baseline and the adaptive controller.
DEMO_METHODS = ("aux_loss", "loss_free_adaptive")
def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_PARSERS = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str, "bool | None": _parse_bool, "bool": _parse_bool}


def _nullable(parse):
    return lambda text: None if text.lower() == "none" else parse(text)


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("training configuration (overrides the preset)")
    group.add_argument("--preset", default="quick", choices=sorted(TRAIN_PRESETS),
                       help="training preset: model size and budget (default: quick)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or f.name == "preset":
            continue
        parse = _PARSERS[str(f.type)]
        if "None" in str(f.type):
            parse = _nullable(parse)
        switch = {"nargs": "?", "const": True} if str(f.type) == "bool" else {}  # --fsdp alone means true
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=parse, default=argparse.SUPPRESS,
                           metavar=str(f.type).split(" ")[0].upper(), **switch,
                           help=f"overrides the preset (TrainConfig default: {f.default!r})")


def _config_from_args(args, skip: tuple[str, ...] = ()) -> TrainConfig:
    given = vars(args)  # flags left out are absent (SUPPRESS), so "none" can override a preset
    overrides = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig)
                 if f.name not in skip and f.name != "preset" and f.name in given}
    return train_config(args.preset, **overrides)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    """Comma-separated distinct integers >= 0."""
    try:
        seeds = [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return seeds


def _sizes(text: str) -> list[int]:
    """Comma-separated distinct integers >= 1, ascending."""
    try:
        sizes = [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"expected distinct ascending integers >= 1, got {text!r}")
    return sizes


def _add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed (launch with torchrun --nproc_per_node=N -m moe_balance ...)")
    group.add_argument("--expert-parallel", type=_positive_int, default=1, metavar="N",
                       help="shard each layer's experts over N processes (default: 1, experts replicated)")
    group.add_argument("--dist-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="fail when another process is lost for this long (default: 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-balance", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="aux loss vs adaptive Loss-Free on the quick preset (make demo)")
    p.add_argument("--out", default="runs/demo")

    p = sub.add_parser("train", help="train one model")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace what is in --out (default: refuse)")
    _add_config_flags(p)
    _add_parallel_flags(p)

    for name, helptext in (("compare", "train several methods x seeds and write a report"),
                           ("sweep", "the paper's ablations (u, alpha, additive vs multiplicative) and "
                                     "the bias controllers")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--resume", action="store_true", help="resume every run from its checkpoints")
        p.add_argument("--overwrite", action="store_true", help="replace existing runs (default: refuse)")
        if name == "compare":
            p.add_argument("--methods", type=_csv, default=list(DEFAULT_METHODS),
                           help=f"comma-separated method names (default: {','.join(DEFAULT_METHODS)})")
        else:
            p.add_argument("--which", choices=sorted(SWEEPS) + ["all"], default="all")
        p.add_argument("--seeds", type=_seeds, default=[0],
                       help="comma-separated seeds (default: 0)")
        _add_config_flags(p, skip=("method", "seed"))
        _add_parallel_flags(p)

    p = sub.add_parser("bench", help="the MoE layer against a dense layer of the same active FLOPs and against "
                                     "transformers' MoE blocks, fp32 and bf16, in one process")
    p.add_argument("--shape", action="append", dest="shapes", metavar="SHAPE",
                   help="A, B, Bs or d_model,expert_hidden,num_experts,top_k[,shared]; repeatable (default: A, B, Bs)")
    p.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"], help="default: float32,bfloat16")
    p.add_argument("--tokens", type=_positive_int, default=4096)
    p.add_argument("--rounds", type=_positive_int, default=5, help="interleaved timed rounds (after a warm-up)")
    p.add_argument("--no-peers", action="store_true", help="leave out transformers' MoE blocks")
    p.add_argument("--no-extras", action="store_true", help="leave out the router overhead and the training step")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: auto, cuda when available)")

    p = sub.add_parser("convert-checkpoint", help="a run's checkpoint in the other format: a sharded "
                                                 "ckpt-<step>.dcp directory to one file, or one file to a sharded directory")
    p.add_argument("src", help="ckpt-<step>.dcp (a directory) or ckpt-<step>.pt, inside its run directory")
    p.add_argument("dst", help="the new checkpoint's path (must not exist)")

    p = sub.add_parser("plan-placement", help="place experts on devices minimising the busiest device's load, "
                                             "from a run's logged per-expert loads")
    p.add_argument("metrics", help="a run directory or its eval.json (per-expert validation loads)")
    p.add_argument("--devices", type=_positive_int, required=True, help="expert-parallel devices")
    p.add_argument("--method", choices=("auto", "exact", "greedy"), default="auto")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for the exact solver per layer")

    p = sub.add_parser("finetune", help="fine-tune a local transformers MoE checkpoint with Loss-Free balancing "
                                        "and report MaxVio before and after")
    p.add_argument("model_dir", help="a save_pretrained directory (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3)")
    p.add_argument("--out", help="write the fine-tuned checkpoint (with its biases) and finetune.json here")
    p.add_argument("--overwrite", action="store_true", help="replace what is in --out (default: refuse)")
    p.add_argument("--data", default=None, help="corpus spec, as for train (default: the Python stdlib source)")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--rule", choices=("sign", "error", "adaptive"), default="adaptive",
                   help="the bias update rule (default: adaptive; sign is the paper's)")
    p.add_argument("--update-rate", type=float, default=1e-3,
                   help="u for the sign and error rules (0: the bias never moves, a baseline)")
    p.add_argument("--eval-tokens", type=_positive_int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache/moe_balance")

    p = sub.add_parser("batch-trend", help="MaxVio of trained runs over growing computation batches of their "
                                           "validation windows (the paper's sec. 5.1)")
    p.add_argument("runs_dir", help="a compare output directory: RUNS_DIR/<method>_s<seed> for each run")
    p.add_argument("--methods", type=_csv, required=True, help="comma-separated method names")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="computation batch sizes in windows, e.g. 1,4,16 (default: 1, 2, 4, ... up to all windows)")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the random order the windows are grouped in")
    p.add_argument("--out", required=True, help="write batch_trend.json and batch_trend.png here")

    sub.add_parser("methods", help="list the registered balancing methods")
    p = sub.add_parser("params", help="parameter counts of a model preset (built on the meta device)")
    p.add_argument("--preset", default="paper-1b", choices=sorted(TRAIN_PRESETS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = "moe-balance " + shlex.join(argv)
    parallel = None
    try:
        if hasattr(args, "expert_parallel"):
            # the preset's device unless --device says otherwise (every preset's is auto)
            parallel = launch(args.expert_parallel, args.dist_timeout, getattr(args, "device", "auto"))
        return _run(args, command_line, parallel)
    except TrainingInterrupted as stop:
        if args.debug:
            raise
        print(f"moe-balance: interrupted at step {stop.step}; continue with --resume "
              f"(run directory {stop.out_dir})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("moe-balance: interrupted", file=sys.stderr)
        return 130
    except NonFiniteTraining as err:
        if args.debug:
            raise
        print(f"moe-balance: error: {err}", file=sys.stderr)
        return 1
    except ImportError as err:  # an optional package that is not installed: name its extra
        message = missing_dependency_message(err)
        if args.debug or message is None:
            raise
        print(f"moe-balance: error: {message}", file=sys.stderr)
        return 1
    except ValueError as err:
        if args.debug:
            raise
        parser.error(str(err))
    except OSError as err:  # a path that is a file, read-only, missing, full disk, ...
        if args.debug:
            raise
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"moe-balance: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except DistributedFailure as err:
        if args.debug:
            raise
        print(f"moe-balance: error: {err}", file=sys.stderr)
        return 1
    finally:
        if parallel is not None:
            shutdown()


def _run(args, command_line: str, parallel) -> int:
    """Carry out one parsed command; in a distributed run only rank 0 prints."""
    main = parallel is None or parallel.data_rank == 0
    if args.command == "methods":
        for m in list_methods():
            print(f"{m.name:<24} {m.description}")
            if m.reference:
                print(f"{'':<24} reference: {m.reference}")
    elif args.command == "bench":
        _bench(args)
    elif args.command == "convert-checkpoint":
        from .sharded import convert_checkpoint

        print(convert_checkpoint(args.src, args.dst))
    elif args.command == "plan-placement":
        _print_placement(args.metrics, args.devices, args.method, args.time_limit)
    elif args.command == "params":
        _print_params(args.preset)
    elif args.command == "batch-trend":
        from . import batch_trend

        result = batch_trend.batch_trend(args.runs_dir, args.methods, args.sizes, args.order_seed)
        json_path, png_path = batch_trend.write({"command": command_line, **result}, args.out)
        print(batch_trend.format_table(result))
        print(f"\n{result['windows']} windows of {result['seq_len']} tokens -> {json_path}, {png_path}")
    elif args.command == "finetune":
        from .finetune import FinetuneConfig, finetune, format_finetune

        cfg = FinetuneConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             lr=args.lr, update_rate=args.update_rate, rule=args.rule, eval_tokens=args.eval_tokens,
                             seed=args.seed, cache_dir=args.cache_dir)
        print(format_finetune(finetune(args.model_dir, cfg, args.out, overwrite=args.overwrite)))
    elif args.command == "train":
        result = train(_config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=main, parallel=parallel)
        if main:
            print(f"val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                  f"maxvio_global {result['maxvio_global']:.3f}  ({result['wall_seconds']:.0f} s) -> {args.out}")
    elif args.command == "demo":
        # resume: a finished demo is only re-evaluated, so a second `make demo` is quick
        results = compare(list(DEMO_METHODS), [0], train_config("quick"), args.out, resume=True,
                          command=command_line)
        print(f"\n{demo_summary(results)}\nreport: {Path(args.out) / 'report.md'}")
    else:
        skip = ("method", "seed")
        methods = args.methods if args.command == "compare" else _sweep_methods(args.which)
        compare(methods, args.seeds, _config_from_args(args, skip), args.out, resume=args.resume,
                overwrite=args.overwrite, command=command_line, progress=main, parallel=parallel)
        if main:
            print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _bench(args) -> None:
    import json

    from . import bench

    shapes = [bench.parse_shape(s) for s in (args.shapes or ["A", "B", "Bs"])]
    device = bench.bench_device(args.device)
    note = (lambda line: print(line, file=sys.stderr)) if not args.json else None
    rows = bench.bench(shapes, args.dtypes, tokens=args.tokens, rounds=args.rounds, peers=not args.no_peers,
                       progress=note, device=device)
    extras = []  # the router's share of the layer and the training step, as rows of the same keys
    if not args.no_extras:
        for s in shapes:
            fraction = bench.router_overhead(s, tokens=args.tokens, rounds=args.rounds, device=device)
            extras.append({"implementation": "router + Loss-Free balancing", "shape": s.name, "dtype": "float32",
                           "median_ms": None, "ratio_to_dense": None, "fraction_of_layer": fraction,
                           "is_default": False})
        step = bench.harness_step("quick", rounds=args.rounds, device=device)
        extras.append({"implementation": "training step: MoE model vs dense, equal active parameters",
                       "shape": "quick preset", "dtype": "float32", "median_ms": step["moe_ms"],
                       "ratio_to_dense": step["moe_step_over_dense"], "is_default": False,
                       "tokens_per_second": step["moe_tokens_per_second"],
                       "dense_tokens_per_second": step["dense_tokens_per_second"]})
    if args.json:
        print(json.dumps(bench.rows_as_json(rows) + extras, indent=1))
        return
    print(bench.format_rows(rows))
    for row in extras:
        if row["ratio_to_dense"] is None:
            print(f"router + Loss-Free balancing, shape {row['shape']} float32: "
                  f"{100 * row['fraction_of_layer']:.1f}% of the layer's forward+backward")
        else:
            print(f"training step, quick preset, float32: MoE {row['tokens_per_second']:.0f} tokens/s, dense with "
                  f"equal active parameters {row['dense_tokens_per_second']:.0f} tokens/s "
                  f"(MoE step = {row['ratio_to_dense']:.2f}x dense)")


def _sweep_methods(which: str) -> list[str]:
    """The methods of one sweep, or of all of them with each recipe once (``aux_loss`` and
    ``aux_loss_1e-3`` are the same balancers and router under two names)."""
    groups = sorted(SWEEPS) if which == "all" else [which]
    names, recipes = [], []
    for g in groups:
        for m in SWEEPS[g]:
            if (m.balancers, m.router, m.layer) not in recipes:
                names.append(m.name)
                recipes.append((m.balancers, m.router, m.layer))
    return names


def _print_placement(metrics: str, devices: int, method: str, time_limit: float) -> None:
    import json
    from pathlib import Path

    from ..placement import contiguous_placement, plan_placement

    path = Path(metrics)
    path = path / "eval.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{metrics}: no eval.json there; give a finished run directory or its eval.json")
    try:
        layers = json.loads(path.read_text())["expert_load"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not an eval.json with per-expert loads (expert_load)") from None
    print(f"{'layer':<6} {'placement':<20} {'max device load':>16} {'mean':>10} {'max/mean':>9}")
    for layer, loads in enumerate(layers):
        before, after = contiguous_placement(loads, devices), plan_placement(loads, devices, method, time_limit)
        for p in (before, after):
            print(f"{layer:<6} {p.method:<20} {p.max_load:>16.0f} {p.mean_load:>10.0f} {p.imbalance:>9.3f}")
        print(f"{'':<6} devices: " + " ".join(f"{d}:{[e for e, de in enumerate(after.device_of) if de == d]}"
                                              for d in range(devices)))


def _print_params(preset: str) -> None:
    import torch

    cfg = train_config(preset)
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = build_model(cfg, cfg.vocab_size)
    for key, value in model.param_counts().items():
        print(f"{key:<24} {value:>15,}")


if __name__ == "__main__":
    raise SystemExit(main())
