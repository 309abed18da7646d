// MoE correctness: router losses against hand-computed examples, losses that silently do not train are
// refused, gradient-accumulation invariance, idle experts, determinism, freezing and diagnostics.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "checkpoint.h"
#include "data.h"
#include "json.h"
#include "pithtrain/experts.h"
#include "pithtrain/router.h"
#include "registry.h"
#include "trainer.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

fs::path scratch() {
  static fs::path dir = [] {
    fs::path created = fs::temp_directory_path() / ("pithtrain_test_moe_" + std::to_string(::getpid()));
    fs::create_directories(created);
    return created;
  }();
  return dir;
}

std::string tokens() {
  static std::string path = [] {
    std::string out = (scratch() / "literature.tokens").string();
    convert_text({std::string(PITHTRAIN_FORTUNES_DIR) + "/literature"}, "fortune", out);
    return out;
  }();
  return path;
}

Options small_config(const std::vector<std::string>& overrides) {
  // The tests' own config (tests/configs/tiny.toml), never configs/tiny.toml, which may change freely.
  Options options = Options::from_file(std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs/tiny.toml");
  for (const auto& assignment :
       {"model.hidden_size=32", "model.num_layers=3", "model.dense_hidden_size=64", "model.moe.expert_hidden_size=32",
        "train.seq_len=32", "train.batch_size=8", "eval.batches=1", "checkpoint.every=0", "train.log_every=1"})
    options.set_override(assignment);
  options.set_override("data.path=\"" + tokens() + "\"");
  for (const auto& assignment : overrides) options.set_override(assignment);
  return options;
}

RunSettings quiet(const std::string& name, std::vector<std::string> plugin_files = {}) {
  RunSettings settings;
  settings.out_dir = (scratch() / name).string();
  fs::remove_all(settings.out_dir);
  settings.quiet = true;
  settings.plugin_files = std::move(plugin_files);
  return settings;
}

std::vector<JsonValue> metrics(const TrainSummary& summary) {
  std::ifstream in(summary.run_dir + "/metrics.jsonl");
  std::vector<JsonValue> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(parse_json(line, "metrics.jsonl"));
  return rows;
}

}  // namespace

// ---- router losses on examples small enough to compute by hand ----------------------------------------

// 4 tokens, 2 experts, top-1. probs [[.9,.1],[.8,.2],[.3,.7],[.2,.8]], experts 0,0,0,1.
const at::Tensor kProbs = at::tensor({0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.2, 0.8}, at::kDouble).view({4, 2});
const at::Tensor kIds = at::tensor({0, 0, 0, 1}, at::kLong).view({4, 1});

TEST(RouterLosses, SwitchBalanceLossByHand) {
  // f = [3/4, 1/4], P = [0.55, 0.45]: 2 * (0.75 * 0.55 + 0.25 * 0.45) = 1.05.
  EXPECT_NEAR(switch_balance_loss(kProbs, kIds).item<double>(), 1.05, 1e-12);
}

TEST(RouterLosses, GlobalBatchLossFromTheStepCountsByHand) {
  // The step's counts [1, 3] (e.g. other micro-batches chose expert 1 more): f = [1/4, 3/4],
  // P = [0.55, 0.45]: 2 * (0.25 * 0.55 + 0.75 * 0.45) = 0.95.
  EXPECT_NEAR(balance_loss_from_counts(kProbs, at::tensor({1.0, 3.0}, at::kDouble)).item<double>(), 0.95, 1e-12);
}

TEST(RouterLosses, SequenceBalanceLossByHand) {
  // Sequences of 2 tokens. First: f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85 = 1.7. Second: f = [.5, .5],
  // P = [0.25, 0.75] -> 2 * (0.125 + 0.375) = 1.0. Mean 1.35. Unnormalised scores give the same.
  EXPECT_NEAR(sequence_balance_loss(kProbs, kIds, 2).item<double>(), 1.35, 1e-12);
  EXPECT_NEAR(sequence_balance_loss(kProbs * at::tensor({3.0, 0.5, 1.0, 2.0}, at::kDouble).view({4, 1}), kIds, 2).item<double>(),
              1.35, 1e-12);
  // One sequence of 4 equals the switch loss here (normalised scores are the probabilities).
  EXPECT_NEAR(sequence_balance_loss(kProbs, kIds, 4).item<double>(), 1.05, 1e-12);
}

