// Shared building blocks (see pithtrain/nn.h) and the core's logger.
#include "pithtrain/nn.h"
#include "pithtrain/distributed.h"
#include "pithtrain/kernels.h"
#include "pithtrain/router.h"

#include <cmath>

#include <ATen/ATen.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace pithtrain {

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto created = spdlog::stdout_color_mt("pithtrain");
    created->set_pattern("%^[%H:%M:%S %l]%$ %v");
    return created;
  }();
  return *instance;
}

at::Tensor normal_parameter(at::IntArrayRef shape, double std, const PluginContext& context) {
  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(context.dtype).device(context.device));
  tensor.normal_(0.0, std);
  return tensor.requires_grad_(true);
}

ExpertWeights::ExpertWeights(Options& options, const PluginContext& context) {
  const ModelDims& d = context.dims;
  activation = options.text("activation", "swiglu");
  swiglu_alpha = options.number("swiglu_alpha", 1.702, Range::above(0));
  swiglu_limit = options.number("swiglu_limit", 7.0, Range::above(0));
  const bool bias = options.boolean("bias", false);
  if (activation != "swiglu" && activation != "clamped_swiglu")
    throw Error(options.where("activation") + ": activation must be \"swiglu\" or \"clamped_swiglu\" (GPT-OSS), got \"" +
                activation + "\"");
  gate_proj = normal_parameter({d.num_experts, d.expert_hidden_size, d.hidden_size}, d.init_std, context);
  up_proj = normal_parameter({d.num_experts, d.expert_hidden_size, d.hidden_size}, d.init_std, context);
  // Output projections are scaled down with depth (GPT-2 style) so the residual stream stays O(1).
  down_proj = normal_parameter({d.num_experts, d.hidden_size, d.expert_hidden_size},
                               d.init_std / std::sqrt(2.0 * std::max<int64_t>(1, d.num_layers)), context);
  if (bias) {
    auto zeros = [&](at::IntArrayRef shape) {
      return at::zeros(shape, at::TensorOptions().dtype(context.dtype).device(context.device)).requires_grad_(true);
    };
    gate_bias = zeros({d.num_experts, d.expert_hidden_size});
    up_bias = zeros({d.num_experts, d.expert_hidden_size});
    down_bias = zeros({d.num_experts, d.hidden_size});
  }
}

namespace {
// One expert's SwiGLU FFN on its rows x [n, H] with its (already selected) weights.
at::Tensor expert_ffn(const ExpertWeights& w, const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                      const at::Tensor& down_proj, const at::Tensor& gate_bias, const at::Tensor& up_bias, const at::Tensor& down_bias) {
  at::Tensor gate = at::linear(x, gate_proj, gate_bias);  // [n, F]
  at::Tensor up = at::linear(x, up_proj, up_bias);        // [n, F]
  // The fused kernel on CUDA; elsewhere the same arithmetic in ATen ops (pithtrain/kernels.h).
  at::Tensor inner = kernels::swiglu(gate, up, w.activation != "swiglu", w.swiglu_alpha, w.swiglu_limit);  // [n, F]
  return at::linear(inner, down_proj, down_bias);  // [n, H]
}
}  // namespace

at::Tensor ExpertWeights::apply(const at::Tensor& x, int64_t expert) const {
  const bool bias = gate_bias.defined();
  return expert_ffn(*this, x, gate_proj[expert], up_proj[expert], down_proj[expert], bias ? gate_bias[expert] : at::Tensor(),
                    bias ? up_bias[expert] : at::Tensor(), bias ? down_bias[expert] : at::Tensor());
}

at::Tensor ExpertWeights::apply_grouped(const at::Tensor& x, const std::vector<int64_t>& rows_per_expert) const {
  const bool bias = gate_bias.defined();
  const std::vector<at::Tensor> pieces = x.split_with_sizes(rows_per_expert, 0);
  const std::vector<at::Tensor> gates = gate_proj.unbind(0), ups = up_proj.unbind(0), downs = down_proj.unbind(0);
  std::vector<at::Tensor> gate_biases, up_biases, down_biases;
  if (bias) gate_biases = gate_bias.unbind(0), up_biases = up_bias.unbind(0), down_biases = down_bias.unbind(0);
  std::vector<at::Tensor> outputs;
  for (size_t e = 0; e < pieces.size(); ++e) {
    if (rows_per_expert[e] == 0) continue;
    outputs.push_back(expert_ffn(*this, pieces[e], gates[e], ups[e], downs[e], bias ? gate_biases[e] : at::Tensor(),
                                 bias ? up_biases[e] : at::Tensor(), bias ? down_biases[e] : at::Tensor()));
  }
  if (outputs.empty()) return at::zeros({0, x.size(1)}, x.options());
  return at::cat(outputs, 0);  // [N, H]
}

std::vector<Parameter> ExpertWeights::parameters() const {
  std::vector<Parameter> result = {{"gate_proj", gate_proj, true}, {"up_proj", up_proj, true}, {"down_proj", down_proj, true}};
  if (gate_bias.defined())
    result.insert(result.end(), {{"gate_bias", gate_bias, false}, {"up_bias", up_bias, false}, {"down_bias", down_bias, false}});
  return result;
}

