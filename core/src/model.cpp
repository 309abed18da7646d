// Model assembly and the forward pass: embedding -> layers (attention, MoE or dense FFN) -> LM head.
#include "model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "layer_types.h"
#include "pithtrain/kernels.h"
#include "pithtrain/nn.h"

namespace pithtrain {

Model::Model(Options options, PluginRegistry& registry, PluginContext context) : context_(std::move(context)) {
  context_.shared = std::make_shared<SharedState>();  // this model's own: a context reused for another model shares nothing
  ModelDims& dims = context_.dims;
  dims.vocab_size = options.required_integer("vocab_size", Range::at_least(1));
  dims.hidden_size = options.required_integer("hidden_size", Range::at_least(1));
  dims.num_layers = options.required_integer("num_layers", Range::at_least(1));
  // A written num_kv_heads is read before num_heads: a config without num_heads is then told that, not that
  // num_kv_heads (spelled close to it and not yet read) is an unknown key.
  const bool kv_heads_written = options.has("num_kv_heads");
  if (kv_heads_written) dims.num_kv_heads = options.integer("num_kv_heads", 1, Range::at_least(1));
  dims.num_heads = options.required_integer("num_heads", Range::at_least(1));
  if (!kv_heads_written) dims.num_kv_heads = options.integer("num_kv_heads", dims.num_heads, Range::at_least(1));
  options.require("num_kv_heads", dims.num_heads % dims.num_kv_heads == 0,
                  "a divisor of num_heads (" + std::to_string(dims.num_heads) + ")");
  dims.head_dim = options.integer("head_dim", dims.hidden_size / dims.num_heads, Range::at_least(2));
  options.require("head_dim", dims.head_dim % 2 == 0, "even (rotary pairs)");
  dims.rope_theta = options.number("rope_theta", 10000.0, Range::above(0));
  dims.init_std = options.number("init_std", 0.02, Range::above(0));
  norm_eps_ = options.number("norm_eps", 1e-5, Range::above(0));
  // Qwen3-Next stores its norm weights zero-centred (x_hat * (1 + w)); kept as stored, so a converted
  // checkpoint round-trips bit-exactly and a small w keeps its precision in bf16.
  norm_zero_centered_ = options.boolean("norm_zero_centered", false);
  options.text("hf_architecture", "");  // where the weights came from; read by `pithtrain convert export` only
  const int64_t dense_hidden_size = dense_hidden_size_ =
      options.integer("dense_hidden_size", 4 * dims.hidden_size, Range::at_least(1));
  const int64_t first_dense_layers = first_dense_layers_ =
      options.integer("first_dense_layers", 0, Range::closed(0, static_cast<double>(dims.num_layers)));

  Options moe = options.table("moe");
  dims.num_experts = moe.integer("num_experts", 8, Range::at_least(1));
  dims.top_k = moe.integer("top_k", 2, Range::closed(1, static_cast<double>(dims.num_experts)));
  dims.expert_hidden_size = moe.integer("expert_hidden_size", dims.hidden_size, Range::at_least(1));
  const int64_t shared_experts = shared_experts_ = moe.integer("shared_experts", 0, Range::at_least(0));
  // Qwen2-MoE / Qwen3-Next: a [1, H] linear whose sigmoid scales the shared experts' output per token.
  const bool shared_expert_gate = moe.boolean("shared_expert_gate", false);
  moe.require("shared_expert_gate", !shared_expert_gate || shared_experts > 0, "false without shared experts (shared_experts = 0)");

  Options router_options = moe.table("router");
  Options experts_options = moe.table("experts");
  // Each layer's attention table and plugin: [model.attention] for all of them unless layer_types says otherwise.
  LayerTypes attention_types = read_layer_types(options, registry, dims.num_layers);
  for (const AttentionType& type : attention_types.types)
    manifest_.push_back({"model." + type.table + ".plugin", type.plugin,
                         attention_types.types.size() > 1 ? describe_layers(type.layers) : ""});
  const LoadedPlugin* router_plugin = nullptr;
  const LoadedPlugin* experts_plugin = nullptr;
  if (first_dense_layers < dims.num_layers) {
    router_plugin = &registry.get("router", router_options.text("plugin", "topk_softmax"), router_options.where("plugin"));
    experts_plugin = &registry.get("experts", experts_options.text("plugin", "grouped"), experts_options.where("plugin"));
    manifest_.push_back({"model.moe.router.plugin", router_plugin});
    manifest_.push_back({"model.moe.experts.plugin", experts_plugin});
  }

  const double std = dims.init_std;
  auto ones = [&](int64_t size) {  // a norm weight: the identity scale, zeros when zero-centred
    const auto options = at::TensorOptions().dtype(context_.dtype).device(context_.device);
    return (norm_zero_centered_ ? at::zeros({size}, options) : at::ones({size}, options)).requires_grad_(true);
  };
  embedding_ = normal_parameter({dims.vocab_size, dims.hidden_size}, std, context_);
  // Layer `index` of attention type `attention_type`: dense below first_dense_layers, else MoE (an MTP layer,
  // index >= num_layers, is MoE unless every main layer is dense).
  auto make_layer = [&](int64_t index, AttentionType& attention_type, PluginContext layer_context) {
    layer_context.layer_index = index;
    DecoderLayer layer;
    layer.attention_norm = ones(dims.hidden_size);
    layer.ffn_norm = ones(dims.hidden_size);
    layer.attention = make_attention(*attention_type.plugin, attention_type.options, layer_context);
    layer.attention_table = attention_type.table;
    int64_t ffn_inner = 0;
    if (index < first_dense_layers || router_plugin == nullptr) {
      ffn_inner = dense_hidden_size;
    } else {
      layer.router = make_router(*router_plugin, router_options, layer_context);
      layer.experts = make_experts(*experts_plugin, experts_options, layer_context);
      ffn_inner = shared_experts * dims.expert_hidden_size;
    }
    if (ffn_inner > 0) {
      layer.ffn_gate_proj = normal_parameter({ffn_inner, dims.hidden_size}, std, context_);
      layer.ffn_up_proj = normal_parameter({ffn_inner, dims.hidden_size}, std, context_);
      // Output projections are scaled down with depth (GPT-2 style) so the residual stream stays O(1).
      layer.ffn_down_proj = normal_parameter({dims.hidden_size, ffn_inner}, std / std::sqrt(2.0 * dims.num_layers), context_);
      if (shared_expert_gate && layer.router) layer.shared_expert_gate = normal_parameter({1, dims.hidden_size}, std, context_);
    }
    return layer;
  };
  for (int64_t index = 0; index < dims.num_layers; ++index) {
    AttentionType& attention_type = attention_types.types[attention_types.of_layer[index]];
    layers_.push_back(make_layer(index, attention_type, context_));
    full_attention_layers_ += attention_type.table == "attention";
  }
  final_norm_ = ones(dims.hidden_size);
  lm_head_ = normal_parameter({dims.vocab_size, dims.hidden_size}, std, context_);
  // Multi-token prediction (mtp.cpp): after the main model's weights, so mtp_layers = 0 draws the same ones.
  // Read only when written (or needed), so a model without them resolves to the same [model] TOML as before
  // the keys existed and its older checkpoints still resume (RunState::check_same_model compares that TOML).
  const int64_t mtp_layers = options.has("mtp_layers") ? options.integer("mtp_layers", 0, Range::at_least(0)) : 0;
  if (options.has("mtp_loss_coeff") || mtp_layers > 0) mtp_loss_coeff_ = options.number("mtp_loss_coeff", 0.3, Range::at_least(0));
  AttentionType* mtp_attention = nullptr;  // an MTP layer is of [model.attention]
  for (AttentionType& type : attention_types.types)
    if (type.table == "attention") mtp_attention = &type;
  if (mtp_layers > 0 && mtp_attention == nullptr)
    throw Error(options.where("mtp_layers") + ": model.mtp_layers = " + std::to_string(mtp_layers) + " needs a [model.attention] "
                "layer type for its decoder layers; add one to model.layer_types or set model.mtp_layers = 0");
  for (int64_t depth = 0; depth < mtp_layers; ++depth) {
    PluginContext layer_context = context_;
    // Depth k = depth + 1 predicts k + 1 tokens ahead, so its router sees the seq_len - k positions that have that
    // target (a sequence-wise balance loss splits its tokens by seq_len).
    if (layer_context.dims.seq_len > 0) layer_context.dims.seq_len = std::max<int64_t>(1, layer_context.dims.seq_len - depth - 1);
    MtpDepth mtp;
    mtp.enorm = ones(dims.hidden_size);
    mtp.hnorm = ones(dims.hidden_size);
    mtp.eh_proj = normal_parameter({dims.hidden_size, 2 * dims.hidden_size}, std, context_);
    mtp.layer = make_layer(dims.num_layers + depth, *mtp_attention, layer_context);
    mtp.final_norm = ones(dims.hidden_size);
    mtp_.push_back(std::move(mtp));
    full_attention_layers_ += 1;
  }
}

int64_t Model::num_moe_layers() const {
  int64_t count = 0;
  for (const auto& layer : layers_) count += layer.router != nullptr;
  return count;
}

ModelOutput Model::forward(const at::Tensor& tokens, const std::function<void(int64_t)>& gather_unit,
                           const std::function<void(int64_t)>& release_unit) {
  ModelOutput output;
  output.aux_loss = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(context_.device));
  at::Tensor x;
  for (int64_t unit = 0; unit < num_units(); ++unit) {
    if (gather_unit) gather_unit(unit);
    UnitOutput result = forward_unit(unit, x, tokens, output);
    if (release_unit) release_unit(unit);
    x = result.output;
    if (result.aux_loss.defined()) output.aux_loss = output.aux_loss + result.aux_loss;
  }
  output.loss = output.cross_entropy + output.aux_loss;
  if (output.mtp_loss.defined()) output.aux_loss = output.aux_loss - output.mtp_loss.detach();  // logged apart: the routers' losses
  return output;
}

