// GatedDeltaNet: the linear attention of Qwen3-Next / Qwen3.5 (Gated Delta Networks, Yang et al., ICLR 2025):
// projections, a short causal convolution, the gated delta rule in chunks and a SiLU-gated RMSNorm.
// Parameters keep Qwen3-Next's names, shapes and row layouts so weights map one to one (README.md).
#include <cmath>
#include <limits>

#include <ATen/ATen.h>

#include "gated_delta_rule.h"
#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace pithtrain {

at::Tensor chunked_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                                    const at::Tensor& beta, int64_t chunk) {
  // Within a chunk with start state S0, write gamma_t = exp(g_1 + ... + g_t) and the delta the rule adds at
  // token t as d_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t), so S_t = exp(g_t) S_{t-1} + k_t d_t^T. Unrolled:
  //   S_t = gamma_t S0 + sum_{i<=t} (gamma_t / gamma_i) k_i d_i^T
  //   d_t + sum_{i<t} beta_t (gamma_t / gamma_i) (k_t . k_i) d_i = beta_t v_t - beta_t gamma_t S0^T k_t
  // i.e. (I + A) D = diag(beta) V - diag(beta gamma) K S0 with A strictly lower triangular: D = U - W S0 for
  // U, W from one unit-triangular solve per chunk (no dependence on S0), and then
  //   out_t = gamma_t S0^T q_t + sum_{i<=t} (gamma_t / gamma_i) (q_t . k_i) d_i,
  //   S_C = gamma_C S0 + sum_i (gamma_C / gamma_i) k_i d_i^T,
  // which leaves a scan of a few matrix products per chunk instead of one update per token.
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), key_dim = q.size(3), value_dim = v.size(3);
  chunk = std::max<int64_t>(1, std::min(chunk, seq));  // a sequence shorter than a chunk is one chunk, unpadded
  const int64_t chunks = (seq + chunk - 1) / chunk, padded = chunks * chunk;
  // [B, S, h, d] -> [B, h, N, C, d]. Zeros pad the last chunk: beta = 0 writes nothing and they come last.
  auto blocks = [&](const at::Tensor& x) {
    at::Tensor t = x.transpose(1, 2);  // [B, h, S, d]
    if (padded > seq) t = at::constant_pad_nd(t, {0, 0, 0, padded - seq});
    return t.reshape({batch, heads, chunks, chunk, x.size(3)});
  };
  const at::Tensor Q = blocks(q), K = blocks(k), V = blocks(v);            // [B, h, N, C, dk|dv]
  const at::Tensor G = blocks(g.unsqueeze(-1)).squeeze(-1);                // [B, h, N, C]
  const at::Tensor Beta = blocks(beta.unsqueeze(-1)).squeeze(-1);          // [B, h, N, C]
  const at::Tensor log_gamma = G.cumsum(-1);                               // [B, h, N, C]
  const at::Tensor future = at::ones({chunk, chunk}, q.options().dtype(at::kBool)).triu(1);  // [C, C]: i > t
  // gamma_t / gamma_i for i <= t, 0 above the diagonal; masked before exp so no ratio overflows.
  const at::Tensor ratio = (log_gamma.unsqueeze(-1) - log_gamma.unsqueeze(-2))
                               .masked_fill(future, -std::numeric_limits<double>::infinity())
                               .exp();                                      // [B, h, N, C, C]
  const at::Tensor gamma = log_gamma.exp();                                 // [B, h, N, C]
  const at::Tensor system = at::eye(chunk, q.options()) +
                            Beta.unsqueeze(-1) * at::matmul(K, K.transpose(-1, -2)) * ratio.tril(-1);  // I + A
  const at::Tensor right = at::cat({Beta.unsqueeze(-1) * V, (Beta * gamma).unsqueeze(-1) * K}, -1);   // [.., C, dv + dk]
  const at::Tensor solved = at::linalg_solve_triangular(system, right, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  const at::Tensor U = solved.narrow(-1, 0, value_dim), W = solved.narrow(-1, value_dim, key_dim);
  const at::Tensor scores = at::matmul(Q, K.transpose(-1, -2)) * ratio;    // [B, h, N, C, C]
  const at::Tensor q_decayed = Q * gamma.unsqueeze(-1);                     // gamma_t q_t
  const at::Tensor last = log_gamma.narrow(-1, chunk - 1, 1);               // [B, h, N, 1]
  const at::Tensor k_decayed = K * (last - log_gamma).exp().unsqueeze(-1);  // (gamma_C / gamma_i) k_i
  const at::Tensor chunk_decay = last.exp().unsqueeze(-1);                  // [B, h, N, 1, 1]

  at::Tensor state = at::zeros({batch, heads, key_dim, value_dim}, q.options());  // [B, h, dk, dv]
  std::vector<at::Tensor> outputs;
  for (int64_t n = 0; n < chunks; ++n) {
    const at::Tensor delta = U.select(2, n) - at::matmul(W.select(2, n), state);  // [B, h, C, dv]
    outputs.push_back(at::matmul(q_decayed.select(2, n), state) + at::matmul(scores.select(2, n), delta));
    state = chunk_decay.select(2, n) * state + at::matmul(k_decayed.select(2, n).transpose(-1, -2), delta);
  }
  return at::stack(outputs, 2).reshape({batch, heads, padded, value_dim}).narrow(2, 0, seq).transpose(1, 2);  // [B, S, h, dv]
}

