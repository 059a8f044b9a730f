"""The MoE transformer: loss values, causality, loads, masks, parameter counts, checkpointing."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_balance import AuxLoss, LossFree, MoEConfig, RouterConfig, ZLoss, update_balancers
from moe_balance.harness.model import PRESETS, ModelConfig, MoETransformer, dense_ffn_width, model_preset


def tiny(balancers=(), **overrides):
    return model_preset("tiny", balancers=balancers, **overrides)


def make_model(config, seed=0):
    torch.manual_seed(seed)
    return MoETransformer(config)


def batch(config, B=3, S=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (B, S), generator=g)
    targets = torch.randint(0, config.vocab_size, (B, S), generator=g)
    return tokens, targets


def test_forward_shapes_and_lm_loss_is_cross_entropy():
    config = tiny()
    model = make_model(config)
    tokens, targets = batch(config)
    out = model(tokens, targets)
    assert out.logits.shape == (3, 16, config.vocab_size)
    expected = F.cross_entropy(out.logits.reshape(-1, config.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.lm_loss.dim() == 0 and out.aux_loss.dim() == 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    no_targets = model(tokens)
    assert no_targets.lm_loss is None and no_targets.loss is None


def test_ignore_index_targets_are_left_out():
    config = tiny()
    model = make_model(config)
    tokens, targets = batch(config)
    targets[:, :5] = -100
    out = model(tokens, targets)
    expected = F.cross_entropy(out.logits[:, 5:].reshape(-1, config.vocab_size), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)


def test_causality():
    config = tiny(n_layers=3)
    model = make_model(config).eval()
    tokens, _ = batch(config, B=2, S=20)
    j = 11
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 7) % config.vocab_size
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-4


def capture_moe_aux(model):
    captured = []
    for moe in model.moe_layers:
        moe.register_forward_hook(lambda mod, args, out: captured.append(out.aux_loss))
    return captured


def test_aux_loss_is_sum_of_layer_aux_losses():
    config = tiny(balancers=(AuxLoss(coeff=1e-2), ZLoss(coeff=1e-3)), n_layers=4)
    model = make_model(config)
    captured = capture_moe_aux(model)
    tokens, targets = batch(config)
    out = model(tokens, targets)
    assert len(captured) == len(model.moe_layers) == 3
    assert all(c.item() > 0 for c in captured)
    torch.testing.assert_close(out.aux_loss, torch.stack(captured).sum())
    torch.testing.assert_close(out.loss, out.lm_loss + torch.stack(captured).sum())


@pytest.mark.parametrize("balancers", [(), (LossFree(),)])
def test_aux_loss_is_exactly_zero_without_loss_balancers(balancers):
    config = tiny(balancers=balancers, n_layers=3)
    out = make_model(config)(*batch(config))
    assert out.aux_loss.item() == 0.0
    assert torch.equal(out.loss, out.lm_loss)


def test_all_dense_model_has_zero_aux_loss_and_no_loads():
    config = tiny(n_layers=2, n_dense_layers=2, balancers=(AuxLoss(coeff=1.0),))
    model = make_model(config)
    out = model(*batch(config))
    assert model.moe_layers == [] and out.layer_loads == []
    assert out.aux_loss.item() == 0.0


def test_layer_loads_count_every_token_top_k_times():
    config = tiny(n_layers=4)
    model = make_model(config)
    out = model(*batch(config, B=3, S=16))
    assert len(out.layer_loads) == 3
    for load_E in out.layer_loads:
        assert load_E.dtype == torch.int64 and load_E.shape == (config.moe.num_experts,)
        assert int(load_E.sum()) == 3 * 16 * config.moe.top_k


def test_mask_excludes_padding_from_loss_and_loads():
    config = tiny(n_layers=3, balancers=(AuxLoss(coeff=1e-2),))
    model = make_model(config)
    tokens, targets = batch(config, B=3, S=16)
    lengths = [16, 9, 4]  # right padding
    mask = torch.arange(16) < torch.tensor(lengths).unsqueeze(1)
    out = model(tokens, targets, mask=mask)
    logits, V = out.logits, config.vocab_size
    expected = F.cross_entropy(logits[mask].reshape(-1, V), targets[mask])
    torch.testing.assert_close(out.lm_loss, expected)
    # Each row alone, truncated to its length, routes exactly the unpadded tokens.
    per_row = [model(tokens[i:i + 1, :n]).layer_loads for i, n in enumerate(lengths)]
    for layer, load_E in enumerate(out.layer_loads):
        assert int(load_E.sum()) == sum(lengths) * config.moe.top_k
        assert torch.equal(load_E, sum(loads[layer] for loads in per_row))
    # Garbage in padded positions changes nothing that counts.
    noisy = tokens.masked_fill(~mask, 3)
    out2 = model(noisy, targets.masked_fill(~mask, 5), mask=mask)
    torch.testing.assert_close(out2.lm_loss, out.lm_loss)
    torch.testing.assert_close(out2.aux_loss, out.aux_loss)
    assert all(torch.equal(a, b) for a, b in zip(out2.layer_loads, out.layer_loads))


def test_param_counts_match_hand_formula():
    config = tiny()
    model = make_model(config)
    V, D, L, F_dense = config.vocab_size, config.d_model, config.n_layers, config.dense_ffn_hidden
    E, K, H, n_shared = (config.moe.num_experts, config.moe.top_k, config.moe.expert_hidden_size,
                         config.moe.num_shared_experts)
    assert (V, D, L, F_dense, E, K, H, n_shared) == (256, 64, 2, 176, 8, 2, 32, 1)
    attention = 4 * D * D + 2 * D  # qkv + proj + two norms per block
    expert = 3 * D * H
    moe_layer = E * D + E * expert + n_shared * expert
    total = V * D + L * attention + D + 3 * D * F_dense + (L - 1) * moe_layer
    counts = model.param_counts()
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())
    assert counts["activated"] == total - (E - K) * expert * (L - 1)
    assert counts["embedding"] == V * D
    assert counts["total_non_embedding"] == total - V * D
    assert counts["activated_non_embedding"] == counts["activated"] - V * D
    untied = make_model(dataclasses.replace(config, tie_embeddings=False)).param_counts()
    assert untied["total"] == total + V * D and untied["embedding"] == 2 * V * D


def test_paper_1b_on_meta_device():
    config = model_preset("paper-1b")
    assert (config.d_model, config.n_heads, config.n_layers, config.n_dense_layers) == (1024, 8, 10, 1)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.num_shared_experts) == (64, 6, 2)
    # expert hidden = 3/16 of the DeepSeekMoE dense width 8/3 * d exactly; the dense FFN itself
    # is rounded up to a multiple of 16 (2730.7 -> 2736).
    assert config.moe.expert_hidden_size == 512 == 3 * 8 * 1024 // (16 * 3)
    assert config.dense_ffn_hidden == 2736
    assert config.moe.router.score_fn == "sigmoid" and config.seq_len == 2048
    with torch.device("meta"):
        model = MoETransformer(config)
    counts = model.param_counts()
    # Measured: total 1,050,776,576 (1.05B, the paper's "1B"); activated 229,741,568.
    assert counts["total"] == 1_050_776_576
    assert counts["activated"] == 229_741_568
    assert 0.95e9 < counts["total"] < 1.15e9 and 0.2e9 < counts["activated"] < 0.26e9


def test_presets_build_and_describe_their_size():
    for name in PRESETS:
        config = model_preset(name, vocab_size=300, balancers=(LossFree(),))
        assert config.vocab_size == 300 and config.moe.balancers == (LossFree(),)
        assert config.dense_ffn_hidden == dense_ffn_width(config.d_model)
        assert config.moe.expert_hidden_size * 2 == config.d_model
    assert model_preset("quick", seq_len=256).seq_len == 256
    assert model_preset("tiny", router=RouterConfig(score_fn="softmax")).moe.router.score_fn == "softmax"
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*paper-1b"):
        model_preset("huge")


def test_gradient_checkpointing_same_loss_grads_and_counts():
    base = tiny(n_layers=3, balancers=(LossFree(), AuxLoss(coeff=1e-2)))
    tokens, targets = batch(base)
    results = []
    for ckpt in (False, True):
        model = make_model(dataclasses.replace(base, gradient_checkpointing=ckpt)).train()
        out = model(tokens, targets)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        pending = [m.balancers[0].pending_counts.clone() for m in model.moe_layers]
        results.append((out.loss.detach(), grads, pending, out.layer_loads))
    (loss_a, grads_a, pend_a, loads_a), (loss_b, grads_b, pend_b, loads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9, msg=name)
    # Recomputation must not count tokens twice.
    for p_a, p_b, load in zip(pend_a, pend_b, loads_a):
        assert torch.equal(p_a, p_b) and torch.equal(p_a, load)


def test_autocast_bf16_forward_backward():
    config = tiny(balancers=(LossFree(),))
    model = make_model(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch(config))
    assert out.lm_loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.moe_layers[0].router.weight.grad.abs().sum() > 0


def test_memorises_a_repeated_batch():
    config = tiny(balancers=(LossFree(),))
    model = make_model(config).train()
    tokens, targets = batch(config, B=4, S=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        out = model(tokens, targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        update_balancers(model)
        losses.append(out.lm_loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.05)
    assert losses[-1] < 0.3 * losses[0]
    assert model.moe_layers[0].expert_bias.abs().sum() > 0  # the bias moved


def test_init_std():
    config = model_preset("quick", balancers=(LossFree(),))
    model = make_model(config)
    moe = model.moe_layers[0]
    for weight in (moe.experts.w_gate, model.tok_emb.weight, model.blocks[0].attn.qkv.weight,
                   model.blocks[0].ffn.w_down.weight):
        assert weight.std().item() == pytest.approx(0.006, rel=0.02)
    assert moe.router.weight.std().item() == pytest.approx(0.006, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(config.d_model))
    assert torch.equal(moe.expert_bias, torch.zeros(config.moe.num_experts))  # buffer untouched


def test_rejects_too_long_sequences_and_bad_mask_shape():
    config = tiny()
    model = make_model(config)
    with pytest.raises(ValueError, match="exceeds ModelConfig.seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), mask=torch.ones(2, 5, dtype=torch.bool))


GOOD = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=8, dense_ffn_hidden=24,
            moe=MoEConfig(d_model=16, num_experts=4, top_k=2, expert_hidden_size=8))


@pytest.mark.parametrize("field,value,match", [
    ("vocab_size", 0, r"vocab_size=0 must be an integer >= 1"),
    ("d_model", 16.0, r"d_model=16.0 must be an integer >= 1"),
    ("n_layers", -1, r"n_layers=-1 must be an integer >= 1"),
    ("n_heads", True, r"n_heads=True must be an integer >= 1"),
    ("seq_len", 0, r"seq_len=0 must be an integer >= 1"),
    ("dense_ffn_hidden", 0, r"dense_ffn_hidden=0 must be an integer >= 1"),
    ("n_dense_layers", -1, r"n_dense_layers=-1 must be an integer >= 0"),
    ("n_dense_layers", 3, r"n_dense_layers=3 must be <= n_layers=2"),
    ("n_heads", 3, r"d_model=16 must be divisible by n_heads=3"),
    ("n_heads", 16, r"d_model/n_heads=1 must be even"),
    ("moe", "big", r"moe must be a MoEConfig, got str"),
    ("moe", MoEConfig(d_model=32, num_experts=4, top_k=2, expert_hidden_size=8),
     r"moe.d_model=32 must equal ModelConfig.d_model=16"),
    ("init_std", 0.0, r"init_std=0.0 must be a finite number > 0"),
    ("init_std", float("nan"), r"init_std=nan must be a finite number > 0"),
    ("rope_theta", -1.0, r"rope_theta=-1.0 must be a finite number > 0"),
    ("norm_eps", "1e-6", r"norm_eps='1e-6' must be a finite number > 0"),
    ("tie_embeddings", 1, r"tie_embeddings=1 must be True or False"),
    ("gradient_checkpointing", None, r"gradient_checkpointing=None must be True or False"),
])
def test_model_config_errors(field, value, match):
    ModelConfig(**GOOD)  # the base is valid
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**GOOD, field: value})
