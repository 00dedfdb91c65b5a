// Status messages, ISA selection and the persistent thread pool of the CPU kernels.
#include "common.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace fastcache_rt {
namespace cpu {

const char* status_message(int status) {
  switch (status) {
    case kOk:
      return "ok";
    case kBadDType:
      return "unsupported dtype (expected float32, float16 or bfloat16)";
    case kBadSize:
      return "invalid size argument";
    case kBadBounds:
      return "band bounds must be int64 with 0 = b0 < b1 < ... < b_nb = D";
    case kNullPointer:
      return "null data pointer for a non-empty tensor";
    case kBadIsa:
      return "instruction set not supported by this CPU or build";
    default:
      return "unknown error";
  }
}

// ---- ISA ---------------------------------------------------------------------------------------------------

int best_isa() {
  static const int isa = [] {
#if FC_HAS_AVX2
    __builtin_cpu_init();
    // libgcc only reports AVX2 when the OS saves the YMM state (XGETBV), so this is safe to run.
    if (__builtin_cpu_supports("avx2")) return static_cast<int>(kIsaAvx2);
#endif
    return static_cast<int>(kIsaGeneric);
  }();
  return isa;
}

namespace {
std::atomic<int> g_active_isa{-1};
}


int active_isa() {
  int isa = g_active_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    g_active_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

int set_active_isa(int isa) {
  if (isa != kIsaGeneric && isa != kIsaAvx2) return kBadIsa;
  if (isa > best_isa()) return kBadIsa;
  g_active_isa.store(isa, std::memory_order_relaxed);
  return kOk;
}

// ---- thread pool -------------------------------------------------------------------------------------------

namespace {

// Workers sleep on a condition variable between jobs (no spinning: on a busy machine a spinning worker takes CPU
// time from the threads doing the work). The wake-up costs tens of microseconds, so callers parallelise only work
// of about a millisecond or more (threads_for's grain).
class Pool {
 public:
  // Runs fn(0..nt-1); returns false without running anything when another job holds the pool.
  bool try_run(int nt, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock()) return false;
    grow(nt - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      job_threads_ = nt;
      pending_ = nt - 1;
      ++generation_;
    }
    start_cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void grow(int n_workers) {
    while (static_cast<int>(workers_.size()) < n_workers) {
      const int idx = static_cast<int>(workers_.size()) + 1;
      uint64_t gen;
      {
        std::lock_guard<std::mutex> lk(mu_);
        gen = generation_;
      }
      workers_.emplace_back([this, idx, gen] { loop(idx, gen); });
    }
  }

  void loop(int idx, uint64_t seen) {
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        start_cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (idx >= job_threads_) continue;
        job = job_;
      }
      (*job)(idx);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;      // guards everything below
  std::condition_variable start_cv_, done_cv_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  int job_threads_ = 0;
  int pending_ = 0;
  const std::function<void(int)>* job_ = nullptr;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // intentionally leaked: workers block forever, no teardown at interpreter exit
pid_t g_pool_pid = 0;

Pool* pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  const pid_t pid = getpid();
  if (g_pool == nullptr || g_pool_pid != pid) {
    // After fork() the child has none of the parent's workers: start a fresh pool (the old object is abandoned).
    g_pool = new Pool();
    g_pool_pid = pid;
  }
  return g_pool;
}

}  // namespace

void run_tasks(int nt, int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (nt > n_tasks) nt = static_cast<int>(n_tasks);
  if (nt <= 1) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  run_parallel(nt, [&](int) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_tasks;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  });
}

void run_parallel(int nt, const std::function<void(int)>& fn) {
  if (nt <= 1) {
    fn(0);
    return;
  }
  if (!pool()->try_run(nt, fn)) {
    for (int t = 0; t < nt; ++t) fn(t);
  }
}

}  // namespace cpu
}  // namespace fastcache_rt
