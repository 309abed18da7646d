// Process-group set-up over c10d (TCPStore rendezvous, ProcessGroupGloo) and the local launcher.
#include "distributed.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>

#include <numeric>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "pithtrain/error.h"

namespace pithtrain {
namespace {

std::optional<int64_t> integer_from(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  try {
    return std::stoll(value);
  } catch (const std::exception&) {
    throw Error(std::string("environment variable ") + name + "='" + value + "' is not an integer");
  }
}

// Gloo's network device: GLOO_SOCKET_IFNAME (as in PyTorch) names the interface; without it, loopback
// when rank 0 is this machine's loopback address, else the interface this host's name resolves to.
std::shared_ptr<gloo::transport::Device> gloo_device(const std::string& master_address) {
  if (const char* interface = std::getenv("GLOO_SOCKET_IFNAME"); interface && *interface)
    return c10d::ProcessGroupGloo::createDeviceForInterface(interface);
  if (master_address == "127.0.0.1" || master_address == "localhost")
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

// One c10d process group: Gloo for CPU runs, NCCL for CUDA runs; everything but the construction is
// the same code. Sub-groups (the expert group) share the job's TCPStore under a prefix.
class ProcessGroupCommunicator final : public Communicator {
 public:
  ProcessGroupCommunicator(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t size, double timeout_seconds,
                           c10::Device device, const std::string& master_address)
      : rank_(rank), size_(size), device_(device) {
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
    if (device.is_cuda()) {
#ifdef USE_C10D_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(rank_), static_cast<int>(size_), options);
#else
      throw Error("this build of pithtrain has no NCCL (built without CUDA); multi-process CUDA runs need a CUDA build");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create();
      options->timeout = timeout;
      options->devices.push_back(gloo_device(master_address));
      group_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(rank_), static_cast<int>(size_), options);
    }
  }
  ~ProcessGroupCommunicator() override { group_->shutdown(); }

  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  void all_reduce_sum(std::vector<at::Tensor>& tensors) override {
    if (tensors.empty()) return;
    // One flat buffer: one collective per call, whatever the number of tensors.
    std::vector<at::Tensor> flat_parts;
    for (const auto& tensor : tensors) flat_parts.push_back(tensor.reshape(-1).to(device_, at::kFloat));
    std::vector<at::Tensor> buffer = {at::cat(flat_parts)};
    group_->allreduce(buffer)->wait();
    int64_t offset = 0;
    for (auto& tensor : tensors) {
      tensor.copy_(buffer[0].narrow(0, offset, tensor.numel()).view_as(tensor));  // back to the tensor's device
      offset += tensor.numel();
    }
  }
  at::Tensor all_to_all(const at::Tensor& input, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& receive_counts) override;
  at::Tensor all_gather(const at::Tensor& tensor) override {
    std::vector<at::Tensor> input = {tensor.to(device_).contiguous()};
    std::vector<std::vector<at::Tensor>> output(1);
    for (int64_t rank = 0; rank < size_; ++rank) output[0].push_back(at::empty_like(input[0]));
    group_->allgather(output, input)->wait();
    return at::cat(output[0], 0).to(tensor.device());
  }

  at::Tensor reduce_scatter_sum(const at::Tensor& input) override {
    if (input.dim() == 0 || input.size(0) % size_ != 0)
      throw Error("reduce_scatter_sum: dimension 0 of the input (" + c10::str(input.sizes()) + ") must be a multiple of " +
                  std::to_string(size_) + " ranks");
    at::Tensor contiguous = input.to(device_).contiguous();
    std::vector<int64_t> shape = contiguous.sizes().vec();
    shape[0] /= size_;
    at::Tensor output = at::empty(shape, contiguous.options());
    group_->_reduce_scatter_base(output, contiguous)->wait();
    return output.to(input.device());
  }

  struct PendingWork final : PendingCollective {
    c10::intrusive_ptr<c10d::Work> work;
    std::vector<at::Tensor> tensors;  // kept alive while the operation runs
    void wait() override { work->wait(); }
  };

  std::unique_ptr<PendingCollective> start_send(at::Tensor tensor, int64_t to, int64_t tag) override {
    auto pending = std::make_unique<PendingWork>();
    pending->tensors = {tensor.to(device_).contiguous()};
    pending->work = group_->send(pending->tensors, static_cast<int>(to), static_cast<int>(tag));
    return pending;
  }

  at::Tensor receive(const std::vector<int64_t>& shape, c10::ScalarType dtype, int64_t from, int64_t tag) override {
    std::vector<at::Tensor> tensors = {at::empty(shape, at::TensorOptions().dtype(dtype).device(device_))};
    group_->recv(tensors, static_cast<int>(from), static_cast<int>(tag))->wait();
    return tensors[0];
  }

  std::unique_ptr<PendingCollective> start_all_reduce_sum(at::Tensor buffer) override {
    if (!buffer.is_contiguous() || buffer.scalar_type() != at::kFloat || buffer.device() != device_)
      throw Error("start_all_reduce_sum: the buffer must be a contiguous float32 tensor on " + device_.str());
    auto pending = std::make_unique<PendingWork>();
    pending->tensors = {buffer};
    pending->work = group_->allreduce(pending->tensors);
    return pending;
  }

  // The plain exchange, no autograd.
  at::Tensor exchange(const at::Tensor& input, std::vector<int64_t> send_counts, std::vector<int64_t> receive_counts) {
    if (static_cast<int64_t>(send_counts.size()) != size_ || static_cast<int64_t>(receive_counts.size()) != size_)
      throw Error("all_to_all: " + std::to_string(size_) + " ranks but " + std::to_string(send_counts.size()) +
                  " send and " + std::to_string(receive_counts.size()) + " receive counts");
    const int64_t sent = std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0});
    if (sent != input.size(0))
      throw Error("all_to_all: the send counts add up to " + std::to_string(sent) + " rows but the input has " +
                  std::to_string(input.size(0)));
    std::vector<int64_t> shape = input.sizes().vec();
    shape[0] = std::accumulate(receive_counts.begin(), receive_counts.end(), int64_t{0});
    at::Tensor contiguous = input.to(device_).contiguous();
    at::Tensor output = at::empty(shape, contiguous.options());
    group_->alltoall_base(output, contiguous, receive_counts, send_counts)->wait();
    return output.to(input.device());
  }

