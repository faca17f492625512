/* Lane vectors for the block quantizers (see quants.h): NL = 8 groups at a time. */
#ifndef NEMOQ_LANES_H
#define NEMOQ_LANES_H

#include "quants.h"

/* ---------------------------------------------------------------------------------------------
 * Lane vectors: NL = 8 groups at a time, with the vector extensions of GCC and Clang (plain
 * element-wise IEEE arithmetic on any target: SSE/AVX, NEON, or scalar code; no intrinsics).
 * Rounding functions are built from exact operations: rint(v) = (|v| + 2^23) - 2^23 with v's
 * sign for |v| < 2^23 (round to nearest even, as np.rint), v itself above.
 * ------------------------------------------------------------------------------------------- */

#if !defined(__GNUC__) && !defined(__clang__)
#error "nemoq's quantization kernels need the vector extensions of GCC or Clang"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"   /* wide vectors passed between static functions: no ABI at stake */
#endif

#define NL 8
typedef float vf __attribute__((vector_size(4 * NL)));
typedef int32_t vi __attribute__((vector_size(4 * NL)));
/* float64 work runs on half the lanes at a time (4 doubles: one AVX register, two NEON ones) */
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef double vd __attribute__((vector_size(32)));
typedef int64_t vl __attribute__((vector_size(32)));

static inline vf F(float s) { return (vf){s, s, s, s, s, s, s, s}; }
static inline vd D(double s) { return (vd){s, s, s, s}; }
static inline vi I(int32_t s) { return (vi){s, s, s, s, s, s, s, s}; }

/* m ? a : b per lane; m from a comparison (all bits set or clear) */
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vd seld(vl m, vd a, vd b) { return (vd)(((vl)a & m) | ((vl)b & ~m)); }
/* lanes 4h .. 4h + 3 as float64 (or a mask of them), and two halves back as float32 (rounded
 * to nearest, as numpy's astype(float32)) */
static inline vd half_d(vf x, int h) {
    vf4 t;
    memcpy(&t, (const char *)&x + 16 * h, sizeof t);
    return __builtin_convertvector(t, vd);
}

static inline vl half_mask(vi m, int h) {
    vi4 t;
    memcpy(&t, (const char *)&m + 16 * h, sizeof t);
    return __builtin_convertvector(t, vl);
}

static inline vf join_f(vd lo, vd hi) {
    const vf4 a = __builtin_convertvector(lo, vf4), b = __builtin_convertvector(hi, vf4);
    vf r;
    memcpy(&r, &a, sizeof a);
    memcpy((char *)&r + 16, &b, sizeof b);
    return r;
}

/* sum(x^2) / n over a whole row, added in order from 0 as ggml does (Q4_0, Q5_0 and Q5_1 weight
 * their importance by sqrt(this + x^2)) */
static inline float row_mean_square(const float * x, int64_t n) {
    float s = 0.0f;
    for (int64_t j = 0; j < n; j++) s += x[j] * x[j];
    return s / (float)n;
}

static inline vf vabs(vf x) { return (vf)((vi)x & I(0x7fffffff)); }
static inline vd vabsd(vd x) {
    const int64_t m = 0x7fffffffffffffffLL;
    return (vd)((vl)x & (vl){m, m, m, m});
}

static inline vf vrint(vf x) {
    const vf a = vabs(x);
    vf r = (a + F(0x1p23f)) - F(0x1p23f);
    r = (vf)((vi)r | ((vi)x & I(INT32_MIN)));
    return sel(a < F(0x1p23f), r, x);
}

static inline vd vrintd(vd x) {
    const vd a = vabsd(x);
    vd r = (a + D(0x1p52)) - D(0x1p52);
    const int64_t s = INT64_MIN;
    r = (vd)((vl)r | ((vl)x & (vl){s, s, s, s}));
    return seld(a < D(0x1p52), r, x);
}

#if defined(__AVX__) && NL == 8
static inline vf vfloor(vf x) { return __builtin_ia32_roundps256(x, 0x09); }   /* floor, no exceptions */
#else
static inline vf vfloor(vf x) { const vf r = vrint(x); return sel(r > x, r - F(1.0f), r); }
#endif
static inline vd vfloord(vd x) { const vd r = vrintd(x); return seld(r > x, r - D(1.0), r); }
static inline vf vceil(vf x) { const vf r = vrint(x); return sel(r < x, r + F(1.0f), r); }
static inline vf vtrunc(vf x) { return sel(x < F(0.0f), vceil(x), vfloor(x)); }

static inline vf vsqrt(vf x) {
    vf r;
    for (int l = 0; l < NL; l++) r[l] = sqrtf(x[l]);
    return r;
}

/* table[i] per lane (i in range) */
static inline vf lookup(const float * table, vi i) {
#if defined(__AVX2__) && NL == 8
    /* in asm, so that the result register starts from a fresh zero: GCC's builtin reuses the
     * last gather's register, and then each gather waits for the one before */
    vf r = F(0.0f);
    vi m = I(-1);
    __asm__("vgatherdps %[m], (%[t], %[i], 4), %[r]" : [r] "+x"(r), [m] "+x"(m) : [t] "r"(table), [i] "x"(i) : "memory");
    return r;
#else
    vf r;
    for (int l = 0; l < NL; l++) r[l] = table[i[l]];
    return r;
#endif
}

