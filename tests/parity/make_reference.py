#!/usr/bin/env python3
"""Builds a tiny randomly initialised transformers model of ARCH, saves it as a Hugging Face folder, and
saves what the parity test compares against: tokens, logits, loss and named gradients (under PithTrain's
parameter names). Usage: make_reference.py ARCH OUT_DIR

deepseek_v3_mtp: DeepSeek-V3 with one multi-token prediction depth (the report's section 2.2). transformers builds
no MTP layer, so this script writes its tensors (Hugging Face layer num_hidden_layers) into the file and computes
its loss itself: the decoder layer is transformers' own (a one-layer DeepseekV3 model run on inputs_embeds), the
norms, projection and cross-entropy are written out below."""
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
elif arch in ("deepseek_v3", "deepseek_v3_mtp"):
    config = transformers.DeepseekV3Config(**{**common, "num_key_value_heads": 4, "max_position_embeddings": 1280},
                                           intermediate_size=64,
                                           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                           n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=16,
                                           qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_group=4,
                                           topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                           rope_interleave=True,
                                           num_nextn_predict_layers=1 if arch == "deepseek_v3_mtp" else 0,
                                           # YaRN as the published checkpoints (factor 40, mscale 1), on a short
                                           # original context so the blend range covers these rotary dims
                                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                            "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    model_class = transformers.DeepseekV3ForCausalLM
elif arch == "gpt_oss":
    # Layer 0 slides (window 5 of 16 positions), layer 1 is full; a low swiglu_limit so the clamps bite;
    # YaRN without truncation as GPT-OSS, on a short original context so the blend covers these dims.
    config = transformers.GptOssConfig(**{**common, "max_position_embeddings": 512}, head_dim=16, intermediate_size=24, num_local_experts=6,
                                       num_experts_per_tok=2, sliding_window=5, swiglu_limit=1.5,
                                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 8.0,
                                                        "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 64})
    model_class = transformers.GptOssForCausalLM
elif arch in ("qwen3_next", "qwen3_5_moe"):
    # Hybrid: three Gated DeltaNet layers, then gated full attention (head_dim 32, a quarter rotated: 8 dims),
    # with more value than key heads and dv != dk so a misgrouped projection row shows. Qwen3-Next's shared
    # expert is two routed experts wide (shared_experts = 2); Qwen3.5 always renormalises its top-k.
    hybrid = dict(common, num_hidden_layers=4, head_dim=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                  linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    if arch == "qwen3_next":
        config = transformers.Qwen3NextConfig(**hybrid, shared_expert_intermediate_size=48, norm_topk_prob=True)
        model_class = transformers.Qwen3NextForCausalLM
    else:
        config = transformers.Qwen3_5MoeTextConfig(**hybrid, shared_expert_intermediate_size=24)
        model_class = transformers.Qwen3_5MoeForCausalLM
elif arch == "glm4_moe":
    # GLM-4.5: a dense first layer, one shared expert, sigmoid routing with the correction bias limited to 2 of 4
    # groups and scaled by 2.5, q/k/v biases (none on o_proj), per-head QK-norm (GLM-4.5; -Air has none), half
    # of each 16-dim head rotated. The MTP layer the config names (num_nextn_predict_layers = 1) is not built.
    config = transformers.Glm4MoeConfig(**common, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                        routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5})
    model_class = transformers.Glm4MoeForCausalLM
elif arch == "minimax_m2":
    # MiniMax-M2: RMSNorm over the whole q and k projections, 8 of 16 dims rotated (rotary_dim as published),
    # sigmoid routing with the correction bias, renormalised, no shared expert.
    config = transformers.MiniMaxM2Config(**common, head_dim=16, intermediate_size=16, num_local_experts=8,
                                          num_experts_per_tok=2, rotary_dim=8, rms_norm_eps=1e-6)
    model_class = transformers.MiniMaxM2ForCausalLM
else:
    sys.exit(f"unknown architecture {arch}")
config.pad_token_id = config.bos_token_id = config.eos_token_id = None

torch.manual_seed(0)
model = model_class(config).float()
with torch.no_grad():  # a non-zero aux-free bias, so the test covers how it steers the choice
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.2)
    for name, parameter in model.named_parameters():  # GPT-OSS biases start at zero; make them matter
        if name.endswith("bias") or name.endswith("sinks"):
            parameter.copy_(torch.randn_like(parameter) * 0.5)
        if arch in ("qwen3_next", "qwen3_5_moe") and name.endswith("norm.weight"):  # zero-centred (1 + w): start at 0
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        if arch in ("glm4_moe", "minimax_m2") and name.endswith("norm.weight"):  # QK-norms start at 1: a misplaced one shows
            parameter.copy_(1 + torch.randn_like(parameter) * 0.3)
model.save_pretrained(out)
tokens = torch.randint(0, config.vocab_size, (2, 17))
mtp_parameters = []  # (Hugging Face name, parameter) of the MTP depth
if arch == "deepseek_v3_mtp":
    import copy, json, os
    import torch.nn.functional as F
    from safetensors.torch import load_file
    L, H, mtp_coeff = config.num_hidden_layers, config.hidden_size, 0.25
    # The MTP decoder layer: layer 0 of a one-layer model (MoE, as the published layer 61), its final norm the
    # depth's shared_head.norm, its head the main model's (shared).
    helper_config = copy.deepcopy(config)
    helper_config.num_hidden_layers, helper_config.first_k_dense_replace = 1, 0
    helper = model_class(helper_config).float()
    helper.lm_head.weight = model.lm_head.weight
    with torch.no_grad():
        helper.model.layers[0].mlp.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.2)
        helper.model.norm.weight.copy_(1 + 0.3 * torch.randn(H))
    enorm = torch.nn.Parameter(1 + 0.3 * torch.randn(H))
    hnorm = torch.nn.Parameter(1 + 0.3 * torch.randn(H))
    eh_proj = torch.nn.Parameter(torch.randn(H, 2 * H) * 0.1)
    prefix = f"model.layers.{L}."
    mtp_parameters = [(prefix + "enorm.weight", enorm), (prefix + "hnorm.weight", hnorm), (prefix + "eh_proj.weight", eh_proj),
                      (prefix + "shared_head.norm.weight", helper.model.norm.weight)]
    mtp_parameters += [(prefix + name, p) for name, p in helper.model.layers[0].named_parameters()]
    # The file gets the depth's tensors in the on-disk layout (the helper's own save, layer 0 renamed to layer L),
    # with copies of the embedding and the head as the published checkpoint has.
    helper.save_pretrained(f"{out}/mtp_helper")
    weights = load_file(f"{out}/model.safetensors")
    for name, tensor in load_file(f"{out}/mtp_helper/model.safetensors").items():
        if name.startswith("model.layers.0."):
            weights[prefix + name[len("model.layers.0."):]] = tensor
    for name, p in mtp_parameters[:4]:
        weights[name] = p.detach().clone()
    weights[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    weights[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out}/config.json") as f:
        config_json = json.load(f)
    config_json.pop("num_mtp_layers", None)
    config_json["num_nextn_predict_layers"] = 1  # the published key, whatever transformers' default leaves out
    with open(f"{out}/config.json", "w") as f:
        json.dump(config_json, f, indent=2)
    captured = {}
    model.model.norm.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
result = model(input_ids=tokens, labels=tokens)  # the loss excludes the router loss (output_router_logits is off)
loss = result.loss
if arch == "deepseek_v3_mtp":
    # Position i < S - 1 (S = 16 inputs): [enorm(Emb(t_{i+1})); hnorm(h_i)] -> eh_proj -> the decoder layer ->
    # shared_head.norm -> the shared head, predicting t_{i+2}; h is the main model's state before its final norm.
    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * weight
    S = tokens.shape[1] - 1
    embedded = model.model.embed_tokens(tokens[:, 1:S])
    merged = torch.cat([rms_norm(embedded, enorm), rms_norm(captured["hidden"][:, : S - 1], hnorm)], -1)
    mtp_logits = helper(inputs_embeds=F.linear(merged, eh_proj)).logits  # [2, S - 1, V]
    mtp_cross_entropy = F.cross_entropy(mtp_logits.reshape(-1, config.vocab_size), tokens[:, 2:].reshape(-1))
    loss = loss + mtp_coeff * mtp_cross_entropy
loss.backward()

split_projections = {}  # Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a gradients, by PithTrain-style name
reference = {"tokens": tokens, "logits": result.logits[:, :-1].detach().contiguous(), "loss": loss.detach().reshape(1)}
if arch == "deepseek_v3_mtp":
    reference["mtp_loss"] = (mtp_coeff * mtp_cross_entropy).detach().reshape(1)
    reference["mtp_loss_coeff"] = torch.tensor([mtp_coeff])
mtp_names = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
             "shared_head.norm.weight": "final_norm.weight"}
