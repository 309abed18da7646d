// End to end: data conversion and validation, the full tiny config, and short training runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>

#include "checkpoint.h"
#include "plugin_names.h"
#include "data.h"
#include "routing_trace.h"
#include "trainer.h"

namespace fs = std::filesystem;
using namespace pithtrain;

namespace {

fs::path scratch() {
  static fs::path dir = [] {
    fs::path created = fs::temp_directory_path() / ("pithtrain_test_training_" + std::to_string(::getpid()));
    fs::create_directories(created);
    return created;
  }();
  return dir;
}

// The fortune collections as a token file, made once per test process.
std::string fortunes_tokens() {
  static std::string path = [] {
    if (!fs::is_directory(PITHTRAIN_FORTUNES_DIR))
      throw Error(std::string(PITHTRAIN_FORTUNES_DIR) + " is missing; scripts/setup.sh installs Debian's fortunes");
    std::string out = (scratch() / "fortunes.tokens").string();
    convert_text({PITHTRAIN_FORTUNES_DIR}, "fortune", out);
    return out;
  }();
  return path;
}

// The tests' own config (never configs/*.toml, which may change freely); expected values below come
// from it through test_config().
const std::string kTestConfig = std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs/tiny.toml";

// The test config as written, for reading the values an expectation follows from.
Options test_config() { return Options::from_file(kTestConfig); }


Options tiny_config(const std::vector<std::string>& overrides) {
  Options options = Options::from_file(kTestConfig);
  options.set_override("data.path=\"" + fortunes_tokens() + "\"");
  for (const auto& assignment : overrides) options.set_override(assignment);
  return options;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

RunSettings quiet_run(const std::string& name) {
  RunSettings settings;
  settings.out_dir = (scratch() / name).string();
  settings.quiet = true;
  return settings;
}

std::string error_of(const std::vector<std::string>& overrides) {
  try {
    Trainer trainer(tiny_config(overrides), quiet_run("errors"));
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// A small, fast variant of the tiny model for tests that train.
const std::vector<std::string> kSmall = {"model.hidden_size=64", "model.num_layers=2", "model.dense_hidden_size=128",
                                         "model.moe.expert_hidden_size=64", "train.seq_len=64", "train.batch_size=8",
                                         "eval.batches=2"};

std::vector<std::string> with(std::vector<std::string> base, const std::vector<std::string>& extra) {
  base.insert(base.end(), extra.begin(), extra.end());
  return base;
}

}  // namespace

TEST(Data, ConvertsFortunesIntoDocuments) {
  TokenDataset dataset(fortunes_tokens());
  EXPECT_GT(dataset.size(), 1'000'000u) << "the fortunes package holds megabytes of text";
  EXPECT_GT(dataset.header().num_documents, 1000u);
  EXPECT_EQ(dataset.header().vocab_size, kByteVocabSize);
  at::Tensor windows = dataset.windows({0, 1000, 500'000, dataset.size() - 33}, 33);
  EXPECT_EQ(windows.sizes(), at::IntArrayRef({4, 33}));
  EXPECT_LT(windows.max().item<int64_t>(), kByteVocabSize);
}

TEST(Data, RoundTripsExactBytes) {
  fs::path text = scratch() / "two.txt";
  std::ofstream(text) << "ab\n%\nc\n";
  fs::path out = scratch() / "two.tokens";
  ConvertStats stats = convert_text({text.string()}, "fortune", out.string());
  EXPECT_EQ(stats.documents, 2u);
  TokenDataset dataset(out.string());
  at::Tensor all = dataset.windows({0}, 7);
  std::vector<int64_t> expected = {'a', 'b', '\n', kEndOfDocument, 'c', '\n', kEndOfDocument};
  EXPECT_EQ(std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + 7), expected);
}

TEST(Data, CorruptFilesAreRefusedWithTheFix) {
  fs::path good = fortunes_tokens();
  auto expect_refused = [](const fs::path& file, const std::string& what) {
    try {
      TokenDataset dataset(file.string());
      FAIL() << "accepted a corrupt file (" << what << ")";
    } catch (const Error& error) {
      std::string message = error.what();
      EXPECT_NE(message.find(file.string()), std::string::npos) << message;
      EXPECT_NE(message.find(what), std::string::npos) << message;
      EXPECT_NE(message.find("pithtrain data build"), std::string::npos) << message;
    }
  };
  fs::path flipped = scratch() / "flipped.tokens";
  fs::copy_file(good, flipped, fs::copy_options::overwrite_existing);
  {
    std::fstream file(flipped, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(1000);
    file.put('\x7f');
  }
  expect_refused(flipped, "checksum mismatch");
  fs::path truncated = scratch() / "truncated.tokens";
  fs::copy_file(good, truncated, fs::copy_options::overwrite_existing);
  fs::resize_file(truncated, fs::file_size(good) - 10);
  expect_refused(truncated, "truncated or corrupt");
  fs::path text = scratch() / "not_tokens.tokens";
  std::ofstream(text) << std::string(100, 'x');
  expect_refused(text, "bad magic");
  expect_refused(scratch() / "missing.tokens", "cannot open");
}

TEST(Data, FailedConversionKeepsTheOldFile) {
  fs::path out = scratch() / "keep.tokens";
  convert_text({fortunes_tokens()}, "text", out.string());  // any file will do as a document
  auto size_before = fs::file_size(out);
  EXPECT_THROW(convert_text({"/nonexistent/input"}, "fortune", out.string()), Error);
  EXPECT_EQ(fs::file_size(out), size_before);
}

TEST(Config, TinyConfigIsValid) {
  Trainer trainer(tiny_config({}), quiet_run("valid"));
  Options model = test_config().table("model");
  EXPECT_EQ(trainer.model().dims().hidden_size, model.required_integer("hidden_size"));
  EXPECT_EQ(trainer.model().num_moe_layers(), model.required_integer("num_layers") - model.integer("first_dense_layers", 0));
}

TEST(Config, TyposAndBadValuesGiveThePromisedErrors) {
  std::string message = error_of({"train.step=5"});
  EXPECT_NE(message.find("unknown key 'train.step'"), std::string::npos) << message;
  EXPECT_NE(message.find("did you mean 'train.steps'"), std::string::npos) << message;
  message = error_of({"model.moe.router.update_rat=0.1"});
  EXPECT_NE(message.find("did you mean 'model.moe.router.update_rate'"), std::string::npos) << message;
  message = error_of({"train.steps=\"many\""});
  EXPECT_NE(message.find("'train.steps' must be an integer, got a string"), std::string::npos) << message;
  const int64_t experts = test_config().table("model").table("moe").integer("num_experts", 8);
  message = error_of({"model.moe.top_k=" + std::to_string(experts + 1)});
  EXPECT_NE(message.find("--set model.moe.top_k=" + std::to_string(experts + 1) + ": model.moe.top_k = " +
                         std::to_string(experts + 1) + " is out of range: it must be in [1, " + std::to_string(experts) + "]"),
            std::string::npos)
      << message;
  message = error_of({"model.moe.router.plugin=nonexistent"});
  EXPECT_NE(message.find("unknown router plugin 'nonexistent'"), std::string::npos) << message;
  EXPECT_NE(message.find("available: " + router_names_in(PITHTRAIN_PLUGIN_DIR) + ";"), std::string::npos) << message;
}

TEST(Config, MissingRequiredKey) {
  Options options = Options::from_string("[data]\npath = \"" + fortunes_tokens() + "\"\n[model]\nhidden_size = 8\n",
                                         "partial.toml");
  try {
    Trainer trainer(options, quiet_run("partial"));
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("missing required key 'model.vocab_size'"), std::string::npos) << error.what();
  }
}

TEST(Training, ShortRunLowersTheLossAndWritesOutputs) {
  Trainer trainer(tiny_config(with(kSmall, {"train.steps=60", "train.warmup_steps=10", "train.log_every=10"})), quiet_run("short"));
  TrainSummary summary = trainer.run();
  // Byte-level text starts near uniform, ln(257) = 5.55 nats; 60 steps of a small model reach well below 3.5.
  EXPECT_NEAR(summary.first_loss, std::log(static_cast<double>(trainer.model().dims().vocab_size)), 0.3);
  EXPECT_LT(summary.final_smoothed_loss, 3.5) << "first loss " << summary.first_loss;
  EXPECT_LT(summary.validation_loss, 3.6);
  for (const char* file : {"config.toml", "metrics.jsonl", "model.safetensors"})
    EXPECT_TRUE(fs::exists(fs::path(summary.run_dir) / file)) << file;
  std::ifstream metrics(fs::path(summary.run_dir) / "metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(metrics, line)) {
    ++lines;
    for (const char* key : {"\"step\":", "\"loss\":", "\"lr\":", "\"grad_norm\":", "\"tokens_per_s\":", "\"max_over_mean\":",
                            "\"tokens_per_expert\":"})
      EXPECT_NE(line.find(key), std::string::npos) << key << " missing in " << line;
  }
  EXPECT_EQ(lines, 7);  // steps 1, 10, 20, ..., 60
  std::ifstream model(fs::path(summary.run_dir) / "model.safetensors", std::ios::binary);
  std::string header(4096, '\0');
  model.read(header.data(), header.size());
  EXPECT_NE(header.find("layers.1.router.expert_bias"), std::string::npos) << "the aux_free bias is saved with the model";
}

TEST(Training, SameSeedSameLosses) {
  auto run = [](const std::string& name) {
    Trainer trainer(tiny_config(with(kSmall, {"train.steps=3", "train.micro_batches=2"})), quiet_run(name));
    return trainer.run().final_smoothed_loss;
  };
  EXPECT_EQ(run("seed_a"), run("seed_b"));
}

TEST(Training, ChunkedCrossEntropyTrainsAsTheFullOne) {
  // train.loss_chunk_tokens never holds a micro-batch's whole logits; the arithmetic is the same, so
  // the losses agree to float32 rounding (sums in another order).
  auto run = [](const std::string& name, const std::string& chunk) {
    Trainer trainer(tiny_config(with(kSmall, {"train.steps=3", "train.loss_chunk_tokens=" + chunk})), quiet_run(name));
    return trainer.run().final_smoothed_loss;
  };
  const double full = run("chunk_off", "0"), chunked = run("chunk_37", "37");
  EXPECT_NEAR(chunked, full, 1e-5 * full);
  EXPECT_NE(error_of(with(kSmall, {"train.loss_chunk_tokens=-1"})).find("train.loss_chunk_tokens = -1 is out of range: it must be >= 0"), std::string::npos);
}

TEST(Training, LearningRateWarmsUpThenFollowsTheCosine) {
  TrainConfig config;
  config.steps = 110;
  config.warmup_steps = 10;
  config.lr = 1.0;
  config.min_lr = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(config, 1), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(config, 10), 1.0);
  EXPECT_NEAR(learning_rate(config, 60), 0.55, 1e-12);  // half way: the cosine's midpoint
  EXPECT_NEAR(learning_rate(config, 110), 0.1, 1e-12);
}

namespace {

std::vector<std::pair<int64_t, double>> after(const std::vector<std::pair<int64_t, double>>& losses, int64_t step) {
  std::vector<std::pair<int64_t, double>> result;
  for (const auto& entry : losses)
    if (entry.first > step) result.push_back(entry);
  return result;
}

}  // namespace

TEST(Checkpoint, ResumedRunRepeatsTheUninterruptedLossesBitForBit) {
  const auto config = with(kSmall, {"train.steps=20", "checkpoint.every=10", "train.micro_batches=2"});
  RunSettings settings = quiet_run("resume");
  fs::remove_all(settings.out_dir);
  TrainSummary full = Trainer(tiny_config(config), settings).run();
  ASSERT_EQ(full.losses.size(), 20u);
  EXPECT_EQ(full.resumed_from, 0);
  // Simulate a crash after the step-10 checkpoint: the step-20 one never happened.
  fs::path checkpoints = fs::path(settings.out_dir) / "checkpoints";
  ASSERT_TRUE(fs::exists(checkpoints / "step_000000020.safetensors"));
  fs::remove(checkpoints / "step_000000020.safetensors");
  TrainSummary resumed = Trainer(tiny_config(config), settings).run();
  EXPECT_EQ(resumed.resumed_from, 10);
  ASSERT_EQ(resumed.losses.size(), 10u);
  EXPECT_EQ(resumed.losses, after(full.losses, 10));  // exact equality of every double
  EXPECT_EQ(resumed.final_smoothed_loss, full.final_smoothed_loss);
  // metrics.jsonl holds each logged step once.
  std::ifstream metrics(fs::path(settings.out_dir) / "metrics.jsonl");
  std::string line;
  std::vector<int64_t> steps;
  while (std::getline(metrics, line)) steps.push_back(std::stoll(line.substr(line.find("\"step\":") + 7)));
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 10, 20}));
}