/* np.minimum / np.maximum (NaN propagates; on equality the second operand) and np.clip */
static inline vf vmin(vf a, vf b) { return sel((a < b) | (a != a), a, b); }
static inline vf vmax(vf a, vf b) { return sel((a > b) | (a != a), a, b); }
static inline vf vclip(vf v, float lo, float hi) {   /* = vmin(vmax(v, lo), hi) for constant bounds */
    v = sel(v <= F(lo), F(lo), v);
    return sel(v >= F(hi), F(hi), v);
}
static inline vd vclipd(vd v, double lo, double hi) {
    v = seld(v <= D(lo), D(lo), v);
    return seld(v >= D(hi), D(hi), v);
}

/* search.divide: a / b where b != 0, else 0 */
static inline vf vdiv(vf a, vf b) { return sel(b != F(0.0f), a / b, F(0.0f)); }

/* search.signed_absmax per lane (first on ties; +0 for a group of zeros, as ggml) */
static inline vf v_signed_absmax(const vf * x, int n) {
    vf amax = F(0.0f), out = F(0.0f);
    for (int i = 0; i < n; i++) {
        const vf a = vabs(x[i]);
        const vi gt = a > amax;
        amax = sel(gt, a, amax);
        out = sel(gt, x[i], out);
    }
    return out;
}

/* Format.best_of's error per lane for 32-value blocks: numpy's pairwise sum (8 accumulators)
 * of (w * diff) * diff, from the identity 0. */
static inline vf v_error32(const vf * x, const vf * y, const vf * w) {
    vf r[8];
    for (int j = 0; j < 8; j++) r[j] = (w[j] * (x[j] - y[j])) * (x[j] - y[j]);
    for (int i = 8; i < 32; i += 8) {
        for (int j = 0; j < 8; j++) r[j] += (w[i + j] * (x[i + j] - y[i + j])) * (x[i + j] - y[i + j]);
    }
    return F(0.0f) + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

/* search.refine_on_grid for 32-value blocks on a grid given by LEVEL(v, arg) (the nearest grid
 * value to v = x / d) and INDEX(v, arg) (its index): two rounds of (nearest levels for d,
 * least-squares d for them), d rounded to half, nearest indices for it. The function returns
 * the half-rounded d and writes the indices to idx. */
#define DEFINE_REFINE_ON_GRID(name, LEVEL, INDEX)                                   \
    static vf name(const vf * x, const vf * w, vf d, float arg, vf * idx) {         \
        for (int it = 0; it < 2; it++) {                                            \
            const vf inv = vdiv(F(1.0f), d);                                        \
            vf sxq = F(0.0f), sqq = F(0.0f);                                        \
            for (int i = 0; i < 32; i++) {                                          \
                const vf q = LEVEL(x[i] * inv, arg);                                \
                sxq += (w[i] * x[i]) * q;                                           \
                sqq += (w[i] * q) * q;                                              \
            }                                                                       \
            const vf fit = sel(sqq != F(0.0f), sxq / sqq, F(0.0f));                 \
            d = sel(fit != F(0.0f), fit, d);                                        \
        }                                                                           \
        vf dh;                                                                      \
        for (int l = 0; l < NL; l++) dh[l] = f16_round(d[l]);                       \
        const vf inv = vdiv(F(1.0f), dh);                                           \
        for (int i = 0; i < 32; i++) idx[i] = INDEX(x[i] * inv, arg);               \
        return dh;                                                                  \
    }

/* rows[l][j] -> out[j][l] for an 8 x 8 tile: three rounds of two-input shuffles, which
 * compilers turn into unpack / shuffle / lane-permute instructions. */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void transpose8(const vf * r, vf * out) {
    vf t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = SHUF(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[k + 1] = SHUF(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int k = 0; k < 8; k += 4)
        for (int h = 0; h < 2; h++) {
            u[k + 2 * h] = SHUF(t[k + h], t[k + 2 + h], 0, 1, 8, 9, 4, 5, 12, 13);
            u[k + 2 * h + 1] = SHUF(t[k + h], t[k + 2 + h], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int k = 0; k < 4; k++) {
        out[k] = SHUF(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        out[k + 4] = SHUF(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#undef SHUF

/* Values i0 .. i0 + 7 of blocks b0 .. b0 + NL - 1 of a row as 8 value-major vectors; lanes past
 * the row's nb blocks get `pad`. */
static inline void load_tile(const float * xr, int64_t b0, int64_t nb, int bs, int i0, float pad, vf * out) {
    vf rows[NL];
    for (int l = 0; l < NL; l++) {
        if (b0 + l < nb) memcpy(&rows[l], xr + (b0 + l) * bs + i0, sizeof rows[l]);
        else rows[l] = F(pad);
    }
    transpose8(rows, out);
}

/* Blocks b0 .. b0 + NL - 1 of a row, value-major (x[i][lane]), with their weights (1 without
 * importance); lanes past the row's nb blocks get zeros and are never written out. */
static inline void load_blocks(const float * xr, const float * imp, int64_t b0, int64_t nb, int bs, vf * x, vf * w) {
    for (int i0 = 0; i0 < bs; i0 += 8) {
        load_tile(xr, b0, nb, bs, i0, 0.0f, x + i0);
        if (imp) load_tile(imp, b0, nb, bs, i0, 1.0f, w + i0);
        else for (int j = 0; j < 8; j++) w[i0 + j] = F(1.0f);
    }
}

#endif