at::Tensor Model::token_positions(int64_t seq) const {
  if (context_size_ == 1) return at::arange(seq, at::kLong);
  // Load-balanced causal split: 2 x size chunks, this rank taking chunk r and chunk 2 x size - 1 - r, so
  // every rank has as many early (cheap) as late (expensive) queries.
  const int64_t chunk = seq / (2 * context_size_), rank = context_rank_;
  return at::cat({at::arange(rank * chunk, (rank + 1) * chunk, at::kLong),
                  at::arange((2 * context_size_ - 1 - rank) * chunk, (2 * context_size_ - rank) * chunk, at::kLong)});
}

UnitOutput Model::forward_unit(int64_t unit, const at::Tensor& input, const at::Tensor& tokens, ModelOutput& output) {
  const int64_t full = tokens.size(1) - 1, hidden = context_.dims.hidden_size;
  const at::Tensor local = token_positions(full);  // [S] this rank's token positions (all of them without a context split)
  const int64_t batch = tokens.size(0), seq = local.numel();
  // This rank's tokens: shifted by `shift` (0 inputs, 1 targets), a view unless a context split picks chunks.
  auto mine = [&](int64_t shift) {
    at::Tensor shifted = tokens.narrow(1, shift, full);
    return (context_size_ == 1 ? shifted : shifted.index_select(1, local)).to(context_.device);
  };
  if (unit == 0) return {at::embedding(embedding_, mine(0)), at::Tensor()};  // [B, S, H]
  if (unit == num_units() - 1) {
    at::Tensor targets = mine(1);  // [B, S]
    if (loss_chunk_tokens_ > 0) {
      const at::Tensor normed = norm(input, final_norm_).reshape({batch * seq, hidden});  // [T, H]
      output.cross_entropy = kernels::chunked_cross_entropy(normed, lm_head_, targets.reshape(-1), loss_chunk_tokens_);
    } else {
      output.logits = pithtrain::linear(norm(input, final_norm_), lm_head_);  // [B, S, V]
      output.cross_entropy = at::cross_entropy_loss(output.logits.reshape({batch * seq, -1}).to(at::kFloat), targets.reshape(-1));
    }
    // Multi-token prediction trains only (the validation loss is the main cross-entropy's); its loss travels as
    // the last unit's aux_loss, so a schedule's micro-batch loss includes it (mtp.cpp).
    at::Tensor mtp_loss = !mtp_.empty() && at::GradMode::is_enabled() ? forward_mtp(input, tokens, output) : at::Tensor();
    if (at::GradMode::is_enabled()) router_checked_ = true;
    return {output.cross_entropy, mtp_loss};
  }
  at::Tensor aux_loss;
  at::Tensor positions = local.to(context_.device);  // [S]
  return {forward_layer(layers_[unit - 1], unit - 1, input, positions, output, aux_loss, true), aux_loss};
}

