// dualpipev alone (one stage holding both chunks, no pipeline group): the gradients of the mean loss
// with some weight gradients deferred, the traced DualPipeV order, refusals. Several stages: ctest
// dualpipev.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>

#include <ATen/ATen.h>

#include "pithtrain/nn.h"
#include "pithtrain/schedule.h"

using namespace pithtrain;

namespace {
// Two units, one per chunk: unit 0 maps micro-batch m's inputs [5, 3] through `weight` [4, 3] (with an
// aux loss); unit 1 reduces its input [5, 4] to a scalar through `second` [2, 4].
struct TwoChunkModel {
  at::Tensor weight = at::randn({4, 3}, at::kDouble).requires_grad_(true);
  at::Tensor second = at::randn({2, 4}, at::kDouble).requires_grad_(true);
  at::Tensor inputs = at::randn({8, 5, 3}, at::kDouble);
  UnitOutput unit(int64_t unit, int64_t micro_batch, const at::Tensor& input) const {
    if (unit == 0) return UnitOutput{pithtrain::linear(inputs[micro_batch], weight), weight.pow(2).sum() * 0.1};
    return UnitOutput{pithtrain::linear(at::tanh(input), second).pow(2).sum(), at::Tensor()};
  }
  at::Tensor reference_loss(const at::Tensor& w, const at::Tensor& s, int64_t micro_batches) const {
    at::Tensor loss = at::zeros({}, at::kDouble);
    for (int64_t m = 0; m < micro_batches; ++m)
      loss = loss + (at::linear(at::tanh(at::linear(inputs[m], w)), s).pow(2).sum() + w.pow(2).sum() * 0.1) / double(micro_batches);
    return loss;
  }
};
}  // namespace

TEST(DualPipeVSchedule, OneStageGivesTheMeanLossGradientWithDeferredWeights) {
  at::manual_seed(0);
  char folder[] = "/tmp/pithtrain_dualpipev_trace_XXXXXX";
  ASSERT_NE(::mkdtemp(folder), nullptr);
  const std::string trace = folder;
  PluginContext context;
  Options options = Options::from_string("trace_dir = \"" + trace + "\"\ntrace_step = 1\n", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  EXPECT_TRUE(schedule->runs_pipeline_stages());
  EXPECT_EQ(schedule->chunks_per_stage(), 2);
  TwoChunkModel model;
  StepFunctions step;
  step.micro_batches = 3;
  step.units = 2;
  step.stage_chunks = {{0, 1}, {1, 2}};
  step.tokens_per_micro_batch = 5;
  step.forward_unit = [&](int64_t unit, int64_t micro_batch, const at::Tensor& input) { return model.unit(unit, micro_batch, input); };
  step.zero_grad = [&] { model.weight.mutable_grad() = model.second.mutable_grad() = at::Tensor(); };
  step.clip_gradients = [] { return 0.0; };
  at::Tensor weight_grad, second_grad;
  step.optimizer_step = [&] { weight_grad = model.weight.grad().clone(), second_grad = model.second.grad().clone(); };
  step.after_optimizer_step = [] {};
  StepResult result = schedule->run_step(step);
  at::Tensor w = model.weight.detach().clone().requires_grad_(true), s = model.second.detach().clone().requires_grad_(true);
  at::Tensor loss = model.reference_loss(w, s, 3);
  loss.backward();
  EXPECT_TRUE(at::allclose(weight_grad, w.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(second_grad, s.grad(), 1e-12, 1e-12));
  EXPECT_NEAR(result.loss, loss.item<double>(), 1e-12);
  EXPECT_EQ(result.tokens, 15);
  // The one-stage DualPipeV order for 3 micro-batches: F0 F1, two rounds of paired F0+B1 and F1+B0,
  // then B1, B0 with its weights deferred, and W.
  std::ifstream file(trace + "/stage_0.jsonl");
  std::string kinds;
  for (std::string line; std::getline(file, line);) {
    kinds += line.substr(line.find("\"kind\":\"") + 8, 1);
    if (kinds.back() != 'W') kinds += line.substr(line.find("\"chunk\":") + 8, 1);
    if (line.find("\"deferred\":true") != std::string::npos) kinds += "d";
    kinds += " ";
  }
  EXPECT_EQ(kinds, "F0 F1 F0 B1 F1 B0 F0 B1 F1 B0 B1 B0d W ");
  std::remove((trace + "/stage_0.jsonl").c_str());
  ::rmdir(folder);
  // The next step is the same order again (per-step counters start over).
  result = schedule->run_step(step);
  EXPECT_NEAR(result.loss, loss.item<double>(), 1e-12);
}

TEST(DualPipeVSchedule, RefusesTooFewMicroBatchesAndBadKeys) {
  PluginContext context;
  Options options = Options::from_string("", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  TwoChunkModel model;
  StepFunctions step;
  step.micro_batches = 1;  // fewer than 2 x stages
  step.units = 2;
  step.stage_chunks = {{0, 1}, {1, 2}};
  step.forward_unit = [&](int64_t unit, int64_t micro_batch, const at::Tensor& input) { return model.unit(unit, micro_batch, input); };
  step.zero_grad = [] {};
  try {
    schedule->run_step(step);
    FAIL() << "one micro-batch was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("needs at least 2 x parallel.pipeline = 2 micro-batches"), std::string::npos) << error.what();
  }
  step.micro_batches = 2;
  step.stage_chunks = {{0, 2}};  // one chunk: a core that did not cut the chain for two
  EXPECT_THROW(schedule->run_step(step), Error);
  Options negative = Options::from_string("bubble_every = -1\n", "test.toml");
  EXPECT_THROW(pithtrain_plugin()->make_schedule(negative, context), Error);
}
