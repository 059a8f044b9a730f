"""torchtitan's own expert-bias update against this library's adaptive controller, on the same
tiny torchtitan-MoE language model (tests/torchtitan_models.py: torchtitan's MoE layers, 2 x 16
experts, top-2, d 64) and the same batches of the default corpus (the Python standard library,
BPE 2048). Prints MaxVio_batch over the second half of training per seed and mean ± std, and
writes them as JSON.

    .venv/bin/python scripts/torchtitan_balance.py --seeds 0,1,2 --steps 300 --out runs/torchtitan_balance.json
    .venv/bin/python scripts/torchtitan_balance.py --experts 64 --top-k 8 --lr 3e-3 --batch 64 --out runs/tt64.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from torchtitan_models import TinyTitan  # noqa: E402

from moe_balance import LossFree  # noqa: E402
from moe_balance.harness.data import prepare_corpus  # noqa: E402
from moe_balance.integrations.torchtitan import enable_balancing  # noqa: E402
from moe_balance.metrics import max_vio  # noqa: E402
from moe_balance.testing import free_port, init_gloo  # noqa: E402


EXPERTS, TOP_K, LR = 16, 2, 1e-3  # set from the command line


def run(name, seed, tokens, vocab, steps, batch, seq):
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.distributed.parallel_dims import ParallelDims

    torch.manual_seed(seed)
    model = TinyTitan(experts=(EXPERTS, EXPERTS), vocab=vocab, dim=64, top_k=TOP_K)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    register_moe_load_balancing_hook(optimizer, [model], ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1,
                                                                       ep=1, world_size=1))
    if name == "adaptive":
        enable_balancing(model, optimizer, spec=LossFree(rule="adaptive"))
    g = torch.Generator().manual_seed(100 + seed)
    vios, losses = [], []
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
        loss = model.loss(torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()]))
        loss.backward()
        counts = [blk.moe.router.balancer.pending_counts.clone() if name == "adaptive"
                  else blk.moe.tokens_per_expert_E.clone() for blk in model.layers.values()]
        vios.append(float(max_vio(torch.stack(counts)).mean()))
        losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return statistics.mean(vios[steps // 2:]), statistics.mean(losses[-20:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/torchtitan_balance.json")
    args = parser.parse_args()
    global EXPERTS, TOP_K, LR
    EXPERTS, TOP_K, LR = args.experts, args.top_k, args.lr
    corpus = prepare_corpus(None, vocab_size=2048, cache_dir=Path(".cache/moe_balance"), progress=False)
    tokens = torch.from_numpy(corpus.train.tokens.astype("int64"))
    init_gloo(0, 1, free_port())  # torchtitan's hook reads its "loss" mesh
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {name: {seed: run(name, seed, tokens, corpus.vocab_size, args.steps, args.batch, args.seq)
                     for seed in seeds} for name in ("torchtitan", "adaptive")}
    dist.destroy_process_group()
    for name, per_seed in result.items():
        vios = [v for v, _ in per_seed.values()]
        print(f"{name:>10}: MaxVio_batch (second half) {statistics.mean(vios):.3f} ± {statistics.stdev(vios):.3f} "
              f"seeds {[round(v, 3) for v in vios]}, final loss {statistics.mean(l for _, l in per_seed.values()):.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({k: {str(s): v for s, v in r.items()} for k, r in result.items()}, indent=1))


if __name__ == "__main__":
    main()
