// The per-kind conformance checks (see pithtrain/conformance.h).
#include "pithtrain/conformance.h"

#include <functional>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/attention.h"
#include "pithtrain/experts.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/router.h"
#include "pithtrain/schedule.h"

namespace pithtrain {
namespace {

// Tiny dimensions: small enough for central differences in double precision.
PluginContext tiny_context(c10::ScalarType dtype) {
  PluginContext context;
  context.dims.vocab_size = 32;
  context.dims.hidden_size = 16;
  context.dims.num_layers = 2;
  context.dims.num_heads = 4;
  context.dims.num_kv_heads = 2;
  context.dims.head_dim = 4;
  context.dims.num_experts = 4;
  context.dims.top_k = 2;
  context.dims.expert_hidden_size = 8;
  context.dims.seq_len = 6;
  context.dims.init_std = 0.5;  // large enough that outputs are far from zero
  context.layer_index = 0;
  context.dtype = dtype;
  context.logger = &logger();
  context.shared = std::make_shared<SharedState>();  // each check builds its component(s) afresh
  return context;
}

template <typename Component>
std::unique_ptr<Component> build(const PluginDescriptor& descriptor, const PluginContext& context) {
  Options options = Options::from_string("", "(conformance defaults)");
  std::unique_ptr<Component> component;
  if constexpr (std::is_same_v<Component, Router>) component = descriptor.make_router(options, context);
  if constexpr (std::is_same_v<Component, Experts>) component = descriptor.make_experts(options, context);
  if constexpr (std::is_same_v<Component, Attention>) component = descriptor.make_attention(options, context);
  if constexpr (std::is_same_v<Component, Optimizer>) component = descriptor.make_optimizer(options, context);
  if constexpr (std::is_same_v<Component, Schedule>) component = descriptor.make_schedule(options, context);
  if (!component) throw Error("factory returned nothing");
  return component;
}

std::string describe_shape(const at::Tensor& tensor) {
  if (!tensor.defined()) return "undefined";
  std::ostringstream out;
  out << tensor.sizes();
  return out.str();
}

// Numbers in details: scientific, so tiny errors stay visible ("3.1e-11", not "0.000000").
std::string number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.3g", value);
  return buffer;
}

void expect(bool condition, const std::string& what) {
  if (!condition) throw Error(what);
}

bool all_finite(const at::Tensor& tensor) { return at::isfinite(tensor).all().item<bool>(); }

// Compares d(scalar)/d(input) from autograd with central differences; returns the largest error
// relative to max(1, |analytic|). `function` must rebuild the graph from `input` every call.
double gradient_error(const std::function<at::Tensor()>& function, at::Tensor input) {
  input.mutable_grad() = at::Tensor();
  function().backward();
  at::Tensor analytic = input.grad().clone();
  at::NoGradGuard no_grad;
  at::Tensor flat = input.view(-1);
  at::Tensor numeric = at::zeros_like(flat);
  const double eps = 1e-6;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    double original = flat[i].item<double>();
    flat[i].fill_(original + eps);
    double plus = function().item<double>();
    flat[i].fill_(original - eps);
    double minus = function().item<double>();
    flat[i].fill_(original);
    numeric[i].fill_((plus - minus) / (2 * eps));
  }
  at::Tensor error = (analytic.view(-1) - numeric).abs() / at::clamp_min(analytic.view(-1).abs(), 1.0);
  return error.max().item<double>();
}

void check_gradient(const std::function<at::Tensor()>& function, at::Tensor input, const std::string& name,
                    std::string& detail) {
  double error = gradient_error(function, input);
  detail += (detail.empty() ? "" : ", ") + name + " max rel error " + number(error);
  expect(error < 1e-5, "gradient w.r.t. " + name + " differs from central differences: " + detail);
}

void check_parameter_gradients(const std::vector<Parameter>& parameters) {
  for (const auto& parameter : parameters) {
    expect(parameter.tensor.grad().defined(), "parameter " + parameter.name + " got no gradient");
    expect(all_finite(parameter.tensor.grad()), "parameter " + parameter.name + " has a non-finite gradient");
  }
}

using Checks = std::vector<std::pair<std::string, std::function<std::string()>>>;

