// Generation (core/src/generate.cpp): every architecture of tests/configs generates, and the attention
// caches give the tokens and logits that recomputing the whole prefix gives; the sampler draws what
// its settings say; a plugin without a cache path falls back to recomputing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "generate.h"
#include "model.h"
#include "registry.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

// A model of a tests/configs file (random weights, seeded), float32 on the CPU, with `overrides`.
struct Built {
  std::unique_ptr<PluginRegistry> registry;
  std::unique_ptr<Model> model;
};

Built build(const std::string& config, const std::vector<std::string>& overrides = {}, const std::vector<std::string>& plugins = {}) {
  Options options = Options::from_file(std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs/" + config);
  for (const auto& assignment : overrides) options.set_override(assignment);
  Built built;
  built.registry = std::make_unique<PluginRegistry>(default_search_dirs({}), plugins);
  PluginContext context;
  context.logger = &logger();
  at::manual_seed(3);
  built.model = std::make_unique<Model>(options.table("model"), *built.registry, context);
  return built;
}

std::vector<int64_t> random_prompt(int64_t length, int64_t vocab, uint64_t seed) {
  std::mt19937_64 random(seed);
  std::vector<int64_t> prompt;
  for (int64_t i = 0; i < length; ++i) prompt.push_back(static_cast<int64_t>(random() % static_cast<uint64_t>(vocab)));
  return prompt;
}

double largest_difference(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double largest = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) largest = std::max(largest, (a[i] - b[i]).abs().max().item<double>());
  return largest;
}

// Every config in tests/configs (each architecture's tiny one; a config added there is covered too).
// The prompt and the new tokens together pass gpt_oss's 32-token sliding window, so its trimmed cache
// is exercised.
std::vector<std::string> test_configs() {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs"))
    if (entry.path().extension() == ".toml") names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

class EveryArchitecture : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryArchitecture, CachedGenerationEqualsRecomputingThePrefix) {
  Built built = build(GetParam());
  Model& model = *built.model;
  // A plugin without a cache path generates by recomputing: both runs below then take that path.
  const bool has_cache = model.attention_supports_cache();
  // A hybrid names its layers' plugin without a cache (gated_deltanet), not its first one (gqa).
  for (const auto& entry : model.manifest())
    if (entry.config_key.ends_with("attention.plugin") && entry.plugin->name() == "gated_deltanet")
      EXPECT_EQ(model.attention_without_cache(), "gated_deltanet") << GetParam();
  EXPECT_EQ(model.attention_without_cache().empty(), has_cache);
  const std::vector<int64_t> prompt = random_prompt(20, model.dims().vocab_size, 11);
  SamplingSettings greedy;
  greedy.temperature = 0, greedy.max_tokens = 24, greedy.keep_logits = true;
  const Generation cached = generate_tokens(model, prompt, greedy);
  greedy.use_cache = false;
  const Generation recomputed = generate_tokens(model, prompt, greedy);
  EXPECT_EQ(cached.cached, has_cache);
  EXPECT_FALSE(recomputed.cached);
  ASSERT_EQ(cached.tokens.size(), 24u);
  for (int64_t token : cached.tokens) EXPECT_TRUE(token >= 0 && token < model.dims().vocab_size) << token;
  EXPECT_EQ(cached.tokens, recomputed.tokens);
  // float32: the two paths sum in different orders (one key at a time against the whole prefix), so
  // they agree to rounding, ~1e-6 of logits of size ~1; a wrong position or mask moves them by ~1e-2.
  const double difference = largest_difference(cached.logits, recomputed.logits);
  EXPECT_LT(difference, 5e-6) << GetParam();
  std::printf("%s: %s logits differ by at most %.3g\n", GetParam().c_str(),
              has_cache ? "cached and recomputed" : "two recomputed (no cache path)", difference);

