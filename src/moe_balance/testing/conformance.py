"""A conformance suite for routers with a selection bias (Loss-Free balancing and its kin).

Each check is the regression test of a bug users reported in a framework's expert bias:

| check | the bug it catches |
|---|---|
| ``bias_moves_in_place`` | torchtitan #1222 (out-of-place update: checkpoints held a zero bias), the Qwen3-MoE hook never registered (torchtitan PR #3666) |
| ``counts_once_reentrant_checkpointing``, ``counts_once_non_reentrant_checkpointing`` | activation checkpointing counting twice (torchtitan PR #1593) |
| ``eval_and_no_grad_do_not_count`` | evaluation traffic in the update (torchtitan PR #4148) |
| ``accumulation_sums_micro_batches`` | gradient accumulation keeping only the last micro-batch |
| ``bias_stays_float32`` | a bf16 bias under ``--bf16`` or weight sync (Megatron-LM #1482, torchtitan PR #3861) |
| ``checkpoint_round_trip`` | a bias lost or rounded by the framework's checkpoint |
| ``padding_is_not_counted`` | padding counted as load (Megatron-LM PR #6114) |
| ``different_expert_counts`` | layers with different expert counts (NeMo-RL PR #3523) |
| ``softmax_scores`` | the bias refused with softmax scores (Megatron-LM #1693, #1971) |

A framework is described by a ``Subject``: how to build a small model with one or more biased
routers, run it, read its biases and pending counts, apply the framework's update, and round
trip its checkpoint. ``run_conformance(subject)`` runs every check and returns a report;
``CHECKS`` maps names to the check functions, for a test per check. A subject may declare a
check unsupported with the reason (the report says so; it never passes silently).

    from moe_balance.testing.conformance import CHECKS, moe_layer_subject
    subject = moe_layer_subject()
    for name, check in CHECKS.items():
        check(subject)  # AssertionError naming what went wrong
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BATCH, SEQ = 4, 8  # every check's input: (BATCH, SEQ, d_model)


@dataclass
class Subject:
    """One biased-router implementation as the checks drive it.

    build(experts_per_layer, score_fn): a fresh model (seeded by the caller) whose routed layers
        have these expert counts and this score function ("sigmoid" or "softmax").
    forward(model, x_BSD, mask_BS): run the model on activations, returning a tensor to take a
        loss of; mask_BS (bool, False = padding) or None.
    biases(model): the live selection-bias tensor of each routed layer (not copies).
    pending(model): each layer's (E,) counts observed since the last update.
    update(model): what the framework runs at the optimizer step (the bias update).
    save_load(model): the model's state through the framework's checkpoint into a fresh model;
        returns the fresh model.
    top_k: experts per token. unsupported: check name -> why this framework cannot do it.
    """

    name: str
    build: Callable[[Sequence[int], str], nn.Module]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]
    biases: Callable[[nn.Module], list[torch.Tensor]]
    pending: Callable[[nn.Module], list[torch.Tensor]]
    update: Callable[[nn.Module], None]
    save_load: Callable[[nn.Module], nn.Module]
    d_model: int
    top_k: int
    experts: tuple[int, ...] = (8, 8)
    score_fn: str = "sigmoid"
    unsupported: dict[str, str] = field(default_factory=dict)


def _model(subject: Subject, experts: Sequence[int] | None = None, score_fn: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return subject.build(tuple(experts or subject.experts), score_fn or subject.score_fn).train()


def _x(subject: Subject, seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, subject.d_model, generator=torch.Generator().manual_seed(seed))


def _train_step(subject: Subject, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    subject.forward(model, x, mask).float().square().mean().backward()


def _counts(subject: Subject, model: nn.Module) -> list[torch.Tensor]:
    return [c.detach().to("cpu", torch.int64).clone() for c in subject.pending(model)]


def _assert_counts(counts: list[torch.Tensor], tokens: int, subject: Subject, what: str) -> None:
    for i, c in enumerate(counts):
        assert int(c.sum()) == tokens * subject.top_k, \
            f"{subject.name}: {what}: layer {i} counted {int(c.sum())} assignments, expected {tokens} x {subject.top_k}"


def bias_moves_in_place(subject: Subject) -> None:
    """A training step and the update move every bias, in the tensor the model holds."""
    model = _model(subject)
    held = subject.biases(model)
    before = [b.detach().clone() for b in held]
    _train_step(subject, model, _x(subject))
    subject.update(model)
    for i, (b, old) in enumerate(zip(held, before)):
        assert not torch.equal(b, old), (f"{subject.name}: layer {i}'s bias tensor did not change after a training "
                                         "step and the update (hook not registered, or the update is out of place)")
        now = subject.biases(model)[i]
        assert now.data_ptr() == b.data_ptr(), f"{subject.name}: layer {i}'s bias was replaced, not updated in place"


def _counts_once_under(subject: Subject, use_reentrant: bool) -> None:
    x = _x(subject)
    plain = _model(subject)
    _train_step(subject, plain, x)
    expected = _counts(subject, plain)
    model = _model(subject)
    xi = x.clone().requires_grad_()  # the reentrant variant needs an input that requires grad
    out = checkpoint(lambda t: subject.forward(model, t, None), xi, use_reentrant=use_reentrant)
    out.float().square().mean().backward()
    got = _counts(subject, model)
    _assert_counts(got, BATCH * SEQ, subject, f"{'reentrant' if use_reentrant else 'non-reentrant'} checkpointing")
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"{subject.name}: checkpointed counts differ"


def counts_once_reentrant_checkpointing(subject: Subject) -> None:
    """Under reentrant activation checkpointing each token is counted once."""
    _counts_once_under(subject, use_reentrant=True)


def counts_once_non_reentrant_checkpointing(subject: Subject) -> None:
    """Under non-reentrant activation checkpointing each token is counted once."""
    _counts_once_under(subject, use_reentrant=False)


def eval_and_no_grad_do_not_count(subject: Subject) -> None:
    """Forwards in eval mode, or in training mode under ``torch.no_grad``, count nothing."""
    model = _model(subject)
    model.eval()
    subject.forward(model, _x(subject), None).float().sum()
    model.train()
    with torch.no_grad():
        subject.forward(model, _x(subject, 2), None)
    for i, c in enumerate(_counts(subject, model)):
        assert int(c.sum()) == 0, f"{subject.name}: layer {i} counted {int(c.sum())} assignments of eval/no_grad forwards"


def accumulation_sums_micro_batches(subject: Subject) -> None:
    """Counts of two micro-batches before one update are the sum of each one's counts."""
    x1, x2 = _x(subject, 1), _x(subject, 2)
    model = _model(subject)
    _train_step(subject, model, x1)
    first = _counts(subject, model)
    _train_step(subject, model, x2)  # no optimizer step between: the same weights route x2
    both = _counts(subject, model)
    alone = _model(subject)
    _train_step(subject, alone, x2)
    second = _counts(subject, alone)
    for i, (a, b, s) in enumerate(zip(first, second, both)):
        assert torch.equal(a + b, s), f"{subject.name}: layer {i}: accumulated counts are not the micro-batches' sum"