for name, parameter in list(model.named_parameters()) + mtp_parameters:
    if arch == "deepseek_v3_mtp" and name.startswith(prefix) and name[len(prefix):] in mtp_names:
        reference["grad/mtp_layers.0." + mtp_names[name[len(prefix):]]] = parameter.grad.detach().contiguous()
        continue
    ours = (name.replace("model.embed_tokens.weight", "embedding.weight").replace("model.norm.weight", "final_norm.weight")
            .replace("model.layers.", "layers.").replace("self_attn.", "attention.").replace("input_layernorm", "attention_norm")
            .replace("post_attention_layernorm", "ffn_norm").replace("block_sparse_moe.", "mlp.").replace("mlp.gate.", "router.gate.").replace("mlp.router.", "router.gate.")
            .replace("mlp.experts.", "experts.").replace("mlp.shared_experts.", "shared_experts.")
            .replace("kv_a_proj_with_mqa", "kv_a_proj").replace("kv_a_layernorm", "kv_a_norm").replace("q_a_layernorm", "q_a_norm")
            .replace("mlp.shared_expert_gate.", "shared_experts.gate.").replace("mlp.shared_expert.", "shared_experts.")
            .replace("linear_attn.", "linear_attention."))
    if ".mlp." in ours or ".shared_experts." in ours:  # dense FFN and shared experts: PithTrain names drop ".weight"
        ours = ours[: -len(".weight")]
    if ours.startswith("layers.") and (".attention." in ours or ".linear_attention." in ours) and ours.endswith(".weight"):
        ours = ours[: -len(".weight")]
    if ".attention." in ours and ours.endswith(".bias"):  # PithTrain: attention.q_proj_bias
        ours = ours[: -len(".bias")] + "_bias"
    if arch == "deepseek_v3_mtp" and ours.startswith(f"layers.{L}."):  # the MTP depth's decoder layer
        ours = "mtp_layers.0." + ours[len(f"layers.{L}."):]
    grad = parameter.grad.detach()
    if arch == "gpt_oss" and ours.endswith("experts.gate_up_proj"):  # [E, H, 2F], gate and up interleaved
        reference["grad/" + ours.replace("gate_up_proj", "gate_proj")] = grad[:, :, 0::2].transpose(1, 2).contiguous()
        reference["grad/" + ours.replace("gate_up_proj", "up_proj")] = grad[:, :, 1::2].transpose(1, 2).contiguous()
    elif arch == "gpt_oss" and ours.endswith("experts.gate_up_proj_bias"):  # [E, 2F]
        reference["grad/" + ours.replace("gate_up_proj_bias", "gate_bias")] = grad[:, 0::2].contiguous()
        reference["grad/" + ours.replace("gate_up_proj_bias", "up_bias")] = grad[:, 1::2].contiguous()
    elif arch == "gpt_oss" and ours.endswith("experts.down_proj"):  # [E, F, H]
        reference["grad/" + ours] = grad.transpose(1, 2).contiguous()
    elif ours.endswith("experts.down_proj_bias"):
        reference["grad/" + ours.replace("down_proj_bias", "down_bias")] = grad.contiguous()
    elif ours.endswith("experts.gate_up_proj"):  # [E, 2F, H]: gate rows first, then up
        half = grad.shape[1] // 2
        reference["grad/" + ours.replace("gate_up_proj", "gate_proj")] = grad[:, :half].contiguous()
        reference["grad/" + ours.replace("gate_up_proj", "up_proj")] = grad[:, half:].contiguous()
    elif ours.endswith("linear_attention.in_proj_qkv") or ours.endswith("linear_attention.in_proj_b"):
        split_projections[ours] = grad  # Qwen3.5: regrouped below, with their partners in_proj_z and in_proj_a
    elif ours.endswith("linear_attention.in_proj_z") or ours.endswith("linear_attention.in_proj_a"):
        split_projections[ours] = grad
    else:
        reference["grad/" + ours] = grad.contiguous()
