// rdr_fast::data_ok on the CPU: every data check of one API call (label range, NaN/Inf,
// magnitude) in one pass over each tensor, and one dispatch instead of a few torch calls
// per tensor (each costs more than reading a batch's values). It answers only "all good?":
// on false, rdr_fast/_checks.py runs its precise checks, which give the message, so the
// messages are those of the Python checks on every device and backend.
//
// Checks (the PyTorch version is data_ok_torch in rdr_fast/torch_impl.py):
//   - every label lies in [0, num_classes);
//   - every element x of values[i] satisfies |x| <= limits[i] (an infinite limit: the
//     dtype's largest finite value), which fails for NaN and ±Inf;
//   - if given, the rows of `labelled_rows` [C, K] that the labels name are finite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "multiversion.h"

namespace {

constexpr const char* kOp = "data_ok";

// Whether some |x[k]| exceeds `limit` or is NaN, in one vectorised pass: a count of
// compare results (no early exit, no bool reduction: either keeps the loop scalar).
// Blocks of at most 2^30 elements keep the int32 count from overflowing.
template <typename T, typename S>
RDR_ALWAYS_INLINE bool any_beyond_of(const T* x, int64_t n, S limit) {
  for (int64_t first = 0; first < n; first += int64_t{1} << 30) {
    const int64_t last = std::min(n, first + (int64_t{1} << 30));
    int32_t bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t k = first; k < last; ++k) bad += std::abs(static_cast<S>(x[k])) <= limit ? 0 : 1;
    if (bad != 0) return true;
  }
  return false;
}

RDR_MULTIVERSION bool any_beyond(const float* x, int64_t n, float limit) { return any_beyond_of(x, n, limit); }
RDR_MULTIVERSION bool any_beyond(const double* x, int64_t n, double limit) { return any_beyond_of(x, n, limit); }
bool any_beyond(const at::BFloat16* x, int64_t n, float limit) { return any_beyond_of(x, n, limit); }
bool any_beyond(const at::Half* x, int64_t n, float limit) { return any_beyond_of(x, n, limit); }

// The limit in the type the comparison runs in: an infinite or too large limit becomes
// the largest finite value, so that |x| <= limit also means "finite".
template <typename S>
S finite_limit(double limit, double dtype_max) {
  return static_cast<S>(std::min(limit, dtype_max));
}

bool values_ok(const at::Tensor& t, double limit) {
  const at::Tensor x = t.contiguous();
  const int64_t n = x.numel();
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kOp, [&] {
    using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const double dtype_max = static_cast<double>(std::numeric_limits<scalar_t>::max());
    bad = any_beyond(x.data_ptr<scalar_t>(), n, finite_limit<compare_t>(limit, dtype_max));
  });
  return !bad;
}

template <typename L>
bool any_outside(const L* y, int64_t n, int64_t num_classes) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t j = 0; j < n; ++j) {
    bad += static_cast<int64_t>(y[j]) >= 0 && static_cast<int64_t>(y[j]) < num_classes ? 0 : 1;
  }
  return bad != 0;
}

bool labels_ok(const at::Tensor& labels, int64_t num_classes) {
  const at::Tensor y = labels.contiguous();
  bool bad = false;
  AT_DISPATCH_INTEGRAL_TYPES(y.scalar_type(), kOp, [&] { bad = any_outside(y.data_ptr<scalar_t>(), y.numel(), num_classes); });
  return !bad;
}

// The rows of `rows` [C, K] named by the labels (already known to lie in [0, C)) are finite.
bool labelled_rows_ok(const at::Tensor& rows, const at::Tensor& labels) {
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const at::Tensor m = rows.contiguous();
  const int64_t width = m.size(1);
  const int64_t* label = y.data_ptr<int64_t>();
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), kOp, [&] {
    using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto limit = static_cast<compare_t>(static_cast<double>(std::numeric_limits<scalar_t>::max()));
    const scalar_t* data = m.data_ptr<scalar_t>();
    for (int64_t j = 0; j < y.numel() && !bad; ++j) bad = any_beyond(data + label[j] * width, width, limit);
  });
  return !bad;
}

bool data_ok_cpu(const at::Tensor& labels, int64_t num_classes, at::TensorList values, at::ArrayRef<double> limits,
                 const std::optional<at::Tensor>& labelled_rows) {
  RDR_CHECK_CPU(kOp, labels);
  RDR_CHECK_DIM(kOp, labels, 1);
  RDR_CHECK_INTEGER(kOp, labels);
  TORCH_CHECK(values.size() == limits.size(), kOp, ": ", values.size(), " values but ", limits.size(), " limits");
  if (!labels_ok(labels, num_classes)) return false;
  for (size_t i = 0; i < values.size(); ++i) {
    RDR_CHECK_CPU(kOp, values[i]);
    RDR_CHECK_FLOATING(kOp, values[i]);
    if (!values_ok(values[i], limits[i])) return false;
  }
  if (!labelled_rows.has_value()) return true;
  const at::Tensor& rows = *labelled_rows;
  RDR_CHECK_CPU(kOp, rows);
  RDR_CHECK_DIM(kOp, rows, 2);
  RDR_CHECK_FLOATING(kOp, rows);
  TORCH_CHECK(rows.size(0) == num_classes, kOp, ": labelled_rows has ", rows.size(0), " rows but there are ",
              num_classes, " classes");
  return labelled_rows_ok(rows, labels);
}

}  // namespace

TORCH_LIBRARY_IMPL(rdr_fast, CPU, m) {
  m.impl("data_ok", &data_ok_cpu);
}
