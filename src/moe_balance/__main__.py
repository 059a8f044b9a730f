"""``python -m moe_balance``, the form torchrun launches: ``torchrun --nproc_per_node=2 -m moe_balance train ...``."""

from .harness.cli import main

raise SystemExit(main())
