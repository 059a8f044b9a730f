"""The bias conformance suite: every router of ours passes it, each declared limitation is real,
and each check fails on a subject that has the bug it is named for."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_balance import LossFree, update_balancers
from moe_balance.moe import moe_layers
from moe_balance.testing.conformance import CHECKS, Subject, moe_layer_subject, run_conformance, transformers_subject

SUBJECTS = {
    "moe sign": lambda: moe_layer_subject(),
    "moe adaptive": lambda: moe_layer_subject(LossFree(rule="adaptive")),
    "moe error multiplicative": lambda: moe_layer_subject(LossFree(rule="error", form="multiplicative")),
    "transformers sign": lambda: transformers_subject(),
    "transformers adaptive": lambda: transformers_subject(LossFree(rule="adaptive")),
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_every_router_of_ours_conforms(subject, check):
    s = SUBJECTS[subject]()
    if check in s.unsupported:  # a declared limitation must be real: the check fails there
        with pytest.raises((AssertionError, ValueError)):
            CHECKS[check](s)
    else:
        CHECKS[check](s)


def test_the_report_names_each_outcome():
    report = run_conformance(transformers_subject())
    assert report["bias_moves_in_place"] == "pass"
    assert report["padding_is_not_counted"].startswith("unsupported: transformers' MoE blocks are given no attention mask")
    broken = dataclasses.replace(moe_layer_subject(), update=lambda m: None)
    assert run_conformance(broken)["bias_moves_in_place"].startswith("FAIL: moe_balance.MoE (sign): layer 0's bias")


# ---- subjects with the bugs: each check must catch its own ----

class NaiveLayer(nn.Module):
    """A torchtitan-style biased router: counts in the forward when training, the sign update
    outside. Each flag adds one reported bug."""

    def __init__(self, d, experts, score_fn, bugs):
        super().__init__()
        if "refuse_softmax" in bugs and score_fn == "softmax":
            raise ValueError("expert bias requires sigmoid scores")
        self.gate, self.proj, self.score_fn, self.bugs = nn.Linear(d, experts, bias=False), nn.Linear(d, d), score_fn, bugs
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.register_buffer("tokens", torch.zeros(experts, dtype=torch.int64), persistent=False)

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if "cast_bias" not in self.bugs:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def forward(self, x, mask=None):
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.sigmoid() if self.score_fn == "sigmoid" else logits.softmax(-1)
        idx = (scores + self.expert_bias).topk(2, dim=-1).indices
        if self.training:  # no grad-mode check, counted in the forward: recomputation counts again
            hits = F.one_hot(idx, scores.shape[-1]).sum(-2)
            if mask is not None and "ignore_mask" not in self.bugs:
                hits = hits * mask.unsqueeze(-1)
            counts = hits.sum((0, 1))
            self.tokens.copy_(counts) if "reset_each_forward" in self.bugs else self.tokens.add_(counts)
        return self.proj(x) * scores.gather(-1, idx).sum(-1, keepdim=True).to(x.dtype)


class NaiveStack(nn.Module):
    def __init__(self, d, experts, score_fn, bugs):
        super().__init__()
        self.layers = nn.ModuleList(NaiveLayer(d, e, score_fn, bugs) for e in experts)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = x + layer(x, mask)
        return x


def naive_subject(*bugs) -> Subject:
    def update(model):
        counts = [layer.tokens.float() for layer in model.layers]
        if "stack_update" in bugs:
            counts = list(torch.stack(counts))  # one tensor for every layer: equal expert counts only
        for layer, c in zip(model.layers, counts):
            delta = 1e-2 * torch.sign(c.mean() - c)
            if "out_of_place" in bugs:
                layer.expert_bias = layer.expert_bias + delta
            else:
                layer.expert_bias.add_(delta)
            layer.tokens.zero_()

    def save_load(model):
        fresh = NaiveStack(8, [layer.expert_bias.numel() for layer in model.layers], "sigmoid", bugs)
        state = {k: v for k, v in model.state_dict().items() if not ("drop_bias" in bugs and k.endswith("expert_bias"))}
        fresh.load_state_dict(state, strict=False)
        return fresh

    return Subject(name="naive", build=lambda experts, score_fn: NaiveStack(8, experts, score_fn, bugs),
                   forward=lambda m, x, mask: m(x, mask), biases=lambda m: [layer.expert_bias for layer in m.layers],
                   pending=lambda m: [layer.tokens for layer in m.layers], update=update, save_load=save_load,
                   d_model=8, top_k=2)


BUGS = {  # bug -> the check that must catch it
    "out_of_place": "bias_moves_in_place",
    "ignore_mask": "padding_is_not_counted",
    "reset_each_forward": "accumulation_sums_micro_batches",
    "cast_bias": "bias_stays_float32",
    "drop_bias": "checkpoint_round_trip",
    "stack_update": "different_expert_counts",
    "refuse_softmax": "softmax_scores",
}


@pytest.mark.parametrize("bug", BUGS)
def test_each_check_catches_its_bug(bug):
    assert CHECKS[BUGS[bug]] is not None
    CHECKS[BUGS[bug]](naive_subject())  # without the bug the naive router passes this check
    with pytest.raises((AssertionError, ValueError, RuntimeError)):
        CHECKS[BUGS[bug]](naive_subject(bug))


def test_counting_in_the_forward_is_caught_under_recomputation_and_no_grad():
    """torchtitan's own counting (in the forward, when training): non-reentrant recomputation
    counts twice, and a training-mode no_grad forward counts."""
    naive = naive_subject()
    with pytest.raises(AssertionError, match="non-reentrant checkpointing: layer 0 counted 128 assignments"):
        CHECKS["counts_once_non_reentrant_checkpointing"](naive)
    with pytest.raises(AssertionError, match="eval/no_grad forwards"):
        CHECKS["eval_and_no_grad_do_not_count"](naive)


def test_an_unregistered_update_is_caught():
    subject = dataclasses.replace(moe_layer_subject(), update=lambda m: None)
    with pytest.raises(AssertionError, match="did not change"):
        CHECKS["bias_moves_in_place"](subject)
    replaced = moe_layer_subject()

    def rebinding_update(model):  # the live bias is a new tensor; the one the model held stays
        for layer in moe_layers(model):
            for b in layer.balancers:
                b.expert_bias = b.expert_bias.clone()
        update_balancers(model)

    with pytest.raises(AssertionError, match="did not change"):
        CHECKS["bias_moves_in_place"](dataclasses.replace(replaced, update=rebinding_update))