TEST(RouterLosses, OneProcessGlobalBatchLossEqualsTheSwitchLoss) {
  // With one process and one micro-batch the global-batch frequencies are the micro-batch's.
  auto run = [](const std::string& key, const std::string& name) {
    return metrics(Trainer(small_config({"model.moe.router.plugin=topk_softmax", "model.moe.router.aux_loss_coeff=0.0",
                                         "model.moe.router." + key + "=0.01", "train.steps=2"}),
                           quiet(name))
                       .run());
  };
  auto global = run("global_aux_loss_coeff", "global_loss"), local = run("aux_loss_coeff", "switch_loss");
  for (size_t i = 0; i < global.size(); ++i)
    EXPECT_NEAR(global[i].find("router_losses")->find("global")->number, local[i].find("router_losses")->find("switch")->number, 1e-7);
}

TEST(RouterLosses, ZLossByHand) {
  // logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2: mean of squares = 2.5 ln^2 2.
  at::Tensor logits = at::tensor({0.0, 0.0, std::log(3.0), 0.0}, at::kDouble).view({2, 2});
  EXPECT_NEAR(router_z_loss(logits).item<double>(), 2.5 * std::pow(std::log(2.0), 2), 1e-12);
}

TEST(RouterLosses, EveryConfiguredTermIsLoggedAndTheyAddUpToTheAuxLoss) {
  TrainSummary summary = Trainer(small_config({"model.moe.router.plugin=topk_softmax", "model.moe.router.aux_loss_coeff=0.01",
                                               "model.moe.router.seq_aux_loss_coeff=0.001", "model.moe.router.z_loss_coeff=0.0001",
                                               "train.steps=3"}),
                                 quiet("loss_terms"))
                             .run();
  for (const auto& row : metrics(summary)) {
    const JsonValue* terms = row.find("router_losses");
    ASSERT_NE(terms, nullptr);
    double total = 0;
    for (const char* name : {"switch", "sequence", "z"}) {
      ASSERT_NE(terms->find(name), nullptr) << name;
      EXPECT_GT(terms->find(name)->number, 0.0) << name;
      total += terms->find(name)->number;
    }
    EXPECT_NEAR(total, row.find("aux_loss")->number, 1e-5 * total);
    // Two MoE layers with a switch loss near its balanced value 1: 2 * 0.01 * ~1.
    EXPECT_NEAR(terms->find("switch")->number, 0.02, 0.01);
  }
}

TEST(RouterLosses, ALossThatCannotTrainTheRouterStopsTraining) {
  const std::string plugin = std::string(PITHTRAIN_BROKEN_PLUGIN_DIR) + "/router_silent_loss.so";
  for (const char* defect : {"detached", "unreported"}) {
    Trainer trainer(small_config({"model.moe.router.plugin=silent_loss", std::string("model.moe.router.defect=") + defect,
                                  "train.steps=2"}),
                    quiet(std::string("silent_") + defect, {plugin}));
    try {
      trainer.run();
      FAIL() << defect << ": expected an error";
    } catch (const Error& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("layer 1 router"), std::string::npos) << message;  // layer 0 is dense
      EXPECT_NE(message.find(std::string(defect) == "detached" ? "detached" : "sum of its loss_terms"), std::string::npos)
          << message;
    }
  }
}

// ---- invariance ------------------------------------------------------------------------------------------

