"""A small decoder-only MoE transformer in the DeepSeekMoE layout (Loss-Free paper, sec. 4.1).

Shape legend: B batch, S sequence, D d_model, V vocab, N attention heads, H head dim,
R rotary pairs (H/2), E routed experts.

    tokens -> embedding -> n_layers pre-norm blocks -> RMSNorm -> LM head
    block:  h = h + attn(norm(h));  h = h + ffn(norm(h))

The ffn is a dense SwiGLU in the first ``n_dense_layers`` blocks and an MoE layer (shared
plus fine-grained routed experts; Dai et al. 2024, DeepSeekMoE) in all later ones, as in
Wang et al. 2024 (arXiv 2408.15664), section 4.1. Attention is causal with rotary position
embeddings (Su et al. 2021, RoFormer). Balancing losses come back as values and are added to
the LM loss in plain sight (``loss = lm_loss + aux_loss``); call
``moe_balance.update_balancers(model)`` after each optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import BalancerSpec, MoEConfig, RouterConfig, heterogeneous_widths
from ..experts import SwiGLU
from ..moe import EXPERT_KINDS, MoE, kind_loads  # noqa: F401 (EXPERT_KINDS re-exported)
from ..routing import ExpertChoiceRouter

IGNORE_INDEX = -100


def _int_at_least(name: str, value, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"ModelConfig.{name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a ``MoETransformer`` (training-set sizes belong to the trainer).

    dense_ffn_hidden: hidden width of the dense SwiGLU FFN of the first ``n_dense_layers``
    blocks. moe: the MoE layer of every later block; its d_model must equal d_model.
    gradient_checkpointing: recompute each block in backward (training only).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    dense_ffn_hidden: int
    moe: MoEConfig
    n_dense_layers: int = 1
    tie_embeddings: bool = True
    init_std: float = 0.006
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "dense_ffn_hidden"):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("n_dense_layers", self.n_dense_layers, 0)
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"ModelConfig.n_dense_layers={self.n_dense_layers} must be <= "
                             f"n_layers={self.n_layers}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"ModelConfig head dim d_model/n_heads={self.d_model // self.n_heads} "
                             "must be even (rotary embeddings rotate pairs of dims)")
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"ModelConfig.moe must be a MoEConfig, got {type(self.moe).__name__}")
        if self.moe.d_model != self.d_model:
            raise ValueError(f"ModelConfig.moe.d_model={self.moe.d_model} must equal "
                             f"ModelConfig.d_model={self.d_model}")
        for name in ("init_std", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name}={value!r} must be a finite number > 0")
        for name in ("tie_embeddings", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be True or False")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class ModelOutput:
    """logits (B, S, V); lm_loss 0-dim or None; aux_loss 0-dim sum over MoE layers (exactly 0
    without loss balancers); layer_loads: each MoE layer's (E,) int64 routed tokens per FFN
    expert; layer_kind_loads: each MoE layer's (4,) int64 assignments to FFN, zero, copy and
    constant experts (``EXPERT_KINDS``; MoE++); loss = lm_loss + aux_loss (None without targets)."""

    logits: torch.Tensor
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    layer_loads: list[torch.Tensor]
    loss: torch.Tensor | None
    layer_kind_loads: list[torch.Tensor] = dataclasses.field(default_factory=list)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, head_dim/2) float32 of angle pos * theta^(-2i/head_dim) (RoFormer eq. 15)."""
    inv_freq_R = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SR = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq_R)
    return angles_SR.cos(), angles_SR.sin()


def apply_rope(x_BNSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+H/2}) by its position's angle (half-split layout), in float32."""
    x1, x2 = x_BNSH.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR), dim=-1)
    return rotated.to(x_BNSH.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q_BSD, k_BSD, v_BSD = self.qkv(x_BSD).split(D, dim=-1)
        q_BNSH, k_BNSH, v_BNSH = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)
                                  for t in (q_BSD, k_BSD, v_BSD))
        q_BNSH, k_BNSH = apply_rope(q_BNSH, cos_SR, sin_SR), apply_rope(k_BNSH, cos_SR, sin_SR)
        y_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSH, is_causal=True)
        return self.proj(y_BNSH.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block whose FFN is a dense SwiGLU or an MoE layer."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = (SwiGLU(config.d_model, config.dense_ffn_hidden) if layer < config.n_dense_layers
                    else MoE(config.moe))

    def forward(self, h_BSD, cos_SR, sin_SR, mask_BS, prev_logits_TE=None):
        """Returns (h_BSD, aux_loss, load_E, kind_loads_4, logits_TE); all but h_BSD are None for
        a dense block. load_E counts FFN experts; prev_logits_TE feeds MoE++'s gating residual."""
        h_BSD = h_BSD + self.attn(self.attn_norm(h_BSD), cos_SR, sin_SR)
        x_BSD = self.ffn_norm(h_BSD)
        if not isinstance(self.ffn, MoE):
            return h_BSD + self.ffn(x_BSD), None, None, None, None
        out = self.ffn(x_BSD, mask_BS, prev_logits_TE)
        routed = out.decision.routed_tokens_per_expert
        return (h_BSD + out.y, out.aux_loss, routed[:self.ffn.config.num_experts],
                kind_loads(routed, self.ffn.config), out.decision.logits)


