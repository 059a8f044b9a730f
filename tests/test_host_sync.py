"""No host synchronisation in the MoE layer's forward and backward on the paths training uses.

The detector: ``FakeTensorMode``. A fake tensor has a shape and a device but no data, so every
operation that needs a tensor's *values* on the host (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, boolean indexing, ``nonzero``: each a device-to-host sync on a GPU) raises
there. The dropless top-K layer (every balancer, the adaptive rule's statistics included) runs
forward and backward through it; the paths that must read values (ragged routers, dropping,
padding masks, the padded bmm and loop experts) are shown to raise, so the detector is known
to work, and every such read in the hot-path source carries a ``host sync:`` comment saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from moe_balance import MoE, MoEConfig, RouterConfig
from moe_balance.config import AuxLoss, LossFree, ZLoss

SRC = Path(__file__).resolve().parents[1] / "src" / "moe_balance"
HOT_PATH = ["routing", "dispatch.py", "experts.py", "moe.py", "balancing/losses.py", "balancing/loss_free.py",
            "balancing/aux.py", "balancing/rules", "parallel/experts.py"]
HOST_READS = (DataDependentOutputException, DynamicOutputShapeException)


def _layer(impl: str = "auto", router: RouterConfig | None = None, **overrides) -> MoE:
    # bfloat16 and widths that are multiples of 8: the default path is grouped_mm (torch's
    # fake-tensor rule for it accepts bfloat16 only); check_finite is the GPU's async assertion
    # there (tests/test_cuda.py), a CPU bool read here
    router = router or RouterConfig(check_finite=False)
    torch.manual_seed(0)
    config = dict(d_model=16, num_experts=8, top_k=2, expert_hidden_size=32, expert_impl=impl, router=router)
    return MoE(MoEConfig(**{**config, **overrides})).to(torch.bfloat16).train()


def _fake_step(layer: MoE, mask: bool = False) -> None:
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(4, 16, 16, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x, mask=torch.ones(4, 16, dtype=torch.bool) if mask else None)
        (out.y.float().sum() + out.aux_loss).backward()


SYNC_FREE = {
    "loss_free sign": dict(balancers=(LossFree(),)),
    "loss_free adaptive": dict(balancers=(LossFree(rule="adaptive"),)),
    "loss_free error, multiplicative": dict(balancers=(LossFree(rule="error", form="multiplicative"),)),
    "aux micro_batch + z-loss": dict(balancers=(AuxLoss(coeff=1e-2), ZLoss())),
    "aux sequence": dict(balancers=(AuxLoss(coeff=1e-2, scope="sequence"),)),
    "aux global_batch": dict(balancers=(AuxLoss(coeff=1e-2, scope="global_batch"),)),
    "group-limited, softmax, normalised, shared expert": dict(
        balancers=(LossFree(),), num_shared_experts=1,
        router=RouterConfig(score_fn="softmax", normalize_weights=True, num_groups=4, topk_groups=2,
                            check_finite=False)),
}


@pytest.mark.parametrize("name", SYNC_FREE)
def test_dropless_top_k_forward_and_backward_read_no_values_on_the_host(name):
    layer = _layer(**SYNC_FREE[name])
    assert layer.experts._resolve(torch.empty(1, 16, dtype=torch.bfloat16), None) == "grouped_mm"
    _fake_step(layer)  # raises on any value read
    # the fake run left the real buffers alone; a real run of the same layer observes its T K counts
    x = torch.randn(4, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).y.float().sum().backward()
    for balancer in layer.balancers:
        if isinstance(balancer.spec, LossFree):
            assert int(balancer.pending_counts.sum()) == 64 * 2


SYNCING = {  # each reads values on the host by necessity; see the "host sync:" comments
    "bmm experts (padded width)": (dict(impl="bmm"), False),
    "loop experts (split sizes)": (dict(impl="loop"), False),
    "top-p (data-dependent width)": (dict(router=RouterConfig(method="top_p", top_p=0.5, check_finite=False)), False),
    "expert choice": (dict(router=RouterConfig(method="expert_choice", check_finite=False)), False),
    "capacity with dropping": (dict(router=RouterConfig(capacity_factor=1.0, check_finite=False)), False),
    "padding mask": (dict(), True),
    "check_finite on the CPU": (dict(router=RouterConfig()), False),
}


@pytest.mark.parametrize("name", SYNCING)
def test_the_paths_that_must_read_values_are_caught_by_the_detector(name):
    overrides, mask = SYNCING[name]
    with pytest.raises(HOST_READS):
        _fake_step(_layer(**overrides), mask=mask)


def _hot_path_files() -> list[Path]:
    files = []
    for entry in HOT_PATH:
        path = SRC / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_every_host_read_in_the_hot_path_says_why():
    """Each .item(), .tolist(), .cpu() and .numpy() call in the forward/backward modules has a
    ``host sync:`` comment on its line or within the two lines above."""
    unjustified = []
    for path in _hot_path_files():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("item", "tolist", "cpu", "numpy"):
                window = lines[max(0, node.lineno - 3):node.lineno]
                if not any("host sync" in line for line in window):
                    unjustified.append(f"{path.relative_to(SRC)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unjustified, "host reads without a 'host sync:' comment:\n" + "\n".join(unjustified)
    assert len(_hot_path_files()) >= 15  # the walk found the modules (a moved file would empty it)