namespace {

class GatedDeltaNet final : public Attention {
 public:
  GatedDeltaNet(Options& options, const PluginContext& context) {
    const ModelDims& d = context.dims;
    key_heads_ = options.integer("num_key_heads", d.num_heads, Range::at_least(1));
    value_heads_ = options.integer("num_value_heads", key_heads_, Range::at_least(1));
    options.require("num_value_heads", value_heads_ % key_heads_ == 0, "a multiple of num_key_heads (" + std::to_string(key_heads_) + ")");
    key_dim_ = options.integer("key_head_dim", d.head_dim, Range::at_least(1));
    value_dim_ = options.integer("value_head_dim", key_dim_, Range::at_least(1));
    const int64_t kernel = options.integer("conv_kernel", 4, Range::at_least(1));
    chunk_ = options.integer("chunk_size", 64, Range::at_least(1));
    norm_eps_ = options.number("norm_eps", 1e-6, Range::above(0));
    l2_eps_ = options.number("qk_l2norm_eps", 1e-6, Range::above(0));

    const int64_t group = value_heads_ / key_heads_, hidden = d.hidden_size;
    const int64_t conv_channels = 2 * key_heads_ * key_dim_ + value_heads_ * value_dim_;
    auto tensor_options = at::TensorOptions().dtype(context.dtype).device(context.device);
    in_proj_qkvz_ = normal_parameter({key_heads_ * (2 * key_dim_ + 2 * group * value_dim_), hidden}, d.init_std, context);
    in_proj_ba_ = normal_parameter({2 * value_heads_, hidden}, d.init_std, context);
    // PyTorch's Conv1d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kernel for a depthwise filter.
    const double bound = 1.0 / std::sqrt(static_cast<double>(kernel));
    conv1d_ = at::empty({conv_channels, 1, kernel}, tensor_options).uniform_(-bound, bound).requires_grad_(true);
    // As transformers initialises Qwen3-Next: dt_bias = 1, A uniform in [0.01, 16] (decay rates from slow to fast).
    dt_bias_ = at::ones({value_heads_}, tensor_options).requires_grad_(true);
    A_log_ = at::empty({value_heads_}, tensor_options).uniform_(0.01, 16.0).log_().requires_grad_(true);
    norm_ = at::ones({value_dim_}, tensor_options).requires_grad_(true);
    out_proj_ = normal_parameter({hidden, value_heads_ * value_dim_}, d.init_std / std::sqrt(2.0 * std::max<int64_t>(1, d.num_layers)),
                                 context);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& /*positions: no rotary embedding, order is the sequence's*/) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), group = value_heads_ / key_heads_;
    const int64_t key_width = key_heads_ * key_dim_, value_width = value_heads_ * value_dim_;
    // Qwen3-Next's row layout: per key head, [q (dk), k (dk), v (group dv), z (group dv)] and [b (group), a (group)],
    // so the value heads of a key head are consecutive.
    const at::Tensor qkvz = pithtrain::linear(hidden, in_proj_qkvz_).view({batch, seq, key_heads_, -1});
    const std::vector<at::Tensor> parts = qkvz.split_with_sizes({key_dim_, key_dim_, group * value_dim_, group * value_dim_}, -1);
    const at::Tensor ba = pithtrain::linear(hidden, in_proj_ba_).view({batch, seq, key_heads_, 2 * group});
    const at::Tensor b = ba.narrow(-1, 0, group).reshape({batch, seq, value_heads_});      // [B, S, nv]
    const at::Tensor a = ba.narrow(-1, group, group).reshape({batch, seq, value_heads_});  // [B, S, nv]
    const at::Tensor z = parts[3].reshape({batch, seq, value_heads_, value_dim_});         // [B, S, nv, dv]