TEST(Checkpoint, CorruptLatestFallsBackToThePreviousOne) {
  const auto config = with(kSmall, {"train.steps=20", "checkpoint.every=10"});
  RunSettings settings = quiet_run("corrupt");
  fs::remove_all(settings.out_dir);
  TrainSummary full = Trainer(tiny_config(config), settings).run();
  fs::path latest = fs::path(settings.out_dir) / "checkpoints" / "step_000000020.safetensors";
  {
    std::fstream file(latest, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(fs::file_size(latest) - 100));
    file.put('\x55');
  }
  EXPECT_THROW(load_safetensors(latest.string()), Error);
  TrainSummary resumed = Trainer(tiny_config(config), settings).run();
  EXPECT_EQ(resumed.resumed_from, 10);
  EXPECT_EQ(resumed.losses, after(full.losses, 10));
}

TEST(Checkpoint, KeepsTheLastKAndLeavesNoTemporaryFiles) {
  RunSettings settings = quiet_run("keep");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=12", "checkpoint.every=3", "checkpoint.keep=2"})), settings).run();
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(fs::path(settings.out_dir) / "checkpoints"))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"step_000000009.safetensors", "step_000000012.safetensors"}));
  SafetensorsFile file = load_safetensors((fs::path(settings.out_dir) / "checkpoints" / names.back()).string());
  EXPECT_EQ(file.metadata.at("step"), "12");
  EXPECT_NE(file.find("model/layers.1.router.expert_bias"), nullptr);
  EXPECT_NE(file.find("optimizer/lm_head.weight.exp_avg"), nullptr);
  EXPECT_NE(file.find("rng/cpu"), nullptr);
}