 private:
  int64_t rank_, size_;
  c10::Device device_;  // where the collectives run: the CPU (Gloo) or this rank's GPU (NCCL)
  c10::intrusive_ptr<c10d::Backend> group_;
};

// all_to_all with a backward: the gradient of the received rows goes back to where they came from.
struct AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* context, const at::Tensor& input, int64_t communicator,
                            std::vector<int64_t> send_counts, std::vector<int64_t> receive_counts) {
    // The communicator lives as long as the trainer, longer than any graph (saved as an address
    // because saved_data holds IValues).
    context->saved_data["communicator"] = communicator;
    context->saved_data["send_counts"] = send_counts;
    context->saved_data["receive_counts"] = receive_counts;
    return reinterpret_cast<ProcessGroupCommunicator*>(communicator)->exchange(input, send_counts, receive_counts);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* communicator = reinterpret_cast<ProcessGroupCommunicator*>(context->saved_data["communicator"].toInt());
    at::Tensor grad_input = communicator->exchange(grad_outputs[0], context->saved_data["receive_counts"].toIntVector(),
                                                   context->saved_data["send_counts"].toIntVector());
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor ProcessGroupCommunicator::all_to_all(const at::Tensor& input, const std::vector<int64_t>& send_counts,
                                        const std::vector<int64_t>& receive_counts) {
  if (!input.requires_grad() || !at::GradMode::is_enabled()) return exchange(input, send_counts, receive_counts);
  return AllToAllFunction::apply(input, reinterpret_cast<int64_t>(this), send_counts, receive_counts);
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0)
    throw Error("launch: cannot find a free TCP port on 127.0.0.1 for the rendezvous");
  ::close(fd);
  return ntohs(address.sin_port);
}

}  // namespace

