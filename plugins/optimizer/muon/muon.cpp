// Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024) with the update
// scale of Moonlight (Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982) for the weight
// matrices, and AdamW for the other parameters (embedding, LM head, norms, biases, router gates).
//
// For a matrix W [out, in] with gradient G (a tensor [..., out, in] is that many matrices, one per
// leading index, so each expert of an [E, out, in] weight is orthogonalised on its own):
//   m = mu m + (1 - mu) G;  U = (1 - mu) G + mu m (Nesterov) or m;  O = NS5(U);
//   W = W (1 - lr wd) - lr s O,  s = 0.2 sqrt(max(out, in)) ("match_rms_adamw") or sqrt(max(1, out / in)).
// NS5: X = U / max(||U||_F, eps), then 5 times X = a X + (b A + c A^2) X with A = X X^T and
// (a, b, c) = (3.4445, -4.7750, 2.0315). Keller Jordan writes m = mu m + G; the average above is that
// times (1 - mu) and NS5 divides by the norm first, so the two give the same O (but for the eps floor).
#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include "pithtrain/distributed.h"
#include "pithtrain/optimizer.h"

namespace pithtrain {
namespace {

// The quintic Newton-Schulz coefficients of Keller Jordan's post: chosen for a steep slope at 0, so that
// 5 steps lift even small singular values near 1 (to roughly 0.5-1.5 rather than exactly 1, which his
// experiments found does not hurt training), where an exactly converging iteration needs many more.
constexpr double kA = 3.4445, kB = -4.7750, kC = 2.0315;

// A parameter's role decides which rule updates it. Norms, biases and other vectors are marked
// weight_decay = false by the core and the plugins that create them; the rest is told apart by the
// core's names.
enum class Role { vector, embedding, lm_head, router_gate, expert_matrix, matrix };

Role role_of(const Parameter& parameter) {
  const std::string& name = parameter.name;
  if (!parameter.weight_decay) return Role::vector;
  if (name == "embedding.weight") return Role::embedding;
  if (name == "lm_head.weight") return Role::lm_head;
  if (name.find(".router.") != std::string::npos) return Role::router_gate;
  if (name.find(".experts.") != std::string::npos) return Role::expert_matrix;
  return Role::matrix;
}

class Muon final : public Optimizer {
 public:
  Muon(Options& options, const PluginContext& context) : parameters_(context.parameters) {
    momentum_ = options.number("momentum", 0.95, Range::half_open(0, 1));
    nesterov_ = options.boolean("nesterov", true);
    ns_steps_ = options.integer("ns_steps", 5, Range::at_least(1));
    eps_ = options.number("eps", 1e-7, Range::above(0));
    weight_decay_ = options.number("weight_decay", 0.1, Range::at_least(0));
    adjust_lr_ = options.text("adjust_lr", "match_rms_adamw");
    options.require("adjust_lr", adjust_lr_ == "match_rms_adamw" || adjust_lr_ == "original",
                    "\"match_rms_adamw\" (0.2 sqrt(max(out, in)), AdamW's learning rate works) or \"original\" "
                    "(sqrt(max(1, out / in)), Keller Jordan's)");
    const std::string ns_dtype = options.text("ns_dtype", "bfloat16");
    options.require("ns_dtype", ns_dtype == "bfloat16" || ns_dtype == "float32" || ns_dtype == "float64",
                    "\"bfloat16\", \"float32\" or \"float64\"");
    ns_dtype_ = ns_dtype == "bfloat16" ? at::kBFloat16 : ns_dtype == "float32" ? at::kFloat : at::kDouble;
    adamw_beta1_ = options.number("adamw_beta1", 0.9, Range::half_open(0, 1));
    adamw_beta2_ = options.number("adamw_beta2", 0.95, Range::half_open(0, 1));
    adamw_eps_ = options.number("adamw_eps", 1e-8, Range::above(0));

    // Which rule each role takes: a documented default, overridable per role (norms and biases are
    // vectors, which Muon cannot orthogonalise, so they have no key).
    struct RoleKey { Role role; const char* key; const char* fallback; };
    static constexpr RoleKey kRoleKeys[] = {{Role::matrix, "matrices", "muon"}, {Role::expert_matrix, "expert_matrices", "muon"},
                                            {Role::embedding, "embedding", "adamw"}, {Role::lm_head, "lm_head", "adamw"},
                                            {Role::router_gate, "router_gate", "adamw"}};
    std::map<Role, std::pair<std::string, bool>> takes_muon;  // role -> its key, whether Muon updates it
    for (const RoleKey& entry : kRoleKeys) {
      const std::string rule = options.text(entry.key, entry.fallback);
      options.require(entry.key, rule == "muon" || rule == "adamw", "\"muon\" or \"adamw\"");
      takes_muon[entry.role] = {entry.key, rule == "muon"};
    }

    // schedule fully_sharded hands every parameter over as a flat 1-D shard: no matrix is left to
    // orthogonalise, and the shard does not say its shape. Refuse rather than silently run AdamW.
    const bool any_matrix = std::any_of(parameters_.begin(), parameters_.end(), [](const Parameter& p) { return p.tensor.dim() >= 2; });
    int64_t muon_tensors = 0, muon_elements = 0;
    for (const auto& parameter : parameters_) {
      const Role role = role_of(parameter);
      bool muon = role != Role::vector && takes_muon.at(role).second;
      if (muon && !any_matrix)
        throw Error("optimizer 'muon': parameter '" + parameter.name + "' (optimizer." + takes_muon.at(role).first +
                    " = \"muon\") is a flat 1-D tensor of " + std::to_string(parameter.tensor.numel()) +
                    " elements, and so is every other parameter: schedule.plugin = \"fully_sharded\" hands the optimizer "
                    "flat shards, and Muon orthogonalises whole matrices. Use schedule.plugin = \"single\" or "
                    "\"data_parallel\" with optimizer.plugin = \"muon\", or keep fully_sharded with optimizer.plugin = \"adamw\"");
      muon = muon && parameter.tensor.dim() >= 2;  // a decayed vector (not a model's matrix) takes AdamW
      uses_muon_.push_back(muon);
      if (muon) {
        momentum_buffer_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
        exp_avg_.emplace_back(), exp_avg_sq_.emplace_back(), steps_.emplace_back();
        ++muon_tensors, muon_elements += parameter.tensor.numel();
      } else {
        momentum_buffer_.emplace_back();
        exp_avg_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
        exp_avg_sq_.push_back(at::zeros_like(parameter.tensor, at::MemoryFormat::Contiguous).detach());
        steps_.push_back(at::zeros({}, at::kLong));
      }
    }
    if (context.logger != nullptr && (!context.communicator || context.communicator->rank() == 0))
      context.logger->info("optimizer muon: Muon updates {} matrix tensor(s) ({} elements), AdamW the other {}", muon_tensors,
                           muon_elements, static_cast<int64_t>(parameters_.size()) - muon_tensors);
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    std::map<std::tuple<bool, int, std::string>, std::vector<size_t>> adamw_groups;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const at::Tensor& param = parameters_[i].tensor;
      if (!param.grad().defined()) continue;
      if (uses_muon_[i]) {
        muon_step(param, momentum_buffer_[i], lr);
      } else {
        adamw_groups[{parameters_[i].weight_decay && weight_decay_ != 0, static_cast<int>(param.scalar_type()), param.device().str()}]
            .push_back(i);
      }
    }
    // AdamW as the adamw plugin runs it: LibTorch's fused kernel, one call per group sharing weight
    // decay, dtype and device.
    for (const auto& [key, members] : adamw_groups) {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
      for (size_t i : members) {
        steps_[i] += 1;
        params.push_back(parameters_[i].tensor), grads.push_back(parameters_[i].tensor.grad());
        exp_avgs.push_back(exp_avg_[i]), exp_avg_sqs.push_back(exp_avg_sq_[i]);
        steps.push_back(steps_[i].to(at::TensorOptions().dtype(at::kFloat).device(parameters_[i].tensor.device())));
      }
      at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, {}, steps, lr, adamw_beta1_, adamw_beta2_,
                        std::get<0>(key) ? weight_decay_ : 0.0, adamw_eps_, /*amsgrad=*/false, /*maximize=*/false);
    }
  }

