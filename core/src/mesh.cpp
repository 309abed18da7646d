// The process mesh's sizes and checks, and the pipeline's balanced split of the model chain into stages.
#include "mesh.h"

#include <limits>
#include <numeric>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"

namespace pithtrain {

namespace {

// Units per stage for `stages` consecutive stages of units with these costs: the split whose most
// expensive stage is cheapest (dynamic programming over prefixes).
std::vector<int64_t> balanced_split(const std::vector<double>& cost, int64_t stages) {
  const int64_t units = static_cast<int64_t>(cost.size());
  std::vector<double> prefix(units + 1, 0.0);
  for (int64_t unit = 0; unit < units; ++unit) prefix[unit + 1] = prefix[unit] + cost[unit];
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(units + 1, std::numeric_limits<double>::infinity()));
  std::vector<std::vector<int64_t>> cut(stages + 1, std::vector<int64_t>(units + 1, 0));  // where the last stage begins
  best[0][0] = 0;
  for (int64_t stage = 1; stage <= stages; ++stage)
    for (int64_t end = stage; end <= units; ++end)
      for (int64_t begin = stage - 1; begin < end; ++begin) {
        const double worst = std::max(best[stage - 1][begin], prefix[end] - prefix[begin]);
        if (worst < best[stage][end]) best[stage][end] = worst, cut[stage][end] = begin;
      }
  std::vector<int64_t> units_per_stage(stages, 0);
  for (int64_t stage = stages, end = units; stage >= 1; end = cut[stage][end], --stage) units_per_stage[stage - 1] = end - cut[stage][end];
  return units_per_stage;
}

// Units [first, end) of a chain of `units` in words: "embedding + layers 0-1", "layer 2 + head".
std::string units_named(int64_t first, int64_t end, int64_t units) {
  std::vector<std::string> parts;
  if (first == 0) parts.push_back("embedding");
  const int64_t first_layer = std::max<int64_t>(first, 1) - 1, last_layer = std::min<int64_t>(end - 1, units - 2) - 1;
  if (first_layer == last_layer) parts.push_back("layer " + std::to_string(first_layer));
  if (first_layer < last_layer) parts.push_back("layers " + std::to_string(first_layer) + "-" + std::to_string(last_layer));
  if (end == units) parts.push_back("head");
  std::string text;
  for (const auto& part : parts) text += (text.empty() ? "" : " + ") + part;
  return text;
}

}  // namespace

void read_mesh(Options& options, int64_t processes, TrainConfig& config) {
  Options parallel = options.table("parallel");
  config.pipeline_parallel = parallel.integer("pipeline", 1, Range::at_least(1));
  config.context_parallel = parallel.integer("context", 1, Range::at_least(1));
  const int64_t pipeline = config.pipeline_parallel, context_size = config.context_parallel;
  for (auto [key, value] : {std::pair{"pipeline", pipeline}, {"context", context_size}})
    if (value < 1 || processes % value != 0)
      throw Error(parallel.where(key) + ": parallel." + key + " = " + std::to_string(value) + " must divide the job's " +
                  std::to_string(processes) + " process(es) (pithtrain launch --nproc, WORLD_SIZE or SLURM_NTASKS; processes " +
                  "= pipeline x data x context)");
  if (processes % (pipeline * context_size) != 0)
    throw Error(parallel.where("context") + ": parallel.pipeline x parallel.context = " + std::to_string(pipeline) + " x " +
                std::to_string(context_size) + " does not divide the job's " + std::to_string(processes) + " processes " +
                "(processes = pipeline x data x context)");
  config.data_parallel = parallel.integer("data", processes / (pipeline * context_size), Range::at_least(1));
  config.expert_parallel = parallel.integer("expert", 1, Range::at_least(1));
  if (config.data_parallel * pipeline * context_size != processes)
    throw Error(parallel.where("data") + ": parallel.data = " + std::to_string(config.data_parallel) + " but the job has " +
                std::to_string(processes) + " process(es) (pithtrain launch --nproc, WORLD_SIZE or SLURM_NTASKS) with " +
                "parallel.pipeline = " + std::to_string(pipeline) + " and parallel.context = " + std::to_string(context_size) +
                " (processes = pipeline x data x context); set parallel.data = " +
                std::to_string(processes / (pipeline * context_size)) + " or leave it out");
  const int64_t expert_ranks = config.data_parallel * context_size;  // what expert groups subdivide
  if (config.expert_parallel < 1 || expert_ranks % config.expert_parallel != 0)
    throw Error(parallel.where("expert") + ": parallel.expert = " + std::to_string(config.expert_parallel) +
                " must divide parallel.data = " + std::to_string(config.data_parallel) +
                (context_size > 1 ? " x parallel.context = " + std::to_string(expert_ranks) : std::string()) +
                " (the experts of each MoE layer are split over groups of parallel.expert data-parallel ranks)");
  if (const int64_t experts = options.table("model").table("moe").integer("num_experts", 8); experts % config.expert_parallel != 0)
    throw Error(options.table("model").table("moe").where("num_experts") + ": model.moe.num_experts = " + std::to_string(experts) +
                " is not divisible by parallel.expert = " + std::to_string(config.expert_parallel) +
                " (each rank of an expert group holds num_experts / parallel.expert experts)");
}

bool StagePlan::owns_unit(int64_t unit) const {
  for (const auto& [first, end] : stage_chunks)
    if (unit >= first && unit < end) return true;
  return false;
}

