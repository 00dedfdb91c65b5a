// Host reference of the CUDA band_l1 summation order (csrc/cuda/band_order.h), driven by
// tests/cuda/test_band_order_host.py, which compares its results bit for bit with
// fastcache_rt.ops._reference.exact_group_sum / band_l1_gpu_order. Built with a plain host compiler
// (-ffp-contract=off); no CUDA toolkit needed.
//
//   band_order_host group IN OUT   IN: int64 groups; per group: int64 n, int64 log2_n, n float64 values.
//                                  OUT: one float64 per group (order::exact_group_sum).
//   band_order_host band IN OUT    IN: int64 B, R, D, nb, per_sample, level2_threads; int64 bounds[nb + 1];
//                                  float32 cur[B * R * D], prev[B * R * D] (contiguous).
//                                  OUT: float32 (B if per_sample else 1) * nb * 2 (order::band_l1_host).
//   band_order_host log2 IN OUT    IN: int64 count, count int64 n. OUT: int64 order::ceil_log2(n) each.
//   band_order_host walk           self-check of the level-2 walk: every lane layout visits each partial once.
// Exit status: 0 ok, 1 usage / IO error, 2 self-check failure.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda/band_order.h"

namespace ord = fastcache_rt::cuda::order;

namespace {

struct Reader {
  std::FILE* f;
  bool ok = true;
  template <typename T>
  T one() {
    T v{};
    ok = ok && std::fread(&v, sizeof v, 1, f) == 1;
    return v;
  }
  template <typename T>
  void many(T* p, int64_t n) {
    if (n > 0) ok = ok && std::fread(p, sizeof(T), static_cast<size_t>(n), f) == static_cast<size_t>(n);
  }
};

int run_group(const char* in_path, const char* out_path) {
  std::FILE* in = std::fopen(in_path, "rb");
  if (!in) return 1;
  Reader r{in};
  const int64_t groups = r.one<int64_t>();
  std::vector<double> out;
  for (int64_t g = 0; g < groups && r.ok; ++g) {
    const int64_t n = r.one<int64_t>();
    const int64_t log2_n = r.one<int64_t>();
    std::vector<double> v(static_cast<size_t>(n));
    r.many(v.data(), n);
    out.push_back(ord::exact_group_sum(v.data(), n, static_cast<int>(log2_n)));
  }
  std::fclose(in);
  if (!r.ok) return 1;
  std::FILE* o = std::fopen(out_path, "wb");
  if (!o) return 1;
  const bool wrote = std::fwrite(out.data(), sizeof(double), out.size(), o) == out.size();
  std::fclose(o);
  return wrote ? 0 : 1;
}

int run_log2(const char* in_path, const char* out_path) {
  std::FILE* in = std::fopen(in_path, "rb");
  if (!in) return 1;
  Reader r{in};
  const int64_t count = r.one<int64_t>();
  std::vector<int64_t> n(static_cast<size_t>(count > 0 ? count : 0));
  r.many(n.data(), count);
  std::fclose(in);
  if (!r.ok) return 1;
  for (int64_t& v : n) v = ord::ceil_log2(v);
  std::FILE* o = std::fopen(out_path, "wb");
  if (!o) return 1;
  const bool wrote = std::fwrite(n.data(), sizeof(int64_t), n.size(), o) == n.size();
  std::fclose(o);
  return wrote ? 0 : 1;
}

int run_band(const char* in_path, const char* out_path) {
  std::FILE* in = std::fopen(in_path, "rb");
  if (!in) return 1;
  Reader r{in};
  const int64_t B = r.one<int64_t>();
  const int64_t R = r.one<int64_t>();
  const int64_t D = r.one<int64_t>();
  const int64_t nb = r.one<int64_t>();
  const bool per_sample = r.one<int64_t>() != 0;
  const int threads = static_cast<int>(r.one<int64_t>());
  if (!r.ok || B < 0 || R < 0 || D < 1 || nb < 1 || threads < 1) {
    std::fclose(in);
    return 1;
  }
  std::vector<int64_t> bounds(static_cast<size_t>(nb + 1));
  r.many(bounds.data(), nb + 1);
  const int64_t numel = B * R * D;
  std::vector<float> cur(static_cast<size_t>(numel)), prev(static_cast<size_t>(numel));
  r.many(cur.data(), numel);
  r.many(prev.data(), numel);
  std::fclose(in);
  if (!r.ok) return 1;
  const int64_t strides[3] = {R * D, D, 1};
  // Poisoned workspace: a partial that level 2 reads but level 1 never wrote shows up as a wrong NaN.
  std::vector<double> ws(static_cast<size_t>(ord::workspace_doubles(B, R, D, nb)) + 2,
                         std::numeric_limits<double>::quiet_NaN());
  const int64_t rows_out = per_sample ? B : 1;
  std::vector<float> out(static_cast<size_t>(rows_out * nb * 2), -1.0f);
  const bool walks_ok = ord::band_l1_host(cur.data(), strides, prev.data(), strides, B, R, D, bounds.data(), nb,
                                          per_sample, ws.data(), out.data(), threads);
  std::FILE* o = std::fopen(out_path, "wb");
  if (!o) return 1;
  const bool wrote = std::fwrite(out.data(), sizeof(float), out.size(), o) == out.size();
  std::fclose(o);
  if (!walks_ok) return 2;
  return wrote ? 0 : 1;
}

// Every (samples, L, stride, G) layout: the G lanes' walks together visit each flat index exactly once, at pair
// first + s * stride + off.
int run_walk() {
  const int64_t samples_list[] = {1, 2, 3, 7, 64};
  const int64_t L_list[] = {1, 2, 3, 5, 31, 32, 33, 100, 129};
  const int G_list[] = {1, 2, 4, 8, 16, 32, 64, 128};
  for (int64_t ns : samples_list) {
    for (int64_t L : L_list) {
      for (int G : G_list) {
        ord::BandRun run;
        run.first = 11;
        run.stride = L + 3;
        run.L = L;
        run.total = ns * L;
        std::vector<int> seen(static_cast<size_t>(run.total), 0);
        for (int lane = 0; lane < G; ++lane) {
          for (ord::RunWalk w(run, lane, G); w.valid(); w.advance()) {
            const int64_t s = w.i / L;
            const int64_t off = w.i % L;
            if (w.pair(run) != run.first + s * run.stride + off || w.i % G != lane) {
              std::fprintf(stderr, "walk: wrong pair at i=%d (samples %lld, L %lld, G %d)\n", w.i,
                           static_cast<long long>(ns), static_cast<long long>(L), G);
              return 2;
            }
            ++seen[static_cast<size_t>(w.i)];
          }
        }
        for (int64_t i = 0; i < run.total; ++i) {
          if (seen[static_cast<size_t>(i)] != 1) {
            std::fprintf(stderr, "walk: index %lld visited %d times (samples %lld, L %lld, G %d)\n",
                         static_cast<long long>(i), seen[static_cast<size_t>(i)], static_cast<long long>(ns),
                         static_cast<long long>(L), G);
            return 2;
          }
        }
      }
    }
  }
  // the group size: one group per (row, band) pair while there are enough threads
  for (int64_t pairs = 1; pairs <= 300; ++pairs) {
    const int G = ord::level2_group_size(pairs, 128);
    const bool pow2 = G >= 1 && G <= 128 && (G & (G - 1)) == 0;
    // largest G whose 128 / G groups cover every pair; 1 when there are more pairs than threads
    const bool best = pairs > 128 ? G == 1 : (128 / G >= pairs && (G == 128 || 128 / (2 * G) < pairs));
    if (!pow2 || !best) {
      std::fprintf(stderr, "level2_group_size(%lld, 128) = %d\n", static_cast<long long>(pairs), G);
      return 2;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "group") == 0) return run_group(argv[2], argv[3]);
  if (argc == 4 && std::strcmp(argv[1], "band") == 0) return run_band(argv[2], argv[3]);
  if (argc == 4 && std::strcmp(argv[1], "log2") == 0) return run_log2(argv[2], argv[3]);
  if (argc == 2 && std::strcmp(argv[1], "walk") == 0) return run_walk();
  std::fprintf(stderr, "usage: %s group|band|log2 IN OUT | walk\n", argv[0]);
  return 1;
}
