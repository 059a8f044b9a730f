"""CLI commands that need no training: methods, params, sweep composition, typed flags."""

import pytest

from moe_balance.cli import _sweep_methods, build_parser, main
from moe_balance.methods import list_methods


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [m.name for m in list_methods()]
    for required in ("no_balance", "aux_loss", "aux_loss_1e-2", "seq_aux", "global_aux", "loss_free",
                     "deepseek_v3"):
        assert required in [line.split()[0] for line in lines]


def test_params_of_the_paper_1b_preset(capsys):
    assert main(["params", "--preset", "paper-1b"]) == 0
    counts = {k: int(v.replace(",", "")) for k, v in (line.split() for line in capsys.readouterr().out.splitlines())}
    # 1 dense + 9 MoE layers, d 1024, 2 shared + 64 routed experts of width 512, top-6, 32K vocab untied
    per_expert = 3 * 1024 * 512
    assert counts["total"] - counts["activated"] == 9 * (64 - 6) * per_expert
    assert counts["embedding"] == 2 * 32000 * 1024
    assert 0.9e9 < counts["total_non_embedding"] < 1.1e9  # "1B"


def test_sweep_runs_the_papers_ablations():
    assert _sweep_methods("update_rate") == ["loss_free_u1e-4", "loss_free_u1e-3", "loss_free_u1e-2"]
    assert _sweep_methods("aux_coeff") == ["aux_loss_1e-2", "aux_loss_1e-3", "aux_loss_1e-4", "aux_loss_0"]
    assert _sweep_methods("controller") == ["aux_loss", "loss_free_u1e-4", "loss_free",
                                            "loss_free_u1e-2", "loss_free_error", "loss_free_adaptive"]
    assert _sweep_methods("form") == ["loss_free_u1e-3", "loss_free_mult", "loss_free_adaptive",
                                      "loss_free_adaptive_mult"]
    everything = _sweep_methods("all")
    # each recipe once: aux_loss == aux_loss_1e-3 and loss_free == loss_free_u1e-3
    assert len(everything) == len(set(everything)) == 11
    assert "aux_loss" not in everything and "loss_free_u1e-3" not in everything  # first name kept


def test_flags_are_typed_against_the_config_fields():
    args = build_parser().parse_args(["compare", "--out", "o", "--methods", "aux_loss,loss_free", "--seeds", "0,1",
                                      "--lr", "2e-3", "--max-train-tokens", "none", "--data", "mixed"])
    assert args.methods == ["aux_loss", "loss_free"] and args.seeds == [0, 1]
    assert args.lr == 2e-3 and args.max_train_tokens is None and args.data == "mixed"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "o", "--lr", "fast"])


def test_none_overrides_a_preset_value_and_absent_flags_keep_it():
    from moe_balance.cli import _config_from_args

    parser = build_parser()
    kept = _config_from_args(parser.parse_args(["train", "--out", "o", "--preset", "tiny"]))
    assert kept.max_train_tokens == 200_000 and kept.steps == 20
    cleared = _config_from_args(parser.parse_args(["train", "--out", "o", "--preset", "tiny",
                                                   "--max-train-tokens", "none", "--steps", "7"]))
    assert cleared.max_train_tokens is None and cleared.steps == 7