TEST(Checkpoint, ADifferentModelInTheSameRunDirIsRefusedWithTheFix) {
  RunSettings settings = quiet_run("mismatch");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=2"})), settings).run();
  try {
    Trainer(tiny_config(with(kSmall, {"train.steps=4", "model.hidden_size=48"})), settings).run();
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("use a new --out"), std::string::npos) << error.what();
  }
}

TEST(Checkpoint, ASwitchedPluginIsNotResumedSilently) {
  RunSettings settings = quiet_run("switched");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=2"})), settings).run();
  try {
    Trainer(tiny_config(with(kSmall, {"train.steps=4", "model.moe.router.plugin=topk_softmax"})), settings).run();
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("written for a different [model] config"), std::string::npos) << error.what();
  }
  // A fresh run (resume off) in the directory that holds the old run is refused before anything is written ...
  const auto fresh_config = with(kSmall, {"train.steps=4", "model.moe.router.plugin=topk_softmax", "checkpoint.resume=false"});
  const std::string old_id = read_text(fs::path(settings.out_dir) / "run_id");
  const std::string old_metrics = read_text(fs::path(settings.out_dir) / "metrics.jsonl");
  try {
    Trainer(tiny_config(fresh_config), settings).run();
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("holds another run"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("--out NEW_DIR"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("--move-aside"), std::string::npos) << error.what();
  }
  EXPECT_EQ(read_text(fs::path(settings.out_dir) / "metrics.jsonl"), old_metrics);
  // ... and --move-aside renames the old run out of the way, whole, before starting over.
  fs::remove_all(settings.out_dir + ".old-1");
  settings.move_aside = true;
  TrainSummary fresh = Trainer(tiny_config(fresh_config), settings).run();
  EXPECT_EQ(fresh.resumed_from, 0);
  EXPECT_EQ(fresh.losses.size(), 4u);
  EXPECT_EQ(read_text(fs::path(settings.out_dir + ".old-1") / "run_id"), old_id);
  EXPECT_EQ(read_text(fs::path(settings.out_dir + ".old-1") / "metrics.jsonl"), old_metrics);
  EXPECT_NE(read_text(fs::path(settings.out_dir) / "run_id"), old_id);
}

