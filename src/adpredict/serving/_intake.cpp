// Native gRPC intake for adpredict (the Python module adpredict.serving._intake).
//
// Why: with grpc.aio every RPC costs the single Python event loop ~0.5 ms of CPU before a
// handler runs (measured on the 2-core development VM: 530 us per echo RPC, against 80 us for
// this C++ server), so Python's per-RPC cost, not TensorFlow, bounds a one-core server, and under
// overload requests queue in front of the event loop where no handler can refuse them.
//
// What it does: a grpc++ async server (one completion-queue thread, no GIL) receives every RPC
// as raw bytes. Calls the Python side cannot take are answered here at once:
//   * unknown method                     -> UNIMPLEMENTED
//   * shutting down                      -> UNAVAILABLE
//   * more than max_pending calls waiting for or held by Python -> RESOURCE_EXHAUSTED
//   * deadline already passed when Python would pick it up      -> DEADLINE_EXCEEDED
//   * a judged method (Predict) whose budget is shorter than the queue's present delay
//                                                               -> DEADLINE_EXCEEDED
// Each rule but the deadline's is applied when the call arrives, before its message is read
// (a refusal costs no read), and again once it is read. The rest wait in a FIFO. An eventfd
// becomes readable when the FIFO becomes non-empty; the Python event loop watches it and takes
// everything queued in one call (take), so the loop wakes once per burst, not once per RPC.
// Python answers each call exactly once (finish).
// Health (grpc.health.v1) is grpc++'s default health service; Python sets its status.
//
// Queue-delay admission (set_admission): the age of the oldest call pending (queued here or
// held by Python) is the queue's present delay; a call arriving now is answered about that late
// (FIFO), plus `margin_s` (Python publishes about one batch's compute). A call whose admission
// budget ends sooner is refused at arrival: its deadline, or `sla_s` from now if it has none,
// and never later than `cap_s` from now (Python sets it near the SLA with --admit-within-sla).
// So under overload the excess is refused here, without the GIL, instead of costing the Python
// loop a task each; at light load the oldest call is young and nothing is refused. No rate
// estimate is needed: the rule reads the delay the queue actually has.
//
// This module knows nothing of protobuf messages, models or batching: bytes in, bytes out.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

double monotonic_now() {  // the clock of Python's time.monotonic()
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

constexpr double kNoDeadline = std::numeric_limits<double>::infinity();

// Asks the kernel for a short time slice (EEVDF, Linux >= 6.12: sched_attr.sched_runtime of a
// SCHED_OTHER thread) so that this thread, woken by a new call, preempts a busy TensorFlow or
// Python thread on the same core instead of waiting for its slice to end. Allowed unprivileged;
// older kernels refuse it, or accept it without effect. Its effect is NOT shown:
// benchmarks/probe_wakeup.c (one core, two spinning threads, 1 ms sleeps) gave wake-up p99 of
// ~0.1 or ~0.6 ms from run to run with either slice on the development VM, and the overload runs
// changed other things at the same time. Returns whether the kernel accepted it.
bool PreferPromptWakeups() {
#ifdef SYS_sched_setattr
  struct {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
  } attr{};
  attr.size = sizeof(attr);  // SCHED_ATTR_SIZE_VER0 (48 bytes)
  attr.sched_policy = 0;     // SCHED_OTHER
  attr.sched_nice = getpriority(PRIO_PROCESS, 0);  // keep the thread's nice value
  attr.sched_runtime = 100'000;  // ns
  return syscall(SYS_sched_setattr, 0, &attr, 0) == 0;
#else
  return false;
#endif
}

class Intake;

// One RPC. Its address is the completion-queue tag; `id` is what Python holds.
struct Call {
  enum class State { kAwaitingCall, kReading, kQueued, kWithPython, kFinishing };
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  grpc::ByteBuffer request;
  State state = State::kAwaitingCall;
  uint64_t id = 0;
  int method = -1;
  double received_at = 0.0;
  double deadline = kNoDeadline;  // monotonic seconds
  // A started call is freed once both its last operation and its done notification
  // (AsyncNotifyWhenDone: the call ended, answered or cancelled) have come back.
  bool done = false;        // the done notification came back
  bool last_op_done = false;  // the final operation (or none, at shutdown) is over
};

// The done notification's tag: the call's address with the low bit set (Call is aligned).
void* done_tag(Call* call) {
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(call) | 1);
}

