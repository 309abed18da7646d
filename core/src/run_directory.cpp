// Run directories and the run they hold (run_directory.h).
#include "run_directory.h"

#include <chrono>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

std::string read_run_id(const fs::path& run_dir) {
  std::ifstream in(run_dir / "run_id");
  std::string id;
  in >> id;
  return id;
}

std::string new_run_id() {
  // Time and randomness: unique across machines sharing a file system, and sortable by start time.
  std::random_device random;
  std::ostringstream id;
  id << std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count() << "-"
     << std::hex << (static_cast<uint64_t>(random()) << 32 | random());
  return id.str();
}

// What of a run `run_dir` holds, in words ("3 checkpoint(s) in checkpoints/, metrics.jsonl"); empty when nothing.
std::string run_files(const fs::path& run_dir, int64_t& checkpoints) {
  std::vector<std::string> parts;
  std::error_code error;
  checkpoints = 0;
  if (fs::is_directory(run_dir / "checkpoints", error))
    for (const auto& entry : fs::directory_iterator(run_dir / "checkpoints", error))
      if (entry.path().extension() == ".safetensors") ++checkpoints;
  if (checkpoints > 0) parts.push_back(std::to_string(checkpoints) + " checkpoint(s) in checkpoints/");
  for (const char* name : {"metrics.jsonl", "train.log", "model.safetensors"})
    if (fs::exists(run_dir / name, error)) parts.push_back(name);
  std::string text;
  for (const auto& part : parts) text += (text.empty() ? "" : ", ") + part;
  return text;
}

}  // namespace

RunClaim claim_run_directory(const fs::path& run_dir, bool resuming, const std::string& resumed_run_id, bool move_aside) {
  RunClaim claim;
  const std::string held_id = read_run_id(run_dir);
  if (resuming) {
    if (!held_id.empty() && !resumed_run_id.empty() && held_id != resumed_run_id)
      throw Error("run directory '" + run_dir.string() + "' belongs to run " + held_id + " (its run_id file) but its newest " +
                  "checkpoint was written by run " + resumed_run_id + "; checkpoints of two runs are mixed there: move the " +
                  "foreign checkpoints out of " + (run_dir / "checkpoints").string() + ", or use --out NEW_DIR");
    claim.new_run = false;
    claim.run_id = !held_id.empty() ? held_id : !resumed_run_id.empty() ? resumed_run_id : new_run_id();
    return claim;
  }
  int64_t checkpoints = 0;
  const std::string held = run_files(run_dir, checkpoints);
  if (!held.empty()) {
    if (move_aside) {
      claim.move_aside = true;
      for (int n = 1;; ++n) {
        claim.moved_to = run_dir.string() + ".old-" + std::to_string(n);
        if (!fs::exists(claim.moved_to)) break;
      }
    } else if (checkpoints > 0) {
      throw Error("run directory '" + run_dir.string() + "' holds another run (" + held + ")" +
                  (held_id.empty() ? "" : ", run " + held_id) + ", and this run does not resume it (checkpoint.resume = " +
                  "false, or none of its checkpoints loads); nothing was written. Use --out NEW_DIR (or --set run.name=NEW) " +
                  "for a new run, or --move-aside to rename the old run to " + run_dir.string() + ".old-N first");
    } else if (!held_id.empty()) {
      // The run this directory holds stopped before its first checkpoint: it starts again from step 0.
      claim.new_run = false;
      claim.run_id = held_id;
      return claim;
    } else {
      throw Error("run directory '" + run_dir.string() + "' holds files of another run (" + held + ") and no run_id; " +
                  "nothing was written. Use --out NEW_DIR (or --set run.name=NEW) for a new run, or --move-aside to " +
                  "rename the old run to " + run_dir.string() + ".old-N first");
    }
  }
  claim.run_id = new_run_id();
  return claim;
}

void apply_run_claim(const fs::path& run_dir, const RunClaim& claim) {
  if (claim.move_aside) {
    std::error_code error;
    fs::rename(run_dir, claim.moved_to, error);
    if (error)
      throw Error("cannot move the old run '" + run_dir.string() + "' aside to '" + claim.moved_to.string() + "': " +
                  error.message() + "; move it yourself or use --out NEW_DIR");
  }
  fs::create_directories(run_dir);
  if (read_run_id(run_dir) == claim.run_id) return;
  const fs::path temporary = run_dir / "run_id.tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << claim.run_id << "\n";
    out.flush();
    if (!out) throw Error("cannot write '" + temporary.string() + "': check that the folder is writable and not full");
  }
  fs::rename(temporary, run_dir / "run_id");
}

}  // namespace pithtrain
