// GroupedQueryAttention: causal multi-head / grouped-query attention with rotary position embeddings and
// the options today's MoE models add: QK RMSNorm (Qwen3, OLMoE), projection biases (GPT-OSS; q/k/v only: GLM-4.5), learned attention
// sinks and sliding-window layers (GPT-OSS), YaRN-scaled RoPE, an output gate and partial rotary (Qwen3-Next).
#include <limits>
#include <tuple>

#include <ATen/ATen.h>

#include "pithtrain/attention.h"
#include "pithtrain/nn.h"

namespace pithtrain {
namespace {

class GroupedQueryAttention final : public Attention {
 public:
  GroupedQueryAttention(Options& options, const PluginContext& context) : dims_(context.dims) {
    const int64_t hidden = dims_.hidden_size, head_dim = dims_.head_dim;
    qk_norm_ = options.text("qk_norm", "none");
    qk_norm_eps_ = options.number("qk_norm_eps", 1e-6, Range::above(0));
    // Qwen3-Next stores q_norm and k_norm zero-centred: they scale by 1 + weight and start at zero.
    qk_norm_zero_centered_ = options.boolean("qk_norm_zero_centered", false);
    options.require("qk_norm_zero_centered", !qk_norm_zero_centered_ || qk_norm_ != "none",
                    "false when qk_norm = \"none\" (there is no norm to centre)");
    if (qk_norm_ != "none" && qk_norm_ != "head" && qk_norm_ != "full")
      throw Error(options.where("qk_norm") + ": qk_norm must be \"none\", \"head\" (Qwen3: RMSNorm over each head) or "
                  "\"full\" (OLMoE: RMSNorm over the whole projection), got \"" + qk_norm_ + "\"");
    const bool bias = options.boolean("bias", false);
    // GLM-4.5 (as Qwen2): biases on the query, key and value projections only, none on o_proj.
    const bool qkv_bias = options.boolean("qkv_bias", false);
    options.require("qkv_bias", !(qkv_bias && bias), "false when bias = true (bias already gives q, k and v theirs)");
    const bool sinks = options.boolean("sinks", false);
    const int64_t window = options.integer("sliding_window", 0, Range::at_least(0));  // 0: full attention
    const std::string window_layers = options.text("sliding_window_layers", "all");
    if (window_layers != "all" && window_layers != "even" && window_layers != "odd")
      throw Error(options.where("sliding_window_layers") + ": sliding_window_layers must be \"all\", \"even\" (GPT-OSS: "
                  "layers 0, 2, ...) or \"odd\", got \"" + window_layers + "\"");
    const int64_t layer = std::max<int64_t>(context.layer_index, 0);
    if (window_layers == "all" || (window_layers == "even") == (layer % 2 == 0)) window_ = window;
    rope_ = read_rope(options, dims_);
    // Qwen3-Next's full attention: q_proj also yields a per-head gate, sigmoid(gate) scales the attention output.
    output_gate_ = options.boolean("output_gate", false);
    // Rotary embedding on the first head_dim x factor dimensions only, rounded down as transformers does.
    const double rotary_fraction = options.number("partial_rotary_factor", 1.0, Range::left_open(0, 1));
    rotary_dim_ = static_cast<int64_t>(static_cast<double>(head_dim) * rotary_fraction);
    options.require("partial_rotary_factor", rotary_dim_ >= 2 && rotary_dim_ % 2 == 0,
                    "a fraction of head_dim (" + std::to_string(head_dim) + ") that rounds down to an even number of dimensions");
    context_group_ = context.context_group;
    if (context_group_ && (window_ > 0 || sinks))
      throw Error(options.where(sinks ? "sinks" : "sliding_window") + ": attention plugin 'gqa' does not yet combine " +
                  (sinks ? std::string("sinks") : std::string("a sliding window")) + " with parallel.context; set parallel.context = 1");

    auto tensor_options = at::TensorOptions().dtype(context.dtype).device(context.device);
    if (qk_norm_ != "none") {
      const double identity = qk_norm_zero_centered_ ? 0.0 : 1.0;  // the weight that leaves the normalised vector as it is
      q_norm_ = at::full({qk_norm_ == "head" ? head_dim : dims_.num_heads * head_dim}, identity, tensor_options).requires_grad_(true);
      k_norm_ = at::full({qk_norm_ == "head" ? head_dim : dims_.num_kv_heads * head_dim}, identity, tensor_options).requires_grad_(true);
    }
    const int64_t q_rows = dims_.num_heads * head_dim * (output_gate_ ? 2 : 1);
    q_proj_ = normal_parameter({q_rows, hidden}, dims_.init_std, context);
    k_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    v_proj_ = normal_parameter({dims_.num_kv_heads * head_dim, hidden}, dims_.init_std, context);
    o_proj_ = normal_parameter({hidden, dims_.num_heads * head_dim},
                               dims_.init_std / std::sqrt(2.0 * std::max<int64_t>(1, dims_.num_layers)), context);
    auto zeros = [&](int64_t size) { return at::zeros({size}, tensor_options).requires_grad_(true); };
    if (bias || qkv_bias) q_bias_ = zeros(q_rows), k_bias_ = zeros(dims_.num_kv_heads * head_dim), v_bias_ = zeros(dims_.num_kv_heads * head_dim);
    if (bias) o_bias_ = zeros(hidden);
    if (sinks) sinks_ = zeros(dims_.num_heads);
  }