// ---- router -------------------------------------------------------------------------------------------
Checks router_checks(const PluginDescriptor& descriptor) {
  auto route = [&descriptor](c10::ScalarType dtype, uint64_t seed) {
    at::manual_seed(seed);
    PluginContext context = tiny_context(dtype);
    auto router = build<Router>(descriptor, context);
    at::Tensor hidden = at::randn({10, context.dims.hidden_size}, at::TensorOptions().dtype(dtype)).requires_grad_(true);
    return std::tuple{std::move(router), hidden, context};
  };
  return {
      {"output shapes", [=] {
         auto [router, hidden, context] = route(at::kFloat, 1);
         Routing routing = router->route(hidden);
         const int64_t tokens = hidden.size(0), k = context.dims.top_k, experts = context.dims.num_experts;
         expect(routing.expert_ids.dim() == 2 && routing.expert_ids.size(0) == tokens && routing.expert_ids.size(1) >= 1,
                "expert_ids " + describe_shape(routing.expert_ids) + ", expected [tokens, slots >= 1]");
         const int64_t slots = routing.expert_ids.size(1);
         expect(router->variable_experts_per_token() || slots == k,
                "expert_ids has " + std::to_string(slots) + " slots; a top-k router (variable_experts_per_token() false) fills top_k = " +
                    std::to_string(k));
         expect(routing.weights.sizes() == routing.expert_ids.sizes(), "weights " + describe_shape(routing.weights));
         expect(routing.aux_loss.defined() && routing.aux_loss.dim() == 0, "aux_loss " + describe_shape(routing.aux_loss));
         expect(routing.tokens_per_expert.sizes() == at::IntArrayRef({experts}),
                "tokens_per_expert " + describe_shape(routing.tokens_per_expert));
         expect(routing.expert_ids.min().item<int64_t>() >= 0 && routing.expert_ids.max().item<int64_t>() < experts,
                "expert_ids out of [0, num_experts), unused slots included");
         // The contract (pithtrain/router.h): tokens_per_expert counts the used pairs, those of nonzero weight.
         const at::Tensor used = routing.weights.detach() != 0;  // [tokens, slots]
         expect(at::equal(routing.tokens_per_expert.to(at::kLong), count_used_pairs(routing.expert_ids, routing.weights, experts)),
                "tokens_per_expert is not the count of used (nonzero-weight) pairs per expert");
         // A token's used slots name distinct experts (a sentinel -1 - slot stands in for an unused one).
         at::Tensor named = at::where(used, routing.expert_ids, -1 - at::arange(slots, at::kLong));
         at::Tensor sorted = std::get<0>(named.sort(1));
         expect(slots == 1 || !(sorted.narrow(1, 1, slots - 1) == sorted.narrow(1, 0, slots - 1)).any().item<bool>(),
                "a token chose the same expert twice");
         for (const auto& statistic : routing.statistics)
           expect(statistic.tensor.numel() == 1 && all_finite(statistic.tensor), "statistic '" + statistic.name + "' is not one finite number");
         return "ids " + describe_shape(routing.expert_ids) + ", weights " + describe_shape(routing.weights) + ", " +
                number(used.sum().item<double>() / static_cast<double>(tokens)) + " used slots per token";
       }},
      {"finite gradients", [=] {
         auto [router, hidden, context] = route(at::kFloat, 2);
         Routing routing = router->route(hidden);
         ((routing.weights * at::randn_like(routing.weights)).sum() + routing.aux_loss).backward();
         expect(hidden.grad().defined() && all_finite(hidden.grad()), "input gradient missing or non-finite");
         check_parameter_gradients(router->parameters());
         return std::string("input and ") + std::to_string(router->parameters().size()) + " parameter gradients finite";
       }},
      {"determinism under a fixed seed", [=] {
         auto [router_a, hidden_a, context_a] = route(at::kFloat, 3);
         auto [router_b, hidden_b, context_b] = route(at::kFloat, 3);
         Routing a = router_a->route(hidden_a), b = router_b->route(hidden_b);
         expect(at::equal(a.expert_ids, b.expert_ids) && at::equal(a.weights, b.weights) &&
                    at::equal(a.aux_loss, b.aux_loss), "two builds with the same seed routed differently");
         return std::string("identical ids, weights and aux_loss");
       }},
      {"double-precision gradient check", [=] {
         auto [router, hidden, context] = route(at::kDouble, 4);
         at::Tensor probe = at::randn(router->route(hidden).weights.sizes(), at::kDouble);
         const bool surrogate = router->straight_through();
         auto function = [&] {
           Routing routing = router->route(hidden);
           return surrogate ? routing.aux_loss + 0 * routing.weights.sum() : (routing.weights * probe).sum() + routing.aux_loss;
         };
         std::string detail;
         check_gradient(function, hidden, "input", detail);
         for (auto& parameter : router->parameters()) check_gradient(function, parameter.tensor, parameter.name, detail);
         return detail + (surrogate ? " (aux_loss only: straight-through weights)" : "");
       }},
  };
}

