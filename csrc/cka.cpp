// Batched linear CKA, the correspondence scorer of head matching.
//
// CKA(X, Y) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F), Kc = Xc Xc^T, Lc = Yc Yc^T, Xc = X - column means
//           = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)                       (feature form)
// The biased HSIC's (m-1)^-2 factors cancel in the ratio.
//
// Gram form: pack each head's centred Gram's upper triangle, off-diagonals times sqrt(2), into a row of
// length P = m(m+1)/2, so that <Kc, Lc> is a dot product; all pairs are then one NT matrix product
// [heads_a, P] x [heads_b, P]^T, cost P per pair. Feature form: stack the heads' Xc^T rows and take one NT
// product [heads_a*d_a, m] x [heads_b*d_b, m]^T, cost m*d_a*d_b per pair. "auto" takes the cheaper.
// Both are tiled over heads so that the working set stays under max_bytes, whatever the number of heads.
#include "cka.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastcd {

namespace {

// ---- NT matrix product C[i, j] (+)= sum_p A[i, p] * B[j, p], float64, cache-blocked ----------------------
constexpr int64_t KC = 256;  // p-block: a row chunk of 2 KiB stays in L1/L2
constexpr int VL = 8;        // doubles per vector accumulator

typedef double vd __attribute__((vector_size(VL * sizeof(double))));

inline double hsum(vd v) {
    double s = 0;
    for (int i = 0; i < VL; ++i) s += v[i];
    return s;
}

// 4 x 4 block of dot products over a p-range of length kc (kc % VL == 0 handled by the caller's tail).
inline void micro_4x4(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t kc, double* c,
                      int64_t ldc) {
    vd acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = vd{} ;
    int64_t p = 0;
    for (; p + VL <= kc; p += VL) {
        vd av[4], bv[4];
        for (int i = 0; i < 4; ++i) std::memcpy(&av[i], a + i * lda + p, sizeof(vd));
        for (int j = 0; j < 4; ++j) std::memcpy(&bv[j], b + j * ldb + p, sizeof(vd));
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            double s = hsum(acc[i][j]);
            for (int64_t q = p; q < kc; ++q) s += a[i * lda + q] * b[j * ldb + q];
            c[i * ldc + j] += s;
        }
}

inline void micro_edge(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t kc, double* c,
                       int64_t ldc, int mi, int nj) {
    for (int i = 0; i < mi; ++i)
        for (int j = 0; j < nj; ++j) {
            double s = 0;
            for (int64_t q = 0; q < kc; ++q) s += a[i * lda + q] * b[j * ldb + q];
            c[i * ldc + j] += s;
        }
}

// C[M, N] = A[M, K] B[N, K]^T (overwrites C). Parallel over 4-row blocks of C.
void gemm_nt(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K) {
    std::fill(C, C + M * N, 0.0);
    const int64_t mb = (M + 3) / 4;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t ib = 0; ib < mb; ++ib) {
        const int64_t i = ib * 4;
        const int mi = static_cast<int>(std::min<int64_t>(4, M - i));
        for (int64_t p0 = 0; p0 < K; p0 += KC) {
            const int64_t kc = std::min(KC, K - p0);
            for (int64_t j = 0; j < N; j += 4) {
                const int nj = static_cast<int>(std::min<int64_t>(4, N - j));
                if (mi == 4 && nj == 4)
                    micro_4x4(A + i * K + p0, K, B + j * K + p0, K, kc, C + i * N + j, N);
                else
                    micro_edge(A + i * K + p0, K, B + j * K + p0, K, kc, C + i * N + j, N, mi, nj);
            }
        }
    }
}

// ---- inputs -----------------------------------------------------------------------------------------------
struct Stack {
    int64_t h, m, d;
    bool f32;
    const void* ptr;
    double at(int64_t head, int64_t i, int64_t k) const {
        const int64_t o = (head * m + i) * d + k;
        return f32 ? static_cast<const float*>(ptr)[o] : static_cast<const double*>(ptr)[o];
    }
};

