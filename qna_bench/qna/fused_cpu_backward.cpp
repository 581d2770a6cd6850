// The backward sweeps of the fused loops (see fused_cpu.h): per output pixel, the denominators' and
// both kernels' gradients; per input pixel, the values' and the scores' gradients.

#include "fused_cpu.h"

namespace qna_fused {
namespace {

// Pass 1, per row of outputs (b, oy). With g_num = g_z / den: dL/dden = -g_z . y / den for each
// query's share y = num / den of z (kept by the forward, the last one z less the others); the
// denominators' kernel gradient at tap t is sum_o dL/dden(o) E(i); the numerators' kernel gradient at
// tap t is sum_o E(i) / den(o) (g_z(o) . v(i)), kept per channel in registers along the row and summed
// over each head's channels once per tap. Each thread adds the kernel gradients into its own sums.
template <typename T, int W, int HPV>
void backward_outputs(const T* __restrict grad_z, const T* __restrict exp_scores, const T* __restrict packed,
                      const T* __restrict den, const T* __restrict z, const T* __restrict partials, const Shape s,
                      bool kernel_grads, T* __restrict inv_den, T* __restrict grad_den,
                      T* __restrict grad_den_kernel, T* __restrict grad_num_kernel, int threads) {
    constexpr int L = kRowLanes<T>;
    const int64_t qh = s.qh(), heads = s.heads, dim = s.head_dim(), taps = s.taps(), features = s.features;
    const int64_t vectors = features / W, shares = s.partials, row = padded(qh, L);
    const int64_t per_head = HPV == 1 ? dim / W : 1;  // the vectors that hold one head, or several
    const T* e_end = exp_scores + s.batch * s.height * s.width * qh;
    const T* inv_end = inv_den + s.batch * s.out_h * s.out_w * qh;
    ThreadSums<T> den_sums(kernel_grads ? threads : 0, taps, qh), num_sums(kernel_grads ? threads : 0, taps, qh);
#pragma omp parallel num_threads(threads)
    {
        Window win(s);
        std::vector<T> dots(qh), gd_row(row + L), coefs(s.out_w * row + L);
        std::vector<const T*> g_rows(s.out_w), v_rows(s.out_w);  // each entry's rows of g_z and values
        T* g_den_kernel = kernel_grads ? den_sums.mine() : nullptr;
        T* g_num_kernel = kernel_grads ? num_sums.mine() : nullptr;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t oy = 0; oy < s.out_h; ++oy) {
                for (int64_t ox = 0; ox < s.out_w; ++ox) {
                    const int64_t o = (b * s.out_h + oy) * s.out_w + ox;
                    T* __restrict inv = inv_den + o * qh;
                    T* __restrict gd = grad_den + o * qh;
                    for (int64_t j = 0; j < qh; ++j) inv[j] = T(1) / den[o * qh + j];
                    std::fill(dots.begin(), dots.end(), T(0));
                    // g_z . y per head: the vectors of a head (or the heads of a vector) summed, then their lanes
                    const T* g = grad_z + o * features;
                    const T* kept = partials + o * shares * features;
                    for (int64_t v0 = 0; v0 < vectors; v0 += per_head) {
                        int64_t head[1];
                        heads_of<W, HPV, 1>(v0, dim, head);
                        for (int64_t q = 0; q < shares; ++q) {
                            Vec<T, W> sum{};
                            for (int64_t v = v0; v < v0 + per_head; ++v) {
                                sum += load<T, W>(g + v * W) * load<T, W>(kept + q * features + v * W);
                            }
                            add_head_sums<T, W, HPV>(sum, dots.data() + q * heads + head[0]);
                        }
                        if (shares == s.queries) continue;
                        Vec<T, W> sum{};
                        for (int64_t v = v0; v < v0 + per_head; ++v) {
                            Vec<T, W> last = load<T, W>(z + o * features + v * W);
                            for (int64_t q = 0; q < shares; ++q) last -= load<T, W>(kept + q * features + v * W);
                            sum += load<T, W>(g + v * W) * last;
                        }
                        add_head_sums<T, W, HPV>(sum, dots.data() + shares * heads + head[0]);
                    }
                    for (int64_t q = shares + 1; q < s.queries; ++q) {
                        std::copy_n(dots.data() + shares * heads, heads, dots.data() + q * heads);
                    }
                    for (int64_t j = 0; j < qh; ++j) gd_row[j] = gd[j] = -dots[j] * inv[j];
                    if (!kernel_grads) continue;
                    win.inputs_of(b, oy, ox, s);
                    for (int64_t n = 0; n < win.size; ++n) {
                        T* gk = g_den_kernel + win.tap[n] * row;
                        for (int64_t j = 0; j < row; j += L) {
                            const Vec<T, L> e = load_upto(exp_scores + win.pixel[n] * qh + j, e_end);
                            store<T, L>(gk + j, load<T, L>(gk + j) + load<T, L>(gd_row.data() + j) * e);
                        }
                    }
                }
                if (!kernel_grads) continue;
                for (int64_t ty = 0; ty < s.window; ++ty) {
                    const int64_t iy = input_at(oy, ty, s, s.height);
                    if (iy < 0) continue;
                    for (int64_t tx = 0; tx < s.window; ++tx) {
                        int64_t count = 0;
                        for (int64_t ox = 0; ox < s.out_w; ++ox) {
                            const int64_t ix = input_at(ox, tx, s, s.width);
                            if (ix < 0) continue;
                            const int64_t o = (b * s.out_h + oy) * s.out_w + ox, i = (b * s.height + iy) * s.width + ix;
                            g_rows[count] = grad_z + o * features;
                            v_rows[count] = packed + i * s.pixel_stride;
                            for (int64_t j = 0; j < row; j += L) {
                                store<T, L>(coefs.data() + count * row + j,
                                            load_upto(exp_scores + i * qh + j, e_end) * load_upto(inv_den + o * qh + j, inv_end));
                            }
                            ++count;
                        }
                        T* gk = g_num_kernel + (ty * s.window + tx) * row;
                        sweep_row<T, W, HPV>(
                            s.queries, vectors, dim, count,
                            [&](int64_t n, int64_t q) { return coefs.data() + n * row + q * heads; },
                            [&](int64_t n, int64_t k) {
                                return load<T, W>(g_rows[n] + k * W) * load<T, W>(v_rows[n] + k * W);
                            },
                            [&]<int S, int BV>(int64_t q0, int64_t, const int64_t* head, Vec<T, W> (&acc)[S][BV]) {
                                for (int set = 0; set < S; ++set) {
                                    add_block_head_sums<T, W, HPV, BV>(
                                        head, [&](int k) { return acc[set][k]; }, gk + (q0 + set) * heads);
                                }
                            });
                    }
                }
            }
        }
    }
    den_sums.write_to(grad_den_kernel);
    num_sums.write_to(grad_num_kernel);
}

