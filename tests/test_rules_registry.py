"""The Loss-Free bias rules' registry (``moe_balance.balancing.rules``): it names the rules that
``LossFree`` accepts, each rule does what its docstring says on a hand-computed step, and a new
rule needs only its class, registered, and its name in ``config.LOSS_FREE_RULES``."""

import pytest
import torch

import moe_balance.config.balancers as config_balancers
from moe_balance.balancing import LossFreeBalancer
from moe_balance.balancing.rules import RULES, BiasRule, build_rule, register_rule
from moe_balance.balancing.rules import base as rules_base
from moe_balance.balancing.rules.adaptive import margin_edges
from moe_balance.config import LOSS_FREE_RULES, LossFree

BASE_KEYS = ["expert_bias", "pending_counts", "num_updates"]


def test_the_registry_and_the_config_name_the_same_rules_in_the_same_order():
    assert tuple(RULES) == LOSS_FREE_RULES == ("sign", "error", "adaptive")
    for name, cls in RULES.items():
        assert issubclass(cls, BiasRule) and cls.name == name


@pytest.mark.parametrize("name", list(RULES))
def test_every_registered_rule_is_accepted_and_its_state_sits_on_the_balancer(name):
    balancer = LossFreeBalancer(LossFree(rule=name), 4)
    assert type(balancer.rule) is RULES[name]
    persistent = [k for k, (_, keep) in balancer.rule.state_buffers(4).items() if keep]
    # the rule's buffers are the balancer's own (no submodule): the state-dict keys checkpoints hold
    assert list(balancer.state_dict()) == BASE_KEYS + persistent
    assert list(dict(balancer.named_modules())) == [""]


def test_a_refused_rule_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as info:
        LossFree(rule="signum")
    assert str(info.value) == f"LossFree.rule='signum' is not allowed; choose one of {tuple(RULES)}"
    spec = LossFree()
    object.__setattr__(spec, "rule", "signum")  # past the config's check: the registry refuses it too
    with pytest.raises(ValueError, match=r"no registered bias rule; registered: \('sign', 'error', 'adaptive'\)"):
        build_rule(spec)


def test_a_rule_name_registers_once():
    with pytest.raises(ValueError, match="'sign' is already registered"):
        register_rule("sign")(type("Another", (BiasRule,), {"step": lambda *a: None}))
    assert RULES["sign"].__name__ == "SignRule"


LOAD = torch.tensor([3.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # mean 1.25


def one_update(spec: LossFree, counts, **pending) -> torch.Tensor:
    """The bias change of one update of a fresh balancer with these pending counts."""
    balancer = LossFreeBalancer(spec, len(counts))
    balancer.pending_counts += torch.tensor(counts)
    for name, value in pending.items():
        getattr(balancer, name).copy_(value)
    before = balancer.expert_bias.clone()
    balancer.update()
    assert balancer.pending_counts.sum() == 0 and int(balancer.num_updates) == 1
    return (balancer.expert_bias - before).double()


def test_sign_rule_moves_every_bias_by_u_towards_the_mean():
    spec = LossFree(rule="sign", update_rate=0.1)
    expected = torch.tensor([-0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(RULES["sign"](spec).step(None, LOAD, LOAD.mean(), {}), expected)
    torch.testing.assert_close(one_update(spec, [3, 1, 1, 0]), expected, rtol=0, atol=1e-7)


def test_error_rule_moves_each_bias_by_u_times_its_relative_error():
    spec = LossFree(rule="error", update_rate=0.1)
    # 0.1 * (1.25 - c_i) / 1.25
    expected = torch.tensor([-0.14, 0.02, 0.02, 0.1], dtype=torch.float64)
    torch.testing.assert_close(RULES["error"](spec).step(None, LOAD, LOAD.mean(), {}), expected)
    torch.testing.assert_close(one_update(spec, [3, 1, 1, 0]), expected, rtol=0, atol=1e-7)


def test_adaptive_rule_takes_the_newton_step_at_the_gain_without_common_mode():
    """Two experts, loads (3, 1), mean 2: expert 0 must shed one token and expert 1 gain one.
    Expert 0's selected side holds 2 tokens in bin b (edges lo..hi): shedding 1 needs the
    margin halfway into the bin, lo + (hi - lo) / 2; expert 1's unselected side holds 1 token
    in bin b - 1: gaining it needs that bin's upper edge. On the first update the moving
    averages are the innovation itself, so m^2 / v = 1, clipped to max_gain = 0.5; the load
    error |c - c̄| / c̄ = 0.5 minus trust_error 0.5 adds nothing. Then the mean is removed."""
    spec = LossFree(rule="adaptive", max_step=1.0, max_gain=0.5, trust_error=0.5)
    edges = margin_edges(1.0)
    b = 20
    lo, hi = edges[b - 1].item(), edges[b].item()
    margins = torch.zeros(2, 2, edges.numel(), dtype=torch.int64)
    margins[1, 0, b] = 2  # expert 0, selected tokens (they leave when its bias falls)
    margins[0, 1, b - 1] = 1  # expert 1, unselected tokens (they join when its bias rises)
    innovation = torch.tensor([-(lo + (hi - lo) / 2), edges[b - 1].item()], dtype=torch.float64)
    step = 0.5 * innovation
    expected = step - step.mean()
    torch.testing.assert_close(one_update(spec, [3, 1], pending_margins=margins), expected, rtol=0, atol=1e-7)


def test_a_new_rule_is_a_registered_class_and_its_name_in_the_config(monkeypatch):
    """What adding a rule takes: the class, ``@register_rule``, and the name in LOSS_FREE_RULES
    (patched here, with a copy of the registry, so the real ones are left as they were)."""
    monkeypatch.setattr(rules_base, "RULES", dict(RULES))
    monkeypatch.setattr(config_balancers, "LOSS_FREE_RULES", LOSS_FREE_RULES + ("toward_target",))

    @register_rule("toward_target")
    class TowardTarget(BiasRule):
        """b_i += u * (c̄_i - c_i): the raw error, the unnormalised form (a test rule)."""

        def step(self, balancer, load_E, target_E, pending):
            return self.spec.update_rate * (target_E - load_E)

    delta = one_update(LossFree(rule="toward_target", update_rate=0.01), [3, 1, 1, 0])
    torch.testing.assert_close(delta, 0.01 * (1.25 - LOAD), rtol=0, atol=1e-7)
    assert "toward_target" not in RULES  # the registry the library uses is untouched