at::Tensor Model::forward_layer(DecoderLayer& layer, int64_t index, const at::Tensor& input, const at::Tensor& positions,
                                ModelOutput& output, at::Tensor& aux_loss, bool record_routing, AttentionCache* cache) {
  const int64_t batch = input.size(0), seq = input.size(1), hidden = context_.dims.hidden_size;
  const at::Tensor attention_input = norm(input, layer.attention_norm);
  at::Tensor x = input + (cache ? layer.attention->forward_cached(attention_input, positions, *cache)
                                : layer.attention->forward(attention_input, positions));
  at::Tensor normed = norm(x, layer.ffn_norm).reshape({batch * seq, hidden});  // [T, H]
  at::Tensor ffn_out;                                                                          // [T, H]
  if (layer.router) {
    Routing routing = layer.router->route(normed);
    if (!router_checked_) check_router_loss(routing, index);
    for (const auto& term : routing.loss_terms) {
      at::Tensor value = term.tensor.detach().to(at::kFloat);
      auto [entry, added] = output.router_loss_terms.emplace(term.name, value);
      if (!added) entry->second = entry->second + value;
    }
    ffn_out = layer.experts->forward(normed, routing);
    aux_loss = routing.aux_loss.to(at::kFloat);
    if (record_routing) {
      output.tokens_per_expert.push_back(routing.tokens_per_expert.detach());
      output.dropped_fraction.push_back(routing.dropped_fraction.defined() ? routing.dropped_fraction.detach() : at::Tensor());
      output.routed_tokens.push_back(normed.size(0));
      for (const auto& statistic : routing.statistics) output.router_statistics[statistic.name].push_back(statistic.tensor.detach());
    }
  }
  if (layer.ffn_gate_proj.defined()) {
    at::Tensor dense = swiglu(normed, layer.ffn_gate_proj, layer.ffn_up_proj, layer.ffn_down_proj);
    if (layer.shared_expert_gate.defined()) dense = dense * at::sigmoid(pithtrain::linear(normed, layer.shared_expert_gate));  // [T, 1]
    ffn_out = ffn_out.defined() ? ffn_out + dense : dense;
  }
  return x + ffn_out.view({batch, seq, hidden});
}

