// rdr_fast::rdr_weights_and_update on the CPU: density ratios, weights and the prototype
// update in one call (docs/algorithm.md: "Density ratios", "Weights", "Prototype update").
//
// Computes exactly what rdr_fast/torch_impl.py computes (see rdr_fast/reference.py for
// the choices the paper leaves open):
//   1. For every class c present with seen[c]: r_c = b_c · (X_c X_cᵀ + λ_c I)⁻¹ X_c P_c
//      when b_c ≤ K, else b_c · X_c (X_cᵀ X_c + λ_c I)⁻¹ P_c, with
//      λ_c = ridge · trace(X_c X_cᵀ) / b_c (1 when the trace is 0), then r ← max(r, floor).
//      Unseen classes get r = 1. The systems are built and solved in double.
//   2. w_j = (r_j · factor_{y_j})^γ, scaled to batch mean 1, in the compute dtype (double
//      for double features, else float); computed in log space (write_weights). The mode says which terms are used:
//      "density_ratio" all of them, "class_factor" r ≡ 1, "uniform" w ≡ 1.
//   3. If update: for every class present, P_c ← mean(X_c) if !seen[c], else
//      μ P_c + (1 − μ) mean(X_c); then seen[c] ← true. Ratios use the old P_c.
//
// Work plan: a counting sort groups the rows by class (O(B + C), no per-sample
// allocation; a sort when C is large); classes are split into runs of about equal work and run in parallel,
// each class doing its solve and then its prototype update (the two touch only that
// class's rows, ratios and prototype); the weights need the batch sum and run last.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "multiversion.h"

namespace {

constexpr const char* kOp = "rdr_weights_and_update";
constexpr double kRatioFloor = 1e-9;  // r ← max(r, floor): RATIO_FLOOR of rdr_fast/constants.py

// How the weights are formed. The names, and the message for any other name, are those of
// WEIGHT_MODES and check_weight_mode in rdr_fast/constants.py.
enum class WeightMode { kDensityRatio, kClassFactor, kUniform };

WeightMode parse_weight_mode(c10::string_view mode) {
  const bool known = mode == "density_ratio" || mode == "class_factor" || mode == "uniform";
  TORCH_CHECK_VALUE(known, kOp, ": mode must be one of ('density_ratio', 'class_factor', 'uniform'), got '",
                    std::string(mode.data(), mode.size()), "'");
  if (mode == "density_ratio") return WeightMode::kDensityRatio;
  return mode == "class_factor" ? WeightMode::kClassFactor : WeightMode::kUniform;
}

// Multiply-adds (~100 µs on one core) below which a second thread costs more than it saves:
// an OpenMP fork/join is a few µs on an idle machine and far more on a busy one.
constexpr int64_t kParallelWork = 1 << 18;

// The hot loops, written once as templates. `omp simd` lets the compiler vectorise the
// reductions without -ffast-math; their order is fixed per build, so results never
// depend on the thread count. Products of floats are exact in double.
template <typename A, typename B>
RDR_ALWAYS_INLINE double dot_of(const A* a, const B* b, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return sum;
}

// out[r] = Σ x_k y_r,k for four rows y_r at once: x is read once and the four independent
// sums keep the FMA units busy (the b_c² K Gram work of a head class).
template <typename T>
RDR_ALWAYS_INLINE void dot4_of(const T* x, const T* const* y, int64_t n, double* out) {
  const T *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < n; ++k) {
    const double xk = static_cast<double>(x[k]);
    s0 += xk * static_cast<double>(y0[k]);
    s1 += xk * static_cast<double>(y1[k]);
    s2 += xk * static_cast<double>(y2[k]);
    s3 += xk * static_cast<double>(y3[k]);
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <typename T>
RDR_ALWAYS_INLINE void add_row_of(double* acc, const T* x, int64_t n) {  // acc += x, in double
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<double>(x[k]);
}

// P ← μP + (1 − μ)·mean, or P ← mean for a class never seen (its old row is ignored).
// The mean multiplies by 1/b: a vector division would cost more than the rest together.
template <typename P>
RDR_ALWAYS_INLINE void blend_row_of(P* proto, const double* sum, int64_t n, double count, double momentum, bool seen) {
  const double inv = 1.0 / count, take = (1.0 - momentum) * inv;
  if (!seen) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) proto[k] = static_cast<P>(sum[k] * inv);
    return;
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) proto[k] = static_cast<P>(momentum * static_cast<double>(proto[k]) + take * sum[k]);
}

