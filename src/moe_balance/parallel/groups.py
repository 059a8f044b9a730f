"""The process groups of a parallel layout, and the collectives the harness needs around them."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one parallel layout (see the module docstring).

    data: every rank (tokens differ on each); expert: this rank's expert-parallel group;
    expert_data: the ranks that hold the same experts as this one.

    mesh: the same layout as a ``DeviceMesh`` of shape (W/ep, ep) with dimensions
    ``("expert_data", "expert")`` (rank r at row r // ep, column r % ep), for what takes a mesh
    (FSDP2's ``fully_shard``, DTensor); ``mesh.get_group("expert")`` is ``expert``.
    data_mesh: the 1-D mesh ``("data",)`` over every rank (``data``).
    """

    data: dist.ProcessGroup
    expert: dist.ProcessGroup
    expert_data: dist.ProcessGroup
    mesh: DeviceMesh | None = None
    data_mesh: DeviceMesh | None = None

    @property
    def data_size(self) -> int:
        return dist.get_world_size(self.data)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.expert)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.expert)

    @property
    def data_rank(self) -> int:
        return dist.get_rank(self.data)


def init_parallel(expert_parallel: int = 1, timeout: datetime.timedelta | None = None,
                  device_type: str = "cpu") -> ParallelGroups:
    """Build the groups for ``expert_parallel`` ranks per expert-parallel group over the
    initialised world (``torch.distributed.init_process_group`` first). Collective: every rank
    calls it, in the same order.

    device_type: the meshes' device, "cpu" (gloo) or "cuda" (nccl).
    timeout: how long a collective of the new groups waits for a lost rank before failing;
    pass the one given to ``init_process_group`` (new groups do not inherit it: None is
    torch's default, 30 minutes on gloo).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_parallel needs torch.distributed initialised: call "
                           "torch.distributed.init_process_group first (torchrun sets the environment)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not (isinstance(expert_parallel, int) and expert_parallel >= 1 and world % expert_parallel == 0):
        raise ValueError(f"expert_parallel={expert_parallel!r} must be a positive divisor of the world "
                         f"size {world}")
    expert = expert_data = None
    for first in range(0, world, expert_parallel):  # new_group is collective: every rank makes every group
        group = dist.new_group(list(range(first, first + expert_parallel)), timeout=timeout)
        if first <= rank < first + expert_parallel:
            expert = group
    for offset in range(expert_parallel):
        group = dist.new_group(list(range(offset, world, expert_parallel)), timeout=timeout)
        if rank % expert_parallel == offset:
            expert_data = group
    # NOTE: the meshes wrap the groups made above rather than making their own, because
    # DeviceMesh's groups would not carry the timeout (a lost rank would hang for 30 minutes)
    layout = torch.arange(world).view(world // expert_parallel, expert_parallel)
    mesh = DeviceMesh.from_group([expert_data, expert], device_type, mesh=layout,
                                 mesh_dim_names=("expert_data", "expert"))
    data_mesh = DeviceMesh.from_group(dist.group.WORLD, device_type, mesh_dim_names=("data",))
    return ParallelGroups(data=dist.group.WORLD, expert=expert, expert_data=expert_data, mesh=mesh,
                          data_mesh=data_mesh)


def launch(expert_parallel: int = 1, timeout_seconds: float = 600.0, device: str = "cpu") -> ParallelGroups | None:
    """For the command line: join the processes torchrun started (its environment variables:
    WORLD_SIZE, RANK, MASTER_ADDR, ...) and build the groups; None for a single process
    without ``expert_parallel``. A collective that waits longer than ``timeout_seconds`` for a
    lost rank fails with an error instead of hanging.

    device: "cpu" (gloo), "cuda" (each process takes the GPU of its LOCAL_RANK; CUDA tensors go
    over nccl, CPU tensors over gloo) or "auto" (cuda when available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (isinstance(expert_parallel, int) and expert_parallel >= 1):
        raise ValueError(f"--expert-parallel {expert_parallel!r} must be an integer >= 1")
    if not (timeout_seconds > 0):
        raise ValueError(f"--dist-timeout {timeout_seconds!r} must be a number of seconds > 0")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is not allowed; choose 'auto', 'cpu' or 'cuda'")
    if world == 1 and expert_parallel == 1:
        return None
    if world % expert_parallel:
        hint = (f"launch {expert_parallel} processes: torchrun --nproc_per_node={expert_parallel} -m moe_balance ..."
                if world == 1 else f"choose a divisor of {world}")
        raise ValueError(f"--expert-parallel {expert_parallel} needs a multiple of {expert_parallel} processes; "
                         f"there are {world}: {hint}")
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if device == "cpu" or not (device == "cuda" or torch.cuda.is_available()):
        dist.init_process_group("gloo", timeout=timeout)
        return init_parallel(expert_parallel, timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise ValueError(f"device='cuda' needs a GPU per process: process LOCAL_RANK={local_rank}, GPUs here: "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    torch.cuda.set_device(local_rank)
    # NOTE: both backends: the layer's collectives carry CUDA tensors (nccl), the harness's small
    # metric and object exchanges CPU ones (gloo), as torchtitan does
    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    return init_parallel(expert_parallel, timeout, device_type="cuda")


def shutdown() -> None:
    """Collect garbage, then destroy the process group. Drop your references to the model and
    its outputs first: on gloo (torch 2.13) a process can abort at exit when an all-to-all's
    tensors outlive the group."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_first(obj, groups: ParallelGroups):
    """Rank 0's ``obj`` (any picklable object) on every rank of the data group. Collective."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.data, 0), group=groups.data)
    return box[0]


def sum_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """A copy of ``t`` summed over the data group. Collective."""
    total = t.clone()
    dist.all_reduce(total, group=groups.data)
    return total

