"""moe-balance batch-trend: MaxVio over growing computation batches of a run's validation windows."""

import json
import shutil

import numpy as np
import pytest
import torch

from corpora import GREEK, write_two_domain_corpus
from moe_balance.harness.batch_trend import batch_trend, default_sizes, load_run, trend, window_loads
from moe_balance.harness.cli import main
from moe_balance.harness.data import prepare_corpus
from moe_balance.harness.sampling import eval_windows
from moe_balance.harness.train import train, train_config



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny finished runs, as compare lays them out: loss_free s0 and s1, aux_loss s0,
    on a two-domain corpus (so evaluation routes each batch domain by domain)."""
    corpus = write_two_domain_corpus(tmp_path_factory.mktemp("corpus"), words=GREEK[:16])
    base = train_config("tiny", data=str(corpus), vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("cache")),
                        steps=20, checkpoint_every=0, eval_tokens=2048, max_train_tokens=None)
    root = tmp_path_factory.mktemp("runs")
    for method, seed in (("loss_free", 0), ("loss_free", 1), ("aux_loss", 0)):
        train(base.__class__(**{**base.__dict__, "method": method, "seed": seed}), root / f"{method}_s{seed}",
              progress=False)
    return root


def loads_of(run_dir):
    cfg, model = load_run(run_dir)
    corpus = prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                            val_fraction=cfg.val_fraction, progress=False)
    return cfg, model, corpus, window_loads(model, cfg, corpus)


def test_all_windows_in_one_batch_is_the_runs_maxvio_global(runs):
    result = batch_trend(runs, ["loss_free", "aux_loss"])
    assert result["windows"] == 64 and result["seq_len"] == 32
    assert result["sizes"] == [1, 2, 4, 8, 16, 32, 64] and result["tokens"][-1] == 2048
    for name, run in result["runs"].items():
        evaluated = json.loads((runs / name / "eval.json").read_text())
        assert run["maxvio"][-1] == evaluated["maxvio_global"]  # the same tokens, the same counts
        # windows hold equal token counts and a batch of 2N is two batches of N of the same order,
        # so MaxVio can only fall (max of a sum <= sum of the maxes) as the batch doubles
        assert all(b <= a + 1e-12 for a, b in zip(run["maxvio"], run["maxvio"][1:])), run["maxvio"]


def test_each_windows_loads_are_those_of_its_own_forward(runs):
    cfg, model, corpus, loads = loads_of(runs / "loss_free_s0")
    windows = torch.cat([t for t, _ in eval_windows(corpus.val, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens,
                                                   batch_size=cfg.eval_batch_size)])
    assert loads.shape == (len(windows), 1, 8)  # tiny: one dense block, then one MoE layer of 8 experts
    assert (loads.sum(-1) == cfg.seq_len * 2).all()  # top-2: every token routed twice
    with torch.no_grad():
        for w in range(len(windows)):  # an independent count: the model's own layer_loads, window alone
            alone = torch.stack(model(windows[w:w + 1, :-1]).layer_loads)
            assert torch.equal(loads[w], alone), w


def test_batches_of_one_window_average_each_windows_maxvio(runs):
    *_, loads = loads_of(runs / "aux_loss_s0")
    by_hand = []
    for w in range(len(loads)):
        per_layer = [(max(layer) - np.mean(layer)) / np.mean(layer) for layer in loads[w].tolist()]
        by_hand.append(np.mean(per_layer))
    for seed in (0, 1):  # the order does not matter for N = 1 or N = all windows
        one, everything = trend(loads, [1, len(loads)], seed)
        assert one == pytest.approx(np.mean(by_hand), rel=1e-12)
        total = loads.sum(0).double()
        assert everything == pytest.approx(float(((total.amax(-1) - total.mean(-1)) / total.mean(-1)).mean()), rel=1e-12)


def test_constructed_routing():
    E, S, W = 4, 10, 16
    balanced = torch.full((W, 2, E), S)  # a router that gives every expert the same tokens
    assert trend(balanced, default_sizes(W)) == [0.0] * 5
    # window w sends all its tokens to expert w % E: alone maximally skewed, together even
    one_hot = torch.zeros(W, 1, E, dtype=torch.int64)
    one_hot[torch.arange(W), 0, torch.arange(W) % E] = S
    values = trend(one_hot, [1, 2, 4, 8, 16])
    assert values[0] == E - 1 and values[-1] == 0.0
    assert all(E - 1 >= a >= b >= 0 for a, b in zip(values, values[1:]))
    # pairs: the same expert twice gives E - 1, two different experts (2S vs mean 2S/E) gives 1
    pairs = one_hot[torch.randperm(W, generator=torch.Generator().manual_seed(0))].view(8, 2, E)
    same = (pairs.argmax(-1)[:, 0] == pairs.argmax(-1)[:, 1]).double()
    assert values[1] == pytest.approx(float((same * (E - 1) + (1 - same) * 1).mean()))
    with pytest.raises(ValueError, match=r"computation batch size 32 must be an integer in \[1, 16\]"):
        trend(one_hot, [1, 32])


def test_command_writes_json_plot_and_table(runs, tmp_path, capsys):
    out = tmp_path / "trend"
    assert main(["batch-trend", str(runs), "--methods", "loss_free,aux_loss", "--sizes", "1,4,64",
                 "--out", str(out)]) == 0
    result = json.loads((out / "batch_trend.json").read_text())
    assert result["command"].startswith("moe-balance batch-trend ") and result["sizes"] == [1, 4, 64]
    lf = [result["runs"][f"loss_free_s{s}"]["maxvio"] for s in (0, 1)]
    assert result["methods"]["loss_free"]["seeds"] == [0, 1]
    assert result["methods"]["loss_free"]["mean"] == pytest.approx(np.mean(lf, 0).tolist())
    assert result["methods"]["loss_free"]["std"] == pytest.approx(np.std(lf, 0, ddof=1).tolist())
    assert result["methods"]["aux_loss"]["std"] == [0.0, 0.0, 0.0]  # one seed
    assert (out / "batch_trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| windows | tokens | loss_free MaxVio | aux_loss MaxVio |" in printed
    mean, std = result["methods"]["aux_loss"]["mean"][2], result["methods"]["aux_loss"]["std"][2]
    assert "| 64 | 2,048 | " in printed and f"{mean:.3f} ± {std:.3f} |" in printed


def test_bad_input_is_one_clear_line(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs / "loss_free_s0", broken / "loss_free_s0", ignore=shutil.ignore_patterns("model.safetensors"))
    assert main(["batch-trend", str(broken), "--methods", "loss_free", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moe-balance: error: no model.safetensors in the run directory")
    assert str(broken / "loss_free_s0") in err
    with pytest.raises(SystemExit) as exit_:
        main(["batch-trend", str(runs), "--methods", "loss_fre", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"moe-balance: error: no runs {runs}/loss_fre_s<seed>; methods there: aux_loss, loss_free"
    with pytest.raises(SystemExit):
        main(["batch-trend", str(runs), "--methods", "loss_free", "--sizes", "1,128", "--out", str(tmp_path / "o")])
    assert "computation batch size 128 must be an integer in [1, 64]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch-trend", str(runs), "--methods", "loss_free", "--sizes", "0,2", "--out", str(tmp_path / "o")])
    assert "expected distinct ascending integers >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