// ---- experts ------------------------------------------------------------------------------------------
Routing random_routing(int64_t tokens, const ModelDims& dims, c10::ScalarType dtype) {
  Routing routing;
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < tokens; ++t) rows.push_back(at::randperm(dims.num_experts, at::kLong).narrow(0, 0, dims.top_k));
  routing.expert_ids = at::stack(rows);  // [tokens, k]
  routing.weights = at::softmax(at::randn({tokens, dims.top_k}, at::TensorOptions().dtype(dtype)), -1).requires_grad_(true);
  routing.aux_loss = at::zeros({}, dtype);
  routing.tokens_per_expert = at::bincount(routing.expert_ids.view(-1), {}, dims.num_experts);
  return routing;
}

Checks experts_checks(const PluginDescriptor& descriptor) {
  auto setup = [&descriptor](c10::ScalarType dtype, uint64_t seed) {
    at::manual_seed(seed);
    PluginContext context = tiny_context(dtype);
    auto experts = build<Experts>(descriptor, context);
    at::Tensor hidden = at::randn({10, context.dims.hidden_size}, at::TensorOptions().dtype(dtype)).requires_grad_(true);
    Routing routing = random_routing(hidden.size(0), context.dims, dtype);
    return std::tuple{std::move(experts), hidden, routing};
  };
  return {
      {"output shapes", [=] {
         auto [experts, hidden, routing] = setup(at::kFloat, 1);
         at::Tensor out = experts->forward(hidden, routing);
         expect(out.sizes() == hidden.sizes(), "output " + describe_shape(out) + ", expected " + describe_shape(hidden));
         return "output " + describe_shape(out);
       }},
      {"finite gradients", [=] {
         auto [experts, hidden, routing] = setup(at::kFloat, 2);
         (experts->forward(hidden, routing) * at::randn({hidden.size(0), hidden.size(1)})).sum().backward();
         expect(hidden.grad().defined() && all_finite(hidden.grad()), "input gradient missing or non-finite");
         expect(routing.weights.grad().defined() && all_finite(routing.weights.grad()),
                "routing weights gradient missing or non-finite");
         check_parameter_gradients(experts->parameters());
         return std::string("input, routing weights and parameter gradients finite");
       }},
      {"determinism under a fixed seed", [=] {
         auto [experts_a, hidden_a, routing_a] = setup(at::kFloat, 3);
         auto [experts_b, hidden_b, routing_b] = setup(at::kFloat, 3);
         expect(at::equal(experts_a->forward(hidden_a, routing_a), experts_b->forward(hidden_b, routing_b)),
                "two builds with the same seed gave different outputs");
         return std::string("identical outputs");
       }},
      {"unused slots are skipped", [=] {
         // More slots than top_k, some of weight 0 (unused, pithtrain/router.h), one token with none used,
         // and one expert named only by unused slots whose weights are NaN: computing any unused slot
         // would make the output NaN, and pointing the unused slots elsewhere must change nothing.
         auto [experts, hidden, routing] = setup(at::kFloat, 6);
         const int64_t tokens = hidden.size(0), num_experts = routing.tokens_per_expert.numel(), poisoned = num_experts - 1;
         std::vector<at::Tensor> rows;
         for (int64_t t = 0; t < tokens; ++t) rows.push_back(at::randperm(num_experts, at::kLong).narrow(0, 0, 3));
         at::Tensor ids = at::stack(rows);                                                                // [T, 3]
         at::Tensor raw = at::rand({tokens, 3}) + 0.1;
         at::Tensor unused = (at::rand({tokens, 3}) < 0.4) | (ids == poisoned);
         unused[0].fill_(true);                                                                 // a token with no expert
         Routing variable;
         variable.expert_ids = ids;
         variable.weights = raw.masked_fill(unused, 0.0).requires_grad_(true);
         variable.aux_loss = at::zeros({});
         variable.tokens_per_expert = count_used_pairs(ids, variable.weights, num_experts);
         {
           at::NoGradGuard no_grad;
           for (auto& parameter : experts->parameters())
             if (parameter.tensor.dim() >= 1 && parameter.tensor.size(0) == num_experts) parameter.tensor[poisoned].fill_(NAN);
         }
         at::Tensor out = experts->forward(hidden, variable);
         expect(all_finite(out), "the output is not finite: an unused slot (weight 0) was computed");
         expect(out[0].abs().max().item<double>() == 0.0, "a token whose slots are all unused has a nonzero output");
         Routing elsewhere = variable;
         elsewhere.expert_ids = at::where(unused, (ids + 1) % poisoned, ids);
         at::Tensor moved = experts->forward(hidden, elsewhere);
         expect(at::allclose(out, moved, 1e-6, 1e-6), "the output depends on the expert ids of unused slots");
         (out * at::randn(out.sizes())).sum().backward();
         expect(all_finite(hidden.grad()) && hidden.grad()[0].abs().max().item<double>() == 0.0,
                "the input gradient is not finite, or nonzero for a token without experts");
         expect(all_finite(variable.weights.grad()) && variable.weights.grad().masked_select(unused).abs().max().item<double>() == 0.0,
                "an unused slot's weight got a gradient");
         return number(unused.to(at::kFloat).mean().item<double>()) + " of the slots unused, output finite and independent of them";
       }},
      {"double-precision gradient check", [=] {
         auto [experts, hidden, routing] = setup(at::kDouble, 4);
         at::Tensor probe = at::randn({hidden.size(0), hidden.size(1)}, at::kDouble);
         auto function = [&] { return (experts->forward(hidden, routing) * probe).sum(); };
         std::string detail;
         check_gradient(function, hidden, "input", detail);
         check_gradient(function, routing.weights, "routing weights", detail);
         check_gradient(function, experts->parameters().front().tensor, experts->parameters().front().name, detail);
         return detail;
       }},
  };
}