TEST(Checkpoint, CheckpointsCarryTheRunIdAndAMixedFolderIsRefused) {
  RunSettings settings = quiet_run("run_identity");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=4", "checkpoint.every=2"})), settings).run();
  const std::string run_id = read_text(fs::path(settings.out_dir) / "run_id");
  ASSERT_FALSE(run_id.empty());
  fs::path checkpoints = fs::path(settings.out_dir) / "checkpoints";
  SafetensorsFile first = load_safetensors((checkpoints / "step_000000004.safetensors").string());
  EXPECT_EQ(first.metadata.at("run_id") + "\n", run_id);
  TrainSummary resumed = Trainer(tiny_config(with(kSmall, {"train.steps=6", "checkpoint.every=2"})), settings).run();
  EXPECT_EQ(resumed.resumed_from, 4);
  EXPECT_EQ(read_text(fs::path(settings.out_dir) / "run_id"), run_id);
  // Checkpoints of another run than the directory's are a mix the next start refuses to resume.
  std::ofstream(fs::path(settings.out_dir) / "run_id") << "another-run\n";
  try {
    Trainer(tiny_config(with(kSmall, {"train.steps=8", "checkpoint.every=2"})), settings).run();
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("mixed"), std::string::npos) << error.what();
  }
}

TEST(Training, Bfloat16KeepsFloat32MasterWeightsAndLearns) {
  RunSettings settings = quiet_run("bf16");
  fs::remove_all(settings.out_dir);
  Trainer trainer(tiny_config(with(kSmall, {"train.steps=40", "train.dtype=\"bfloat16\"", "train.warmup_steps=5"})), settings);
  EXPECT_EQ(trainer.model().parameters().front().tensor.scalar_type(), at::kBFloat16);
  TrainSummary summary = trainer.run();
  EXPECT_LT(summary.final_smoothed_loss, summary.first_loss - 1.5) << summary.first_loss << " -> " << summary.final_smoothed_loss;
  SafetensorsFile weights = load_safetensors(summary.run_dir + "/model.safetensors");
  EXPECT_EQ(weights.find("lm_head.weight")->scalar_type(), at::kFloat);
  // The bf16 model weights are the rounded master weights.
  at::Tensor master = *weights.find("lm_head.weight");
  at::Tensor model = trainer.model().parameters().back().tensor.detach();
  EXPECT_TRUE(at::equal(master.to(at::kBFloat16), model));
}

