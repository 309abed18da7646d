// The run's checkpoint folder: atomic saves (safetensors.cpp writes the files), keep-last-K, unfinished
// saves, newest-valid-first loading; and copying a file's tensors into a model by name.
#include "checkpoint.h"

#include <algorithm>
#include <string_view>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

// step_<digits>.safetensors
bool is_checkpoint_name(const std::string& name) {
  constexpr std::string_view head = "step_", tail = ".safetensors";
  if (name.size() <= head.size() + tail.size() || !name.starts_with(head) || !name.ends_with(tail)) return false;
  return std::all_of(name.begin() + head.size(), name.end() - tail.size(), [](char c) { return c >= '0' && c <= '9'; });
}

int64_t step_of(const fs::path& checkpoint) {
  return std::stoll(checkpoint.filename().string().substr(5));
}

}  // namespace

void copy_tensors_by_name(const SafetensorsFile& source, const std::vector<NamedTensor>& targets,
                          const std::string& prefix, const std::string& file,
                          const std::set<std::string>& blocks, int64_t block_index, int64_t block_count,
                          const std::map<std::string, std::vector<int64_t>>& flat_shards, int64_t shard_index,
                          int64_t shard_count) {
  at::NoGradGuard no_grad;
  for (const auto& target : targets) {
    const at::Tensor* stored = source.find(prefix + target.name);
    if (stored == nullptr)
      throw Error("checkpoint '" + file + "' has no tensor '" + prefix + target.name +
                  "': it was written by a different model or plugin set; use a new --out (or run.name) for this config");
    // An expert-parallel block: the file holds the full tensor whatever layout wrote it (resharding).
    at::Tensor source_tensor = *stored;
    std::vector<int64_t> expected = target.tensor.sizes().vec();
    if (auto shard = flat_shards.find(target.name); shard != flat_shards.end()) {
      expected = shard->second;
      if (stored->sizes() == at::IntArrayRef(expected)) {
        const int64_t size = target.tensor.numel();  // s: the shard's elements
        at::Tensor padded = at::zeros({size * shard_count}, stored->options());
        padded.narrow(0, 0, stored->numel()).copy_(stored->reshape(-1));
        source_tensor = padded.narrow(0, shard_index * size, size);
      }
    } else if (blocks.count(target.name) && !expected.empty()) {
      expected[0] *= block_count;
      if (stored->sizes() == at::IntArrayRef(expected))
        source_tensor = stored->narrow(0, block_index * target.tensor.size(0), target.tensor.size(0));
    }
    if (stored->sizes() != at::IntArrayRef(expected))
      throw Error("checkpoint '" + file + "': tensor '" + prefix + target.name + "' has shape " +
                  c10::str(stored->sizes()) + " but the model has " + c10::str(at::IntArrayRef(expected)) +
                  "; use a new --out (or run.name) for this config");
    target.tensor.copy_(source_tensor);
  }
}

std::vector<fs::path> CheckpointFolder::list() const {
  std::vector<fs::path> files;
  std::error_code error;
  for (fs::directory_iterator entry(folder_, error), end; !error && entry != end; entry.increment(error))
    if (is_checkpoint_name(entry->path().filename().string())) files.push_back(entry->path());
  std::sort(files.begin(), files.end(), [](const fs::path& a, const fs::path& b) { return step_of(a) > step_of(b); });
  return files;
}

void CheckpointFolder::remove_unfinished() const {
  std::error_code error;
  for (fs::directory_iterator entry(folder_, error), end; !error && entry != end; entry.increment(error)) {
    const std::string name = entry->path().filename().string();
    if (!name.ends_with(".tmp") || !is_checkpoint_name(name.substr(0, name.size() - 4))) continue;
    std::error_code removed;
    if (fs::remove(entry->path(), removed); removed)
      logger().warn("cannot remove the unfinished checkpoint {}: {}", entry->path().string(), removed.message());
    else
      logger().info("removed {}: an unfinished save of a stopped run", entry->path().string());
  }
}

fs::path CheckpointFolder::save(int64_t step, const std::vector<NamedTensor>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  std::error_code error;
  if (fs::create_directories(folder_, error)) sync_folder(folder_.parent_path(), folder_.string());
  if (error) throw Error("cannot create the checkpoint folder '" + folder_.string() + "': " + describe_error(error.value()));
  remove_unfinished();  // before writing: their space may be what this save needs
  char name[40];
  std::snprintf(name, sizeof(name), "step_%09lld.safetensors", static_cast<long long>(step));
  const fs::path path = folder_ / name;
  try {
    save_safetensors(path.string(), tensors, metadata);
  } catch (const Error& failure) {
    const auto saved = list();
    throw Error(std::string(failure.what()) + (saved.empty() ? "; there is no earlier checkpoint"
                                                             : "; the newest complete checkpoint is " + saved.front().string() +
                                                                   " (rerunning the same command resumes from it)"));
  }
  // Only now that the new one is in place; never the one just written (a folder may hold a later
  // step from before checkpoint.resume = false).
  int64_t newer = 0;  // checkpoints newer than `file`
  for (const auto& file : list()) {
    if (newer++ < std::max<int64_t>(keep_, 1) || file == path) continue;
    std::error_code removed;
    if (fs::remove(file, removed); removed) logger().warn("cannot remove the old checkpoint {}: {}", file.string(), removed.message());
  }
  return path;
}

std::optional<std::pair<fs::path, SafetensorsFile>> CheckpointFolder::load_latest() const {
  for (const auto& path : list()) {
    try {
      return std::pair{path, load_safetensors(path.string())};
    } catch (const Error& error) {
      logger().error("skipping checkpoint: {}", error.what());
    }
  }
  return std::nullopt;
}

}  // namespace pithtrain