// One clone per ISA level for each dtype pair (features and prototypes are float or double).
RDR_MULTIVERSION double dot(const float* a, const float* b, int64_t n) { return dot_of(a, b, n); }
RDR_MULTIVERSION double dot(const float* a, const double* b, int64_t n) { return dot_of(a, b, n); }
RDR_MULTIVERSION double dot(const double* a, const float* b, int64_t n) { return dot_of(a, b, n); }
RDR_MULTIVERSION double dot(const double* a, const double* b, int64_t n) { return dot_of(a, b, n); }
RDR_MULTIVERSION void dot4(const float* x, const float* const* y, int64_t n, double* out) { dot4_of(x, y, n, out); }
RDR_MULTIVERSION void dot4(const double* x, const double* const* y, int64_t n, double* out) { dot4_of(x, y, n, out); }
RDR_MULTIVERSION void add_row(double* acc, const float* x, int64_t n) { add_row_of(acc, x, n); }
RDR_MULTIVERSION void add_row(double* acc, const double* x, int64_t n) { add_row_of(acc, x, n); }
RDR_MULTIVERSION void blend_row(float* proto, const double* sum, int64_t n, double count, double momentum, bool seen) {
  blend_row_of(proto, sum, n, count, momentum, seen);
}
RDR_MULTIVERSION void blend_row(double* proto, const double* sum, int64_t n, double count, double momentum, bool seen) {
  blend_row_of(proto, sum, n, count, momentum, seen);
}

// The batch's rows grouped by class: the i-th present class, present[i], owns
// order[start[i] .. start[i + 1]), in batch order, so sums over a class run in a fixed
// order whatever the thread count. O(B + min(C, B log B)): with many classes (C may be
// 100 000) the rows are sorted instead of counted, so no step costs O(C).
struct ClassGroups {
  std::vector<int64_t> present;  // classes with at least one row, ascending
  std::vector<int64_t> start;    // [present + 1]
  std::vector<int64_t> order;    // [B]
};

ClassGroups group_by_class(const int64_t* labels, int64_t batch, int64_t num_classes) {
  ClassGroups g;
  g.order.resize(batch);
  if (num_classes <= 2 * batch) {  // counting sort: O(B + C) = O(B)
    std::vector<int64_t> next(num_classes + 1, 0);
    for (int64_t j = 0; j < batch; ++j) ++next[labels[j] + 1];
    for (int64_t c = 0; c < num_classes; ++c) next[c + 1] += next[c];
    for (int64_t j = 0; j < batch; ++j) g.order[next[labels[j]]++] = j;
  } else {  // comparison sort: O(B log B); stable, so each class keeps batch order
    for (int64_t j = 0; j < batch; ++j) g.order[j] = j;
    std::stable_sort(g.order.begin(), g.order.end(), [labels](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  }
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t c = labels[g.order[i]];
    if (g.present.empty() || g.present.back() != c) {
      g.present.push_back(c);
      g.start.push_back(i);
    }
  }
  g.start.push_back(batch);
  return g;
}

// λ = ridge · trace / b, or 1 for an all-zero block (any λ > 0 gives r = 0 there).
inline double ridge_of(double trace, int64_t b, double ridge) {
  return trace > 0.0 ? ridge * trace / static_cast<double>(b) : 1.0;
}

// Solves A x = rhs in place for a symmetric positive definite n×n row-major A: Cholesky
// A = L Lᵀ (row-oriented, L overwrites the lower triangle), then two triangular solves.
// Pivots stay ≥ λ > 0 for finite inputs, so no pivoting or failure path is needed.
// Its dot products are short (≤ b_c), so they are inlined rather than dispatched.
RDR_MULTIVERSION void cholesky_solve(double* a, double* rhs, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double* row_j = a + j * n;
    const double pivot = std::sqrt(row_j[j] - dot_of(row_j, row_j, j));
    row_j[j] = pivot;
    for (int64_t i = j + 1; i < n; ++i) {
      double* row_i = a + i * n;
      row_i[j] = (row_i[j] - dot_of(row_i, row_j, j)) / pivot;
    }
  }
  for (int64_t i = 0; i < n; ++i) rhs[i] = (rhs[i] - dot_of(a + i * n, rhs, i)) / a[i * n + i];
  for (int64_t i = n - 1; i >= 0; --i) {
    double s = rhs[i];
    for (int64_t k = i + 1; k < n; ++k) s -= a[k * n + i] * rhs[k];
    rhs[i] = s / a[i * n + i];
  }
}

