// Interface of an `attention` plugin: the token-mixing variant of a decoder layer.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

class Attention {
 public:
  virtual ~Attention() = default;
  // Causal self-attention over hidden [batch, seq, hidden_size] -> [batch, seq, hidden_size].
  // positions [seq] int64 are the token positions (for rotary embeddings).
  virtual at::Tensor forward(const at::Tensor& hidden, const at::Tensor& positions) = 0;
  // Projection weights (and any norms, with weight_decay = false).
  virtual std::vector<Parameter> parameters() = 0;
  // True when forward() handles PluginContext::context_group (a sequence split over ranks: `hidden`
  // holds this rank's tokens and `positions` their global positions), e.g. with ring_attention().
  virtual bool supports_context_parallel() const { return false; }
};

}  // namespace pithtrain