Stack check_stack(const py::array& x, const char* name) {
    const bool f32 = py::isinstance<py::array_t<float>>(x);
    const bool f64 = py::isinstance<py::array_t<double>>(x);
    if (!f32 && !f64)
        throw std::invalid_argument(std::string(name) + " must be a float32 or float64 array");
    if (x.ndim() != 3)
        throw std::invalid_argument(std::string(name) + " must have shape [heads, m, d], got " +
                                    std::to_string(x.ndim()) + " dimensions");
    if (!(x.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(name) + " must be C-contiguous");
    Stack s{x.shape(0), x.shape(1), x.shape(2), f32, x.data()};
    if (s.h < 1 || s.d < 1)
        throw std::invalid_argument(std::string(name) + " must have at least one head and one feature");
    if (s.m < 2)
        throw std::invalid_argument(std::string(name) + " must have m >= 2 samples, got " + std::to_string(s.m));
    const int64_t n = s.h * s.m * s.d;
    for (int64_t o = 0; o < n; ++o) {
        const double v = f32 ? static_cast<const float*>(s.ptr)[o] : static_cast<const double*>(s.ptr)[o];
        if (!std::isfinite(v))
            throw std::invalid_argument(std::string(name) + " must be finite, found a non-finite value at flat index " +
                                        std::to_string(o));
    }
    return s;
}

// Centred head activations, transposed: out[(k) * m + i] = X[i, k] - mean_i X[:, k]   -> [d, m]
void centred_t(const Stack& s, int64_t head, double* out) {
    for (int64_t k = 0; k < s.d; ++k) {
        double mean = 0;
        for (int64_t i = 0; i < s.m; ++i) mean += s.at(head, i, k);
        mean /= static_cast<double>(s.m);
        for (int64_t i = 0; i < s.m; ++i) out[k * s.m + i] = s.at(head, i, k) - mean;
    }
}

// Centred activations row-major [m, d].
void centred(const Stack& s, int64_t head, double* out) {
    std::vector<double> t(s.d * s.m);
    centred_t(s, head, t.data());
    for (int64_t i = 0; i < s.m; ++i)
        for (int64_t k = 0; k < s.d; ++k) out[i * s.d + k] = t[k * s.m + i];
}

// ---- the Gram form's product: dispatched at run time, float32 or float64 products, float64 sums -------------
// Rows of the packed, normalised Grams: A [M, K], B [N, K] (K padded to a multiple of 16, M and N to 4).
// C[i, j] = sum_p A[i, p] B[j, p]. B is cut into panels of NC rows x KC columns that stay in L2 while every
// 4-row block of A streams past them; a 4 x 4 register block accumulates KC products per entry in the input
// precision, then adds them to C in float64 (float32 products with float64 tile accumulation).
// The kernels are compiled for AVX-512, AVX2 and the baseline and picked at load time (target_clones), so the
// default build is portable and still uses the vector units of the CPU it runs on.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(FASTCD_NO_CLONES)
#define FASTCD_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FASTCD_CLONES
#endif

constexpr int64_t PANEL_K = 2048;  // KC: the 4 x 4 block sums 2048 products before one float64 reduction
constexpr int64_t PANEL_N = 64;  // NC: 64 x 2048 floats = 512 KiB of B per panel (L2)

template <typename T, int L>
struct VecOf {
    typedef T type __attribute__((vector_size(L * sizeof(T))));
};

template <typename T, int L>
__attribute__((always_inline)) inline void micro(const T* a, const T* b, int64_t k, int64_t kc, double* c,
                                                 int64_t ldc) {
    typedef typename VecOf<T, L>::type V;
    V acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = V{};
    for (int64_t p = 0; p < kc; p += L) {
        V av[4], bv[4];
        for (int i = 0; i < 4; ++i) std::memcpy(&av[i], a + i * k + p, sizeof(V));
        for (int j = 0; j < 4; ++j) std::memcpy(&bv[j], b + j * k + p, sizeof(V));
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            double s = 0;
            for (int l = 0; l < L; ++l) s += static_cast<double>(acc[i][j][l]);
            c[i * ldc + j] += s;
        }
}

// One panel of B (rows j0..j1) against all of A. The OpenMP region lives in the caller: an outlined parallel
// body would not inherit the clones' target, so each clone holds the whole panel loop.
template <typename T, int L>
__attribute__((always_inline)) inline void panel_nt(const T* A, const T* B, double* C, int64_t M, int64_t N,
                                                    int64_t K, int64_t j0, int64_t j1) {
    for (int64_t p0 = 0; p0 < K; p0 += PANEL_K) {
        const int64_t kc = std::min(PANEL_K, K - p0);
        for (int64_t i = 0; i < M; i += 4)
            for (int64_t j = j0; j < j1; j += 4) micro<T, L>(A + i * K + p0, B + j * K + p0, K, kc, C + i * N + j, N);
    }
}

FASTCD_CLONES void panel_nt_f32(const float* A, const float* B, double* C, int64_t M, int64_t N, int64_t K,
                                int64_t j0, int64_t j1) {
    panel_nt<float, 16>(A, B, C, M, N, K, j0, j1);
}

FASTCD_CLONES void panel_nt_f64(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K,
                                int64_t j0, int64_t j1) {
    panel_nt<double, 8>(A, B, C, M, N, K, j0, j1);
}

// C[M, N] = A[M, K] B[N, K]^T in panels of B, in parallel (dynamic: a panel per thread at a time, so a core
// taken by another process delays one panel, not half of the work).
template <typename T>
void product_nt(const T* A, const T* B, double* C, int64_t M, int64_t N, int64_t K) {
    std::fill(C, C + M * N, 0.0);
    const int64_t n_panels = (N + PANEL_N - 1) / PANEL_N;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t jp = 0; jp < n_panels; ++jp) {
        const int64_t j0 = jp * PANEL_N, j1 = std::min(N, j0 + PANEL_N);
        if constexpr (sizeof(T) == 4)
            panel_nt_f32(A, B, C, M, N, K, j0, j1);
        else
            panel_nt_f64(A, B, C, M, N, K, j0, j1);
    }
}

