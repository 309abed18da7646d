// Options: the typed TOML reader every config and plugin table goes through.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "pithtrain/error.h"
#include "pithtrain/optimizer.h"
#include "pithtrain/options.h"
#include "pithtrain/router.h"
#include "registry.h"

using pithtrain::Error;
using pithtrain::Options;
using pithtrain::Range;

namespace {

const char* kConfig = R"(
[train]
steps = 10
lr = 0.5

[model]
hidden_size = 64
[model.moe.router]
plugin = "aux_free"
update_rate = 0.01
)";

std::string message_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Options, ReadsTypedValuesAndDefaults) {
  Options options = Options::from_string(kConfig, "test.toml");
  Options train = options.table("train");
  EXPECT_EQ(train.integer("steps", 1), 10);
  EXPECT_DOUBLE_EQ(train.number("lr", 1.0), 0.5);
  EXPECT_EQ(train.integer("batch_size", 16), 16);  // absent: default
  EXPECT_EQ(options.table("model").table("moe").table("router").text("plugin", ""), "aux_free");
  EXPECT_EQ(options.table("model").table("moe").table("router").path(), "model.moe.router");
}

TEST(Options, IntegerAcceptedAsNumberButNotTheReverse) {
  Options options = Options::from_string("a = 3\nb = 2.5\n", "test.toml");
  EXPECT_DOUBLE_EQ(options.number("a", 0), 3.0);
  std::string message = message_of([&] { options.integer("b", 0); });
  EXPECT_NE(message.find("test.toml:2"), std::string::npos) << message;
  EXPECT_NE(message.find("'b' must be an integer, got a number"), std::string::npos) << message;
}

TEST(Options, TypoKeyNamesFileLineKeyAndNearest) {
  Options options = Options::from_string("[train]\nsteps = 3\nleraning_rate = 0.1\nlr = 0.2\n", "my.toml");
  Options train = options.table("train");
  train.integer("steps", 1);
  train.number("lr", 1.0);
  train.number("learning_rate", 1.0);
  std::string message = message_of([&] { options.check_unknown_keys(); });
  EXPECT_NE(message.find("my.toml:3"), std::string::npos) << message;
  EXPECT_NE(message.find("unknown key 'train.leraning_rate'"), std::string::npos) << message;
  EXPECT_NE(message.find("did you mean 'train.learning_rate'"), std::string::npos) << message;
}

TEST(Options, UnknownTableIsReported) {
  Options options = Options::from_string("[trian]\nsteps = 3\n", "my.toml");
  options.table("train").integer("steps", 1);
  std::string message = message_of([&] { options.check_unknown_keys(); });
  EXPECT_NE(message.find("unknown key 'trian'"), std::string::npos) << message;
  EXPECT_NE(message.find("did you mean 'train'"), std::string::npos) << message;
}

TEST(Options, AllKeysReadPassesValidation) {
  Options options = Options::from_string(kConfig, "test.toml");
  options.table("train").integer("steps", 1);
  options.table("train").number("lr", 1);
  options.table("model").integer("hidden_size", 1);
  Options router = options.table("model").table("moe").table("router");
  router.text("plugin", "");
  router.number("update_rate", 0);
  EXPECT_NO_THROW(options.check_unknown_keys());
}

TEST(Options, WrongTypeNamesKeyAndTypes) {
  Options options = Options::from_string("[train]\nsteps = \"ten\"\n", "bad.toml");
  std::string message = message_of([&] { options.table("train").integer("steps", 1); });
  EXPECT_NE(message.find("bad.toml:2"), std::string::npos) << message;
  EXPECT_NE(message.find("'train.steps' must be an integer, got a string"), std::string::npos) << message;
}

TEST(Options, MissingRequiredKeySaysWhereToAddIt) {
  Options options = Options::from_string("[model]\nhidden_size = 8\n", "partial.toml");
  std::string message = message_of([&] { options.table("model").required_integer("num_layers"); });
  EXPECT_NE(message.find("partial.toml"), std::string::npos) << message;
  EXPECT_NE(message.find("missing required key 'model.num_layers'"), std::string::npos) << message;
  EXPECT_NE(message.find("add it under [model]"), std::string::npos) << message;
}

TEST(Options, SyntaxErrorNamesFileAndLine) {
  std::string message = message_of([] { Options::from_string("[train]\nsteps = = 3\n", "broken.toml"); });
  EXPECT_NE(message.find("broken.toml:2"), std::string::npos) << message;
}

