// QnA's windowed softmax core as direct loops over each window, for CPUs (`qna_bench.qna.fused_cpu`
// compiles every fused_cpu*.cpp into one library and calls it through ctypes): per output pixel, one
// sweep over the taps for the denominators and the coefficients, one over the channels for the
// numerators; the backward takes two more; nothing of size k^2 per pixel outlives its pixel. This
// header: the shapes, the vectors, the window sweeps and the per-thread sums both files share.
//
// Layouts (row-major): E (B, H, W, Q*h) exp(s - m); values read from `packed` (B, H, W, ps), the first
// F channels of each pixel, head-major (channel = head * d + i); den_kernel and num_kernel (k, k, Q*h):
// exp(b) and exp(b) * mixing, tap-major; z and grad_z (B, OH, OW, F); den (B, OH, OW, Q*h);
// grad_packed (B, H, W, F + Q*h). Input pixel of output o and tap t: o * stride - pad + t, zero outside
// the image.
//
// Vectors: the channels of a pixel's row are swept in vectors of W lanes, W the widest power of two no
// wider than the target's vectors (64 bytes with AVX-512, 32 with AVX, else 16: SSE2, NEON) nor than the
// call's cap (`Shape::vector_bytes`) that divides F and either divides the head size d (a head is d / W
// vectors, its coefficient broadcast) or is a multiple of it, at most kMaxHeadsPerVector heads (a vector
// holds W / d heads, its coefficients spread lane by lane). W = 1 (plain scalars) fits every shape.

#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qna_fused {

#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
#else
inline constexpr int kVectorBytes = 16;
#endif
inline constexpr int kMaxHeadsPerVector = 4;

// partials: the queries whose share of z, num / den (B, OH, OW, partials, F), the forward keeps for the
// backward (the queries less one, whose share is z less the others'; or all of them). vector_bytes: the
// widest vectors the channel sweeps may use (0: kVectorBytes; a core that splits the widest vectors in
// two may run narrower ones faster, and the tuner measures which).
struct Shape {
    int64_t batch, height, width, queries, heads, features, window, stride, pad, out_h, out_w, pixel_stride, partials,
        vector_bytes;
    int64_t qh() const { return queries * heads; }
    int64_t head_dim() const { return features / heads; }
    int64_t taps() const { return window * window; }
};

inline Shape make_shape(const int64_t* dims) {
    return Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
                 dims[7], dims[8], dims[9], dims[10], dims[11], dims[12], dims[13]};
}

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

// The (pixel, tap) pairs of one window: the input pixels an output reads, or the outputs whose
// windows read an input, each with the tap that links them. Sized once per thread; each axis's
// indices found once per window (an output's index divides by the stride).
struct Window {
    std::vector<int64_t> pixel, tap, column, column_tap;
    int64_t size = 0;
    explicit Window(const Shape& s) : pixel(s.taps()), tap(s.taps()), column(s.window), column_tap(s.window) {}
    void inputs_of(int64_t b, int64_t oy, int64_t ox, const Shape& s) {
        collect(b, oy, ox, s, input_at, s.height, s.width);
    }
    void outputs_of(int64_t b, int64_t iy, int64_t ix, const Shape& s) {
        collect(b, iy, ix, s, output_at, s.out_h, s.out_w);
    }

private:
    template <typename At>
    void collect(int64_t b, int64_t y, int64_t x, const Shape& s, At at, int64_t rows, int64_t cols) {
        int64_t columns = 0;
        for (int64_t tx = 0; tx < s.window; ++tx) {
            const int64_t px = at(x, tx, s, cols);
            if (px < 0) continue;
            column[columns] = px;
            column_tap[columns++] = tx;
        }
        size = 0;
        for (int64_t ty = 0; ty < s.window; ++ty) {
            const int64_t py = at(y, ty, s, rows);
            if (py < 0) continue;
            for (int64_t c = 0; c < columns; ++c) {
                pixel[size] = (b * rows + py) * cols + column[c];
                tap[size++] = ty * s.window + column_tap[c];
            }
        }
    }
};