TEST(Training, LearningRateSchedules) {
  TrainConfig config;
  config.steps = 100;
  config.warmup_steps = 10;
  config.lr = 1.0;
  config.min_lr = 0.1;
  config.lr_schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(config, 5), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(config, 100), 1.0);
  config.lr_schedule = "wsd";
  config.decay_fraction = 0.2;
  EXPECT_DOUBLE_EQ(learning_rate(config, 50), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(config, 80), 1.0);  // stable until the last 20 steps
  EXPECT_NEAR(learning_rate(config, 90), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(config, 100), 0.1, 1e-12);
}

TEST(Training, RoutingTraceRecordsEveryStepAndLayer) {
  RunSettings settings = quiet_run("trace");
  fs::remove_all(settings.out_dir);
  fs::create_directories(settings.out_dir);
  settings.trace_routing = settings.out_dir + "/routing.trace";
  Trainer trainer(tiny_config(with(kSmall, {"train.steps=5", "train.micro_batches=2"})), settings);
  trainer.run();
  const ModelDims& dims = trainer.model().dims();
  const TrainConfig& config = trainer.config();
  auto [header, records] = RoutingTrace::read(settings.trace_routing);
  EXPECT_EQ(header.moe_layers, static_cast<uint32_t>(trainer.model().num_moe_layers()));
  EXPECT_GE(header.moe_layers, 1u) << "the test config must keep a MoE layer within kSmall's layers";
  EXPECT_EQ(header.experts, static_cast<uint32_t>(dims.num_experts));
  ASSERT_EQ(records.size(), 5u);
  for (size_t i = 0; i < records.size(); ++i) {
    EXPECT_EQ(records[i].step, static_cast<int64_t>(i + 1));
    uint64_t total = 0;
    for (uint32_t count : records[i].counts) total += count;
    // Each MoE layer's counts add up to micro_batches x batch x seq x top_k; records hold every layer.
    EXPECT_EQ(total, static_cast<uint64_t>(config.micro_batches * config.batch_size * config.seq_len * dims.top_k) *
                         header.moe_layers);
  }
}