def lm_cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor,
                     mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy, in float32, over positions with mask True and target != -100
    (0 when no position counts, rather than F.cross_entropy's NaN)."""
    if mask_BS is not None:
        targets_BS = targets_BS.masked_fill(~mask_BS.bool(), IGNORE_INDEX)
    total = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets_BS != IGNORE_INDEX).sum().clamp_min(1)


class MoETransformer(nn.Module):
    """Decoder-only language model: embedding, pre-norm blocks, final RMSNorm, LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # NOTE: non-persistent: derived from the config, so not in checkpoints. model.to(bf16)
        # rounds them like any buffer; autocast keeps them float32.
        cos_SR, sin_SR = rope_cache(config.seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos_SR, persistent=False)
        self.register_buffer("rope_sin", sin_SR, persistent=False)
        for layer in self.moe_layers:  # a causal LM: expert choice reads the future, say so
            if isinstance(layer.router, ExpertChoiceRouter):
                layer.router.causal = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every weight matrix (embedding, attention, FFNs, experts, router) ~ N(0, init_std)
        (the paper's 0.006), norm weights = 1. Balancer buffers (the Loss-Free bias) untouched."""
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=self.config.init_std)
        for layer in self.moe_layers:  # MoE++ gating residual: starts as "add the last logits"
            if layer.router.residual_weight is not None:
                nn.init.eye_(layer.router.residual_weight)

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in depth order."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> ModelOutput:
        """tokens, targets (B, S) int64 (target -100 = ignore); mask (B, S) bool, False marks
        padding, which is left out of lm_loss, the MoE loads and the balancing losses.

        NOTE: attention is only causal, not padding-masked: pad on the right, so no real token
        ever attends to padding.
        """
        B, S = tokens.shape
        if S > self.config.seq_len:
            raise ValueError(f"sequence length {S} exceeds ModelConfig.seq_len={self.config.seq_len}")
        for name, t in (("targets", targets), ("mask", mask)):
            if t is not None and t.shape != tokens.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal tokens shape {(B, S)}")
        h_BSD = self.tok_emb(tokens)
        cos_SR, sin_SR = self.rope_cos[:S], self.rope_sin[:S]
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        aux_losses, layer_loads, layer_kind_loads = [], [], []
        logits_TE = None  # the last MoE layer's router logits (MoE++ gating residual)
        for block in self.blocks:
            try:
                if use_checkpoint:
                    h_BSD, aux_loss, load_E, kinds_4, block_logits = checkpoint(
                        block, h_BSD, cos_SR, sin_SR, mask, logits_TE, use_reentrant=False)
                else:
                    h_BSD, aux_loss, load_E, kinds_4, block_logits = block(h_BSD, cos_SR, sin_SR, mask, logits_TE)
            except FloatingPointError as err:  # the router's finiteness check: say which layer
                raise FloatingPointError(f"layer {block.layer}: {err}") from err
            if load_E is not None:
                aux_losses.append(aux_loss)
                layer_loads.append(load_E)
                layer_kind_loads.append(kinds_4)
                logits_TE = block_logits
        logits_BSV = self.lm_head(self.norm(h_BSD))
        aux_loss = (torch.stack(aux_losses).sum() if aux_losses
                    else torch.zeros((), device=logits_BSV.device))
        lm_loss = loss = None
        if targets is not None:
            lm_loss = lm_cross_entropy(logits_BSV, targets, mask)
            loss = lm_loss + aux_loss
        return ModelOutput(logits=logits_BSV, lm_loss=lm_loss, aux_loss=aux_loss,
                           layer_loads=layer_loads, loss=loss, layer_kind_loads=layer_kind_loads)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts (a tied embedding counted once).

        total: every parameter. activated: the parameters one token uses: everything except
        the num_experts - top_k routed experts it skips in each MoE layer (attention, norms,
        dense FFNs, routers, shared experts and top_k routed experts), embeddings included.
        For routers with a variable number of experts per token (top-p, expert choice) top_k
        is the nominal budget; the measured mean is in the harness's ``experts_per_token``.
        embedding: token embedding plus the LM head when untied. ``*_non_embedding``: the
        same two counts without the embedding.
        """
        total = sum(p.numel() for p in self.parameters())
        embedding = self.tok_emb.weight.numel()
        if not self.config.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        skipped = 0
        for moe in self.moe_layers:
            per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.config.num_experts
            skipped += (moe.config.num_experts - moe.config.top_k) * per_expert
        activated = total - skipped
        return {"total": total, "activated": activated, "embedding": embedding,
                "total_non_embedding": total - embedding,
                "activated_non_embedding": activated - embedding}


# --------------------------------------------------------------------------------------------
# Presets (architecture only)
# --------------------------------------------------------------------------------------------

def dense_ffn_width(d_model: int) -> int:
    """DeepSeekMoE's standard FFN: a SwiGLU of width 8/3 * d_model (8 d^2 parameters, like a
    classic 4d two-matrix FFN), rounded up to a multiple of 16."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