at::Tensor used_slots(const at::Tensor& weights) { return weights.detach() != 0; }

at::Tensor count_used_pairs(const at::Tensor& expert_ids, const at::Tensor& weights, int64_t experts) {
  // Unused pairs are counted as a sentinel expert `experts`, then cut off: no host sync on CUDA.
  const at::Tensor ids = expert_ids.masked_fill(~used_slots(weights), experts);
  return kernels::count_per_expert(ids, experts + 1).narrow(0, 0, experts).contiguous();
}

namespace {
// Ones where a pair is used, as the scores' dtype: [T, slots].
at::Tensor used_as(const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& like) {
  if (!weights.defined()) return at::ones(expert_ids.sizes(), like.options());
  return used_slots(weights).to(like.scalar_type());
}
}  // namespace

at::Tensor switch_balance_loss(const at::Tensor& probs, const at::Tensor& expert_ids, Communicator* ranks, const at::Tensor& weights) {
  const int64_t experts = probs.size(1);
  at::Tensor counts = (weights.defined() ? count_used_pairs(expert_ids, weights, experts)
                                         : kernels::count_per_expert(expert_ids, experts)).to(at::kDouble);  // [E]
  if (ranks != nullptr) {
    std::vector<at::Tensor> shared = {counts};
    ranks->all_reduce_sum(shared);
  }
  return balance_loss_from_counts(probs, counts);
}

at::Tensor balance_loss_from_counts(const at::Tensor& probs, const at::Tensor& counts) {
  at::Tensor total = counts.to(at::kDouble);
  at::Tensor fraction = (total / total.sum().clamp_min(1)).to(probs.scalar_type());  // [E]
  return probs.size(1) * (fraction * probs.mean(0)).sum();
}

at::Tensor sequence_balance_loss(const at::Tensor& scores, const at::Tensor& expert_ids, int64_t seq_len, Communicator* context,
                                 const at::Tensor& weights) {
  const int64_t tokens = scores.size(0), experts = scores.size(1);
  if (seq_len <= 0 || tokens % seq_len != 0) seq_len = tokens;
  const int64_t sequences = tokens / seq_len;
  at::Tensor normalized = (scores / scores.sum(-1, true).clamp_min(1e-20)).view({sequences, seq_len, experts});  // [N, S, E]
  const at::Tensor used = used_as(weights, expert_ids, scores.detach());                                          // [T, slots]
  at::Tensor chosen = at::zeros({tokens, experts}, scores.options()).scatter_add(1, expert_ids, used);            // [T, E]
  at::Tensor counts = chosen.view({sequences, seq_len, experts}).sum(1);                                          // [N, E]
  if (context != nullptr) {  // this rank holds seq_len of each sequence's context->size() * seq_len tokens
    std::vector<at::Tensor> shared = {counts.detach().clone()};
    context->all_reduce_sum(shared);
    counts = shared[0];
  }
  // f_e: the share of the sequence's used pairs (seq_len * k of them for a top-k router).
  at::Tensor fraction = counts / counts.sum(-1, true).clamp_min(1);                                               // [N, E]
  return (experts * (fraction * normalized.mean(1)).sum(-1)).mean();
}

void apply_expert_capacity(Routing& routing, double capacity_factor, int64_t num_experts) {
  if (capacity_factor <= 0) return;
  const int64_t pairs = routing.expert_ids.numel();
  const at::Tensor used = used_slots(routing.weights).reshape(-1);                             // [T * slots]
  // Unused pairs sort as a sentinel expert after every real one, so they never take a place.
  at::Tensor ids = routing.expert_ids.reshape(-1).masked_fill(~used, num_experts);             // [T * slots]
  const at::Tensor used_pairs = used.sum().to(at::kDouble);
  const at::Tensor capacity = at::ceil(capacity_factor * used_pairs / static_cast<double>(num_experts));  // [] on the device
  // Pairs grouped by expert, heaviest first within each: sort by weight, then stably by expert.
  at::Tensor by_weight = std::get<1>(at::sort(routing.weights.detach().reshape(-1), /*stable=*/true, 0, /*descending=*/true));
  at::Tensor order = by_weight.index_select(0, std::get<1>(at::sort(ids.index_select(0, by_weight), /*stable=*/true, 0, false)));
  at::Tensor counts = kernels::count_per_expert(ids, num_experts + 1);                         // [E + 1]
  at::Tensor starts = counts.cumsum(0) - counts;                                               // [E + 1]
  at::Tensor rank = at::arange(pairs, ids.options()) - starts.index_select(0, ids.index_select(0, order));  // within its expert
  at::Tensor keep = at::zeros({pairs}, ids.options().dtype(at::kBool)).index_put_({order}, rank.to(at::kDouble) < capacity);
  keep = keep & used;
  routing.weights = routing.weights * keep.view_as(routing.weights).to(routing.weights.scalar_type());
  routing.dropped_fraction = (1.0 - keep.sum().to(at::kDouble) / used_pairs.clamp_min(1)).to(at::kFloat);
  routing.tokens_per_expert = count_used_pairs(routing.expert_ids, routing.weights, num_experts);
}