at::Tensor Model::norm(const at::Tensor& x, const at::Tensor& weight) const {
  return norm_zero_centered_ ? zero_centered_rms_norm(x, weight, norm_eps_) : rms_norm(x, weight, norm_eps_);
}

std::pair<std::string, std::string> Model::attention_without_context_parallel() const {
  for (const auto& layer : layers_)
    if (!layer.attention->supports_context_parallel())
      for (const auto& entry : manifest_)
        if (entry.config_key == "model." + layer.attention_table + ".plugin") return {entry.plugin->name(), entry.config_key};
  return {};
}

int64_t Model::moe_layer_of_unit(int64_t unit) const {
  if (unit < 1 || unit > static_cast<int64_t>(layers_.size()) || !layers_[unit - 1].router) return -1;
  int64_t index = 0;
  for (int64_t layer = 0; layer < unit - 1; ++layer) index += layers_[layer].router != nullptr;
  return index;
}

int64_t Model::unit_of(const std::string& parameter_name) const {
  if (parameter_name.rfind("embedding.", 0) == 0) return 0;
  if (parameter_name.rfind("layers.", 0) == 0) return 1 + std::stoll(parameter_name.substr(7));
  return num_units() - 1;  // final_norm, lm_head
}

bool Model::needs_step_counts() const {
  for (const auto& layer : layers_)
    if (layer.router && layer.router->needs_step_counts()) return true;
  return false;
}

bool Model::variable_experts_per_token() const {
  for (const auto& layer : layers_)
    if (layer.router && layer.router->variable_experts_per_token()) return true;
  return false;
}

void Model::set_step_counts(const std::vector<at::Tensor>& tokens_per_expert) {
  size_t moe_layer = 0;
  for (auto& layer : layers_)
    if (layer.router) {
      layer.router->set_step_counts(moe_layer < tokens_per_expert.size() ? tokens_per_expert[moe_layer] : at::Tensor());
      ++moe_layer;
    }
}

void Model::check_router_loss(const Routing& routing, int64_t layer) const {
  // The loss a user configures must be the loss applied: a term that cannot train the router, or an
  // aux_loss that is not the sum of the terms it reports, is a plugin bug that would otherwise be silent.
  // Checked on the first training forward only (it costs a device sync).
  if (!at::GradMode::is_enabled()) return;
  const std::string where = "layer " + std::to_string(layer) + " router";
  double total = 0;
  for (const auto& term : routing.loss_terms) {
    const double value = term.tensor.item<double>();
    if (!std::isfinite(value)) throw Error(where + ": loss term '" + term.name + "' is not finite (" + std::to_string(value) + ")");
    if (!term.tensor.requires_grad())
      throw Error(where + ": loss term '" + term.name + "' is detached from the graph, so its coefficient trains nothing");
    total += value;
  }
  const double aux = routing.aux_loss.item<double>();
  if (std::abs(aux - total) > 1e-5 * std::max(1.0, std::abs(total)))
    throw Error(where + ": aux_loss " + std::to_string(aux) + " differs from the sum of its loss_terms " + std::to_string(total) +
                " (every configured loss must be reported as a term)");
}

