// TensorBoard event files written by the trainer itself (no Python, no protobuf library): every number of
// each metrics.jsonl line becomes a scalar in RUN_DIR/tensorboard/, kept in step with metrics.jsonl on resume.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "json.h"

namespace pithtrain {

// CRC-32C (Castagnoli), and the masked form TFRecord framing stores (rotated right by 15, plus 0xa282ead8).
uint32_t crc32c(const uint8_t* bytes, size_t count);
uint32_t masked_crc32c(const uint8_t* bytes, size_t count);

// The scalars of one metrics.jsonl record, in file order: each number under its path joined by '/'
// ("loss", "grad_norms/attention", "router/0/entropy"; array elements by index). Left out: "step" (the
// event's step), "moe_layer" (the index in the tag) and arrays of plain numbers (tokens_per_expert: one
// tag per expert swamps TensorBoard).
std::vector<std::pair<std::string, double>> metrics_scalars(const JsonValue& record);

class TensorBoardWriter {
 public:
  // Makes `folder` hold exactly one event file, written anew from `kept_metrics` (the metrics.jsonl lines a
  // resumed run keeps; none for a new run), with each step's wall time taken from the event files it
  // replaces where they have it. TensorBoard reads every event file of a folder, so the old ones are
  // removed: no stale or duplicated step survives a resume.
  TensorBoardWriter(const std::filesystem::path& folder, const std::vector<std::string>& kept_metrics);
  // Appends the scalars of `metrics_line` (one metrics.jsonl line) as step `step`, flushed.
  void write(int64_t step, const std::string& metrics_line);
  const std::filesystem::path& path() const { return path_; }

 private:
  void write_event(int64_t step, double wall_time, const std::string& metrics_line);
  void write_record(const std::string& event);

  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace pithtrain
