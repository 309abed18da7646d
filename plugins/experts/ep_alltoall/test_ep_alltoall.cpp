// ep_alltoall equals the one-process `grouped` experts: alone, and as 2 and 4 Gloo processes whose
// outputs and gradients match grouped run on the tokens of every rank together (ranks left without
// tokens included). The multi-process cases start this executable again as the ranks of a job.
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "distributed.h"
#include "pithtrain/experts.h"
#include "registry.h"

using namespace pithtrain;

namespace {

constexpr int64_t kHidden = 16, kExperts = 8;
const char* kOptions = "activation = \"clamped_swiglu\"\nbias = true\nswiglu_limit = 0.5\n";

PluginContext test_context() {
  PluginContext context;
  context.dims = {.hidden_size = kHidden, .num_layers = 2, .num_experts = kExperts, .top_k = 2, .expert_hidden_size = 8, .init_std = 0.3};
  context.dtype = at::kDouble;
  return context;
}

struct Tokens {
  at::Tensor x, weights, probe;  // [T, H], [T, 2], [T, H]
  at::Tensor expert_ids;         // [T, 2]
};

// Rank r's tokens, the same on every process. "idle": every token on experts 0 and 1 (rank 0's), and
// rank 1 has no token at all.
Tokens tokens_of(int64_t rank, const std::string& which) {
  at::manual_seed(100 + rank);
  const int64_t count = which == "idle" && rank == 1 ? 0 : 11 + 3 * rank;
  Tokens t;
  t.x = at::randn({count, kHidden}, at::kDouble);
  t.weights = at::rand({count, 2}, at::kDouble);
  t.probe = at::randn({count, kHidden}, at::kDouble);
  t.expert_ids = which == "idle" ? at::arange(2, at::kLong).repeat({count, 1})
                                 : at::stack({at::randint(0, kExperts / 2, {count}, at::kLong),
                                              at::randint(kExperts / 2, kExperts, {count}, at::kLong)}, 1);
  return t;
}

struct Result {
  at::Tensor out, grad_x, grad_weights;
  std::vector<at::Tensor> grad_parameters;
};

Result run(Experts& experts, const Tokens& tokens) {
  at::Tensor x = tokens.x.clone().requires_grad_(true);
  Routing routing;
  routing.expert_ids = tokens.expert_ids;
  routing.weights = tokens.weights.clone().requires_grad_(true);
  at::Tensor out = experts.forward(x, routing);
  (out * tokens.probe).sum().backward();
  Result result{out.detach(), x.grad(), routing.weights.grad(), {}};
  for (auto& parameter : experts.parameters())
    result.grad_parameters.push_back(parameter.tensor.grad().defined() ? parameter.tensor.grad() : at::zeros_like(parameter.tensor));
  return result;
}

// Gives the plugin under test the reference's weights (its block of them) with non-zero biases.
void share_weights(Experts& reference, Experts& tested, int64_t first, int64_t count) {
  at::NoGradGuard no_grad;
  at::manual_seed(11);
  auto from = reference.parameters(), to = tested.parameters();
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i].name.find("bias") != std::string::npos) from[i].tensor.normal_(0.0, 0.5);
    to[i].tensor.copy_(from[i].tensor.narrow(0, first, count));
  }
}

int differences(const char* what, const at::Tensor& a, const at::Tensor& b, int64_t rank) {
  if (a.numel() == 0 && b.numel() == 0) return 0;
  const double difference = (a - b).abs().max().item<double>();
  if (difference <= 1e-12) return 0;
  std::cerr << "rank " << rank << ": " << what << " differs by " << difference << "\n";
  return 1;
}