// ---- attention ----------------------------------------------------------------------------------------
Checks attention_checks(const PluginDescriptor& descriptor) {
  auto setup = [&descriptor](c10::ScalarType dtype, uint64_t seed) {
    at::manual_seed(seed);
    PluginContext context = tiny_context(dtype);
    auto attention = build<Attention>(descriptor, context);
    at::Tensor hidden =
        at::randn({2, context.dims.seq_len, context.dims.hidden_size}, at::TensorOptions().dtype(dtype)).requires_grad_(true);
    at::Tensor positions = at::arange(context.dims.seq_len, at::kLong);
    return std::tuple{std::move(attention), hidden, positions};
  };
  return {
      {"output shapes", [=] {
         auto [attention, hidden, positions] = setup(at::kFloat, 1);
         at::Tensor out = attention->forward(hidden, positions);
         expect(out.sizes() == hidden.sizes(), "output " + describe_shape(out) + ", expected " + describe_shape(hidden));
         return "output " + describe_shape(out);
       }},
      {"causality", [=] {
         auto [attention, hidden, positions] = setup(at::kDouble, 5);
         at::NoGradGuard no_grad;
         at::Tensor before = attention->forward(hidden, positions);
         at::Tensor changed = hidden.clone();
         const int64_t last = hidden.size(1) - 1;
         changed.select(1, last).add_(1.0);
         at::Tensor after = attention->forward(changed, positions);
         double earlier = (after.narrow(1, 0, last) - before.narrow(1, 0, last)).abs().max().item<double>();
         double at_last = (after.select(1, last) - before.select(1, last)).abs().max().item<double>();
         expect(earlier < 1e-12, "changing the last token changed earlier outputs by " + number(earlier));
         expect(at_last > 1e-6, "changing the last token did not change its own output");
         return "earlier outputs moved " + number(earlier) + ", the last " + number(at_last);
       }},
      {"finite gradients", [=] {
         auto [attention, hidden, positions] = setup(at::kFloat, 2);
         (attention->forward(hidden, positions) * at::randn(hidden.sizes())).sum().backward();
         expect(hidden.grad().defined() && all_finite(hidden.grad()), "input gradient missing or non-finite");
         check_parameter_gradients(attention->parameters());
         return std::string("input and parameter gradients finite");
       }},
      {"determinism under a fixed seed", [=] {
         auto [attention_a, hidden_a, positions_a] = setup(at::kFloat, 3);
         auto [attention_b, hidden_b, positions_b] = setup(at::kFloat, 3);
         expect(at::equal(attention_a->forward(hidden_a, positions_a), attention_b->forward(hidden_b, positions_b)),
                "two builds with the same seed gave different outputs");
         return std::string("identical outputs");
       }},
      {"double-precision gradient check", [=] {
         auto [attention, hidden, positions] = setup(at::kDouble, 4);
         at::Tensor probe = at::randn(hidden.sizes(), at::kDouble);
         auto function = [&] { return (attention->forward(hidden, positions) * probe).sum(); };
         std::string detail;
         check_gradient(function, hidden, "input", detail);
         check_gradient(function, attention->parameters().front().tensor, attention->parameters().front().name, detail);
         return detail;
       }},
      {"cache path equals forward", [=] {
         // Optional (Attention::supports_cache): a plugin without one still generates, by recomputing.
         auto [attention, hidden, positions] = setup(at::kDouble, 6);
         if (!attention->supports_cache()) return std::string("no cache path: generation recomputes the prefix with forward()");
         at::NoGradGuard no_grad;
         const at::Tensor x = hidden.detach();
         const at::Tensor whole = attention->forward(x, positions);  // [B, S, H]
         AttentionCache cache;
         std::vector<at::Tensor> pieces;
         for (int64_t start = 0; start < x.size(1);) {  // a prompt of 2 tokens, then one at a time
           const int64_t piece = start == 0 ? 2 : 1;
           pieces.push_back(attention->forward_cached(x.narrow(1, start, piece), positions.narrow(0, start, piece), cache));
           expect(pieces.back().sizes() == x.narrow(1, start, piece).sizes(),
                  "forward_cached returned " + describe_shape(pieces.back()) + " for " + std::to_string(piece) + " new tokens");
           cache.length = start += piece;
         }
         const double error = (at::cat(pieces, 1) - whole).abs().max().item<double>();
         expect(error < 1e-10, "forward_cached token by token differs from forward() on the whole sequence by " + number(error));
         return "token by token equals forward() to " + number(error);
       }},
  };
}

