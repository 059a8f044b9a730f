"""The suite's one rule about devices: a test runs on the CPU unless it is marked ``cuda``.

The CPU is the tested reference (bit-exact comparisons, gloo process groups, the compatibility
fixture), so on a machine with a GPU every other test hides it: this process's
``torch.cuda.is_available()`` answers False (``--device auto`` then means the CPU) and the
processes a test starts (torchrun) get ``CUDA_VISIBLE_DEVICES=""``. The ``cuda`` tests
(tests/test_cuda.py) see the GPU and skip, with a reason, where there is none.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; runs on it (skipped with a reason without one)")


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
