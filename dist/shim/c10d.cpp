// A C ABI over libtorch's c10d: a TCPStore rendezvous and a Gloo process
// group, the pieces tch does not bind. Every entry point catches C++
// exceptions and returns their message, so a lost peer is an error on the
// Rust side, never an abort.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

namespace {

using Millis = std::chrono::milliseconds;

void write_error(char* buf, size_t len, const std::string& msg) {
  if (buf == nullptr || len == 0) return;
  size_t n = std::min(len - 1, msg.size());
  std::memcpy(buf, msg.data(), n);
  buf[n] = 0;
}

template <class F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, len, e.what());
  } catch (...) {
    write_error(err, len, "unknown C++ exception");
  }
  return 1;
}

std::string heartbeat_key(int rank) {
  return "medzero/heartbeat/" + std::to_string(rank);
}

// One rank's group. A heartbeat thread bumps this rank's counter in the
// store every `beat`, so after a failed collective the survivors can tell
// which peer stopped (its counter no longer moves) without trusting clocks.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  Millis timeout;
  int rank;
  int world;
  std::atomic<bool> stop{false};
  std::thread heartbeat;

  void beat_loop(c10::intrusive_ptr<c10d::Store> own, Millis beat) {
    while (!stop.load()) {
      try {
        own->add(heartbeat_key(rank), 1);
      } catch (...) {
        return;  // the store is gone: nothing left to report to
      }
      for (Millis slept{0}; slept < beat && !stop.load(); slept += Millis(50))
        std::this_thread::sleep_for(Millis(50));
    }
  }

  ~Group() {
    stop.store(true);
    if (heartbeat.joinable()) heartbeat.join();
  }
};

}  // namespace

extern "C" {

// `host_store`: this rank hosts the TCPStore (rank 0, unless torchrun's
// agent hosts it: TORCHELASTIC_USE_AGENT_STORE). Keys live under "medzero/",
// apart from the agent's own.
void* mz_c10d_new(const char* host, uint16_t port, int rank, int world,
                  bool host_store, int64_t timeout_ms, int64_t beat_ms,
                  char* err, size_t len) {
  Group* out = nullptr;
  guarded(err, len, [&] {
    auto g = std::make_unique<Group>();
    g->timeout = Millis(timeout_ms);
    g->rank = rank;
    g->world = world;
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = host_store;
    opts.numWorkers = world;
    opts.waitWorkers = true;  // a client registers itself; the host waits for all
    opts.multiTenant = true;  // as torch.distributed hosts it
    opts.timeout = g->timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
    g->store = c10::make_intrusive<c10d::PrefixStore>("medzero", tcp);
    auto pg_opts = c10d::ProcessGroupGloo::Options::create(g->timeout);
    pg_opts->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(host));
    pg_opts->threads = 1;
    g->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, rank, world,
                                                        pg_opts);
    auto own = g->store->clone();
    own->set(heartbeat_key(rank), std::vector<uint8_t>{'0'});
    Group* raw = g.get();
    g->heartbeat = std::thread([raw, own, beat_ms] {
      raw->beat_loop(own, Millis(beat_ms));
    });
    out = g.release();
  });
  return out;
}

void mz_c10d_free(void* group) { delete static_cast<Group*>(group); }

int mz_c10d_allreduce_sum(void* group, void* tensor, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    g->pg->allreduce(ts, opts)->wait(g->timeout);
  });
}

int mz_c10d_broadcast(void* group, void* tensor, int root, char* err,
                      size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    g->pg->broadcast(ts, opts)->wait(g->timeout);
  });
}

// Point to point: `tensor` to rank `dst` under `tag`, and from rank `src`.
// A receive with timeout_ms < 0 waits as long as the sender lives (a peer
// that exits resets the connection, which fails the wait at once).
int mz_c10d_send(void* group, void* tensor, int dst, int tag,
                 int64_t timeout_ms, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    auto wait = timeout_ms < 0 ? kNoTimeout : Millis(timeout_ms);
    g->pg->send(ts, dst, tag)->wait(wait);
  });
}

int mz_c10d_recv(void* group, void* tensor, int src, int tag,
                 int64_t timeout_ms, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    auto wait = timeout_ms < 0 ? kNoTimeout : Millis(timeout_ms);
    g->pg->recv(ts, src, tag)->wait(wait);
  });
}

int mz_c10d_barrier(void* group, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    g->pg->barrier(opts)->wait(g->timeout);
  });
}

// Each rank's heartbeat count into `counts` (world entries); -1 where it
// cannot be read. Returns 1 (with the message) when the store is unreachable.
int mz_c10d_heartbeats(void* group, int64_t* counts, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, len, [&] {
    auto store = g->store->clone();
    store->setTimeout(Millis(2000));
    for (int r = 0; r < g->world; ++r) {
      try {
        counts[r] = store->add(heartbeat_key(r), 0);
      } catch (...) {
        counts[r] = -1;
      }
    }
  });
}

}  // extern "C"
