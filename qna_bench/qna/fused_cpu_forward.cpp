// The forward sweep of the fused loops (see fused_cpu.h): per output pixel and head, the numerators
// and denominators of every query, divided as they are written; the first `partials` queries' shares of
// z are kept for the backward.

#include "fused_cpu.h"

namespace qna_fused {
namespace {

template <typename T, int NV>
void forward(const T* __restrict exp_scores, const T* __restrict packed, const T* __restrict den_kernel,
             const T* __restrict num_kernel, const Shape s, T threshold, T* __restrict z, T* __restrict den,
             T* __restrict partials, int threads) {
    const int64_t qh = s.qh(), dim = s.head_dim();
#pragma omp parallel num_threads(threads)
    {
        HeadAcc<T, NV> nums[kQueryGroup];
        for (auto& a : nums) a.resize(dim);
        HeadAcc<T, NV> out;
        out.resize(dim);
        Window win(s.taps());
        T dens[kQueryGroup];
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t oy = 0; oy < s.out_h; ++oy) {
                for (int64_t ox = 0; ox < s.out_w; ++ox) {
                    const int64_t o = (b * s.out_h + oy) * s.out_w + ox;
                    win.inputs_of(b, oy, ox, s);
                    for (int64_t h = 0; h < s.heads; ++h) {
                        out.zero();
                        for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryGroup) {
                            window_sums(nums, win, exp_scores, packed, den_kernel, num_kernel, s, h, q0, dens);
                            for (int64_t q = q0; q < std::min<int64_t>(s.queries, q0 + kQueryGroup); ++q) {
                                const T d = dens[q - q0];
                                den[o * qh + q * s.heads + h] = d;
                                nums[q - q0].scale(T(1) / (d < threshold ? T(1) : d));
                                out.axpy(T(1), nums[q - q0]);
                                if (q < s.partials) nums[q - q0].store(partials + (o * s.partials + q) * s.features + h * dim);
                            }
                        }
                        out.store(z + o * s.features + h * dim);
                    }
                }
            }
        }
    }
}

// dims: batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride,
// partials.
template <typename T>
void run_forward(const T* e, const T* p, const T* rk, const T* wk, const int64_t* dims, double threshold, T* z,
                 T* den, T* partials, int threads) {
    const Shape s = make_shape(dims);
    by_head_vectors<T>(s, [&]<int NV>() { forward<T, NV>(e, p, rk, wk, s, T(threshold), z, den, partials, threads); });
}

}  // namespace
}  // namespace qna_fused

extern "C" void qna_forward_f32(const float* e, const float* p, const float* rk, const float* wk, const int64_t* dims,
                                double threshold, float* z, float* den, float* partials, int threads) {
    qna_fused::run_forward(e, p, rk, wk, dims, threshold, z, den, partials, threads);
}

extern "C" void qna_forward_f64(const double* e, const double* p, const double* rk, const double* wk,
                                const int64_t* dims, double threshold, double* z, double* den, double* partials,
                                int threads) {
    qna_fused::run_forward(e, p, rk, wk, dims, threshold, z, den, partials, threads);
}