std::optional<ProcessEnvironment> process_environment() {
  ProcessEnvironment environment;
  auto world = integer_from("WORLD_SIZE"), rank = integer_from("RANK");
  if (!world) world = integer_from("SLURM_NTASKS"), rank = integer_from("SLURM_PROCID");
  if (!world || *world <= 1) return std::nullopt;
  if (!rank || *rank < 0 || *rank >= *world)
    throw Error("WORLD_SIZE (or SLURM_NTASKS) is " + std::to_string(*world) + " but RANK (or SLURM_PROCID) is " +
                (rank ? std::to_string(*rank) : std::string("unset")) + "; set a rank in [0, world size)");
  environment.world_size = *world;
  environment.rank = *rank;
  environment.local_rank = integer_from("LOCAL_RANK").value_or(integer_from("SLURM_LOCALID").value_or(*rank));
  if (const char* address = std::getenv("MASTER_ADDR"); address && *address) environment.master_address = address;
  environment.master_port = static_cast<int>(integer_from("MASTER_PORT").value_or(29500));
  return environment;
}

ProcessGroups connect(const ProcessEnvironment& environment, const std::string& device, double timeout_seconds,
                      int64_t expert_size, int64_t pipeline_size, int64_t context_size) {
  // CUDA: NCCL on this rank's GPU (the trainer has made `device` cuda:LOCAL_RANK).
  const c10::Device collective_device = device == "cpu" ? c10::Device(c10::kCPU) : c10::Device(device);
  const int64_t rank = environment.rank, world = environment.world_size;
  if (pipeline_size < 1 || world % pipeline_size != 0)
    throw Error("parallel.pipeline = " + std::to_string(pipeline_size) + " does not divide the " + std::to_string(world) + " processes");
  const int64_t data_size = world / pipeline_size, stage = rank / data_size, data_rank = rank % data_size;
  if (context_size < 1 || data_size % context_size != 0)
    throw Error("parallel.context = " + std::to_string(context_size) + " does not divide the " + std::to_string(data_size) +
                " ranks of a pipeline stage");
  if (expert_size < 1 || data_size % expert_size != 0)
    throw Error("parallel.expert = " + std::to_string(expert_size) + " does not divide the " + std::to_string(data_size) +
                " data-parallel ranks");
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(environment.master_port);
  store_options.isServer = rank == 0;
  store_options.numWorkers = static_cast<size_t>(world);
  store_options.waitWorkers = true;
  store_options.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(environment.master_address, store_options);
  auto group = [&](const std::string& name, int64_t group_rank, int64_t size) -> std::shared_ptr<Communicator> {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
    return std::make_shared<ProcessGroupCommunicator>(prefixed, group_rank, size, timeout_seconds, collective_device,
                                                      environment.master_address);
  };
  ProcessGroups groups;
  groups.world = std::make_shared<ProcessGroupCommunicator>(store, rank, world, timeout_seconds, collective_device, environment.master_address);
  groups.data = groups.world;
  if (pipeline_size > 1) {
    groups.data = group("data_" + std::to_string(stage), data_rank, data_size);
    groups.pipeline = group("pipeline_" + std::to_string(data_rank), stage, pipeline_size);
  }
  if (context_size > 1)
    groups.context = group("context_" + std::to_string(stage) + "_" + std::to_string(data_rank / context_size),
                           data_rank % context_size, context_size);
  // Expert groups: consecutive data ranks (docs/distributed.md); expert-data groups: the data ranks at
  // the same place in their expert group, which hold the same experts.
  const std::string stage_prefix = pipeline_size > 1 ? std::to_string(stage) + "_" : "";
  if (expert_size > 1)
    groups.expert = group("expert_" + stage_prefix + std::to_string(data_rank / expert_size), data_rank % expert_size, expert_size);
  if (expert_size > 1 && expert_size < data_size)
    groups.expert_data = group("expert_data_" + stage_prefix + std::to_string(data_rank % expert_size), data_rank / expert_size,
                               data_size / expert_size);
  return groups;
}