// Pass 2, per input pixel: gathers g_num * exp(b) * mixing and dL/dden * exp(b) over the outputs whose
// windows read it, per query, then writes the values' gradient (the queries' sums times E) and the
// exp-scores' gradient times E (the scores' gradient).
template <typename T, int W, int HPV>
void backward_inputs(const T* __restrict grad_z, const T* __restrict exp_scores, const T* __restrict packed,
                     const T* __restrict inv_den, const T* __restrict grad_den, const T* __restrict den_kernel,
                     const T* __restrict num_kernel, const Shape s, T* __restrict grad_packed, int threads) {
    constexpr int L = kRowLanes<T>;
    const int64_t qh = s.qh(), heads = s.heads, dim = s.head_dim(), features = s.features, vectors = features / W;
    const int64_t row = padded(qh, L), taps = s.taps(), outputs = s.batch * s.out_h * s.out_w * qh;
    const T *inv_end = inv_den + outputs, *gd_end = grad_den + outputs;
    const std::vector<T> kd = padded_rows(den_kernel, taps, qh), kn = padded_rows(num_kernel, taps, qh);
#pragma omp parallel num_threads(threads)
    {
        Window win(s);
        std::vector<T> coefs(taps * row + L), dots(qh), g_exp(row + L), e_row(row + L);
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < s.batch; ++b) {
            for (int64_t iy = 0; iy < s.height; ++iy) {
                for (int64_t ix = 0; ix < s.width; ++ix) {
                    const int64_t i = (b * s.height + iy) * s.width + ix;
                    win.outputs_of(b, iy, ix, s);
                    const int64_t count = win.size;
                    const int64_t* out = win.pixel.data();
                    std::fill(dots.begin(), dots.end(), T(0));
                    for (int64_t j = 0; j < row; j += L) {
                        Vec<T, L> sum{};
                        for (int64_t n = 0; n < count; ++n) {
                            const int64_t t = win.tap[n] * row + j, at = out[n] * qh + j;
                            store<T, L>(coefs.data() + n * row + j, load<T, L>(kn.data() + t) * load_upto(inv_den + at, inv_end));
                            sum += load<T, L>(kd.data() + t) * load_upto(grad_den + at, gd_end);
                        }
                        store<T, L>(g_exp.data() + j, sum);
                    }
                    const T* e = e_row.data();  // padded for `spread`
                    std::copy_n(exp_scores + i * qh, qh, e_row.data());
                    const T* v = packed + i * s.pixel_stride;
                    T* gp = grad_packed + i * (features + qh);
                    sweep_row<T, W, HPV>(
                        s.queries, vectors, dim, count,
                        [&](int64_t n, int64_t q) { return coefs.data() + n * row + q * heads; },
                        [&](int64_t n, int64_t k) { return load<T, W>(grad_z + out[n] * features + k * W); },
                        [&]<int S, int BV>(int64_t q0, int64_t v0, const int64_t* head, Vec<T, W> (&acc)[S][BV]) {
                            for (int k = 0; k < BV; ++k) {
                                T* gv = gp + (v0 + k) * W;
                                const Vec<T, W> values = load<T, W>(v + (v0 + k) * W);
                                Vec<T, W> grad = q0 == 0 ? Vec<T, W>{} : load<T, W>(gv);
                                for (int set = 0; set < S; ++set) {
                                    const int64_t j = (q0 + set) * heads + head[k];
                                    add_head_sums<T, W, HPV>(acc[set][k] * values, dots.data() + j);
                                    grad += spread<T, W, HPV>(e + j) * acc[set][k];
                                }
                                store<T, W>(gv, grad);
                            }
                        });
                    for (int64_t j = 0; j < qh; ++j) gp[features + j] = (dots[j] + g_exp[j]) * e[j];
                }
            }
        }
    }
}

// dims: batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride,
// partials, vector_bytes.
template <typename T>
void run_backward(const T* gz, const T* e, const T* p, const T* den, const T* z, const T* partials, const T* rk,
                  const T* wk, const int64_t* dims, int kernel_grads, T* inv_den, T* grad_den, T* grad_rk, T* grad_wk,
                  T* grad_packed, int threads) {
    const Shape s = make_shape(dims);
    by_layout<T>(s, [&]<int W, int HPV>() {
        backward_outputs<T, W, HPV>(gz, e, p, den, z, partials, s, kernel_grads != 0, inv_den, grad_den, grad_rk,
                                    grad_wk, threads);
        backward_inputs<T, W, HPV>(gz, e, p, inv_den, grad_den, rk, wk, s, grad_packed, threads);
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