def bias_stays_float32(subject: Subject) -> None:
    """The bias is float32 after ``model.to(bfloat16)``, after a bf16 step and its update, and
    after an autocast step of a float32 model."""
    model = _model(subject).to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in subject.biases(model)), \
        f"{subject.name}: model.to(bfloat16) cast the bias: {[b.dtype for b in subject.biases(model)]}"
    _train_step(subject, model, _x(subject).to(torch.bfloat16))
    subject.update(model)
    assert all(b.dtype == torch.float32 for b in subject.biases(model)), f"{subject.name}: the update cast the bias"
    model = _model(subject)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = subject.forward(model, _x(subject), None)
    out.float().square().mean().backward()
    subject.update(model)
    assert all(b.dtype == torch.float32 for b in subject.biases(model)), f"{subject.name}: autocast cast the bias"


def checkpoint_round_trip(subject: Subject) -> None:
    """After two updates, the framework's checkpoint gives back every bias exactly, in float32."""
    model = _model(subject)
    for seed in (1, 2):
        _train_step(subject, model, _x(subject, seed))
        subject.update(model)
    loaded = subject.save_load(model)
    for i, (a, b) in enumerate(zip(subject.biases(model), subject.biases(loaded))):
        assert b.dtype == torch.float32 and torch.equal(a, b), \
            f"{subject.name}: layer {i}'s bias did not survive the checkpoint ({a.dtype} -> {b.dtype})"


def padding_is_not_counted(subject: Subject) -> None:
    """With the last positions padding, the counts are those of the real tokens alone."""
    real = SEQ // 2
    x = _x(subject)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[:, :real] = True
    model = _model(subject)
    _train_step(subject, model, x, mask)
    got = _counts(subject, model)
    _assert_counts(got, BATCH * real, subject, "a padded batch")
    alone = _model(subject)
    _train_step(subject, alone, x[:, :real].contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, _counts(subject, alone))), \
        f"{subject.name}: the padded batch's counts differ from those of its real tokens"


def different_expert_counts(subject: Subject) -> None:
    """Layers with 4 and 8 experts: each bias has its layer's size, and each one moves."""
    model = _model(subject, experts=(4, 8))
    assert [b.numel() for b in subject.biases(model)] == [4, 8], f"{subject.name}: bias sizes do not follow the layers"
    _counts_once_and_moves(subject, model, "layers of 4 and 8 experts")


def softmax_scores(subject: Subject) -> None:
    """With softmax scores the bias is accepted and moves."""
    _counts_once_and_moves(subject, _model(subject, score_fn="softmax"), "softmax scores")


def _counts_once_and_moves(subject: Subject, model: nn.Module, what: str) -> None:
    """A training step counts every token once, and the update moves every layer's bias."""
    before = [b.detach().clone() for b in subject.biases(model)]
    _train_step(subject, model, _x(subject))
    _assert_counts(_counts(subject, model), BATCH * SEQ, subject, what)
    subject.update(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, subject.biases(model))), \
        f"{subject.name}: with {what}, a layer's bias did not move"