void append_layer_parameters(const DecoderLayer& layer, const std::string& prefix, std::vector<Parameter>& result) {
  result.push_back({prefix + "attention_norm.weight", layer.attention_norm, false});
  for (auto& parameter : layer.attention->parameters())
    result.push_back({prefix + layer.attention_table + "." + parameter.name, parameter.tensor, parameter.weight_decay});
  result.push_back({prefix + "ffn_norm.weight", layer.ffn_norm, false});
  if (layer.router) {
    for (auto& parameter : layer.router->parameters())
      result.push_back({prefix + "router." + parameter.name, parameter.tensor, parameter.weight_decay});
    for (auto& parameter : layer.experts->parameters())
      result.push_back({prefix + "experts." + parameter.name, parameter.tensor, parameter.weight_decay, parameter.expert_sharded});
  }
  if (layer.ffn_gate_proj.defined()) {
    const std::string ffn = prefix + (layer.router ? "shared_experts." : "mlp.");
    result.push_back({ffn + "gate_proj", layer.ffn_gate_proj, true});
    result.push_back({ffn + "up_proj", layer.ffn_up_proj, true});
    result.push_back({ffn + "down_proj", layer.ffn_down_proj, true});
    if (layer.shared_expert_gate.defined()) result.push_back({ffn + "gate", layer.shared_expert_gate, true});
  }
}

std::vector<Parameter> Model::parameters() const {
  std::vector<Parameter> result;
  result.push_back({"embedding.weight", embedding_, true});
  for (size_t index = 0; index < layers_.size(); ++index)
    append_layer_parameters(layers_[index], "layers." + std::to_string(index) + ".", result);
  result.push_back({"final_norm.weight", final_norm_, false});
  result.push_back({"lm_head.weight", lm_head_, true});
  append_mtp_parameters(result);
  return result;
}

std::vector<NamedTensor> Model::state() const {
  std::vector<NamedTensor> result;
  for (auto& parameter : parameters()) result.push_back({parameter.name, parameter.tensor});
  for (size_t index = 0; index < layers_.size(); ++index)
    if (layers_[index].router)
      for (auto& buffer : layers_[index].router->buffers())
        result.push_back({"layers." + std::to_string(index) + ".router." + buffer.name, buffer.tensor});
  for (size_t depth = 0; depth < mtp_.size(); ++depth)
    if (mtp_[depth].layer.router)
      for (auto& buffer : mtp_[depth].layer.router->buffers())
        result.push_back({"mtp_layers." + std::to_string(depth) + ".router." + buffer.name, buffer.tensor});
  return result;
}

double Model::flops_per_token(int64_t seq_len) const {
  // Matrix parameters a token multiplies with: all but the embedding (a lookup) and the vectors (norms,
  // biases), with routed experts counted for top_k of num_experts.
  const ModelDims& d = context_.dims;
  double parameters = 0;
  for (const auto& parameter : this->parameters()) {
    if (parameter.tensor.dim() < 2 || parameter.name == "embedding.weight") continue;
    const double count = static_cast<double>(parameter.tensor.numel());
    parameters += parameter.name.find(".experts.") != std::string::npos ? count * d.top_k / d.num_experts : count;
  }
  parameters += static_cast<double>(mtp_.size() * lm_head_.numel());  // each MTP depth uses the shared LM head again
  return 6.0 * parameters + 6.0 * full_attention_layers_ * seq_len * d.num_heads * d.head_dim;
}

std::vector<std::vector<NamedTensor>> Model::router_buffers() const {
  std::vector<std::vector<NamedTensor>> result;
  for (const auto& layer : layers_)
    if (layer.router) result.push_back(layer.router->buffers());
  return result;
}

void Model::after_optimizer_step() {
  for (auto& layer : layers_)
    if (layer.router) layer.router->after_optimizer_step();
  for (auto& depth : mtp_)
    if (depth.layer.router) depth.layer.router->after_optimizer_step();
}

}  // namespace pithtrain
