// The safetensors format with PithTrain's whole-file checksum: whole files (checkpoints, small models)
// and, for files too large to hold, reading and writing one tensor at a time (`pithtrain convert import`).
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<NamedTensor> tensors;  // CPU tensors, in file order
  const at::Tensor* find(const std::string& name) const;
};

// Writes `tensors` (copied to CPU, contiguous) and `metadata` as safetensors. The metadata gains
// "producer", "checksum_scheme" = "fnv1a64-whole-file" and, first in the header, "file_checksum":
// FNV-1a 64 over the whole file read with those 16 hex digits as zeros (docs/training.md). Crash-safe:
// writes PATH.tmp, fsyncs it, renames it to PATH and fsyncs the folder, so PATH is always either the
// old file or the complete new one. Throws Error naming PATH (and "disk full" on ENOSPC/EDQUOT) on any
// failed write, flush, close or rename, after removing PATH.tmp.
void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      std::map<std::string, std::string> metadata = {});
// Reads a safetensors file and verifies its checksum: the whole file for the scheme above, the tensor
// bytes for files with the older metadata "checksum" (written before the whole-file scheme), nothing
// for foreign files without either. Throws Error naming the file, saying it is damaged.
SafetensorsFile load_safetensors(const std::string& path);

// One tensor's header entry. `begin` and `end` are byte offsets from the start of the file.
struct TensorEntry {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// A safetensors file read tensor by tensor: the header is parsed (and the checksums above verified, by
// reading the file in 16 MB pieces) when it is opened; read() then reads one tensor's bytes by offset, so
// the memory it takes is one tensor's, whatever the file's size. Throws Error naming the file, with the
// same messages as load_safetensors, for a damaged, truncated or foreign file.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(std::string path);
  SafetensorsReader(SafetensorsReader&& other) noexcept;
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;
  ~SafetensorsReader();

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorEntry>& tensors() const { return tensors_; }  // in header order
  const TensorEntry* find(const std::string& name) const;
  at::Tensor read(const TensorEntry& entry) const;  // a new CPU tensor
  // Reads into `out` (a contiguous CPU tensor of the entry's dtype and element count, e.g. one slice of a stack).
  void read_into(const TensorEntry& entry, const at::Tensor& out) const;

 private:
  std::string path_;
  int fd_ = -1;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorEntry> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
};

// A safetensors file written tensor by tensor, byte-identical to save_safetensors of the same tensors and
// metadata. The header needs every name, dtype and shape, so they come first (`layout`, in file order:
// TensorEntry's offsets are ignored); then write() takes each tensor in that order, hashing and writing it
// at once, and commit() stores the checksum and puts the file in place (PATH.tmp renamed, as above).
// Destroyed without commit(), it removes PATH.tmp and leaves any earlier PATH untouched.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<TensorEntry>& layout, std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  void write(const std::string& name, const at::Tensor& tensor);  // the next tensor of `layout`
  void commit();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Flushes a folder's entries (a rename, a new file) to disk; throws Error naming `saving` when it cannot.
void sync_folder(const std::filesystem::path& folder, const std::string& saving);
// strerror(error), with "disk full" for ENOSPC and EDQUOT.
std::string describe_error(int error);

}  // namespace pithtrain
