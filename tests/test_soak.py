"""Soak test: thousands of Loss-Free updates against a drifting, abruptly shifting router skew.

One layer (E = 8 experts, top-2, 256 tokens a step) sees inputs x = noise + mu_t, where the
skew mu_t random-walks every step and jumps to a new direction about every 500 steps, so the
bias must keep tracking. Each step runs the real balancer path: the router forward with the
current bias, ``observe`` (routed counts, plus the adaptive rule's margin histograms from
``routing_stats``) and ``update``, exactly the calls ``MoE.forward`` / its backward hook and
``update_balancers`` make; every 25th step goes through the whole layer (training forward,
backward, ``update_balancers``) instead. Expert compute is otherwise skipped: it does not
touch the bias. Everything is seeded (torch.Generator), so every run is bit-identical.
"""

import pytest
import torch

from moe_balance import LossFree, MoE, MoEConfig, max_vio, update_balancers
from moe_balance.config import LOSS_FREE_FORMS, LOSS_FREE_RULES

STEPS, TOKENS, D_MODEL, EXPERTS, TOP_K = 2500, 256, 16, 8, 2
SEED = 0
LAYER_EVERY = 25

# Bounds from measurement: seeds 0-7 of exactly this setup (the test runs seed 0), 2500 steps
# each. Balanced 256-token batches are noisy: top-2 of 8 gives each expert ~64 +/- 7 tokens,
# so even a perfect controller sees MaxVio_batch ~0.17. Late = mean over the second half.
#   no balancing:       late 0.71-1.19
#   sign  (u = 1e-3):   late additive 0.26-0.48, multiplicative 0.29-0.58; last quarter <= 0.50
#   error (u = 1e-3):   late additive 0.32-0.49, multiplicative 0.35-0.55; last quarter <= 0.47
#   adaptive:           late additive 0.178-0.189, multiplicative 0.180-0.195; last quarter
#                       <= 0.195; back under 0.3 (20-step mean) within 13 steps of every shift
#   late / unbalanced late: sign and error <= 0.75, adaptive <= 0.26
# The constant-step rules lag the drift (the bias moves at most 1e-3 a step); the adaptive
# controller sits at the noise floor, hence its much tighter bounds.
LATE_BOUND = {"sign": 0.75, "error": 0.75, "adaptive": 0.25}
LAST_QUARTER_BOUND = {"sign": 0.7, "error": 0.7, "adaptive": 0.23}
VS_UNBALANCED = {"sign": 0.85, "error": 0.85, "adaptive": 0.35}
RECOVERY_STEPS = 30


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny ops: intra-op threads only add overhead (and stall when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def soak(spec: LossFree, seed: int = SEED, steps: int = STEPS):
    """Run the soak; returns per-step MaxVio_batch (balanced and, on the same batches,
    unbalanced), the bias after every update (STEPS, E) and the steps of the abrupt shifts."""
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(d_model=D_MODEL, num_experts=EXPERTS, top_k=TOP_K, expert_hidden_size=1,
                          balancers=(spec,)))
    router, balancer = layer.router, layer.balancers[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, D_MODEL, generator=g) * 0.5)
    shifts = [500 * i + int(torch.randint(-100, 101, (), generator=g)) for i in range(1, steps // 500)]

    def new_skew():
        direction = torch.randn(D_MODEL, generator=g)
        return 1.5 * direction / direction.norm()

    skew = new_skew()
    vios, unbalanced, biases = [], [], []
    for step in range(steps):
        if step in shifts:
            skew = new_skew()
        skew += 0.005 * torch.randn(D_MODEL, generator=g)
        x = torch.randn(TOKENS, D_MODEL, generator=g) + skew
        if step % LAYER_EVERY == 0:  # the full path: forward, backward hook, update_balancers
            out = layer(x)
            out.y.sum().backward()
            decision = out.decision
            update_balancers(layer)
        else:
            with torch.no_grad():
                decision = router(x, balancer.selection_bias(), None, balancer.multiplicative)
                balancer.observe(decision.routed_tokens_per_expert,
                                 balancer.routing_stats(decision, router))
                balancer.update()
        vios.append(float(max_vio(decision.routed_tokens_per_expert)))
        plain = decision.scores.detach().topk(TOP_K, dim=-1).indices  # the same batch, no bias
        unbalanced.append(float(max_vio(torch.bincount(plain.reshape(-1), minlength=EXPERTS))))
        biases.append(balancer.expert_bias.clone())
    assert int(balancer.num_updates) == steps
    return torch.tensor(vios, dtype=torch.float64), torch.tensor(unbalanced, dtype=torch.float64), \
        torch.stack(biases), shifts


def recovery_steps(vios, start, threshold=0.3, window=20):
    """Steps after ``start`` until the ``window``-step mean of MaxVio first drops below threshold."""
    for i in range(start, len(vios) - window + 1):
        if float(vios[i:i + window].mean()) < threshold:
            return i - start
    return None


@pytest.mark.parametrize("form", LOSS_FREE_FORMS)
@pytest.mark.parametrize("rule", LOSS_FREE_RULES)
def test_loss_free_soak_stays_finite_and_balanced(rule, form):
    vios, unbalanced, biases, shifts = soak(LossFree(rule=rule, form=form))
    assert len(shifts) == 4 and all(0 < s < STEPS for s in shifts)

    # the bias is finite after every update, never collapses, and did real work
    assert torch.isfinite(biases).all()
    final = biases[-1]
    assert float(final.max() - final.min()) > 0.1, "the skew needs a non-trivial bias"
    if form == "multiplicative":
        assert float(biases.min()) >= 1e-3  # kept positive: a bias never flips score order
        assert float(biases.min()) > 0.3 and float(biases.max()) < 3.0  # measured 0.60-1.67
    else:
        assert float(biases.abs().max()) < 1.0  # measured <= 0.33
        if rule == "adaptive":  # the common mode is removed at every update
            assert float(biases.mean(dim=1).abs().max()) < 1e-5

    # MaxVio_batch: never NaN, bounded late in the run, well below no balancing
    assert not torch.isnan(vios).any() and torch.isfinite(vios).all()
    half, quarter = STEPS // 2, STEPS // 4
    late, last_quarter = float(vios[half:].mean()), float(vios[-quarter:].mean())
    unbalanced_late = float(unbalanced[half:].mean())
    assert unbalanced_late > 0.6, "the skew must unbalance an unbiased router"
    assert late < LATE_BOUND[rule], (rule, form, late)
    assert last_quarter < LAST_QUARTER_BOUND[rule], (rule, form, last_quarter)
    assert late < VS_UNBALANCED[rule] * unbalanced_late, (rule, form, late, unbalanced_late)
    if rule == "adaptive":  # tracks every abrupt shift quickly
        for s in shifts:
            steps = recovery_steps(vios, s)
            assert steps is not None and steps <= RECOVERY_STEPS, (s, steps)


def test_soak_is_deterministic():
    """Same seed, same run, bit for bit (a short prefix of the adaptive soak)."""
    first, second = (soak(LossFree(rule="adaptive"), steps=600) for _ in range(2))
    assert first[3] == second[3] == first[3][:1]  # one abrupt shift inside the prefix
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
