// Options: the typed TOML reader every config and plugin table goes through.
#include <gtest/gtest.h>

#include "pithtrain/error.h"
#include "pithtrain/options.h"

using pithtrain::Error;
using pithtrain::Options;

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
