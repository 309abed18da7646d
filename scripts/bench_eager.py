#!/usr/bin/env python3
"""The PithTrain tiny architecture as a plain PyTorch eager training loop: the other side of
scripts/bench_cpu.sh (benchmark only; not used by training or tests).

Same model as configs/tiny.toml with its defaults: byte embedding; per layer RMSNorm, GQA attention with
RoPE (theta 10000) through scaled_dot_product_attention, RMSNorm, then a dense SwiGLU FFN (first layer)
or a shared SwiGLU expert plus top-k routed SwiGLU experts chosen by sigmoid scores plus a balancing
bias (aux-free, renormalised weights, bias updated after each step); final RMSNorm, LM head,
cross-entropy; AdamW (weight decay on matrices), gradient clipping at 1.0. Random tokens: the speed
does not depend on them.
On a GPU (--device cuda) the same loop runs in float32 parameters under bfloat16 autocast
(--dtype bfloat16), optionally under torch.compile (--compile), and also prints the peak memory.
Prints one line per step: "step N seconds S tokens T loss L", on the CPU followed by "start_mb A peak_mb B":
the resident memory when the step began and its highest during the step (VmHWM, restarted each step
as PithTrain's metrics step_peak_memory_mb is). Usage: see --help.
"""
import argparse, time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
for name, default in (("vocab", 257), ("hidden", 128), ("layers", 4), ("heads", 4), ("kv_heads", 2), ("dense_hidden", 384),
                      ("experts", 8), ("top_k", 2), ("expert_hidden", 128), ("shared_experts", 1), ("first_dense", 1),
                      ("batch", 16), ("seq", 128), ("steps", 20), ("threads", 0), ("seed", 1234), ("head_dim", 0)):
    parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=default)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--router", choices=("sigmoid", "softmax"), default="sigmoid",
                    help="sigmoid: aux-free (bias for the choice, tiny.toml); softmax: top-k softmax (Qwen3-MoE)")
parser.add_argument("--qk-norm", action="store_true", help="RMSNorm over each head of q and k (Qwen3)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast over float32 parameters")
parser.add_argument("--compile", action="store_true", help="run the model under torch.compile")
parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) instead of the default implementation")
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
device = torch.device(args.device)
std = 0.02
head_dim = args.head_dim or args.hidden // args.heads


def param(*shape, scale=std):
    return torch.nn.Parameter(torch.randn(*shape) * scale)


def ones(size):
    return torch.nn.Parameter(torch.ones(size))


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Layer(torch.nn.Module):
    def __init__(self, index):
        super().__init__()
        h, out_scale = args.hidden, std / (2.0 * args.layers) ** 0.5
        self.attention_norm, self.ffn_norm = ones(h), ones(h)
        self.q = param(args.heads * head_dim, h)
        self.k = param(args.kv_heads * head_dim, h)
        self.v = param(args.kv_heads * head_dim, h)
        self.o = param(h, args.heads * head_dim, scale=out_scale)
        if args.qk_norm:
            self.q_norm, self.k_norm = ones(head_dim), ones(head_dim)
        self.moe = index >= args.first_dense
        inner = args.shared_experts * args.expert_hidden if self.moe else args.dense_hidden
        self.gate, self.up, self.down = param(inner, h), param(inner, h), param(h, inner, scale=out_scale)
        if self.moe:
            e, f = args.experts, args.expert_hidden
            self.router = param(e, h)
            self.register_buffer("bias", torch.zeros(e))
            self.expert_gate, self.expert_up = param(e, f, h), param(e, f, h)
            self.expert_down = param(e, h, f, scale=out_scale)
            self.load = None

    def attention(self, x, cos, sin):
        b, s, _ = x.shape
        q = F.linear(x, self.q).view(b, s, args.heads, head_dim)
        k = F.linear(x, self.k).view(b, s, args.kv_heads, head_dim)
        if args.qk_norm:
            q, k = rms_norm(q, self.q_norm, 1e-6), rms_norm(k, self.k_norm, 1e-6)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = F.linear(x, self.v).view(b, s, args.kv_heads, head_dim).transpose(1, 2)

        def rotate(t):
            first, second = t.chunk(2, dim=-1)
            return t * cos + torch.cat((-second, first), dim=-1) * sin
        out = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(b, s, -1), self.o)

    def experts(self, x):  # x [T, H]
        logits = F.linear(x, self.router).float()
        scores = torch.sigmoid(logits) if args.router == "sigmoid" else torch.softmax(logits, -1)  # [T, E]
        bias = self.bias if args.router == "sigmoid" else 0.0
        chosen = torch.topk(scores.detach() + bias, args.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // args.top_k
        counts = torch.bincount(flat, minlength=args.experts)
        self.load = counts
        permuted = x[token]
        outputs, offset = [], 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                part = permuted[offset:offset + count]
                outputs.append(swiglu(part, self.expert_gate[expert], self.expert_up[expert], self.expert_down[expert]))
            offset += count
        combined = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(1).to(permuted.dtype)
        return torch.zeros_like(x).index_add(0, token, combined)

    def forward(self, x, cos, sin):
        x = x + self.attention(rms_norm(x, self.attention_norm), cos, sin)
        normed = rms_norm(x, self.ffn_norm)
        out = swiglu(normed, self.gate, self.up, self.down)
        if self.moe:
            b, s, h = normed.shape
            out = out + self.experts(normed.reshape(-1, h)).view(b, s, h)
        return x + out


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = param(args.vocab, args.hidden)
        self.layers = torch.nn.ModuleList(Layer(i) for i in range(args.layers))
        self.final_norm = ones(args.hidden)
        self.head = param(args.vocab, args.hidden)
        inverse = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(args.seq).float(), inverse)
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos())
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin())

    def forward(self, tokens):
        x = F.embedding(tokens[:, :-1], self.embedding)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = F.linear(rms_norm(x, self.final_norm), self.head)
        return F.cross_entropy(logits.reshape(-1, args.vocab).float(), tokens[:, 1:].reshape(-1))


model = Model().to(device)
forward = torch.compile(model) if args.compile else model
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                              fused=True if args.fused_adamw else None)


def synchronize():
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_mb(field):  # "VmRSS" (now) or "VmHWM" (highest since the last reset), in MiB
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_resident():  # Linux 4.0+: VmHWM back to the current resident memory
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


for step in range(1, args.steps + 1):
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    synchronize()
    measure_memory = device.type == "cpu" and reset_peak_resident()
    start_mb = resident_mb("VmRSS")
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        loss = forward(tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():  # aux-free balancing: raise the bias of under-loaded experts
        for layer in model.layers:
            if layer.moe:
                load = layer.load.float()
                layer.bias += 1e-3 * torch.sign(load.mean() - load)
    synchronize()
    seconds = time.perf_counter() - start
    memory = f" start_mb {start_mb:.1f} peak_mb {resident_mb('VmHWM'):.1f}" if measure_memory else ""
    print(f"step {step} seconds {seconds:.6f} tokens {args.batch * args.seq} loss {loss.item():.4f}{memory}", flush=True)
if device.type == "cuda":
    print(f"peak_memory_mb {torch.cuda.max_memory_allocated() / 2**20:.0f}", flush=True)
