"""Helpers for testing MoE code on a CPU: run a function on N gloo processes.

For library users as much as for our own tests: expert parallelism and data-parallel counts
are only trustworthy when checked on real ``torch.distributed`` processes against one
process. ``spawn(fn, world)`` runs ``fn(rank, world, port, results, *args)`` in ``world``
fresh processes and returns what each rank put in ``results`` (a shared dict); inside ``fn``,
``init_gloo(rank, world, port)`` joins the process group on the loopback interface.

    def worker(rank, world, port, results):
        init_gloo(rank, world, port)
        try:
            ...  # build the layer, parallelize it, train a step
            results[rank] = layer.expert_bias.clone()
        finally:
            dist.destroy_process_group()

    biases = spawn(worker, 2)   # {0: tensor, 1: tensor}
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int, timeout: float = 60.0) -> None:
    """Join a gloo process group of ``world`` ranks on 127.0.0.1:``port``; a collective that
    waits longer than ``timeout`` seconds for another rank fails instead of hanging."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def spawn(fn: Callable, world: int, *args) -> dict:
    """Run ``fn(rank, world, port, results, *args)`` on ``world`` spawned processes and return
    ``results`` as a plain dict (what the ranks stored in it). ``fn`` must be importable (a
    module-level function), as for ``torch.multiprocessing.spawn``; an exception on any rank
    is raised here."""
    results = mp.Manager().dict()
    mp.spawn(fn, args=(world, free_port(), results, *args), nprocs=world, join=True)
    return dict(results)
