// chebyshev_weights, chebyshev_forecast: Spectrum's Chebyshev ridge forecast as one weighted sum over the history.
// The (degree+1)^2 solve is done once per call in double; the forecast is then one parallel pass over the valid
// rows (weighted_rows in weighted_rows.cpp).
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastcache_rt {
namespace cpu {
namespace {

// In-place lower Cholesky factor of the m x m row-major matrix a (left-looking, as LAPACK's dpotf2). False if a
// pivot is <= 0 or not finite.
bool cholesky(std::vector<double>& a, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    double ajj = a[j * m + j];
    for (int64_t k = 0; k < j; ++k) ajj -= a[j * m + k] * a[j * m + k];
    if (!(ajj > 0.0) || !std::isfinite(ajj)) return false;
    const double ljj = std::sqrt(ajj);
    a[j * m + j] = ljj;
    for (int64_t i = j + 1; i < m; ++i) {
      double s = a[i * m + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * m + k] * a[j * m + k];
      a[i * m + j] = s / ljj;
    }
  }
  return true;
}

// Index of the maximum, torch.argmax semantics: the first NaN wins, else the first of equal maxima.
int64_t argmax(const std::vector<double>& v) {
  int64_t best = 0;
  for (int64_t j = 1; j < static_cast<int64_t>(v.size()); ++j) {
    if (std::isnan(v[best])) break;
    if (std::isnan(v[j]) || v[j] > v[best]) best = j;
  }
  return best;
}

// The weights in double, w[j] = 0 for invalid rows; all NaN when no row is valid. Returns the number of valid rows.
int64_t weights_f64(VecF taus, int64_t n, double q, const int64_t* count, int64_t degree, double lam, double blend,
                    std::vector<double>& w) {
  int64_t cnt = n;
  if (count != nullptr) cnt = *count < 0 ? 0 : (*count < n ? *count : n);
  w.assign(static_cast<size_t>(n), 0.0);
  if (cnt == 0) {
    w.assign(static_cast<size_t>(n), std::numeric_limits<double>::quiet_NaN());
    return 0;
  }
  const int64_t m = degree + 1;
  auto tau = [&](int64_t j) { return static_cast<double>(taus.data[j * taus.stride]); };

  // Basis rows phi[j] = (T_0(t_j), ..., T_degree(t_j)) for the valid rows; phi_q likewise at the query.
  std::vector<double> phi(static_cast<size_t>(cnt * m)), phi_q(static_cast<size_t>(m));
  auto basis = [&](double t, double* out) {
    out[0] = 1.0;
    if (m > 1) out[1] = t;
    for (int64_t k = 2; k < m; ++k) out[k] = 2.0 * t * out[k - 1] - out[k - 2];
  };
  for (int64_t j = 0; j < cnt; ++j) basis(tau(j), &phi[j * m]);
  basis(q, phi_q.data());

  // Gram = Phi^T Phi + lam I over the valid rows.
  std::vector<double> gram(static_cast<size_t>(m * m), 0.0);
  for (int64_t a = 0; a < m; ++a)
    for (int64_t b = 0; b <= a; ++b) {
      double s = 0.0;
      for (int64_t j = 0; j < cnt; ++j) s += phi[j * m + a] * phi[j * m + b];
      gram[a * m + b] = gram[b * m + a] = s;
    }
  for (int64_t a = 0; a < m; ++a) gram[a * m + a] += lam;

  std::vector<double> chol = gram;
  bool ok = cholesky(chol, m);
  if (!ok) {
    // Jitter retry (lam = 0 with fewer distinct rows than coefficients): 1e-6 * mean(diag(gram)).
    double diag = 0.0;
    for (int64_t a = 0; a < m; ++a) diag += gram[a * m + a];
    const double jitter = 1e-6 * (diag / static_cast<double>(m));
    chol = gram;
    for (int64_t a = 0; a < m; ++a) chol[a * m + a] += jitter;
    ok = cholesky(chol, m);
  }
  if (!ok) {
    // Still not positive definite (non-finite taus, or a Gram too ill-conditioned for the jitter): no forecast.
    for (int64_t j = 0; j < cnt; ++j) w[j] = std::numeric_limits<double>::quiet_NaN();
  } else {
    // z = Gram^-1 phi_q: forward then backward substitution; w_j = phi[j] . z
    std::vector<double> z(phi_q);
    for (int64_t i = 0; i < m; ++i) {
      double s = z[i];
      for (int64_t k = 0; k < i; ++k) s -= chol[i * m + k] * z[k];
      z[i] = s / chol[i * m + i];
    }
    for (int64_t i = m - 1; i >= 0; --i) {
      double s = z[i];
      for (int64_t k = i + 1; k < m; ++k) s -= chol[k * m + i] * z[k];
      z[i] = s / chol[i * m + i];
    }
    for (int64_t j = 0; j < cnt; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < m; ++k) s += phi[j * m + k] * z[k];
      w[j] = s;
    }
  }

  if (blend != 1.0) {
    // Linear extrapolation from the two valid rows of largest tau, blended in.
    const double neg_inf = -std::numeric_limits<double>::infinity();
    std::vector<double> tv(static_cast<size_t>(n), neg_inf);
    for (int64_t j = 0; j < cnt; ++j) tv[j] = tau(j);
    const int64_t j_last = argmax(tv);
    const double t_last = tv[j_last];
    tv[j_last] = neg_inf;
    const int64_t j_prev = argmax(tv);
    const double t_prev = tv[j_prev];
    // Two equal largest taus give no slope: hold the last row (the limit of a vanishing extrapolation).
    const bool has_prev = std::isfinite(t_prev) && t_prev < t_last;
    const double k = has_prev ? (q - t_last) / (t_last - t_prev) : 0.0 * q;
    std::vector<double> w_lin(static_cast<size_t>(n), 0.0);
    w_lin[j_last] = 1.0 + k;
    if (has_prev) w_lin[j_prev] += -k;
    for (int64_t j = 0; j < n; ++j) w[j] = blend * w[j] + (1.0 - blend) * w_lin[j];
  }
  return cnt;
}

}  // namespace