bool StagePlan::owns_moe_layer(const Model& model, int64_t moe_layer) const {
  if (!pipelined) return true;
  for (const auto& [first, end] : stage_chunks)
    for (int64_t unit = first; unit < end; ++unit)
      if (model.moe_layer_of_unit(unit) == moe_layer) return true;
  return false;
}

int64_t StagePlan::owner(int64_t piece, int64_t stages) const {
  const int64_t pieces = static_cast<int64_t>(piece_units.size());
  return piece < stages ? piece : pieces - 1 - piece;
}

StagePlan plan_stages(Options& parallel, const Model& model, const std::vector<Parameter>& parameters,
                      const TrainConfig& config, int64_t chunks_per_stage, int64_t stage, bool quiet) {
  StagePlan plan;
  plan.pipelined = config.pipeline_parallel > 1;
  plan.stage_chunks = {{0, model.num_units()}};
  // Pipeline stages: the model chain cut into parallel.pipeline x chunks_per_stage pieces of
  // consecutive units, balanced by the work a token does in each (matrix parameters it multiplies
  // with, experts at top_k / num_experts, plus attention scores), or as parallel.pipeline_units says.
  if (config.pipeline_parallel > 1 || chunks_per_stage > 1) {
    const int64_t units = model.num_units(), stages = config.pipeline_parallel;
    const int64_t chunks = chunks_per_stage, pieces = stages * chunks;
    const std::string pieces_text = chunks == 1 ? std::to_string(stages) + " stages"
                                                : std::to_string(pieces) + " chunks (" + std::to_string(chunks) + " per stage)";
    const ModelDims& dims = model.dims();
    std::vector<int64_t> units_per_piece;
    if (parallel.has("pipeline_units")) {
      std::stringstream list(parallel.text("pipeline_units", ""));
      std::string item;
      while (std::getline(list, item, ',')) units_per_piece.push_back(std::atoll(item.c_str()));
      const bool positive = std::all_of(units_per_piece.begin(), units_per_piece.end(), [](int64_t count) { return count > 0; });
      if (!positive || static_cast<int64_t>(units_per_piece.size()) != pieces ||
          std::accumulate(units_per_piece.begin(), units_per_piece.end(), int64_t{0}) != units)
        throw Error(parallel.where("pipeline_units") + ": parallel.pipeline_units = \"" + parallel.text("pipeline_units", "") +
                    "\" must list " + std::to_string(pieces) + " positive counts (" + pieces_text + ") adding up to the " +
                    std::to_string(units) + " units (the embedding, " + std::to_string(dims.num_layers) + " decoder layers, the head)");
    } else {
      if (units < pieces)
        throw Error(parallel.where("pipeline") + ": parallel.pipeline = " + std::to_string(stages) + " needs " + pieces_text +
                    " but the model has only " + std::to_string(units) + " units (the embedding, each decoder layer, the head)");
      std::vector<double> cost(units, 0.0);
      for (const auto& parameter : parameters) {
        if (parameter.tensor.dim() < 2 || parameter.name == "embedding.weight") continue;
        // An expert-parallel block stands for parallel.expert blocks: the split does not depend on the layout.
        const double count = static_cast<double>(parameter.tensor.numel() * (parameter.expert_sharded ? config.expert_parallel : 1));
        cost[model.unit_of(parameter.name)] +=
            parameter.name.find(".experts.") != std::string::npos ? count * dims.top_k / dims.num_experts : count;
      }
      for (int64_t unit = 1; unit + 1 < units; ++unit) cost[unit] += static_cast<double>(config.seq_len * dims.num_heads * dims.head_dim);
      units_per_piece = balanced_split(cost, pieces);
    }
    for (int64_t index = 0, first = 0; index < pieces; first += units_per_piece[index], ++index)
      plan.piece_units.emplace_back(first, first + units_per_piece[index]);
    const int64_t stage_ranks = config.data_parallel * config.context_parallel;
    std::string described;
    plan.stage_chunks.clear();
    for (int64_t index = 0; index < stages; ++index) {
      std::string named;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const auto [first, end] = plan.piece_units[chunk == 0 ? index : pieces - 1 - index];
        if (index == stage) plan.stage_chunks.emplace_back(first, end);
        named += (chunk ? " | " : "") + units_named(first, end, units);
      }
      described += fmt::format("{}stage {} (ranks {}-{}): {}", index ? "; " : "", index, index * stage_ranks, (index + 1) * stage_ranks - 1, named);
    }
    if (!quiet) logger().info("pipeline: {}", described);
    for (const auto& parameter : parameters)
      if (plan.owns_unit(model.unit_of(parameter.name))) plan.owned.insert(parameter.name);
  }
  return plan;
}

void share_stage_buffers(Communicator& pipeline_group, const StagePlan& plan, const Model& model,
                         const std::vector<NamedTensor>& buffers) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> values, targets;
  for (const auto& item : buffers) {
    const bool own = plan.owns_unit(model.unit_of(item.name));
    values.push_back(own ? item.tensor : at::zeros_like(item.tensor));
    targets.push_back(own ? at::Tensor() : item.tensor);
  }
  pipeline_group.all_reduce_sum(values);
  for (size_t index = 0; index < values.size(); ++index)
    if (targets[index].defined()) targets[index].copy_(values[index]);
}

}  // namespace pithtrain
