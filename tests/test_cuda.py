"""The GPU path: the layer and the harness on CUDA against the CPU reference, no host sync in
the hot path, the asynchronous NaN check, checkpoints across devices, bench on CUDA, and two
GPUs over nccl. The only tests of the suite that may skip: without a CUDA GPU they say so.
``scripts/gpu_check.sh`` runs them (with the rest of the suite, the bench and a training run).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from corpora import write_two_domain_corpus
from moe_balance import MoE, MoEConfig, RouterConfig
from moe_balance.config import AuxLoss, LossFree
from moe_balance.experts import grouped_mm_supported
from moe_balance.harness.data import prepare_corpus
from moe_balance.harness.train import train, train_config

GPUS = int(os.environ.get("MOE_BALANCE_TEST_GPUS", "0"))  # counted by conftest.py before it hid them
HAS_CUDA = GPUS > 0
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False): "
                                                      "the CPU reference path is tested everywhere else")]
CUDA = torch.device("cuda")

LAYERS = {
    "top_k loss_free": dict(balancers=(LossFree(),)),
    "top_k aux sequence, shared expert": dict(balancers=(AuxLoss(coeff=1e-2, scope="sequence"),), num_shared_experts=1),
    "grouped experts": dict(router=RouterConfig(method="grouped", num_groups=2), balancers=(LossFree(),)),
    "group-limited": dict(router=RouterConfig(num_groups=4, topk_groups=2), balancers=(LossFree(),)),
    "top_p": dict(router=RouterConfig(method="top_p", top_p=0.6, score_fn="softmax")),
    "expert_choice": dict(router=RouterConfig(method="expert_choice", score_fn="softmax")),
    "capacity 1.0": dict(router=RouterConfig(capacity_factor=1.0), balancers=(LossFree(),)),
}


def _layer(impl="bmm", **overrides) -> MoE:
    torch.manual_seed(0)
    base = dict(d_model=32, num_experts=8, top_k=2, expert_hidden_size=64, expert_impl=impl)
    return MoE(MoEConfig(**{**base, **overrides})).train()


def _forward_backward(layer: MoE, x: torch.Tensor) -> dict:
    x = x.detach().requires_grad_()
    out = layer(x)
    (out.y.float().square().sum() + out.aux_loss).backward()
    layer_grads = {n: p.grad.detach().cpu() for n, p in layer.named_parameters()}
    return {"y": out.y.detach().float().cpu(), "x_grad": x.grad.float().cpu(), **layer_grads,
            "expert_ids": out.decision.expert_ids.cpu(), "counts": out.decision.tokens_per_expert.cpu()}


@pytest.mark.parametrize("impl", ["bmm", "loop"])
@pytest.mark.parametrize("name", LAYERS)
def test_the_layer_on_cuda_equals_the_cpu_reference(name, impl):
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    cpu_layer = _layer(impl, **LAYERS[name])
    gpu_layer = _layer(impl, **LAYERS[name]).to(CUDA)
    cpu, gpu = _forward_backward(cpu_layer, x), _forward_backward(gpu_layer, x.to(CUDA))
    assert torch.equal(cpu["expert_ids"], gpu["expert_ids"]) and torch.equal(cpu["counts"], gpu["counts"])
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(cpu_layer.buffers(), gpu_layer.buffers()):  # the observed counts, exactly
        assert torch.equal(a, b.cpu())


def test_grouped_mm_on_cuda_matches_the_padded_path():
    if not grouped_mm_supported("cuda", torch.bfloat16):
        pytest.skip(f"torch._grouped_mm does not run on this GPU ({torch.cuda.get_device_name()}): "
                    "it needs compute capability 9.0 or later")
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2)).to(CUDA, torch.bfloat16)
    grouped = _forward_backward(_layer("grouped_mm", balancers=(LossFree(),)).to(CUDA, torch.bfloat16), x)
    padded = _forward_backward(_layer("bmm", balancers=(LossFree(),)).to(CUDA, torch.bfloat16), x)
    assert torch.equal(grouped["expert_ids"], padded["expert_ids"])
    for key in ("y", "x_grad", "experts.w_gate", "experts.w_down", "router.weight"):
        torch.testing.assert_close(grouped[key], padded[key], rtol=2e-2, atol=2e-2, msg=key)


def test_no_host_sync_in_the_dropless_forward_and_backward_on_cuda():
    """torch's sync debug mode raises on any synchronising CUDA call: the default layer
    (grouped_mm, Loss-Free, check_finite on) runs a whole forward and backward under it."""
    dtype = torch.bfloat16 if grouped_mm_supported("cuda", torch.bfloat16) else torch.float32
    layer = _layer("auto", balancers=(LossFree(rule="adaptive"),), num_shared_experts=1).to(CUDA, dtype)
    layer.experts.probe()  # the one-time capability probe reads its result: not part of a step
    x = torch.randn(512, 32, device=CUDA, dtype=dtype, requires_grad=True)
    if layer.experts._resolve(x, None) != "grouped_mm":
        pytest.skip("grouped_mm does not run on this GPU; the padded path reads its width on the host")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.y.float().sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(layer.balancers[0].pending_counts.sum()) == 512 * 2


NAN_SCRIPT = """
import torch
from moe_balance import MoE, MoEConfig
layer = MoE(MoEConfig(d_model=16, num_experts=4, top_k=2, expert_hidden_size=16, expert_impl="bmm")).cuda()
x = torch.full((8, 16), float("nan"), device="cuda")
layer.router(x, None)  # no host sync: the check is queued on the device
print("forward returned", flush=True)
torch.cuda.synchronize()
print("no error")
"""


def test_nan_router_logits_fail_asynchronously_on_cuda(gpu_env):
    proc = subprocess.run([sys.executable, "-c", NAN_SCRIPT], capture_output=True, text=True, env=gpu_env,
                          timeout=300)
    assert "forward returned" in proc.stdout  # the forward itself did not stop to look
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "device-side assert" in proc.stderr or "Assertion" in proc.stderr, proc.stderr[-2000:]


def _base(tmp_path, **overrides):
    corpus_dir = write_two_domain_corpus(tmp_path / "corpus")
    settings = dict(data=str(corpus_dir), vocab_size=300, cache_dir=str(tmp_path / "cache"), steps=12,
                    checkpoint_every=4, eval_tokens=2048, max_train_tokens=None)
    cfg = train_config("tiny", **{**settings, **overrides})
    corpus = prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                            val_fraction=cfg.val_fraction, progress=False)
    return cfg, corpus


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_training_on_cuda_follows_the_cpu_run(tmp_path):
    cfg, corpus = _base(tmp_path)
    cpu = train(dataclasses.replace(cfg, device="cpu"), tmp_path / "cpu", corpus=corpus, progress=False)
    gpu = train(dataclasses.replace(cfg, device="cuda"), tmp_path / "gpu", corpus=corpus, progress=False)
    for a, b in zip(_metrics(tmp_path / "cpu"), _metrics(tmp_path / "gpu")):
        assert _close(a["loss"], b["loss"], 2e-3), (a["step"], a["loss"], b["loss"])
    assert _close(cpu["val_loss"], gpu["val_loss"], 2e-3)
    assert gpu["memory_per_rank"][0]["peak_cuda_allocated_bytes"] > 0


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_cuda_run_resumes_on_cuda_and_on_the_cpu(tmp_path, checkpoint_format):
    cfg, corpus = _base(tmp_path, device="cuda", checkpoint_format=checkpoint_format)
    train(cfg, tmp_path / "full", corpus=corpus, progress=False)

    class Stop(Exception):
        pass

    def stop_at_6(step, record):
        if step == 6:
            raise Stop

    for run, device in (("on_cuda", "cuda"), ("on_cpu", "cpu")):
        with pytest.raises(Stop):
            train(cfg, tmp_path / run, corpus=corpus, progress=False, on_step=stop_at_6)
        train(dataclasses.replace(cfg, device=device), tmp_path / run, corpus=corpus, progress=False, resume=True)
        full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / run)
        assert [r["step"] for r in resumed] == list(range(1, 13))
        rel = 1e-4 if device == "cuda" else 2e-3  # float atomics on the GPU; the CPU's other kernels
        for a, b in zip(full[4:], resumed[4:]):  # steps 5-12 come from the step-4 checkpoint
            assert _close(a["loss"], b["loss"], rel), (run, a["step"], a["loss"], b["loss"])


def test_bfloat16_autocast_training_on_cuda_learns(tmp_path):
    cfg, corpus = _base(tmp_path, device="cuda", dtype="bfloat16", steps=20, lr=3e-3, checkpoint_every=0)
    result = train(cfg, tmp_path / "bf16", corpus=corpus, progress=False)
    losses = [r["loss"] for r in _metrics(tmp_path / "bf16")]
    assert all(map(lambda v: v == v, losses)) and sum(losses[-5:]) < sum(losses[:5])
    assert result["val_loss"] < losses[0]


def test_bench_on_cuda_times_the_grouped_mm_path():
    from moe_balance.harness.bench import bench, parse_shape

    rows = bench([parse_shape("64,128,8,2")], ["bfloat16"], tokens=1024, rounds=1, peers=True, device="cuda")
    names = {r.implementation for r in rows}
    assert {"dense (same active FLOPs)", "moe_balance auto", "moe_balance bmm", "moe_balance loop"} <= names
    if grouped_mm_supported("cuda", torch.bfloat16):
        assert any(r.implementation == "moe_balance grouped_mm" and r.is_default for r in rows)
    assert all(r.median_ms > 0 and r.ratio_to_dense > 0 for r in rows)


@pytest.mark.skipif(GPUS < 2,
                    reason="needs two CUDA GPUs: expert parallelism over nccl puts one process on each")
def test_two_gpus_expert_parallel_with_fsdp_match_one_gpu(tmp_path, gpu_env):
    cache = str(tmp_path / "cache")

    def run(out, procs, *extra):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
            if procs > 1 else [sys.executable]
        args = ["train", "--preset", "tiny", "--steps", "20", "--device", "cuda", "--out", str(out),
                "--cache-dir", cache, *extra]
        proc = subprocess.run([*launcher, "-m", "moe_balance", *args], capture_output=True, text=True,
                              env=gpu_env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _metrics(out)

    one = run(tmp_path / "one", 1)
    two = run(tmp_path / "two", 2, "--expert-parallel", "2", "--fsdp")
    assert [r["step"] for r in two] == list(range(1, 21))
    for a, b in zip(one, two):
        assert _close(a["loss"], b["loss"], 1e-4), (a["step"], a["loss"], b["loss"])
        assert a["bias"] == b["bias"] or max(abs(x - y) for la, lb in zip(a["bias"], b["bias"])
                                             for x, y in zip(la, lb)) <= 2e-3
