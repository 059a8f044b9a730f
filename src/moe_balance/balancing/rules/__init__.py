"""The Loss-Free bias update rules, one module per rule, behind a registry (``base``): ``sign``
(the paper's), ``error`` (its normalised raw-error ablation) and ``adaptive`` (this project's
controller). ``RULES`` maps each ``LossFree.rule`` name to its ``BiasRule`` class; importing a
rule's module registers it, in the order below (the order of ``config.LOSS_FREE_RULES``).
"""

from .base import RULES, BiasRule, build_rule, register_rule
from .sign import SignRule
from .error import ErrorRule
from .adaptive import AdaptiveRule