  at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), head_dim = dims_.head_dim;
    auto [q, k, v, gate] = project(hidden, positions);  // [B, h, S, D], [B, kv, S, D] twice, [B, S, h * D] or undefined
    at::Tensor out;                                       // [B, h, S, D]
    if (context_group_) {
      // The sequence is split over the context group: this rank's queries against every rank's keys.
      out = ring_attention(q, k, v, positions, *context_group_);
    } else if (!sinks_.defined()) {
      std::optional<at::Tensor> mask;
      if (window_ > 0 && window_ < seq) mask = allowed(positions);
      out = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/!mask.has_value(), std::nullopt,
                                             /*enable_gqa=*/dims_.num_kv_heads != dims_.num_heads);
    } else {
      out = attention_with_sinks(q, k, v, positions);
    }
    out = out.transpose(1, 2).reshape({batch, seq, dims_.num_heads * head_dim});  // [B, S, h * D]
    if (gate.defined()) out = out * at::sigmoid(gate);
    return pithtrain::linear(out, o_proj_, o_bias_);  // [B, S, H]
  }

  bool supports_context_parallel() const override { return true; }

  // The cache holds each layer's keys and values after RoPE, {k, v} [B, kv, T, D]. With a sliding
  // window only the last window - 1 are kept: no later query can see an older key.
  bool supports_cache() const override { return true; }

  at::Tensor forward_cached(const at::Tensor& hidden, const at::Tensor& positions, AttentionCache& cache) override {
    const int64_t batch = hidden.size(0), seq = hidden.size(1);
    auto [q, k, v, gate] = project(hidden, positions);  // [B, h, S, D], [B, kv, S, D] twice, [B, S, h * D] or undefined
    if (!cache.tensors.empty()) k = at::cat({cache.tensors[0], k}, 2), v = at::cat({cache.tensors[1], v}, 2);  // [B, kv, T, D]
    const int64_t keys = k.size(2), end = cache.length + seq;
    // Query i (position p_i) sees key j (position p_j) when 0 <= p_i - p_j (< window); the keys held are
    // positions end - T .. end - 1.
    at::Tensor key_positions = at::arange(end - keys, end, positions.options());  // [T]
    at::Tensor distance = positions.unsqueeze(1) - key_positions.unsqueeze(0);    // [S, T]
    at::Tensor mask = distance >= 0;
    if (window_ > 0) mask = mask & (distance < window_);
    at::Tensor out;  // [B, h, S, D]
    if (sinks_.defined()) {
      out = sink_attention(q, k, v, mask);
    } else {
      std::optional<at::Tensor> sdpa_mask;  // one new token sees every key held (the window trims the rest)
      if (seq > 1) sdpa_mask = mask;
      out = at::scaled_dot_product_attention(q, k, v, sdpa_mask, 0.0, /*is_causal=*/false, std::nullopt,
                                             /*enable_gqa=*/dims_.num_kv_heads != dims_.num_heads);
    }
    const int64_t kept = window_ > 0 ? std::min(keys, window_ - 1) : keys;
    cache.tensors = {k.narrow(2, keys - kept, kept), v.narrow(2, keys - kept, kept)};
    out = out.transpose(1, 2).reshape({batch, seq, dims_.num_heads * dims_.head_dim});  // [B, S, h * D]
    if (gate.defined()) out = out * at::sigmoid(gate);
    return pithtrain::linear(out, o_proj_, o_bias_);  // [B, S, H]
  }

  std::vector<Parameter> parameters() override {
    std::vector<Parameter> result = {{"q_proj", q_proj_, true}, {"k_proj", k_proj_, true}, {"v_proj", v_proj_, true},
                                     {"o_proj", o_proj_, true}};
    if (q_norm_.defined()) result.push_back({"q_norm", q_norm_, false}), result.push_back({"k_norm", k_norm_, false});
    if (q_bias_.defined())
      result.insert(result.end(), {{"q_proj_bias", q_bias_, false}, {"k_proj_bias", k_bias_, false}, {"v_proj_bias", v_bias_, false}});
    if (o_bias_.defined()) result.push_back({"o_proj_bias", o_bias_, false});
    if (sinks_.defined()) result.push_back({"sinks", sinks_, false});
    return result;
  }

 private:
  at::Tensor qk_rms_norm(const at::Tensor& x, const at::Tensor& weight) const {
    return qk_norm_zero_centered_ ? zero_centered_rms_norm(x, weight, qk_norm_eps_) : rms_norm(x, weight, qk_norm_eps_);
  }

  // RoPE on the first rotary_dim_ dimensions of x [B, S, heads, D] (frequencies over rotary_dim_); the rest pass.
  at::Tensor rotate(const at::Tensor& x, const at::Tensor& positions) const {
    if (rotary_dim_ == dims_.head_dim) return apply_rope(x, positions, rope_);
    return at::cat({apply_rope(x.narrow(-1, 0, rotary_dim_).contiguous(), positions, rope_),
                    x.narrow(-1, rotary_dim_, dims_.head_dim - rotary_dim_)}, -1);
  }

  // [S, S] bool: query i may see key j when j <= i and, with a window, i - j < window.
  at::Tensor allowed(const at::Tensor& positions) const {
    at::Tensor distance = positions.unsqueeze(1) - positions.unsqueeze(0);  // [S, S]: i - j
    at::Tensor mask = distance >= 0;
    if (window_ > 0) mask = mask & (distance < window_);
    return mask;
  }

  // softmax over [scores ; sink] per head, the sink's column dropped before multiplying by V: each head
  // may put probability mass on "nothing" (GPT-OSS). Written out because SDPA has no sink term.
  at::Tensor attention_with_sinks(const at::Tensor& q, at::Tensor k, at::Tensor v, const at::Tensor& positions) const {
    const int64_t batch = q.size(0), seq = q.size(2), groups = dims_.num_heads / dims_.num_kv_heads;
    if (groups > 1) k = k.repeat_interleave(groups, 1), v = v.repeat_interleave(groups, 1);  // [B, h, S, D]
    const auto compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)).to(compute) / std::sqrt(static_cast<double>(dims_.head_dim));
    scores = scores.masked_fill(allowed(positions).logical_not(), -std::numeric_limits<double>::infinity());  // [B, h, S, S]
    at::Tensor sink = sinks_.to(compute).view({1, -1, 1, 1}).expand({batch, dims_.num_heads, seq, 1});        // [B, h, S, 1]
    at::Tensor probs = at::softmax(at::cat({scores, sink}, -1), -1).narrow(-1, 0, seq);                       // [B, h, S, S]
    return at::matmul(probs.to(v.scalar_type()), v);                                                         // [B, h, S, D]
  }

  // The projections, norms and RoPE shared by forward() and forward_cached(): queries [B, h, S, D], keys
  // and values [B, kv, S, D], and with output_gate the gate [B, S, h * D].
  struct Projected {
    at::Tensor q, k, v, gate;
  };
  Projected project(const at::Tensor& hidden, const at::Tensor& positions) const {
    const int64_t batch = hidden.size(0), seq = hidden.size(1), head_dim = dims_.head_dim;
    at::Tensor q = pithtrain::linear(hidden, q_proj_, q_bias_);  // [B, S, h * D], with the gate [B, S, h * 2D]
    at::Tensor gate;
    if (output_gate_) {
      // Qwen3-Next's row layout: per head, its D query rows, then its D gate rows.
      const at::Tensor per_head = q.view({batch, seq, dims_.num_heads, 2 * head_dim});
      gate = per_head.narrow(-1, head_dim, head_dim).reshape({batch, seq, dims_.num_heads * head_dim});
      q = per_head.narrow(-1, 0, head_dim).reshape({batch, seq, dims_.num_heads * head_dim});
    }
    at::Tensor k = pithtrain::linear(hidden, k_proj_, k_bias_);  // [B, S, kv * D]
    if (qk_norm_ == "full") q = qk_rms_norm(q, q_norm_), k = qk_rms_norm(k, k_norm_);
    q = q.view({batch, seq, dims_.num_heads, head_dim});     // [B, S, h, D]
    k = k.view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    if (qk_norm_ == "head") q = qk_rms_norm(q, q_norm_), k = qk_rms_norm(k, k_norm_);
    at::Tensor v = pithtrain::linear(hidden, v_proj_, v_bias_).view({batch, seq, dims_.num_kv_heads, head_dim});  // [B, S, kv, D]
    return {rotate(q, positions).transpose(1, 2), rotate(k, positions).transpose(1, 2), v.transpose(1, 2), gate};
  }

  // attention_with_sinks for queries [B, h, S, D] over other keys [B, kv, T, D] (the cache's): `mask`
  // [S, T] says which key each query may see.
  at::Tensor sink_attention(const at::Tensor& q, at::Tensor k, at::Tensor v, const at::Tensor& mask) const {
    const int64_t batch = q.size(0), seq = q.size(2), groups = dims_.num_heads / dims_.num_kv_heads;
    if (groups > 1) k = k.repeat_interleave(groups, 1), v = v.repeat_interleave(groups, 1);  // [B, h, T, D]
    const auto compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)).to(compute) / std::sqrt(static_cast<double>(dims_.head_dim));
    scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());           // [B, h, S, T]
    at::Tensor sink = sinks_.to(compute).view({1, -1, 1, 1}).expand({batch, dims_.num_heads, seq, 1});  // [B, h, S, 1]
    at::Tensor probs = at::softmax(at::cat({scores, sink}, -1), -1).narrow(-1, 0, k.size(2));           // [B, h, S, T]
    return at::matmul(probs.to(v.scalar_type()), v);                                                   // [B, h, S, D]
  }

  ModelDims dims_;
  at::Tensor q_proj_;  // [h * D, H]; with output_gate [h * 2D, H]
  at::Tensor k_proj_;  // [kv * D, H]
  at::Tensor v_proj_;  // [kv * D, H]
  at::Tensor o_proj_;  // [H, h * D]
  at::Tensor q_bias_, k_bias_, v_bias_, o_bias_;  // [h * D], [kv * D], [kv * D] with bias or qkv_bias; [H] with bias
  at::Tensor sinks_;                              // [h] with sinks = true
  std::string qk_norm_ = "none";
  double qk_norm_eps_ = 1e-6;
  bool qk_norm_zero_centered_ = false;
  at::Tensor q_norm_, k_norm_;  // [D] ("head") or [h * D], [kv * D] ("full")
  int64_t window_ = 0;          // this layer's window; 0: full causal attention
  bool output_gate_ = false;
  int64_t rotary_dim_ = 0;      // dimensions of each head that RoPE rotates (head_dim unless partial_rotary_factor < 1)
  std::shared_ptr<Communicator> context_group_;  // parallel.context > 1: ring attention over these ranks
  Rope rope_;
};

}  // namespace

std::unique_ptr<Attention> make_gqa_attention(Options& options, const PluginContext& context) {
  if (context.dims.num_heads % context.dims.num_kv_heads != 0)
    throw Error("num_heads (" + std::to_string(context.dims.num_heads) + ") must be a multiple of num_kv_heads (" +
                std::to_string(context.dims.num_kv_heads) + ")");
  return std::make_unique<GroupedQueryAttention>(options, context);
}

}  // namespace pithtrain
