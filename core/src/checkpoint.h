// Safetensors files with a checksum, and the run's checkpoint folder: atomic saves, keep-last-K,
// newest-valid-first loading.
#pragma once
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<NamedTensor> tensors;  // CPU tensors, in file order
  const at::Tensor* find(const std::string& name) const;
};

// Writes `tensors` (copied to CPU, contiguous) and `metadata` as safetensors, adding metadata
// "checksum" (FNV-1a 64 over the data section). Writes PATH.tmp, flushes it to disk, renames it to PATH.
void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      std::map<std::string, std::string> metadata = {});
// Reads a safetensors file; verifies the checksum when present. Throws Error naming the file.
SafetensorsFile load_safetensors(const std::string& path);

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
  // Saves step_<step>.safetensors atomically, then deletes all but the newest `keep` checkpoints.
  std::filesystem::path save(int64_t step, const std::vector<NamedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata);
  // The newest checkpoint that loads and verifies; a corrupt one is reported through the logger and
  // skipped. Empty when there is none.
  std::optional<std::pair<std::filesystem::path, SafetensorsFile>> load_latest() const;
  std::vector<std::filesystem::path> list() const;  // newest first

 private:
  std::filesystem::path folder_;
  int64_t keep_;
};

}  // namespace pithtrain
