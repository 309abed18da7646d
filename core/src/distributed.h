// Multi-process runs: the process group from the environment that torchrun, SLURM or `pithtrain launch`
// set, and the launcher that starts N local processes (docs/distributed.md).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pithtrain/distributed.h"

namespace pithtrain {

struct ProcessEnvironment {
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_address = "127.0.0.1";
  int master_port = 29500;
};

// RANK/WORLD_SIZE/LOCAL_RANK (torchrun, pithtrain launch) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, with
// MASTER_ADDR and MASTER_PORT; nullopt when there is one process.
std::optional<ProcessEnvironment> process_environment();

// The process groups of a run (docs/distributed.md, "The mesh").
// Mesh order, outer to inner: pipeline, data, context (expert groups subdivide the data x context ranks
// of a stage): rank = (stage x D + d) x C + c.
struct ProcessGroups {
  std::shared_ptr<Communicator> world;        // every rank: agreed figures
  std::shared_ptr<Communicator> data;         // the D x C ranks of this pipeline stage (= world without pipeline)
  std::shared_ptr<Communicator> context;      // the C ranks splitting the same sequences; null when C = 1
  std::shared_ptr<Communicator> pipeline;     // the stages of this data index, in stage order; null when 1 stage
  std::shared_ptr<Communicator> expert;       // parallel.expert consecutive data ranks splitting the experts; null when 1
  std::shared_ptr<Communicator> expert_data;  // the data ranks holding the same experts; null when there is one such rank
};

// Joins the process groups (c10d TCPStore rendezvous at MASTER_ADDR:MASTER_PORT, Gloo for CPU runs).
// Collectives that take longer than timeout_seconds fail instead of hanging.
ProcessGroups connect(const ProcessEnvironment& environment, const std::string& device, double timeout_seconds,
                      int64_t expert_size = 1, int64_t pipeline_size = 1, int64_t context_size = 1);

// What `pithtrain launch` starts: `processes` on this machine, node `node_rank` of `nodes`; rank 0's
// machine is master_address, its port master_port (0: a free port, one node only).
struct LaunchPlan {
  int64_t processes = 1, nodes = 1, node_rank = 0;
  std::string master_address = "127.0.0.1";
  int master_port = 0;
};

// `pithtrain launch --nproc N [--nnodes M --node-rank R --master ADDR:PORT] -- ARGS`: runs N copies of
// this executable with ARGS and the rank environment (RANK = R x N + local rank); when one fails, stops
// the others and returns non-zero naming the rank.
int launch(const LaunchPlan& plan, const std::vector<std::string>& arguments);
inline int launch(int64_t processes, const std::vector<std::string>& arguments) {
  LaunchPlan plan;
  plan.processes = processes;
  return launch(plan, arguments);
}

}  // namespace pithtrain