# Qwen3.5's separate Gated DeltaNet projections, in gated_deltanet's per-key-head grouping (Qwen3-Next's):
# for key head i its q rows, k rows, then v and z rows of its value heads; b then a rows of its value heads.
nk, nv = getattr(config, "linear_num_key_heads", 1), getattr(config, "linear_num_value_heads", 1)
dk, dv, r = getattr(config, "linear_key_head_dim", 1), getattr(config, "linear_value_head_dim", 1), nv // nk
for name in [n for n in split_projections if n.endswith("in_proj_qkv")]:
    prefix, qkv = name[: -len("in_proj_qkv")], split_projections[name]
    z, b, a = (split_projections[prefix + part] for part in ("in_proj_z", "in_proj_b", "in_proj_a"))
    rows = []
    for i in range(nk):
        rows += [qkv[i * dk:(i + 1) * dk], qkv[nk * dk + i * dk:nk * dk + (i + 1) * dk],
                 qkv[2 * nk * dk + i * r * dv:2 * nk * dk + (i + 1) * r * dv], z[i * r * dv:(i + 1) * r * dv]]
    reference["grad/" + prefix + "in_proj_qkvz"] = torch.cat(rows).contiguous()
    reference["grad/" + prefix + "in_proj_ba"] = torch.cat(
        [part for i in range(nk) for part in (b[i * r:(i + 1) * r], a[i * r:(i + 1) * r])]).contiguous()
save_file(reference, f"{out}/reference.safetensors")
print(f"{arch}: loss {result.loss.item():.6f}, logits scale {result.logits.abs().max().item():.3f}, "
      f"{len(reference) - 3} gradients")
