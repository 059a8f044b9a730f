"""Loss-Free Balancing on transformers MoE models: tiny random configs of five families, offline."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the hf extra; `make test` installs it

from moe_balance import update_balancers  # noqa: E402
from moe_balance.integrations.transformers import (LossFreeCallback, disable, enable_loss_free,  # noqa: E402
                                                   loss_free_routers, record_loads)
from moe_balance.metrics import max_vio  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "mixtral": dict(COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=2),
    "deepseek_v3": dict(COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
}
FAMILIES = list(CONFIGS)


def tiny(family, seed=0):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **CONFIGS[family])
    model = transformers.AutoModelForCausalLM.from_config(config)
    if family == "deepseek_v3":  # a checkpoint's bias: enabling must start from it
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


def tokens(seed=0, batch=4, length=16, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def skewed(seed, batch=8, length=16):
    """Tokens from a narrow slice of the vocabulary: a few experts get most of them."""
    return torch.randint(5, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_enabling_without_an_update_changes_nothing(family):
    original = tiny(family)
    model = enable_loss_free(copy.deepcopy(original))
    x = tokens()
    for m in (original, model):
        m.train()  # training mode: the counting path is active too
    out, ref = model(x, labels=x, output_router_logits=True), original(x, labels=x, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    # transformers still records the routers' logits (the subclass is an instance of its class)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a, b)
    routers = loss_free_routers(model)
    assert routers and all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    if family == "deepseek_v3":  # the checkpoint's bias is the starting point
        starts = [b for n, b in original.named_buffers() if n.endswith("e_score_correction_bias")]
        for r, start in zip(routers, starts):
            assert torch.equal(r.e_score_correction_bias, start) and start.abs().sum() > 0


def train(model, steps, lr=1e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x = skewed(step)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        update_balancers(model)


def eval_maxvio(model):
    model.eval()
    with torch.no_grad(), record_loads(model) as loads:
        for seed in range(100, 104):
            model(skewed(seed))
    return float(max_vio(torch.stack(loads)).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bias_moves_and_balances_skewed_routing(family):
    # the adaptive controller: the sign rule's fixed +-u dithers on 4 experts (tested elsewhere)
    balanced = enable_loss_free(tiny(family), rule="adaptive")
    plain = enable_loss_free(tiny(family), update_rate=0.0)  # the same run, the bias never moves
    before = eval_maxvio(balanced)
    train(balanced, 40)
    train(plain, 40)
    biases = [r.e_score_correction_bias for r in loss_free_routers(balanced)]
    starts = [r.e_score_correction_bias for r in loss_free_routers(plain)]
    assert all(not torch.equal(b, s) for b, s in zip(biases, starts))
    after, without = eval_maxvio(balanced), eval_maxvio(plain)
    assert after < 0.5 * without, (before, after, without)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_gradient_checkpointing_counts_each_forward_once(family, reentrant):
    model = enable_loss_free(tiny(family))
    reference = enable_loss_free(tiny(family))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    x = skewed(0)
    for m in (model, reference):
        m.train()
        m(x, labels=x).loss.backward()
    counts = [r.balancer.pending_counts for r in loss_free_routers(model)]
    expected = [r.balancer.pending_counts for r in loss_free_routers(reference)]
    for c, e in zip(counts, expected):
        assert torch.equal(c, e) and int(c.sum()) == x.numel() * 2  # top-2: one count per choice


def test_a_frozen_router_still_counts():
    model = enable_loss_free(tiny("mixtral"))
    for name, p in model.named_parameters():
        p.requires_grad_("gate" not in name)  # LoRA-style fine-tuning leaves the router frozen
    x = skewed(0)
    model.train()
    model(x, labels=x).loss.backward()
    assert all(int(r.balancer.pending_counts.sum()) == x.numel() * 2 for r in loss_free_routers(model))


def test_no_counting_outside_training_forwards():
    model = enable_loss_free(tiny("qwen3_moe"))
    x = skewed(0)
    model.eval()
    model(x, labels=x).loss.backward()  # eval mode
    model.train()
    with torch.no_grad():
        model(x)
    assert all(int(r.balancer.pending_counts.sum()) == 0 for r in loss_free_routers(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_keeps_the_bias(family, tmp_path):
    model = enable_loss_free(tiny(family), update_rate=1e-2)
    train(model, 3)
    biases = {id_: r.e_score_correction_bias.clone() for id_, r in enumerate(loss_free_routers(model))}
    model.save_pretrained(tmp_path)
    keys = model.state_dict().keys()
    assert not any(".balancer." in k for k in keys)
    assert sum(k.endswith("gate.e_score_correction_bias") for k in keys) == len(biases)
    # plain transformers loads the directory
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = tokens(3)
    if family == "deepseek_v3":  # under its own key: plain transformers routes with it
        loaded = [b for n, b in plain.named_buffers() if n.endswith("e_score_correction_bias")]
        assert all(torch.equal(loaded[i], biases[i]) for i in biases)
    # moe_balance takes the saved biases back (for the others, from the files)
    again = enable_loss_free(plain, bias_from=str(tmp_path))
    for i, r in enumerate(loss_free_routers(again)):
        assert torch.equal(r.e_score_correction_bias, biases[i])
    model.eval(), again.eval()
    assert torch.equal(again(x).logits, model(x).logits)


def test_disable_restores_the_transformers_classes(tmp_path):
    model = enable_loss_free(tiny("deepseek_v3"), update_rate=1e-2)
    train(model, 2)
    updated = [r.e_score_correction_bias.clone() for r in loss_free_routers(model)]
    biases = disable(model)
    assert not loss_free_routers(model)
    gates = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    assert len(gates) == len(updated) == len(biases)
    for gate, bias in zip(gates, updated):
        assert torch.equal(gate.e_score_correction_bias, bias)
    mixtral = enable_loss_free(tiny("mixtral"))
    disable(mixtral)
    assert not any("e_score_correction_bias" in k for k in mixtral.state_dict())


def test_unsupported_models_are_named():
    config = transformers.AutoConfig.for_model("llama", **{k: v for k, v in COMMON.items()}, intermediate_size=64)
    with pytest.raises(ValueError, match="no supported MoE router in LlamaForCausalLM; supported families"):
        enable_loss_free(transformers.AutoModelForCausalLM.from_config(config))
    model = enable_loss_free(tiny("olmoe"))
    with pytest.raises(ValueError, match="already enabled"):
        enable_loss_free(model)


def test_trainer_callback_updates_once_per_optimizer_step(tmp_path):
    model = enable_loss_free(tiny("qwen2_moe"), update_rate=1e-2)
    data = [{"input_ids": skewed(i, batch=1)[0], "labels": skewed(i, batch=1)[0]} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, logging_steps=1, report_to=[],
                                          use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    callback = LossFreeCallback.attach(trainer)
    seen = []

    class Logger(transformers.TrainerCallback):  # stands for a reporting integration
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer.add_callback(Logger())
    trainer.train()
    assert callback.updates == 3
    assert all(int(r.balancer.num_updates) == 3 for r in loss_free_routers(model))
    step_logs = [s for s in seen if "loss" in s]
    assert len(step_logs) == 3 and all("maxvio_batch" in s and "maxvio_batch/layer_0" in s for s in step_logs)


def test_finetune_command_balances_a_saved_checkpoint(tmp_path, capsys):
    import json

    from moe_balance.harness.cli import main

    config = transformers.AutoConfig.for_model("qwen3_moe", **{**CONFIGS["qwen3_moe"], "vocab_size": 300})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(" ".join(f"word{(j * 7 + i) % 60}" for j in range(4000)))
    common = ["finetune", str(tmp_path / "model"), "--data", str(corpus), "--steps", "30", "--seq-len", "32",
              "--eval-tokens", "4096", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "balanced")]) == 0
    printed = capsys.readouterr().out
    assert main([*common, "--rule", "sign", "--update-rate", "0", "--out", str(tmp_path / "plain")]) == 0
    balanced, plain = (json.loads((tmp_path / d / "finetune.json").read_text()) for d in ("balanced", "plain"))
    assert balanced["before"] == plain["before"]  # the same model, windows and measurement
    assert balanced["after"]["maxvio_global"] < 0.5 * plain["after"]["maxvio_global"]
    assert f"{balanced['after']['maxvio_global']:.3f}" in printed and "MaxVio_global" in printed
    # the saved checkpoint loads in plain transformers; moe_balance takes its biases back
    again = enable_loss_free(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "balanced"),
                             bias_from=str(tmp_path / "balanced"))
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in loss_free_routers(again))
    # a non-empty --out is refused
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "balanced")])


def _dp_worker(rank, world, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = enable_loss_free(tiny("olmoe"), update_rate=1e-2, process_group=dist.group.WORLD)
        model.train()
        x = skewed(rank)  # each rank its own tokens
        model(x, labels=x).loss.backward()
        update_balancers(model)
        results[rank] = [r.e_score_correction_bias.clone() for r in loss_free_routers(model)]
        del model
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_share_one_bias_from_the_global_counts():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_dp_worker, args=(2, port, results), nprocs=2, join=True)
    # one process seeing both ranks' tokens before one update
    model = enable_loss_free(tiny("olmoe"), update_rate=1e-2)
    model.train()
    for rank in range(2):
        x = skewed(rank)
        model(x, labels=x).loss.backward()
    local = enable_loss_free(tiny("olmoe"), update_rate=1e-2)
    local.train()
    local(skewed(0), labels=skewed(0)).loss.backward()
    update_balancers(model)
    update_balancers(local)
    for i, r in enumerate(loss_free_routers(model)):
        assert torch.equal(results[0][i], r.e_score_correction_bias)
        assert torch.equal(results[1][i], r.e_score_correction_bias)
    assert any(not torch.equal(results[0][i], r.e_score_correction_bias)
               for i, r in enumerate(loss_free_routers(local))), "global and local counts should differ here"