int launch(const LaunchPlan& plan, const std::vector<std::string>& arguments) {
  const int64_t processes = plan.processes;
  if (processes < 1) throw Error("launch: --nproc must be at least 1");
  if (plan.nodes < 1 || plan.node_rank < 0 || plan.node_rank >= plan.nodes)
    throw Error("launch: --node-rank " + std::to_string(plan.node_rank) + " is not in [0, --nnodes " + std::to_string(plan.nodes) + ")");
  if (plan.nodes > 1 && plan.master_port <= 0)
    throw Error("launch: --nnodes " + std::to_string(plan.nodes) + " needs --master ADDR:PORT (rank 0's machine and a free port, the same on every node)");
  const int port = plan.master_port > 0 ? plan.master_port : free_port();
  std::vector<std::string> argv_strings = {"/proc/self/exe"};
  argv_strings.insert(argv_strings.end(), arguments.begin(), arguments.end());
  char self[4096];
  const ssize_t length = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (length <= 0) throw Error("launch: cannot find this executable (/proc/self/exe)");
  self[length] = '\0';
  std::vector<pid_t> children;
  for (int64_t rank = 0; rank < processes; ++rank) {
    const pid_t pid = ::fork();
    if (pid < 0) throw Error("launch: fork failed");
    if (pid == 0) {
      ::setenv("RANK", std::to_string(plan.node_rank * processes + rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(plan.nodes * processes).c_str(), 1);
      ::setenv("MASTER_ADDR", plan.master_address.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      // Share the cores instead of every process starting one thread per core.
      const long cores = std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
      ::setenv("OMP_NUM_THREADS", std::to_string(std::max<long>(1, cores / processes)).c_str(), /*overwrite=*/0);
      std::vector<char*> argv;
      for (auto& argument : argv_strings) argv.push_back(argument.data());
      argv.push_back(nullptr);
      ::execv(self, argv.data());
      std::perror("pithtrain launch: exec");
      std::_Exit(127);
    }
    children.push_back(pid);
  }
  // Wait for every rank. After the first failure the others get 2 s to end on their own (a rank that
  // failed too reports its own status, not our signal), then SIGTERM (they save and stop at the next
  // step), then SIGKILL after 10 s more if one is stuck in a collective with a dead peer.
  using Clock = std::chrono::steady_clock;
  int result = 0;
  std::vector<bool> running(children.size(), true);
  size_t remaining = children.size();
  Clock::time_point term_at{}, kill_at{};
  bool termed = false;
  auto signal_running = [&](int signal) {
    for (size_t rank = 0; rank < children.size(); ++rank)
      if (running[rank]) ::kill(children[rank], signal);
  };
  while (remaining > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, result == 0 ? 0 : WNOHANG);
    if (pid < 0) break;
    if (pid == 0) {  // others still running after a failure
      if (!termed && Clock::now() >= term_at) signal_running(SIGTERM), termed = true;
      if (Clock::now() >= kill_at) signal_running(SIGKILL);
      ::usleep(50 * 1000);
      continue;
    }
    const size_t rank = std::find(children.begin(), children.end(), pid) - children.begin();
    if (rank < running.size()) running[rank] = false;
    --remaining;
    const bool failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    // Every failed rank is named: the one that failed first may be reaped after a peer that lost it.
    if (failed)
      std::cerr << "pithtrain launch: rank " << plan.node_rank * processes + rank << " of " << plan.nodes * processes << " "
                << (WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "was killed by signal " + std::to_string(WTERMSIG(status)))
                << (result == 0 ? "; stopping the other ranks" : "") << "\n";
    if (failed && result == 0) {
      result = 1;
      term_at = Clock::now() + std::chrono::seconds(2);
      kill_at = term_at + std::chrono::seconds(10);
    }
  }
  return result;
}

}  // namespace pithtrain
