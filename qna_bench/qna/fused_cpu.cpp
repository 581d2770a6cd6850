// QnA's windowed softmax core as direct loops over each window, for CPUs: one pass over the taps
// computes a pixel's denominators and numerators together, and the backward needs two passes, with no
// per-tap temporaries. Compiled where it runs (`qna_bench.qna.fused_cpu`) and called through ctypes.
//
// Layouts (row-major): E (B, H, W, Q*h) exp(s - m); values read from `packed` (B, H, W, ps), the first
// F channels of each pixel; den_kernel and num_kernel (k, k, Q*h): exp(b) and exp(b) * mixing, tap-major;
// z and grad_z (B, OH, OW, F); den (B, OH, OW, Q*h); grad_packed (B, H, W, F + Q*h). Input pixel of
// output o and tap t: o * stride - pad + t, zero outside the image.

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct Shape {
    int64_t batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride;
    int64_t qh() const { return queries * heads; }
    int64_t head_dim() const { return features / heads; }
    int64_t taps() const { return window * window; }
};

// The input index along one axis of output `o` at tap `t`, or -1 outside the image.
inline int64_t input_at(int64_t o, int64_t t, const Shape& s, int64_t size) {
    const int64_t i = o * s.stride - s.pad + t;
    return (i >= 0 && i < size) ? i : -1;
}

// The output index along one axis whose tap `t` reads input `i`, or -1 where none does.
inline int64_t output_at(int64_t i, int64_t t, const Shape& s, int64_t out_size) {
    const int64_t scaled = i + s.pad - t;
    if (scaled < 0 || scaled % s.stride != 0) return -1;
    const int64_t o = scaled / s.stride;
    return o < out_size ? o : -1;
}

typedef float floats64 __attribute__((vector_size(64)));
typedef double doubles64 __attribute__((vector_size(64)));
template <typename T> struct Vector64;
template <> struct Vector64<float> { using type = floats64; };
template <> struct Vector64<double> { using type = doubles64; };

// One head's channels as an accumulator: NV vectors of 64 bytes held in registers (GCC's vector
// extension, lowered to the widest the target has), or, with NV = 0, any number of channels in memory.
template <typename T, int NV>
struct HeadAcc {
    using Vec = typename Vector64<T>::type;
    static constexpr int lanes = 64 / sizeof(T);
    Vec v[NV];
    void resize(int64_t) {}
    static Vec load(const T* x) { Vec r; std::memcpy(&r, x, sizeof(Vec)); return r; }
    void zero() { for (int i = 0; i < NV; ++i) v[i] = Vec{}; }
    void axpy(T c, const T* x) { for (int i = 0; i < NV; ++i) v[i] += c * load(x + i * lanes); }
    void axpy(T c, const HeadAcc& x) { for (int i = 0; i < NV; ++i) v[i] += c * x.v[i]; }
    void set(const T* x) { for (int i = 0; i < NV; ++i) v[i] = load(x + i * lanes); }
    void axpy_product(T c, const HeadAcc& x, const T* y) {
        for (int i = 0; i < NV; ++i) v[i] += c * (x.v[i] * load(y + i * lanes));
    }
    T dot(const T* x) const {
        Vec sum = v[0] * load(x);
        for (int i = 1; i < NV; ++i) sum += v[i] * load(x + i * lanes);
        return total(sum);
    }
    T sum() const {
        Vec sum = v[0];
        for (int i = 1; i < NV; ++i) sum += v[i];
        return total(sum);
    }
    static T total(Vec sum) {
        T part[lanes];
        std::memcpy(part, &sum, sizeof(sum));
        for (int width = lanes / 2; width > 0; width /= 2) {
            for (int l = 0; l < width; ++l) part[l] += part[l + width];
        }
        return part[0];
    }
    void store(T* x) const { std::memcpy(x, v, sizeof(v)); }
};

template <typename T>
struct HeadAcc<T, 0> {
    std::vector<T> v;
    void resize(int64_t dim) { v.assign(dim, T(0)); }
    void zero() { std::fill(v.begin(), v.end(), T(0)); }
    void axpy(T c, const T* x) { for (size_t d = 0; d < v.size(); ++d) v[d] += c * x[d]; }
    void axpy(T c, const HeadAcc& x) { for (size_t d = 0; d < v.size(); ++d) v[d] += c * x.v[d]; }
    void set(const T* x) { std::copy(x, x + v.size(), v.begin()); }
    void axpy_product(T c, const HeadAcc& x, const T* y) {
        for (size_t d = 0; d < v.size(); ++d) v[d] += c * (x.v[d] * y[d]);
    }
    T dot(const T* x) const {
        T total = 0;
        for (size_t d = 0; d < v.size(); ++d) total += v[d] * x[d];
        return total;
    }
    T sum() const {
        T total = 0;
        for (size_t d = 0; d < v.size(); ++d) total += v[d];
        return total;
    }
    void store(T* x) const { std::copy(v.begin(), v.end(), x); }
};

