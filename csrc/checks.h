// Input checks shared by the CPU kernels. Each message names the op, the argument and
// what is wrong with it; TORCH_CHECK surfaces as a Python RuntimeError.
#pragma once

#include <ATen/ATen.h>

#define RDR_CHECK_CPU(op, x) \
  TORCH_CHECK((x).device().is_cpu(), op, ": " #x " must be a CPU tensor, got device ", (x).device())

#define RDR_CHECK_DIM(op, x, n) \
  TORCH_CHECK((x).dim() == (n), op, ": " #x " must be " #n "-D, got shape ", (x).sizes())

#define RDR_CHECK_FLOATING(op, x)                                                                   \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), op, ": " #x " must be a floating-point tensor, " \
              "got dtype ", (x).scalar_type())

#define RDR_CHECK_INTEGER(op, x)                                                                  \
  TORCH_CHECK(at::isIntegralType((x).scalar_type(), /*includeBool=*/false),                       \
              op, ": " #x " must be an integer tensor (int64), got dtype ", (x).scalar_type())

#define RDR_CHECK_LENGTH(op, x, dim, n, what)                                                     \
  TORCH_CHECK((x).size(dim) == (n), op, ": " #x " has ", (x).size(dim), " entries along dim " #dim \
              " but ", what, " has ", (n))

namespace rdr_fast {

// Labels as a contiguous int64 tensor, every value checked to lie in [0, num_classes).
inline at::Tensor checked_labels(const char* op, const at::Tensor& labels, int64_t num_classes) {
  at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t* data = y.data_ptr<int64_t>();
  for (int64_t j = 0; j < y.numel(); ++j) {
    TORCH_CHECK(data[j] >= 0 && data[j] < num_classes, op, ": labels must lie in [0, ", num_classes,
                "), got ", data[j], " at position ", j);
  }
  return y;
}

}  // namespace rdr_fast