TEST(Training, PeriodicValidationIsLogged) {
  RunSettings settings = quiet_run("eval");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=6", "eval.every=3", "train.log_every=100"})), settings).run();
  std::ifstream metrics(fs::path(settings.out_dir) / "metrics.jsonl");
  std::string line;
  int with_validation = 0;
  while (std::getline(metrics, line)) {
    with_validation += line.find("\"val_loss\":") != std::string::npos;
    EXPECT_NE(line.find("\"mfu\":"), std::string::npos);
    EXPECT_NE(line.find("\"memory_mb\":"), std::string::npos);
    EXPECT_NE(line.find("\"entropy\":"), std::string::npos);
    EXPECT_NE(line.find("\"expert_bias_norm\":"), std::string::npos);
  }
  EXPECT_EQ(with_validation, 2);  // steps 3 and 6
}

TEST(Training, StepPeakMemoryIsTheStepsOwnAndThePeakIsTheProcesss) {
  // Touch 256 MiB and free it before training: the process's peak keeps it, a step's own peak must not.
  {
    std::vector<char> buffer(size_t{256} << 20, 1);
    volatile char sink = buffer[buffer.size() / 2];
    (void)sink;
  }
  RunSettings settings = quiet_run("step_memory");
  fs::remove_all(settings.out_dir);
  Trainer(tiny_config(with(kSmall, {"train.steps=3", "train.log_every=1"})), settings).run();
  std::ifstream metrics(fs::path(settings.out_dir) / "metrics.jsonl");
  auto number = [](const std::string& line, const std::string& key) {
    size_t at = line.find("\"" + key + "\":");
    return at == std::string::npos ? -1.0 : std::strtod(line.c_str() + at + key.size() + 3, nullptr);
  };
  std::string line;
  int rows = 0;
  while (std::getline(metrics, line)) {
    ++rows;
    const double step_peak = number(line, "step_peak_memory_mb"), peak = number(line, "peak_memory_mb");
    if (step_peak < 0) GTEST_SKIP() << "this kernel does not let /proc/self/clear_refs reset the peak resident memory";
    EXPECT_GE(peak, 256.0) << line;
    EXPECT_GT(step_peak, 0.0) << line;
    EXPECT_LT(step_peak, peak - 200.0) << line;  // the 256 MiB buffer was freed before the first step
  }
  EXPECT_EQ(rows, 3);
}

TEST(Data, JsonlTextFieldsAreDocuments) {
  fs::path jsonl = scratch() / "docs.jsonl";
  std::ofstream(jsonl) << "{\"id\": 1, \"text\": \"a\\\"b\\n\\u00e9\"}\n\n{\"text\": \"c\"}\n";
  fs::path out = scratch() / "docs.tokens";
  ConvertStats stats = convert_text({jsonl.string()}, "auto", out.string());
  EXPECT_EQ(stats.documents, 2u);
  TokenDataset dataset(out.string());
  std::vector<int64_t> expected = {'a', '"', 'b', '\n', 0xC3, 0xA9, kEndOfDocument, 'c', kEndOfDocument};
  ASSERT_EQ(dataset.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(static_cast<int64_t>(dataset.token(i)), expected[i]) << i;
  fs::path bad = scratch() / "bad.jsonl";
  std::ofstream(bad) << "{\"text\": \"fine\"}\n{\"body\": \"no text\"}\n";
  try {
    convert_text({bad.string()}, "auto", (scratch() / "bad.tokens").string());
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("bad.jsonl:2"), std::string::npos) << error.what();
  }
}