constexpr size_t kMaxMethods = 8;

// Per method index: calls answered here, never seen by Python.
struct Counters {
  std::atomic<uint64_t> received{0};
  std::atomic<uint64_t> unimplemented{0};
  std::atomic<uint64_t> read_failed{0};
  std::array<std::atomic<uint64_t>, kMaxMethods> refused_overloaded{};
  std::array<std::atomic<uint64_t>, kMaxMethods> refused_shutting_down{};
  std::array<std::atomic<uint64_t>, kMaxMethods> expired_before_pickup{};
  std::array<std::atomic<uint64_t>, kMaxMethods> cancelled_before_pickup{};
  std::array<std::atomic<uint64_t>, kMaxMethods> refused_queue_delay{};
};

py::list per_method(const std::array<std::atomic<uint64_t>, kMaxMethods>& counts, size_t n) {
  py::list out;
  for (size_t i = 0; i < n; ++i) out.append(counts[i].load());
  return out;
}

class Intake {
 public:
  Intake(std::string address, std::vector<std::string> methods, int max_pending,
         int max_message_bytes, bool reuse_port, std::string tls_cert, std::string tls_key,
         std::string tls_client_ca, std::vector<std::string> health_services,
         std::vector<int> judged_methods, int io_priority)
      : address_(std::move(address)),
        methods_(std::move(methods)),
        max_pending_(max_pending),
        max_message_bytes_(max_message_bytes),
        reuse_port_(reuse_port),
        tls_cert_(std::move(tls_cert)),
        tls_key_(std::move(tls_key)),
        tls_client_ca_(std::move(tls_client_ca)),
        health_services_(std::move(health_services)),
        io_priority_(io_priority) {
    if (io_priority_ < 0 || io_priority_ > sched_get_priority_max(SCHED_RR))
      throw std::invalid_argument("io_priority must be between 0 and " +
                                  std::to_string(sched_get_priority_max(SCHED_RR)));
    if (max_pending_ < 1) throw std::invalid_argument("max_pending must be >= 1");
    if (methods_.empty() || methods_.size() > kMaxMethods)
      throw std::invalid_argument("between 1 and 8 methods");
    for (int m : judged_methods) {
      if (m < 0 || m >= static_cast<int>(methods_.size()))
        throw std::invalid_argument("judged method index out of range");
      judged_[m] = true;
    }
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) throw std::runtime_error("eventfd() failed");
  }

  ~Intake() {
    if (server_) {
      py::gil_scoped_release release;
      Stop(0.0);
    }
    if (event_fd_ >= 0) close(event_fd_);
  }

  // Binds and starts serving; returns the bound port. Health starts NOT_SERVING.
  // With io_priority > 0 the calling thread runs at SCHED_RR io_priority while grpc++ starts
  // and this intake's thread is created, so that they (and the threads they start later)
  // inherit it: on a core shared with TensorFlow an arriving call is then read, judged and
  // answered before compute resumes. Needs CAP_SYS_NICE; without it nothing changes (see
  // Stats' io_realtime). The caller's own policy is restored.
  int Start() {
    if (server_) throw std::runtime_error("intake already started");
    int old_policy = SCHED_OTHER;
    sched_param old_param{};
    if (io_priority_ > 0 && pthread_getschedparam(pthread_self(), &old_policy, &old_param) == 0) {
      sched_param rt{};
      rt.sched_priority = io_priority_;
      io_realtime_ = pthread_setschedparam(pthread_self(), SCHED_RR, &rt) == 0;
    }
    struct Restore {
      Intake* self;
      int policy;
      sched_param param;
      ~Restore() {
        if (self->io_realtime_) pthread_setschedparam(pthread_self(), policy, &param);
      }
    } restore{this, old_policy, old_param};
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    std::shared_ptr<grpc::ServerCredentials> creds;
    if (tls_cert_.empty()) {
      creds = grpc::InsecureServerCredentials();
    } else {
      grpc::SslServerCredentialsOptions ssl(
          tls_client_ca_.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      ssl.pem_root_certs = tls_client_ca_;
      ssl.pem_key_cert_pairs.push_back({tls_key_, tls_cert_});
      creds = grpc::SslServerCredentials(ssl);
    }
    builder.AddListeningPort(address_, creds, &port_);
    builder.SetMaxReceiveMessageSize(max_message_bytes_);
    builder.SetMaxSendMessageSize(max_message_bytes_);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port_ ? 1 : 0);
    builder.RegisterAsyncGenericService(&service_);
    cq_ = builder.AddCompletionQueue();
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) {
      server_.reset();
      cq_.reset();
      throw std::runtime_error("cannot listen on " + address_);
    }
    SetServing(false);
    RequestNext();
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "adp-intake");  // for top -H, perf, py-spy
      if (!io_realtime_) short_slice_ = PreferPromptWakeups();  // (it would undo SCHED_RR)
      Poll();
    });
    return port_;
  }

  void SetServing(bool serving) {
    if (!server_) return;
    auto* health = server_->GetHealthCheckService();
    if (health == nullptr) return;
    for (const auto& name : health_services_) health->SetServingStatus(name, serving);
  }

  int EventFd() const { return event_fd_; }

  // Queue-delay admission for the judged methods (see the top of this file): `sla_s` is the
  // budget of a call without a deadline (<= 0 turns admission off, the default), `cap_s` the
  // most any call's budget counts (infinity: no cap), `margin_s` the compute still ahead of a
  // call that reaches the head of the queue.
  void SetAdmission(double sla_s, double cap_s, double margin_s) {
    if (!(margin_s >= 0)) throw std::invalid_argument("margin_s must be >= 0");
    if (!(cap_s > 0)) throw std::invalid_argument("cap_s must be > 0");
    std::lock_guard<std::mutex> lock(mu_);
    sla_s_ = sla_s > 0 ? sla_s : 0.0;
    cap_s_ = cap_s;
    margin_s_ = margin_s;
  }

  // Everything queued (up to max_items), as a list of (id, method index, payload,
  // received_at, deadline), and the ids of calls held by Python whose callers cancelled them
  // since the last take (Python should stop working on them and still finish them).
  // A queued call whose deadline passed, or whose caller cancelled, is answered here.
  py::tuple Take(int max_items) {
    std::vector<Call*> taken;
    std::vector<Call*> expired;
    std::vector<Call*> cancelled;
    std::vector<uint64_t> cancelled_ids;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const double now = monotonic_now();
      while (!queue_.empty() && static_cast<int>(taken.size()) < max_items) {
        Call* call = queue_.front();
        queue_.pop_front();
        if (call->deadline <= now) {  // (grpc also ends such a call: done may be set)
          expired.push_back(call);
          RefusedLocked(counters_.expired_before_pickup, call, now);
          continue;
        }
        if (call->done) {  // its caller cancelled it while it waited
          cancelled.push_back(call);
          RefusedLocked(counters_.cancelled_before_pickup, call, now);
          continue;
        }
        call->state = Call::State::kWithPython;
        with_python_.emplace(call->id, call);
        taken.push_back(call);
      }
      cancelled_ids.swap(cancelled_ids_);
      if (queue_.empty()) {
        uint64_t drained;
        while (read(event_fd_, &drained, sizeof(drained)) > 0) {
        }
      }
    }
    for (Call* call : expired) {
      FinishWithStatus(call, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                          "deadline passed before the server could take the "
                                          "request"));
    }
    for (Call* call : cancelled) {
      FinishWithStatus(call, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    }
    py::list out;
    for (Call* call : taken) {
      py::object deadline = std::isinf(call->deadline) ? py::object(py::none())
                                                       : py::object(py::float_(call->deadline));
      out.append(py::make_tuple(call->id, call->method, Payload(&call->request),
                                call->received_at, deadline));
      call->request.Clear();
    }
    py::list ids;
    for (uint64_t id : cancelled_ids) ids.append(id);
    return py::make_tuple(out, ids);
  }

  // The request's bytes as a Python bytes object, copied once from grpc's slices.
  static py::bytes Payload(grpc::ByteBuffer* request) {
    std::vector<grpc::Slice> slices;
    if (!request->Dump(&slices).ok()) return py::bytes();
    size_t total = 0;
    for (const auto& s : slices) total += s.size();
    PyObject* bytes = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
    if (bytes == nullptr) throw py::error_already_set();
    char* dst = PyBytes_AS_STRING(bytes);
    for (const auto& s : slices) {
      std::memcpy(dst, s.begin(), s.size());
      dst += s.size();
    }
    return py::reinterpret_steal<py::bytes>(bytes);
  }

  // Answers call `id`: code 0 sends `payload` with OK, any other code sends (code, details).
  void Finish(uint64_t id, int code, const std::string& details, const py::bytes& payload) {
    Call* call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = with_python_.find(id);
      if (it == with_python_.end())
        throw std::invalid_argument("call " + std::to_string(id) +
                                    " is not waiting for an answer (answered twice?)");
      call = it->second;
      with_python_.erase(it);
    }
    if (code == 0) {
      std::string_view view(payload);
      grpc::Slice slice(view.data(), view.size());
      grpc::ByteBuffer buffer(&slice, 1);
      FinishWithBody(call, buffer);
    } else {
      if (code < 0 || code > 16) code = static_cast<int>(grpc::StatusCode::INTERNAL);
      FinishWithStatus(call, grpc::Status(static_cast<grpc::StatusCode>(code), details));
    }
  }

  // Stops accepting (calls arriving from now on get UNAVAILABLE); calls already queued or
  // taken have `grace_s` to be taken and answered (keep calling take/finish meanwhile), then
  // grpc++ cancels the rest and the thread is joined. Safe to call twice. Call without the GIL.
  void Stop(double grace_s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!server_ || stopping_) return;
      stopping_ = true;
    }
    if (auto* health = server_->GetHealthCheckService()) health->Shutdown();
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6));
    server_->Shutdown(deadline);
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;  // from now on no op may be started (see FinishWithStatus)
    }
    cq_->Shutdown();
    if (thread_.joinable()) thread_.join();
    // The queue is drained: every done notification has come back. What was never answered
    // was cancelled by the shutdown.
    std::lock_guard<std::mutex> lock(mu_);
    for (Call* call : queue_) delete call;
    queue_.clear();
    for (auto& [id, call] : with_python_) delete call;
    with_python_.clear();
  }

  // Seconds from arrival to answer of every call the intake refused itself (the reasons of
  // Stats) since the last take, as one list per method index.
  py::list TakeTimings() {
    std::vector<std::pair<int, float>> timings;
    {
      std::lock_guard<std::mutex> lock(mu_);
      timings.swap(timings_);
    }
    std::vector<py::list> per(methods_.size());
    for (const auto& [method, seconds] : timings) per[method].append(seconds);
    py::list out;
    for (auto& l : per) out.append(l);
    return out;
  }

  py::dict Stats() {
    py::dict d;
    d["received"] = counters_.received.load();
    d["unimplemented"] = counters_.unimplemented.load();
    const size_t n = methods_.size();
    d["refused_overloaded"] = per_method(counters_.refused_overloaded, n);
    d["refused_shutting_down"] = per_method(counters_.refused_shutting_down, n);
    d["expired_before_pickup"] = per_method(counters_.expired_before_pickup, n);
    d["cancelled_before_pickup"] = per_method(counters_.cancelled_before_pickup, n);
    d["refused_queue_delay"] = per_method(counters_.refused_queue_delay, n);
    d["read_failed"] = counters_.read_failed.load();
    d["timings_dropped"] = timings_dropped_.load();
    d["short_slice"] = short_slice_.load();
    d["io_realtime"] = io_realtime_.load();
    std::lock_guard<std::mutex> lock(mu_);
    d["queued"] = queue_.size();
    d["with_python"] = with_python_.size();
    d["queue_delay_s"] = OldestAgeLocked(monotonic_now());
    return d;
  }

 private:
  void RequestNext() {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    Call* call = new Call;
    call->ctx.AsyncNotifyWhenDone(done_tag(call));
    service_.RequestCall(&call->ctx, &call->stream, cq_.get(), cq_.get(), call);
  }

  void Poll() {
    void* tag;
    bool ok;
    while (cq_->Next(&tag, &ok)) {
      const uintptr_t bits = reinterpret_cast<uintptr_t>(tag);
      if (bits & 1) {
        OnDone(reinterpret_cast<Call*>(bits & ~uintptr_t{1}));
        continue;
      }
      Call* call = static_cast<Call*>(tag);
      switch (call->state) {
        case Call::State::kAwaitingCall:
          if (!ok) {  // the server is shutting down; a call never started gets no done tag
            delete call;
            break;
          }
          RequestNext();
          OnCall(call);
          break;
        case Call::State::kReading:
          if (!ok) {
            counters_.read_failed++;
            FinishWithStatus(call, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                                "request: no request message received"));
            break;
          }
          OnRequest(call);
          break;
        case Call::State::kFinishing:
          LastOpDone(call);
          break;
        default:  // kQueued / kWithPython never wait on the queue
          break;
      }
    }
  }

  // The call ended (answered, or cancelled by its caller, its deadline or the shutdown).
  void OnDone(Call* call) {
    std::lock_guard<std::mutex> lock(mu_);
    call->done = true;
    if (call->state == Call::State::kWithPython && call->ctx.IsCancelled()) {
      const bool was_idle = queue_.empty() && cancelled_ids_.empty();
      cancelled_ids_.push_back(call->id);
      if (was_idle) Signal();
    }
    // A queued call is skipped by Take; a call held by Python is still finished by it.
    if (call->last_op_done) delete call;
  }

  void LastOpDone(Call* call) {
    std::lock_guard<std::mutex> lock(mu_);
    call->last_op_done = true;
    if (call->done) delete call;
  }

  void Signal() {  // with mu_ held
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
  }

  void OnCall(Call* call) {
    counters_.received++;
    call->received_at = monotonic_now();
    const gpr_timespec raw = call->ctx.raw_deadline();
    if (gpr_time_cmp(raw, gpr_inf_future(raw.clock_type)) != 0) {
      const gpr_timespec left = gpr_time_sub(gpr_convert_clock_type(raw, GPR_CLOCK_REALTIME),
                                             gpr_now(GPR_CLOCK_REALTIME));
      call->deadline = call->received_at + gpr_timespec_to_micros(left) * 1e-6;
    }
    const std::string& method = call->ctx.method();
    for (size_t i = 0; i < methods_.size(); ++i) {
      if (methods_[i] == method) call->method = static_cast<int>(i);
    }
    if (call->method < 0) {
      counters_.unimplemented++;
      FinishWithStatus(call, grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                                          "unknown method " + method));
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) {
      ReleaseLocked(call);
      return;
    }
    // Judged before the message is read: a refusal then costs no read and no second pass
    // through the completion queue, which under overload waits for this thread's turn on a
    // busy core. (Judged again once read: the queue may have grown meanwhile.)
    if (std::optional<grpc::Status> refusal = RefusalLocked(call)) {
      lock.unlock();
      FinishWithStatus(call, *refusal);
      return;
    }
    call->state = Call::State::kReading;
    call->stream.Read(&call->request, call);
  }

  void OnRequest(Call* call) {
    std::unique_lock<std::mutex> lock(mu_);
    if (std::optional<grpc::Status> refusal = RefusalLocked(call)) {
      lock.unlock();
      FinishWithStatus(call, *refusal);
      return;
    }
    call->id = ++next_id_;
    call->state = Call::State::kQueued;
    const bool was_idle = queue_.empty() && cancelled_ids_.empty();
    queue_.push_back(call);
    if (was_idle) Signal();
  }

  // Whether the intake refuses `call` now, and with what status (counted): shutting down,
  // too many calls pending, or (a judged method under admission) a budget shorter than the
  // queue's present delay. With mu_ held.
  std::optional<grpc::Status> RefusalLocked(Call* call) {
    const double now = monotonic_now();
    if (stopping_) {
      RefusedLocked(counters_.refused_shutting_down, call, now);
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    }
    const size_t pending = queue_.size() + with_python_.size();
    if (pending >= static_cast<size_t>(max_pending_)) {
      RefusedLocked(counters_.refused_overloaded, call, now);
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "server overloaded: " + std::to_string(pending) +
                              " requests already pending (max_pending " +
                              std::to_string(max_pending_) + ")");
    }
    // (An idle intake refuses nothing: whether a lone call can make it is the batcher's call.)
    if (sla_s_ > 0 && judged_[call->method] && pending > 0) {
      const double delay = OldestAgeLocked(now);
      double admit_by = std::isinf(call->deadline) ? call->received_at + sla_s_ : call->deadline;
      admit_by = std::min(admit_by, call->received_at + cap_s_);
      if (now + delay + margin_s_ > admit_by) {
        RefusedLocked(counters_.refused_queue_delay, call, now);
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            QueueDelayDetails(delay, margin_s_, admit_by - now));
      }
    }
    return std::nullopt;
  }

  // Counts a call the intake answers itself in `counts` (a Stats reason) and notes how long it
  // took (arrival to `now`) for TakeTimings, so every counted refusal is also timed. At most
  // kMaxTimings are kept between takes; more are counted as dropped. With mu_ held.
  void RefusedLocked(std::array<std::atomic<uint64_t>, kMaxMethods>& counts, const Call* call,
                     double now) {
    counts[call->method]++;
    if (timings_.size() >= kMaxTimings) {
      timings_dropped_++;
      return;
    }
    timings_.emplace_back(call->method, static_cast<float>(now - call->received_at));
  }

  // How long the oldest pending call has waited (0 if none). Ids grow with arrival, so it is
  // the first call held by Python, or else the head of the queue. With mu_ held.
  double OldestAgeLocked(double now) const {
    const Call* oldest = nullptr;
    if (!with_python_.empty()) {
      oldest = with_python_.begin()->second;
    } else if (!queue_.empty()) {
      oldest = queue_.front();
    }
    return oldest == nullptr ? 0.0 : std::max(0.0, now - oldest->received_at);
  }

  static std::string QueueDelayDetails(double delay_s, double margin_s, double budget_s) {
    char text[200];
    std::snprintf(text, sizeof(text),
                  "server overloaded: requests are waiting %.1f ms (+%.1f ms to compute), more "
                  "than this request's %.1f ms budget",
                  delay_s * 1e3, margin_s * 1e3, budget_s * 1e3);
    return text;
  }

  // Every operation is started under mu_, and none once the completion queue is closing
  // (closed_): grpc++ must not get work for a queue that is shut down. A call that can no
  // longer be answered then is freed; the server's shutdown has cancelled it. The caller must
  // not hold mu_.
  void FinishWithStatus(Call* call, const grpc::Status& status) {
    StartLast(call, status, nullptr);
  }

  void FinishWithBody(Call* call, const grpc::ByteBuffer& body) {
    StartLast(call, grpc::Status::OK, &body);
  }

  // The call's last operation: the status, with `body` first if given.
  void StartLast(Call* call, const grpc::Status& status, const grpc::ByteBuffer* body) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      ReleaseLocked(call);
      return;
    }
    call->state = Call::State::kFinishing;
    if (body != nullptr) {
      call->stream.WriteAndFinish(*body, grpc::WriteOptions(), status, call);
    } else {
      call->stream.Finish(status, call);
    }
  }

  // No final operation will be started (shutting down): free the call once its done
  // notification is back.
  void ReleaseLocked(Call* call) {
    call->last_op_done = true;
    if (call->done) delete call;
  }

  const std::string address_;
  const std::vector<std::string> methods_;
  const int max_pending_;
  const int max_message_bytes_;
  const bool reuse_port_;
  const std::string tls_cert_, tls_key_, tls_client_ca_;
  const std::vector<std::string> health_services_;

  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;
  int port_ = 0;
  int event_fd_ = -1;
  std::atomic<bool> short_slice_{false};  // the kernel granted the intake thread a short slice
  const int io_priority_;                  // SCHED_RR priority asked for (0: none)
  std::atomic<bool> io_realtime_{false};   // ... and granted

  std::mutex mu_;  // guards everything below
  std::deque<Call*> queue_;
  std::map<uint64_t, Call*> with_python_;  // by id, so oldest first
  std::vector<uint64_t> cancelled_ids_;  // held by Python, cancelled by the caller
  uint64_t next_id_ = 0;
  bool stopping_ = false;  // no new calls are handed to Python
  bool closed_ = false;    // the completion queue is shutting down: no new operations
  double sla_s_ = 0.0;     // queue-delay admission (SetAdmission); 0 = off
  double cap_s_ = kNoDeadline;
  double margin_s_ = 0.0;
  std::array<bool, kMaxMethods> judged_{};  // methods under queue-delay admission
  Counters counters_;
  static constexpr size_t kMaxTimings = 1 << 17;
  std::vector<std::pair<int, float>> timings_;  // (method, seconds): see RefusedLocked
  std::atomic<uint64_t> timings_dropped_{0};
};

}  // namespace

