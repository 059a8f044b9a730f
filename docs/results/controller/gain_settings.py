"""The adaptive controller's gain settings against the two quick-preset targets.

Registers one method per setting of ``LossFree(rule="adaptive", ...)`` and runs the same
3-seed ``compare`` as the README's quick-preset table (the defaults are the
``loss_free_adaptive`` rows of that table, so they are not run again here):

    python docs/results/controller/gain_settings.py --seeds 0,1,2 --out runs/gain_settings

About 3 min a run on the reference machine; the report (MaxVio_global, MaxVio_batch over
steps 151-300, perplexity, mean ± std over seeds) is written to ``<out>/report.md``.
"""

import argparse
import dataclasses

from moe_balance import methods
from moe_balance.train import compare, train_config

# Each setting changes only the gain: the rest (the 50-step hold included) is the default method's.
SETTINGS = {
    "adaptive_s08_g015": dict(smoothing=0.8, min_gain=0.15),
    "adaptive_s07": dict(smoothing=0.7),
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
