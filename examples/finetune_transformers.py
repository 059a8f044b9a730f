"""Fine-tune a transformers MoE model (Mixtral) with Loss-Free balancing, then save it.

What it shows: ``enable_loss_free`` gives every router of a transformers model a float32
selection bias (Wang et al. 2024, arXiv 2408.15664); ``update_balancers`` moves it after each
optimizer step; ``record_loads`` measures the expert loads (MaxVio over fixed validation
windows) before and after; ``save_pretrained`` writes the bias as
``<router>.e_score_correction_bias``, and ``enable_loss_free(..., bias_from=dir)`` routes with
it again after loading. The model is a tiny random Mixtral built from its config (nothing is
downloaded); the data are the bytes of a few Python standard library files.

Run it:  python examples/finetune_transformers.py [--steps 100] [--out DIR] [--json]
"""

import argparse
import json
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.utils import logging

from moe_balance import max_vio, update_balancers
from moe_balance.integrations.transformers import enable_loss_free, loss_free_routers, record_loads

SEQ, BATCH = 64, 8
STDLIB = Path(textwrap.__file__).parent  # byte-level tokens: vocabulary 256
TRAIN_FILES, VAL_FILE = ("textwrap.py", "argparse.py", "dataclasses.py"), "shlex.py"


def tokens(name: str) -> torch.Tensor:
    return torch.tensor(list((STDLIB / name).read_bytes()), dtype=torch.long)


def maxvio(model, windows_BS) -> float:
    """MaxVio over all the windows at once (mean over layers), measured in eval mode."""
    model.eval()
    with torch.no_grad(), record_loads(model) as loads:
        model(windows_BS)
    model.train()
    return float(max_vio(torch.stack(loads)).mean())


def finetune(steps: int, update_rate: float, seed: int = 0):
    """A fresh tiny Mixtral with Loss-Free enabled, fine-tuned ``steps`` AdamW steps; returns
    (model, MaxVio before, MaxVio after, last loss)."""
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=SEQ)
    model = enable_loss_free(MixtralForCausalLM(config), update_rate=update_rate)
    train = torch.cat([tokens(f) for f in TRAIN_FILES])
    val = tokens(VAL_FILE)
    val_BS = val[: len(val) // SEQ * SEQ].view(-1, SEQ)[:64]  # fixed validation windows
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(seed)

    before = maxvio(model, val_BS)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - SEQ, (BATCH,), generator=data)
        x_BS = torch.stack([train[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=x_BS, labels=x_BS).loss  # transformers shifts the labels itself
        optimizer.zero_grad()
        loss.backward()  # the routed counts are recorded here, once per training forward
        optimizer.step()
        update_balancers(model)  # after every optimizer step (with the Trainer: LossFreeCallback)
    return model, before, maxvio(model, val_BS), loss.item()


def main(steps: int = 100, out: str | None = None, update_rate: float = 1e-3, seed: int = 0) -> dict:
    model, before, after, loss = finetune(steps, update_rate, seed)
    _, _, after_frozen, _ = finetune(steps, 0.0, seed)  # the same run with the bias frozen at 0
    biases = [r.e_score_correction_bias.clone() for r in loss_free_routers(model)]

    out = Path(out or tempfile.mkdtemp(prefix="mixtral_loss_free_"))
    model.save_pretrained(out)
    saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()
             if k.endswith("e_score_correction_bias")}
    # plain transformers loads the directory but has nowhere to keep a Mixtral bias (it calls
    # the key unexpected); bias_from= reads it from the files and routes with it again
    reloaded = enable_loss_free(MixtralForCausalLM.from_pretrained(out), bias_from=str(out))
    reloaded_biases = [r.e_score_correction_bias for r in loss_free_routers(reloaded)]

    print(f"fine-tuned {steps} steps, last loss {loss:.3f}")
    print(f"MaxVio on the validation windows: {before:.3f} before -> {after:.3f} after "
          f"({after_frozen:.3f} with the bias frozen)")
    print(f"saved to {out}:")
    for key, bias in saved.items():
        print(f"  {key}  {bias.dtype}  [{bias.min():+.4f}, {bias.max():+.4f}]")
    print("reloaded with bias_from=: the same biases:", all(map(torch.equal, reloaded_biases, biases)))
    return {"steps": steps, "maxvio_before": before, "maxvio_after": after, "maxvio_after_frozen_bias": after_frozen,
            "out": str(out), "saved_bias": {k: {"dtype": str(v.dtype), "values": v.tolist()} for k, v in saved.items()},
            "trained_bias": [b.tolist() for b in biases], "reloaded_bias": [b.tolist() for b in reloaded_biases]}


if __name__ == "__main__":
    logging.set_verbosity_error()  # no load report
    logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="save_pretrained directory (default: a new temporary one)")
    parser.add_argument("--update-rate", type=float, default=1e-3, help="u, the bias step (the paper's 1e-3)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args()
    result = main(args.steps, args.out, args.update_rate)
    if args.json:
        print(json.dumps(result))