  // Teacher forcing through the training forward gives the same logits: generation runs the model that
  // trains (its norms, gates and shared experts), not a copy of it. 1e-5: the same sums at a different
  // batch shape; a missing gate or a plain norm where a zero-centred one belongs moves them by ~1e-1.
  {
    std::vector<int64_t> sequence = prompt;
    sequence.insert(sequence.end(), cached.tokens.begin(), cached.tokens.end());
    at::NoGradGuard no_grad;
    const at::Tensor logits = model.forward(at::tensor(sequence, at::kLong).unsqueeze(0)).logits;  // [1, S, V]
    ASSERT_TRUE(logits.defined());
    double forced = 0;  // row i predicts token i + 1; generated token j came from row prompt + j - 1
    for (size_t j = 0; j < cached.logits.size(); ++j)
      forced = std::max(forced, (cached.logits[j] - logits[0][static_cast<int64_t>(prompt.size() + j) - 1]).abs().max().item<double>());
    EXPECT_LT(forced, 1e-5) << GetParam() << ": generation's logits differ from the training forward's";
  }

  // Sampling: the same seed draws the same tokens on both paths and again; the tokens depend on the seed.
  SamplingSettings sampled;
  sampled.temperature = 0.9, sampled.top_p = 0.95, sampled.seed = 5, sampled.max_tokens = 16;
  const Generation first = generate_tokens(model, prompt, sampled);
  EXPECT_EQ(generate_tokens(model, prompt, sampled).tokens, first.tokens);
  sampled.use_cache = false;
  EXPECT_EQ(generate_tokens(model, prompt, sampled).tokens, first.tokens);
  sampled.use_cache = true, sampled.seed = 6;
  EXPECT_NE(generate_tokens(model, prompt, sampled).tokens, first.tokens);
}

INSTANTIATE_TEST_SUITE_P(TestConfigs, EveryArchitecture, ::testing::ValuesIn(test_configs()),
                         [](const auto& info) { return info.param.substr(0, info.param.size() - 5); });

TEST(Generate, StopsAtTheStopTokenAndKeepsToTheVocabularyLimit) {
  Built built = build("tiny.toml", {"model.num_layers=2"});
  const std::vector<int64_t> prompt = random_prompt(8, 257, 2);
  SamplingSettings settings;
  settings.temperature = 0, settings.max_tokens = 40;
  const Generation free_run = generate_tokens(*built.model, prompt, settings);
  ASSERT_EQ(free_run.tokens.size(), 40u);
  // Stopping at the third token greedy draws: the same first three, then nothing.
  settings.stop_token = free_run.tokens[2];
  const auto first = std::find(free_run.tokens.begin(), free_run.tokens.end(), settings.stop_token) - free_run.tokens.begin();
  const Generation stopped = generate_tokens(*built.model, prompt, settings);
  EXPECT_TRUE(stopped.stopped);
  EXPECT_EQ(stopped.tokens, std::vector<int64_t>(free_run.tokens.begin(), free_run.tokens.begin() + first + 1));
  // A vocabulary limit of 10: hot sampling from a random model still draws only ids below it.
  settings.stop_token = -1, settings.temperature = 5.0, settings.vocab_limit = 10;
  for (int64_t token : generate_tokens(*built.model, prompt, settings).tokens) EXPECT_LT(token, 10);
}

TEST(Generate, APluginWithoutACachePathRecomputesThePrefix) {
  Built built = build("tiny.toml", {"model.num_layers=2", "model.attention.plugin=\"uncached\""},
                      {std::string(PITHTRAIN_BROKEN_PLUGIN_DIR) + "/attention_uncached.so"});
  EXPECT_FALSE(built.model->attention_supports_cache());
  EXPECT_EQ(built.model->attention_without_cache(), "uncached");
  SamplingSettings settings;
  settings.temperature = 0, settings.max_tokens = 12, settings.keep_logits = true;
  const Generation generation = generate_tokens(*built.model, random_prompt(6, 257, 4), settings);
  EXPECT_FALSE(generation.cached);
  EXPECT_EQ(generation.tokens.size(), 12u);
  // Teacher forcing through the plain forward gives the same logits: the fallback is the model itself.
  std::vector<int64_t> sequence = random_prompt(6, 257, 4);
  sequence.insert(sequence.end(), generation.tokens.begin(), generation.tokens.end());
  at::NoGradGuard no_grad;
  const at::Tensor tokens = at::tensor(sequence, at::kLong).unsqueeze(0);
  const at::Tensor logits = built.model->forward(tokens).logits;  // [1, S, V]: row i predicts token i + 1
  for (size_t i = 0; i < generation.logits.size(); ++i)
    EXPECT_TRUE(at::allclose(generation.logits[i], logits[0][5 + i], 1e-5, 1e-5)) << "step " << i;
}

