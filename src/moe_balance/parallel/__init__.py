"""Expert and data parallelism on torch.distributed (gloo on CPU, NCCL on GPU).

Shape legend: A assignments (rows grouped by expert), D d_model, E experts, L local experts
(E / ep), R ranks of the expert-parallel group, T tokens.

The layout (Megatron-Core's and torchtitan's): W ranks each see different tokens (the *data*
group, all W ranks); they form W/ep expert-parallel groups of ep consecutive ranks, and each
rank of such a group holds L = E/ep consecutive experts (rank r holds experts r*L ... r*L+L-1).
Ranks that hold the same experts form an *expert-data* group (W/ep ranks). Nothing here takes
the default group implicitly: the groups are built once by ``init_parallel`` and handed to
``parallelize``, which stores them in the layers that use them.

    forward, per MoE layer:  route locally -> sort assignments by expert -> all-to-all the
    rows to their experts' ranks (split sizes exchanged first) -> local experts -> all-to-all
    back -> combine with the gates locally.

Gradients: every rank's loss is the mean over its own tokens, so the global loss is the mean
over the data group. A dense parameter's gradient is averaged over the data group; an expert's
gradient already sums every rank of its expert-parallel group (the all-to-all's backward brings
it home), so it is summed over the expert-data group and divided by the data group's size.
``sync_gradients`` does both; ``clip_grad_norm`` clips by the norm of all experts' gradients.

The balancers count over the data group (``LossFree`` counts and ``global_batch`` aux-loss
statistics are all-reduced over ``groups.data``), so every rank's bias stays identical and
equals a single process's bias for the same global batch.
"""

from .dcp import load_sharded, save_sharded
from .experts import ShardedSwiGLUExperts, expert_ranks, parallelize
from .fsdp import fully_shard_model, is_sharded
from .gradients import clip_grad_norm, sync_gradients
from .groups import ParallelGroups, broadcast_from_first, init_parallel, launch, shutdown, sum_over_ranks
from .metrics import crossing_assignments, device_loads, ranks_per_token, state_bytes
from .state import gather_optimizer_state, gather_state_dict, load_full_optimizer_state, load_full_state_dict

__all__ = ["ParallelGroups", "ShardedSwiGLUExperts", "broadcast_from_first", "clip_grad_norm",
           "crossing_assignments", "device_loads", "expert_ranks", "fully_shard_model", "gather_optimizer_state", "gather_state_dict",
           "init_parallel", "is_sharded", "launch", "load_full_optimizer_state", "load_full_state_dict", "load_sharded", "parallelize",
           "ranks_per_token", "save_sharded", "shutdown", "state_bytes", "sum_over_ranks", "sync_gradients"]
