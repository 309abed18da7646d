// Per-layer attention ([model] layer_types, full_attention_interval): which table and plugin each layer gets,
// the names its parameters take, the manifest, explain's counts, the errors, and a tiny hybrid that trains.
#include <gtest/gtest.h>

#include <filesystem>

#include <ATen/ATen.h>

#include "data.h"
#include "explain.h"
#include "layer_types.h"
#include "model.h"
#include "precision.h"
#include "trainer.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

const std::string kHybridConfig = std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs/qwen3_next.toml";

// A small [model] with `extra` lines appended to it (before the attention tables), and `tables` after it.
std::string model_toml(int64_t layers, const std::string& extra, const std::string& tables) {
  return "[model]\nvocab_size = 32\nhidden_size = 16\nnum_layers = " + std::to_string(layers) +
         "\nnum_heads = 2\nhead_dim = 8\nfirst_dense_layers = " + std::to_string(layers) + "\n" + extra + "\n" + tables;
}

const std::string kLinearTable = "[model.linear_attention]\nplugin = \"gated_deltanet\"\nchunk_size = 4\n";

struct Built {
  PluginRegistry registry{{PITHTRAIN_PLUGIN_DIR}, {}};
  Options config;
  std::unique_ptr<Model> model;
  explicit Built(const std::string& toml) : config(Options::from_string(toml, "test.toml")) {
    PluginContext context;
    context.logger = &logger();
    model = std::make_unique<Model>(config.table("model"), registry, context);
    config.table("model").check_unknown_keys("test");
  }
};

