// single: the order of one step's calls and what it reports.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

using namespace pithtrain;

TEST(SingleSchedule, RunsMicroBatchesThenClipStepAndHooksOnce) {
  PluginContext context;
  Options options = Options::from_string("", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  at::Tensor weight = at::ones({2}, at::kDouble).requires_grad_(true);
  std::vector<std::string> calls;
  StepFunctions step;
  step.micro_batches = 4;
  step.forward = [&](int64_t index) {
    calls.push_back("forward" + std::to_string(index));
    at::Tensor loss = (weight * static_cast<double>(index + 1)).sum();  // d/dw = index + 1
    return MicroBatchLoss{loss, 10.0 * index, 1.0, 8};
  };
  step.zero_grad = [&] { calls.push_back("zero_grad"); weight.mutable_grad() = at::Tensor(); };
  step.clip_gradients = [&] { calls.push_back("clip"); return 3.5; };
  step.optimizer_step = [&] {
    calls.push_back("step");
    EXPECT_TRUE(at::allclose(weight.grad(), at::full({2}, 2.5, at::kDouble)));  // mean of 1, 2, 3, 4
  };
  step.after_optimizer_step = [&] { calls.push_back("hooks"); };
  StepResult result = schedule->run_step(step);
  EXPECT_EQ(calls, (std::vector<std::string>{"zero_grad", "forward0", "forward1", "forward2", "forward3", "clip", "step", "hooks"}));
  EXPECT_DOUBLE_EQ(result.loss, 2.0 * 2.5);  // mean over micro-batches of sum(weight * (index + 1))
  EXPECT_DOUBLE_EQ(result.cross_entropy, 15.0);
  EXPECT_DOUBLE_EQ(result.aux_loss, 1.0);
  EXPECT_DOUBLE_EQ(result.grad_norm, 3.5);
  EXPECT_EQ(result.tokens, 32);
}
