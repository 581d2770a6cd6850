// QnA's windowed softmax core as direct loops over each window, for CPUs (`qna_bench.qna.fused_cpu`
// compiles fused_cpu_forward.cpp and fused_cpu_backward.cpp into one library and calls it through
// ctypes): one sweep over the taps computes a pixel's denominators and numerators together, the
// backward takes two more, and nothing of size k^2 per pixel is stored. This header: the shapes, the
// accumulators and the window sweeps both files share.
//
// Layouts (row-major): E (B, H, W, Q*h) exp(s - m); values read from `packed` (B, H, W, ps), the first
// F channels of each pixel; den_kernel and num_kernel (k, k, Q*h): exp(b) and exp(b) * mixing, tap-major;
// z and grad_z (B, OH, OW, F); den (B, OH, OW, Q*h); grad_packed (B, H, W, F + Q*h). Input pixel of
// output o and tap t: o * stride - pad + t, zero outside the image.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qna_fused {

// partials: the queries whose share of z, num / den (B, OH, OW, partials, F), the forward keeps for the
// backward (the queries less one, whose share is z less the others'; or all of them).
struct Shape {
    int64_t batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride, partials;
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
    void scale(T c) { for (int i = 0; i < NV; ++i) v[i] *= c; }
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
    void scale(T c) { for (T& x : v) x *= c; }
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
    // The input pixels that output (b, oy, ox) reads.
    void inputs_of(int64_t b, int64_t oy, int64_t ox, const Shape& s) {
        collect(b, oy, ox, s, input_at, s.height, s.width);
    }
    // The outputs whose windows read input (b, iy, ix).
    void outputs_of(int64_t b, int64_t iy, int64_t ix, const Shape& s) {
        collect(b, iy, ix, s, output_at, s.out_h, s.out_w);
    }

private:
    template <typename At>
    void collect(int64_t b, int64_t y, int64_t x, const Shape& s, At at, int64_t rows, int64_t cols) {
        size = 0;
        for (int64_t ty = 0; ty < s.window; ++ty) {
            const int64_t py = at(y, ty, s, rows);
            if (py < 0) continue;
            for (int64_t tx = 0; tx < s.window; ++tx) {
                const int64_t px = at(x, tx, s, cols);
                if (px < 0) continue;
                pixel[size] = (b * rows + py) * cols + px;
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
// nums[u] = sum_n w(t_n) E(i_n) v_h(i_n), dens[u] = sum_n exp(b)(t_n) E(i_n).
template <typename T, int NV>
__attribute__((always_inline)) inline void window_sums(HeadAcc<T, NV>* nums, const Window& win, const T* exp_scores, const T* packed,
                 const T* den_kernel, const T* num_kernel, const Shape& s, int64_t h, int64_t q0, T* dens) {
    const int64_t qh = s.qh(), dim = s.head_dim();
    const int count = int(std::min<int64_t>(kQueryGroup, s.queries - q0));
    const int64_t* pixel = win.pixel.data();
    const int64_t* tap = win.tap.data();
    const int64_t j0 = q0 * s.heads + h;
    auto at = [&](int64_t, int u) { return j0 + u * s.heads; };
    accumulate(
        nums, dens, count, win.size, dim,
        [&](int64_t n, int u) { return num_kernel[tap[n] * qh + at(n, u)] * exp_scores[pixel[n] * qh + at(n, u)]; },
        [&](int64_t n, int u) { return den_kernel[tap[n] * qh + at(n, u)] * exp_scores[pixel[n] * qh + at(n, u)]; },
        [&](int64_t n) { return packed + pixel[n] * s.pixel_stride + h * dim; });
}

inline Shape make_shape(const int64_t* dims) {
    return Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                 dims[7], dims[8], dims[9], dims[10], dims[11], dims[12]};
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

}  // namespace qna_fused
