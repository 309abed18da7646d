// The decoder options Qwen3-Next and Qwen3.5 need ([model] norm_zero_centered, [model.moe] shared_expert_gate) and
// DeepSeek-V3's multi-token prediction ([model] mtp_layers),
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

// Multi-token prediction ([model] mtp_layers, core/src/mtp.cpp) in double against a naive reference written here.
// With each MTP layer made the identity (its attention output and FFN down projections zero), depth k is
//   x^k_i = eh_proj_k [rms(Emb(t_{i+k})) enorm_k; rms(x^{k-1}_i) hnorm_k],  logits = W_head rms(x^k_i) final_norm_k,
// target t_{i+k+1}, x^0 = h the main model's last hidden state; rms(h_i) comes from the main logits
// (W_head rms(h_i) w_final, W_head of full column rank): the same normalisation hnorm applies. Then:
// mtp_coeff 0 leaves the loss and every main gradient as without MTP, and the coefficient scales the mean
// of the depths' cross-entropies into the loss and trains the shared embedding.
TEST(ModelOptions, MultiTokenPredictionMatchesANaiveReferenceAndOnlyAddsItsLoss) {
  auto build = [](const std::string& extra) {
    at::manual_seed(11);
    return std::make_unique<Built>(config(extra, ""));
  };
  auto plain = build(""), off = build("mtp_layers = 1\nmtp_loss_coeff = 0.0"), on = build("mtp_layers = 1\nmtp_loss_coeff = 0.7");
  auto deep = build("mtp_layers = 2\nmtp_loss_coeff = 0.7");
  for (auto* built : {plain.get(), off.get(), on.get(), deep.get()}) {  // a main final norm other than 1: h is taken before it
    at::NoGradGuard no_grad;
    at::manual_seed(5);
    built->parameters().at("final_norm.weight").uniform_(0.5, 1.5);
  }
  for (auto* built : {off.get(), on.get(), deep.get()}) {
    at::NoGradGuard no_grad;
    auto parameters = built->parameters();
    for (int64_t depth = 0; depth < built->model->mtp_layers(); ++depth) {
      const std::string prefix = "mtp_layers." + std::to_string(depth) + ".";
      for (const char* name : {"attention.o_proj", "experts.down_proj", "shared_experts.down_proj"}) parameters.at(prefix + name).zero_();
      for (const char* name : {"enorm.weight", "hnorm.weight", "final_norm.weight"}) parameters.at(prefix + name).uniform_(0.5, 1.5);
    }
  }
  at::manual_seed(3);
  const int64_t S = 8;
  const at::Tensor tokens = at::randint(0, 32, {2, S + 1}, at::kLong);  // [B, S + 1]
  ModelOutput out_plain = plain->model->forward(tokens), out_off = off->model->forward(tokens), out_on = on->model->forward(tokens);
  ModelOutput out_deep = deep->model->forward(tokens);

  auto naive_mean_cross_entropy = [&](Built& built, const ModelOutput& output) {
    auto p = built.parameters();
    auto weight = [&](const std::string& name) { return p.at(name).detach(); };
    auto rms = [](const at::Tensor& x) { return x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-5); };  // norm_eps default
    const at::Tensor head = weight("lm_head.weight");  // [V, H]
    const at::Tensor normed_h = std::get<0>(at::linalg_lstsq(head, output.logits.detach().reshape({-1, 32}).t())).t()
                                    .reshape({2, S, 16}) / weight("final_norm.weight");  // rms(h) [B, S, H]
    at::Tensor previous;  // x^{k-1} [B, S - k + 1, H]
    double sum = 0;
    for (int64_t k = 1; k <= built.model->mtp_layers(); ++k) {
      const std::string prefix = "mtp_layers." + std::to_string(k - 1) + ".";
      const int64_t n = S - k;
      at::Tensor hidden = (k == 1 ? normed_h.narrow(1, 0, n) : rms(previous.narrow(1, 0, n))) * weight(prefix + "hnorm.weight");
      at::Tensor embedded = rms(at::embedding(weight("embedding.weight"), tokens.narrow(1, k, n))) * weight(prefix + "enorm.weight");
      at::Tensor x = at::matmul(at::cat({embedded, hidden}, -1), weight(prefix + "eh_proj.weight").t());  // [B, n, H]
      at::Tensor logits = at::matmul(rms(x) * weight(prefix + "final_norm.weight"), head.t());        // [B, n, V]
      sum += at::cross_entropy_loss(logits.reshape({-1, 32}), tokens.narrow(1, k + 1, n).reshape(-1)).item<double>();
      previous = x;
    }
    return sum / static_cast<double>(built.model->mtp_layers());
  };
  // The core's cross-entropies are float32 (as the main one), the rest double: float32 rounding is the floor.
  for (auto [built, output] : {std::pair{on.get(), &out_on}, {deep.get(), &out_deep}}) {
    const double expected = naive_mean_cross_entropy(*built, *output);
    ASSERT_TRUE(output->mtp_cross_entropy.defined());
    EXPECT_NEAR(output->mtp_cross_entropy.item<double>(), expected, 1e-6 * expected) << built->model->mtp_layers() << " depths";
    EXPECT_NEAR(output->mtp_loss.item<double>(), 0.7 * expected, 1e-6 * expected);
    EXPECT_NEAR(output->loss.item<double>(), out_plain.loss.item<double>() + 0.7 * expected, 1e-6 * expected);
    EXPECT_NEAR(output->aux_loss.item<double>(), out_plain.aux_loss.item<double>(), 1e-12) << "aux_loss stays the routers' losses";
  }

  // Coefficient 0: the loss and every main parameter's gradient are those of the model without MTP.
  EXPECT_EQ(out_off.loss.item<double>(), out_plain.loss.item<double>());
  for (auto* out : {&out_plain, &out_off, &out_on}) out->loss.backward();
  auto plain_parameters = plain->parameters(), off_parameters = off->parameters(), p = on->parameters();
  for (const auto& [name, tensor] : plain_parameters)
    EXPECT_TRUE(at::allclose(off_parameters.at(name).grad(), tensor.grad(), 0, 1e-15)) << name;
  // With a coefficient the MTP loss trains the shared embedding and head, and its own eh_proj.
  EXPECT_GT((p.at("embedding.weight").grad() - plain_parameters.at("embedding.weight").grad()).abs().max().item<double>(), 1e-6);
  EXPECT_GT((p.at("lm_head.weight").grad() - plain_parameters.at("lm_head.weight").grad()).abs().max().item<double>(), 1e-6);
  EXPECT_GT(p.at("mtp_layers.0.eh_proj.weight").grad().abs().max().item<double>(), 1e-6);
}
