"""The adaptive controller's gain settings against the two quick-preset targets.

Registers one method per setting of ``LossFree(rule="adaptive", ...)`` below, each derived
from the harness's ``loss_free_adaptive`` (smoothing 0.7, bias held for 50 steps), and runs
the same ``compare`` as the README's quick-preset table. The registered ablations
``loss_free_adaptive_s09`` (the library's smoothing, 0.9, with the hold) and
``loss_free_adaptive_nohold`` (smoothing 0.7 from the first step) complete the
hold x smoothing comparison of ``docs/results/gain_settings``:

    python docs/results/controller/gain_settings.py --seeds 0,1,2 --out runs/gain_settings
    moe-balance compare --methods loss_free_adaptive,loss_free_adaptive_s09,loss_free_adaptive_nohold \
        --seeds 0,1,2 --out runs/gain_settings

About 2-3 min a run on the reference machine; the report (MaxVio_global, MaxVio_batch over
steps 151-300, perplexity, mean ± std over seeds) is written to ``<out>/report.md``.
"""

import argparse
import dataclasses

from moe_balance.harness import methods
from moe_balance.harness.train import compare, train_config

# Each setting changes only what it names; the rest is the harness's loss_free_adaptive.
SETTINGS = {
    "adaptive_s08_g015": dict(smoothing=0.8, min_gain=0.15),
    # LossFree(rule="adaptive") as the library defaults it: smoothing 0.9, no hold
    "adaptive_s09_nohold": dict(smoothing=0.9, start_after_steps=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/gain_settings")
    args = parser.parse_args()
    base = methods.get_method("loss_free_adaptive")
    (default,) = base.balancers
    for name, gain in SETTINGS.items():
        spec = dataclasses.replace(default, **gain)
        methods.register_method(dataclasses.replace(base, name=name, balancers=(spec,)), replace=True)
    compare(list(SETTINGS), [int(s) for s in args.seeds.split(",")], train_config("quick"), args.out)


if __name__ == "__main__":
    main()