TEST(Options, MissingFileIsAnError) {
  std::string message = message_of([] { Options::from_file("/nonexistent/config.toml"); });
  EXPECT_NE(message.find("/nonexistent/config.toml"), std::string::npos) << message;
}

TEST(Options, SetOverridesParseTomlValuesOrFallBackToStrings) {
  Options options = Options::from_string(kConfig, "test.toml");
  options.set_override("train.steps=42");
  options.set_override("model.moe.router.plugin=topk_softmax");
  options.set_override("train.new_flag=true");
  EXPECT_EQ(options.table("train").integer("steps", 1), 42);
  EXPECT_EQ(options.table("model").table("moe").table("router").text("plugin", ""), "topk_softmax");
  EXPECT_TRUE(options.table("train").boolean("new_flag", false));
  EXPECT_EQ(options.table("train").where("steps"), "--set train.steps=42");
  EXPECT_THROW(options.set_override("no_equals_sign"), Error);
}

TEST(Options, ResolvedTomlHoldsDefaultsToo) {
  Options options = Options::from_string(kConfig, "test.toml");
  options.table("train").integer("steps", 1);
  options.table("train").integer("batch_size", 16);
  std::string resolved = options.resolved_toml();
  EXPECT_NE(resolved.find("steps = 10"), std::string::npos) << resolved;
  EXPECT_NE(resolved.find("batch_size = 16"), std::string::npos) << resolved;
  EXPECT_EQ(resolved.find("update_rate"), std::string::npos) << "unread keys are not resolved: " << resolved;
}

TEST(Options, TextList) {
  Options options = Options::from_string("[plugins]\npaths = [\"/a\", \"/b\"]\nbad = [1]\n", "test.toml");
  EXPECT_EQ(options.table("plugins").text_list("paths", {}), (std::vector<std::string>{"/a", "/b"}));
  EXPECT_THROW(options.table("plugins").text_list("bad", {}), Error);
}

TEST(Options, EmptyTextListAsTheResolvedConfigWritesIt) {
  // The resolved config.toml writes `paths = []` and `freeze = []`; reading it back must work.
  Options options = Options::from_string("[plugins]\npaths = [\"/x\"]\n", "test.toml");
  EXPECT_EQ(options.table("plugins").text_list("paths", {}).size(), 1u);
  EXPECT_EQ(options.table("train").text_list("freeze", {}).size(), 0u);
  Options again = Options::from_string(options.resolved_toml(), "config.toml");
  EXPECT_EQ(again.table("train").text_list("freeze", {"default"}), std::vector<std::string>{});
  EXPECT_EQ(again.table("plugins").text_list("paths", {}), std::vector<std::string>{"/x"});
  EXPECT_NO_THROW(again.check_unknown_keys());
}

TEST(Range, EachKindHoldsItsBoundsAndNothingPast) {
  const double below_zero = std::nextafter(0.0, -1.0), above_zero = std::nextafter(0.0, 1.0);
  const double below_one = std::nextafter(1.0, 0.0), above_one = std::nextafter(1.0, 2.0);
  struct Case {
    Range range;
    std::string text;
    std::vector<double> inside, outside;
  };
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<Case> cases = {
      {Range::at_least(0), ">= 0", {0.0, 1e300}, {below_zero, -inf}},
      {Range::above(0), "> 0", {above_zero, 1e300}, {0.0, below_zero}},
      {Range::at_most(1), "<= 1", {1.0, -1e300}, {above_one, inf}},
      {Range::below(1), "< 1", {below_one, -1e300}, {1.0, above_one}},
      {Range::closed(0, 1), "in [0, 1]", {0.0, 1.0, 0.5}, {below_zero, above_one}},
      {Range::half_open(0, 1), "in [0, 1)", {0.0, below_one}, {below_zero, 1.0}},
      {Range::open(0, 1), "in (0, 1)", {above_zero, below_one}, {0.0, 1.0}},
      {Range::left_open(0, 1), "in (0, 1]", {above_zero, 1.0}, {0.0, above_one}},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(c.range.text(), c.text);
    for (double value : c.inside) EXPECT_TRUE(c.range.contains(value)) << c.text << " should hold " << value;
    for (double value : c.outside) EXPECT_FALSE(c.range.contains(value)) << c.text << " should not hold " << value;
    EXPECT_FALSE(c.range.contains(std::nan(""))) << c.text;
  }
  EXPECT_EQ(Range::above(1e-8).text(), "> 1e-08");
  EXPECT_EQ(Range::closed(1, 8).text(), "in [1, 8]");
  EXPECT_EQ(Range().text(), "any number");
  EXPECT_TRUE(Range().contains(-1e300));
}

