"""moe_balance: Mixture-of-Experts load balancing for PyTorch.

Auxiliary-Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664) at the heart of a
complete MoE layer, with the auxiliary-loss family it is compared against.
"""

from .balancing import register_balancer_update, update_balancers
from .config import AuxLoss, LossFree, MoEConfig, RouterConfig, ZLoss
from .metrics import LoadAccumulator, max_vio
from .moe import MoE, MoEOutput, moe_layers
from .routing import RoutingDecision

__all__ = [
    "AuxLoss", "LoadAccumulator", "LossFree", "MoE", "MoEConfig", "MoEOutput", "RouterConfig",
    "RoutingDecision", "ZLoss", "max_vio", "moe_layers", "register_balancer_update",
    "update_balancers",
]
__version__ = "0.1.0"
