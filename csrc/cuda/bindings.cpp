// pybind11 module fastcache_rt._C_cuda: thin bindings of the CUDA launchers (csrc/cuda/launchers.h).
//
// Compiled by the host compiler, linked against cudart. Tensors arrive as integers (data_ptr()), with their sizes
// and element strides; the stream is torch.cuda.current_stream().cuda_stream. Every function enqueues one kernel
// (or nothing when there is nothing to write), never synchronises, and raises on a launch error. Argument checks
// that need no device data (dtype codes, limits of the kernels) raise ValueError; CUDA errors raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

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

  m.def(
      "reduction_workspace_doubles",
      [](int64_t num_slots) {
        cudaError_t err = cudaSuccess;
        const int64_t n = fc::reduction_workspace_doubles(num_slots, &err);
        check(err, "reduction_workspace_doubles");
        return n;
      },
      "Doubles the band_l1 / gate_step partials workspace needs for num_slots output slots (current device).");

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
      [](uintptr_t taus, int64_t n, uintptr_t tau_query, uintptr_t count, int64_t degree, double lam, double blend,
         uintptr_t out, uintptr_t stream) {
        check_chebyshev_size(0, degree, "chebyshev_weights");
        check(fc::chebyshev_weights(as_ptr<const float>(taus), n, as_ptr<const float>(tau_query),
                                    as_ptr<const int64_t>(count), degree, lam, blend, as_ptr<float>(out),
                                    as_stream(stream)),
              "chebyshev_weights");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "chebyshev_forecast",
      [](int dtype, uintptr_t history, int64_t n, int64_t N, int64_t hs0, int64_t hs1, uintptr_t taus,
         uintptr_t tau_query, uintptr_t count, int64_t degree, double lam, double blend, uintptr_t out,
         uintptr_t stream) {
        check_chebyshev_size(n, degree, "chebyshev_forecast");
        check(fc::chebyshev_forecast(as_dtype(dtype), as_ptr<const void>(history), n, N, hs0, hs1,
                                     as_ptr<const float>(taus), as_ptr<const float>(tau_query),
                                     as_ptr<const int64_t>(count), degree, lam, blend, as_ptr<void>(out),
                                     as_stream(stream)),
              "chebyshev_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "taylor_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t distance,
         uintptr_t out, uintptr_t stream) {
        if (K < 1 || K > fc::kMaxOrders) {
          throw py::value_error("fastcache_rt._C_cuda.taylor_forecast: 1 <= K <= " + std::to_string(fc::kMaxOrders) +
                                " rows, got " + std::to_string(K));
        }
        check(fc::taylor_forecast(as_dtype(dtype), as_ptr<const void>(diffs), K, N, ds0, ds1,
                                  as_ptr<const float>(distance), as_ptr<void>(out), as_stream(stream)),
              "taylor_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "hermite_forecast",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t distance,
         double scale, uintptr_t out, uintptr_t stream) {
        if (K < 1 || K > fc::kMaxOrders) {
          throw py::value_error("fastcache_rt._C_cuda.hermite_forecast: 1 <= K <= " +
                                std::to_string(fc::kMaxOrders) + " rows, got " + std::to_string(K));
        }
        check(fc::hermite_forecast(as_dtype(dtype), as_ptr<const void>(diffs), K, N, ds0, ds1,
                                   as_ptr<const float>(distance), scale, as_ptr<void>(out), as_stream(stream)),
              "hermite_forecast");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "taylor_update",
      [](int dtype, uintptr_t diffs, int64_t K, int64_t N, int64_t ds0, int64_t ds1, uintptr_t feature, int64_t fs,
         uintptr_t gap, uintptr_t count, uintptr_t stream) {
        check(fc::taylor_update(as_dtype(dtype), as_ptr<void>(diffs), K, N, ds0, ds1, as_ptr<const void>(feature),
                                fs, as_ptr<const float>(gap), as_ptr<const int64_t>(count), as_stream(stream)),
              "taylor_update");
      },
      py::call_guard<py::gil_scoped_release>());
}
