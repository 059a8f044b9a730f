"""--device on a machine without a GPU: what "auto" means, the errors for "cuda", and that the
device is not part of what a resumed run must match (the GPU behaviour is tests/test_cuda.py)."""

import dataclasses
import json

import pytest
import torch

from corpora import write_two_domain_corpus
from moe_balance import parallel as par
from moe_balance.harness.cli import main
from moe_balance.harness.data import prepare_corpus
from moe_balance.harness.train import TrainConfig, run_device, train, train_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    corpus = write_two_domain_corpus(tmp_path_factory.mktemp("corpus"))
    return train_config("tiny", data=str(corpus), vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("cache")),
                        steps=8, checkpoint_every=4, eval_tokens=1024, max_train_tokens=None)


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_naming_the_way_out(base):
    assert run_device(base) == torch.device("cpu")  # base.device is "auto"
    assert run_device(dataclasses.replace(base, device="cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="no usable CUDA device.*pass --device cpu"):
        run_device(dataclasses.replace(base, device="cuda"))
    with pytest.raises(ValueError, match=r"TrainConfig.device='tpu' is not allowed; choose one of \('auto', 'cpu', 'cuda'\)"):
        TrainConfig(device="tpu")


def test_cli_device_cuda_without_a_gpu_is_one_line(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "run"), "--data", base.data,
              "--vocab-size", "300", "--cache-dir", base.cache_dir])
    assert stop.value.code == 2
    assert "TrainConfig.device='cuda' but this machine has no usable CUDA device" in capsys.readouterr().err


def test_launch_validates_the_device_and_wants_a_gpu_per_process(monkeypatch):
    with pytest.raises(ValueError, match="device='gpu' is not allowed; choose 'auto', 'cpu' or 'cuda'"):
        par.launch(1, device="gpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="device='cuda' needs a GPU per process: process LOCAL_RANK=1, GPUs here: 0"):
        par.launch(1, device="cuda")


def test_a_run_resumes_with_another_device_setting_and_continues_exactly(base, tmp_path):
    corpus = prepare_corpus(base.data, vocab_size=base.vocab_size, cache_dir=base.cache_dir,
                            val_fraction=base.val_fraction, progress=False)
    train(base, tmp_path / "full", corpus=corpus, progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(step, record):
        if step == 4:  # after the step-4 checkpoint
            raise Stop

    with pytest.raises(Stop):
        train(base, tmp_path / "split", corpus=corpus, progress=False, on_step=stop_at_4)
    train(dataclasses.replace(base, device="cpu"), tmp_path / "split", corpus=corpus, progress=False, resume=True)
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full, split = read("full"), read("split")
    assert [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(full, split):
        assert (a["loss"], a["bias"]) == (b["loss"], b["bias"]), a["step"]


def test_bench_device_cuda_without_a_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--device", "cuda", "--shape", "16,8,4,2", "--rounds", "1"])
    assert stop.value.code == 2
    assert "bench --device cuda: this machine has no usable CUDA device; pass --device cpu" in capsys.readouterr().err
