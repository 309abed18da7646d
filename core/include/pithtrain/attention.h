// Interface of an `attention` plugin: the token-mixing variant of a decoder layer.
#pragma once
#include <vector>

#include "pithtrain/plugin.h"

namespace pithtrain {

// What one layer keeps of the tokens a batch of sequences has seen so far, for incremental decoding
// (`pithtrain generate`). The core makes one empty cache per layer and generation, hands it back
// unchanged on every call, and adds the new tokens to `length` after each call; the tensors are the
// plugin's own (e.g. gqa: keys and values [B, kv, T, D]; mla: the latent [B, T, c] and rotary key [B, T, r]).
struct AttentionCache {
  std::vector<at::Tensor> tensors;
  int64_t length = 0;  // tokens seen before this call: the positions 0 .. length - 1
};

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

  // True when forward_cached() is implemented. Without a cache path generation still works: the core
  // then runs forward() over the whole prefix for every new token (the same tokens, only slower).
  virtual bool supports_cache() const { return false; }
  // Incremental decoding, called without gradients and never with a context group: hidden
  // [batch, new, hidden_size] are the next `new` tokens of the sequences `cache` holds, at positions
  // [new] = cache.length .. cache.length + new - 1. Returns [batch, new, hidden_size], equal up to
  // rounding to the last `new` rows of forward() over the whole prefix, and stores what later tokens
  // need in cache.tensors (the core, not the plugin, advances cache.length).
  virtual at::Tensor forward_cached(const at::Tensor& /*hidden*/, const at::Tensor& /*positions*/, AttentionCache& /*cache*/) {
    throw Error("this attention plugin has no cache path (supports_cache() is false); call forward() over the whole prefix");
  }
};

}  // namespace pithtrain
