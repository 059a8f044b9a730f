"""The best response to the last batch: how balanced can a controller that sees only earlier
batches keep the quick preset's batches?

After every optimizer step this sets each layer's Loss-Free bias to the best single bias for
that step's own batch (``controller.solve_static_bias`` on the step's routing scores): the
bias that would have balanced the batch just seen. The bias used for a batch still depends
only on earlier batches, as the issue requires, so this is a causal controller, but one that
re-solves the whole assignment problem every step. Its MaxVio_batch is what is left when the
controller's only error is that the router moved during one optimizer step.

    python docs/results/controller/best_response.py --seeds 0,1,2 --out runs/best_response

Prints, per seed, MaxVio_batch over steps 1-50, 51-100, 101-150, 151-300 and the steps to
balance (the first step after which MaxVio_batch stays below 0.5 for 20 steps).
"""

import argparse
import json
from pathlib import Path

import torch

from moe_balance import balancing, controller
from moe_balance.harness.report import steps_to_balance
from moe_balance.harness.train import train, train_config

_stats, _update = balancing.LossFreeBalancer.routing_stats, balancing.LossFreeBalancer.update


def _record_scores(self, decision, router, fixed_bias_E=None):
    self._step_scores = getattr(self, "_step_scores", []) + [decision.scores.detach().cpu()]
    self._router = router
    return _stats(self, decision, router, fixed_bias_E)


def _best_response(self):
    scores_TE = torch.cat(self._step_scores)
    self._step_scores = []
    last = self.expert_bias.clone()
    _update(self)  # counts reset, num_updates advanced; its own bias change is replaced below
    best_E, _ = controller.solve_static_bias(scores_TE, self._router.top_k, initial_bias_E=last,
                                             router=self._router)
    self.expert_bias.copy_(best_E - best_E.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/best_response")
    args = parser.parse_args()
    balancing.LossFreeBalancer.routing_stats = _record_scores
    balancing.LossFreeBalancer.update = _best_response
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.out) / f"seed{seed}"
        # the adaptive method only for its histogram hook; its update is replaced
        cfg = train_config("quick", method="loss_free_adaptive", seed=seed, eval_tokens=4096, checkpoint_every=0)
        train(cfg, out, overwrite=True, progress=False)
        rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"maxvio_batch"' in line]
        steps, mv = [r["step"] for r in rows], [r["maxvio_batch"] for r in rows]
        windows = {f"{a + 1}-{b}": sum(mv[a:b]) / (b - a) for a, b in ((0, 50), (50, 100), (100, 150), (150, 300))}
        print(json.dumps({"seed": seed, "maxvio_batch": windows, "steps_to_balance": steps_to_balance(steps, mv)}))


if __name__ == "__main__":
    main()
