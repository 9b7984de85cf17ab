// rdr_fast::weighted_loss on the CPU: the weighted loss, forward and gradient in one pass
// (docs/algorithm.md, "Base losses").
//
// For each row j (x = logits_j + logit_adjust, in the compute dtype S: double for double
// logits, else float):
//   log p_j = x_{y_j} − logsumexp(x),
//   ℓ_j = −(1 − p_j)^γ log p_j (γ = 0: cross-entropy; LA passes τ·log π as the adjust),
//   L = Σ_j w_j ℓ_j / B,
//   ∂L/∂x_jk = (w_j / B) · dℓ/dlog p_j · (1[k = y_j] − softmax(x_j)_k).
// Same formulas as rdr_fast/torch_impl.py (weighted_loss_torch and _focal_terms). Each
// row is read once into a scratch row, which then holds exp(x − max); the gradient is
// written from it in the logits' dtype. Rows run in parallel; the per-row losses are
// summed in row order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "multiversion.h"

namespace {

constexpr const char* kOp = "weighted_loss";
constexpr int64_t kParallelElems = 1 << 15;  // logits per thread (~20 µs) below which one thread is faster

// exp(x) for float in branch-free arithmetic the compiler can vectorise (std::exp is a
// scalar libm call): x = n ln2 + r with |r| ≤ ln2/2, e^r by Cephes' expf polynomial
// (about 1 ulp), 2^n through the exponent bits. Underflow (x < −87) gives 0.
RDR_ALWAYS_INLINE float exp_float(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

RDR_ALWAYS_INLINE double exp_of(double x) { return std::exp(x); }
RDR_ALWAYS_INLINE float exp_of(float x) { return exp_float(x); }

// The three row loops. `omp simd` vectorises their reductions and compare-selects without
// -ffast-math; a reduction's order is fixed per build, never per thread count.
template <typename S>
RDR_ALWAYS_INLINE S max_of(const S* x, int64_t n) {
  S m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

// e_k = exp(x_k − shift) (e may be x); returns Σ_k e_k.
template <typename S>
RDR_ALWAYS_INLINE S exp_shifted_sum_of(const S* x, S* e, int64_t n, S shift) {
  S sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    const S v = exp_of(static_cast<S>(x[k] - shift));
    e[k] = v;
    sum += v;
  }
  return sum;
}

template <typename S, typename T>
RDR_ALWAYS_INLINE void scale_into(const S* x, int64_t n, S scale, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(scale * x[k]);
}

// float, the training dtype, gets one clone per ISA level (the exp pass dominates).
RDR_MULTIVERSION float row_max(const float* x, int64_t n) { return max_of(x, n); }
RDR_MULTIVERSION float exp_shifted_sum(const float* x, float* e, int64_t n, float shift) {
  return exp_shifted_sum_of(x, e, n, shift);
}
RDR_MULTIVERSION void scale_row(const float* x, int64_t n, float scale, float* out) { scale_into(x, n, scale, out); }
double row_max(const double* x, int64_t n) { return max_of(x, n); }
double exp_shifted_sum(const double* x, double* e, int64_t n, double shift) {
  return exp_shifted_sum_of(x, e, n, shift);
}
template <typename S, typename T>
void scale_row(const S* x, int64_t n, S scale, T* out) { scale_into(x, n, scale, out); }

// ℓ = −(1−p)^γ log p and dℓ/dlog p = γ(1−p)^{γ−1} p log p − (1−p)^γ, in double.
inline void loss_terms(double log_pt, double gamma, double* loss, double* slope) {
  if (gamma == 0.0) {
    *loss = -log_pt;
    *slope = -1.0;
    return;
  }
  const double p = std::exp(log_pt);
  const double one_minus = std::max(1.0 - p, 0.0);
  const double modulator = std::pow(one_minus, gamma);
  // (1−p)^{γ−1} · log p → 0 as p → 1; guard the 0 · inf that γ < 1 would give there.
  const double d = one_minus > 0.0 ? gamma * std::pow(one_minus, gamma - 1.0) * p * log_pt : 0.0;
  *loss = -modulator * log_pt;
  *slope = d - modulator;
}

// One call's rows. T is the logits' dtype, S the compute dtype.
template <typename T, typename S>
struct LossRows {
  const T* logits;      // [B, C]
  const int64_t* labels;
  const S* weights;     // [B]
  const S* adjust;      // [C] or nullptr
  int64_t batch, classes;
  double gamma;
  T* grad;              // [B, C] or nullptr
  double* row_loss;     // [B], w_j ℓ_j / B

  void operator()(int64_t first, int64_t last) const {
    std::vector<S> e(classes);
    for (int64_t j = first; j < last; ++j) {
      const S* x = load_row(logits + j * classes, e.data());
      const int64_t y = labels[j];
      const S shift = row_max(x, classes);
      const double shifted_y = static_cast<double>(x[y] - shift);
      const double sum = exp_shifted_sum(x, e.data(), classes, shift);
      double loss, slope;
      loss_terms(shifted_y - std::log(sum), gamma, &loss, &slope);
      const double w = static_cast<double>(weights[j]) / static_cast<double>(batch);
      row_loss[j] = w * loss;
      if (grad != nullptr) write_grad(e.data(), y, w * slope, sum, grad + j * classes);
    }
  }

  // The row as S values: the logits themselves when no conversion or adjustment is
  // needed (saves a pass), else written into `buffer`.
  const S* load_row(const T* in, S* buffer) const {
    if constexpr (std::is_same_v<T, S>) {
      if (adjust == nullptr) return in;
    }
    if (adjust != nullptr) {
      for (int64_t k = 0; k < classes; ++k) buffer[k] = static_cast<S>(in[k]) + adjust[k];
    } else {
      for (int64_t k = 0; k < classes; ++k) buffer[k] = static_cast<S>(in[k]);
    }
    return buffer;
  }

  // g_k = coef · (1[k = y] − e_k / sum), from e = exp(x − max) held in x.
  void write_grad(const S* e, int64_t y, double coef, double sum, T* out) const {
    const S scale = static_cast<S>(-coef / sum);
    scale_row(e, classes, scale, out);
    out[y] = static_cast<T>(static_cast<double>(scale) * static_cast<double>(e[y]) + coef);
  }
};

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
                  const std::optional<at::Tensor>& logit_adjust, double focal_gamma) {
  RDR_CHECK_CPU(kOp, logits);
  RDR_CHECK_CPU(kOp, labels);
  RDR_CHECK_CPU(kOp, weights);
  RDR_CHECK_DIM(kOp, logits, 2);
  RDR_CHECK_FLOATING(kOp, logits);
  TORCH_CHECK(logits.size(1) > 0, kOp, ": logits must have at least one class column, got shape ", logits.sizes());
  RDR_CHECK_DIM(kOp, labels, 1);
  RDR_CHECK_INTEGER(kOp, labels);
  RDR_CHECK_LENGTH(kOp, labels, 0, logits.size(0), "logits (the batch)");
  RDR_CHECK_DIM(kOp, weights, 1);
  RDR_CHECK_FLOATING(kOp, weights);
  RDR_CHECK_LENGTH(kOp, weights, 0, logits.size(0), "logits (the batch)");
  if (logit_adjust.has_value()) {
    const at::Tensor& adjust = *logit_adjust;
    RDR_CHECK_CPU(kOp, adjust);
    RDR_CHECK_DIM(kOp, adjust, 1);
    RDR_CHECK_FLOATING(kOp, adjust);
    RDR_CHECK_LENGTH(kOp, adjust, 0, logits.size(1), "logits (the classes)");
  }
  TORCH_CHECK(std::isfinite(focal_gamma) && focal_gamma >= 0.0, kOp, ": focal_gamma must be >= 0 and finite, got ",
              focal_gamma);
}

std::tuple<at::Tensor, at::Tensor> weighted_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                     const at::Tensor& weights,
                                                     const std::optional<at::Tensor>& logit_adjust,
                                                     double focal_gamma, bool compute_grad) {
  check_inputs(logits, labels, weights, logit_adjust, focal_gamma);
  const int64_t batch = logits.size(0), classes = logits.size(1);
  const at::Tensor y = rdr_fast::checked_labels(kOp, labels, classes);
  const at::ScalarType compute = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.contiguous();
  const at::Tensor w = weights.to(compute).contiguous();
  const at::Tensor adjust = logit_adjust.has_value() ? logit_adjust->to(compute).contiguous() : at::Tensor();
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  std::vector<double> row_loss(batch, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "weighted_loss_cpu", [&] {
    using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const LossRows<scalar_t, compute_t> rows{
        x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w.data_ptr<compute_t>(),
        adjust.defined() ? adjust.data_ptr<compute_t>() : nullptr, batch, classes, focal_gamma,
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr, row_loss.data()};
    at::parallel_for(0, batch, std::max<int64_t>(1, kParallelElems / classes), rows);
  });
  double total = 0.0;
  for (double v : row_loss) total += v;
  return {at::scalar_tensor(total, logits.options().dtype(compute)), grad};
}

