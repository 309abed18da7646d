// The routing trace file: a 32-byte header, then fixed-size records (one per step).
#include "routing_trace.h"

#include <cstring>
#include <filesystem>

#include <ATen/ATen.h>

#include "pithtrain/error.h"

namespace pithtrain {

std::pair<RoutingTraceHeader, std::vector<RoutingTrace::Record>> RoutingTrace::read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open routing trace '" + path + "'");
  RoutingTraceHeader header{};
  in.read(reinterpret_cast<char*>(&header), sizeof(header));
  if (!in || std::memcmp(header.magic, "PTROUTE1", 8) != 0 || header.version != 1)
    throw Error("'" + path + "' is not a PithTrain routing trace (version 1)");
  std::vector<Record> records;
  const size_t counts = static_cast<size_t>(header.moe_layers) * header.experts;
  while (true) {
    Record record{};
    in.read(reinterpret_cast<char*>(&record.step), 8);
    if (in.gcount() == 0) break;
    record.counts.resize(counts);
    in.read(reinterpret_cast<char*>(record.counts.data()), static_cast<std::streamsize>(counts * 4));
    if (!in) throw Error("routing trace '" + path + "' ends inside a record (truncated)");
    records.push_back(std::move(record));
  }
  return {header, records};
}

RoutingTrace::RoutingTrace(const std::string& path, int64_t moe_layers, int64_t experts, int64_t start_step)
    : path_(path), moe_layers_(moe_layers), experts_(experts) {
  std::vector<Record> kept;
  if (start_step > 0 && std::filesystem::exists(path)) {
    auto [header, records] = read(path);
    if (header.moe_layers != moe_layers || header.experts != experts)
      throw Error("routing trace '" + path + "' was written for another model shape; pass a new --trace-routing file");
    for (auto& record : records)
      if (record.step <= start_step) kept.push_back(std::move(record));
  }
  out_.open(path, std::ios::binary | std::ios::trunc);
  if (!out_) throw Error("cannot write routing trace '" + path + "'");
  RoutingTraceHeader header{};
  std::memcpy(header.magic, "PTROUTE1", 8);
  header.version = 1;
  header.moe_layers = static_cast<uint32_t>(moe_layers);
  header.experts = static_cast<uint32_t>(experts);
  out_.write(reinterpret_cast<const char*>(&header), sizeof(header));
  for (const auto& record : kept) {
    out_.write(reinterpret_cast<const char*>(&record.step), 8);
    out_.write(reinterpret_cast<const char*>(record.counts.data()), static_cast<std::streamsize>(record.counts.size() * 4));
  }
  out_.flush();
}

void RoutingTrace::record(int64_t step, const std::vector<at::Tensor>& tokens_per_expert) {
  std::vector<uint32_t> counts(static_cast<size_t>(moe_layers_ * experts_), 0);
  for (size_t layer = 0; layer < tokens_per_expert.size() && layer < static_cast<size_t>(moe_layers_); ++layer) {
    at::Tensor load = tokens_per_expert[layer].to(at::kCPU).to(at::kLong).contiguous();
    for (int64_t e = 0; e < std::min<int64_t>(experts_, load.numel()); ++e)
      counts[layer * experts_ + e] = static_cast<uint32_t>(load.data_ptr<int64_t>()[e]);
  }
  out_.write(reinterpret_cast<const char*>(&step), 8);
  out_.write(reinterpret_cast<const char*>(counts.data()), static_cast<std::streamsize>(counts.size() * 4));
  out_.flush();
}

}  // namespace pithtrain
