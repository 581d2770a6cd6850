// The backward sweeps of the fused loops (see fused_cpu.h): per output pixel, the denominators' and
// both kernels' gradients; per input pixel, the values' and the scores' gradients.

#include "fused_cpu.h"

namespace qna_fused {
namespace {

// The numerator kernels' gradients from one row of outputs (b, oy), added to grad (k, k, Q*h): at tap
// t, sum over the row of E(i) / den(o) * (g_z(o) . v(i)), kept per channel in registers along the row
// and summed over each head's channels once per tap. Needs the row's 1 / den in inv_den.
template <typename T, int NV>
void numerator_kernel_grads_of_row(const T* __restrict grad_z, const T* __restrict exp_scores,
                                   const T* __restrict packed, const T* __restrict inv_den, const Shape& s,
                                   int64_t b, int64_t oy, T* __restrict grad) {
    const int64_t qh = s.qh(), dim = s.head_dim();
    HeadAcc<T, NV> g;
    g.resize(dim);
    for (int64_t h = 0; h < s.heads; ++h) {
        for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryGroup) {
            const int count = int(std::min<int64_t>(kQueryGroup, s.queries - q0));
            const int64_t j0 = q0 * s.heads + h;
            for (int64_t ty = 0; ty < s.window; ++ty) {
                const int64_t iy = input_at(oy, ty, s, s.height);
                if (iy < 0) continue;
                for (int64_t tx = 0; tx < s.window; ++tx) {
                    HeadAcc<T, NV> acc[kQueryGroup];
                    for (auto& a : acc) {
                        a.resize(dim);
                        a.zero();
                    }
                    for (int64_t ox = 0; ox < s.out_w; ++ox) {
                        const int64_t ix = input_at(ox, tx, s, s.width);
                        if (ix < 0) continue;
                        const int64_t o = (b * s.out_h + oy) * s.out_w + ox;
                        const int64_t i = (b * s.height + iy) * s.width + ix;
                        g.set(grad_z + o * s.features + h * dim);
                        const T* v = packed + i * s.pixel_stride + h * dim;
                        for (int u = 0; u < kQueryGroup; ++u) {
                            if (u < count) {
                                const int64_t j = j0 + u * s.heads;
                                acc[u].axpy_product(exp_scores[i * qh + j] * inv_den[o * qh + j], g, v);
                            }
                        }
                    }
                    for (int u = 0; u < count; ++u) grad[(ty * s.window + tx) * qh + j0 + u * s.heads] += acc[u].sum();
                }
            }
        }
    }
}

// Pass 1, per output pixel: the denominators' gradients and both kernel gradients. With
// g_num = g_z / den, dL/dden = -g_z . y / den for each query's share y = num / den of z (kept by the
// forward, the last one z less the others), and the numerator kernel's gradient at tap t is
// sum_o E(i) (g_z(o) . v(i)) / den (`numerator_kernel_grads_of_row`).
template <typename T, int NV>
void backward_outputs(const T* __restrict grad_z, const T* __restrict exp_scores, const T* __restrict packed,
                      const T* __restrict den, const T* __restrict z, const T* __restrict partials, const Shape s,
                      bool kernel_grads, T* __restrict inv_den, T* __restrict grad_den,
                      T* __restrict grad_den_kernel, T* __restrict grad_num_kernel, int threads) {
    const int64_t qh = s.qh(), dim = s.head_dim(), taps = s.taps();
    std::fill(grad_den_kernel, grad_den_kernel + taps * qh, T(0));
    std::fill(grad_num_kernel, grad_num_kernel + taps * qh, T(0));
#pragma omp parallel num_threads(threads)
    {
        HeadAcc<T, NV> g, last;
        g.resize(dim);
        last.resize(dim);
        Window win(taps);
        std::vector<T> g_den_kernel(kernel_grads ? taps * qh : 0), g_num_kernel(kernel_grads ? taps * qh : 0);
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t oy = 0; oy < s.out_h; ++oy) {
                for (int64_t ox = 0; ox < s.out_w; ++ox) {
                    const int64_t o = (b * s.out_h + oy) * s.out_w + ox;
                    win.inputs_of(b, oy, ox, s);
                    const int64_t* pixel = win.pixel.data();
                    const int64_t* tap = win.tap.data();
                    T* inv = inv_den + o * qh;
                    T* gd = grad_den + o * qh;
                    for (int64_t j = 0; j < qh; ++j) inv[j] = T(1) / den[o * qh + j];
                    for (int64_t h = 0; h < s.heads; ++h) {
                        g.set(grad_z + o * s.features + h * dim);
                        auto share = [&](int64_t q) { return partials + (o * s.partials + q) * s.features + h * dim; };
                        if (s.partials < s.queries) {
                            last.set(z + o * s.features + h * dim);
                            for (int64_t q = 0; q < s.partials; ++q) last.axpy(T(-1), share(q));
                        }
                        for (int64_t q = 0; q < s.queries; ++q) {
                            const int64_t j = q * s.heads + h;
                            const T dot = q < s.partials ? g.dot(share(q)) : last.dot(grad_z + o * s.features + h * dim);
                            gd[j] = -dot * inv[j];
                        }
                    }
                    if (!kernel_grads) continue;
                    for (int64_t n = 0; n < win.size; ++n) {
                        const T* e = exp_scores + pixel[n] * qh;
                        T* gk = g_den_kernel.data() + tap[n] * qh;
                        for (int64_t j = 0; j < qh; ++j) gk[j] += gd[j] * e[j];
                    }
                }
                if (kernel_grads) {
                    numerator_kernel_grads_of_row<T, NV>(grad_z, exp_scores, packed, inv_den, s, b, oy, g_num_kernel.data());
                }
            }
        }
        if (kernel_grads) {
#pragma omp critical
            for (int64_t j = 0; j < taps * qh; ++j) {
                grad_den_kernel[j] += g_den_kernel[j];
                grad_num_kernel[j] += g_num_kernel[j];
            }
        }
    }
}