TEST(Options, OutOfRangeNamesFileLineKeyValueAndRange) {
  Options options = Options::from_string("[optimizer]\nplugin = \"adamw\"\nbeta1 = 1.0\nbeta2 = 0.999\n", "run.toml");
  Options optimizer = options.table("optimizer");
  EXPECT_DOUBLE_EQ(optimizer.number("beta2", 0.95, Range::half_open(0, 1)), 0.999);
  std::string message = message_of([&] { optimizer.number("beta1", 0.9, Range::half_open(0, 1)); });
  EXPECT_EQ(message, "run.toml:3: optimizer.beta1 = 1 is out of range: it must be in [0, 1)");

  Options train = Options::from_string("[train]\nsteps = 0\nlr = 0.003\n", "t.toml").table("train");
  EXPECT_EQ(message_of([&] { train.integer("steps", 300, Range::at_least(1)); }),
            "t.toml:2: train.steps = 0 is out of range: it must be >= 1");
  EXPECT_EQ(message_of([&] { train.required_number("lr", Range::above(0.01)); }),
            "t.toml:3: train.lr = 0.003 is out of range: it must be > 0.01");
  EXPECT_EQ(message_of([&] { train.required_integer("steps", Range::open(0, 10)); }),
            "t.toml:2: train.steps = 0 is out of range: it must be in (0, 10)");
  EXPECT_EQ(train.required_integer("steps", Range::closed(0, 0)), 0);
}

TEST(Options, OutOfRangeFromSetAndFromTheFallback) {
  Options options = Options::from_string("[train]\nsteps = 5\n", "t.toml");
  options.set_override("train.steps=-3");
  Options train = options.table("train");
  EXPECT_EQ(message_of([&] { train.integer("steps", 300, Range::at_least(1)); }),
            "--set train.steps=-3: train.steps = -3 is out of range: it must be >= 1");
  // A fallback computed from other keys is checked too (here it is absent from the file, so no line).
  EXPECT_EQ(message_of([&] { train.number("grad_clip", -1.0, Range::at_least(0)); }),
            "t.toml: train.grad_clip = -1 is out of range: it must be >= 0");
  EXPECT_EQ(train.integer("log_every", 10, Range::at_least(1)), 10);
}

TEST(Options, NanAndInfinityAreNeverNumbers) {
  Options options = Options::from_string("a = nan\nb = inf\nc = -inf\nd = +inf\ne = 1.5\n", "f.toml");
  // With or without a range, and for required reads.
  EXPECT_EQ(message_of([&] { options.number("a", 0); }), "f.toml:1: a = nan is not a finite number");
  EXPECT_EQ(message_of([&] { options.number("b", 0, Range()); }), "f.toml:2: b = inf is not a finite number");
  EXPECT_EQ(message_of([&] { options.required_number("c"); }), "f.toml:3: c = -inf is not a finite number");
  EXPECT_EQ(message_of([&] { options.required_number("d", Range::at_least(0)); }),
            "f.toml:4: d = inf is not a finite number");
  EXPECT_DOUBLE_EQ(options.number("e", 0), 1.5);
  options.set_override("e=nan");
  EXPECT_EQ(message_of([&] { options.number("e", 0); }), "--set e=nan: e = nan is not a finite number");
}

TEST(Options, RequireStatesARuleBetweenKeys) {
  Options options = Options::from_string("[train]\nlr = 0.001\nmin_lr = 0.01\n", "t.toml");
  Options train = options.table("train");
  const double lr = train.number("lr", 3e-3, Range::above(0));
  const double min_lr = train.number("min_lr", lr / 10, Range::at_least(0));
  EXPECT_NO_THROW(train.require("lr", lr > 0, "> 0"));
  EXPECT_EQ(message_of([&] { train.require("min_lr", min_lr <= lr, "in [0, lr] (lr = 0.001)"); }),
            "t.toml:3: train.min_lr = 0.01 is out of range: it must be in [0, lr] (lr = 0.001)");
  // A defaulted key is named with its resolved value.
  train.integer("warmup_steps", 7);
  EXPECT_EQ(message_of([&] { train.require("warmup_steps", false, "<= steps"); }),
            "t.toml: train.warmup_steps = 7 is out of range: it must be <= steps");
  train.text("schedule", "cosine");
  EXPECT_EQ(message_of([&] { train.require("schedule", false, "\"wsd\" with decay_fraction"); }),
            "t.toml: train.schedule = \"cosine\" is out of range: it must be \"wsd\" with decay_fraction");
}