// Upper triangle of the centred Gram Xc Xc^T of one head, in float64: g[i * m + j] for j >= i (a few entries
// below the diagonal are written too). xt is Xc transposed, [d, m]. Register blocks of 8 rows x 16 columns
// accumulate over k: per k two vector loads of xt[k, j..j+16) and eight broadcasts feed sixteen FMAs.
FASTCD_CLONES void gram_upper(const double* xt, int64_t m, int64_t d, double* g) {
    typedef double V __attribute__((vector_size(8 * sizeof(double))));
    constexpr int R = 8;
    const int64_t m16 = m / 16 * 16;
    for (int64_t i = 0; i < m; i += R) {
        const int ri = static_cast<int>(std::min<int64_t>(R, m - i));
        for (int64_t j0 = i / 16 * 16; j0 < m16; j0 += 16) {
            V acc[R][2];
            for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V{};
            for (int64_t k = 0; k < d; ++k) {
                const double* x = xt + k * m;
                V v0, v1;
                std::memcpy(&v0, x + j0, sizeof(V));
                std::memcpy(&v1, x + j0 + 8, sizeof(V));
                for (int r = 0; r < R; ++r) {
                    const double sr = r < ri ? x[i + r] : 0.0;
                    acc[r][0] += sr * v0;
                    acc[r][1] += sr * v1;
                }
            }
            for (int r = 0; r < ri; ++r) {
                std::memcpy(g + (i + r) * m + j0, &acc[r][0], sizeof(V));
                std::memcpy(g + (i + r) * m + j0 + 8, &acc[r][1], sizeof(V));
            }
        }
        for (int r = 0; r < ri; ++r)  // the columns past the last multiple of 16
            for (int64_t j = std::max(m16, i + r); j < m; ++j) {
                double sacc = 0;
                for (int64_t k = 0; k < d; ++k) sacc += xt[k * m + i + r] * xt[k * m + j];
                g[(i + r) * m + j] = sacc;
            }
    }
}