TEST(Invariance, GradientAccumulationOneVersusFourMicroBatches) {
  // The same 8 windows per step as one batch or as 4 micro-batches of 2: equal loss and gradient norm
  // (float32 summation order only). aux_free routing has no batch-nonlinear loss; its bias update
  // counts the whole step's load either way.
  auto run = [](const std::vector<std::string>& layout, const std::string& name) {
    std::vector<std::string> overrides = {"train.steps=4", "train.batch_size=8", "train.micro_batches=1"};
    overrides.insert(overrides.end(), layout.begin(), layout.end());
    return metrics(Trainer(small_config(overrides), quiet(name)).run());
  };
  auto one = run({}, "accumulate_1"), four = run({"train.batch_size=2", "train.micro_batches=4"}, "accumulate_4");
  ASSERT_EQ(one.size(), four.size());
  for (size_t i = 0; i < one.size(); ++i) {
    for (const char* field : {"cross_entropy", "grad_norm"})
      EXPECT_NEAR(one[i].find(field)->number, four[i].find(field)->number, 2e-5 * one[i].find(field)->number)
          << field << " at step " << i + 1;
    // The per-step load the aux_free bias moves by is the same.
    const JsonValue& a = one[i].find("router")->items[0], &b = four[i].find("router")->items[0];
    for (size_t e = 0; e < a.find("tokens_per_expert")->items.size(); ++e)
      EXPECT_EQ(a.find("tokens_per_expert")->items[e].number, b.find("tokens_per_expert")->items[e].number);
  }
}

TEST(Invariance, GlobalBalanceLossCountsEveryMicroBatchOfTheStep) {
  // The global-batch balance loss forms f from the whole step's counts (a counting pass before the
  // step), so 4 micro-batches of 2 give the loss, aux loss and gradient norm of one batch of 8. Without
  // the counting pass each micro-batch would use its own counts: the aux loss differs by 0.07-0.14% here.
  auto run = [](const std::vector<std::string>& layout, const std::string& name) {
    std::vector<std::string> overrides = {"train.steps=4", "train.batch_size=8", "train.micro_batches=1",
                                          "model.moe.router.plugin=topk_softmax", "model.moe.router.aux_loss_coeff=0",
                                          "model.moe.router.global_aux_loss_coeff=0.05"};
    overrides.insert(overrides.end(), layout.begin(), layout.end());
    return metrics(Trainer(small_config(overrides), quiet(name)).run());
  };
  auto one = run({}, "global_1"), four = run({"train.batch_size=2", "train.micro_batches=4"}, "global_4");
  ASSERT_EQ(one.size(), four.size());
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_GT(one[i].find("aux_loss")->number, 0.0);
    for (const char* field : {"cross_entropy", "aux_loss", "grad_norm"})
      EXPECT_NEAR(one[i].find(field)->number, four[i].find(field)->number, 2e-5 * one[i].find(field)->number)
          << field << " at step " << i + 1;
  }
}

// ---- idle experts ----------------------------------------------------------------------------------------

TEST(IdleExperts, AllTokensOnOneExpertPairWorkAndIdleExpertsGetZeroGradients) {
  for (const char* name : {"grouped", "loop"}) {
    LoadedPlugin plugin = load_plugin_file(std::string(PITHTRAIN_PLUGIN_DIR) + "/experts_" + name + ".so");
    PluginContext context;
    context.dims = {.hidden_size = 8, .num_layers = 1, .num_experts = 6, .top_k = 2, .expert_hidden_size = 4, .init_std = 0.5};
    Options options = Options::from_string("", "test.toml");
    auto experts = plugin.descriptor->make_experts(options, context);
    const int64_t tokens = 16;
    at::Tensor x = at::randn({tokens, 8}).requires_grad_(true);
    Routing routing;  // every token on experts 0 and 3; 1, 2, 4, 5 get nothing
    routing.expert_ids = at::tensor({0, 3}, at::kLong).repeat({tokens, 1});
    routing.weights = at::rand({tokens, 2}).requires_grad_(true);
    at::Tensor out = experts->forward(x, routing);
    out.pow(2).sum().backward();
    EXPECT_TRUE(at::isfinite(out).all().item<bool>()) << name;
    EXPECT_TRUE(at::isfinite(x.grad()).all().item<bool>()) << name;
    for (const auto& parameter : experts->parameters()) {
      ASSERT_TRUE(parameter.tensor.grad().defined()) << name << " " << parameter.name;
      at::Tensor grad = parameter.tensor.grad();
      for (int64_t expert : {1, 2, 4, 5}) EXPECT_EQ(grad[expert].abs().max().item<double>(), 0.0) << name << " " << parameter.name;
      for (int64_t expert : {0, 3}) EXPECT_GT(grad[expert].abs().max().item<double>(), 0.0) << name << " " << parameter.name;
    }
  }
}

