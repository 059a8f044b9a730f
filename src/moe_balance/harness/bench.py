"""``moe-balance bench``: the MoE layer against the dense limit and the peers, in one process.

Shape legend: T tokens, D d_model, H expert hidden, E experts, K top_k, S shared experts.

Every implementation runs forward+backward on the same T tokens, in interleaved rounds (one
call of each per round, in a rotating order, after a warm-up round), so slow drifts of the
machine hit all of them alike. The reference is a dense SwiGLU with the same active FLOPs:
T x (K + S) rows through one expert-sized SwiGLU. Each round gives each implementation a
ratio to that round's dense time; the table reports medians. Speed is measured here, never
asserted in a unit test (the tests check the report's arithmetic and every path's values).

Memory is the activation bytes autograd saves for the backward pass (``saved_tensors_hooks``,
each storage counted once; parameters and the input, which exist anyway, left out):
deterministic, and the part of the peak that grows with T.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import MoEConfig, RouterConfig
from ..experts import SwiGLU, grouped_mm_supported
from ..moe import MoE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    expert_hidden: int
    num_experts: int
    top_k: int
    shared: int = 0

    @property
    def active_rows(self) -> int:
        """Rows of the dense reference per token: the K routed experts plus the shared ones."""
        return self.top_k + self.shared


SHAPES = {
    "A": Shape("A", 512, 1024, 8, 2),
    "B": Shape("B", 512, 256, 64, 6),
    "Bs": Shape("Bs", 512, 256, 64, 6, shared=1),
}


def parse_shape(text: str) -> Shape:
    """``NAME`` of ``SHAPES`` or ``d,hidden,experts,top_k[,shared]``."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        numbers = [int(p) for p in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (4, 5) or min(numbers[:4]) < 1 or (len(numbers) == 5 and numbers[4] < 0) \
            or numbers[3] > numbers[2]:
        raise ValueError(f"shape {text!r} is not allowed; give one of {sorted(SHAPES)} or "
                         "d_model,expert_hidden,num_experts,top_k[,shared] with top_k <= num_experts")
    return Shape(text, *numbers)


@dataclass(frozen=True)
class Row:
    """One implementation on one shape and dtype. ratio_to_dense: median over rounds of
    (its time / the dense reference's time in the same round)."""

    implementation: str
    shape: str
    dtype: str
    median_ms: float
    ratio_to_dense: float
    saved_mib: float
    saved_ratio_to_dense: float
    is_default: bool
    note: str = ""