// Packed, normalised Gram rows of heads [h0, h1): the upper triangle of the centred Gram, off-diagonals times
// sqrt 2 (so that <Kc, Lc>_F is a dot product), divided by its norm (a constant head gives a zero row), in T,
// zero-padded to [rows_pad, kp]. Built in float64 and rounded once.
template <typename T>
void packed_rows(const Stack& s, int64_t h0, int64_t h1, int64_t kp, int64_t rows_pad, std::vector<T>& rows) {
    const int64_t m = s.m, q_len = m * (m + 1) / 2;
    rows.resize(rows_pad * kp);  // every element is written below: the rows, their padding, the padding rows
    std::fill(rows.begin() + (h1 - h0) * kp, rows.end(), T(0));
    const double r2 = std::sqrt(2.0);
#pragma omp parallel
    {
        std::vector<double> xt(s.d * m), g(m * m), row(m * (m + 1) / 2);
#pragma omp for schedule(dynamic, 1)
        for (int64_t h = h0; h < h1; ++h) {
            centred_t(s, h, xt.data());
            gram_upper(xt.data(), m, s.d, g.data());
            int64_t q = 0;
            double nn = 0;
            for (int64_t i = 0; i < m; ++i) {
                row[q] = g[i * m + i];
                nn += row[q] * row[q];
                ++q;
                for (int64_t j = i + 1; j < m; ++j, ++q) {
                    row[q] = r2 * g[i * m + j];
                    nn += row[q] * row[q];
                }
            }
            const double inv = nn > 0 ? 1.0 / std::sqrt(nn) : 0.0;
            T* out = rows.data() + (h - h0) * kp;
            for (int64_t p = 0; p < q; ++p) out[p] = static_cast<T>(row[p] * inv);
            for (int64_t p = q_len; p < kp; ++p) out[p] = T(0);
        }
    }
}

inline int64_t round_up(int64_t x, int64_t r) { return (x + r - 1) / r * r; }