TEST(Data, SentencePieceTrainsAndMatchesSpmEncode) {
  fs::path out = scratch() / "sp.tokens";
  TokenizerSpec tokenizer{"sentencepiece", (scratch() / "sp.model").string(), 600};
  ConvertStats trained = convert_text({PITHTRAIN_FORTUNES_DIR}, "fortune", out.string(), tokenizer);
  EXPECT_EQ(trained.vocab_size, 600u);
  ASSERT_TRUE(fs::exists(scratch() / "sp.model"));
  EXPECT_EQ(TokenDataset(out.string()).header().tokenizer, 2u);
  // Subwords are denser than bytes: 600 pieces (256 of them byte fallbacks) measured 1.98 bytes per token.
  EXPECT_LT(trained.tokens * 3, 2'561'459u * 2) << "fewer than 1.5 bytes per token";

  // Single-line documents encoded with the trained model, against Debian's spm_encode on the same lines.
  const std::vector<std::string> lines = {"The quick brown fox jumps over the lazy dog.",
                                          "Fortune favours the bold, said nobody in particular.",
                                          "Zebras qua zebras: 42 unusual words!"};
  fs::path jsonl = scratch() / "lines.jsonl", text = scratch() / "lines.txt";
  {
    std::ofstream json_out(jsonl), text_out(text);
    for (const auto& line : lines) json_out << "{\"text\": \"" << line << "\"}\n", text_out << line << "\n";
  }
  fs::path encoded = scratch() / "lines.tokens";
  convert_text({jsonl.string()}, "jsonl", encoded.string(), TokenizerSpec{"sentencepiece", (scratch() / "sp.model").string(), 0});
  std::string command = "spm_encode --model=" + (scratch() / "sp.model").string() + " --output_format=id < " + text.string();
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::vector<int64_t> reference;
  char buffer[4096];
  while (fgets(buffer, sizeof(buffer), pipe)) {
    std::istringstream ids(buffer);
    int64_t id;
    while (ids >> id) reference.push_back(id);
    reference.push_back(-1);  // end of line = end of document
  }
  ASSERT_EQ(pclose(pipe), 0) << "spm_encode failed (scripts/setup.sh installs Debian's sentencepiece)";
  TokenDataset dataset(encoded.string());
  std::vector<int64_t> ours;
  const uint64_t end_of_document = 2;  // </s> in a default SentencePiece model
  for (uint64_t i = 0; i < dataset.size(); ++i)
    ours.push_back(dataset.token(i) == end_of_document ? -1 : static_cast<int64_t>(dataset.token(i)));
  EXPECT_EQ(ours, reference);
}

TEST(Training, TrainsOnSentencePieceTokens) {
  fs::path out = scratch() / "sp_train.tokens";
  convert_text({PITHTRAIN_FORTUNES_DIR}, "fortune", out.string(), TokenizerSpec{"sentencepiece", (scratch() / "sp_train.model").string(), 512});
  RunSettings settings = quiet_run("sp_train");
  fs::remove_all(settings.out_dir);
  Options options = tiny_config(with(kSmall, {"train.steps=30", "model.vocab_size=512", "train.warmup_steps=5"}));
  options.set_override("data.path=\"" + out.string() + "\"");
  TrainSummary summary = Trainer(options, settings).run();
  EXPECT_NEAR(summary.first_loss, std::log(512.0), 0.4);
  EXPECT_LT(summary.final_smoothed_loss, summary.first_loss - 0.8);
}

TEST(Architectures, TinyVariantsTrain) {
  // The tests' own tiny architectures (tests/configs/), not configs/tiny_*.toml: ctest shipped_configs runs those.
  for (const char* name :
       {"qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "tiny_qwen3_next", "tiny_qwen3_5_moe",
        "tiny_glm4_moe", "tiny_minimax_m2"}) {
    Options options = Options::from_file(std::string(PITHTRAIN_SOURCE_DIR) + "/tests/configs/" + name + ".toml");
    options.set_override("data.path=\"" + fortunes_tokens() + "\"");
    for (const auto& assignment : {"train.steps=40", "train.seq_len=64", "train.batch_size=8", "eval.batches=1"})
      options.set_override(assignment);
    RunSettings settings = quiet_run(name);
    fs::remove_all(settings.out_dir);
    TrainSummary summary = Trainer(options, settings).run();
    EXPECT_LT(summary.final_smoothed_loss, summary.first_loss - 1.5) << name << ": " << summary.first_loss << " -> "
                                                                      << summary.final_smoothed_loss;
  }
}

