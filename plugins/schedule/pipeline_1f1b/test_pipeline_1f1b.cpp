// pipeline_1f1b alone (one stage, no pipeline group): it runs the stage's units of every micro-batch,
// forward then backward, gives the gradients of the mean loss, traces the step it is asked to, and
// refuses bad keys. Several stages: ctest pipeline.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

using namespace pithtrain;

TEST(PipelineSchedule, OneStageGivesTheMeanLossGradientAndTracesTheStep) {
  at::manual_seed(0);
  at::Tensor weight = at::randn({3}, at::kDouble).requires_grad_(true);
  // (std::filesystem is avoided here: libtorch.so carries its own copy of some of its symbols.)
  char folder[] = "/tmp/pithtrain_pipeline_trace_XXXXXX";
  ASSERT_NE(::mkdtemp(folder), nullptr);
  const std::string trace = folder;
  PluginContext context;
  Options options = Options::from_string("trace_dir = \"" + trace + "\"\ntrace_step = 1\n", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  EXPECT_TRUE(schedule->runs_pipeline_stages());
  StepFunctions step;
  step.micro_batches = 3;
  step.units = 2;
  step.stage_chunks = {{0, 2}};
  step.tokens_per_micro_batch = 4;
  std::vector<std::pair<int64_t, int64_t>> calls;  // (unit, micro-batch)
  // Unit 0: [3] from the weight; unit 1: a scalar "cross-entropy"; unit 0 also has an aux loss.
  step.forward_unit = [&](int64_t unit, int64_t micro_batch, const at::Tensor& input) {
    calls.emplace_back(unit, micro_batch);
    if (unit == 0) return UnitOutput{weight * static_cast<double>(micro_batch + 1), weight.pow(2).sum() * 0.5};
    return UnitOutput{input.exp().sum(), at::Tensor()};
  };
  step.zero_grad = [&] { weight.mutable_grad() = at::Tensor(); };
  step.clip_gradients = [] { return 0.0; };
  at::Tensor grad_at_step;
  step.optimizer_step = [&] { grad_at_step = weight.grad().clone(); };
  step.after_optimizer_step = [] {};
  StepResult result = schedule->run_step(step);
  EXPECT_EQ(calls, (std::vector<std::pair<int64_t, int64_t>>{{0, 0}, {1, 0}, {0, 1}, {1, 1}, {0, 2}, {1, 2}}));
  at::Tensor reference = weight.detach().clone().requires_grad_(true);
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (int64_t m = 0; m < 3; ++m) loss = loss + ((reference * static_cast<double>(m + 1)).exp().sum() + reference.pow(2).sum() * 0.5) / 3.0;
  loss.backward();
  EXPECT_TRUE(at::allclose(grad_at_step, reference.grad(), 1e-12, 1e-12));
  EXPECT_NEAR(result.loss, loss.item<double>(), 1e-12);
  EXPECT_EQ(result.tokens, 12);
  // One stage's trace: forward then backward of each micro-batch.
  std::ifstream file(trace + "/stage_0.jsonl");
  std::vector<std::string> kinds;
  for (std::string line; std::getline(file, line);) kinds.push_back(line.substr(line.find("\"kind\":\"") + 8, 1));
  EXPECT_EQ(kinds, (std::vector<std::string>{"F", "B", "F", "B", "F", "B"}));
  std::remove((trace + "/stage_0.jsonl").c_str());
  ::rmdir(folder);
}

TEST(PipelineSchedule, RefusesNegativeBubbleEveryAndAZeroTraceStep) {
  PluginContext context;
  Options negative = Options::from_string("bubble_every = -1\n", "test.toml");
  EXPECT_THROW(pithtrain_plugin()->make_schedule(negative, context), Error);
  Options zero = Options::from_string("trace_step = 0\n", "test.toml");
  EXPECT_THROW(pithtrain_plugin()->make_schedule(zero, context), Error);
}
