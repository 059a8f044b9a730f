"""Counting the experts routers choose while a block runs, for the integrations' held-out loads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def recording_loads(routers: list) -> Iterator[list[torch.Tensor]]:
    """Give each router (one with ``num_experts``, a ``balancer`` and a ``recorded_loads``
    slot its forward adds to) a zero counter for the block; yields a list filled on exit with
    each router's (E,) int64 loads, on the CPU."""
    for r in routers:
        r.recorded_loads = torch.zeros(r.num_experts, dtype=torch.int64, device=r.balancer.expert_bias.device)
    loads: list[torch.Tensor] = []
    try:
        yield loads
    finally:
        loads.extend(r.recorded_loads.cpu() for r in routers)
        for r in routers:
            r.recorded_loads = None