// W lanes of T (GCC's vector extension), and integer lanes of T's size for shuffles.
template <typename T> struct Lane;
template <> struct Lane<float> { using index = int32_t; };
template <> struct Lane<double> { using index = int64_t; };
template <typename T, int W> struct VecOf {
    typedef T type __attribute__((vector_size(W * sizeof(T))));
    typedef typename Lane<T>::index index __attribute__((vector_size(W * sizeof(T))));
};
template <typename T, int W> using Vec = typename VecOf<T, W>::type;
template <typename T, int W> using Index = typename VecOf<T, W>::index;

template <typename T, int W> __attribute__((always_inline)) inline Vec<T, W> load(const T* x) {
    Vec<T, W> r;
    std::memcpy(&r, x, sizeof(r));
    return r;
}
template <typename T, int W> __attribute__((always_inline)) inline void store(T* x, Vec<T, W> v) {
    std::memcpy(x, &v, sizeof(v));
}

// x in every lane, as one broadcast: x - 0 is x for every x, where 0 + x is not (x = -0), so the
// compiler drops the subtraction and would have kept the addition.
template <typename T, int W> __attribute__((always_inline)) inline Vec<T, W> broadcast(T x) {
    return x - Vec<T, W>{};
}

// A vector of the coefficients of the heads it holds, from c[0..HPV): lane l takes c[l / (W / HPV)].
// With HPV > 1 it loads c[0..W) (a whole vector, then one shuffle in registers): c lies in a buffer
// padded past its rows.
template <typename T, int W, int HPV> __attribute__((always_inline)) inline Vec<T, W> spread(const T* c) {
    if constexpr (HPV == 1) {
        return broadcast<T, W>(*c);
    } else {
        const Vec<T, W> r = load<T, W>(c);
        Index<T, W> mask;
        for (int l = 0; l < W; ++l) mask[l] = l / (W / HPV);
        return __builtin_shuffle(r, mask);
    }
}

// out[k] += the sum of lanes [k * W / HPV, (k + 1) * W / HPV) of x, for the HPV heads of the vector:
// a tree of shuffles, the same order every call.
template <typename T, int W, int HPV> __attribute__((always_inline)) inline void add_head_sums(Vec<T, W> x, T* out) {
    constexpr int segment = W / HPV;
    for (int offset = segment / 2; offset > 0; offset /= 2) {
        Index<T, W> mask;
        for (int l = 0; l < W; ++l) mask[l] = (l % segment) + offset < segment ? l + offset : l;
        x += __builtin_shuffle(x, mask);
    }
    for (int k = 0; k < HPV; ++k) out[k] += x[k * segment];
}

// add_head_sums of a block's BV vectors x(v) (their first heads in head), the vectors of one head added
// up first: one tree per head, not one per vector.
template <typename T, int W, int HPV, int BV, typename X>
__attribute__((always_inline)) inline void add_block_head_sums(const int64_t* head, X x, T* out) {
    for (int v = 0; v < BV;) {
        Vec<T, W> sum = x(v);
        int next = v + 1;
        for (; next < BV && head[next] == head[v]; ++next) sum += x(next);
        add_head_sums<T, W, HPV>(sum, out + head[v]);
        v = next;
    }
}

// The vector layout of a shape: W lanes, HPV heads per vector (1 where a head spans whole vectors).
struct Layout {
    int lanes, heads_per_vector;
};

template <typename T> Layout layout_of(const Shape& s) {
    const int64_t dim = s.head_dim();
    const int64_t bytes = s.vector_bytes > 0 ? std::min<int64_t>(s.vector_bytes, kVectorBytes) : kVectorBytes;
    for (int w = int(bytes / int64_t(sizeof(T))); w > 1; w /= 2) {
        if (s.features % w != 0) continue;
        if (dim % w == 0) return {w, 1};
        if (w % dim == 0 && w / dim <= kMaxHeadsPerVector) return {w, int(w / dim)};
    }
    return {1, 1};
}