// Multi-token prediction (model.mtp_layers, core/src/mtp.cpp) on the tiny model: its loss is in metrics.jsonl and
// the progress line, part of `loss`, falls as it trains; a resumed run repeats the uninterrupted one bit for bit
// with the MTP weights and its router's buffer in the checkpoint; the untested parallel layouts are refused by name.
TEST(Training, MultiTokenPredictionTrainsLogsAndResumesBitForBit) {
  const auto config = with(kSmall, {"model.mtp_layers=1", "model.mtp_loss_coeff=0.5", "train.steps=20", "train.log_every=1",
                                    "checkpoint.every=10", "train.micro_batches=2"});
  RunSettings settings = quiet_run("mtp");
  settings.quiet = false;  // the progress line goes to train.log
  fs::remove_all(settings.out_dir);
  TrainSummary full = Trainer(tiny_config(config), settings).run();
  ASSERT_EQ(full.losses.size(), 20u);
  std::ifstream metrics(fs::path(settings.out_dir) / "metrics.jsonl");
  std::vector<double> mtp_cross_entropy;
  for (std::string line; std::getline(metrics, line);) {
    auto field = [&](const std::string& key) {
      const auto at = line.find("\"" + key + "\":");
      EXPECT_NE(at, std::string::npos) << key << " missing in " << line;
      return at == std::string::npos ? 0.0 : std::strtod(line.c_str() + at + key.size() + 3, nullptr);
    };
    const double loss = field("loss"), cross_entropy = field("cross_entropy"), aux = field("aux_loss");
    const double mtp_loss = field("mtp_loss"), mtp = field("mtp_cross_entropy");
    EXPECT_NEAR(mtp_loss, 0.5 * mtp, 1e-5 * mtp) << line;
    EXPECT_NEAR(loss, cross_entropy + aux + mtp_loss, 1e-4 * loss) << "loss = cross_entropy + aux_loss + mtp_loss: " << line;
    mtp_cross_entropy.push_back(mtp);
  }
  ASSERT_EQ(mtp_cross_entropy.size(), 20u);
  // Near uniform at first (ln 257 = 5.55), clearly lower after 20 steps.
  EXPECT_NEAR(mtp_cross_entropy.front(), std::log(257.0), 0.3);
  EXPECT_LT(mtp_cross_entropy.back(), mtp_cross_entropy.front() - 0.5);
  EXPECT_NE(read_text(fs::path(settings.out_dir) / "train.log").find(" | mtp "), std::string::npos) << "the progress line shows it";
  const fs::path checkpoints = fs::path(settings.out_dir) / "checkpoints";
  SafetensorsFile checkpoint = load_safetensors((checkpoints / "step_000000010.safetensors").string());
  for (const char* name : {"model/mtp_layers.0.eh_proj.weight", "model/mtp_layers.0.enorm.weight", "model/mtp_layers.0.final_norm.weight",
                           "model/mtp_layers.0.experts.gate_proj", "model/mtp_layers.0.router.expert_bias"})
    EXPECT_NE(checkpoint.find(name), nullptr) << name << " is not in the checkpoint";
  fs::remove(checkpoints / "step_000000020.safetensors");
  settings.quiet = true;
  TrainSummary resumed = Trainer(tiny_config(config), settings).run();
  EXPECT_EQ(resumed.resumed_from, 10);
  EXPECT_EQ(resumed.losses, after(full.losses, 10));  // exact equality of every double

  for (const auto& [assignment, named] :
       std::vector<std::pair<std::string, std::string>>{{"schedule.plugin=\"fully_sharded\"", "schedule 'fully_sharded'"},
                                                        {"train.seq_len=1", "train.seq_len = 1"}}) {
    const std::string error = error_of(with(kSmall, {"model.mtp_layers=1", assignment}));
    for (const std::string& part : {std::string("model.mtp_layers = 1 (multi-token prediction) with "), named, std::string("is not supported")})
      EXPECT_NE(error.find(part), std::string::npos) << error;
  }
}