// ---- optimizer ----------------------------------------------------------------------------------------
// Fits y = W x + b by least squares; returns the losses before and after `steps` steps and the final W.
struct FitResult { double first, last; at::Tensor weight, frozen; };
FitResult fit(const PluginDescriptor& descriptor, int steps) {
  at::manual_seed(7);
  PluginContext context = tiny_context(at::kDouble);
  at::Tensor weight = at::randn({3, 4}, at::kDouble).requires_grad_(true);
  at::Tensor bias = at::zeros({3}, at::kDouble).requires_grad_(true);
  at::Tensor frozen = at::randn({2}, at::kDouble).requires_grad_(true);  // never gets a gradient
  context.parameters = {{"weight", weight, true}, {"bias", bias, false}, {"frozen", frozen, true}};
  auto optimizer = build<Optimizer>(descriptor, context);
  for (const auto& state : optimizer->state()) expect(state.tensor.defined(), "state tensor " + state.name + " undefined");
  at::Tensor x = at::randn({32, 4}, at::kDouble), target = at::randn({32, 3}, at::kDouble);
  FitResult result{};
  at::Tensor frozen_before = frozen.detach().clone();
  for (int step = 0; step <= steps; ++step) {
    weight.mutable_grad() = at::Tensor();
    bias.mutable_grad() = at::Tensor();
    at::Tensor loss = (at::linear(x, weight, bias) - target).pow(2).mean();
    if (step == 0) result.first = loss.item<double>();
    result.last = loss.item<double>();
    if (step == steps) break;
    loss.backward();
    optimizer->step(0.05);
  }
  result.weight = weight.detach().clone();
  result.frozen = (frozen.detach() - frozen_before).abs().max();
  return result;
}

Checks optimizer_checks(const PluginDescriptor& descriptor) {
  return {
      {"lowers a least-squares loss", [=] {
         FitResult result = fit(descriptor, 100);
         expect(result.last < 0.5 * result.first, "loss " + number(result.first) + " -> " + number(result.last));
         expect(all_finite(result.weight), "parameters became non-finite");
         return "loss " + number(result.first) + " -> " + number(result.last) + " in 100 steps";
       }},
      {"skips parameters without gradients", [=] {
         FitResult result = fit(descriptor, 5);
         expect(result.frozen.item<double>() == 0.0, "a parameter without a gradient moved");
         return std::string("unchanged");
       }},
      {"determinism", [=] {
         expect(at::equal(fit(descriptor, 10).weight, fit(descriptor, 10).weight), "two identical runs differ");
         return std::string("identical parameters after two runs");
       }},
  };
}