// Calls `run.template operator()<W, HPV>()` with the shape's layout.
template <typename T, typename Run> void by_layout(const Shape& s, Run run) {
    constexpr int widest = kVectorBytes / int(sizeof(T));
    const Layout l = layout_of<T>(s);
    auto pick = [&]<int W>() {
        if constexpr (W > 1) {
            if (l.lanes == W) {
                switch (l.heads_per_vector) {
                    case 1: run.template operator()<W, 1>(); return true;
                    case 2: if constexpr (W >= 2) { run.template operator()<W, 2>(); return true; } break;
                    case 4: if constexpr (W >= 4) { run.template operator()<W, 4>(); return true; } break;
                    default: break;
                }
            }
        }
        return false;
    };
    const bool done = pick.template operator()<widest>() || pick.template operator()<widest / 2>() ||
                      pick.template operator()<widest / 4>() || pick.template operator()<widest / 8>();
    if (!done) run.template operator()<1, 1>();
}

// Coefficient sets accumulated in one sweep (each its own accumulators over the same rows), and the
// vectors of a block: 8 accumulators, independent chains of fused multiply-adds that hide their latency
// and share each row's loads.
inline constexpr int kAccumulators = 8;

// Calls `body.template operator()<BV>(v0)` over the `vectors` vectors of a row in blocks of BV, the
// widest first (kAccumulators / S), the rest in halves.
template <int S, typename Body> __attribute__((always_inline)) inline void for_blocks(int64_t vectors, Body body) {
    constexpr int full = kAccumulators / S;
    int64_t v0 = 0;
    for (; v0 + full <= vectors; v0 += full) body.template operator()<full>(v0);
    if constexpr (full >= 8) {
        if (v0 + 4 <= vectors) { body.template operator()<4>(v0); v0 += 4; }
    }
    if constexpr (full >= 4) {
        if (v0 + 2 <= vectors) { body.template operator()<2>(v0); v0 += 2; }
    }
    if constexpr (full >= 2) {
        if (v0 + 1 <= vectors) { body.template operator()<1>(v0); v0 += 1; }
    }
}

// The first head of each vector v0.. of a block (in heads from head 0).
template <int W, int HPV, int BV> inline void heads_of(int64_t v0, int64_t dim, int64_t* head) {
    for (int v = 0; v < BV; ++v) head[v] = HPV == 1 ? (v0 + v) * W / dim : (v0 + v) * HPV;
}

// acc[s][v] = sum over n < count of spread(coef(n, s) + head[v]) * row(n, v), for S coefficient sets
// (coef(n, s): the set's row of per-head coefficients) and the BV vectors of a block (row(n, v): the
// block's vector v of entry n), where each run of G vectors of the block lies in one head: one spread
// coefficient per run, not per vector (loads, not multiply-adds, bound these sweeps).
template <typename T, int W, int HPV, int S, int BV, int G, typename Coef, typename Row>
__attribute__((always_inline)) inline void sweep(Vec<T, W> (&acc)[S][BV], int64_t count, const int64_t* head,
                                                 Coef coef, Row row) {
    for (auto& set : acc) {
        for (auto& a : set) a = Vec<T, W>{};
    }
    for (int64_t n = 0; n < count; ++n) {
        const T* c[S];
        for (int s = 0; s < S; ++s) c[s] = coef(n, s);
        for (int run = 0; run < BV; run += G) {
            Vec<T, W> k[S];
            for (int s = 0; s < S; ++s) k[s] = spread<T, W, HPV>(c[s] + head[run]);
            for (int v = run; v < run + G; ++v) {
                const Vec<T, W> x = row(n, v);  // one row vector live at a time: the accumulators stay in registers
                for (int s = 0; s < S; ++s) acc[s][v] += k[s] * x;
            }
        }
    }
}

// The longest runs (a power of two dividing BV) in which a block's vectors share a head.
template <int BV> inline int head_run(const int64_t* head) {
    for (int g = BV; g > 1; g /= 2) {
        bool shared = true;
        for (int v = 0; v < BV; ++v) shared = shared && head[v] == head[v / g * g];
        if (shared) return g;
    }
    return 1;
}

