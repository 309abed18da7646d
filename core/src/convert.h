// `pithtrain convert`: Hugging Face model folders (config.json + safetensors) to PithTrain configs and
// weights, and back. Architectures: kArchitectures in convert_architectures.cpp (docs/models.md).
#pragma once
#include <string>

namespace pithtrain {

// Writes OUT/config.toml (a complete training config) and OUT/model.safetensors (PithTrain names).
// Throws Error naming the tensor and file for missing, unexpected or mis-shaped tensors, and the key for
// unsupported architectures or features. Reads and writes one tensor at a time: memory for the largest
// (stacked) tensor, not for a shard or the model.
void import_hf(const std::string& hf_dir, const std::string& out_dir);

// Writes OUT/config.json and OUT/model.safetensors in the Hugging Face layout of `config`'s
// model.hf_architecture, from PithTrain weights `weights` (a model.safetensors or a checkpoint).
void export_hf(const std::string& config, const std::string& weights, const std::string& out_dir);

}  // namespace pithtrain