TEST(Options, MisspelledRequiredKeyIsReportedAsUnknownNotMissing) {
  Options options = Options::from_string("[model]\nhidden_size = 8\nnum_layers = 2\n\nvocab_sizee = 64\n", "configs/x.toml");
  Options model = options.table("model");
  model.required_integer("hidden_size");
  EXPECT_EQ(message_of([&] { model.required_integer("vocab_size", Range::at_least(1)); }),
            "configs/x.toml:5: unknown key 'model.vocab_sizee' (not read by pithtrain); did you mean 'model.vocab_size'?");
  // A key already read, or one spelled far from the missing key, leaves the missing-key message.
  Options other = Options::from_string("[model]\nhidden_size = 8\nnum_layers = 2\n", "y.toml");
  other.table("model").integer("num_layers", 1);
  std::string message = message_of([&] { other.table("model").required_integer("num_heads"); });
  EXPECT_NE(message.find("missing required key 'model.num_heads'"), std::string::npos) << message;
  message = message_of([&] { other.table("model").required_integer("num_layer"); });
  EXPECT_NE(message.find("missing required key 'model.num_layer'"), std::string::npos) << message;
}

namespace {

// The message a plugin factory throws for `toml` as its table, built through the plugin registry.
std::string plugin_error(const std::string& kind, const std::string& name, const std::string& toml) {
  pithtrain::PluginRegistry registry({PITHTRAIN_PLUGIN_DIR}, {});
  pithtrain::PluginContext context;
  context.dims.hidden_size = 8;
  context.dims.num_experts = 4;
  context.dims.top_k = 2;
  context.dims.num_layers = 1;
  Options options = Options::from_string("[table]\n" + toml, "plugin.toml");
  Options table = options.table("table");
  return message_of([&] {
    if (kind == "optimizer") pithtrain::make_optimizer(registry.get(kind, name), table, context);
    else pithtrain::make_router(registry.get(kind, name), table, context);
  });
}

}  // namespace

TEST(Options, PluginReadsAreRangeChecked) {
  std::string message = plugin_error("optimizer", "adamw", "beta1 = 0.9\nbeta2 = 1.0\n");
  EXPECT_NE(message.find("plugin.toml:3: table.beta2 = 1 is out of range: it must be in [0, 1)"), std::string::npos)
      << message;
  EXPECT_NE(message.find("optimizer plugin 'adamw'"), std::string::npos) << message;
  message = plugin_error("optimizer", "adamw", "eps = 0\n");
  EXPECT_NE(message.find("plugin.toml:2: table.eps = 0 is out of range: it must be > 0"), std::string::npos) << message;
  message = plugin_error("optimizer", "adamw", "weight_decay = nan\n");
  EXPECT_NE(message.find("plugin.toml:2: table.weight_decay = nan is not a finite number"), std::string::npos) << message;
  EXPECT_EQ(plugin_error("optimizer", "adamw", "beta1 = 0.0\neps = 1e-12\nweight_decay = 0\n"), "(no error)");

  message = plugin_error("router", "topk_softmax", "z_loss_coeff = -0.001\n");
  EXPECT_NE(message.find("plugin.toml:2: table.z_loss_coeff = -0.001 is out of range: it must be >= 0"), std::string::npos)
      << message;
  // num_groups divides num_experts (4): a rule between keys, stated with require().
  message = plugin_error("router", "topk_softmax", "num_groups = 3\n");
  EXPECT_NE(message.find("plugin.toml:2: table.num_groups = 3 is out of range: it must be a divisor of num_experts (4)"),
            std::string::npos) << message;
  // Two groups of 2 experts must hold top_k = 2 experts: topk_groups in [1, 2].
  message = plugin_error("router", "aux_free", "num_groups = 2\ntopk_groups = 3\n");
  EXPECT_NE(message.find("plugin.toml:3: table.topk_groups = 3 is out of range: it must be in [1, 2]"), std::string::npos)
      << message;
  EXPECT_EQ(plugin_error("router", "aux_free", "num_groups = 2\ntopk_groups = 1\ncapacity_factor = 0\n"), "(no error)");
}
