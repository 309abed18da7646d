// The decoder options Qwen3-Next and Qwen3.5 need ([model] norm_zero_centered, [model.moe] shared_expert_gate),
// each against the plain model it must equal once its parameters are mapped, in double, forward and backward.
#include <gtest/gtest.h>

#include <regex>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "model.h"

using namespace pithtrain;

namespace {

// Two MoE layers with a shared expert and per-head QK-norm; `extra` goes into [model], `moe_extra` into [model.moe].
std::string config(const std::string& extra, const std::string& moe_extra, const std::string& attention_extra = "") {
  return "[model]\nvocab_size = 32\nhidden_size = 16\nnum_layers = 2\nnum_heads = 2\nhead_dim = 8\n" + extra +
         "\n[model.attention]\nqk_norm = \"head\"\n" + attention_extra + "\n[model.moe]\nnum_experts = 4\ntop_k = 2\n"
         "expert_hidden_size = 8\nshared_experts = 1\n" + moe_extra + "\n[model.moe.router]\nplugin = \"topk_softmax\"\n"
         "aux_loss_coeff = 0.0\n";
}

struct Built {
  PluginRegistry registry{{PITHTRAIN_PLUGIN_DIR}, {}};
  Options options;
  std::unique_ptr<Model> model;
  explicit Built(const std::string& toml) : options(Options::from_string(toml, "test.toml")) {
    PluginContext context;
    context.logger = &logger();
    context.dtype = at::kDouble;
    model = std::make_unique<Model>(options.table("model"), registry, context);
    options.table("model").check_unknown_keys("test");
  }
  std::map<std::string, at::Tensor> parameters() const {
    std::map<std::string, at::Tensor> result;
    for (const auto& parameter : model->parameters()) result[parameter.name] = parameter.tensor;
    return result;
  }
};

bool is_layer_norm(const std::string& name) {
  return name.ends_with("attention_norm.weight") || name.ends_with("ffn_norm.weight") || name == "final_norm.weight" ||
         name.ends_with("q_norm") || name.ends_with("k_norm");
}

// Runs both models on the same tokens; the logits and every common parameter's gradient must agree (a's
// gradient being `scale` times b's for the parameters whose name ends with `scaled`).
void expect_same_model(Built& a, Built& b, const std::string& scaled = "", double scale = 1.0) {
  at::manual_seed(3);
  const at::Tensor tokens = at::randint(0, 32, {2, 9}, at::kLong);
  ModelOutput out_a = a.model->forward(tokens), out_b = b.model->forward(tokens);
  EXPECT_TRUE(at::allclose(out_a.logits, out_b.logits, 1e-12, 1e-12)) << (out_a.logits - out_b.logits).abs().max();
  out_a.loss.backward();
  out_b.loss.backward();
  auto b_parameters = b.parameters();
  for (const auto& [name, tensor] : a.parameters()) {
    if (!b_parameters.count(name)) continue;
    ASSERT_TRUE(tensor.grad().defined()) << name;
    const at::Tensor expected = b_parameters[name].grad() * (!scaled.empty() && name.ends_with(scaled) ? scale : 1.0);
    EXPECT_TRUE(at::allclose(tensor.grad(), expected, 1e-10, 1e-12)) << name;
  }
}

}  // namespace

TEST(ModelOptions, ZeroCenteredNormsActAsPlainNormsOfOnePlusTheWeight) {
  Built centred(config("norm_zero_centered = true", "", "qk_norm_zero_centered = true"));
  Built plain(config("", ""));
  auto c = centred.parameters(), p = plain.parameters();
  ASSERT_EQ(c.size(), p.size());
  at::NoGradGuard no_grad;
  for (auto& [name, tensor] : c) {
    if (is_layer_norm(name)) {
      EXPECT_TRUE(at::equal(tensor, at::zeros_like(tensor))) << name << " starts at zero (scale 1)";
      tensor.normal_(0.0, 0.5);
      p[name].copy_(tensor + 1.0);
    } else {
      p[name].copy_(tensor);
    }
  }
  at::GradMode::set_enabled(true);
  expect_same_model(centred, plain);
}

TEST(ModelOptions, SharedExpertGateScalesTheSharedExpertsBySigmoid) {
  Built gated(config("", "shared_expert_gate = true"));
  Built plain(config("", ""));
  auto g = gated.parameters(), p = plain.parameters();
  ASSERT_TRUE(g.count("layers.0.shared_experts.gate"));
  EXPECT_EQ(g["layers.1.shared_experts.gate"].sizes().vec(), (std::vector<int64_t>{1, 16}));
  EXPECT_EQ(g.size(), p.size() + 2) << "one [1, H] gate per MoE layer, nothing else";
  {
    at::NoGradGuard no_grad;
    // A zero gate is sigmoid(0) = 1/2 on every token: the plain model with the shared down_proj halved.
    for (auto& [name, tensor] : p)
      tensor.copy_(name.ends_with("shared_experts.down_proj") ? g[name] * 0.5 : g[name]);
    for (const char* name : {"layers.0.shared_experts.gate", "layers.1.shared_experts.gate"}) g[name].zero_();
  }
  expect_same_model(gated, plain, "shared_experts.down_proj", 0.5);  // the gated model's down_proj is twice the plain one's
  EXPECT_GT(g["layers.0.shared_experts.gate"].grad().abs().max().item<double>(), 0.0) << "the gate trains";
}

TEST(ModelOptions, AGateWithoutSharedExpertsIsRefusedByName) {
  try {
    Built built(std::regex_replace(config("", "shared_expert_gate = true"), std::regex("shared_experts = 1"), "shared_experts = 0"));
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("model.moe.shared_expert_gate = true is out of range: it must be false without shared experts"),
              std::string::npos) << error.what();
  }
}