// Pass 2, per input pixel: gathers g_num * w and dL/dden * exp(b) over the outputs whose windows read
// it, then writes the values' gradient and the exp-scores' gradient times E (the scores' gradient).
template <typename T, int NV>
void backward_inputs(const T* __restrict grad_z, const T* __restrict exp_scores, const T* __restrict packed,
                     const T* __restrict inv_den, const T* __restrict grad_den, const T* __restrict den_kernel,
                     const T* __restrict num_kernel, const Shape s, T* __restrict grad_packed, int threads) {
    const int64_t qh = s.qh(), dim = s.head_dim(), features = s.features;
#pragma omp parallel num_threads(threads)
    {
        HeadAcc<T, NV> nums[kQueryGroup];
        for (auto& a : nums) a.resize(dim);
        HeadAcc<T, NV> grad_values;
        grad_values.resize(dim);
        Window win(s.taps());
        T g_exp[kQueryGroup];
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t iy = 0; iy < s.height; ++iy) {
                for (int64_t ix = 0; ix < s.width; ++ix) {
                    const int64_t i = (b * s.height + iy) * s.width + ix;
                    win.outputs_of(b, iy, ix, s);
                    const int64_t* out = win.pixel.data();
                    const int64_t* tap = win.tap.data();
                    const T* v = packed + i * s.pixel_stride;
                    T* gp = grad_packed + i * (features + qh);
                    for (int64_t h = 0; h < s.heads; ++h) {
                        grad_values.zero();
                        for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryGroup) {
                            const int64_t j0 = q0 * s.heads + h;
                            accumulate(
                                nums, g_exp, int(std::min<int64_t>(kQueryGroup, s.queries - q0)), win.size, dim,
                                [&](int64_t n, int u) { return num_kernel[tap[n] * qh + j0 + u * s.heads] * inv_den[out[n] * qh + j0 + u * s.heads]; },
                                [&](int64_t n, int u) { return den_kernel[tap[n] * qh + j0 + u * s.heads] * grad_den[out[n] * qh + j0 + u * s.heads]; },
                                [&](int64_t n) { return grad_z + out[n] * features + h * dim; });
                            for (int64_t q = q0; q < std::min<int64_t>(s.queries, q0 + kQueryGroup); ++q) {
                                const int64_t j = q * s.heads + h;
                                const T e = exp_scores[i * qh + j];
                                gp[features + j] = (nums[q - q0].dot(v + h * dim) + g_exp[q - q0]) * e;
                                grad_values.axpy(e, nums[q - q0]);
                            }
                        }
                        grad_values.store(gp + h * dim);
                    }
                }
            }
        }
    }
}

// dims: batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride,
// partials.
template <typename T>
void run_backward(const T* gz, const T* e, const T* p, const T* den, const T* z, const T* partials, const T* rk,
                  const T* wk, const int64_t* dims, int kernel_grads, T* inv_den, T* grad_den, T* grad_rk, T* grad_wk,
                  T* grad_packed, int threads) {
    const Shape s = make_shape(dims);
    by_head_vectors<T>(s, [&]<int NV>() {
        backward_outputs<T, NV>(gz, e, p, den, z, partials, s, kernel_grads != 0, inv_den, grad_den, grad_rk,
                                grad_wk, threads);
        backward_inputs<T, NV>(gz, e, p, inv_den, grad_den, rk, wk, s, grad_packed, threads);
    });
}

}  // namespace
}  // namespace qna_fused

extern "C" void qna_backward_f32(const float* gz, const float* e, const float* p, const float* den, const float* z,
                                 const float* partials, const float* rk, const float* wk, const int64_t* dims,
                                 int kernel_grads, float* inv_den, float* grad_den, float* grad_rk, float* grad_wk,
                                 float* grad_packed, int threads) {
    qna_fused::run_backward(gz, e, p, den, z, partials, rk, wk, dims, kernel_grads, inv_den, grad_den, grad_rk,
                            grad_wk, grad_packed, threads);
}

extern "C" void qna_backward_f64(const double* gz, const double* e, const double* p, const double* den,
                                 const double* z, const double* partials, const double* rk, const double* wk,
                                 const int64_t* dims, int kernel_grads, double* inv_den, double* grad_den,
                                 double* grad_rk, double* grad_wk, double* grad_packed, int threads) {
    qna_fused::run_backward(gz, e, p, den, z, partials, rk, wk, dims, kernel_grads, inv_den, grad_den, grad_rk,
                            grad_wk, grad_packed, threads);
}
