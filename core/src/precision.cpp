// Master weights, freezing and parameter groups (precision.h).
#include "precision.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "pithtrain/error.h"

namespace pithtrain {

namespace {

// `*` matches any run of characters (dots included), everything else itself.
bool glob_match(const std::string& pattern, const std::string& text) {
  size_t p = 0, t = 0, star = std::string::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') star = p++, resume = t;
    else if (p < pattern.size() && pattern[p] == text[t]) ++p, ++t;
    else if (star != std::string::npos) p = star + 1, t = ++resume;
    else return false;
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

}  // namespace

MasterWeights make_master_weights(const std::vector<Parameter>& parameters, bool mixed_precision) {
  MasterWeights weights;
  weights.model = parameters;
  weights.mixed_precision = mixed_precision;
  for (const auto& parameter : parameters) {
    weights.master.push_back(parameter);
    if (mixed_precision) weights.master.back().tensor = parameter.tensor.detach().to(at::kFloat).clone();
  }
  return weights;
}

void MasterWeights::copy_master_to_model() {
  if (!mixed_precision) return;  // float32: the master weights are the model's own tensors
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < model.size(); ++i) model[i].tensor.copy_(master[i].tensor);
}

void MasterWeights::gradients_to_master() {
  if (!mixed_precision) return;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < model.size(); ++i)
    master[i].tensor.mutable_grad() = model[i].tensor.grad().defined() ? model[i].tensor.grad().to(at::kFloat) : at::Tensor();
}

bool MasterWeights::is_parameter(const std::string& name) const {
  return std::any_of(master.begin(), master.end(), [&](const Parameter& parameter) { return parameter.name == name; });
}

std::vector<Parameter> apply_freeze(MasterWeights& weights, const std::vector<std::string>& patterns,
                                    const std::string& where, std::set<std::string>& frozen) {
  std::vector<Parameter> trainable;
  std::vector<std::string> unmatched = patterns;
  for (size_t i = 0; i < weights.model.size(); ++i) {
    bool freeze = false;
    for (const auto& pattern : patterns)
      if (glob_match(pattern, weights.model[i].name)) {
        freeze = true;
        std::erase(unmatched, pattern);
      }
    if (freeze) {
      weights.model[i].tensor.requires_grad_(false);
      frozen.insert(weights.model[i].name);
    } else {
      trainable.push_back(weights.master[i]);
    }
  }
  if (!unmatched.empty())
    throw Error(where + ": train.freeze pattern '" + unmatched.front() +
                "' matches no parameter (names look like layers.1.router.gate.weight; * matches anything)");
  if (trainable.empty()) throw Error(where + ": train.freeze leaves no parameter to train");
  return trainable;
}

std::string parameter_group(const std::string& name) {
  for (const char* group : {"router", "shared_experts", "experts", "attention", "mlp"})
    if (name.find(std::string(".") + group + ".") != std::string::npos) return group;
  // Any other component of a layer (layers.N.<component>.x) but its norms: a layer type's attention
  // table (layers.N.linear_attention.x, model.layer_types) is a group of its own.
  if (name.rfind("layers.", 0) == 0) {
    const size_t start = name.find('.', 7) + 1, end = name.find('.', start);
    const std::string component = name.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (end != std::string::npos && !component.ends_with("_norm")) return component;
  }
  if (name.find("norm") != std::string::npos) return "norms";
  return name.substr(0, name.find('.'));  // embedding, lm_head
}

ParameterGroups count_parameter_groups(const std::vector<Parameter>& parameters, const std::set<std::string>& frozen) {
  ParameterGroups groups;
  for (const auto& parameter : parameters) {
    auto& [trainable, total] = groups[parameter_group(parameter.name)];
    total += parameter.tensor.numel();
    if (!frozen.count(parameter.name)) trainable += parameter.tensor.numel();
  }
  return groups;
}

}  // namespace pithtrain
