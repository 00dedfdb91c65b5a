// pybind11 module fastcache_rt._C: the CPU kernels. Tensors arrive as integers (data pointers), sizes, element
// strides and dtype codes (csrc/cpu/common.h: 0 float32, 1 float16, 2 bfloat16); fastcache_rt/ops/_cpu.py builds
// the calls. The GIL is released around every kernel; a nonzero status becomes ValueError / RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "gate_layout.h"
#include "cpu/common.h"
#include "cpu/ops.h"

namespace py = pybind11;
namespace fc = fastcache_rt::cpu;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int status, const char* op) {
  if (status == fc::kOk) return;
  const std::string msg = std::string("fastcache_rt._C.") + op + ": " + fc::status_message(status);
  if (status == fc::kBadIsa) throw std::runtime_error(msg);
  throw std::invalid_argument(msg);  // -> ValueError
}

template <typename F>
int nogil(F&& f) {
  py::gil_scoped_release release;
  return f();
}

fc::VecF vec(uintptr_t p, int64_t stride) { return fc::VecF{ptr<const float>(p), stride}; }

fc::GateArgs gate_args(uintptr_t state, int64_t state_s, uintptr_t params, int64_t params_s, uintptr_t coeffs,
                       int64_t n_coeffs, int64_t coeffs_s, uintptr_t gammas, int64_t gammas_s, uintptr_t decision,
                       uintptr_t state_out, int64_t state_out_s) {
  fc::GateArgs g;
  g.state = vec(state, state_s);
  g.params = vec(params, params_s);
  g.coeffs = vec(coeffs, coeffs_s);
  g.gammas = vec(gammas, gammas_s);
  g.n_coeffs = n_coeffs;
  g.decision_out = ptr<uint8_t>(decision);
  g.state_out = ptr<float>(state_out);
  g.state_out_stride = state_out_s;
  return g;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcache_rt CPU kernels (multithreaded C++; pointers, sizes and element strides in)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(fc::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(fc::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(fc::kBFloat16);
  {
    pybind11::dict layout;  // the gate layout compiled in (gate_layout.h), checked against layout.py at import
    for (const auto& f : ::fastcache_rt::gate_layout::kFields) layout[f.name] = f.value;
    m.attr("GATE_LAYOUT") = layout;
  }

  m.def(
      "isa", [] { return fc::active_isa() == fc::kIsaAvx2 ? std::string("avx2") : std::string("generic"); },
      "The instruction set the kernels use now: 'avx2' or 'generic' (SSE2 on x86-64, NEON on aarch64).");
  m.def(
      "best_isa", [] { return fc::best_isa() == fc::kIsaAvx2 ? std::string("avx2") : std::string("generic"); },
      "The best instruction set this CPU supports.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        int isa;
        if (name == "avx2")
          isa = fc::kIsaAvx2;
        else if (name == "generic")
          isa = fc::kIsaGeneric;
        else
          throw std::invalid_argument("set_isa: expected 'avx2' or 'generic', got '" + name + "'");
        check(fc::set_active_isa(isa), "set_isa");
      },
      py::arg("name"), "Force the kernels' instruction set (tests and benchmarks).");

  m.def(
      "band_l1",
      [](int dtype, uintptr_t cur, int64_t c0, int64_t c1, int64_t c2, uintptr_t prev, int64_t p0, int64_t p1,
         int64_t p2, int64_t B, int64_t R, int64_t D, uintptr_t bounds, int64_t nb, bool per_sample, uintptr_t out,
         int64_t o0, int64_t o1, int64_t o2, int nthreads) {
        const fc::View3 vc{ptr<const void>(cur), {c0, c1, c2}};
        const fc::View3 vp{ptr<const void>(prev), {p0, p1, p2}};
        const int64_t os[3] = {o0, o1, o2};
        check(nogil([&] {
                return fc::band_l1(dtype, vc, vp, B, R, D, ptr<const int64_t>(bounds), nb, per_sample,
                                   ptr<float>(out), os, nthreads);
              }),
              "band_l1");
      },
      "band_l1(dtype, cur, *cur_strides, prev, *prev_strides, B, R, D, bounds, nb, per_sample, out, "
      "*out_strides, nthreads)");

  m.def(
      "gate_step",
      [](int dtype, uintptr_t cur, int64_t c0, int64_t c1, int64_t c2, uintptr_t prev, int64_t p0, int64_t p1,
         int64_t p2, int64_t B, int64_t R, int64_t D, uintptr_t bounds, int64_t nb, uintptr_t state,
         int64_t state_s, uintptr_t params, int64_t params_s, uintptr_t coeffs, int64_t n_coeffs, int64_t coeffs_s,
         uintptr_t gammas, int64_t gammas_s, uintptr_t decision, uintptr_t state_out, int64_t state_out_s,
         uintptr_t sums_out, int64_t s0, int64_t s1, int nthreads) {
        const fc::View3 vc{ptr<const void>(cur), {c0, c1, c2}};
        const fc::View3 vp{ptr<const void>(prev), {p0, p1, p2}};
        const fc::GateArgs g = gate_args(state, state_s, params, params_s, coeffs, n_coeffs, coeffs_s, gammas,
                                         gammas_s, decision, state_out, state_out_s);
        const int64_t ss[2] = {s0, s1};
        check(nogil([&] {
                return fc::gate_step(dtype, vc, vp, B, R, D, ptr<const int64_t>(bounds), nb, ptr<float>(sums_out),
                                     ss, g, nthreads);
              }),
              "gate_step");
      },
      "gate_step(dtype, cur, *3 strides, prev, *3 strides, B, R, D, bounds, nb, state, state_stride, params, "
      "params_stride, coeffs, n_coeffs, coeffs_stride, gammas (0 = none), gammas_stride, decision_out, state_out, "
      "state_out_stride, sums_out, *2 strides, nthreads)");

  m.def(
      "gate_decide",
      [](uintptr_t sums, int64_t s0, int64_t s1, int64_t nb, uintptr_t state, int64_t state_s, uintptr_t params,
         int64_t params_s, uintptr_t coeffs, int64_t n_coeffs, int64_t coeffs_s, uintptr_t gammas, int64_t gammas_s,
         uintptr_t decision, uintptr_t state_out, int64_t state_out_s) {
        const fc::GateArgs g = gate_args(state, state_s, params, params_s, coeffs, n_coeffs, coeffs_s, gammas,
                                         gammas_s, decision, state_out, state_out_s);
        const int64_t ss[2] = {s0, s1};
        // Tiny: no GIL release (cheaper than the release itself).
        check(fc::gate_decide(ptr<const float>(sums), ss, nb, g), "gate_decide");
      },
      "gate_decide(sums, *2 strides, nb, state, state_stride, params, params_stride, coeffs, n_coeffs, "
      "coeffs_stride, gammas (0 = none), gammas_stride, decision_out, state_out, state_out_stride)");

  m.def(
      "chebyshev_weights",
      [](uintptr_t taus, int64_t n, int64_t taus_s, uintptr_t tau_query, uintptr_t count, int64_t degree, double lam,
         double blend, uintptr_t out, int64_t out_s) {
        check(fc::chebyshev_weights(vec(taus, taus_s), n, ptr<const float>(tau_query), ptr<const int64_t>(count),
                                    degree, lam, blend, ptr<float>(out), out_s),
              "chebyshev_weights");
      },
      "chebyshev_weights(taus, n, taus_stride, tau_query, count (0 = none), degree, lam, blend, out, out_stride)");

  m.def(
      "chebyshev_forecast",
      [](int dtype, uintptr_t history, int64_t n, int64_t N, int64_t s_row, int64_t s_col, uintptr_t taus,
         int64_t taus_s, uintptr_t tau_query, uintptr_t count, int64_t degree, double lam, double blend,
         uintptr_t out, int64_t out_s, int nthreads) {
        check(nogil([&] {
                return fc::chebyshev_forecast(dtype, ptr<const void>(history), n, N, s_row, s_col, vec(taus, taus_s),
                                              ptr<const float>(tau_query), ptr<const int64_t>(count), degree, lam,
                                              blend, ptr<void>(out), out_s, nthreads);
              }),
              "chebyshev_forecast");
      },
      "chebyshev_forecast(dtype, history, n, N, s_row, s_col, taus, taus_stride, tau_query, count (0 = none), "
      "degree, lam, blend, out, out_stride, nthreads)");

  m.def(
      "taylor_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, uintptr_t distance,
         uintptr_t out, int64_t out_s, int nthreads) {
        check(nogil([&] {
                return fc::taylor_forecast(dtype, ptr<const void>(diffs), K, N, s_row, s_col,
                                           ptr<const float>(distance), ptr<void>(out), out_s, nthreads);
              }),
              "taylor_forecast");
      },
      "taylor_forecast(dtype, diffs, K, N, s_row, s_col, distance, out, out_stride, nthreads)");

  m.def(
      "hermite_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, uintptr_t distance,
         double scale, uintptr_t out, int64_t out_s, int nthreads) {
        check(nogil([&] {
                return fc::hermite_forecast(dtype, ptr<const void>(diffs), K, N, s_row, s_col,
                                            ptr<const float>(distance), scale, ptr<void>(out), out_s, nthreads);
              }),
              "hermite_forecast");
      },
      "hermite_forecast(dtype, diffs, K, N, s_row, s_col, distance, scale, out, out_stride, nthreads)");

  m.def(
      "taylor_update",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, uintptr_t feature,
         int64_t feature_s, uintptr_t gap, uintptr_t count, int nthreads) {
        check(nogil([&] {
                return fc::taylor_update(dtype, ptr<void>(diffs), K, N, s_row, s_col, ptr<const void>(feature),
                                         feature_s, ptr<const float>(gap), ptr<const int64_t>(count), nthreads);
              }),
              "taylor_update");
      },
      "taylor_update(dtype, diffs, K, N, s_row, s_col, feature, feature_stride, gap, count (0 = none), nthreads)");

  m.def(
      "taylor_update_error",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t s_row, int64_t s_col, uintptr_t feature,
         int64_t feature_s, uintptr_t gap, uintptr_t count, uintptr_t weights, int64_t weights_s, uintptr_t error,
         int64_t B, int nthreads) {
        check(nogil([&] {
                return fc::taylor_update_error(dtype, ptr<void>(diffs), K, N, s_row, s_col, ptr<const void>(feature),
                                               feature_s, ptr<const float>(gap), ptr<const int64_t>(count),
                                               ptr<const float>(weights), weights_s, ptr<float>(error), B, nthreads);
              }),
              "taylor_update_error");
      },
      "taylor_update_error(dtype, diffs, K, N, s_row, s_col, feature, feature_stride, gap, count (0 = none), "
      "weights, weights_stride, error, B, nthreads)");

  m.def(
      "history_update",
      [](int dtype, uintptr_t history, int64_t n, int64_t N, int64_t s_row, int64_t s_col, uintptr_t value,
         int64_t value_s, uintptr_t row, uintptr_t weights, int64_t weights_s, uintptr_t count, uintptr_t error,
         int64_t B, int nthreads) {
        check(nogil([&] {
                return fc::history_update(dtype, ptr<void>(history), n, N, s_row, s_col, ptr<const void>(value),
                                          value_s, ptr<const int64_t>(row), ptr<const float>(weights), weights_s,
                                          ptr<const int64_t>(count), ptr<float>(error), B, nthreads);
              }),
              "history_update");
      },
      "history_update(dtype, history, n, N, s_row, s_col, value, value_stride, row, weights, weights_stride, "
      "count (0 = none), error (0 = none), B, nthreads)");
}