def _ours(shape: Shape, impl: str, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    layer = MoE(MoEConfig(d_model=shape.d_model, num_experts=shape.num_experts, top_k=shape.top_k,
                          expert_hidden_size=shape.expert_hidden, num_shared_experts=shape.shared,
                          expert_impl=impl, router=RouterConfig(score_fn="softmax"))).to(device, dtype)
    return lambda x: layer(x).y


def _dense(shape: Shape, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mlp = SwiGLU(shape.d_model, shape.expert_hidden).to(device, dtype)
    return lambda x: mlp(x.repeat(shape.active_rows, 1))  # T x (K + S) rows, the same active FLOPs


def _peer(shape: Shape, family: str, impl: str, dtype: torch.dtype,
          device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """transformers' MoE block of ``family`` with its ``impl`` experts, random weights, or None."""
    try:
        import transformers
    except ImportError:
        return None
    common = dict(hidden_size=shape.d_model, num_experts_per_tok=shape.top_k, num_hidden_layers=1,
                  num_attention_heads=4, vocab_size=128)
    if family == "mixtral":
        if shape.shared:
            return None
        config = transformers.MixtralConfig(**common, intermediate_size=shape.expert_hidden,
                                            num_local_experts=shape.num_experts)
        block_cls = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    elif family == "olmoe":
        if shape.shared:
            return None
        config = transformers.OlmoeConfig(**common, intermediate_size=shape.expert_hidden, num_experts=shape.num_experts)
        block_cls = transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock
    else:
        if not shape.shared:
            return None
        config = transformers.DeepseekV3Config(**common, moe_intermediate_size=shape.expert_hidden,
                                               n_routed_experts=shape.num_experts, n_shared_experts=shape.shared,
                                               n_group=1, topk_group=1)
        block_cls = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE
    config._experts_implementation = impl
    torch.manual_seed(0)
    block = block_cls(config).to(device, dtype)
    for p in block.parameters():  # the block's own init leaves some weights empty or zero
        torch.nn.init.normal_(p, std=0.02)
    return lambda x: block(x.unsqueeze(0)).squeeze(0)


def _saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        if not (t.is_leaf and t.requires_grad):  # parameters and the input exist anyway
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x.detach().requires_grad_())
    del y
    return sum(seen.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time them to their end
        torch.cuda.synchronize(device)


def _step(fn, x: torch.Tensor) -> float:
    xi = x.detach().requires_grad_()
    _synchronize(x.device)
    start = time.perf_counter()
    fn(xi).float().sum().backward()
    _synchronize(x.device)
    return time.perf_counter() - start


def implementations(shape: Shape, dtype: torch.dtype, peers: bool = True,
                    device: torch.device | str = "cpu") -> dict[str, tuple[Callable, str]]:
    """name -> (forward function, note) for every implementation that runs here."""
    device = torch.device(device)
    out = {"dense (same active FLOPs)": (_dense(shape, dtype, device), "reference")}
    for impl in ("auto", "grouped_mm", "bmm", "loop"):
        if impl == "grouped_mm" and not grouped_mm_supported(device.type, dtype):
            continue
        out[f"moe_balance {impl}"] = (_ours(shape, impl, dtype, device), "")
    if peers:
        for family in ("mixtral", "olmoe", "deepseek_v3"):
            for impl in ("grouped_mm", "eager"):
                if impl == "grouped_mm" and not grouped_mm_supported(device.type, dtype):
                    continue  # transformers would fall back or fail: not the path the row names
                fn = _peer(shape, family, impl, dtype, device)
                if fn is not None:
                    out[f"transformers {family} {impl}"] = (fn, "")
    return out


def auto_choice(shape: Shape, dtype: torch.dtype, device_type: str = "cpu") -> str:
    """The expert path ``expert_impl="auto"`` takes for this shape and dtype on this device."""
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (shape.d_model, shape.expert_hidden))
    return "grouped_mm" if aligned and grouped_mm_supported(device_type, dtype) else "bmm"


def bench_device(name: str) -> torch.device:
    """``--device``: "cpu", "cuda" or "auto" (CUDA when available)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"bench --device {name!r} is not allowed; choose auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench --device cuda: this machine has no usable CUDA device; pass --device cpu")
    return torch.device(name)


def bench(shapes: list[Shape], dtypes: list[str], *, tokens: int = 4096, rounds: int = 5,
          peers: bool = True, progress: Callable[[str], None] | None = None,
          device: torch.device | str = "cpu") -> list[Row]:
    """Time every implementation on every shape and dtype (see the module docstring)."""
    if rounds < 1 or tokens < 1:
        raise ValueError(f"rounds={rounds} and tokens={tokens} must be >= 1")
    device = torch.device(device)
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            if dtype_name not in DTYPES:
                raise ValueError(f"dtype {dtype_name!r} is not allowed; choose from {sorted(DTYPES)}")
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            x = torch.randn(tokens, shape.d_model, dtype=dtype).to(device)
            impls = implementations(shape, dtype, peers, device)
            names = list(impls)
            times = {n: [] for n in names}
            for r in range(rounds + 1):  # round 0 warms up every path (kernel caches, allocator)
                order = names[r % len(names):] + names[:r % len(names)]
                for n in order:
                    elapsed = _step(impls[n][0], x)
                    if r:
                        times[n].append(elapsed)
                if progress is not None:
                    progress(f"{shape.name} {dtype_name}: round {r}/{rounds}")
            dense_name = names[0]
            saved = {n: _saved_bytes(impls[n][0], x) for n in names}
            default = f"moe_balance {auto_choice(shape, dtype, device.type)}"
            for n in names:
                ratios = [t / d for t, d in zip(times[n], times[dense_name])]
                rows.append(Row(n, shape.name, dtype_name, 1000 * statistics.median(times[n]), statistics.median(ratios),
                                saved[n] / 2**20, saved[n] / saved[dense_name],
                                is_default=n in ("moe_balance auto", default), note=impls[n][1]))
    return rows


def router_overhead(shape: Shape, dtype_name: str = "float32", *, tokens: int = 4096, rounds: int = 5,
                    device: torch.device | str = "cpu") -> float:
    """Router + Loss-Free balancing (scores, biased top-K, sort, counts, the count hook) as a
    fraction of the whole layer's forward+backward, median over interleaved rounds."""
    from ..balancing import update_balancers
    from ..config import LossFree

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=shape.d_model, num_experts=shape.num_experts, top_k=shape.top_k,
                          expert_hidden_size=shape.expert_hidden, num_shared_experts=shape.shared,
                          balancers=(LossFree(),))).to(device, dtype)
    x = torch.randn(tokens, shape.d_model, dtype=dtype).to(device)

    def route(xi):
        decision = layer.router(xi, layer.expert_bias)
        return decision.weights  # the gates: the router's differentiable output

    fractions = []
    for r in range(rounds + 1):
        whole = _step(lambda xi: layer(xi).y, x)
        update_balancers(layer)
        part = _step(route, x)
        if r:
            fractions.append(part / whole)
    return statistics.median(fractions)