// ---- schedule -----------------------------------------------------------------------------------------
Checks schedule_checks(const PluginDescriptor& descriptor) {
  return {
      {"gradient accumulation equals the mean-loss gradient", [=] {
         at::manual_seed(11);
         PluginContext context = tiny_context(at::kDouble);
         at::Tensor weight = at::randn({3, 4}, at::kDouble).requires_grad_(true);
         const at::Tensor initial = weight.detach().clone();
         context.parameters = {{"weight", weight, true}};
         auto schedule = build<Schedule>(descriptor, context);
         // The model as a whole (forward) and as two units (forward_unit): the schedule picks.
         std::vector<Parameter> shards = schedule->shard({{{"weight", weight, true}}, {}});
         at::Tensor updated = shards.empty() ? weight : shards[0].tensor;  // what the optimizer sees
         const int64_t micro_batches = 3;
         at::Tensor x = at::randn({micro_batches, 5, 4}, at::kDouble), target = at::randn({micro_batches, 5, 3}, at::kDouble);
         std::vector<int64_t> seen;
         int optimizer_steps = 0, hooks = 0;
         at::Tensor grad_at_step;
         StepFunctions step;
         step.micro_batches = micro_batches;
         step.forward = [&](int64_t index) {
           seen.push_back(index);
           at::Tensor loss = (at::linear(x[index], weight) - target[index]).pow(2).mean();
           return MicroBatchLoss{loss, loss.item<double>(), 0.0, 5};
         };
         step.units = 2;
         step.tokens_per_micro_batch = 5;
         // A V-shaped pipeline schedule (dualpipev) runs the two units as its two chunks.
         step.stage_chunks = schedule->chunks_per_stage() == 2 ? std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 2}}
                                                               : std::vector<std::pair<int64_t, int64_t>>{{0, 2}};
         step.activation_shape = {5, 3};
         step.activation_dtype = at::kDouble;
         step.forward_unit = [&](int64_t unit, int64_t index, const at::Tensor& input) {
           if (unit == 0 && (seen.empty() || seen.back() != index)) seen.push_back(index);
           if (unit == 0) return UnitOutput{at::linear(x[index], weight), at::Tensor()};
           return UnitOutput{(input - target[index]).pow(2).mean(), at::Tensor()};
         };
         step.zero_grad = [&] { weight.mutable_grad() = at::Tensor(), updated.mutable_grad() = at::Tensor(); };
         step.clip_gradients = [&] { return updated.grad().norm().item<double>(); };
         step.optimizer_step = [&] { ++optimizer_steps; grad_at_step = updated.grad().clone(); };
         step.after_optimizer_step = [&] { expect(optimizer_steps == 1, "hook ran before the optimizer"); ++hooks; };
         updated.mutable_grad() = at::ones_like(updated);  // stale gradient the schedule must clear
         StepResult result = schedule->run_step(step);
         expect(seen == std::vector<int64_t>({0, 1, 2}), "the micro-batches were not run once each, in order");
         expect(optimizer_steps == 1 && hooks == 1, "optimizer_step and after_optimizer_step must run once each");
         at::Tensor reference = initial.clone().requires_grad_(true);
         at::Tensor full = at::zeros({}, at::kDouble);
         for (int64_t i = 0; i < micro_batches; ++i) full = full + (at::linear(x[i], reference) - target[i]).pow(2).mean();
         (full / micro_batches).backward();
         double error = (grad_at_step.reshape(-1) - reference.grad().reshape(-1)).abs().max().item<double>();
         expect(error < 1e-12, "accumulated gradient differs from the mean-loss gradient by " + number(error));
         expect(std::abs(result.loss - full.item<double>() / micro_batches) < 1e-12, "StepResult.loss is not the mean");
         return "max gradient difference " + number(error);
       }},
  };
}

}  // namespace

std::vector<CheckResult> run_conformance(const PluginDescriptor& descriptor) {
  const std::string kind = descriptor.kind ? descriptor.kind : "";
  Checks checks;
  if (kind == "router") checks = router_checks(descriptor);
  else if (kind == "experts") checks = experts_checks(descriptor);
  else if (kind == "attention") checks = attention_checks(descriptor);
  else if (kind == "optimizer") checks = optimizer_checks(descriptor);
  else if (kind == "schedule") checks = schedule_checks(descriptor);
  else return {{"known kind", false, "kind '" + kind + "' has no conformance suite"}};
  std::vector<CheckResult> results;
  for (auto& [name, check] : checks) {
    CheckResult result{kind + ": " + name, false, ""};
    try {
      result.detail = check();
      result.passed = true;
    } catch (const std::exception& error) {
      result.detail = error.what();
    }
    results.push_back(result);
  }
  return results;
}

}  // namespace pithtrain