PYBIND11_MODULE(_intake, m) {
  m.doc() = "Native gRPC intake: RPCs as bytes, handed to Python in bulk (see intake.py).";
  py::class_<Intake>(m, "Intake")
      .def(py::init<std::string, std::vector<std::string>, int, int, bool, std::string,
                    std::string, std::string, std::vector<std::string>, std::vector<int>, int>(),
           py::arg("address"), py::arg("methods"), py::arg("max_pending"),
           py::arg("max_message_bytes"), py::arg("reuse_port"), py::arg("tls_cert") = "",
           py::arg("tls_key") = "", py::arg("tls_client_ca") = "",
           py::arg("health_services") = std::vector<std::string>{""},
           py::arg("judged_methods") = std::vector<int>{}, py::arg("io_priority") = 0)
      .def("start", &Intake::Start, py::call_guard<py::gil_scoped_release>())
      .def("set_serving", &Intake::SetServing, py::call_guard<py::gil_scoped_release>())
      .def("fileno", &Intake::EventFd)
      .def("set_admission", &Intake::SetAdmission, py::arg("sla_s"), py::arg("cap_s"),
           py::arg("margin_s"))
      .def("take", &Intake::Take, py::arg("max_items"))
      .def("finish", &Intake::Finish, py::arg("call_id"), py::arg("code"), py::arg("details"),
           py::arg("payload"))
      .def("stop", &Intake::Stop, py::arg("grace_s"), py::call_guard<py::gil_scoped_release>())
      .def("stats", &Intake::Stats)
      .def("take_timings", &Intake::TakeTimings);
}