// One rank of a launched job: ep_alltoall on this rank's tokens against grouped on every rank's.
int run_rank(const std::string& which) {
  const ProcessEnvironment environment = process_environment().value();
  ProcessGroups groups = connect(environment, "cpu", 60.0, environment.world_size);
  const int64_t rank = environment.rank, ranks = environment.world_size, local = kExperts / ranks;
  if (which == "exchange") {
    // Communicator::all_to_all alone: rank s sends (s + 1) * (r + 1) rows to rank r, row values
    // s * 1000 + r * 100 + i; the backward returns each row's gradient to its sender.
    std::vector<int64_t> send, receive;
    std::vector<at::Tensor> rows, expected_rows;
    for (int64_t r = 0; r < ranks; ++r) {
      send.push_back((rank + 1) * (r + 1));
      receive.push_back((r + 1) * (rank + 1));
      rows.push_back(at::arange(send.back(), at::kDouble) + rank * 1000 + r * 100);
      expected_rows.push_back(at::arange(receive.back(), at::kDouble) + r * 1000 + rank * 100);
    }
    at::Tensor input = at::cat(rows).unsqueeze(1).repeat({1, 3}).requires_grad_(true);
    at::Tensor out = groups.expert->all_to_all(input, send, receive);
    (out * out.detach() * 2).sum().backward();  // gradient 2 * value, row by row
    return differences("received rows", out.select(1, 0), at::cat(expected_rows), rank) +
           differences("returned gradient", input.grad(), input.detach() * 2, rank);
  }
  Options options = Options::from_string(kOptions, "test.toml");
  PluginContext context = test_context();
  LoadedPlugin grouped_plugin = load_plugin_file(std::string(PITHTRAIN_PLUGIN_DIR) + "/experts_grouped.so");
  at::manual_seed(5);  // the same reference weights on every rank
  auto reference = grouped_plugin.descriptor->make_experts(options, context);
  context.expert_group = groups.expert;
  auto tested = pithtrain_plugin()->make_experts(options, context);
  if (tested->parameters().front().tensor.size(0) != local || !tested->parameters().front().expert_sharded) {
    std::cerr << "rank " << rank << ": expected a block of " << local << " experts marked expert_sharded\n";
    return 1;
  }
  share_weights(*reference, *tested, rank * local, local);

  std::vector<Tokens> all;
  for (int64_t r = 0; r < ranks; ++r) all.push_back(tokens_of(r, which));
  int64_t offset = 0;
  for (int64_t r = 0; r < rank; ++r) offset += all[r].x.size(0);
  auto every_rank = [&](at::Tensor Tokens::*field) {
    std::vector<at::Tensor> parts;
    for (auto& tokens : all) parts.push_back(tokens.*field);
    return at::cat(parts);
  };
  Tokens together{every_rank(&Tokens::x), every_rank(&Tokens::weights), every_rank(&Tokens::probe), every_rank(&Tokens::expert_ids)};
  const Result expected = run(*reference, together), got = run(*tested, all[rank]);
  const int64_t count = all[rank].x.size(0);
  int failures = differences("output", got.out, expected.out.narrow(0, offset, count), rank);
  if (count > 0) {
    failures += differences("input gradient", got.grad_x, expected.grad_x.narrow(0, offset, count), rank);
    failures += differences("routing weight gradient", got.grad_weights, expected.grad_weights.narrow(0, offset, count), rank);
  }
  for (size_t i = 0; i < got.grad_parameters.size(); ++i)
    failures += differences(tested->parameters()[i].name.c_str(), got.grad_parameters[i],
                            expected.grad_parameters[i].narrow(0, rank * local, local), rank);
  return failures == 0 ? 0 : 1;
}

int launch_job(int64_t ranks, const std::string& which) {
  ::setenv("PITHTRAIN_EP_CHECK", which.c_str(), 1);
  const int status = launch(ranks, {});
  ::unsetenv("PITHTRAIN_EP_CHECK");
  return status;
}

}  // namespace

TEST(ExpertParallelExperts, OneRankEqualsGrouped) {
  Options options = Options::from_string(kOptions, "test.toml");
  PluginContext context = test_context();
  LoadedPlugin grouped_plugin = load_plugin_file(std::string(PITHTRAIN_PLUGIN_DIR) + "/experts_grouped.so");
  auto reference = grouped_plugin.descriptor->make_experts(options, context);
  auto tested = pithtrain_plugin()->make_experts(options, context);
  EXPECT_FALSE(tested->parameters().front().expert_sharded);  // no expert group: every expert here
  share_weights(*reference, *tested, 0, kExperts);
  const Tokens tokens = tokens_of(0, "random");
  const Result a = run(*tested, tokens), b = run(*reference, tokens);
  EXPECT_EQ(differences("output", a.out, b.out, 0), 0);
  EXPECT_EQ(differences("input gradient", a.grad_x, b.grad_x, 0), 0);
  EXPECT_EQ(differences("routing weight gradient", a.grad_weights, b.grad_weights, 0), 0);
  for (size_t i = 0; i < a.grad_parameters.size(); ++i)
    EXPECT_EQ(differences("parameter gradient", a.grad_parameters[i], b.grad_parameters[i], 0), 0) << i;
}

TEST(ExpertParallelExperts, AllToAllSendsRowsAndGradientsToTheRightRanks) {
  EXPECT_EQ(launch_job(3, "exchange"), 0);
}

TEST(ExpertParallelExperts, TwoAndFourRanksEqualOneProcess) {
  EXPECT_EQ(launch_job(2, "random"), 0);
  EXPECT_EQ(launch_job(4, "random"), 0);
}

TEST(ExpertParallelExperts, RanksWithoutTokensNeitherHangNorProduceNaN) {
  // All tokens on rank 0's experts: the other ranks receive nothing; rank 1 also sends nothing.
  EXPECT_EQ(launch_job(2, "idle"), 0);
  EXPECT_EQ(launch_job(4, "idle"), 0);
}

int main(int argc, char** argv) {
  if (const char* which = std::getenv("PITHTRAIN_EP_CHECK")) {
    try {
      return run_rank(which);
    } catch (const std::exception& error) {
      std::cerr << "rank " << std::getenv("RANK") << ": " << error.what() << "\n";
      return 1;
    }
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
