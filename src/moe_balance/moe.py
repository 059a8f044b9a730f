"""The MoE layer: router -> dispatch -> SwiGLU experts -> combine, plus shared experts.

Shape legend: T tokens (all leading dims flattened), D d_model, A kept assignments.

    y_t = sum over shared experts FFN_s(x_t) + sum over selected i of g_{i,t} E_i(x_t)

E_i is a routed SwiGLU expert (all of one width, or HMoE's different widths) or one of MoE++'s
zero-computation experts (zero, copy, constant), which never reach the FFN path. The router is
any of ``routing.ROUTERS``; a token may select any number of experts.

The layer returns the FFN output only; the transformer block adds the residual (so dropped
assignments leave the token to the residual stream). Balancing losses come back as values
in ``MoEOutput``; nothing is hidden in globals or autograd side channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .balancing import LossFreeBalancer, build_balancer, loss_name
from .config import MoEConfig
from .dispatch import permute, unpermute
from .experts import ConstantExperts, HeterogeneousSwiGLUExperts, SwiGLU, SwiGLUExperts
from .routing import RoutingDecision, build_router


@dataclass(frozen=True)
class MoEOutput:
    """y: same shape and dtype as the input. aux_loss: 0-dim sum of ``losses`` (exactly 0
    when no balancer has a loss). decision: the routing result. losses: name -> value."""

    y: torch.Tensor
    aux_loss: torch.Tensor
    decision: RoutingDecision
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


EXPERT_KINDS = ("ffn", "zero", "copy", "constant")


def kind_loads(routed_E: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """(4,) int64 assignments per expert kind (``EXPERT_KINDS``) from (R,) per-expert counts."""
    return torch.stack([part.sum() for part in torch.split(routed_E, config.kind_sizes)])


class _ObserveOnBackward(torch.autograd.Function):
    """Identity whose backward reports the forward's routed counts to the balancers.

    Counting in backward means counting once per forward that is trained on: eval and
    no-grad forwards have no backward; under ``torch.utils.checkpoint`` the reentrant
    variant's no-grad first pass attaches nothing and its recompute is the one backpropagated,
    while the non-reentrant variant backpropagates the original graph, never the recompute's.
    """

    @staticmethod
    def forward(ctx, y, counts_E, balancers, stats):
        ctx.counts_E, ctx.balancers, ctx.stats = counts_E, balancers, stats
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        for balancer, stats in zip(ctx.balancers, ctx.stats):
            balancer.observe(ctx.counts_E, stats)
        return grad_y, None, None, None


@torch.compiler.disable  # its backward updates the balancers' buffers: eager, one graph break
def observe_on_backward(y: torch.Tensor, counts_E: torch.Tensor, balancers, stats=None,
                        anchor: torch.Tensor | None = None) -> torch.Tensor:
    """y, unchanged, with a backward that reports ``counts_E`` (and each balancer's ``stats``)
    to ``balancers`` via ``Balancer.observe``: the count-on-backward contract (see
    ``_ObserveOnBackward``). Call it in training forwards on a tensor the loss depends on.

    anchor: when y does not require grad (a frozen router's gates), a tensor that does (the
    layer's input): the report then rides on it, which receives a zero gradient. With neither
    requiring grad nothing is trained on this forward, and nothing is reported.
    """
    balancers = list(balancers)
    stats = list(stats) if stats is not None else [None] * len(balancers)
    if y.requires_grad:
        return _ObserveOnBackward.apply(y, counts_E, balancers, stats)
    if anchor is not None and anchor.requires_grad:
        return _ObserveThroughAnchor.apply(y, anchor, counts_E, balancers, stats)
    return y


class _ObserveThroughAnchor(torch.autograd.Function):
    """``observe_on_backward`` for a y without gradient: reports when the anchor's gradient
    is computed, giving the anchor zeros."""

    @staticmethod
    def forward(ctx, y, anchor, counts_E, balancers, stats):
        ctx.counts_E, ctx.balancers, ctx.stats = counts_E, balancers, stats
        ctx.anchor_shape, ctx.anchor_dtype = anchor.shape, anchor.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        for balancer, stats in zip(ctx.balancers, ctx.stats):
            balancer.observe(ctx.counts_E, stats)
        return None, grad_y.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype), None, None, None


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer configured by ``MoEConfig``."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        c = config
        self.router = build_router(c.d_model, c.num_routed_experts, c.top_k, c.router)
        if c.expert_hidden_sizes is None:
            self.experts = SwiGLUExperts(c.num_experts, c.d_model, c.expert_hidden_size, c.expert_impl)
        else:  # HMoE: experts of different widths
            self.experts = HeterogeneousSwiGLUExperts(c.d_model, c.expert_hidden_sizes, c.expert_impl)
        # MoE++ zero-computation experts, numbered after the FFN experts: zero, copy, constant
        self.constant_experts = ConstantExperts(c.constant_experts, c.d_model) if c.constant_experts else None
        # k shared SwiGLU experts summed == one SwiGLU with k times the hidden width.
        self.shared_experts = None
        if c.num_shared_experts:
            hidden = c.num_shared_experts * c.default_shared_hidden_size
            self.shared_experts = SwiGLU(c.d_model, hidden)
        self.balancers = nn.ModuleList(build_balancer(s, c.num_routed_experts, c.num_experts, c.hidden_sizes)
                                       for s in c.balancers)
        self._loss_names = [loss_name(s) for s in c.balancers]
        # (E,) float32 constant added to the selection scores (parallel.parallelize's locality
        # bonus for the experts on this rank), or None
        self.locality_bias: torch.Tensor | None = None

    @property
    def expert_bias(self) -> torch.Tensor | None:
        """The Loss-Free selection bias (E,) float32, or None without a LossFree balancer."""
        for b in self.balancers:
            if isinstance(b, LossFreeBalancer):
                return b.expert_bias
        return None

    def _check_dtype(self, x: torch.Tensor) -> None:
        """The input must be floating point and, outside autocast, of the experts' dtype."""
        weight = next(self.experts.parameters())
        if not x.is_floating_point():
            raise TypeError(f"MoE input must be floating point; got dtype {x.dtype}: cast it with "
                            f"x.to({weight.dtype})")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"MoE input dtype {x.dtype} differs from the layer's parameter dtype "
                            f"{weight.dtype}: cast the input (x.to({weight.dtype})) or the layer "
                            f"(moe.to({x.dtype}))")

    def _expert_outputs(self, x_AD: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        """Each assignment's expert output, in assignment order, in a layer with MoE++ experts.
        Only the FFN experts' rows (a prefix: assignments are sorted by expert) reach the FFN
        path; zero experts give 0, copy experts their input, constant experts
        ``ConstantExperts``, without any matmul."""
        c = self.config
        E = c.num_experts
        # host sync: MoE++ layers split the rows by expert kind, sizes the host must know
        per_kind = kind_loads(decision.tokens_per_expert, c).tolist()  # kept assignments per kind
        ffn_x, zero_x, copy_x, constant_x = x_AD.split(per_kind)
        # no FFN assignment at all: no call into the FFN path (not even an empty matmul)
        ffn_y = self.experts(ffn_x, decision.tokens_per_expert[:E]) if per_kind[0] else torch.zeros_like(ffn_x)
        parts = [ffn_y, torch.zeros_like(zero_x), copy_x]
        if self.constant_experts is not None:
            first_constant = c.num_routed_experts - c.constant_experts
            parts.append(self.constant_experts(constant_x, decision.expert_ids[sum(per_kind[:3]):] - first_constant))
        return torch.cat(parts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                prev_logits: torch.Tensor | None = None) -> MoEOutput:
        """x: (..., d_model), the layer's dtype (or any float dtype under autocast). mask:
        x.shape[:-1] bool, False marks padding tokens, which are not routed (their routed output
        is 0) and are left out of counts and losses; their values are never read (NaN is fine).
        prev_logits: (T, E) the previous MoE layer's ``decision.logits``, used with
        ``RouterConfig(gating_residual=True)`` (ignored otherwise)."""
        D = self.config.d_model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE input must be a torch.Tensor of shape (..., {D}); got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != D:
            raise ValueError(f"MoE input last dim must be d_model={D}; got shape {tuple(x.shape)}")
        self._check_dtype(x)
        batch_shape = x.shape[:-1]
        x_TD = x.reshape(-1, D)
        mask_T = None
        if mask is not None:
            if mask.dtype != torch.bool:  # a float mask cast to bool would make 0.5 and NaN real tokens
                raise TypeError(f"MoE mask must be a bool tensor (True = token, False = padding); got "
                                f"dtype {mask.dtype}: pass mask.bool() or a comparison such as mask > 0")
            if mask.shape != batch_shape:
                raise ValueError(f"MoE mask shape must equal the input's leading shape "
                                 f"{tuple(batch_shape)}; got {tuple(mask.shape)}")
            mask_T = mask.reshape(-1).to(device=x.device)
            # padding rows are zeroed: whatever they hold (NaN included) reaches no logit check,
            # loss or expert; their output is 0 (the routed part) plus the shared experts of 0
            x_TD = torch.where(mask_T[:, None], x_TD, x_TD.new_zeros(()))

        biased = [b for b in self.balancers if b.selection_bias() is not None]
        bias_E = biased[0].selection_bias() if biased else None
        multiplicative = bool(biased) and biased[0].multiplicative
        fixed_E = None if self.locality_bias is None else self.locality_bias.to(x.device)
        if fixed_E is not None:
            bias_E = fixed_E if bias_E is None else bias_E + fixed_E
        decision = self.router(x_TD, bias_E, mask_T, multiplicative, prev_logits)

        x_AD = permute(x_TD, decision)
        if self.config.num_zero_computation_experts:
            y_TD = unpermute(self._expert_outputs(x_AD, decision), decision, x_TD.shape[0])
        else:  # the experts combine their own outputs: the grouped path keeps no (A, D) outputs
            y_TD = self.experts.weighted_sum(x_AD, decision.tokens_per_expert, decision.weights,
                                             decision.token_ids, x_TD.shape[0])
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        losses = {}
        for name, balancer in zip(self._loss_names, self.balancers):
            value = balancer.loss(decision, batch_shape)
            if value is not None:
                losses[name] = losses[name] + value if name in losses else value
        aux_loss = sum(losses.values()) if losses else torch.zeros((), device=x.device)

        observers = [b for b in self.balancers if b.observes_counts]
        if observers and self.training and y_TD.requires_grad:
            counts_E = decision.routed_tokens_per_expert.detach()
            stats = [b.routing_stats(decision, self.router, fixed_E) for b in observers]
            y_TD = observe_on_backward(y_TD, counts_E, observers, stats)
        return MoEOutput(y=y_TD.view(x.shape), aux_loss=aux_loss, decision=decision, losses=losses)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer in a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]