// True for the usual loss.backward(): a CPU scalar 1 and no double backward. Then the
// saved gradient is already the answer and the [B, C] multiply (a full pass over the
// logits, as long as the kernel's own) is skipped, as Liger's CE does. Only for a
// plain dense CPU tensor: reading a CUDA value would sync, and a fake or functional
// tensor (torch.compile tracing) has no value; they take the multiply.
bool is_plain_one(const at::Tensor& t) {
  return !at::GradMode::is_enabled() && t.numel() == 1 && t.device().is_cpu() && t.layout() == at::kStrided &&
         !at::isTensorSubclassLike(t) && t.item<double>() == 1.0;
}

// Autograd for the op on every device, in C++ (ops.py registers the same formula in
// Python when _C is absent). The Python path costs tens of µs of interpreter time per
// step in forward and backward, about as much as the whole kernel at B = 128, C = 100.
// Backward replays the gradient the forward saved: ∂L/∂logits · dL_out.
class WeightedLossFunction : public torch::autograd::Function<WeightedLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& labels, const at::Tensor& weights,
                                                const std::optional<at::Tensor>& logit_adjust, double focal_gamma,
                                                bool compute_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rdr_fast::weighted_loss", "")
                               .typed<decltype(weighted_loss_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad] = op.call(logits, labels, weights, logit_adjust, focal_gamma, compute_grad);
    ctx->save_for_backward({grad});
    // For a double backward only; plain references (no version check, which would refuse
    // a first-order backward after an in-place edit of the logits).
    ctx->saved_data["logits"] = logits;
    ctx->saved_data["labels"] = labels;
    ctx->saved_data["weights"] = weights;
    ctx->saved_data["logit_adjust"] = logit_adjust;
    ctx->saved_data["focal_gamma"] = focal_gamma;
    // The gradient output is data: no zero [B, C] gradient is ever made for it.
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(6);  // one per forward argument; only logits gets one
    const at::Tensor& grad_loss = grad_outputs[0];
    if (grad_loss.defined()) {
      const at::Tensor grad = at::GradMode::is_enabled() ? differentiable_grad(ctx) : ctx->get_saved_variables()[0];
      grads[0] = is_plain_one(grad_loss) ? grad : grad * grad_loss.to(grad.scalar_type());
    }
    return grads;
  }

 private:
  // Under create_graph=True: the gradient recomputed by rdr_fast::weighted_loss_grad
  // (rdr_fast/ops.py), made of differentiable torch ops, so it can be differentiated again.
  static at::Tensor differentiable_grad(torch::autograd::AutogradContext* ctx) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("rdr_fast::weighted_loss_grad", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, double)>();
    auto& saved = ctx->saved_data;
    const std::optional<at::Tensor> adjust = saved["logit_adjust"].toOptional<at::Tensor>();
    return op.call(saved["logits"].toTensor(), saved["labels"].toTensor(), saved["weights"].toTensor(), adjust,
                   saved["focal_gamma"].toDouble());
  }
};

std::tuple<at::Tensor, at::Tensor> weighted_loss_autograd(const at::Tensor& logits, const at::Tensor& labels,
                                                          const at::Tensor& weights,
                                                          const std::optional<at::Tensor>& logit_adjust,
                                                          double focal_gamma, bool compute_grad) {
  auto outputs = WeightedLossFunction::apply(logits, labels, weights, logit_adjust, focal_gamma, compute_grad);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rdr_fast, CPU, m) {
  m.impl("weighted_loss", &weighted_loss_cpu);
}

TORCH_LIBRARY_IMPL(rdr_fast, Autograd, m) {
  m.impl("weighted_loss", &weighted_loss_autograd);
}