// The (pixel, tap) pairs of one window: the input pixels an output reads, or the outputs whose
// windows read an input, each with the tap that links them.
struct Window {
    std::vector<int64_t> pixel, tap;
    int64_t size = 0;
    explicit Window(int64_t taps) : pixel(taps), tap(taps) {}
    void inputs_of(int64_t b, int64_t oy, int64_t ox, const Shape& s) {
        size = 0;
        for (int64_t ty = 0; ty < s.window; ++ty) {
            const int64_t iy = input_at(oy, ty, s, s.height);
            if (iy < 0) continue;
            for (int64_t tx = 0; tx < s.window; ++tx) {
                const int64_t ix = input_at(ox, tx, s, s.width);
                if (ix < 0) continue;
                pixel[size] = (b * s.height + iy) * s.width + ix;
                tap[size++] = ty * s.window + tx;
            }
        }
    }
    void outputs_of(int64_t b, int64_t iy, int64_t ix, const Shape& s) {
        size = 0;
        for (int64_t ty = 0; ty < s.window; ++ty) {
            const int64_t oy = output_at(iy, ty, s, s.out_h);
            if (oy < 0) continue;
            for (int64_t tx = 0; tx < s.window; ++tx) {
                const int64_t ox = output_at(ix, tx, s, s.out_w);
                if (ox < 0) continue;
                pixel[size] = (b * s.out_h + oy) * s.out_w + ox;
                tap[size++] = ty * s.window + tx;
            }
        }
    }
};

// Queries accumulated in one sweep over a window (their coefficients differ, the rows they scale do not),
// each in two accumulators (even and odd taps): independent chains of fused multiply-adds that hide
// their latency and share each row's loads.
constexpr int kQueryGroup = 2;
constexpr int kChains = 2;

// result[u] = sum over n < size of coef(n, u) * row(n), for the queries u < count (<= kQueryGroup) of a
// group, and sums[u] the same sum of den_coef(n, u). The accumulators are locals, so that the compiler
// keeps them in registers.
template <typename T, int NV, typename Coef, typename DenCoef, typename Row>
__attribute__((always_inline)) inline void accumulate(HeadAcc<T, NV>* result, T* sums, int count, int64_t size,
                                                      int64_t dim, Coef coef, DenCoef den_coef, Row row) {
    HeadAcc<T, NV> acc[kChains][kQueryGroup];
    T partial[kChains][kQueryGroup] = {};
    for (auto& chain : acc) {
        for (auto& a : chain) {
            a.resize(dim);
            a.zero();
        }
    }
    int64_t n = 0;
    for (; n + kChains <= size; n += kChains) {
        for (int c = 0; c < kChains; ++c) {
            const T* x = row(n + c);
            for (int u = 0; u < kQueryGroup; ++u) {
                if (u < count) {
                    partial[c][u] += den_coef(n + c, u);
                    acc[c][u].axpy(coef(n + c, u), x);
                }
            }
        }
    }
    for (; n < size; ++n) {
        const T* x = row(n);
        for (int u = 0; u < kQueryGroup; ++u) {
            if (u < count) {
                partial[0][u] += den_coef(n, u);
                acc[0][u].axpy(coef(n, u), x);
            }
        }
    }
    for (int u = 0; u < kQueryGroup; ++u) {
        if (u >= count) break;
        sums[u] = partial[0][u];
        result[u] = acc[0][u];
        for (int c = 1; c < kChains; ++c) {
            sums[u] += partial[c][u];
            result[u].axpy(T(1), acc[c][u]);
        }
    }
}

// The numerators and denominators of one output pixel's window for the queries q0.. of head h:
// acc[0][u] = sum_n w(t_n) E(i_n) v_h(i_n), dens[u] = sum_n exp(b)(t_n) E(i_n).
template <typename T, int NV>
__attribute__((always_inline)) inline void window_sums(HeadAcc<T, NV>* nums, const Window& win, const T* exp_scores, const T* packed,
                 const T* den_kernel, const T* num_kernel, const Shape& s, int64_t h, int64_t q0, T* dens) {
    const int64_t qh = s.qh(), dim = s.head_dim();
    const int count = int(std::min<int64_t>(kQueryGroup, s.queries - q0));
    const int64_t* pixel = win.pixel.data();
    const int64_t* tap = win.tap.data();
    const int64_t j0 = q0 * s.heads + h;
    auto at = [&](int64_t n, int u) { return j0 + u * s.heads; };
    accumulate(
        nums, dens, count, win.size, dim,
        [&](int64_t n, int u) { return num_kernel[tap[n] * qh + at(n, u)] * exp_scores[pixel[n] * qh + at(n, u)]; },
        [&](int64_t n, int u) { return den_kernel[tap[n] * qh + at(n, u)] * exp_scores[pixel[n] * qh + at(n, u)]; },
        [&](int64_t n) { return packed + pixel[n] * s.pixel_stride + h * dim; });
}