// Scalar types of one call: T features (float or double), P prototypes (float or double).
template <typename T, typename P>
struct ClassStep {
  const T* z;              // [B, K] features
  int64_t dim;             // K
  const ClassGroups* groups;
  P* protos;               // [C, K], updated in place
  bool* seen;              // [C], updated in place
  double* ratios;          // [B], written for the rows of seen classes
  double ridge, momentum;
  bool solve, update;

  // b_c ≤ K: the b_c×b_c system (X_c X_cᵀ + λI) a = X_c P_c, then r = b_c a.
  void small_system(const int64_t* rows, int64_t b, const P* proto, std::vector<double>& scratch) const {
    scratch.resize(b * b + b);
    double* gram = scratch.data();
    double* coef = gram + b * b;
    double trace = 0.0;
    for (int64_t i = 0; i < b; ++i) {
      const T* xi = z + rows[i] * dim;
      int64_t l = 0;
      for (; l + 4 <= i + 1; l += 4) {
        const T* const y[4] = {z + rows[l] * dim, z + rows[l + 1] * dim, z + rows[l + 2] * dim, z + rows[l + 3] * dim};
        dot4(xi, y, dim, gram + i * b + l);
      }
      for (; l <= i; ++l) gram[i * b + l] = dot(xi, z + rows[l] * dim, dim);
      trace += gram[i * b + i];
      coef[i] = dot(xi, proto, dim);
    }
    const double lam = ridge_of(trace, b, ridge);
    for (int64_t i = 0; i < b; ++i) gram[i * b + i] += lam;
    cholesky_solve(gram, coef, b);
    for (int64_t i = 0; i < b; ++i) ratios[rows[i]] = std::max(static_cast<double>(b) * coef[i], kRatioFloor);
  }

  // b_c > K: the K×K system (X_cᵀ X_c + λI) u = P_c, then r = b_c X_c u.
  void large_system(const int64_t* rows, int64_t b, const P* proto, std::vector<double>& scratch) const {
    scratch.assign(dim * dim + 2 * dim, 0.0);
    double* gram = scratch.data();
    double* u = gram + dim * dim;
    double* x = u + dim;
    double trace = 0.0;
    for (int64_t i = 0; i < b; ++i) {
      const T* xi = z + rows[i] * dim;
      for (int64_t k = 0; k < dim; ++k) x[k] = static_cast<double>(xi[k]);
      for (int64_t p = 0; p < dim; ++p) {  // rank-1 update of the lower triangle
        double* row = gram + p * dim;
        const double xp = x[p];
#pragma omp simd
        for (int64_t q = 0; q <= p; ++q) row[q] += xp * x[q];
      }
      trace += dot(x, x, dim);
    }
    const double lam = ridge_of(trace, b, ridge);
    for (int64_t k = 0; k < dim; ++k) {
      gram[k * dim + k] += lam;
      u[k] = static_cast<double>(proto[k]);
    }
    cholesky_solve(gram, u, dim);
    for (int64_t i = 0; i < b; ++i) {
      ratios[rows[i]] = std::max(static_cast<double>(b) * dot(z + rows[i] * dim, u, dim), kRatioFloor);
    }
  }

  void update_prototype(const int64_t* rows, int64_t b, bool was_seen, P* proto, std::vector<double>& sum) const {
    sum.assign(dim, 0.0);
    for (int64_t i = 0; i < b; ++i) add_row(sum.data(), z + rows[i] * dim, dim);
    blend_row(proto, sum.data(), dim, static_cast<double>(b), momentum, was_seen);
  }

  // Runs classes present[first .. last): solve with the old prototype, then update it.
  void operator()(int64_t first, int64_t last) const {
    std::vector<double> scratch;
    for (int64_t i = first; i < last; ++i) {
      const int64_t c = groups->present[i];
      const int64_t* rows = groups->order.data() + groups->start[i];
      const int64_t b = groups->start[i + 1] - groups->start[i];
      P* proto = protos + c * dim;
      if (solve && seen[c]) {
        if (b <= dim) small_system(rows, b, proto, scratch);
        else large_system(rows, b, proto, scratch);
      }
      if (update) {
        update_prototype(rows, b, seen[c], proto, scratch);
        seen[c] = true;
      }
    }
  }
};

