// data_parallel alone: the mean gradient over micro-batches, the gradients counted as reduced by the
// schedule, and clear refusals. Several processes: ctest data_parallel and expert_parallel.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

using namespace pithtrain;

TEST(DataParallelSchedule, OneProcessAveragesTheMicroBatchGradients) {
  at::Tensor weight = at::ones({3}, at::kDouble).requires_grad_(true);
  PluginContext context;
  context.parameters = {{"weight", weight}};
  Options options = Options::from_string("bucket_mb = 0.001\n", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  EXPECT_TRUE(schedule->reduces_gradients());
  StepFunctions step;
  step.micro_batches = 3;
  step.forward = [&](int64_t index) { return MicroBatchLoss{(weight * static_cast<double>(index + 1)).sum(), 0.0, 0.0, 1}; };
  step.zero_grad = [&] { weight.mutable_grad() = at::Tensor(); };
  step.clip_gradients = [&] { return 0.0; };
  bool stepped = false;
  step.optimizer_step = [&] {
    stepped = true;
    EXPECT_TRUE(at::allclose(weight.grad(), at::full({3}, 2.0, at::kDouble)));  // mean of 1, 2, 3
  };
  step.after_optimizer_step = [] {};
  schedule->run_step(step);
  EXPECT_TRUE(stepped);
}

TEST(DataParallelSchedule, RefusesAParameterWithoutItsOwnGradient) {
  PluginContext context;  // a float32 master copy of a bf16 model: no gradient flows into it
  context.parameters = {{"layers.0.attention.q_proj", at::ones({2}, at::kFloat)}};
  Options options = Options::from_string("", "test.toml");
  try {
    pithtrain_plugin()->make_schedule(options, context);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("layers.0.attention.q_proj"), std::string::npos) << message;
    EXPECT_NE(message.find("train.dtype = \"float32\""), std::string::npos) << message;
  }
}

TEST(DataParallelSchedule, RefusesANonPositiveBucketSize) {
  PluginContext context;
  Options options = Options::from_string("bucket_mb = 0\n", "test.toml");
  EXPECT_THROW(pithtrain_plugin()->make_schedule(options, context), Error);
}