# name: architecture. Every preset uses expert_hidden = d_model / 2 = 3/16 of 8/3 * d_model,
# the paper's ratio of expert width to dense FFN width, and one dense block first.
PRESETS: dict[str, dict] = {
    # Unit tests and smoke runs: trains in seconds.
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, seq_len=64,
                 num_experts=8, top_k=2, num_shared_experts=1),
    # Method comparisons on 2 CPU cores in a few minutes per run.
    "quick": dict(vocab_size=256, d_model=192, n_layers=4, n_heads=6, seq_len=128,
                  num_experts=32, top_k=4, num_shared_experts=1),
    # The CPU reproduction of the paper's comparison: about an hour per run; the paper's
    # 2 shared + 64 routed experts, top-6, scaled down in width and depth.
    "standard": dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4, seq_len=256,
                     num_experts=64, top_k=6, num_shared_experts=2),
    # The paper's 1B model (sec. 4.1): for GPUs, or the meta device to count parameters.
    # NOTE: the paper does not say whether embeddings are tied; DeepSeek models untie them.
    "paper-1b": dict(vocab_size=32000, d_model=1024, n_layers=10, n_heads=8, seq_len=2048,
                     num_experts=64, top_k=6, num_shared_experts=2, tie_embeddings=False),
}


def model_preset(name: str, *, vocab_size: int | None = None,
                 balancers: tuple[BalancerSpec, ...] = (), router: RouterConfig | None = None,
                 moe_overrides: dict | None = None, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a named preset (see ``PRESETS``), with the given balancing.

    vocab_size: the tokenizer's (default: the preset's, 256 bytes or the paper's 32K).
    router: default ``RouterConfig()``, the paper's sigmoid gate. ``moe_overrides``: MoEConfig
    fields (e.g. zero_experts=1), or ``expert_width_ratios`` for HMoE widths around the preset's
    (``heterogeneous_widths``). ``overrides``: any other ModelConfig field (e.g. seq_len=256,
    gradient_checkpointing=True).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    arch = dict(PRESETS[name])
    layer = dict(moe_overrides or {})
    num_experts, width = arch.pop("num_experts"), arch["d_model"] // 2
    ratios = layer.pop("expert_width_ratios", None)
    if ratios:  # HMoE: the same total width, spread over experts of different sizes
        layer["expert_hidden_sizes"] = heterogeneous_widths(ratios, num_experts, width)
    else:
        layer.setdefault("expert_hidden_size", width)
    moe = MoEConfig(d_model=arch["d_model"], num_experts=num_experts,
                    top_k=arch.pop("top_k"), num_shared_experts=arch.pop("num_shared_experts"),
                    router=router or RouterConfig(), balancers=tuple(balancers), **layer)
    if vocab_size is not None:
        arch["vocab_size"] = vocab_size
    config = ModelConfig(dense_ffn_hidden=dense_ffn_width(arch["d_model"]), moe=moe, **arch)
    return dataclasses.replace(config, **overrides) if overrides else config