double dot(const double* a, const double* b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline double ratio(double num, double na, double nb) {
    return (na > 0 && nb > 0) ? num / (na * nb) : 0.0;
}

template <typename T>
void cka_gram(const Stack& A, const Stack& B, double* out, int64_t max_bytes) {
    const int64_t m = A.m, kp = round_up(m * (m + 1) / 2, 16);
    const int64_t row_bytes = kp * static_cast<int64_t>(sizeof(T));
    // budget: the a-tile and b-tile rows (the small float64 product tile c is not counted)
    const int64_t rows_fit = std::max<int64_t>(8, max_bytes / row_bytes);
    int64_t tb = std::min<int64_t>(B.h, std::max<int64_t>(4, rows_fit / 2));
    int64_t ta = std::min<int64_t>(A.h, std::max<int64_t>(4, rows_fit - round_up(tb, 4)));
    std::vector<T> ga, gb;
    std::vector<double> c;
    const bool b_once = tb >= B.h;
    if (b_once) packed_rows<T>(B, 0, B.h, kp, round_up(B.h, 4), gb);
    for (int64_t a0 = 0; a0 < A.h; a0 += ta) {
        const int64_t a1 = std::min(A.h, a0 + ta), ma = round_up(a1 - a0, 4);
        packed_rows<T>(A, a0, a1, kp, ma, ga);
        for (int64_t b0 = 0; b0 < B.h; b0 += tb) {
            const int64_t b1 = std::min(B.h, b0 + tb), nb = round_up(b1 - b0, 4);
            if (!b_once) packed_rows<T>(B, b0, b1, kp, nb, gb);
            c.resize(ma * nb);
            product_nt<T>(ga.data(), gb.data(), c.data(), ma, nb, kp);
            for (int64_t i = 0; i < a1 - a0; ++i)
                for (int64_t j = 0; j < b1 - b0; ++j) out[(a0 + i) * B.h + b0 + j] = c[i * nb + j];
        }
    }
}

// ||Xc^T Xc||_F per head.
std::vector<double> self_norms(const Stack& s) {
    std::vector<double> out(s.h), xt(s.d * s.m), g(s.d * s.d);
    for (int64_t h = 0; h < s.h; ++h) {
        centred_t(s, h, xt.data());
        gemm_nt(xt.data(), xt.data(), g.data(), s.d, s.d, s.m);
        out[h] = std::sqrt(dot(g.data(), g.data(), s.d * s.d));
    }
    return out;
}

void cka_feature(const Stack& A, const Stack& B, double* out, int64_t max_bytes) {
    const int64_t m = A.m;
    const std::vector<double> na = self_norms(A), nb = self_norms(B);
    // tiles of heads so that (ta*da + tb*db) * m + ta*da*tb*db doubles fit the budget
    const int64_t budget = std::max<int64_t>(1, max_bytes / static_cast<int64_t>(sizeof(double)));
    int64_t ta = A.h, tb = B.h;
    auto need = [&](int64_t x, int64_t y) { return (x * A.d + y * B.d) * m + x * A.d * y * B.d; };
    while (need(ta, tb) > budget && (ta > 1 || tb > 1)) {
        if (ta >= tb && ta > 1) ta = (ta + 1) / 2; else tb = (tb + 1) / 2;
    }
    std::vector<double> xa, xb, c;
    for (int64_t a0 = 0; a0 < A.h; a0 += ta) {
        const int64_t a1 = std::min(A.h, a0 + ta), ra = (a1 - a0) * A.d;
        xa.resize(ra * m);
        for (int64_t h = a0; h < a1; ++h) centred_t(A, h, xa.data() + (h - a0) * A.d * m);
        for (int64_t b0 = 0; b0 < B.h; b0 += tb) {
            const int64_t b1 = std::min(B.h, b0 + tb), rb = (b1 - b0) * B.d;
            xb.resize(rb * m);
            for (int64_t h = b0; h < b1; ++h) centred_t(B, h, xb.data() + (h - b0) * B.d * m);
            c.resize(ra * rb);
            gemm_nt(xa.data(), xb.data(), c.data(), ra, rb, m);  // Xc_a^T Yc_b for all pairs of the tiles
            for (int64_t i = 0; i < a1 - a0; ++i)
                for (int64_t j = 0; j < b1 - b0; ++j) {
                    double s = 0;
                    for (int64_t u = 0; u < A.d; ++u) {
                        const double* row = c.data() + (i * A.d + u) * rb + j * B.d;
                        for (int64_t v = 0; v < B.d; ++v) s += row[v] * row[v];
                    }
                    out[(a0 + i) * B.h + b0 + j] = ratio(s, na[a0 + i], nb[b0 + j]);
                }
        }
    }
}

}  // namespace

py::array_t<double> cka_matrix(py::array a, py::array b, const std::string& form, int64_t max_bytes,
                               const std::string& precision) {
    const Stack A = check_stack(a, "a");
    const Stack B = check_stack(b, "b");
    if (A.m != B.m)
        throw std::invalid_argument("a and b must have the same m (samples): a has " + std::to_string(A.m) +
                                    ", b has " + std::to_string(B.m));
    if (form != "auto" && form != "gram" && form != "feature")
        throw std::invalid_argument("form must be 'auto', 'gram' or 'feature', got '" + form + "'");
    if (precision != "float32" && precision != "float64")
        throw std::invalid_argument("precision must be 'float32' or 'float64', got '" + precision + "'");
    if (max_bytes < (1 << 20))
        throw std::invalid_argument("max_bytes must be at least 1 MiB, got " + std::to_string(max_bytes));
    py::array_t<double> out({A.h, B.h});
    double* o = out.mutable_data();
    const bool gram = form == "gram" || (form == "auto" && A.d * B.d >= (A.m + 1) / 2);
    {
        py::gil_scoped_release release;
        if (gram && precision == "float32")
            cka_gram<float>(A, B, o, max_bytes);
        else if (gram)
            cka_gram<double>(A, B, o, max_bytes);
        else
            cka_feature(A, B, o, max_bytes);
    }
    return out;
}

}  // namespace fastcd
