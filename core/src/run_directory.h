// One run per directory: RUN_DIR/run_id names the run a run directory holds. A new run never starts in
// a directory that holds another run's checkpoints, metrics or log: it is refused before anything is
// written, or (--move-aside) the old run is renamed out of the way, never deleted.
#pragma once
#include <filesystem>
#include <optional>
#include <string>

namespace pithtrain {

// What this invocation does with its run directory, decided before anything is written.
struct RunClaim {
  std::string run_id;       // the run this invocation continues or starts
  bool new_run = true;      // false: continues the run the directory holds
  bool move_aside = false;  // the directory holds another run, to be renamed to `moved_to` first
  std::filesystem::path moved_to;
};

// Decides what to do with `run_dir`. `resumed_run_id` is the run id of the checkpoint being resumed
// (empty: none, or written before run ids); `resuming` whether a checkpoint is resumed at all. Throws
// Error naming the directory and the ways out when a new run would mix with the run it holds (unless
// `move_aside`). Reads only.
RunClaim claim_run_directory(const std::filesystem::path& run_dir, bool resuming, const std::string& resumed_run_id,
                             bool move_aside);

// Carries the claim out: renames the old run aside and writes RUN_DIR/run_id (rank 0 only).
void apply_run_claim(const std::filesystem::path& run_dir, const RunClaim& claim);

}  // namespace pithtrain