def format_rows(rows: list[Row]) -> str:
    lines = ["| implementation | shape | dtype | median ms | ratio to dense | saved for backward MiB (x dense) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (auto)" if r.is_default and r.implementation != "moe_balance auto" else ""
        lines.append(f"| {r.implementation}{mark} | {r.shape} | {r.dtype} | {r.median_ms:.1f} | "
                     f"{r.ratio_to_dense:.2f} | {r.saved_mib:.1f} ({r.saved_ratio_to_dense:.2f}x) |")
    return "\n".join(lines)


def rows_as_json(rows: list[Row]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]


def harness_step(preset: str = "quick", *, rounds: int = 5, batch_size: int = 32, seq_len: int = 64,
                 device: torch.device | str = "cpu") -> dict:
    """A training step (forward, backward, AdamW, balancer update) of the preset's MoE model
    against a dense model with the same active parameters: every block dense, its FFN
    (K + S) x the expert width. Tokens per second, median over interleaved rounds."""
    from ..balancing import update_balancers
    from ..config import LossFree
    from .model import MoETransformer, model_preset

    moe_config = model_preset(preset, seq_len=seq_len, balancers=(LossFree(),))
    c = moe_config.moe
    dense_config = dataclasses.replace(moe_config, n_dense_layers=moe_config.n_layers,
                                       dense_ffn_hidden=(c.top_k + c.num_shared_experts) * c.expert_hidden_size)
    models, optimizers = {}, {}
    for name, config in (("moe", moe_config), ("dense", dense_config)):
        torch.manual_seed(0)
        models[name] = MoETransformer(config).to(device)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    tokens = torch.randint(0, moe_config.vocab_size, (batch_size, seq_len + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def step(name):
        model, opt = models[name], optimizers[name]
        _synchronize(tokens.device)
        start = time.perf_counter()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_balancers(model)
        _synchronize(tokens.device)
        return time.perf_counter() - start

    ratios, times = [], {"moe": [], "dense": []}
    for r in range(rounds + 1):
        pair = ("moe", "dense") if r % 2 else ("dense", "moe")
        elapsed = {name: step(name) for name in pair}
        if r:
            ratios.append(elapsed["moe"] / elapsed["dense"])
            for name in pair:
                times[name].append(elapsed[name])
    n = batch_size * seq_len
    active = {name: models[name].param_counts()["activated"] for name in models}
    return {"preset": preset, "moe_ms": 1000 * statistics.median(times["moe"]),
            "moe_tokens_per_second": n / statistics.median(times["moe"]),
            "dense_tokens_per_second": n / statistics.median(times["dense"]),
            "moe_step_over_dense": statistics.median(ratios), "active_params": active}