// ---- determinism -----------------------------------------------------------------------------------------

TEST(Determinism, TwentyStepsTwiceAreBitIdentical) {
  auto run = [](const std::string& name) {
    Trainer trainer(small_config({"train.steps=20", "train.deterministic=true"}), quiet(name));
    return trainer.run();
  };
  TrainSummary a = run("deterministic_a"), b = run("deterministic_b");
  ASSERT_EQ(a.losses.size(), 20u);
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i].second, b.losses[i].second) << "step " << i + 1;
  SafetensorsFile wa = load_safetensors(a.run_dir + "/model.safetensors"), wb = load_safetensors(b.run_dir + "/model.safetensors");
  ASSERT_EQ(wa.tensors.size(), wb.tensors.size());
  for (const auto& tensor : wa.tensors) EXPECT_TRUE(at::equal(tensor.tensor, *wb.find(tensor.name))) << tensor.name;
}

// ---- fine-tuning controls --------------------------------------------------------------------------------

TEST(Freeze, FrozenParametersAndTheFrozenBiasDoNotMove) {
  Trainer trainer(small_config({"train.steps=5", "train.freeze=[\"layers.*.router.*\", \"layers.2.experts.*\", \"embedding.weight\"]",
                                "model.moe.router.freeze_bias=true", "model.moe.router.update_rate=0.1"}),
                  quiet("freeze"));
  std::map<std::string, at::Tensor> before;
  for (const auto& item : trainer.model().state()) before[item.name] = item.tensor.detach().clone();
  trainer.run();
  int frozen = 0, moved = 0;
  for (const auto& item : trainer.model().state()) {
    const bool should_freeze = item.name.find(".router.") != std::string::npos || item.name.rfind("layers.2.experts.", 0) == 0 ||
                               item.name == "embedding.weight";
    const bool same = at::equal(before[item.name], item.tensor.detach());
    if (should_freeze) {
      EXPECT_TRUE(same) << item.name << " moved";
      frozen += same;
    } else {
      EXPECT_FALSE(same) << item.name << " did not train";
      moved += !same;
    }
  }
  EXPECT_EQ(frozen, 2 * 2 + 3 + 1);  // 2 MoE layers x (gate, expert_bias), layer 2's 3 expert tensors, embedding
  EXPECT_GT(moved, 10);
}

TEST(Freeze, APatternThatMatchesNothingIsAnError) {
  try {
    Trainer trainer(small_config({"train.freeze=[\"layers.*.routr.*\"]"}), quiet("freeze_typo"));
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("layers.*.routr.*"), std::string::npos) << error.what();
  }
}

// ---- diagnostics -----------------------------------------------------------------------------------------

