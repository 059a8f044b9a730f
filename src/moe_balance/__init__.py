"""moe_balance: Mixture-of-Experts load balancing for PyTorch."""
