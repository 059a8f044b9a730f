"""Two processes, experts sharded between them, one Loss-Free bias: the single process's.

What it shows: ``moe_balance.parallel`` on gloo (CPU). Each process builds the same model
(same seed), ``parallelize`` keeps half of every MoE layer's experts on each process and
routes tokens to them with all-to-all; each process trains on its half of every global batch;
``sync_gradients`` makes the gradients the global batch's, and ``update_balancers`` sums the
expert counts over both processes before moving the bias (the paper's computation batch,
Wang et al. 2024, arXiv 2408.15664, sec. 5.1). Rank 0 then checks that the bias is identical
on both ranks and equal to what one process computes on the whole global batch with an
unsharded copy of the model, and shows that counting its own half alone would differ.

Run it:  torchrun --standalone --nproc_per_node=2 examples/two_processes.py [--steps 5] [--json]
"""

import argparse
import copy
import datetime
import json

import torch
import torch.distributed as dist
from torch import nn

from moe_balance import LossFree, MoE, MoEConfig, update_balancers
from moe_balance.parallel import init_parallel, parallelize, shutdown, sync_gradients

D, BATCH, SEQ = 16, 8, 16  # the global batch: BATCH sequences, split by sequence over the ranks
CONFIG = MoEConfig(d_model=D, num_experts=8, top_k=2, expert_hidden_size=32, balancers=(LossFree(update_rate=1e-3),))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(D, D), MoE(CONFIG), nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h).y).squeeze(-1)


def global_batch(step: int):
    """The same on every rank: skewed inputs (some experts are favoured) and targets."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, SEQ, D, generator=g) + torch.linspace(-1, 2, D)
    return x, x.sum(-1).sin()


def train(model, steps: int, rows=slice(None), groups=None) -> torch.Tensor:
    """SGD on rows of every global batch; returns the first MoE layer's bias. (SGD, not Adam:
    Adam turns gradient differences at rounding level into full-size steps.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = global_batch(step)
        loss = (model(x[rows]) - y[rows]).square().mean()  # the mean over this rank's tokens
        optimizer.zero_grad()
        loss.backward()
        if groups is not None:
            sync_gradients(model, groups)  # dense grads averaged, expert grads summed, over ranks
        optimizer.step()
        update_balancers(model)  # counts summed over the data group: one bias on every rank
    return model.moe.expert_bias.clone()


def main(steps: int = 5) -> dict | None:
    timeout = datetime.timedelta(minutes=2)
    dist.init_process_group("gloo", timeout=timeout)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = init_parallel(expert_parallel=world, timeout=timeout)
    torch.manual_seed(0)
    model = Model()
    single = copy.deepcopy(model) if rank == 0 else None  # unsharded copy, same initial weights
    half = copy.deepcopy(model) if rank == 0 else None
    parallelize(model, groups)
    print(f"rank {rank}: {model.moe.experts.w_up.shape[0]} of {CONFIG.num_experts} experts")
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    bias = train(model, steps, share, groups)

    gathered = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(gathered, bias)
    result = None
    if rank == 0:
        reference = train(single, steps)  # one process, the whole global batch
        local = train(half, steps, share)  # one process, rank 0's half only
        result = {"steps": steps, "bias_per_rank": [b.tolist() for b in gathered],
                  "single_process_bias": reference.tolist(), "own_half_bias": local.tolist(),
                  "max_diff_between_ranks": max(float((b - gathered[0]).abs().max()) for b in gathered),
                  "max_diff_to_single_process": float((gathered[0] - reference).abs().max()),
                  "max_diff_to_own_half": float((gathered[0] - local).abs().max())}
        print(f"bias after {steps} steps, rank 0: {[round(v, 4) for v in gathered[0].tolist()]}")
        print(f"identical on all {world} ranks: {result['max_diff_between_ranks'] == 0}")
        print(f"max |difference| to one process on the global batch: {result['max_diff_to_single_process']:.2g}")
        print(f"max |difference| to counting rank 0's half alone:   {result['max_diff_to_own_half']:.2g}")
    del model, bias, gathered
    shutdown()  # gloo: drop the references to the model before destroying the group
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="rank 0 also prints the numbers as one JSON line")
    args = parser.parse_args()
    result = main(args.steps)
    if args.json and result is not None:
        print(json.dumps(result))
