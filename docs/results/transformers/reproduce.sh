#!/bin/sh
# The README's "Fine-tuning a transformers checkpoint" table: two tiny random checkpoints,
# 3 seeds x {adaptive, sign u=1e-3, frozen bias}, 200 steps each (about 10 minutes on 2 cores).
set -e
OUT=${1:-runs/finetune}
mkdir -p "$OUT"
.venv/bin/python - "$OUT" <<'PY'
import sys, torch, transformers
common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, num_experts_per_tok=2)
families = {"mixtral": dict(num_local_experts=8, intermediate_size=128),
            "deepseek_v3": dict(n_routed_experts=8, n_shared_experts=1, intermediate_size=128, moe_intermediate_size=64,
                                n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)}
for family, kw in families.items():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **{**common, **kw})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(f"{sys.argv[1]}/{family}")
PY
for family in mixtral deepseek_v3; do for seed in 0 1 2; do
  for mode in "adaptive 1e-3" "sign 1e-3" "sign 0"; do set -- $mode
    .venv/bin/moe-balance finetune "$OUT/$family" --steps 200 --seed "$seed" --rule "$1" --update-rate "$2" \
      --out "$OUT/${family}_s${seed}_$1_$2" --overwrite
  done; done; done
