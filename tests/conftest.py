"""The suite's one rule about devices: a test runs on the CPU unless it is marked ``cuda``.

The CPU is the tested reference (bit-exact comparisons, gloo process groups, the compatibility
fixture), so on a machine with a GPU every other test must not reach it, however it runs:

- this process opens its CUDA context now (when there is a GPU), then sets
  ``CUDA_VISIBLE_DEVICES=""``: every process a test starts (torchrun, scripts) sees no GPU,
  while this one keeps the context it opened;
- ``torch.cuda.is_available()`` answers False here (so ``--device auto`` means the CPU), except
  inside the tests marked ``cuda`` (tests/test_cuda.py), which see the GPU, and skip with a
  reason where there is none. Their subprocesses take the ``gpu_env`` fixture's environment.
"""

import os

import pytest
import torch

_GPU_ENV = {k: v for k, v in os.environ.items()}  # what the processes of a cuda test get
_cuda_is_available = torch.cuda.is_available
HAS_CUDA = _cuda_is_available()
if HAS_CUDA:
    torch.cuda.init()  # before hiding the GPU: this process keeps it, its children do not
# for the test modules (importing this file again would re-run it): how many GPUs the cuda tests have
os.environ["MOE_BALANCE_TEST_GPUS"] = str(torch.cuda.device_count() if HAS_CUDA else 0)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
torch.cuda.is_available = lambda: False


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; runs on it (skipped with a reason without one)")


@pytest.fixture(autouse=True)
def _gpu_for_cuda_tests_only(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is not None:
        monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)


@pytest.fixture
def gpu_env():
    """The environment for a process a ``cuda`` test starts: the GPU visible again."""
    return {**_GPU_ENV, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
