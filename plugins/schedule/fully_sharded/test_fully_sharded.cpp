// fully_sharded alone (one process): the unit-by-unit recomputed backward gives the gradients of the
// mean loss, full tensors exist only while their unit runs, and clear refusals. Several processes:
// ctest fully_sharded.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "pithtrain/schedule.h"

using namespace pithtrain;

TEST(FullyShardedSchedule, GradientsOfTheMeanLossWithTensorsGatheredOnlyWhileTheirUnitRuns) {
  at::manual_seed(0);
  // Unit 0 makes a hidden vector from its weight and the micro-batch index, with an aux loss; unit 1
  // turns it into a scalar "cross-entropy".
  at::Tensor first = at::randn({2, 3}, at::kDouble).requires_grad_(true);
  at::Tensor second = at::randn({3}, at::kDouble).requires_grad_(true);
  const at::Tensor first_initial = first.detach().clone(), second_initial = second.detach().clone();
  auto unit0 = [](const at::Tensor& weight, int64_t micro_batch) {
    return UnitOutput{at::tanh(weight * static_cast<double>(micro_batch + 1)).sum(0), weight.pow(2).sum() * 0.1};
  };
  auto unit1 = [](const at::Tensor& weight, const at::Tensor& input) { return UnitOutput{(weight * input).exp().sum(), at::Tensor()}; };
  // The reference: plain backward of the mean loss over 3 micro-batches.
  at::Tensor first_reference = first_initial.clone().requires_grad_(true), second_reference = second_initial.clone().requires_grad_(true);
  at::Tensor reference_loss = at::zeros({}, at::kDouble);
  for (int64_t micro_batch = 0; micro_batch < 3; ++micro_batch) {
    UnitOutput hidden = unit0(first_reference, micro_batch);
    reference_loss = reference_loss + (unit1(second_reference, hidden.output).output + hidden.aux_loss) / 3.0;
  }
  reference_loss.backward();

  PluginContext context;
  Options options = Options::from_string("", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  EXPECT_TRUE(schedule->reduces_gradients());
  std::vector<Parameter> shards = schedule->shard({{{"first", first}}, {{"second", second}}});
  ASSERT_EQ(shards.size(), 2u);
  EXPECT_EQ(shards[0].name, "first");
  EXPECT_EQ(shards[0].tensor.numel(), 6);  // one rank: the whole flattened tensor
  EXPECT_EQ(first.numel(), 0);             // the full tensor is freed until its unit runs
  EXPECT_EQ(second.numel(), 0);
  StepFunctions step;
  step.micro_batches = 3;
  step.units = 2;
  step.tokens_per_micro_batch = 4;
  int64_t calls = 0;
  step.forward_unit = [&](int64_t unit, int64_t micro_batch, const at::Tensor& input) {
    ++calls;
    EXPECT_EQ(first.numel(), unit == 0 ? 6 : 0);  // gathered for its own unit only
    EXPECT_EQ(second.numel(), unit == 1 ? 3 : 0);
    return unit == 0 ? unit0(first, micro_batch) : unit1(second, input);
  };
  step.zero_grad = [&] {
    for (auto& shard : shards) shard.tensor.mutable_grad() = at::Tensor();
  };
  step.clip_gradients = [] { return 0.0; };
  bool stepped = false;
  step.optimizer_step = [&] {
    stepped = true;
    EXPECT_TRUE(at::allclose(shards[0].tensor.grad(), first_reference.grad().reshape(-1), 1e-12, 1e-12));
    EXPECT_TRUE(at::allclose(shards[1].tensor.grad(), second_reference.grad(), 1e-12, 1e-12));
  };
  step.after_optimizer_step = [] {};
  StepResult result = schedule->run_step(step);
  EXPECT_TRUE(stepped);
  EXPECT_EQ(calls, 3 * 2 * 2);  // each unit of each micro-batch: the forward, then the recomputation
  EXPECT_NEAR(result.loss, reference_loss.item<double>(), 1e-12);
  EXPECT_EQ(result.tokens, 12);
  EXPECT_EQ(first.numel(), 0);
  // Outside run_step the core gathers a unit explicitly (evaluation).
  schedule->gather_unit(0);
  EXPECT_TRUE(at::equal(first.detach(), first_initial));
  schedule->release_unit(0);
  EXPECT_EQ(first.numel(), 0);
}

TEST(FullyShardedSchedule, RefusesExpertBlocksAndParametersWithoutTheirOwnGradient) {
  PluginContext context;
  Options options = Options::from_string("", "test.toml");
  auto schedule = pithtrain_plugin()->make_schedule(options, context);
  Parameter block{"layers.1.experts.gate_proj", at::ones({2, 2}).requires_grad_(true), true, /*expert_sharded=*/true};
  try {
    schedule->shard({{block}});
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("parallel.expert = 1"), std::string::npos) << error.what();
  }
  Parameter master{"layers.0.attention.q_proj", at::ones({2}, at::kFloat)};  // a float32 copy of a bf16 model
  try {
    schedule->shard({{master}});
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("train.dtype = \"float32\""), std::string::npos) << error.what();
  }
}
