"""Drop ``moe_balance.MoE`` into your own PyTorch model and balance it without an aux loss.

What it shows: a 2-block transformer written here, whose FFN is a ``MoE`` layer with the
paper's Loss-Free bias (Wang et al. 2024, arXiv 2408.15664). The synthetic tokens follow a
Zipf law, so a few frequent tokens pull their experts' load up. ``register_balancer_update``
moves the bias after every ``optimizer.step()``; MaxVio_batch (the busiest expert's load over
the mean, minus 1, averaged over layers) is printed at the start and the end, and for the same
model trained with no balancer.

Run it:  python examples/drop_in_layer.py [--steps 300] [--json]
"""

import argparse
import json

import torch
from torch import nn

from moe_balance import LossFree, MoE, MoEConfig, max_vio, register_balancer_update

VOCAB, D, SEQ, BATCH, EXPERTS, TOP_K = 64, 32, 32, 16, 8, 2


class Block(nn.Module):
    """Pre-norm causal self-attention, then the MoE layer where the FFN would be."""

    def __init__(self, moe_config: MoEConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, num_heads=4, batch_first=True)
        self.moe = MoE(moe_config)  # was: nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, h):
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        out = self.moe(self.norm2(h))  # MoEOutput: y, aux_loss, decision (which experts, how many tokens)
        return h + out.y, out.decision.routed_tokens_per_expert


class TinyLM(nn.Module):
    def __init__(self, moe_config: MoEConfig):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(moe_config), Block(moe_config)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        h, loads = self.emb(tokens), []
        for block in self.blocks:
            h, load_E = block(h)
            loads.append(load_E)
        return self.head(h), torch.stack(loads)  # logits, (layers, experts) token counts


def batch(generator):
    """Zipf-distributed tokens; the task: predict the next token of (t * 5 + 3) mod VOCAB."""
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float)
    first = torch.multinomial(zipf, BATCH * SEQ, replacement=True, generator=generator).view(BATCH, SEQ)
    return first, (first * 5 + 3) % VOCAB


def run(steps: int, update_rate: float, seed: int = 0) -> tuple[float, float]:
    """Train a fresh model; returns MaxVio_batch on a fixed batch before and after training."""
    balancers = (LossFree(update_rate=update_rate),) if update_rate else ()
    config = MoEConfig(d_model=D, num_experts=EXPERTS, top_k=TOP_K, expert_hidden_size=2 * D,
                       balancers=balancers)
    torch.manual_seed(seed)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    register_balancer_update(optimizer, model)  # the bias moves after every optimizer.step()
    probe = batch(torch.Generator().manual_seed(1234))  # a fixed batch to measure balance on

    def maxvio_batch() -> float:
        model.eval()
        with torch.no_grad():  # eval forwards never count towards the bias update
            loads_LE = model(probe[0])[1]
        model.train()
        return float(max_vio(loads_LE).mean())

    start, data = maxvio_batch(), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(data)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()  # the routed counts are recorded here, once per training forward
        optimizer.step()
    return start, maxvio_batch()


def main(steps: int = 300, update_rate: float = 1e-3) -> dict:
    start, end = run(steps, update_rate)
    _, end_without = run(steps, update_rate=0.0)
    print(f"MaxVio_batch with Loss-Free (u={update_rate}): {start:.3f} at step 0 -> {end:.3f} at step {steps}")
    print(f"MaxVio_batch with no balancer:              {start:.3f} at step 0 -> {end_without:.3f} at step {steps}")
    return {"steps": steps, "update_rate": update_rate, "maxvio_start": start, "maxvio_end": end,
            "maxvio_end_no_balancer": end_without}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--update-rate", type=float, default=1e-3, help="u, the bias step (the paper's 1e-3)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args()
    result = main(args.steps, args.update_rate)
    if args.json:
        print(json.dumps(result))
