// Gradients after the backward: averaged over the data ranks, their norm by parameter group over the
// whole model (every layout's pieces), and clipping.
#pragma once
#include <map>
#include <set>
#include <string>
#include <vector>

#include "distributed.h"
#include "mesh.h"
#include "precision.h"

namespace pithtrain {

// Averages the gradients over the data ranks (unless the schedule did), moves them to the master weights,
// fills `norms_by_group` with each parameter group's norm and clips the total to `grad_clip` (0: off).
// Returns the total norm before clipping. `flat_shards`: model entries that are a fully sharded shard.
double reduce_and_clip_gradients(MasterWeights& weights, const ProcessGroups& groups, const StagePlan& plan,
                                 const std::set<std::string>& frozen,
                                 const std::map<std::string, std::vector<int64_t>>& flat_shards,
                                 bool schedule_reduces_gradients, const ParameterGroups& parameter_groups, double grad_clip,
                                 std::map<std::string, double>& norms_by_group);

}  // namespace pithtrain