  std::vector<NamedTensor> state() override {
    std::vector<NamedTensor> result;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      if (uses_muon_[i]) {
        result.push_back({parameters_[i].name + ".momentum", momentum_buffer_[i]});
      } else {
        result.push_back({parameters_[i].name + ".exp_avg", exp_avg_[i]});
        result.push_back({parameters_[i].name + ".exp_avg_sq", exp_avg_sq_[i]});
        result.push_back({parameters_[i].name + ".step", steps_[i]});
      }
    }
    return result;
  }

 private:
  void muon_step(const at::Tensor& param, at::Tensor& momentum, double lr) const {
    const at::Tensor& grad = param.grad();
    momentum.lerp_(grad, 1.0 - momentum_);  // mu m + (1 - mu) g
    at::Tensor update = nesterov_ ? grad.lerp(momentum, momentum_) : momentum;
    const int64_t rows = param.size(-2), cols = param.size(-1);
    at::Tensor orthogonal = orthogonalise(update.reshape({-1, rows, cols})).reshape(param.sizes());
    // Moonlight's scale gives O the RMS of a typical AdamW update (0.2), so AdamW's lr and wd carry over.
    const double scale = adjust_lr_ == "match_rms_adamw" ? 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)))
                                                         : std::sqrt(std::max(1.0, static_cast<double>(rows) / cols));
    param.mul_(1.0 - lr * weight_decay_);
    param.add_(orthogonal, -(lr * scale));
  }

  // NS5 on each matrix of u [N, rows, cols], in ns_dtype_. It works on the wide orientation (rows <=
  // cols) so the Gram matrix A is the smaller one; the Frobenius norm bounds the spectral norm by 1,
  // inside the interval where the iteration pushes singular values towards 1.
  at::Tensor orthogonalise(const at::Tensor& u) const {
    at::Tensor x = u.to(ns_dtype_);
    const bool tall = x.size(1) > x.size(2);
    if (tall) x = x.transpose(1, 2);
    x = x / at::norm(x, 2, {1, 2}, /*keepdim=*/true).clamp_min(eps_);
    for (int64_t i = 0; i < ns_steps_; ++i) {
      at::Tensor gram = at::bmm(x, x.transpose(1, 2));                         // A = X X^T      [N, r, r]
      at::Tensor poly = at::baddbmm(gram, gram, gram, /*beta=*/kB, /*alpha=*/kC);  // b A + c A^2 [N, r, r]
      x = at::baddbmm(x, poly, x, /*beta=*/kA);                                 // a X + poly X   [N, r, c]
    }
    return tall ? x.transpose(1, 2) : x;
  }

  std::vector<Parameter> parameters_;
  std::vector<bool> uses_muon_;
  // Per parameter: the Muon momentum, or AdamW's moments and step count (the other undefined).
  std::vector<at::Tensor> momentum_buffer_, exp_avg_, exp_avg_sq_, steps_;
  double momentum_ = 0.95, eps_ = 1e-7, weight_decay_ = 0.1;
  bool nesterov_ = true;
  int64_t ns_steps_ = 5;
  std::string adjust_lr_ = "match_rms_adamw";
  at::ScalarType ns_dtype_ = at::kBFloat16;
  double adamw_beta1_ = 0.9, adamw_beta2_ = 0.95, adamw_eps_ = 1e-8;
};

}  // namespace

std::unique_ptr<Optimizer> make_muon_optimizer(Options& options, const PluginContext& context) {
  return std::make_unique<Muon>(options, context);
}

}  // namespace pithtrain
