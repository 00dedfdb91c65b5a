// pybind11 module fastcache_rt._C_cuda: thin bindings of the CUDA launchers (csrc/cuda/launchers.h).
//
// Compiled by the host compiler, linked against cudart. Tensors arrive as integers (data_ptr()), with their sizes
// and element strides; the stream is torch.cuda.current_stream().cuda_stream. Every function enqueues one kernel
// (or nothing when there is nothing to write), never synchronises, and raises on a launch error. Argument checks
// that need no device data (dtype codes, limits of the kernels) raise ValueError; CUDA errors raise RuntimeError.
// A scalar argument is a pair (pointer, value): a nonzero pointer is a 0-dim device tensor the kernel reads, else
// the value (a Python float, rounded to float32 here; a Python int, or None = all rows, for count) is passed to the
// kernel by value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "gate_layout.h"
#include "cuda/launchers.h"

namespace py = pybind11;
namespace fc = fastcache_rt::cuda;

namespace {

using Strides3 = std::array<int64_t, 3>;
// (state, state_stride, params, params_stride, coeffs, coeffs_stride, n_coeffs, gammas (0 = none),
//  gammas_stride, decision_out, state_out, state_out_stride)
using GateTuple = std::array<int64_t, 12>;

template <typename P>
P* as_ptr(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("fastcache_rt._C_cuda.") + op + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

fc::DType as_dtype(int code) {
  if (code < 0 || code > 2) throw py::value_error("fastcache_rt._C_cuda: dtype code must be 0 (float32), 1 (float16) "
                                                  "or 2 (bfloat16), got " + std::to_string(code));
  return static_cast<fc::DType>(code);
}

fc::GateParams as_gate(const GateTuple& g) {
  fc::GateParams p;
  p.state = as_ptr<const float>(static_cast<uintptr_t>(g[0]));
  p.state_stride = g[1];
  p.params = as_ptr<const float>(static_cast<uintptr_t>(g[2]));
  p.params_stride = g[3];
  p.coeffs = as_ptr<const float>(static_cast<uintptr_t>(g[4]));
  p.coeffs_stride = g[5];
  p.n_coeffs = g[6];
  p.gammas = as_ptr<const float>(static_cast<uintptr_t>(g[7]));
  p.gammas_stride = g[8];
  p.decision_out = as_ptr<bool>(static_cast<uintptr_t>(g[9]));
  p.state_out = as_ptr<float>(static_cast<uintptr_t>(g[10]));
  p.state_out_stride = g[11];
  if (p.n_coeffs < 1) throw py::value_error("fastcache_rt._C_cuda: the gate needs at least one coefficient");
  return p;
}

// (pointer, value) -> the launchers' scalar. The value is rounded to float32 to nearest (IEEE conversion; Python
// floats beyond the float32 range become +-Inf, NaN stays NaN).
fc::ScalarF32 f32_arg(uintptr_t ptr, double value) {
  fc::ScalarF32 s;
  s.ptr = as_ptr<const float>(ptr);
  s.value = static_cast<float>(value);
  return s;
}

// count: a device int64 (ptr != 0), else the Python int, else None = `rows` (every row valid).
fc::ScalarI64 count_arg(uintptr_t ptr, const std::optional<int64_t>& value, int64_t rows) {
  fc::ScalarI64 s;
  s.ptr = as_ptr<const int64_t>(ptr);
  s.value = value.has_value() ? *value : rows;
  return s;
}

void check_chebyshev_size(int64_t n_in_smem, int64_t degree, const char* op) {
  int64_t need = 0;
  int64_t limit = 0;
  check(fc::chebyshev_smem(n_in_smem, degree, &need, &limit), op);
  if (need > limit) {
    throw py::value_error(std::string("fastcache_rt._C_cuda.") + op + ": degree " + std::to_string(degree) +
                          " with " + std::to_string(n_in_smem) + " history rows needs " + std::to_string(need) +
                          " bytes of shared memory per block (8 (m^2 + m) + 4 n, m = degree + 1); this device "
                          "allows " + std::to_string(limit));
  }
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastcache_rt CUDA kernels (raw pointers, sizes, element strides, stream; one launch per call)";
  m.attr("COUNTER_SLOTS") = fc::kCounterSlots;
  m.attr("MAX_ORDERS") = fc::kMaxOrders;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  {
    pybind11::dict layout;  // the gate layout compiled in (gate_layout.h), checked against layout.py at import
    for (const auto& f : ::fastcache_rt::gate_layout::kFields) layout[f.name] = f.value;
    m.attr("GATE_LAYOUT") = layout;
  }

  m.def(
      "reduction_workspace_doubles",
      [](int64_t B, int64_t R, int64_t D, int64_t nb, bool per_sample) {
        return fc::reduction_workspace_doubles(B, R, D, nb, per_sample);
      },
      py::arg("B"), py::arg("R"), py::arg("D"), py::arg("nb"), py::arg("per_sample"),
      "Doubles of the band_l1 / gate_step partials workspace for a (B, R, D) input with nb bands: a function of the "
      "sizes only (no device query).");

  m.def(
      "probe_device",
      [](int device) -> std::optional<std::string> {
        const cudaError_t err = fc::probe_device(device);
        if (err == cudaSuccess) return std::nullopt;
        cudaGetLastError();  // do not leave a non-sticky error behind for the next launch
        return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
      },
      "None if the kernels can run on the device, else the CUDA error text.");

  m.def(
      "band_l1",
      [](int dtype, uintptr_t cur, const Strides3& cs, uintptr_t prev, const Strides3& ps, int64_t B, int64_t R,
         int64_t D, uintptr_t bounds, int64_t nb, bool per_sample, uintptr_t out, uintptr_t partials,
         int64_t partials_doubles, int counter_slot, uintptr_t stream) {
        check(fc::band_l1(as_dtype(dtype), as_ptr<const void>(cur), cs.data(), as_ptr<const void>(prev), ps.data(), B,
                          R, D, as_ptr<const int64_t>(bounds), nb, per_sample, as_ptr<float>(out),
                          as_ptr<double>(partials), partials_doubles, counter_slot, as_stream(stream)),
              "band_l1");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "gate_step",
      [](int dtype, uintptr_t cur, const Strides3& cs, uintptr_t prev, const Strides3& ps, int64_t B, int64_t R,
         int64_t D, uintptr_t bounds, int64_t nb, const GateTuple& gate, uintptr_t sums_out, uintptr_t partials,
         int64_t partials_doubles, int counter_slot, uintptr_t stream) {
        const fc::GateParams g = as_gate(gate);
        check(fc::gate_step(as_dtype(dtype), as_ptr<const void>(cur), cs.data(), as_ptr<const void>(prev),
                            ps.data(), B, R, D, as_ptr<const int64_t>(bounds), nb, g, as_ptr<float>(sums_out),
                            as_ptr<double>(partials), partials_doubles, counter_slot, as_stream(stream)),
              "gate_step");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "gate_decide",
      [](uintptr_t sums, int64_t row_stride, int64_t col_stride, int64_t nb, const GateTuple& gate,
         uintptr_t stream) {
        const fc::GateParams g = as_gate(gate);
        check(fc::gate_decide(as_ptr<const float>(sums), row_stride, col_stride, nb, g, as_stream(stream)),
              "gate_decide");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "chebyshev_weights",
      [](uintptr_t taus, int64_t n, uintptr_t tau_query, double tau_query_value, uintptr_t count,
         std::optional<int64_t> count_value, int64_t degree, double lam, double blend, uintptr_t out,
         uintptr_t stream) {
        check_chebyshev_size(0, degree, "chebyshev_weights");
        check(fc::chebyshev_weights(as_ptr<const float>(taus), n, f32_arg(tau_query, tau_query_value),
                                    count_arg(count, count_value, n), degree, lam, blend, as_ptr<float>(out),
                                    as_stream(stream)),
              "chebyshev_weights");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "chebyshev_forecast",
      [](int dtype, uintptr_t history, int64_t n, int64_t N, int64_t hs0, int64_t hs1, uintptr_t taus,
         uintptr_t tau_query, double tau_query_value, uintptr_t count, std::optional<int64_t> count_value,
         int64_t degree, double lam, double blend, uintptr_t out, uintptr_t stream) {
        check_chebyshev_size(n, degree, "chebyshev_forecast");
        check(fc::chebyshev_forecast(as_dtype(dtype), as_ptr<const void>(history), n, N, hs0, hs1,
                                     as_ptr<const float>(taus), f32_arg(tau_query, tau_query_value),
                                     count_arg(count, count_value, n), degree, lam, blend, as_ptr<void>(out),
                                     as_stream(stream)),
              "chebyshev_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "taylor_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t distance,
         double distance_value, uintptr_t out, uintptr_t stream) {
        if (K < 1 || K > fc::kMaxOrders) {
          throw py::value_error("fastcache_rt._C_cuda.taylor_forecast: 1 <= K <= " + std::to_string(fc::kMaxOrders) +
                                " rows, got " + std::to_string(K));
        }
        check(fc::taylor_forecast(as_dtype(dtype), as_ptr<const void>(diffs), K, N, ds0, ds1,
                                  f32_arg(distance, distance_value), as_ptr<void>(out), as_stream(stream)),
              "taylor_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "hermite_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t distance,
         double distance_value, double scale, uintptr_t out, uintptr_t stream) {
        if (K < 1 || K > fc::kMaxOrders) {
          throw py::value_error("fastcache_rt._C_cuda.hermite_forecast: 1 <= K <= " +
                                std::to_string(fc::kMaxOrders) + " rows, got " + std::to_string(K));
        }
        check(fc::hermite_forecast(as_dtype(dtype), as_ptr<const void>(diffs), K, N, ds0, ds1,
                                   f32_arg(distance, distance_value), scale, as_ptr<void>(out), as_stream(stream)),
              "hermite_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "taylor_update",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t feature, int64_t fs,
         uintptr_t gap, double gap_value, uintptr_t count, std::optional<int64_t> count_value, uintptr_t stream) {
        check(fc::taylor_update(as_dtype(dtype), as_ptr<void>(diffs), K, N, ds0, ds1, as_ptr<const void>(feature),
                                fs, f32_arg(gap, gap_value), count_arg(count, count_value, K), as_stream(stream)),
              "taylor_update");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "error_workspace_doubles", [](int64_t N, int64_t B) { return fc::error_workspace_doubles(N, B); },
      py::arg("N"), py::arg("B"),
      "Doubles of the partials workspace of the error sums (taylor_update_error, history_update with an error) for "
      "N columns in B samples: a function of the sizes only.");

  m.def(
      "taylor_update_error",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t feature, int64_t fs,
         uintptr_t gap, double gap_value, uintptr_t count, std::optional<int64_t> count_value, uintptr_t weights,
         uintptr_t error, int64_t B, uintptr_t partials, int64_t partials_doubles, int counter_slot,
         uintptr_t stream) {
        check(fc::taylor_update_error(as_dtype(dtype), as_ptr<void>(diffs), K, N, ds0, ds1,
                                      as_ptr<const void>(feature), fs, f32_arg(gap, gap_value),
                                      count_arg(count, count_value, K), as_ptr<const float>(weights),
                                      as_ptr<float>(error), B, as_ptr<double>(partials), partials_doubles,
                                      counter_slot, as_stream(stream)),
              "taylor_update_error");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "history_update",
      [](int dtype, uintptr_t history, int64_t n, int64_t N, int64_t hs0, int64_t hs1, uintptr_t value, int64_t vs,
         uintptr_t row, int64_t row_value, uintptr_t weights, uintptr_t count, std::optional<int64_t> count_value,
         uintptr_t error, int64_t B, uintptr_t partials, int64_t partials_doubles, int counter_slot,
         uintptr_t stream) {
        fc::ScalarI64 r;
        r.ptr = as_ptr<const int64_t>(row);
        r.value = row_value;
        check(fc::history_update(as_dtype(dtype), as_ptr<void>(history), n, N, hs0, hs1, as_ptr<const void>(value),
                                 vs, r, as_ptr<const float>(weights), count_arg(count, count_value, n),
                                 as_ptr<float>(error), B, as_ptr<double>(partials), partials_doubles, counter_slot,
                                 as_stream(stream)),
              "history_update");
      },
      py::call_guard<py::gil_scoped_release>());
}