TEST(Diagnostics, MaxViolationAndDeadExpertsAreReportedPerLayer) {
  // A router that sends every token to experts 0..k-1 of E: with a 3-step window the other E - k are
  // dead from step 3 on, and the max violation is (1/k) / (1/E) - 1 = E/k - 1 (8 experts, top-2: 3).
  const std::string plugin = std::string(PITHTRAIN_BROKEN_PLUGIN_DIR) + "/router_silent_loss.so";
  Trainer trainer(small_config({"model.moe.router.plugin=silent_loss", "model.moe.router.defect=lopsided",
                                "train.steps=5", "train.dead_expert_steps=3"}),
                  quiet("diagnostics", {plugin}));
  const double experts = static_cast<double>(trainer.model().dims().num_experts);
  const double top_k = static_cast<double>(trainer.model().dims().top_k);
  const int64_t moe_layers = trainer.model().num_moe_layers();
  ASSERT_LT(top_k, experts) << "the test needs experts that get no token";
  TrainSummary summary = trainer.run();
  auto rows = metrics(summary);
  ASSERT_EQ(rows.size(), 5u);
  for (const auto& row : rows) {
    const double step = row.find("step")->number;
    ASSERT_EQ(row.find("router")->items.size(), static_cast<size_t>(moe_layers));
    for (const auto& layer : row.find("router")->items) {
      EXPECT_NEAR(layer.find("max_violation")->number, experts / top_k - 1.0, 1e-9);
      EXPECT_EQ(layer.find("dead_experts")->number, step >= 3 ? experts - top_k : 0.0) << "step " << step;
      EXPECT_LT(layer.find("entropy")->number, 0.5);
    }
  }
  // Each warning once per layer, in the run's log.
  std::ifstream log(summary.run_dir + "/train.log");
  std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  auto count = [&](const std::string& what) {
    int found = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++found;
    return found;
  };
  EXPECT_EQ(count("dead experts"), moe_layers) << text;
  EXPECT_EQ(count("routing collapsed"), moe_layers) << text;
}

// ---- capacity and drops ----------------------------------------------------------------------------------

TEST(Capacity, EachExpertKeepsItsHeaviestPairsUpToTheCapacity) {
  // 4 tokens, top-1, 2 experts: all on expert 0 with weights .9 .3 .8 .2; capacity factor 1 gives
  // C = ceil(4 / 2) = 2, so the .9 and .8 pairs stay and half of the pairs are dropped.
  Routing routing;
  routing.expert_ids = at::zeros({4, 1}, at::kLong);
  routing.weights = at::tensor({0.9, 0.3, 0.8, 0.2}, at::kDouble).view({4, 1}).requires_grad_(true);
  Routing dropless = routing;
  apply_expert_capacity(dropless, 0.0, 2);
  EXPECT_FALSE(dropless.dropped_fraction.defined());
  apply_expert_capacity(routing, 1.0, 2);
  EXPECT_TRUE(at::equal(routing.weights.detach(), at::tensor({0.9, 0.0, 0.8, 0.0}, at::kDouble).view({4, 1})));
  EXPECT_DOUBLE_EQ(routing.dropped_fraction.item<double>(), 0.5);
  // Two experts, top-2, capacity 1.5: C = ceil(1.5 * 6 / 2) = 5 > 3 pairs each: nothing dropped.
  Routing wide;
  wide.expert_ids = at::tensor({0, 1, 1, 0, 0, 1}, at::kLong).view({3, 2});
  wide.weights = at::rand({3, 2}, at::kDouble);
  apply_expert_capacity(wide, 1.5, 2);
  EXPECT_DOUBLE_EQ(wide.dropped_fraction.item<double>(), 0.0);
}

TEST(Capacity, TheDroppedShareIsLoggedPerLayer) {
  TrainSummary summary = Trainer(small_config({"model.moe.router.plugin=topk_softmax", "model.moe.router.capacity_factor=0.5",
                                               "train.steps=3"}),
                                 quiet("capacity"))
                             .run();
  for (const auto& row : metrics(summary))
    for (const auto& layer : row.find("router")->items) {
      ASSERT_NE(layer.find("dropped_fraction"), nullptr);
      // Half the capacity of a perfectly balanced load: at least half the pairs are dropped.
      EXPECT_GE(layer.find("dropped_fraction")->number, 0.5 - 1e-9);
      EXPECT_LT(layer.find("dropped_fraction")->number, 1.0);
    }
  // Dropless (the default) logs no dropped share.
  TrainSummary dropless = Trainer(small_config({"train.steps=1"}), quiet("dropless")).run();
  EXPECT_EQ(metrics(dropless)[0].find("router")->items[0].find("dropped_fraction"), nullptr);
}