int chebyshev_weights(VecF taus, int64_t n, const float* tau_query, const int64_t* count, int64_t degree,
                      double lam, double blend, float* out, int64_t out_stride) {
  if (n < 0 || degree < 0) return kBadSize;
  if (n == 0) return kOk;
  if (taus.data == nullptr || tau_query == nullptr || out == nullptr) return kNullPointer;
  std::vector<double> w;
  weights_f64(taus, n, static_cast<double>(*tau_query), count, degree, lam, blend, w);
  for (int64_t j = 0; j < n; ++j) out[j * out_stride] = static_cast<float>(w[j]);
  return kOk;
}

int chebyshev_forecast(int dtype, const void* history, int64_t n, int64_t N, int64_t s_row, int64_t s_col,
                       VecF taus, const float* tau_query, const int64_t* count, int64_t degree, double lam,
                       double blend, void* out, int64_t s_out, int nthreads) {
  if (n < 0 || N < 0 || degree < 0) return kBadSize;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (N == 0) return kOk;
  if (n == 0) return fill_nan(dtype, out, N, s_out, nthreads);
  if (taus.data == nullptr || tau_query == nullptr) return kNullPointer;
  std::vector<double> w64;
  const int64_t cnt = weights_f64(taus, n, static_cast<double>(*tau_query), count, degree, lam, blend, w64);
  if (cnt == 0) return fill_nan(dtype, out, N, s_out, nthreads);
  // float32 weights, as the reference (chebyshev_weights' output) uses them
  std::vector<float> w(static_cast<size_t>(cnt));
  for (int64_t j = 0; j < cnt; ++j) w[j] = static_cast<float>(w64[j]);
  // Only rows j < count are read.
  return weighted_rows(dtype, history, cnt, N, s_row, s_col, w.data(), out, s_out, nthreads);
}

}  // namespace cpu
}  // namespace fastcache_rt
