#!/usr/bin/env python3
"""Reference for gated_deltanet: transformers' Qwen3NextGatedDeltaNet (its pure-PyTorch chunked gated delta
rule) in float32 on random weights. Writes, as text, the sizes ("config KEY VALUE"), every parameter under its
transformers name, the input, the output, a probe and the gradients of sum(output * probe) ("grad/NAME").
Read by the test MatchesTransformersQwen3NextGatedDeltaNet in plugins/attention/gated_deltanet/.
Usage: gated_deltanet_reference.py OUT_FILE"""
import sys

import torch
import transformers
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

torch.manual_seed(0)
sizes = dict(hidden_size=16, num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6, conv_kernel=4)
config = transformers.Qwen3NextConfig(
    hidden_size=sizes["hidden_size"], num_hidden_layers=1, layer_types=["linear_attention"],
    linear_num_key_heads=sizes["num_key_heads"], linear_num_value_heads=sizes["num_value_heads"],
    linear_key_head_dim=sizes["key_head_dim"], linear_value_head_dim=sizes["value_head_dim"],
    linear_conv_kernel_dim=sizes["conv_kernel"], rms_norm_eps=1e-6, hidden_act="silu")
module = Qwen3NextGatedDeltaNet(config, layer_idx=0).float()
with torch.no_grad():  # values far from the initial ones, so a misplaced row or a swapped gate shows
    for name, parameter in module.named_parameters():
        if name in ("in_proj_qkvz.weight", "in_proj_ba.weight", "out_proj.weight"):
            parameter.normal_(0.0, 0.3)
    module.dt_bias.normal_(0.0, 1.0)
    module.A_log.uniform_(-1.0, 1.0)
    module.norm.weight.normal_(1.0, 0.5)

# 37 tokens: the reference's 64-token chunks pad; PithTrain's test uses chunk_size 16 (two full chunks and a remainder).
x = torch.randn(2, 37, sizes["hidden_size"]).requires_grad_(True)
out = module(x)
probe = torch.randn_like(out)
(out * probe).sum().backward()

tensors = {name: parameter.detach() for name, parameter in module.named_parameters()}
tensors.update({"input": x.detach(), "output": out.detach(), "probe": probe, "grad/input": x.grad})
tensors.update({"grad/" + name: parameter.grad for name, parameter in module.named_parameters()})
with open(sys.argv[1], "w") as file:
    for key, value in {**sizes, "chunk_size": 16}.items():
        file.write(f"config {key} {value}\n")
    for name, tensor in tensors.items():
        file.write(f"{name} {tensor.dim()} {' '.join(str(size) for size in tensor.shape)}\n")
        file.write(" ".join(f"{value:.9g}" for value in tensor.float().reshape(-1).tolist()) + "\n")
print(f"wrote {len(tensors)} tensors to {sys.argv[1]}; output scale {out.abs().max().item():.3g}")
