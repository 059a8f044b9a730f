"""The bad-input matrix of docs/errors.md: each row's case is run here and must show the row's
message (or, for *no error* rows, the documented behaviour)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from moe_balance.config import ParameterPenalty
from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, RouterConfig
from moe_balance.harness._files import exclusive_lock
from moe_balance.harness.checkpoint import (checkpoint_path, latest_valid_checkpoint, load_checkpoint,
                                    save_checkpoint)
from moe_balance.harness.cli import main
from moe_balance.harness.data import load_documents
from moe_balance.harness.train import TrainConfig, _check_same_config, train, train_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| `(?P<case>[a-z0-9-]+)` \|.*\| (?P<seen>[^|]*) \|$")


def documented_rows() -> dict[str, str]:
    """case -> the last column of its row in docs/errors.md."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line.replace("\\|", "/"))
        if match:
            rows[match["case"]] = match["seen"].strip()
    return rows


def fragment(seen: str) -> str:
    """The first `...` span of a row's last column: what the user must see."""
    return seen.split("`")[1]


def error_of(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def cli_error(argv, capsys) -> str:
    """stderr of the command line, which must exit non-zero and show no traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    return err


def layer(**kw) -> MoE:
    return MoE(MoEConfig(d_model=8, num_experts=4, top_k=2, expert_hidden_size=16, **kw))


# ------------------------------------------------------------------------------ the cases

def _no_error_nan_padding(ctx) -> str:
    moe = layer(balancers=(AuxLoss(coeff=1e-2),))
    x = torch.randn(2, 3, 8)
    padded = torch.cat([torch.full((2, 2, 8), float("nan")), x], dim=1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, :2] = False
    plain, masked = moe(x), moe(padded, mask=mask)
    assert torch.isfinite(masked.y).all() and torch.isfinite(masked.aux_loss)
    torch.testing.assert_close(masked.y[:, 2:], plain.y)
    assert torch.equal(masked.decision.routed_tokens_per_expert, plain.decision.routed_tokens_per_expert)
    return "no error"


def _no_error_zero_tokens(ctx) -> str:
    out = layer(balancers=(LossFree(),))(torch.zeros(0, 8))
    assert out.y.shape == (0, 8) and int(out.decision.routed_tokens_per_expert.sum()) == 0
    return "no error"


def _checkpoint(ctx, step: int = 1) -> Path:
    return save_checkpoint(ctx["tmp"], step, {"step": step, "model": {"w": torch.ones(3)}})


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _newer_format(ctx) -> str:
    path = _checkpoint(ctx)
    data = path.read_bytes()
    magic_end = data.index(b"{")
    header_end = data.index(b"\n", magic_end)
    header = json.loads(data[magic_end:header_end])
    header["format"] = 99
    path.write_bytes(data[:magic_end] + json.dumps(header).encode() + data[header_end:])
    return error_of(lambda: load_checkpoint(path))


def _resume_fallback(ctx) -> str:
    _checkpoint(ctx, 1)
    newest = _checkpoint(ctx, 2)
    newest.write_bytes(newest.read_bytes()[:-10])
    state, path, skipped = latest_valid_checkpoint(ctx["tmp"])
    assert state["step"] == 1 and path == checkpoint_path(ctx["tmp"], 1)
    assert len(skipped) == 1 and "is truncated" in skipped[0]
    return "no error"


def _garbage_checkpoint(ctx) -> str:
    path = checkpoint_path(ctx["tmp"], 3)
    path.write_bytes(bytes(range(256)) * 4)
    return error_of(lambda: load_checkpoint(path))


def _foreign_checkpoint(ctx) -> str:
    path = checkpoint_path(ctx["tmp"], 3)
    torch.save({"weights": torch.ones(2)}, path)
    return error_of(lambda: load_checkpoint(path))


def _truncated(ctx) -> str:
    path = _checkpoint(ctx)
    path.write_bytes(path.read_bytes()[:-10])
    return error_of(lambda: load_checkpoint(path))


def _bitflip(ctx) -> str:
    path = _checkpoint(ctx)
    _flip_last_byte(path)
    return error_of(lambda: load_checkpoint(path))


def _run_not_empty(ctx) -> str:
    (ctx["tmp"] / "notes.txt").write_text("someone's work")
    message = error_of(lambda: train(train_config("tiny"), ctx["tmp"], progress=False))
    assert (ctx["tmp"] / "notes.txt").read_text() == "someone's work"
    return message


def _run_locked(ctx) -> str:
    with exclusive_lock(ctx["tmp"]):
        return error_of(lambda: train(train_config("tiny"), ctx["tmp"], progress=False))


def _different_config(ctx) -> str:
    (ctx["tmp"] / "config.json").write_text(json.dumps({"train": {**train_config("tiny").__dict__, "lr": 5e-3}}))
    return error_of(lambda: _check_same_config(ctx["tmp"], train_config("tiny")))


def _missing_extra(ctx) -> str:
    ctx["monkeypatch"].setitem(sys.modules, "datasets", None)
    return cli_error(["train", "--preset", "tiny", "--out", str(ctx["tmp"] / "run"), "--data", "hf:x",
                      "--cache-dir", str(ctx["tmp"] / "cache")], ctx["capsys"])


def _hf_unreachable(ctx) -> str:
    ctx["monkeypatch"].setenv("HF_DATASETS_OFFLINE", "1")
    ctx["monkeypatch"].setenv("HF_HUB_OFFLINE", "1")
    ctx["monkeypatch"].setenv("HF_HOME", str(ctx["tmp"] / "hf_home"))
    return error_of(lambda: load_documents("hf:no-such-dataset-name", cache_dir=ctx["tmp"]))


def _data_dir(ctx, files: dict) -> str:
    for name, data in files.items():
        (ctx["tmp"] / name).write_bytes(data)
    return str(ctx["tmp"])


def _tested_elsewhere(path: str):
    def check(ctx) -> str:
        return (Path(__file__).parent / Path(path).name).read_text(encoding="utf-8")
    return check


def _out_is_file(ctx) -> str:
    (ctx["tmp"] / "a_file").write_text("x")
    return cli_error(["train", "--preset", "tiny", "--out", str(ctx["tmp"] / "a_file")], ctx["capsys"])


CASES = {
    "router-bool": lambda ctx: error_of(lambda: RouterConfig(normalize_weights="no")),
    "lossfree-bool-number": lambda ctx: error_of(lambda: LossFree(update_rate=True)),
    "lossfree-nan": lambda ctx: error_of(lambda: LossFree(update_rate=math.nan)),
    "lossfree-rule": lambda ctx: error_of(lambda: LossFree(rule="pid")),
    "moe-top-k": lambda ctx: error_of(lambda: MoEConfig(d_model=8, num_experts=4, top_k=5, expert_hidden_size=16)),
    "grouped-mm-unaligned": lambda ctx: error_of(lambda: MoEConfig(d_model=6, num_experts=4, top_k=2,
                                                                   expert_hidden_size=16, expert_impl="grouped_mm")),
    "router-groups": lambda ctx: error_of(lambda: RouterConfig(num_groups=3)),
    "router-method": lambda ctx: error_of(lambda: RouterConfig(method="switch")),
    "router-field-of-other-method": lambda ctx: error_of(lambda: RouterConfig(top_p=0.5)),
    "router-grouped-topk-groups": lambda ctx: error_of(lambda: RouterConfig(method="grouped", num_groups=2,
                                                                            topk_groups=1)),
    "router-shuffle-whole-batch": lambda ctx: error_of(lambda: RouterConfig(method="expert_choice",
                                                                            shuffle_tokens=True)),
    "moe-grouped-top-k": lambda ctx: error_of(lambda: MoEConfig(
        d_model=8, num_experts=8, top_k=3, expert_hidden_size=16,
        router=RouterConfig(method="grouped", num_groups=2))),
    "moe-expert-choice-loss-free": lambda ctx: error_of(lambda: MoEConfig(
        d_model=8, num_experts=8, top_k=2, expert_hidden_size=16, balancers=(LossFree(),),
        router=RouterConfig(method="expert_choice"))),
    "moe-hidden-sizes-both": lambda ctx: error_of(lambda: MoEConfig(
        d_model=8, num_experts=2, top_k=1, expert_hidden_size=4, expert_hidden_sizes=(4, 4))),
    "parameter-penalty-equal-widths": lambda ctx: error_of(lambda: MoEConfig(
        d_model=8, num_experts=2, top_k=1, expert_hidden_size=4, balancers=(ParameterPenalty(),))),
    "lossfree-share-without-zero-experts": lambda ctx: error_of(lambda: MoEConfig(
        d_model=8, num_experts=2, top_k=1, expert_hidden_size=4, balancers=(LossFree(zero_computation_share=0.2),))),
    "balancers-list": lambda ctx: error_of(lambda: MoEConfig(d_model=8, num_experts=4, top_k=2,
                                                             expert_hidden_size=16, balancers=[LossFree()])),
    "train-lr-inf": lambda ctx: error_of(lambda: TrainConfig(lr=math.inf)),
    "train-method": lambda ctx: error_of(lambda: TrainConfig(method="nope")),
    "forward-not-tensor": lambda ctx: error_of(lambda: layer()([[0.0] * 8])),
    "forward-shape": lambda ctx: error_of(lambda: layer()(torch.zeros(3, 7))),
    "forward-int": lambda ctx: error_of(lambda: layer()(torch.zeros(3, 8, dtype=torch.int64))),
    "forward-dtype": lambda ctx: error_of(lambda: layer()(torch.zeros(3, 8, dtype=torch.float64))),
    "forward-mask-float": lambda ctx: error_of(lambda: layer()(torch.zeros(2, 3, 8), mask=torch.ones(2, 3))),
    "forward-mask-shape": lambda ctx: error_of(lambda: layer()(torch.zeros(2, 3, 8),
                                                               mask=torch.ones(3, 2, dtype=torch.bool))),
    "forward-nan": lambda ctx: error_of(lambda: layer()(torch.full((2, 8), math.nan))),
    "forward-nan-padding": _no_error_nan_padding,
    "forward-zero-tokens": _no_error_zero_tokens,
    "cli-int": lambda ctx: cli_error(["train", "--out", "x", "--steps", "abc"], ctx["capsys"]),
    "cli-lr-inf": lambda ctx: cli_error(["train", "--out", "x", "--lr", "inf"], ctx["capsys"]),
    "cli-nonfinite": lambda ctx: cli_error(["train", "--out", "x", "--nonfinite", "ignore"], ctx["capsys"]),
    "cli-out-empty": lambda ctx: cli_error(["train", "--preset", "tiny", "--out", ""], ctx["capsys"]),
    "cli-out-file": _out_is_file,
    "cli-seeds": lambda ctx: cli_error(["compare", "--out", "x", "--seeds", "0,0"], ctx["capsys"])
    + cli_error(["compare", "--out", "x", "--seeds", "a"], ctx["capsys"]),
    "cli-bench-rounds": lambda ctx: cli_error(["bench", "--rounds", "0"], ctx["capsys"]),
    "cli-missing-extra": _missing_extra,
    "data-missing": lambda ctx: error_of(lambda: load_documents("no/such/dir", cache_dir=ctx["tmp"])),
    "data-empty-dir": lambda ctx: error_of(lambda: load_documents(_data_dir(ctx, {}), cache_dir=ctx["tmp"])),
    "data-binary": lambda ctx: error_of(lambda: load_documents(
        _data_dir(ctx, {"blob.txt": b"\xff\xfe\x00\x81"}) + "/blob.txt", cache_dir=ctx["tmp"])),
    "data-hf-unreachable": _hf_unreachable,
    "ckpt-garbage": _garbage_checkpoint,
    "ckpt-truncated": _truncated,
    "ckpt-bitflip": _bitflip,
    "ckpt-foreign": _foreign_checkpoint,
    "ckpt-newer-format": _newer_format,
    "resume-fallback": _resume_fallback,
    "run-not-empty": _run_not_empty,
    "run-locked": _run_locked,
    "run-different-config": _different_config,
    "training-nonfinite": _tested_elsewhere("tests/test_train.py"),
    "training-interrupted": _tested_elsewhere("tests/test_cli.py"),
    "ep-needs-processes": lambda ctx: cli_error(["train", "--preset", "tiny", "--out", str(ctx["tmp"] / "r"),
                                                 "--expert-parallel", "2"], ctx["capsys"]),
    "ep-batch-split": _tested_elsewhere("tests/test_parallel_harness.py"),
    "ep-heterogeneous": _tested_elsewhere("tests/test_parallel.py"),
    "ep-lost-rank": _tested_elsewhere("tests/test_parallel.py"),
    "locality-negative": lambda ctx: error_of(lambda: train_config("tiny", locality_bonus=-1)),
}


def test_every_documented_case_has_a_test_and_every_test_a_row():
    assert list(documented_rows()) == list(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_the_user_sees_what_the_matrix_says(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = documented_rows()[case]
    ctx = {"tmp": tmp_path, "capsys": capsys, "monkeypatch": monkeypatch}
    shown = CASES[case](ctx)
    if seen.startswith("*no error*"):
        assert shown == "no error"
    else:
        assert fragment(seen) in shown, f"{case}: expected {fragment(seen)!r} in {shown!r}"