// `sweep` at the block's own runs of shared heads.
template <typename T, int W, int HPV, int S, int BV, typename Coef, typename Row>
__attribute__((always_inline)) inline void sweep_runs(Vec<T, W> (&acc)[S][BV], int64_t count, const int64_t* head,
                                                      Coef coef, Row row) {
    const int run = HPV == 1 ? head_run<BV>(head) : 1;
    if constexpr (BV >= 8) {
        if (run == 8) return sweep<T, W, HPV, S, BV, 8>(acc, count, head, coef, row);
    }
    if constexpr (BV >= 4) {
        if (run == 4) return sweep<T, W, HPV, S, BV, 4>(acc, count, head, coef, row);
    }
    if constexpr (BV >= 2) {
        if (run == 2) return sweep<T, W, HPV, S, BV, 2>(acc, count, head, coef, row);
    }
    sweep<T, W, HPV, S, BV, 1>(acc, count, head, coef, row);
}

// `sweep` over every vector of a row for `sets` coefficient sets, two sets at a time: coef(n, set) is
// set `set`'s row of per-head coefficients at entry n, row(n, v) vector v of entry n's row; after each
// block, done.template operator()<S, BV>(set0, v0, head, acc) takes the sums of sets set0.. over the
// vectors v0.. (their first heads in head).
template <typename T, int W, int HPV, typename Coef, typename Row, typename Done>
__attribute__((always_inline)) inline void sweep_row(int64_t sets, int64_t vectors, int64_t dim, int64_t count,
                                                     Coef coef, Row row, Done done) {
    auto group = [&]<int S>(int64_t set0) {
        for_blocks<S>(vectors, [&]<int BV>(int64_t v0) {
            int64_t head[BV];
            heads_of<W, HPV, BV>(v0, dim, head);
            Vec<T, W> acc[S][BV];
            sweep_runs<T, W, HPV, S, BV>(
                acc, count, head, [&](int64_t n, int set) { return coef(n, set0 + set); },
                [&](int64_t n, int v) { return row(n, v0 + v); });
            done.template operator()<S, BV>(set0, v0, head, acc);
        });
    };
    int64_t set0 = 0;
    for (; set0 + 2 <= sets; set0 += 2) group.template operator()<2>(set0);
    if (set0 < sets) group.template operator()<1>(set0);
}

// The per-pixel rows of Q*h factors (exp-scores, denominators, kernels at a tap) run in vectors of the
// widest lanes, kRowLanes, over rows padded to whole vectors in the loops' own buffers: the lanes past
// Q*h carry whatever lies there and are never read back. Tensors the loops do not own are read through
// `load_upto`, which stops at their end.
template <typename T> inline constexpr int kRowLanes = kVectorBytes / int(sizeof(T));

inline int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

template <typename T> __attribute__((always_inline)) inline Vec<T, kRowLanes<T>> load_upto(const T* x, const T* end) {
    constexpr int L = kRowLanes<T>;
    if (x + L <= end) return load<T, L>(x);
    Vec<T, L> r{};
    for (int l = 0; x + l < end; ++l) r[l] = x[l];
    return r;
}

// A (taps, Q*h) kernel copied into rows padded to whole vectors, zeros in the padding.
template <typename T> std::vector<T> padded_rows(const T* kernel, int64_t rows, int64_t width) {
    const int64_t stride = padded(width, kRowLanes<T>);
    std::vector<T> out(rows * stride + kRowLanes<T>, T(0));
    for (int64_t r = 0; r < rows; ++r) std::copy_n(kernel + r * width, width, out.data() + r * stride);
    return out;
}

// Per-thread sums of (taps, Q*h) kernel gradients in padded rows, added in thread order once the
// threads are done: the same bits every call with the same threads (the static schedule gives each
// thread the same rows).
template <typename T> struct ThreadSums {
    std::vector<T> sums;
    int64_t rows, width, stride, size;
    ThreadSums(int threads, int64_t rows, int64_t width)
        : rows(rows), width(width), stride(padded(width, kRowLanes<T>)), size(rows * stride + kRowLanes<T>) {
        sums.assign(int64_t(threads) * size, T(0));
    }
    T* mine() { return sums.data() + omp_get_thread_num() * size; }
    void write_to(T* out) const {
        std::fill(out, out + rows * width, T(0));
        for (int64_t t = 0; t * size < int64_t(sums.size()); ++t) {
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t j = 0; j < width; ++j) out[r * width + j] += sums[t * size + r * stride + j];
            }
        }
    }
};

}  // namespace qna_fused
