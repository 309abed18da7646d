// The run's checkpoint folder (atomic saves, keep-last-K, newest-valid-first loading) and copying a
// file's tensors into a model. The safetensors files themselves: safetensors.h.
#pragma once
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pithtrain/plugin.h"
#include "safetensors.h"

namespace pithtrain {

// Copies `source` into each tensor of `targets` by name; throws Error naming `file`, the tensor and
// the fix when one is missing or its shape differs. The file always holds full tensors: a target in
// `blocks` is block block_index of block_count along dimension 0 (expert parallel), a target in
// `flat_shards` (name -> full shape) is shard shard_index of shard_count of the flattened, zero-padded
// tensor (Schedule::shard).
void copy_tensors_by_name(const SafetensorsFile& source, const std::vector<NamedTensor>& targets,
                          const std::string& prefix, const std::string& file,
                          const std::set<std::string>& blocks = {}, int64_t block_index = 0, int64_t block_count = 1,
                          const std::map<std::string, std::vector<int64_t>>& flat_shards = {}, int64_t shard_index = 0,
                          int64_t shard_count = 1);

class CheckpointFolder {
 public:
  CheckpointFolder(std::filesystem::path folder, int64_t keep) : folder_(std::move(folder)), keep_(keep) {}
  // Removes unfinished saves (step_<N>.safetensors.tmp, left by a killed process), saves
  // step_<step>.safetensors atomically, then deletes all but the newest `keep` checkpoints. A failed
  // save throws Error naming the file and the newest complete checkpoint, which is left in place.
  std::filesystem::path save(int64_t step, const std::vector<NamedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata);
  // The newest checkpoint that loads and verifies; a corrupt one is reported through the logger and
  // skipped. Empty when there is none.
  std::optional<std::pair<std::filesystem::path, SafetensorsFile>> load_latest() const;
  std::vector<std::filesystem::path> list() const;  // newest first

 private:
  void remove_unfinished() const;

  std::filesystem::path folder_;
  int64_t keep_;
};

}  // namespace pithtrain