std::string error_of(const std::string& toml) {
  try {
    Built built(toml);
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// The attention table each layer's parameters are saved under (layers.N.<table>.…).
std::vector<std::string> tables_of_layers(const Model& model) {
  std::vector<std::string> tables(model.dims().num_layers);
  for (const auto& parameter : model.parameters()) {
    if (parameter.name.rfind("layers.", 0) != 0) continue;
    const size_t dot = parameter.name.find('.', 7);
    const int64_t layer = std::stoll(parameter.name.substr(7, dot - 7));
    const std::string component = parameter.name.substr(dot + 1, parameter.name.find('.', dot + 1) - dot - 1);
    if (component.find("attention") != std::string::npos && !component.ends_with("_norm")) tables[layer] = component;
  }
  return tables;
}

}  // namespace

TEST(LayerTypes, PlainConfigKeepsOneAttentionTableAndItsNames) {
  Built built(model_toml(2, "", "[model.attention]\nplugin = \"gqa\"\n"));
  EXPECT_EQ(tables_of_layers(*built.model), (std::vector<std::string>{"attention", "attention"}));
  ASSERT_EQ(built.model->manifest().size(), 1u);
  EXPECT_EQ(built.model->manifest()[0].config_key, "model.attention.plugin");
  EXPECT_EQ(built.model->manifest()[0].layers, "") << "one attention for every layer: no layer list";
  const std::string resolved = built.config.resolved_toml();
  EXPECT_EQ(resolved.find("layer_types"), std::string::npos) << "a plain config resolves as before:\n" << resolved;
  EXPECT_EQ(resolved.find("full_attention_interval"), std::string::npos) << resolved;
  EXPECT_EQ(built.model->attention_without_context_parallel().first, "");
}

TEST(LayerTypes, ExplicitListChoosesEachLayersTable) {
  Built built(model_toml(4, "layer_types = [\"linear_attention\", \"full_attention\", \"linear_attention\", \"linear_attention\"]",
                         kLinearTable));
  EXPECT_EQ(tables_of_layers(*built.model),
            (std::vector<std::string>{"linear_attention", "attention", "linear_attention", "linear_attention"}));
  const auto& manifest = built.model->manifest();
  ASSERT_EQ(manifest.size(), 2u);
  EXPECT_EQ(manifest[0].config_key, "model.linear_attention.plugin");
  EXPECT_EQ(manifest[0].plugin->name(), "gated_deltanet");
  EXPECT_EQ(manifest[0].layers, "0, 2-3");
  EXPECT_EQ(manifest[1].config_key, "model.attention.plugin");
  EXPECT_EQ(manifest[1].plugin->name(), "gqa") << "[model.attention] keeps its default plugin";
  EXPECT_EQ(manifest[1].layers, "1");
  const auto [plugin, key] = built.model->attention_without_context_parallel();
  EXPECT_EQ(plugin, "gated_deltanet");
  EXPECT_EQ(key, "model.linear_attention.plugin");
}

TEST(LayerTypes, IntervalMakesEveryNthLayerFull) {
  // Qwen3-Next: full_attention_interval = 4 gives layers 3 and 7 full attention, the rest linear.
  Built built(model_toml(8, "full_attention_interval = 4", kLinearTable));
  std::vector<std::string> expected;
  for (int layer = 0; layer < 8; ++layer) expected.push_back(layer % 4 == 3 ? "attention" : "linear_attention");
  EXPECT_EQ(tables_of_layers(*built.model), expected);
  EXPECT_EQ(built.model->manifest()[0].layers, "0-2, 4-6");
  EXPECT_EQ(built.model->manifest()[1].layers, "3, 7");
  EXPECT_EQ(describe_layers({0, 1, 2, 4, 5, 6, 8}), "0-2, 4-6, 8");
}

TEST(LayerTypes, ExplainAndGradientGroupsCountEachType) {
  Options config = Options::from_file(kHybridConfig);
  ModelReport report = explain_model(config, {});
  std::map<std::string, int64_t> groups(report.groups.begin(), report.groups.end());
  // The config's sizes: H 64; gated_deltanet nk 2, nv 4, dk = dv = 16, kernel 4 on 3 layers; gqa with the gate
  // (q_proj doubled) and head norms, 4 heads, 2 kv heads of 16 on 1 layer.
  const int64_t H = 64, nk = 2, nv = 4, dk = 16, dv = 16, r = nv / nk, kernel = 4;
  const int64_t linear = nk * (2 * dk + 2 * r * dv) * H + 2 * nv * H + (2 * nk * dk + nv * dv) * kernel + nv + nv + dv + H * nv * dv;
  const int64_t full = 2 * 4 * 16 * H + 2 * (2 * 16 * H) + H * 4 * 16 + 16 + 16;
  EXPECT_EQ(groups["linear_attention"], 3 * linear);
  EXPECT_EQ(groups["attention"], 1 * full);
  EXPECT_NE(report.layer_types.find("model.linear_attention.plugin = gated_deltanet: layers 0-2"), std::string::npos)
      << report.layer_types;
  EXPECT_NE(format_report(report).find("linear_attention: "), std::string::npos) << format_report(report);
  // The gradient norms and the trainable-parameter table group the same way.
  EXPECT_EQ(parameter_group("layers.0.linear_attention.in_proj_qkvz"), "linear_attention");
  EXPECT_EQ(parameter_group("layers.0.linear_attention.norm"), "linear_attention");
  EXPECT_EQ(parameter_group("layers.3.attention.q_norm"), "attention");
  EXPECT_EQ(parameter_group("layers.3.attention_norm.weight"), "norms");
  EXPECT_EQ(parameter_group("layers.1.experts.gate_proj"), "experts");
}

TEST(LayerTypes, BadListsAreRefusedByName) {
  struct Case {
    std::string extra, tables, expected;
  };
  const std::vector<Case> cases = {
      {"layer_types = [\"linear_attention\"]", kLinearTable,
       "test.toml:8: model.layer_types has 1 entries but model.num_layers = 2; give one type per layer"},
      {"layer_types = [\"linear_attention\", \"full_attention\"]", "",
       "layer type \"linear_attention\" has no table: add [model.linear_attention] with plugin = "},
      {"layer_types = [\"attention\", \"full_attention\"]", "",
       "model.layer_types[0] = \"attention\" is spelled \"full_attention\" here"},
      {"layer_types = [\"full_attention\", \"moe\"]", "", "model.layer_types[1] = \"moe\" names the experts' table"},
      {"layer_types = [\"full_attention\", \"Linear\"]", "", "model.layer_types[1] = \"Linear\" is not a lowercase name"},
      {"layer_types = [\"full_attention\", \"linear_attention\"]\nfull_attention_interval = 2", kLinearTable,
       "test.toml:9: give model.layer_types or model.full_attention_interval, not both"},
      {"full_attention_interval = 3", kLinearTable, "model.full_attention_interval = 3 is out of range: it must be in [1, 2]"},
      {"full_attention_interval = 2", "[model.linear_attention]\nchunk_size = 4\n",
       "missing required key 'model.linear_attention.plugin'"},
      {"full_attention_interval = 2", "[model.linear_attention]\nplugin = \"gated_deltanet\"\nchunk_sise = 4\n",
       "did you mean 'model.linear_attention.chunk_size'"},
      {"layer_types = \"linear_attention\"", kLinearTable, "'model.layer_types' must be an array of strings"},
  };
  for (const auto& c : cases) {
    const std::string message = error_of(model_toml(2, c.extra, c.tables));
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.extra << "\n -> " << message;
  }
}

TEST(LayerTypes, TinyHybridTrainsAndLowersTheLoss) {
  const fs::path scratch = fs::temp_directory_path() / ("pithtrain_test_layer_types_" + std::to_string(::getpid()));
  fs::create_directories(scratch);
  const std::string tokens = (scratch / "fortunes.tokens").string();
  convert_text({PITHTRAIN_FORTUNES_DIR}, "fortune", tokens);
  Options options = Options::from_file(kHybridConfig);
  options.set_override("data.path=\"" + tokens + "\"");
  RunSettings settings;
  settings.out_dir = (scratch / "run").string();
  settings.quiet = true;
  Trainer trainer(options, settings);
  EXPECT_EQ(tables_of_layers(trainer.model()),
            (std::vector<std::string>{"linear_attention", "linear_attention", "linear_attention", "attention"}));
  TrainSummary summary = trainer.run();
  std::printf("tiny hybrid: loss %.4f -> %.4f (smoothed) in %lld steps\n", summary.first_loss, summary.final_smoothed_loss,
              static_cast<long long>(options.table("train").integer("steps", 0)));
  EXPECT_NEAR(summary.first_loss, std::log(257.0), 0.5) << "starts near uniform over the bytes";
  EXPECT_LT(summary.final_smoothed_loss, summary.first_loss - 1.5);
}
