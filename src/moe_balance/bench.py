"""Benchmark: the expert compute paths against the loop reference, measured in one run.

Reports forward+backward time per MoE layer call for each ``expert_impl`` and its speed-up
over ``loop``. Numbers are ratios within one process on one machine; a timed unit test
would be flaky, so speed is checked here and correctness in the tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import MoEConfig
from .experts import grouped_mm_supported
from .moe import MoE


@dataclass(frozen=True)
class BenchResult:
    impl: str
    ms_per_call: float
    speedup_vs_loop: float


def bench_experts(*, d_model: int = 256, num_experts: int = 64, top_k: int = 6, expert_hidden_size: int = 128,
                  tokens: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[BenchResult]:
    """Time forward+backward of one MoE layer for every available expert path (median of repeats)."""
    impls = ["loop", "bmm"] + (["grouped_mm"] if grouped_mm_supported("cpu", dtype) else [])
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, dtype=dtype)
    reference = None
    timings = {}
    for impl in impls:
        layer = MoE(MoEConfig(d_model=d_model, num_experts=num_experts, top_k=top_k,
                              expert_hidden_size=expert_hidden_size, expert_impl=impl)).to(dtype)
        if reference is None:
            reference = layer.state_dict()
        layer.load_state_dict(reference)
        samples = []
        for _ in range(repeats + 1):  # the first call warms up
            xi = x.clone().requires_grad_()
            start = time.perf_counter()
            layer(xi).y.sum().backward()
            samples.append(time.perf_counter() - start)
        timings[impl] = sorted(samples[1:])[len(samples[1:]) // 2]
    return [BenchResult(impl, 1000 * t, timings["loop"] / t) for impl, t in timings.items()]


def format_bench(results: list[BenchResult]) -> str:
    lines = ["| expert path | ms per forward+backward | speed-up vs loop |", "|---|---|---|"]
    lines += [f"| {r.impl} | {r.ms_per_call:.1f} | {r.speedup_vs_loop:.2f}x |" for r in results]
    return "\n".join(lines)
