"""Tiny language models made of torchtitan's own MoE layers (``models/common/moe.py``), for the
torchtitan integration's tests: embedding, residual blocks of RMSNorm + torchtitan ``MoE``, head.
The blocks follow torchtitan's model-part protocol (``layers`` ModuleDict, ``moe_enabled``,
``moe``), so torchtitan's own ``register_moe_load_balancing_hook`` drives them unchanged."""

import functools

from torch import nn


class Block(nn.Module):
    def __init__(self, moe, dim):
        super().__init__()
        self.norm, self.moe, self.moe_enabled = nn.RMSNorm(dim), moe, True

    def forward(self, x):
        return x + self.moe(self.norm(x))


class TinyTitan(nn.Module):
    def __init__(self, experts=(8, 8), dim=32, vocab=64, top_k=2, score_func="sigmoid", coeff=1e-3):
        super().__init__()
        from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                           make_router_config)

        init = {"weight": functools.partial(nn.init.normal_, std=0.02), "bias": nn.init.zeros_}
        experts_init = {k: functools.partial(nn.init.normal_, std=0.02) for k in ("w1_EFD", "w2_EDF", "w3_EFD")}
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
        blocks = {}
        for i, e in enumerate(experts):
            moe = make_moe_config(
                num_experts=e, load_balance_coeff=coeff,
                router=make_router_config(dim=dim, num_experts=e, gate_param_init=init, top_k=top_k,
                                          score_func=score_func),
                routed_experts=make_routed_experts_config(dim=dim, hidden_dim=2 * dim, num_experts=e, top_k=top_k,
                                                          param_init=experts_init, comm_backend="standard")).build()
            moe.init_states()
            blocks[str(i)] = Block(moe, dim)
        self.layers = nn.ModuleDict(blocks)

    def hidden(self, x_BLD):
        for block in self.layers.values():
            x_BLD = block(x_BLD)
        return x_BLD

    def forward(self, tokens_BL):
        return self.head(self.hidden(self.embed(tokens_BL)))

    def loss(self, tokens_BL1):
        logits = self(tokens_BL1[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens_BL1[:, 1:].flatten())