CHECKS: dict[str, Callable[[Subject], None]] = {f.__name__: f for f in (
    bias_moves_in_place, counts_once_reentrant_checkpointing, counts_once_non_reentrant_checkpointing,
    eval_and_no_grad_do_not_count, accumulation_sums_micro_batches, bias_stays_float32, checkpoint_round_trip,
    padding_is_not_counted, different_expert_counts, softmax_scores)}


def run_conformance(subject: Subject) -> dict[str, str]:
    """Every check on ``subject``: name -> "pass", "unsupported: <reason>" or "FAIL: <message>"
    (an exception the framework raises, such as refusing softmax scores, is a failure too)."""
    report = {}
    for name, check in CHECKS.items():
        if name in subject.unsupported:
            report[name] = f"unsupported: {subject.unsupported[name]}"
            continue
        try:
            check(subject)
            report[name] = "pass"
        except AssertionError as err:
            report[name] = f"FAIL: {err}"
        except Exception as err:  # a framework that refuses (e.g. softmax scores) or crashes fails the check
            report[name] = f"FAIL: {type(err).__name__}: {err}"
    return report


# ---- subjects: this library's layer and its transformers integration ----

class _Stack(nn.Module):
    """Residual MoE layers, one per entry of ``experts``: the smallest model with biased routers."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x_BSD: torch.Tensor, mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x_BSD = x_BSD + layer(x_BSD, mask=mask_BS).y
        return x_BSD


def moe_layer_subject(spec=None, d_model: int = 16) -> Subject:
    """``moe_balance.MoE`` layers with a ``LossFree`` balancer (default: the sign rule, u = 1e-2)."""
    from ..balancing import update_balancers
    from ..config import LossFree, MoEConfig, RouterConfig
    from ..moe import MoE, moe_layers

    spec = spec or LossFree(update_rate=1e-2)

    def build(experts, score_fn):
        return _Stack([MoE(MoEConfig(d_model=d_model, num_experts=e, top_k=2, expert_hidden_size=16,
                                     router=RouterConfig(score_fn=score_fn), balancers=(spec,)))
                       for e in experts])

    def save_load(model):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        fresh = build([layer.config.num_experts for layer in moe_layers(model)], moe_layers(model)[0].config.router.score_fn)
        fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        return fresh

    return Subject(
        name=f"moe_balance.MoE ({spec.rule})", build=build, forward=lambda m, x, mask: m(x, mask),
        biases=lambda m: [layer.expert_bias for layer in moe_layers(m)],
        pending=lambda m: [b.pending_counts for layer in moe_layers(m) for b in layer.balancers if hasattr(b, "pending_counts")],
        update=update_balancers, save_load=save_load, d_model=d_model, top_k=2)


TRANSFORMERS_UNSUPPORTED = {
    "padding_is_not_counted": "transformers' MoE blocks are given no attention mask, so their routers cannot tell "
                              "padding from tokens: pack sequences (no padding) when training with Loss-Free",
    "different_expert_counts": "a transformers config gives every MoE layer the same number of experts",
}


def transformers_subject(spec=None) -> Subject:
    """The transformers integration (``enable_loss_free``) on tiny random models: Qwen3-MoE for
    softmax scores, DeepSeek-V3 for sigmoid scores; checkpoints through ``save_pretrained`` /
    ``from_pretrained(..., bias_from=)``."""
    import tempfile

    import transformers

    from ..balancing import update_balancers
    from ..config import LossFree
    from ..integrations.transformers import enable_loss_free, loss_free_routers

    spec = spec or LossFree(update_rate=1e-2)
    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)

    def config(experts, score_fn):
        if len(set(experts)) != 1:
            raise ValueError("transformers configs have one expert count for every layer")
        if score_fn == "softmax":
            return transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, num_hidden_layers=len(experts),
                                               intermediate_size=64, moe_intermediate_size=16,
                                               num_experts=experts[0], num_experts_per_tok=2)
        return transformers.DeepseekV3Config(**common, num_key_value_heads=4, num_hidden_layers=len(experts) + 1,
                                             first_k_dense_replace=1, intermediate_size=64, moe_intermediate_size=16,
                                             n_routed_experts=experts[0], n_shared_experts=1, num_experts_per_tok=2,
                                             n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

    def build(experts, score_fn):
        return enable_loss_free(transformers.AutoModel.from_config(config(experts, score_fn)), spec=spec)

    def forward(model, x, mask):
        return model(inputs_embeds=x, attention_mask=None if mask is None else mask.long()).last_hidden_state

    def save_load(model):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return enable_loss_free(transformers.AutoModel.from_pretrained(tmp), spec=spec, bias_from=tmp)

    return Subject(
        name=f"transformers integration ({spec.rule})", build=build, forward=forward,
        biases=lambda m: [r.balancer.expert_bias for r in loss_free_routers(m)],
        pending=lambda m: [r.balancer.pending_counts for r in loss_free_routers(m)],
        update=update_balancers, save_load=save_load, d_model=32, top_k=2, unsupported=dict(TRANSFORMERS_UNSUPPORTED))