// ---- the sampler ----------------------------------------------------------------------------------------

TEST(DrawToken, TemperatureZeroIsTheFirstMostLikelyToken) {
  std::mt19937_64 random(1);
  SamplingSettings greedy;
  greedy.temperature = 0;
  EXPECT_EQ(draw_token(at::tensor({0.1f, 2.0f, -1.0f, 2.0f}), greedy, random), 1);
  EXPECT_EQ(draw_token(at::tensor({-5.0f, -3.0f, -4.0f}), greedy, random), 1);
}

TEST(DrawToken, FrequenciesFollowTheTemperedSoftmax) {
  const at::Tensor logits = at::tensor({1.0f, 0.0f, -1.0f, 0.5f});
  for (double temperature : {1.0, 0.5, 2.0}) {
    SamplingSettings settings;
    settings.temperature = temperature;
    std::mt19937_64 random(7);
    std::vector<double> counts(4, 0);
    const int draws = 40000;
    for (int i = 0; i < draws; ++i) counts[draw_token(logits, settings, random)] += 1;
    const at::Tensor expected = at::softmax(logits.to(at::kDouble) / temperature, 0);
    for (int64_t id = 0; id < 4; ++id)  // 40000 draws: a standard deviation below 0.0025
      EXPECT_NEAR(counts[id] / draws, expected[id].item<double>(), 0.01) << "temperature " << temperature << ", token " << id;
  }
}

TEST(DrawToken, TopPKeepsTheSmallestNucleus) {
  // Probabilities 0.5, 0.25, 0.125, 0.125 (logits log p): top_p 0.7 keeps the first two, renormalised.
  const at::Tensor logits = at::log(at::tensor({0.5f, 0.25f, 0.125f, 0.125f}));
  SamplingSettings settings;
  settings.top_p = 0.7;
  std::mt19937_64 random(3);
  std::map<int64_t, int> counts;
  for (int i = 0; i < 30000; ++i) counts[draw_token(logits, settings, random)] += 1;
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_NEAR(counts[0] / 30000.0, 2.0 / 3.0, 0.01);
  // A tiny top_p keeps only the most likely token.
  settings.top_p = 1e-6;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(draw_token(logits, settings, random), 0);
}

TEST(DrawToken, TheSameSeedDrawsTheSameTokens) {
  const at::Tensor logits = at::randn({257});
  SamplingSettings settings;
  settings.temperature = 1.3, settings.top_p = 0.9;
  std::mt19937_64 a(42), b(42);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(draw_token(logits, settings, a), draw_token(logits, settings, b));
}

TEST(CheckSampling, NamesTheFlagAndTheRange) {
  auto message = [](SamplingSettings settings) {
    try {
      check_sampling(settings);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  SamplingSettings bad;
  bad.temperature = -0.5;
  EXPECT_NE(message(bad).find("--temperature is -0.5"), std::string::npos) << message(bad);
  bad.temperature = std::nan("");
  EXPECT_NE(message(bad).find("--temperature"), std::string::npos) << message(bad);
  bad = {}, bad.top_p = 0;
  EXPECT_NE(message(bad).find("--top-p is 0"), std::string::npos) << message(bad);
  bad.top_p = 1.5;
  EXPECT_NE(message(bad).find("it must be in (0, 1]"), std::string::npos) << message(bad);
  bad = {}, bad.max_tokens = 0;
  EXPECT_NE(message(bad).find("--max-tokens is 0"), std::string::npos) << message(bad);
  EXPECT_EQ(message({}), "no error");
}

TEST(ValidUtf8, KeepsCharactersAndReplacesStrayBytes) {
  EXPECT_EQ(valid_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"), "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(valid_utf8("a\xC3"), "a\xEF\xBF\xBD");              // a character cut short
  EXPECT_EQ(valid_utf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // an overlong '/', two stray bytes
  EXPECT_EQ(valid_utf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate
}

}  // namespace