template <typename T, int NV>
void forward(const T* __restrict exp_scores, const T* __restrict packed, const T* __restrict den_kernel,
             const T* __restrict num_kernel, const Shape s, T threshold, T* __restrict z, T* __restrict den,
             int threads) {
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
                                out.axpy(T(1) / (d < threshold ? T(1) : d), nums[q - q0]);
                            }
                        }
                        out.store(z + o * s.features + h * dim);
                    }
                }
            }
        }
    }
}

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
// g_num = g_z / den, dL/dden = -g_z . num / den / den (the numerators recomputed), and the numerator
// kernel's gradient at tap t is sum_o E(i) (g_z(o) . v(i)) / den, kept per channel (vectors, no
// horizontal sum per tap) and summed over each head's channels at the end.
template <typename T, int NV>
void backward_outputs(const T* __restrict grad_z, const T* __restrict exp_scores, const T* __restrict packed,
                      const T* __restrict den, const T* __restrict den_kernel, const T* __restrict num_kernel,
                      const Shape s, bool kernel_grads, T* __restrict inv_den, T* __restrict grad_den,
                      T* __restrict grad_den_kernel, T* __restrict grad_num_kernel, int threads) {
    const int64_t qh = s.qh(), dim = s.head_dim(), taps = s.taps();
    std::fill(grad_den_kernel, grad_den_kernel + taps * qh, T(0));
    std::fill(grad_num_kernel, grad_num_kernel + taps * qh, T(0));
#pragma omp parallel num_threads(threads)
    {
        HeadAcc<T, NV> nums[kQueryGroup];
        for (auto& a : nums) a.resize(dim);
        Window win(taps);
        T dens[kQueryGroup];
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
                        const T* g_row = grad_z + o * s.features + h * dim;
                        for (int64_t q0 = 0; q0 < s.queries; q0 += kQueryGroup) {
                            window_sums(nums, win, exp_scores, packed, den_kernel, num_kernel, s, h, q0, dens);
                            for (int64_t q = q0; q < std::min<int64_t>(s.queries, q0 + kQueryGroup); ++q) {
                                const int64_t j = q * s.heads + h;
                                gd[j] = -(nums[q - q0].dot(g_row) * inv[j]) * inv[j];
                            }
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

Shape make_shape(const int64_t* dims) {
    return Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                 dims[7], dims[8], dims[9], dims[10], dims[11]};
}

// Calls `run.template operator()<NV>()` with NV the number of 64-byte vectors of a head's channels
// (1, 2, 4 or 8), or 0 where they do not fill whole vectors.
template <typename T, typename Run>
void by_head_vectors(const Shape& s, Run run) {
    const int64_t bytes = s.head_dim() * int64_t(sizeof(T));
    switch (bytes % 64 == 0 ? bytes / 64 : 0) {
        case 1: run.template operator()<1>(); break;
        case 2: run.template operator()<2>(); break;
        case 4: run.template operator()<4>(); break;
        case 8: run.template operator()<8>(); break;
        default: run.template operator()<0>(); break;
    }
}

}  // namespace

// dims: batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride.
#define QNA_EXPORTS(T, SUFFIX)                                                                          \
    extern "C" void qna_forward_##SUFFIX(const T* e, const T* p, const T* rk, const T* wk,              \
                                         const int64_t* dims, double threshold, T* z, T* den,          \
                                         int threads) {                                                 \
        const Shape s = make_shape(dims);                                                               \
        by_head_vectors<T>(s, [&]<int NV>() {                                                           \
            forward<T, NV>(e, p, rk, wk, s, T(threshold), z, den, threads);                             \
        });                                                                                             \
    }                                                                                                   \
    extern "C" void qna_backward_##SUFFIX(const T* gz, const T* e, const T* p, const T* den,            \
                                          const T* rk, const T* wk, const int64_t* dims,               \
                                          int kernel_grads, T* inv_den, T* grad_den, T* grad_rk,        \
                                          T* grad_wk, T* grad_packed, int threads) {                    \
        const Shape s = make_shape(dims);                                                               \
        by_head_vectors<T>(s, [&]<int NV>() {                                                           \
            backward_outputs<T, NV>(gz, e, p, den, rk, wk, s, kernel_grads != 0, inv_den, grad_den,         \
                                    grad_rk, grad_wk, threads);                                         \
            backward_inputs<T, NV>(gz, e, p, inv_den, grad_den, rk, wk, s, grad_packed, threads);       \
        });                                                                                             \
    }

QNA_EXPORTS(float, f32)
QNA_EXPORTS(double, f64)
