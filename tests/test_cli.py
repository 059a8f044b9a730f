"""CLI commands that need no training: methods, params, sweep composition, typed flags."""

import pytest

from moe_balance.harness.cli import _sweep_methods, build_parser, main
from moe_balance.harness.methods import list_methods


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == [m.name for m in list_methods()]
    for required in ("no_balance", "aux_loss", "aux_loss_1e-2", "seq_aux", "global_aux", "loss_free",
                     "deepseek_v3", "expert_choice", "top_p", "top_p_loss_free", "moge", "moge_loss_free",
                     "moe_plus_plus", "moe_plus_plus_loss_free", "hmoe", "hmoe_loss_free"):
        assert required in names
    # each method's paper, on the line under it
    references = {name: line.split("reference: ", 1)[1]
                  for name, line in zip(lines, lines[1:]) if line.lstrip().startswith("reference: ")}
    references = {name.split()[0]: ref for name, ref in references.items()}
    assert "arXiv 2202.09368" in references["expert_choice"]
    assert "arXiv 2403.07652" in references["top_p"] and "arXiv 2408.15664" in references["top_p_loss_free"]
    assert "arXiv 2505.21411" in references["moge"]
    assert set(references) == set(names)


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
                                            "loss_free_u1e-2", "loss_free_error", "loss_free_adaptive",
                                            "loss_free_adaptive_nohold", "loss_free_adaptive_s09"]
    assert _sweep_methods("form") == ["loss_free_u1e-3", "loss_free_mult", "loss_free_adaptive",
                                      "loss_free_adaptive_mult"]
    assert _sweep_methods("routers") == ["aux_loss", "loss_free_adaptive", "expert_choice", "top_p",
                                         "top_p_loss_free", "moge", "moge_loss_free"]
    assert _sweep_methods("experts") == ["loss_free", "loss_free_adaptive", "moe_plus_plus", "moe_plus_plus_loss_free",
                                         "hmoe", "hmoe_loss_free"]
    everything = _sweep_methods("all")
    # each recipe once: aux_loss == aux_loss_1e-3 and loss_free == loss_free_u1e-3
    assert len(everything) == len(set(everything)) == 22
    assert "aux_loss" not in everything and "loss_free_u1e-3" not in everything  # first name kept


def test_flags_are_typed_against_the_config_fields():
    args = build_parser().parse_args(["compare", "--out", "o", "--methods", "aux_loss,loss_free", "--seeds", "0,1",
                                      "--lr", "2e-3", "--max-train-tokens", "none", "--data", "mixed"])
    assert args.methods == ["aux_loss", "loss_free"] and args.seeds == [0, 1]
    assert args.lr == 2e-3 and args.max_train_tokens is None and args.data == "mixed"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "o", "--lr", "fast"])


def test_none_overrides_a_preset_value_and_absent_flags_keep_it():
    from moe_balance.harness.cli import _config_from_args

    parser = build_parser()
    kept = _config_from_args(parser.parse_args(["train", "--out", "o", "--preset", "tiny"]))
    assert kept.max_train_tokens == 200_000 and kept.steps == 20
    cleared = _config_from_args(parser.parse_args(["train", "--out", "o", "--preset", "tiny",
                                                   "--max-train-tokens", "none", "--steps", "7"]))
    assert cleared.max_train_tokens is None and cleared.steps == 7


# ------------------------------------------------------------------------------ ordinary mistakes

def test_ordinary_mistakes_give_one_line_not_a_traceback(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "tiny", "--out", str(a_file)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"the run directory {a_file} exists and is not a directory" in err and "Traceback" not in err

    # the cache directory is a file: the OS error in one line, exit 1
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--cache-dir", str(a_file)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("moe-balance: error: ") and str(a_file) in err
    assert "Traceback" not in err

    with pytest.raises(SystemExit) as info:
        main(["bench", "--rounds", "0"])
    assert info.value.code == 2 and "must be an integer >= 1, got 0" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    from moe_balance.harness._files import RunDirectoryError

    with pytest.raises(RunDirectoryError):
        main(["--debug", "train", "--preset", "tiny", "--out", str(a_file)])


def test_ctrl_c_says_where_training_stopped_and_how_to_continue(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"f{i}.txt").write_text(" ".join(f"word{j % 50}" for j in range(i, 3000 + i)))
    cmd = [sys.executable, "-m", "moe_balance.harness.cli", "train", "--preset", "tiny", "--out", str(out),
           "--data", str(corpus), "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache"),
           "--steps", "100000", "--checkpoint-every", "0", "--max-train-tokens", "none"]
    # SIG_DFL in the child: a shell's background job (e.g. `make test &`) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert step >= 3 and "continue with --resume" in err and "Traceback" not in err
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged[-1] == step  # the message names the last step that was logged


def test_missing_optional_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the train extra were not installed
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(" ".join(f"w{j % 40}" for j in range(i, 2000 + i)))
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(out), "--data", str(corpus),
                 "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("moe-balance: error: TensorBoard logging needs the `tensorboard` package, "
                           "which is not installed: pip install 'moe-balance[train]'")
    assert not out.exists()  # the failed run left no empty run directory behind


def test_import_error_from_a_library_names_the_extra_or_keeps_the_traceback():
    from moe_balance._optional import missing_dependency_message

    assert missing_dependency_message(ModuleNotFoundError("x", name="matplotlib.figure")) == (
        "the optional package `matplotlib` is not installed: pip install 'moe-balance[train]'")
    assert missing_dependency_message(ModuleNotFoundError("x", name="numpy")) is None  # a broken install


def test_failed_run_leaves_no_empty_directory_but_keeps_an_existing_one(tmp_path, capsys):
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--out", str(fresh), "--data", str(tmp_path / "missing")])
    assert "unknown data spec" in capsys.readouterr().err and not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--out", str(existing), "--data", str(tmp_path / "missing")])
    assert existing.is_dir()  # the user's directory is not ours to delete
