#!/usr/bin/env python3
"""Builds a tiny randomly initialised transformers model of ARCH, saves it as a Hugging Face folder, and
saves what the parity test compares against: tokens, logits, loss and named gradients (under PithTrain's
parameter names). Usage: make_reference.py ARCH OUT_DIR"""
import sys

import torch
from safetensors.torch import save_file
import transformers

arch, out = sys.argv[1], sys.argv[2]
common = dict(vocab_size=257, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
if arch == "qwen3_moe":
    config = transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                                         num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6)
    model_class = transformers.Qwen3MoeForCausalLM
elif arch == "mixtral":
    config = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                        rope_theta=1e6, sliding_window=None)
    model_class = transformers.MixtralForCausalLM
elif arch == "olmoe":
    config = transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                      norm_topk_prob=False)
    model_class = transformers.OlmoeForCausalLM
elif arch in ("deepseek_v2_lite", "deepseek_v2"):
    # V2-Lite: no query compression, greedy top-k; V2: query compression and group-limited routing.
    config = transformers.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=64,
                                           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                           n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=24,
                                           qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                                           routed_scaling_factor=1.5, norm_topk_prob=False,
                                           q_lora_rank=None if arch == "deepseek_v2_lite" else 16,
                                           topk_method="greedy" if arch == "deepseek_v2_lite" else "group_limited_greedy",
                                           n_group=4, topk_group=2)
    model_class = transformers.DeepseekV2ForCausalLM
elif arch == "deepseek_v3":
    config = transformers.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=64,
                                           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                           n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=16,
                                           qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=4,
                                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                           rope_interleave=True, num_nextn_predict_layers=0)
    model_class = transformers.DeepseekV3ForCausalLM
else:
    sys.exit(f"unknown architecture {arch}")
config.pad_token_id = config.bos_token_id = config.eos_token_id = None

torch.manual_seed(0)
model = model_class(config).float()
with torch.no_grad():  # a non-zero aux-free bias, so the test covers how it steers the choice
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.2)
model.save_pretrained(out)
tokens = torch.randint(0, config.vocab_size, (2, 17))
result = model(input_ids=tokens, labels=tokens)  # the loss excludes the router loss (output_router_logits is off)
result.loss.backward()

reference = {"tokens": tokens, "logits": result.logits[:, :-1].detach().contiguous(), "loss": result.loss.detach().reshape(1)}
for name, parameter in model.named_parameters():
    ours = (name.replace("model.embed_tokens.weight", "embedding.weight").replace("model.norm.weight", "final_norm.weight")
            .replace("model.layers.", "layers.").replace("self_attn.", "attention.").replace("input_layernorm", "attention_norm")
            .replace("post_attention_layernorm", "ffn_norm").replace("block_sparse_moe.", "mlp.").replace("mlp.gate.", "router.gate.")
            .replace("mlp.experts.", "experts.").replace("mlp.shared_experts.", "shared_experts.")
            .replace("kv_a_proj_with_mqa", "kv_a_proj").replace("kv_a_layernorm", "kv_a_norm").replace("q_a_layernorm", "q_a_norm"))
    if ".mlp." in ours or ".shared_experts." in ours:  # dense FFN and shared experts: PithTrain names drop ".weight"
        ours = ours[: -len(".weight")]
    if ours.startswith("layers.") and ".attention." in ours and ours.endswith(".weight"):
        ours = ours[: -len(".weight")]
    grad = parameter.grad.detach()
    if ours.endswith("experts.gate_up_proj"):  # [E, 2F, H]: gate rows first, then up
        half = grad.shape[1] // 2
        reference["grad/" + ours.replace("gate_up_proj", "gate_proj")] = grad[:, :half].contiguous()
        reference["grad/" + ours.replace("gate_up_proj", "up_proj")] = grad[:, half:].contiguous()
    else:
        reference["grad/" + ours] = grad.contiguous()
save_file(reference, f"{out}/reference.safetensors")
print(f"{arch}: loss {result.loss.item():.6f}, logits scale {result.logits.abs().max().item():.3f}, "
      f"{len(reference) - 3} gradients")
