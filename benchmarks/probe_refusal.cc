// Refusal latency as a lean client sees it: an open-loop C++ prober (grpc++ generic stub,
// callback API, no Python), to run beside bench_overload's Python generator.
//
//   g++ -O2 -std=c++17 benchmarks/probe_refusal.cc -o /tmp/probe_refusal $(pkg-config --cflags --libs grpc++)
//   .venv/bin/python benchmarks/probe_refusal_pool.py --target HOST:PORT --out /tmp/pool300.bin --k 300
//   taskset -c 1 /tmp/probe_refusal HOST:PORT RATE SECONDS DEADLINE_MS /tmp/pool300.bin [METHOD]
//
// Sends Poisson arrivals at RATE/s for SECONDS, each with a DEADLINE_MS deadline, cycling the
// serialized requests of the pool file ((uint32 little-endian length, bytes) records), to METHOD
// (default Predict; an unknown method measures the no-work round trip). Latency runs from the
// call's start to its callback. Prints, per status code: count, p50/p90/p99/max ms and the share
// within 2 ms. Why: the Python generator's own delay in reading answers is in its refusal
// figures; this client's is small (run it under `chrt -f 20` so it also preempts the generator).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>
using Clock = std::chrono::steady_clock;
struct Call { grpc::ClientContext ctx; grpc::ByteBuffer req, resp; Clock::time_point t0; };
int main(int argc, char** argv) {
  const char* target = argv[1]; double rate = atof(argv[2]), seconds = atof(argv[3]), deadline_ms = atof(argv[4]);
  if (argc < 6) {
    fprintf(stderr, "usage: %s HOST:PORT RATE SECONDS DEADLINE_MS POOL_FILE [METHOD]\n", argv[0]);
    return 2;
  }
  const std::string method = argc > 6 ? argv[6] : "/adpredict.v1.PredictionService/Predict";
  std::ifstream f(argv[5], std::ios::binary); std::vector<std::string> payloads;
  uint32_t n; while (f.read(reinterpret_cast<char*>(&n), 4)) { std::string s(n, '\0'); f.read(&s[0], n); payloads.push_back(s); }
  if (!(rate > 0) || !(seconds > 0) || !(deadline_ms > 0) || payloads.empty()) {
    fprintf(stderr, "RATE, SECONDS and DEADLINE_MS must be > 0, and POOL_FILE must hold requests\n");
    return 2;
  }
  grpc::ChannelArguments args; args.SetMaxSendMessageSize(64 << 20); args.SetMaxReceiveMessageSize(64 << 20);
  auto ch = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    fprintf(stderr, "cannot connect to %s\n", target);
    return 1;
  }
  grpc::GenericStub stub(ch);
  std::mutex mu; std::map<int, std::vector<double>> by_code; std::atomic<int> outstanding{0};
  std::mt19937_64 rng(7); std::exponential_distribution<double> gap(rate);
  auto start = Clock::now(); auto next = start; size_t i = 0;
  while (true) {
    next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    if (next - start > std::chrono::duration<double>(seconds)) break;
    std::this_thread::sleep_until(next);
    auto* c = new Call;
    grpc::Slice s(payloads[i++ % payloads.size()]); c->req = grpc::ByteBuffer(&s, 1);
    c->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(int64_t(deadline_ms * 1000)));
    outstanding++;
    c->t0 = Clock::now();
    stub.UnaryCall(&c->ctx, method, grpc::StubOptions(), &c->req, &c->resp,
                   [c, &mu, &by_code, &outstanding](grpc::Status st) {
                     double ms = std::chrono::duration<double, std::milli>(Clock::now() - c->t0).count();
                     { std::lock_guard<std::mutex> l(mu); by_code[st.error_code()].push_back(ms); }
                     delete c; outstanding--;
                   });
  }
  while (outstanding.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  for (auto& [code, v] : by_code) {
    std::sort(v.begin(), v.end());
    auto q = [&](double p) { return v[std::min(v.size() - 1, size_t(p * v.size()))]; };
    size_t within = std::upper_bound(v.begin(), v.end(), 2.0) - v.begin();
    printf("code %2d n %6zu p50 %.3f p90 %.3f p99 %.3f max %.3f ms, within 2 ms %.1f%%\n", code, v.size(), q(.5), q(.9), q(.99), v.back(), 100.0 * within / v.size());
  }
}