// Multiply-adds of one class, to balance the threads (head classes cost b_c² K).
int64_t class_work(int64_t b, int64_t dim, bool solve, bool update) {
  int64_t work = 1 + (update ? b * dim : 0);
  if (solve) {
    work += b <= dim ? b * (b + 3) / 2 * dim + b * b * b / 6 : b * dim * dim / 2 + dim * dim * dim / 6 + b * dim;
  }
  return work;
}

// Calls step(first, last) on consecutive runs of present classes, one run per thread,
// the runs cut at about equal work; small batches stay on the calling thread.
template <typename Step>
void for_each_class_run(const ClassGroups& g, int64_t dim, bool solve, bool update, const Step& step) {
  const int64_t n = static_cast<int64_t>(g.present.size());
  std::vector<int64_t> cumulative(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    cumulative[i + 1] = cumulative[i] + class_work(g.start[i + 1] - g.start[i], dim, solve, update);
  }
  const int64_t runs = std::min<int64_t>(at::get_num_threads(), n);
  if (cumulative[n] < kParallelWork || runs <= 1) {
    step(0, n);
    return;
  }
  std::vector<int64_t> bounds(runs + 1, n);
  bounds[0] = 0;
  for (int64_t r = 1; r < runs; ++r) {
    const int64_t target = cumulative[n] / runs * r;
    bounds[r] = std::lower_bound(cumulative.begin(), cumulative.end(), target) - cumulative.begin();
  }
  at::parallel_for(0, runs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) step(bounds[r], bounds[r + 1]);
  });
}

// The weights from the ratios (overwritten with the log-weights). Inputs are rounded to
// the compute dtype W first, as the PyTorch path does. The power is taken in log space and
// normalised there: log w = γ·log(r·factor), minus the batch max, exp, scaled to batch
// mean 1. (r·factor)^γ itself overflows or underflows double at large γ (γ = 50 does), but
// the shifted exponentials lie in (0, 1] with the largest exactly 1, so the sum is ≥ 1.
template <typename W>
void write_weights(double* ratios, const int64_t* labels, int64_t batch, const double* factors, double temperature,
                   WeightMode mode, W* out) {
  if (mode == WeightMode::kUniform) {
    std::fill(out, out + batch, static_cast<W>(1));
    return;
  }
  double peak = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < batch; ++j) {
    const double r = mode == WeightMode::kDensityRatio ? static_cast<double>(static_cast<W>(ratios[j])) : 1.0;
    const double log_w = temperature * std::log(static_cast<double>(static_cast<W>(factors[labels[j]])) * r);
    ratios[j] = log_w;
    peak = std::max(peak, log_w);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < batch; ++j) {
    ratios[j] = std::exp(ratios[j] - peak);
    sum += ratios[j];
  }
  const double scale = static_cast<double>(batch) / sum;
  for (int64_t j = 0; j < batch; ++j) out[j] = static_cast<W>(ratios[j] * scale);
}

void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
                  const at::Tensor& seen, const at::Tensor& class_factors, double ridge, double temperature,
                  double momentum) {
  RDR_CHECK_CPU(kOp, features);
  RDR_CHECK_CPU(kOp, labels);
  RDR_CHECK_CPU(kOp, prototypes);
  RDR_CHECK_CPU(kOp, seen);
  RDR_CHECK_CPU(kOp, class_factors);
  RDR_CHECK_DIM(kOp, features, 2);
  RDR_CHECK_FLOATING(kOp, features);
  RDR_CHECK_DIM(kOp, labels, 1);
  RDR_CHECK_INTEGER(kOp, labels);
  RDR_CHECK_LENGTH(kOp, labels, 0, features.size(0), "features (the batch)");
  RDR_CHECK_DIM(kOp, prototypes, 2);
  RDR_CHECK_FLOATING(kOp, prototypes);
  RDR_CHECK_LENGTH(kOp, prototypes, 1, features.size(1), "features (the feature width K)");
  RDR_CHECK_DIM(kOp, seen, 1);
  TORCH_CHECK(seen.scalar_type() == at::kBool, kOp, ": seen must be a bool tensor, got dtype ", seen.scalar_type());
  RDR_CHECK_LENGTH(kOp, seen, 0, prototypes.size(0), "prototypes (the classes)");
  RDR_CHECK_DIM(kOp, class_factors, 1);
  RDR_CHECK_FLOATING(kOp, class_factors);
  RDR_CHECK_LENGTH(kOp, class_factors, 0, prototypes.size(0), "prototypes (the classes)");
  TORCH_CHECK(std::isfinite(ridge) && ridge > 0.0, kOp, ": ridge must be > 0 and finite, got ", ridge);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, kOp, ": temperature must be >= 0 and finite, got ",
              temperature);
  TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, kOp, ": momentum must lie in [0, 1), got ", momentum);
}