    // Channels [q | k | v] (conv1d's rows), each mixed with its kernel - 1 predecessors only (causal), then SiLU.
    at::Tensor mixed = at::cat({parts[0].reshape({batch, seq, key_width}), parts[1].reshape({batch, seq, key_width}),
                                parts[2].reshape({batch, seq, value_width})}, -1);  // [B, S, 2 nk dk + nv dv]
    const int64_t kernel = conv1d_.size(2);
    mixed = at::conv1d(mixed.transpose(1, 2), conv1d_, std::nullopt, {1}, {kernel - 1}, {1}, mixed.size(-1)).narrow(2, 0, seq);
    mixed = at::silu(mixed).transpose(1, 2);  // [B, S, channels]

    // The recurrence runs in float32 (float64 for double inputs), whatever the model's dtype.
    const auto compute = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto l2_normalized = [&](const at::Tensor& x) { return x * at::rsqrt(x.pow(2).sum(-1, true) + l2_eps_); };
    at::Tensor q = l2_normalized(mixed.narrow(-1, 0, key_width).view({batch, seq, key_heads_, key_dim_}).to(compute)) /
                   std::sqrt(static_cast<double>(key_dim_));                                              // [B, S, nk, dk]
    at::Tensor k = l2_normalized(mixed.narrow(-1, key_width, key_width).view({batch, seq, key_heads_, key_dim_}).to(compute));
    const at::Tensor v = mixed.narrow(-1, 2 * key_width, value_width).view({batch, seq, value_heads_, value_dim_}).to(compute);
    if (group > 1) q = q.repeat_interleave(group, 2), k = k.repeat_interleave(group, 2);  // [B, S, nv, dk]
    const at::Tensor beta = at::sigmoid(b.to(compute));                                                  // [B, S, nv] in (0, 1)
    const at::Tensor g = -A_log_.to(compute).exp() * at::softplus(a.to(compute) + dt_bias_.to(compute));  // [B, S, nv] log decay < 0
    const at::Tensor out = chunked_gated_delta_rule(q, k, v, g, beta, chunk_).to(hidden.scalar_type());  // [B, S, nv, dv]

    const at::Tensor gated = rms_norm(out, norm_, norm_eps_) * at::silu(z);                          // [B, S, nv, dv]
    return pithtrain::linear(gated.reshape({batch, seq, value_width}), out_proj_);                    // [B, S, H]
  }

  // The recurrence runs over the whole sequence in order; a sequence split over ranks would need the
  // state passed from rank to rank, which this plugin does not do.
  bool supports_context_parallel() const override { return false; }

  std::vector<Parameter> parameters() override {
    return {{"in_proj_qkvz", in_proj_qkvz_, true}, {"in_proj_ba", in_proj_ba_, true}, {"conv1d", conv1d_, true},
            {"dt_bias", dt_bias_, false},          {"A_log", A_log_, false},          {"norm", norm_, false},
            {"out_proj", out_proj_, true}};
  }

 private:
  int64_t key_heads_ = 0, value_heads_ = 0, key_dim_ = 0, value_dim_ = 0, chunk_ = 64;
  double norm_eps_ = 1e-6, l2_eps_ = 1e-6;
  at::Tensor in_proj_qkvz_;  // [nk (2 dk + 2 (nv / nk) dv), H]
  at::Tensor in_proj_ba_;    // [2 nv, H]
  at::Tensor conv1d_;        // [2 nk dk + nv dv, 1, conv_kernel]
  at::Tensor dt_bias_;       // [nv]
  at::Tensor A_log_;         // [nv]
  at::Tensor norm_;          // [dv]
  at::Tensor out_proj_;      // [H, nv dv]
};

}  // namespace

std::unique_ptr<Attention> make_gated_deltanet_attention(Options& options, const PluginContext& context) {
  return std::make_unique<GatedDeltaNet>(options, context);
}

}  // namespace pithtrain
