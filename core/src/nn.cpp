// Shared building blocks (see pithtrain/nn.h) and the core's logger.
#include "pithtrain/nn.h"

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

ExpertWeights::ExpertWeights(const PluginContext& context) {
  const ModelDims& d = context.dims;
  gate_proj = normal_parameter({d.num_experts, d.expert_hidden_size, d.hidden_size}, d.init_std, context);
  up_proj = normal_parameter({d.num_experts, d.expert_hidden_size, d.hidden_size}, d.init_std, context);
  // Output projections are scaled down with depth (GPT-2 style) so the residual stream stays O(1).
  down_proj = normal_parameter({d.num_experts, d.hidden_size, d.expert_hidden_size},
                               d.init_std / std::sqrt(2.0 * std::max<int64_t>(1, d.num_layers)), context);
}

std::vector<Parameter> ExpertWeights::parameters() const {
  return {{"gate_proj", gate_proj, true}, {"up_proj", up_proj, true}, {"down_proj", down_proj, true}};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  at::Tensor normalized = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return normalized.to(x.scalar_type()) * weight;
}

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_proj, const at::Tensor& up_proj,
                  const at::Tensor& down_proj) {
  return at::linear(at::silu(at::linear(x, gate_proj)) * at::linear(x, up_proj), down_proj);
}

namespace {

// Rotation angles position * theta^(-2i/head_dim) for i < head_dim/2: [seq, head_dim/2], in float32
// (float64 for double inputs).
at::Tensor rope_angles(const at::Tensor& x, const at::Tensor& positions, double theta) {
  const int64_t head_dim = x.size(-1);
  auto options = at::TensorOptions().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).device(x.device());
  at::Tensor inverse_frequency = at::pow(theta, -at::arange(0, head_dim / 2, options) * 2.0 / head_dim);  // [half]
  return positions.to(options.dtype()).unsqueeze(1) * inverse_frequency.unsqueeze(0);                     // [seq, half]
}

}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, double theta) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor angles = rope_angles(x, positions, theta);                                 // [seq, half]
  at::Tensor cos = at::cat({angles.cos(), angles.cos()}, -1).unsqueeze(0).unsqueeze(2);  // [1, seq, 1, head_dim]
  at::Tensor sin = at::cat({angles.sin(), angles.sin()}, -1).unsqueeze(0).unsqueeze(2);
  at::Tensor x_float = x.to(angles.scalar_type());
  at::Tensor rotated = at::cat({-x_float.narrow(-1, half, half), x_float.narrow(-1, 0, half)}, -1);
  return (x_float * cos + rotated * sin).to(x.scalar_type());
}

at::Tensor apply_rope_interleaved(const at::Tensor& x, const at::Tensor& positions, double theta) {
  at::Tensor angles = rope_angles(x, positions, theta);                                                   // [seq, half]
  at::Tensor cos = angles.cos().unsqueeze(0).unsqueeze(2), sin = angles.sin().unsqueeze(0).unsqueeze(2);  // [1, seq, 1, half]
  at::Tensor pairs = x.to(angles.scalar_type()).unflatten(-1, {x.size(-1) / 2, 2});                      // [..., half, 2]
  at::Tensor real = pairs.select(-1, 0), imaginary = pairs.select(-1, 1);
  return at::stack({real * cos - imaginary * sin, real * sin + imaginary * cos}, -1).flatten(-2).to(x.scalar_type());
}

}  // namespace pithtrain