// The state is computed on in place when it is float32/float64 prototypes and a bool
// `seen`, both contiguous (RDRLoss's buffers). Any other layout or floating dtype (bf16,
// fp16 prototypes) is computed on a float copy of only the rows of the classes present,
// written back afterwards: O(B·K) per step, never a copy of the C×K matrix.
bool state_in_place(const at::Tensor& prototypes, const at::Tensor& seen) {
  const bool native = prototypes.scalar_type() == at::kFloat || prototypes.scalar_type() == at::kDouble;
  return native && prototypes.is_contiguous() && seen.is_contiguous();
}

at::Tensor rdr_weights_and_update_cpu(const at::Tensor& features, const at::Tensor& labels,
                                      const at::Tensor& prototypes, const at::Tensor& seen,
                                      const at::Tensor& class_factors, double ridge, double temperature,
                                      double momentum, c10::string_view mode_name, bool update) {
  const WeightMode mode = parse_weight_mode(mode_name);
  check_inputs(features, labels, prototypes, seen, class_factors, ridge, temperature, momentum);
  const int64_t batch = features.size(0), dim = features.size(1), num_classes = prototypes.size(0);
  const at::Tensor y = rdr_fast::checked_labels(kOp, labels, num_classes);
  const bool is_double = features.scalar_type() == at::kDouble;
  at::Tensor weights = at::empty({batch}, features.options().dtype(is_double ? at::kDouble : at::kFloat));
  // bf16/fp16 features are upcast once (exactly) to float; float and double are read as they are.
  const at::Tensor z = (is_double ? features : features.to(at::kFloat)).contiguous();
  const at::Tensor factors = class_factors.to(at::kDouble).contiguous();
  ClassGroups groups = group_by_class(y.data_ptr<int64_t>(), batch, num_classes);
  at::Tensor protos = prototypes, flags = seen, present_rows;
  if (!state_in_place(prototypes, seen)) {  // the present classes' rows, renumbered 0..n−1
    present_rows = at::tensor(groups.present, y.options());
    const at::ScalarType work = prototypes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    protos = prototypes.index_select(0, present_rows).to(work).contiguous();
    flags = seen.index_select(0, present_rows).contiguous();
    for (size_t i = 0; i < groups.present.size(); ++i) groups.present[i] = static_cast<int64_t>(i);
  }
  std::vector<double> ratios(batch, 1.0);
  const bool solve = mode == WeightMode::kDensityRatio;
  if (solve || update) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rdr_weights_and_update_cpu", [&] {
      using feat_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(protos.scalar_type(), "rdr_weights_and_update_cpu", [&] {
        const ClassStep<feat_t, scalar_t> step{z.data_ptr<feat_t>(), dim, &groups, protos.data_ptr<scalar_t>(),
                                               flags.data_ptr<bool>(), ratios.data(), ridge, momentum, solve, update};
        for_each_class_run(groups, dim, solve, update, step);
      });
    });
  }
  if (update && present_rows.defined()) {
    prototypes.index_copy_(0, present_rows, protos.to(prototypes.scalar_type()));
    seen.index_copy_(0, present_rows, flags);
  }
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "rdr_weights_cpu", [&] {
    write_weights(ratios.data(), y.data_ptr<int64_t>(), batch, factors.data_ptr<double>(), temperature, mode,
                  weights.data_ptr<scalar_t>());
  });
  return weights;
}

}  // namespace

TORCH_LIBRARY_IMPL(rdr_fast, CPU, m) {
  m.impl("rdr_weights_and_update", &rdr_weights_and_update_cpu);
}