at::Tensor router_z_loss(const at::Tensor& logits) { return at::logsumexp(logits, -1).pow(2).mean(); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return kernels::rms_norm(x, weight, eps);  // fused on the CPU in float32/float64 (pithtrain/kernels.h)
}

at::Tensor zero_centered_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // 1 + weight is formed in the compute dtype: in bf16 it would round the stored offset to 2^-7 steps.
  const at::ScalarType compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return rms_norm(x.to(compute), weight.to(compute) + 1.0, eps).to(x.scalar_type());
}

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                  const at::Tensor& down_proj) {
  return pithtrain::linear(kernels::swiglu(pithtrain::linear(x, gate_proj), pithtrain::linear(x, up_proj)), down_proj);
}

Rope read_rope(Options& options, const ModelDims& dims) {
  Rope rope;
  rope.theta = dims.rope_theta;
  rope.scaling = options.text("rope_scaling", "none");
  if (rope.scaling == "none") return rope;
  if (rope.scaling != "yarn")
    throw Error(options.where("rope_scaling") + ": rope_scaling must be \"none\" or \"yarn\", got \"" + rope.scaling + "\"");
  rope.factor = options.number("rope_factor", 1.0, Range::at_least(1));
  rope.original_max_positions = options.integer("rope_original_max_positions", 4096, Range::at_least(1));
  rope.beta_fast = options.number("rope_beta_fast", 32.0, Range::above(0));
  rope.beta_slow = options.number("rope_beta_slow", 1.0, Range::above(0));
  rope.truncate = options.boolean("rope_truncate", true);
  rope.attention_factor = options.number("rope_attention_factor", yarn_mscale(rope.factor, 1.0), Range::above(0));
  return rope;
}

double yarn_mscale(double factor, double mscale) { return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

at::Tensor rope_inverse_frequency(int64_t head_dim, const Rope& rope, const at::TensorOptions& options) {
  // theta^(-2i/d) for i < d/2
  at::Tensor extrapolation = at::pow(rope.theta, -at::arange(0, head_dim / 2, options) * 2.0 / head_dim);  // [d/2]
  if (rope.scaling != "yarn") return extrapolation;
  // The dimension whose wavelength fits `rotations` times into the original context.
  auto dimension_of = [&](double rotations) {
    return head_dim * std::log(rope.original_max_positions / (rotations * 2 * M_PI)) / (2 * std::log(rope.theta));
  };
  double low = dimension_of(rope.beta_fast), high = dimension_of(rope.beta_slow);
  if (rope.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0), high = std::min(high, static_cast<double>(head_dim - 1));
  if (low == high) high += 0.001;  // a zero-width ramp would divide by zero
  // 1 keeps the original frequency (fast dimensions), 0 takes the interpolated one (slow dimensions).
  at::Tensor keep = 1 - at::clamp((at::arange(0, head_dim / 2, options) - low) / (high - low), 0, 1);  // [d/2]
  return extrapolation / rope.factor * (1 - keep) + extrapolation * keep;
}

namespace {

// Rotation angles position * inverse_frequency: [seq, head_dim/2], in float32 (float64 for double inputs).
at::Tensor rope_angles(const at::Tensor& x, const at::Tensor& positions, const Rope& rope) {
  auto options = at::TensorOptions().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).device(x.device());
  at::Tensor inverse_frequency = rope_inverse_frequency(x.size(-1), rope, options);  // [half]
  return positions.to(options.dtype()).unsqueeze(1) * inverse_frequency.unsqueeze(0);  // [seq, half]
}

}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, const Rope& rope) {
  at::Tensor angles = rope_angles(x, positions, rope);                                  // [seq, half]
  at::Tensor cos = at::cat({angles.cos(), angles.cos()}, -1) * rope.attention_factor;   // [seq, head_dim]
  at::Tensor sin = at::cat({angles.sin(), angles.sin()}, -1) * rope.attention_factor;
  return kernels::rope(x.to(angles.scalar_type()), cos, sin).to(x.scalar_type());       // fused on the CPU (pithtrain/kernels.h)
}

at::Tensor apply_rope_interleaved(const at::Tensor& x, const at::Tensor& positions, const Rope& rope) {
  at::Tensor angles = rope_angles(x, positions, rope);  // [seq, half]
  at::Tensor cos = angles.cos().unsqueeze(0).unsqueeze(2) * rope.attention_factor;  // [1, seq, 1, half]
  at::Tensor sin = angles.sin().unsqueeze(0).unsqueeze(2) * rope.attention_factor;
  at::Tensor pairs = x.to(angles.scalar_type()).unflatten(-1, {x.size(-1) / 2, 2});  // [..., half, 2]
  at::Tensor real = pairs.select(-1, 0), imaginary = pairs.select(-1, 1);
  return at::stack({real * cos - imaginary * sin, real * sin + imaginary * cos}, -1).flatten(-2).to(x.scalar_type());
}

}  // namespace pithtrain
