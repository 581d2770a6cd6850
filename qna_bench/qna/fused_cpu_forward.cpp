// The forward sweep of the fused loops (see fused_cpu.h). Per output pixel: the denominators and each
// tap's per-head coefficients in one sweep over the window; then z as one sum over the window with the
// queries' coefficients already divided by their denominators and added (one accumulator per channel,
// whatever the number of queries), and the first `partials` queries' shares of z, kept for the
// backward, each a coefficient set of its own.

#include "fused_cpu.h"

namespace qna_fused {
namespace {

template <typename T, int W, int HPV>
void forward(const T* __restrict exp_scores, const T* __restrict packed, const T* __restrict den_kernel,
             const T* __restrict num_kernel, const Shape s, T threshold, T* __restrict z, T* __restrict den,
             T* __restrict partials, int threads) {
    constexpr int L = kRowLanes<T>;
    const int64_t qh = s.qh(), heads = s.heads, dim = s.head_dim(), taps = s.taps(), features = s.features;
    const int64_t sets = 1 + s.partials, vectors = features / W, row = padded(qh, L), set_row = padded(heads, L);
    const T* e_end = exp_scores + s.batch * s.height * s.width * qh;
    const std::vector<T> kd = padded_rows(den_kernel, taps, qh), kn = padded_rows(num_kernel, taps, qh);
#pragma omp parallel num_threads(threads)
    {
        Window win(s);
        // per tap: exp(b) * mixing * E for every query and head, then the sets' coefficients
        std::vector<T> raw(taps * row + L), coefs(taps * sets * set_row + L), d(row + L), inv(row + L);
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t oy = 0; oy < s.out_h; ++oy) {
                for (int64_t ox = 0; ox < s.out_w; ++ox) {
                    const int64_t o = (b * s.out_h + oy) * s.out_w + ox;
                    win.inputs_of(b, oy, ox, s);
                    const int64_t count = win.size;
                    for (int64_t j = 0; j < row; j += L) {
                        Vec<T, L> sum{};
                        for (int64_t n = 0; n < count; ++n) {
                            const Vec<T, L> e = load_upto(exp_scores + win.pixel[n] * qh + j, e_end);
                            sum += load<T, L>(kd.data() + win.tap[n] * row + j) * e;
                            store<T, L>(raw.data() + n * row + j, load<T, L>(kn.data() + win.tap[n] * row + j) * e);
                        }
                        store<T, L>(d.data() + j, sum);
                        const Vec<T, L> one = broadcast<T, L>(T(1));
                        store<T, L>(inv.data() + j, one / (sum < threshold ? one : sum));
                    }
                    std::copy_n(d.data(), qh, den + o * qh);
                    for (int64_t n = 0; n < count; ++n) {
                        const T* r = raw.data() + n * row;
                        T* c = coefs.data() + n * sets * set_row;
                        for (int64_t h = 0; h < heads; h += L) {
                            Vec<T, L> sum = load<T, L>(r + h) * load<T, L>(inv.data() + h);
                            for (int64_t q = 1; q < s.queries; ++q) {
                                sum += load<T, L>(r + q * heads + h) * load<T, L>(inv.data() + q * heads + h);
                            }
                            store<T, L>(c + h, sum);
                            for (int64_t p = 0; p < s.partials; ++p) {
                                store<T, L>(c + (1 + p) * set_row + h,
                                            load<T, L>(r + p * heads + h) * load<T, L>(inv.data() + p * heads + h));
                            }
                        }
                    }
                    const int64_t* pixel = win.pixel.data();
                    sweep_row<T, W, HPV>(
                        sets, vectors, dim, count,
                        [&](int64_t n, int64_t set) { return coefs.data() + (n * sets + set) * set_row; },
                        [&](int64_t n, int64_t v) { return load<T, W>(packed + pixel[n] * s.pixel_stride + v * W); },
                        [&]<int S, int BV>(int64_t set0, int64_t v0, const int64_t*, Vec<T, W> (&acc)[S][BV]) {
                            for (int set = 0; set < S; ++set) {
                                const int64_t k = set0 + set;
                                T* out = k == 0 ? z + o * features : partials + (o * s.partials + k - 1) * features;
                                for (int v = 0; v < BV; ++v) store<T, W>(out + (v0 + v) * W, acc[set][v]);
                            }
                        });
                }
            }
        }
    }
}

// dims: batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride,
// partials, vector_bytes.
template <typename T>
void run_forward(const T* e, const T* p, const T* rk, const T* wk, const int64_t* dims, double threshold, T* z,
                 T* den, T* partials, int threads) {
    const Shape s = make_shape(dims);
    by_layout<T>(s, [&]<int W, int HPV>() {
        forward<T, W, HPV>(e, p, rk, wk, s, T(threshold), z, den, partials, threads);
    });
}

}  // namespace
}  // namespace qna_fused

extern "C" int qna_vector_bytes() { return qna_fused::kVectorBytes; }

// The bytes of the vectors a call of `dims` sweeps channels in (its layout's lanes, times the element's
// `element_bytes`, 4 or 8): the compiled width or the call's cap where the shape fills it, else less.
extern "C" int qna_sweep_bytes(const int64_t* dims, int element_bytes) {
    const qna_fused::Shape s = qna_fused::make_shape(dims);
    const int lanes = element_bytes == 8 ? qna_fused::layout_of<double>(s).lanes : qna_fused::layout_of<float>(s).lanes;
    return lanes * element_bytes;
}

extern "C" void qna_forward_f32(const float* e, const float* p, const float* rk, const float* wk, const int64_t* dims,
                                double threshold, float* z, float* den, float* partials, int threads) {
    qna_fused::run_forward(e, p, rk, wk, dims, threshold, z, den, partials, threads);
}

extern "C" void qna_forward_f64(const double* e, const double* p, const double* rk, const double* wk,
                                const int64_t* dims, double threshold, double* z, double* den, double* partials,
                                int threads) {
    qna_fused::run_forward(e, p, rk, wk, dims, threshold, z, den, partials, threads);
}
