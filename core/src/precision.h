// The parameters the optimizer trains: float32 master copies of a bfloat16 model, train.freeze, and
// the parameter groups the logs and gradient norms are reported by.
#pragma once
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

struct MasterWeights {
  std::vector<Parameter> model;   // the model's, in the compute dtype
  std::vector<Parameter> master;  // float32 copies the optimizer updates (the same tensors in float32 runs)
  bool mixed_precision = false;

  // bf16 runs: the model takes the rounded float32 masters.
  void copy_master_to_model();
  // bf16 runs: the master copies take the model's gradients in float32.
  void gradients_to_master();
  // Whether `name` is a master weight (parameters and router buffers share the model's state names).
  bool is_parameter(const std::string& name) const;
};

// Master copies of `parameters` (float32 clones when the compute dtype is not float32).
MasterWeights make_master_weights(const std::vector<Parameter>& parameters, bool mixed_precision);

// train.freeze: parameters whose names match a pattern (`*` matches anything) keep their values. Stops
// their gradients and returns the trainable master weights; `frozen` gets the frozen names. Throws Error
// (at `where`) for a pattern that matches nothing or when nothing is left to train.
std::vector<Parameter> apply_freeze(MasterWeights& weights, const std::vector<std::string>& patterns,
                                    const std::string& where, std::set<std::string>& frozen);

// The group a parameter belongs to, for the trainable-parameter table and the gradient norms.
std::string parameter_group(const std::string& name);

// group -> (trainable, total) elements.
using ParameterGroups = std::map<std::string, std::pair<int64_t, int64_t>>;
ParameterGroups count_parameter_groups(const std::vector<Parameter>& parameters, const std::set<std::string>& frozen);

}  // namespace pithtrain
