/* Block quantizers in portable C, bit-identical to the numpy references in nemoq/quant/formats.
 *
 * Each function handles `nrows` rows of `n_per_row` values; the caller splits rows across
 * threads (ctypes releases the GIL), so the C code stays single-threaded and simple.
 * Quantizers take an optional importance vector (one non-negative weight per column, NULL for
 * none); dequantizers turn the bytes back into float32 exactly as the numpy references do.
 *
 * Portable C11 with the vector extensions of GCC and Clang (no intrinsics) and libm, built with
 * -ffp-contract=off: no fused multiply-adds, which numpy's element-wise operations never use.
 *
 * How the C stays bit-identical to numpy:
 *  - every operation is done in the dtype numpy does it in: float32 where the reference stays
 *    in float32, double where a float64 constant (np.geomspace / np.linspace search factors)
 *    promotes the arithmetic to float64;
 *  - sums over a group (search.dot / search.total) add in order from +0; the per-block errors
 *    of Format.best_of are numpy's pairwise sum (pairwise_sum below); Q4_0/Q5_0's per-row
 *    mean square is numpy's pairwise sum over the row;
 *  - rounding is rint (ties to even, numpy's np.rint) except where numpy truncates;
 *  - nearest-level lookups give what search.Grid's tables give;
 *  - ties: first candidate wins (np.argmin, strict `<` / `>` updates), as in numpy.
 * Non-finite inputs are outside the contract (numpy's own casts of NaN are platform-defined).
 *
 * Speed: like numpy, the searches run over NL = 8 groups at once (the groups of a super-block,
 * or 8 consecutive blocks), value-major as numpy's groups_first lays them out: x[i] holds value i
 * of each group, one group per vector lane. Each lane does exactly the scalar operations in the
 * scalar order, so the vectors change nothing in the results. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK8_0 32
#define QK4_0 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

/* weights of 1: the error measure without importance */
#define ONES8 1, 1, 1, 1, 1, 1, 1, 1
#define ONES64 ONES8, ONES8, ONES8, ONES8, ONES8, ONES8, ONES8, ONES8
static const float ONES[256] = {ONES64, ONES64, ONES64, ONES64};

/* Constants from the numpy references (tests/test_kernels_c.py checks them against the modules;
 * kept in this file, not a header, because build.py's cache key hashes the .c sources).
 * TARGETS_*: the float64 targets of nemoq's own searches (nmax * search_factors, or the KVALUES
 * ends * search_factors for IQ4_NL), as exact hex literals; MIDS_* (with the Grid lookups below):
 * the midpoints between neighbouring levels of a search.Grid in units of its step (mid / step);
 * the nearest level of v is the number of them <= floor(v / step) (ties up), or < ceil(v / step)
 * with ties_down, which is what Grid.lut holds for that cell. */
static const double TARGETS_Q4_0[12] = {
    0x1.b333333333333p+2, 0x1.e00b73de1d44dp+2, 0x1.08c15688bb8e3p+3, 0x1.24096258bcca8p+3,
    0x1.4221181b4c0f6p+3, 0x1.6352a0030b42bp+3, 0x1.87efc677a41e4p+3, 0x1.b052c5a912ae6p+3,
    0x1.dcdf23e8584a2p+3, 0x1.07015474c2245p+4, 0x1.221b3625bad22p+4, 0x1.4000000000000p+4
};
static const double TARGETS_Q5_0[12] = {
    0x1.b333333333333p+3, 0x1.e00b73de1d44dp+3, 0x1.08c15688bb8e3p+4, 0x1.24096258bcca8p+4,
    0x1.4221181b4c0f6p+4, 0x1.6352a0030b42bp+4, 0x1.87efc677a41e4p+4, 0x1.b052c5a912ae6p+4,
    0x1.dcdf23e8584a2p+4, 0x1.07015474c2245p+5, 0x1.221b3625bad22p+5, 0x1.4000000000000p+5
};
static const double TARGETS_IQ4_NL[16] = {
    -0x1.afccccccccccdp+6, -0x1.f7bfc04ebf601p+6, -0x1.25d7e33a18130p+7, -0x1.56ce21201f7cap+7,
    -0x1.8fece6441b7abp+7, -0x1.d29033593c44ap+7, -0x1.102702c6775a2p+8, -0x1.3d80000000000p+8,
    0x1.8033333333333p+6, 0x1.c037b733eccc7p+6, 0x1.05737d9472251p+7, 0x1.31040140dd871p+7,
    0x1.63d6d0e9f42abp+7, 0x1.9f219075b299dp+7, 0x1.e44d7bde27093p+7, 0x1.1a80000000000p+8
};
static const double TARGETS_Q6_K[19] = {
    0x1.3333333333333p+4, 0x1.4000000000000p+4, 0x1.4cccccccccccdp+4, 0x1.599999999999ap+4,
    0x1.6666666666666p+4, 0x1.7333333333333p+4, 0x1.8000000000000p+4, 0x1.8cccccccccccdp+4,
    0x1.999999999999ap+4, 0x1.a666666666666p+4, 0x1.b333333333334p+4, 0x1.c000000000000p+4,
    0x1.ccccccccccccdp+4, 0x1.d99999999999ap+4, 0x1.e666666666667p+4, 0x1.f333333333334p+4,
    0x1.0000000000000p+5, 0x1.0666666666667p+5, 0x1.0cccccccccccdp+5
};

/* ---------------------------------------------------------------------------------------------
 * Half precision and small helpers
 * ------------------------------------------------------------------------------------------- */

/* IEEE half <-> float, round to nearest even (what numpy's astype(float16) does). */
static uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t mant = x & 0x7fffffu;
    int32_t exp = (int32_t)((x >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    exp -= 127 - 15;
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        const uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1);
        const uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

/* IEEE double -> half in one rounding (numpy's float64.astype(float16); not via float32). */
static uint16_t fp64_to_fp16(double f) {
    uint64_t x;
    memcpy(&x, &f, 8);
    const uint16_t sign = (uint16_t)((x >> 48) & 0x8000u);
    uint64_t mant = x & 0xfffffffffffffull;
    int32_t exp = (int32_t)((x >> 52) & 0x7ff);
    if (exp == 0x7ff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    exp -= 1023 - 15;
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    uint32_t shift;
    if (exp <= 0) {
        if (exp < -10) return sign;
        mant |= 1ull << 52;
        shift = (uint32_t)(43 - exp);   /* 42 mantissa bits dropped, plus the subnormal shift */
    } else {
        shift = 42;
    }
    uint64_t half = mant >> shift;
    const uint64_t rem = mant & ((1ull << shift) - 1);
    const uint64_t mid = 1ull << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    if (exp > 0) half += (uint64_t)exp << 10;   /* a mantissa carry rolls into the exponent */
    return (uint16_t)(sign | half);
}

static float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
    if (exp == 0x1f) x = sign | 0x7f800000u | (mant << 13);
    else if (exp) x = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) x = sign;
    else {  /* subnormal half: normalise */
        exp = 113;
        while (!(mant & 0x400u)) { mant <<= 1; exp--; }
        x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline float f16_round(float f) { return fp16_to_fp32(fp32_to_fp16(f)); }

static inline void put_f16(uint8_t * p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static inline float get_f16(const uint8_t * p) { return fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }

/* C's roundf: ties away from zero, as ggml. */
static inline float round_half_away(float x) { return roundf(x); }

/* np.minimum / np.maximum: NaN propagates, and on equality the second operand comes back. */
static inline float np_minf(float a, float b) { return (a < b || a != a) ? a : b; }
static inline float np_maxf(float a, float b) { return (a > b || a != a) ? a : b; }
static inline float clipf(float v, float lo, float hi) { return np_minf(np_maxf(v, lo), hi); }

/* search.divide: a / b where b != 0, else 0 (float32 operands). */
static inline float divf(float a, float b) { return b != 0.0f ? a / b : 0.0f; }

/* search.signed_absmax: the value of largest magnitude, with its sign (first on ties). */
static inline float signed_absmax_f(const float * x, int n) {
    int best = 0;
    float amax = fabsf(x[0]);
    for (int i = 1; i < n; i++) {
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); best = i; }
    }
    return x[best];
}

static inline double signed_absmax_d(const double * x, int n) {
    int best = 0;
    double amax = fabs(x[0]);
    for (int i = 1; i < n; i++) {
        if (fabs(x[i]) > amax) { amax = fabs(x[i]); best = i; }
    }
    return x[best];
}

/* numpy's pairwise summation (pairwise_sum in loops_utils.h.src), which np.sum uses along a
 * contiguous axis: 8 accumulators up to 128 values, halving above that. */
static float pairwise_sum(const float * a, int64_t n) {
    if (n < 8) {
        float res = -0.0f;
        for (int64_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8) {
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        }
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* The same over x[i] * x[i], without a temporary row. */
static float pairwise_sumsq(const float * a, int64_t n) {
    if (n < 8) {
        float res = -0.0f;
        for (int64_t i = 0; i < n; i++) res += a[i] * a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j] * a[j];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8) {
            for (int j = 0; j < 8; j++) r[j] += a[i + j] * a[i + j];
        }
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i] * a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sumsq(a, n2) + pairwise_sumsq(a + n2, n - n2);
}

/* np.sum(axis=-1) of a row: the reduction starts from the identity 0. */
static inline float np_sum(const float * a, int64_t n) { return 0.0f + pairwise_sum(a, n); }
static inline float np_sum_sq_row(const float * a, int64_t n) { return 0.0f + pairwise_sumsq(a, n); }

/* Format.best_of's error of one block: sum of (w * diff) * diff, numpy's pairwise order.
 * w may be NULL (all ones). */
static float block_error(const float * x, const float * y, const float * w, int n) {
    float t[QK_K];
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - y[i];
        t[i] = (w ? w[i] : 1.0f) * diff * diff;
    }
    return np_sum(t, n);
}

/* np.argmin over candidate errors: the first minimum; a NaN wins (as numpy's argmin). */
static int argmin_first(const float * err, int n) {
    int best = 0;
    for (int k = 1; k < n; k++) {
        if (err[best] != err[best]) break;
        if (err[k] < err[best] || err[k] != err[k]) best = k;
    }
    return best;
}

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

static inline vf vfloor(vf x) { const vf r = vrint(x); return sel(r > x, r - F(1.0f), r); }
static inline vd vfloord(vd x) { const vd r = vrintd(x); return seld(r > x, r - D(1.0), r); }
static inline vf vceil(vf x) { const vf r = vrint(x); return sel(r < x, r + F(1.0f), r); }
static inline vf vtrunc(vf x) { return sel(x < F(0.0f), vceil(x), vfloor(x)); }

static inline vf vsqrt(vf x) {
    vf r;
    for (int l = 0; l < NL; l++) r[l] = sqrtf(x[l]);
    return r;
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

/* search.signed_absmax per lane (first on ties) */
static inline vf v_signed_absmax(const vf * x, int n) {
    vf amax = vabs(x[0]), out = x[0];
    for (int i = 1; i < n; i++) {
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

/* ---------------------------------------------------------------------------------------------
 * search.Grid lookups
 * ------------------------------------------------------------------------------------------- */

static const float KVALUES_IQ4_NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float MIDS_IQ4_NL[15] = {-231, -187, -148, -114, -84, -57, -32, -9, 14, 38, 63, 91, 122, 158, 202};
static const float MIDS_E2M1[7] = {1, 3, 5, 7, 10, 14, 20};
static const float KVALUES_FP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* Grid(np.arange(-nmax, nmax), 0.5) (Q4_0, Q5_0): the index of the nearest level of v, ties up:
 * with K = floor(2 v), floor((K + 1) / 2) + nmax clipped to the table; NaN gives 0 as the table. */
static inline vf int_grid_index(vf v, float nmax) {
    const vf K = vfloor(v * F(2.0f));
    vf t = vfloor((K + F(1.0f)) * F(0.5f)) + F(nmax);
    t = sel(t > F(0.0f), t, F(0.0f));
    return sel(t < F(2.0f * nmax - 1.0f), t, F(2.0f * nmax - 1.0f));
}

/* iq4_nl.GRID: index = #mids <= K with K = floor(2 v); the level itself is KVALUES[0] plus the
 * steps passed (integers, exact). */
static inline vf iq4nl_index(vf K) {
    vf c = F(0.0f);
    for (int k = 0; k < 15; k++) c += sel(K >= F(MIDS_IQ4_NL[k]), F(1.0f), F(0.0f));
    return c;
}

static inline vf iq4nl_value(vf K) {
    vf v = F(KVALUES_IQ4_NL[0]);
    for (int k = 0; k < 15; k++) {
        v += sel(K >= F(MIDS_IQ4_NL[k]), F(KVALUES_IQ4_NL[k + 1] - KVALUES_IQ4_NL[k]), F(0.0f));
    }
    return v;
}

/* floor(2 v) of the float64 path, for iq4nl_value: clipped to the table's range (exact, and it
 * changes no count) so that it is exact in float32 too. */
static inline vd iq4nl_cell_d(vd v) { return vclipd(vfloord(v * D(2.0)), -256.0, 256.0); }

static inline vf iq4nl_kvalue(vf idx) {
    vf v;
    for (int l = 0; l < NL; l++) v[l] = KVALUES_IQ4_NL[(int)idx[l]];
    return v;
}

/* mxfp4.E2M1_GRID (levels 0, 0.5, 1, 1.5, 2, 3, 4, 6) with ties_down: index = #mids < ceil(4 v). */
static inline vf e2m1_index(vf v) {
    const vf K = vceil(v * F(4.0f));
    vf c = F(0.0f);
    for (int k = 0; k < 7; k++) c += sel(F(MIDS_E2M1[k]) < K, F(1.0f), F(0.0f));
    return c;
}

/* E2M1[m] for an index m held as a float */
static inline vf e2m1_value(vf m) {
    const vf low = F(0.5f) * m;
    return sel(m <= F(4.0f), low, sel(m == F(5.0f), F(3.0f), sel(m == F(6.0f), F(4.0f), F(6.0f))));
}

/* ---------------------------------------------------------------------------------------------
 * The scale searches of search.py, NL groups at a time (x[i] holds value i of each group)
 * ------------------------------------------------------------------------------------------- */

/* make_qx_quants with ggml's float32 targets nmax + 0.1 * step, step = 0, -9..-1, 1..9:
 * levels L in [-nmax, nmax - 1] and a scale per lane, all in float32. */
static vf v_make_qx_quants_f(int n, int nmax, const vf * x, const vf * w, vf * L) {
    vf wx[32], lv[32];
    for (int i = 0; i < n; i++) wx[i] = w[i] * x[i];
    vf max = v_signed_absmax(x, n);
    const vi zero = vabs(max) < F(GROUP_MAX_EPS);
    max = sel(zero, F(1.0f), max);
    vf scale = F(0.0f), best = F(0.0f);
    for (int k = 0; k < 19; k++) {
        const int step = k == 0 ? 0 : (k <= 9 ? k - 10 : k - 9);
        const float target = (float)nmax + 0.1f * (float)step;
        const vf iscale = F(-target) / max;
        vf sumlx = F(0.0f), suml2 = F(0.0f);
        for (int i = 0; i < n; i++) {
            const vf v = vclip(vrint(iscale * x[i]), (float)-nmax, (float)(nmax - 1));
            lv[i] = v;
            sumlx += wx[i] * v;
            suml2 += (w[i] * v) * v;
        }
        const vi pos = suml2 > F(0.0f);
        const vf this_scale = sel(pos, sumlx / suml2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumlx * sumlx > best * suml2);
        scale = sel(take, this_scale, scale);
        best = sel(take, this_scale * sumlx, best);
        for (int i = 0; i < n; i++) L[i] = k == 0 ? lv[i] : sel(take, lv[i], L[i]);
    }
    for (int i = 0; i < n; i++) L[i] = sel(zero, F((float)-nmax), L[i]);
    return sel(zero, F(0.0f), scale);
}

/* make_qx_quants with float64 targets (nemoq's own searches): numpy promotes the scale, levels
 * and sums to float64. Writes the 8 scales, and the levels (L[i][h]: lanes 4h .. 4h + 3) when
 * L is not NULL. */
static void v_make_qx_quants_d(int n, int nmax, const double * targets, int ntargets,
                               const vf * x, const vf * w, double * scale_out, vd (*L)[2]) {
    const vf maxf = v_signed_absmax(x, n);
    const vi zero = vabs(maxf) < F(GROUP_MAX_EPS);
    const vf max1 = sel(zero, F(1.0f), maxf);
    for (int h = 0; h < 2; h++) {
        vd xd[32], wd[32], wxd[32], lv[32];
        for (int i = 0; i < n; i++) {
            xd[i] = half_d(x[i], h);
            wd[i] = half_d(w[i], h);
            wxd[i] = half_d(w[i] * x[i], h);
        }
        const vd max = half_d(max1, h);
        const vl zero_h = half_mask(zero, h);
        vd scale = D(0.0), best = D(0.0);
        for (int k = 0; k < ntargets; k++) {
            const vd iscale = D(-targets[k]) / max;
            vd sumlx = D(0.0), suml2 = D(0.0);
            for (int i = 0; i < n; i++) {
                const vd v = vclipd(vrintd(iscale * xd[i]), (double)-nmax, (double)(nmax - 1));
                lv[i] = v;
                sumlx += wxd[i] * v;
                suml2 += (wd[i] * v) * v;
            }
            const vl pos = suml2 > D(0.0);
            const vd this_scale = seld(pos, sumlx / suml2, D(0.0));
            const vl take = k == 0 ? half_mask(I(-1), 0) : pos & (sumlx * sumlx > best * suml2);
            scale = seld(take, this_scale, scale);
            best = seld(take, this_scale * sumlx, best);
            if (L) for (int i = 0; i < n; i++) L[i][h] = k == 0 ? lv[i] : seld(take, lv[i], L[i][h]);
        }
        if (L) for (int i = 0; i < n; i++) L[i][h] = seld(zero_h, D((double)-nmax), L[i][h]);
        scale = seld(zero_h, D(0.0), scale);
        memcpy(scale_out + 4 * h, &scale, sizeof scale);
    }
}

/* refine_on_grid for Q4_0 / Q5_0 (integer grid) from the float64 d of the search: two rounds of
 * (nearest levels for d, least-squares d for them), d rounded to half, nearest levels for it.
 * numpy keeps d float64 until the half rounding (np.where(fit != 0, fit, d) with float64 d), so
 * 1 / d is a float64 division rounded to float32, and d goes to half in one rounding.
 * Returns the half-rounded d; idx gets the level indices (level + nmax). */
static vf v_refine_int_grid(int nmax, const vf * x, const vf * w, double * d, vf * idx) {
    const float fn = (float)nmax;
    for (int it = 0; it < 2; it++) {
        vf inv;
        for (int l = 0; l < NL; l++) inv[l] = d[l] != 0.0 ? (float)(1.0 / d[l]) : 0.0f;
        vf sxq = F(0.0f), sqq = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = int_grid_index(x[i] * inv, fn) - F(fn);
            sxq += (w[i] * x[i]) * q;
            sqq += (w[i] * q) * q;
        }
        const vf fit = sel(sqq != F(0.0f), sxq / sqq, F(0.0f));
        for (int l = 0; l < NL; l++) d[l] = fit[l] != 0.0f ? (double)fit[l] : d[l];
    }
    vf dh;
    for (int l = 0; l < NL; l++) dh[l] = fp16_to_fp32(fp64_to_fp16(d[l]));
    const vf inv = vdiv(F(1.0f), dh);
    for (int i = 0; i < 32; i++) idx[i] = int_grid_index(x[i] * inv, fn);
    return dh;
}

/* refine_on_grid for IQ4_NL, whose search gives a float32 d. */
static vf v_refine_iq4_nl(const vf * x, const vf * w, vf d, vf * idx) {
    for (int it = 0; it < 2; it++) {
        const vf inv = vdiv(F(1.0f), d);
        vf sxq = F(0.0f), sqq = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(vfloor(x[i] * inv * F(2.0f)));
            sxq += (w[i] * x[i]) * q;
            sqq += (w[i] * q) * q;
        }
        const vf fit = sel(sqq != F(0.0f), sxq / sqq, F(0.0f));
        d = sel(fit != F(0.0f), fit, d);
    }
    vf dh;
    for (int l = 0; l < NL; l++) dh[l] = f16_round(d[l]);
    const vf inv = vdiv(F(1.0f), dh);
    for (int i = 0; i < 32; i++) idx[i] = iq4nl_index(vfloor(x[i] * inv * F(2.0f)));
    return dh;
}

/* make_qkx_quants (ggml's make_qkx2/qkx3_quants) for NL groups of 32: x ~ scale * L - min with
 * L in [0, nmax]; returns scale, writes -min (the group's stored min) and L. float32. */
static vf v_make_qkx_quants(int nmax, float rmin, float rdelta, int nstep, const vf * x, const vf * w,
                            vf * the_min, vf * L) {
    const float fn = (float)nmax;
    vf mn = x[0], mx = x[0], sum_w = F(0.0f), sum_x = F(0.0f), best = F(0.0f);
    for (int i = 1; i < 32; i++) { mn = vmin(mn, x[i]); mx = vmax(mx, x[i]); }
    for (int i = 0; i < 32; i++) { sum_w += w[i]; sum_x += w[i] * x[i]; }
    mn = vmin(mn, F(0.0f));
    const vi flat = mx <= mn;
    const vf iscale = F(fn) / sel(flat, F(1.0f), mx - mn);
    vf scale = F(1.0f) / iscale;
    for (int i = 0; i < 32; i++) {
        L[i] = vclip(vrint((x[i] - mn) * iscale), 0.0f, fn);
        const vf diff = ((scale * L[i]) + mn) - x[i];
        best += (w[i] * diff) * diff;
    }
    vf lv[32];
    for (int step = 0; step <= nstep; step++) {
        const vf is = F((rmin + rdelta * (float)step) + fn) / sel(flat, F(1.0f), mx - mn);
        vf sum_l = F(0.0f), sum_l2 = F(0.0f), sum_xl = F(0.0f), cur = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf v = vclip(vrint((x[i] - mn) * is), 0.0f, fn);
            const vf wl = w[i] * v;
            lv[i] = v;
            sum_l += wl;
            sum_l2 += wl * v;
            sum_xl += wl * x[i];
        }
        const vf det = sum_w * sum_l2 - sum_l * sum_l;
        const vf s = (sum_w * sum_xl - sum_x * sum_l) / det;
        const vf m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const vi positive = m > F(0.0f);
        const vf this_scale = sel(positive, sum_xl / sum_l2, s);
        const vf this_min = sel(positive, F(0.0f), m);
        for (int i = 0; i < 32; i++) {
            const vf diff = ((this_scale * lv[i]) + this_min) - x[i];
            cur += (w[i] * diff) * diff;
        }
        const vi better = (det > F(0.0f)) & (cur < best);
        best = sel(better, cur, best);
        scale = sel(better, this_scale, scale);
        mn = sel(better, this_min, mn);
        for (int i = 0; i < 32; i++) L[i] = sel(better, lv[i], L[i]);
    }
    for (int i = 0; i < 32; i++) L[i] = sel(flat, F(0.0f), L[i]);
    *the_min = -mn;
    return sel(flat, F(0.0f), scale);
}

/* make_qp_quants (one super-block at a time): the 8 group scales (or mins) of a super-block as
 * levels in [0, nmax] times one scale: an iscale search, then coordinate descent on single
 * levels. float32 throughout. */
static float make_qp_quants(const float * x, const float * w, int n, int nmax, float * L) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = np_maxf(max, x[i]);
    const int zero = max < GROUP_MAX_EPS;
    if (zero) max = 1.0f;
    const float fnmax = (float)nmax;

    float iscale = fnmax / max, best = 0.0f;
    {
        const float scale = 1.0f / iscale;
        for (int i = 0; i < n; i++) {
            const float diff = x[i] - scale * rintf(iscale * x[i]);
            best += (w[i] * diff) * diff;
        }
    }
    for (int step = -4; step <= 4; step++) {
        if (step == 0) continue;
        const float is = (0.1f * (float)step + fnmax) / max;
        const float scale = 1.0f / is;
        float err = 0.0f;
        for (int i = 0; i < n; i++) {
            const float diff = x[i] - scale * np_minf(fnmax, rintf(is * x[i]));
            err += (w[i] * diff) * diff;
        }
        if (err < best) {
            best = err;
            iscale = is;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) L[i] = np_minf(fnmax, rintf(iscale * x[i]));
    for (int i = 0; i < n; i++) sumlx += (w[i] * x[i]) * L[i];
    for (int i = 0; i < n; i++) suml2 += (w[i] * L[i]) * L[i];
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            const float wi = w[i], xi = x[i], li = L[i];
            const float slx_rest = sumlx - (wi * xi) * li;
            const float sl2_rest = suml2 - (wi * li) * li;
            const float new_l = np_minf(fnmax, rintf((xi * sl2_rest) / slx_rest));
            const float slx = slx_rest + (wi * xi) * new_l;
            const float sl2 = sl2_rest + (wi * new_l) * new_l;
            if (slx_rest > 0.0f && sl2_rest > 0.0f && new_l != li && (slx * slx) * suml2 > (sumlx * sumlx) * sl2) {
                L[i] = new_l;
                sumlx = slx;
                suml2 = sl2;
                changed = 1;
            }
        }
        if (!changed) break;   /* a pass that changes nothing leaves the next ones nothing to do */
    }
    if (zero) {
        for (int i = 0; i < n; i++) L[i] = 0.0f;
        return 0.0f;
    }
    return divf(sumlx, suml2);
}

/* ---------------------------------------------------------------------------------------------
 * Q8_0 (ggml's quantize_row_q8_0_ref; importance ignored, as ggml)
 * ------------------------------------------------------------------------------------------- */

void nemoq_quantize_q8_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    (void)importance;
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * (2 + QK8_0);
        for (int64_t b = 0; b < nb; b++, o += 2 + QK8_0) {
            const float * xb = xr + b * QK8_0;
            float amax = 0.0f;
            for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            put_f16(o, d);
            for (int j = 0; j < QK8_0; j++) o[2 + j] = (uint8_t)(int8_t)round_half_away(xb[j] * id);
        }
    }
}

void nemoq_dequantize_q8_0(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t * q = data + r * nb * (2 + QK8_0);
        float * yr = y + r * n_per_row;
        for (int64_t b = 0; b < nb; b++, q += 2 + QK8_0) {
            const float d = get_f16(q);
            for (int j = 0; j < QK8_0; j++) yr[b * QK8_0 + j] = d * (float)(int8_t)q[2 + j];
        }
    }
}

/* Blocks b0 .. b0 + NL - 1 of a row, value-major (x[i][lane]), with their weights (1 without
 * importance); lanes past the row's nb blocks get zeros and are never written out. */
static void load_blocks(const float * xr, const float * imp, int64_t b0, int64_t nb, int bs, vf * x, vf * w) {
    for (int l = 0; l < NL; l++) {
        const int in = b0 + l < nb;
        for (int i = 0; i < bs; i++) {
            x[i][l] = in ? xr[(b0 + l) * bs + i] : 0.0f;
            w[i][l] = in && imp ? imp[(b0 + l) * bs + i] : 1.0f;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_0 and Q5_0 (q4_0.py, q5_0.py): signed levels -nmax..nmax-1 times an f16 scale
 * ------------------------------------------------------------------------------------------- */

/* Block bytes from d and lane l of the unsigned levels q = level + nmax. */
static void pack_q4_0(uint8_t * o, float d, const vf * q, int l) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(((int)q[j][l] & 0x0F) | ((int)q[j + 16][l] << 4));
}

static void pack_q5_0(uint8_t * o, float d, const vf * q, int l) {
    put_f16(o, d);
    uint32_t qh = 0;
    for (int j = 0; j < 32; j++) qh |= (uint32_t)(((int)q[j][l] >> 4) & 1) << j;
    for (int k = 0; k < 4; k++) o[2 + k] = (uint8_t)(qh >> (8 * k));
    for (int j = 0; j < 16; j++) o[6 + j] = (uint8_t)(((int)q[j][l] & 0x0F) | ((int)q[j + 16][l] << 4));
}

static void dequant_block_q4_0(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(b[2 + j] & 0x0F) - 8);
        y[j + 16] = d * (float)((int)(b[2 + j] >> 4) - 8);
    }
}

static void dequant_block_q5_0(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        const int hi = (b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void quantize_x_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance, int nmax) {
    const int is5 = nmax == 16;
    const int bsize = is5 ? 22 : 18;
    const float fn = (float)nmax;
    const double * targets = is5 ? TARGETS_Q5_0 : TARGETS_Q4_0;
    void (*pack)(uint8_t *, float, const vf *, int) = is5 ? pack_q5_0 : pack_q4_0;
    const int64_t nb = n_per_row / QK4_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        /* q4_0.py ggml_rows: sigma2 = (x * x).sum(axis=-1) / n, numpy's pairwise sum */
        const float sigma2 = importance ? np_sum_sq_row(xr, n_per_row) / (float)n_per_row : 0.0f;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], qg[32], qo[32], y[32], dg;
            load_blocks(xr, importance, b0, nb, QK4_0, xt, wt);
            /* ggml's choice (ggml_rows): the _ref quantizer, or make_qx_quants with importance */
            if (!importance) {
                dg = v_signed_absmax(xt, 32) / F(-fn);
                const vf inv = sel(dg == F(0.0f), F(0.0f), F(1.0f) / dg);
                for (int i = 0; i < 32; i++) qg[i] = vmin(F(2.0f * fn - 1.0f), vtrunc(xt[i] * inv + F(fn + 0.5f)));
            } else {
                vf qw[32];
                for (int i = 0; i < 32; i++) qw[i] = wt[i] * vsqrt(F(sigma2) + xt[i] * xt[i]);
                dg = v_make_qx_quants_f(32, nmax, xt, qw, qg);
                for (int i = 0; i < 32; i++) qg[i] = qg[i] + F(fn);
            }
            /* ours: a wider search for the error itself, refined on the grid */
            double d64[NL];
            v_make_qx_quants_d(32, nmax, targets, 12, xt, wt, d64, NULL);
            const vf dh = v_refine_int_grid(nmax, xt, wt, d64, qo);
            /* best_of: the errors of the dequantized candidates */
            vf dgh;
            for (int l = 0; l < NL; l++) dgh[l] = f16_round(dg[l]);
            for (int i = 0; i < 32; i++) y[i] = dgh * (qg[i] - F(fn));
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * (qo[i] - F(fn));
            const vf eo = v_error32(xt, y, wt);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                const float err[2] = {eg[l], eo[l]};
                uint8_t * o = out + (r * nb + b0 + l) * bsize;
                if (argmin_first(err, 2) == 0) pack(o, dg[l], qg, l);
                else pack(o, dh[l], qo, l);
            }
        }
    }
}

void nemoq_quantize_q4_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_x_0(x, out, nrows, n_per_row, importance, 8);
}

void nemoq_quantize_q5_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_x_0(x, out, nrows, n_per_row, importance, 16);
}

#define DEQUANT_ROWS(name, block, bytes, fn)                                                  \
    void nemoq_dequantize_##name(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row) { \
        const int64_t nb = n_per_row / (block);                                               \
        for (int64_t r = 0; r < nrows; r++) {                                                 \
            for (int64_t b = 0; b < nb; b++) {                                                \
                fn(data + (r * nb + b) * (bytes), y + r * n_per_row + b * (block));           \
            }                                                                                 \
        }                                                                                     \
    }

DEQUANT_ROWS(q4_0, 32, 18, dequant_block_q4_0)
DEQUANT_ROWS(q5_0, 32, 22, dequant_block_q5_0)

/* ---------------------------------------------------------------------------------------------
 * IQ4_NL (iq4_nl.py): 32 indices into KVALUES times an f16 scale
 * ------------------------------------------------------------------------------------------- */

/* iq4_nl.scale_search with ggml's inverse scales (float32): 1 / (max / 127), then (t - 127) / max
 * for t in -7..7. Returns d; idx gets the nearest indices for it. */
static vf v_iq4_nl_search_ggml(const vf * x, const vf * w, vf * idx) {
    vf wx[32];
    for (int i = 0; i < 32; i++) wx[i] = w[i] * x[i];
    vf max = v_signed_absmax(x, 32);
    const vi zero = vabs(max) < F(GROUP_MAX_EPS);
    max = sel(zero, F(1.0f), max);
    vf d = F(0.0f), best = F(0.0f);
    for (int k = 0; k < 16; k++) {
        const vf id = k == 0 ? F(1.0f) / (max / F(127.0f)) : F((float)(k - 8 - 127)) / max;
        vf sumqx = F(0.0f), sumq2 = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(vfloor(id * x[i] * F(2.0f)));
            sumqx += wx[i] * q;
            sumq2 += (w[i] * q) * q;
        }
        const vi pos = sumq2 > F(0.0f);
        const vf this_d = sel(pos, sumqx / sumq2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumqx * sumqx > best * sumq2);
        d = sel(take, this_d, d);
        best = sel(take, this_d * sumqx, best);
    }
    d = sel(zero, F(0.0f), d);
    const vf inv = vdiv(F(1.0f), d);
    for (int i = 0; i < 32; i++) idx[i] = iq4nl_index(vfloor(x[i] * inv * F(2.0f)));
    return d;
}

/* The same with our float64 targets t / max (t = KVALUES ends times the search factors). */
static vf v_iq4_nl_search_ours(const vf * x, const vf * w) {
    vf wx[32];
    vd xd[2][32];
    for (int i = 0; i < 32; i++) {
        wx[i] = w[i] * x[i];
        xd[0][i] = half_d(x[i], 0);
        xd[1][i] = half_d(x[i], 1);
    }
    vf maxf = v_signed_absmax(x, 32);
    const vi zero = vabs(maxf) < F(GROUP_MAX_EPS);
    maxf = sel(zero, F(1.0f), maxf);
    const vd max0 = half_d(maxf, 0), max1 = half_d(maxf, 1);
    vf d = F(0.0f), best = F(0.0f);
    for (int k = 0; k < 16; k++) {
        const vd id0 = D(TARGETS_IQ4_NL[k]) / max0, id1 = D(TARGETS_IQ4_NL[k]) / max1;
        vf sumqx = F(0.0f), sumq2 = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(join_f(iq4nl_cell_d(id0 * xd[0][i]), iq4nl_cell_d(id1 * xd[1][i])));
            sumqx += wx[i] * q;
            sumq2 += (w[i] * q) * q;
        }
        const vi pos = sumq2 > F(0.0f);
        const vf this_d = sel(pos, sumqx / sumq2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumqx * sumqx > best * sumq2);
        d = sel(take, this_d, d);
        best = sel(take, this_d * sumqx, best);
    }
    return sel(zero, F(0.0f), d);
}

static void pack_iq4_nl(uint8_t * o, float d, const vf * idx, int l) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(((int)idx[j][l] & 0x0F) | ((int)idx[j + 16][l] << 4));
}

static void dequant_block_iq4_nl(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * KVALUES_IQ4_NL[b[2 + j] & 0x0F];
        y[j + 16] = d * KVALUES_IQ4_NL[b[2 + j] >> 4];
    }
}

void nemoq_quantize_iq4_nl(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                           const float * importance) {
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], gw[32], ig[32], io[32], y[32];
            load_blocks(xr, importance, b0, nb, 32, xt, wt);
            /* ggml_rows: weights x^2, or importance * sqrt(2 mean(x^2) + x^2) */
            if (!importance) {
                for (int i = 0; i < 32; i++) gw[i] = xt[i] * xt[i];
            } else {
                vf sigma2 = F(0.0f);
                for (int i = 0; i < 32; i++) sigma2 += xt[i] * xt[i];
                sigma2 = (F(2.0f) * sigma2) / F(32.0f);
                for (int i = 0; i < 32; i++) gw[i] = wt[i] * vsqrt(sigma2 + xt[i] * xt[i]);
            }
            const vf dg = v_iq4_nl_search_ggml(xt, gw, ig);
            /* ours */
            const vf dh = v_refine_iq4_nl(xt, wt, v_iq4_nl_search_ours(xt, wt), io);
            /* best_of */
            vf dgh;
            for (int l = 0; l < NL; l++) dgh[l] = f16_round(dg[l]);
            for (int i = 0; i < 32; i++) y[i] = dgh * iq4nl_kvalue(ig[i]);
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * iq4nl_kvalue(io[i]);
            const vf eo = v_error32(xt, y, wt);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                const float err[2] = {eg[l], eo[l]};
                uint8_t * o = out + (r * nb + b0 + l) * 18;
                if (argmin_first(err, 2) == 0) pack_iq4_nl(o, dg[l], ig, l);
                else pack_iq4_nl(o, dh[l], io, l);
            }
        }
    }
}

DEQUANT_ROWS(iq4_nl, 32, 18, dequant_block_iq4_nl)

/* ---------------------------------------------------------------------------------------------
 * E2M1 values (mxfp4.py), shared by MXFP4 and NVFP4
 * ------------------------------------------------------------------------------------------- */

/* best_e2m1_scale: per lane, the candidate scale (scales[k]) with the lowest weighted error after
 * rounding to the nearest magnitude (first on ties); returns the candidates' index per lane. */
static vi v_best_e2m1_scale(int n, int ns, const vf * x, const vf * w, const vf * scales) {
    vf best = F(0.0f);
    vi pick = I(0);
    for (int k = 0; k < ns; k++) {
        const vf inv = vdiv(F(1.0f), scales[k]);
        vf err = F(0.0f);
        for (int i = 0; i < n; i++) {
            const vf ax = vabs(x[i]);
            const vf diff = ax - scales[k] * e2m1_value(e2m1_index(ax * inv));
            err += (w[i] * diff) * diff;
        }
        const vi take = k == 0 ? I(-1) : err < best;
        best = sel(take, err, best);
        pick = (take & I(k)) | (~take & pick);
    }
    return pick;
}

/* e2m1_encode: the nearest nibble of x for `scale` (sign in bit 3, never for zero), checking
 * the neighbours by |v * scale - |x||, as numpy. */
static void v_e2m1_encode(int n, const vf * x, vf scale, vf * nib) {
    const vf inv = vdiv(F(1.0f), scale);
    for (int i = 0; i < n; i++) {
        const vf ax = vabs(x[i]);
        vf m = e2m1_index(ax * inv);
        const vf lower = vmax(m, F(1.0f)) - F(1.0f);
        m = sel(vabs(e2m1_value(lower) * scale - ax) <= vabs(e2m1_value(m) * scale - ax), lower, m);
        const vf upper = vmin(m + F(1.0f), F(7.0f));
        m = sel(vabs(e2m1_value(upper) * scale - ax) < vabs(e2m1_value(m) * scale - ax), upper, m);
        nib[i] = m + sel((x[i] < F(0.0f)) & (m > F(0.0f)), F(8.0f), F(0.0f));
    }
}

/* ---------------------------------------------------------------------------------------------
 * MXFP4 (mxfp4.py): 32 E2M1 values and an E8M0 exponent
 * ------------------------------------------------------------------------------------------- */

/* e8m0_half: 2^(e - 128) from bits, as ggml_e8m0_to_fp32_half. */
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void nemoq_quantize_mxfp4(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                          const float * importance) {
    static const int steps[4] = {0, -2, -1, 1};   /* exponents tried, relative to ggml's */
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], nib[32], scales[4], scale;
            uint8_t exps[4][NL];
            load_blocks(xr, importance, b0, nb, 32, xt, wt);
            vf amax = vabs(xt[0]);
            for (int i = 1; i < 32; i++) amax = vmax(amax, vabs(xt[i]));
            for (int l = 0; l < NL; l++) {
                /* ggml_exponent: floor(log2(amax)) - 2 + 127 in float32, 0 for an all-zero block */
                const float e = amax[l] > 0.0f ? (floorf(log2f(amax[l])) - 2.0f) + 127.0f : 0.0f;
                for (int k = 0; k < 4; k++) {
                    exps[k][l] = (uint8_t)(int)clipf(e + (float)steps[k], 0.0f, 254.0f);
                    scales[k][l] = 2.0f * e8m0_half(exps[k][l]);
                }
            }
            const vi pick = v_best_e2m1_scale(32, 4, xt, wt, scales);
            for (int l = 0; l < NL; l++) scale[l] = scales[pick[l]][l];
            v_e2m1_encode(32, xt, scale, nib);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                uint8_t * o = out + (r * nb + b0 + l) * 17;
                o[0] = exps[pick[l]][l];
                for (int j = 0; j < 16; j++) o[1 + j] = (uint8_t)((int)nib[j][l] | ((int)nib[j + 16][l] << 4));
            }
        }
    }
}

static void dequant_block_mxfp4(const uint8_t * b, float * y) {
    const float d = e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) {
        y[j] = d * KVALUES_FP4[b[1 + j] & 0x0F];
        y[j + 16] = d * KVALUES_FP4[b[1 + j] >> 4];
    }
}

DEQUANT_ROWS(mxfp4, 32, 17, dequant_block_mxfp4)

/* ---------------------------------------------------------------------------------------------
 * NVFP4 (nvfp4.py): 4 groups of 16 E2M1 values, each with a UE4M3 scale. The lanes are NL
 * consecutive groups of a row.
 * ------------------------------------------------------------------------------------------- */

/* The scale of a UE4M3 code, as nvfp4.UE4M3 (0 and 0x7F mean zero). */
static inline float ue4m3(uint8_t code) {
    const int exp = (code >> 3) & 0xF, man = code & 7;
    if (code == 0 || code == 0x7F) return 0.0f;
    return exp == 0 ? ldexpf((float)man, -9) : ldexpf(1.0f + (float)man / 8.0f, exp - 7);
}

/* fp32_to_ue4m3: round to nearest on 3 mantissa bits, saturating to 0x7E. */
static int fp32_to_ue4m3(float x) {
    if (!(x > 0.0f)) return 0;
    x = np_minf(x, 448.0f);
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const int exp = (int)((bits >> 23) & 0xFF) - 127 + 7;
    int man = (int)(((bits >> 20) & 7) + ((bits >> 19) & 1));
    if (exp <= 0) {
        const int64_t sub = (int64_t)(x * 512.0f + 0.5f);
        return sub < 0 ? 0 : (sub > 7 ? 7 : (int)sub);
    }
    int rexp = exp;
    if (man > 7) { rexp = exp + 1; man = 0; }
    return rexp >= 15 ? 0x7E : (rexp << 3) | man;
}

void nemoq_quantize_nvfp4(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                          const float * importance) {
    static const int steps[10] = {0, -8, -7, -6, -5, -4, -3, -2, -1, 1};   /* codes tried, relative to ggml's */
    const int64_t ng = n_per_row / 16;   /* groups of 16 in a row, 4 to a block */
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t g0 = 0; g0 < ng; g0 += NL) {
            vf xt[16], wt[16], nib[16], scales[10], scale;
            int codes[10][NL];
            load_blocks(xr, importance, g0, ng, 16, xt, wt);
            vf amax = vabs(xt[0]);
            for (int i = 1; i < 16; i++) amax = vmax(amax, vabs(xt[i]));
            for (int l = 0; l < NL; l++) {
                const int ggml_code = fp32_to_ue4m3(amax[l] / 6.0f);
                for (int k = 0; k < 10; k++) {
                    int c = ggml_code;
                    if (k > 0) {
                        c += steps[k];
                        c = amax[l] > 0.0f ? (c < 1 ? 1 : (c > 0x7E ? 0x7E : c)) : 0;
                    }
                    codes[k][l] = c;
                    scales[k][l] = ue4m3((uint8_t)c);
                }
            }
            const vi pick = v_best_e2m1_scale(16, 10, xt, wt, scales);
            for (int l = 0; l < NL; l++) scale[l] = scales[pick[l]][l];
            v_e2m1_encode(16, xt, scale, nib);
            for (int l = 0; l < NL && g0 + l < ng; l++) {
                const int64_t g = g0 + l;
                uint8_t * o = out + (r * ng + g) / 4 * 36;
                o[g % 4] = (uint8_t)codes[pick[l]][l];
                for (int j = 0; j < 8; j++) {
                    o[4 + 8 * (g % 4) + j] = (uint8_t)((int)nib[j][l] | ((int)nib[j + 8][l] << 4));
                }
            }
        }
    }
}

static void dequant_block_nvfp4(const uint8_t * b, float * y) {
    for (int g = 0; g < 4; g++) {
        const float d = ue4m3(b[g]) / 2.0f;
        for (int j = 0; j < 8; j++) {
            y[16 * g + j] = d * KVALUES_FP4[b[4 + 8 * g + j] & 0x0F];
            y[16 * g + j + 8] = d * KVALUES_FP4[b[4 + 8 * g + j] >> 4];
        }
    }
}

DEQUANT_ROWS(nvfp4, 64, 36, dequant_block_nvfp4)

/* ---------------------------------------------------------------------------------------------
 * Q6_K (q6_k.py): 16 groups of 16 signed 6-bit levels, int8 group scales, one f16 d.
 * A super-block is searched as two halves of NL = 8 groups: x[h][i] lane l = value i of group
 * 8h + l.
 * ------------------------------------------------------------------------------------------- */

static void pack_q6_k(uint8_t * o, float d, const int8_t * sc, const uint8_t * q /* L + 32 */) {
    /* value 128h + 32k + l: low nibble in ql[64h + 32(k % 2) + l] (high half for k >= 2),
     * high two bits in qh[32h + l] at bit 2k */
    uint8_t * ql = o, * qh = o + 128;
    for (int h = 0; h < 2; h++) {
        for (int l = 0; l < 32; l++) {
            const uint8_t * v = q + 128 * h + l;
            ql[64 * h + l] = (uint8_t)((v[0] & 0x0F) | (v[64] << 4));
            ql[64 * h + 32 + l] = (uint8_t)((v[32] & 0x0F) | (v[96] << 4));
            qh[32 * h + l] = (uint8_t)((v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6));
        }
    }
    memcpy(o + 192, sc, 16);
    put_f16(o + 208, d);
}

static void dequant_block_q6_k(const uint8_t * b, float * y) {
    const uint8_t * ql = b, * qh = b + 128;
    const int8_t * sc = (const int8_t *)(b + 192);
    const float d = get_f16(b + 208);
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 4; k++) {
            for (int l = 0; l < 32; l++) {
                const int lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
                const int v = 128 * h + 32 * k + l;
                y[v] = (d * (float)sc[v / 16]) * (float)((lo | (hi << 4)) - 32);
            }
        }
    }
}

DEQUANT_ROWS(q6_k, 256, 210, dequant_block_q6_k)

/* Candidate bytes from d, the 16 group scales and the levels L[h][i] (lane = group 8h + lane). */
static void pack_q6_k_f(uint8_t * o, float d, const float * sc, vf (*L)[16]) {
    int8_t sc8[16];
    uint8_t q[QK_K];
    for (int g = 0; g < 16; g++) sc8[g] = (int8_t)(int)sc[g];
    for (int g = 0; g < 16; g++) {
        for (int i = 0; i < 16; i++) q[16 * g + i] = (uint8_t)(int)(L[g / 8][i][g % 8] + 32.0f);
    }
    pack_q6_k(o, d, sc8, q);
}

static void pack_q6_k_d(uint8_t * o, float d, const double * sc, vd (*L)[16][2]) {
    int8_t sc8[16];
    uint8_t q[QK_K];
    for (int g = 0; g < 16; g++) sc8[g] = (int8_t)(int)sc[g];
    for (int g = 0; g < 16; g++) {
        for (int i = 0; i < 16; i++) q[16 * g + i] = (uint8_t)(int)(L[g / 8][i][(g % 8) / 4][g % 4] + 32.0);
    }
    pack_q6_k(o, d, sc8, q);
}

static inline vf load8(const float * p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vd load4d(const double * p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Q6_K.levels with float32 scales (the ggml path): nearest levels for d * sc, else keep L. */
static void q6_k_levels_f(vf (*x)[16], float d, const float * sc, vf (*L)[16]) {
    for (int h = 0; h < 2; h++) {
        const vf dd = F(d) * load8(sc + 8 * h);
        for (int i = 0; i < 16; i++) L[h][i] = sel(dd != F(0.0f), vclip(vrint(x[h][i] / dd), -32.0f, 31.0f), L[h][i]);
    }
}

/* Q6_K.levels with float64 scales (our path): numpy divides float32 x by the float64 d * sc,
 * rounds the quotient to float32, then to the nearest level. */
static void q6_k_levels_d(vf (*x)[16], float d, const double * sc, vd (*L)[16][2]) {
    for (int h = 0; h < 2; h++) {
        const vd dd0 = D((double)d) * load4d(sc + 8 * h), dd1 = D((double)d) * load4d(sc + 8 * h + 4);
        const vl nz0 = dd0 != D(0.0), nz1 = dd1 != D(0.0);
        for (int i = 0; i < 16; i++) {
            const vf v = vclip(vrint(join_f(half_d(x[h][i], 0) / dd0, half_d(x[h][i], 1) / dd1)), -32.0f, 31.0f);
            L[h][i][0] = seld(nz0, half_d(v, 0), L[h][i][0]);
            L[h][i][1] = seld(nz1, half_d(v, 1), L[h][i][1]);
        }
    }
}

void nemoq_quantize_q6_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    const int64_t nb = n_per_row / QK_K;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * 210;
        for (int64_t b = 0; b < nb; b++, o += 210) {
            const float * xb = xr + b * QK_K;
            const float * w = importance ? importance + b * QK_K : ONES;
            vf xt[2][16], wt[2][16], gw[2][16], Lf[2][16];
            vd Ld[2][16][2];
            uint8_t cand[3][210];
            for (int h = 0; h < 2; h++) {
                for (int i = 0; i < 16; i++) {
                    for (int l = 0; l < NL; l++) {
                        xt[h][i][l] = xb[16 * (8 * h + l) + i];
                        wt[h][i][l] = w[16 * (8 * h + l) + i];
                    }
                    gw[h][i] = importance ? wt[h][i] : xt[h][i] * xt[h][i];
                }
            }
            /* ggml_rows: make_qx_quants per group (weights x^2 or the importance), store_scales */
            {
                float scales[16], sc[16];
                for (int h = 0; h < 2; h++) {
                    const vf s = v_make_qx_quants_f(16, 32, xt[h], gw[h], Lf[h]);
                    memcpy(scales + 8 * h, &s, sizeof s);
                }
                const float max_scale = signed_absmax_f(scales, 16);
                const int zero = fabsf(max_scale) < GROUP_MAX_EPS;
                const float iscale = -128.0f / (zero ? 1.0f : max_scale);
                const float d = zero ? 0.0f : f16_round(1.0f / iscale);
                for (int g = 0; g < 16; g++) sc[g] = zero ? 0.0f : np_minf(127.0f, rintf(iscale * scales[g]));
                if (zero) for (int h = 0; h < 2; h++) for (int i = 0; i < 16; i++) Lf[h][i] = F(-32.0f);
                q6_k_levels_f(xt, d, sc, Lf);
                pack_q6_k_f(cand[0], d, sc, Lf);
            }
            /* ours: make_qx_quants with float64 targets, store_scales in float64, then refit */
            {
                double scales[16], sc[16];
                for (int h = 0; h < 2; h++) {
                    v_make_qx_quants_d(16, 32, TARGETS_Q6_K, 19, xt[h], wt[h], scales + 8 * h, Ld[h]);
                }
                const double max_scale = signed_absmax_d(scales, 16);
                const int zero = fabs(max_scale) < (double)GROUP_MAX_EPS;
                const double iscale = -128.0 / (zero ? 1.0 : max_scale);
                const float d = zero ? 0.0f : f16_round((float)(1.0 / iscale));
                for (int g = 0; g < 16; g++) {
                    const double s = rint(iscale * scales[g]);
                    sc[g] = zero ? 0.0 : (s < 127.0 || s != s ? s : 127.0);
                }
                if (zero) for (int h = 0; h < 2; h++) for (int i = 0; i < 16; i++) Ld[h][i][0] = Ld[h][i][1] = D(-32.0);
                q6_k_levels_d(xt, d, sc, Ld);
                pack_q6_k_d(cand[1], d, sc, Ld);
                /* refit: the least-squares group scale for the levels, rounded to int8 (twice) */
                for (int it = 0; it < 2 && d != 0.0f; it++) {
                    for (int h = 0; h < 2; h++) {
                        vd fit[2];
                        for (int lh = 0; lh < 2; lh++) {
                            vd s1 = D(0.0), s2 = D(0.0);
                            for (int i = 0; i < 16; i++) {
                                s1 += half_d(wt[h][i] * xt[h][i], lh) * Ld[h][i][lh];
                                s2 += (half_d(wt[h][i], lh) * Ld[h][i][lh]) * Ld[h][i][lh];
                            }
                            fit[lh] = seld(s2 != D(0.0), s1 / s2, D(0.0));
                        }
                        const vf s = vclip(vrint(join_f(fit[0], fit[1]) / F(d)), -128.0f, 127.0f);
                        for (int l = 0; l < NL; l++) sc[8 * h + l] = (double)s[l];
                    }
                    q6_k_levels_d(xt, d, sc, Ld);
                }
                pack_q6_k_d(cand[2], d, sc, Ld);
            }
            float y[QK_K], err[3];
            for (int c = 0; c < 3; c++) {
                dequant_block_q6_k(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, QK_K);
            }
            memcpy(o, cand[argmin_first(err, 3)], 210);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_K and Q5_K (q4_k.py, q5_k.py): 8 groups of 32 levels in [0, nmax], 6-bit group scales and
 * mins, f16 d and dmin; value = d * sc * q - dmin * m. The 8 groups of a super-block are the
 * lanes: x[i] lane g is value i of group g.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    float d, dmin;
    vf sc, m, L[32];
} kquant_t;

static void pack_scales_k(uint8_t * s, vf scf, vf mf) {
    uint8_t sc[8], m[8];
    for (int g = 0; g < 8; g++) {
        sc[g] = (uint8_t)(int)scf[g];
        m[g] = (uint8_t)(int)mf[g];
    }
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[4 + j] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
        s[8 + j] = (uint8_t)((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
    }
}

static void unpack_scales_k(const uint8_t * s, int * sc, int * m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[4 + j] & 63;
        sc[j + 4] = (s[8 + j] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
    }
}

static void pack_q4_k(uint8_t * o, const kquant_t * k) {
    put_f16(o, k->d);
    put_f16(o + 2, k->dmin);
    pack_scales_k(o + 4, k->sc, k->m);
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            const int lo = (int)k->L[l][2 * c], hi = (int)k->L[l][2 * c + 1];
            o[16 + 32 * c + l] = (uint8_t)((lo & 0x0F) | (hi << 4));
        }
    }
}

static void pack_q5_k(uint8_t * o, const kquant_t * k) {
    put_f16(o, k->d);
    put_f16(o + 2, k->dmin);
    pack_scales_k(o + 4, k->sc, k->m);
    for (int l = 0; l < 32; l++) {
        int qh = 0;
        for (int g = 0; g < 8; g++) qh |= (((int)k->L[l][g] >> 4) & 1) << g;
        o[16 + l] = (uint8_t)qh;
    }
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            const int lo = (int)k->L[l][2 * c], hi = (int)k->L[l][2 * c + 1];
            o[48 + 32 * c + l] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
        }
    }
}

static void dequant_block_q4_k(const uint8_t * b, float * y) {
    const float d = get_f16(b), dmin = get_f16(b + 2);
    int sc[8], m[8];
    unpack_scales_k(b + 4, sc, m);
    for (int g = 0; g < 8; g++) {
        const float dd = d * (float)sc[g], dm = dmin * (float)m[g];
        const uint8_t * q = b + 16 + 32 * (g / 2);
        const int shift = 4 * (g % 2);
        for (int l = 0; l < 32; l++) y[32 * g + l] = dd * (float)((q[l] >> shift) & 0x0F) - dm;
    }
}

static void dequant_block_q5_k(const uint8_t * b, float * y) {
    const float d = get_f16(b), dmin = get_f16(b + 2);
    int sc[8], m[8];
    unpack_scales_k(b + 4, sc, m);
    const uint8_t * qh = b + 16;
    for (int g = 0; g < 8; g++) {
        const float dd = d * (float)sc[g], dm = dmin * (float)m[g];
        const uint8_t * q = b + 48 + 32 * (g / 2);
        const int shift = 4 * (g % 2);
        for (int l = 0; l < 32; l++) {
            const int v = ((q[l] >> shift) & 0x0F) | (((qh[l] >> g) & 1) << 4);
            y[32 * g + l] = dd * (float)v - dm;
        }
    }
}

DEQUANT_ROWS(q4_k, 256, 144, dequant_block_q4_k)
DEQUANT_ROWS(q5_k, 256, 176, dequant_block_q5_k)

/* Q4_K.levels: nearest levels for the stored scales and mins (groups with d * sc = 0 keep L). */
static void k_levels(const vf * x, kquant_t * k, int nmax) {
    const vf dd = F(k->d) * k->sc, dm = F(k->dmin) * k->m;
    const vi nz = dd != F(0.0f);
    for (int i = 0; i < 32; i++) k->L[i] = sel(nz, vclip(vrint((x[i] + dm) / dd), 0.0f, (float)nmax), k->L[i]);
}

/* Q4_K.fit (quantize_row_q4_K_impl's pipeline): group fits, then the 6-bit scales and mins. */
static void k_fit(const vf * x, const vf * w, int nmax, float rmin, float rdelta, int nstep, kquant_t * k) {
    vf mins, sw = F(0.0f);
    const vf scales = v_make_qkx_quants(nmax, rmin, rdelta, nstep, x, w, &mins, k->L);
    for (int i = 0; i < 32; i++) sw += w[i];
    float s[8], m[8], sws[8], L[8];
    memcpy(s, &scales, sizeof s);
    memcpy(m, &mins, sizeof m);
    memcpy(sws, &sw, sizeof sws);
    k->d = f16_round(make_qp_quants(s, sws, 8, 63, L));
    memcpy(&k->sc, L, sizeof L);
    k->dmin = f16_round(make_qp_quants(m, sws, 8, 63, L));
    memcpy(&k->m, L, sizeof L);
    k_levels(x, k, nmax);
}

/* Q4_K.ggml_ref (quantize_row_q4_K_ref / q5_K_ref): weights mean|x| + |x|, scales and mins
 * stored as 63 * value / max. */
static void k_ggml_ref(const vf * x, int nmax, float rmin, float rdelta, int nstep, kquant_t * k) {
    vf av_x = F(0.0f), w[32], mins;
    for (int i = 0; i < 32; i++) av_x += x[i] * x[i];
    av_x = vsqrt(av_x / F(32.0f));
    for (int i = 0; i < 32; i++) w[i] = av_x + vabs(x[i]);
    const vf scales = v_make_qkx_quants(nmax, rmin, rdelta, nstep, x, w, &mins, k->L);
    float max_scale = scales[0], max_min = mins[0];
    for (int g = 1; g < 8; g++) {
        max_scale = np_maxf(max_scale, scales[g]);
        max_min = np_maxf(max_min, mins[g]);
    }
    max_scale = np_maxf(max_scale, 0.0f);
    max_min = np_maxf(max_min, 0.0f);
    k->sc = vclip(vrint(F(divf(63.0f, max_scale)) * scales), 0.0f, 63.0f);
    k->m = vclip(vrint(F(divf(63.0f, max_min)) * mins), 0.0f, 63.0f);
    k->d = f16_round(max_scale / 63.0f);
    k->dmin = f16_round(max_min / 63.0f);
    k_levels(x, k, nmax);
}

/* Q4_K.refit: with d and dmin fixed, the least-squares scale and min of each group for its
 * levels, rounded to 6 bits; then re-round the levels (twice). */
static void k_refit(const vf * x, const vf * w, int nmax, kquant_t * k) {
    vf sum_w = F(0.0f), sum_x = F(0.0f);
    for (int i = 0; i < 32; i++) sum_w += w[i];
    for (int i = 0; i < 32; i++) sum_x += w[i] * x[i];
    for (int it = 0; it < 2; it++) {
        vf sum_l = F(0.0f), sum_l2 = F(0.0f), sum_xl = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf wl = w[i] * k->L[i];
            sum_l += wl;
            sum_l2 += wl * k->L[i];
            sum_xl += wl * x[i];
        }
        const vf det = sum_w * sum_l2 - sum_l * sum_l;
        const vf scale = vdiv(sum_w * sum_xl - sum_x * sum_l, det);
        const vf neg_min = vdiv(sum_l * sum_xl - sum_l2 * sum_x, det);
        const vi pos = det > F(0.0f);
        k->sc = sel(pos, vclip(vrint(vdiv(scale, F(k->d))), 0.0f, 63.0f), k->sc);
        k->m = sel(pos, vclip(vrint(vdiv(neg_min, F(k->dmin))), 0.0f, 63.0f), k->m);
        k_levels(x, k, nmax);
    }
}

static void quantize_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                       const float * importance, int is5) {
    const int nmax = is5 ? 31 : 15, bsize = is5 ? 176 : 144;
    /* (rmin, rdelta, nstep) of ggml's _ref search and of ours; the importance path's is
     * (-0.9, 0.05, 36) for both */
    const float ref_rmin = is5 ? -0.5f : -1.0f, ref_rdelta = 0.1f;
    const int ref_nstep = is5 ? 15 : 20;
    const float our_rmin = is5 ? -3.0f : -1.5f, our_rdelta = is5 ? 0.8f : 0.4f;
    void (*pack)(uint8_t *, const kquant_t *) = is5 ? pack_q5_k : pack_q4_k;
    void (*dequant)(const uint8_t *, float *) = is5 ? dequant_block_q5_k : dequant_block_q4_k;
    const int64_t nb = n_per_row / QK_K;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * bsize;
        for (int64_t b = 0; b < nb; b++, o += bsize) {
            const float * xb = xr + b * QK_K;
            const float * w = importance ? importance + b * QK_K : ONES;
            vf xt[32], wt[32];
            for (int i = 0; i < 32; i++) {
                for (int l = 0; l < NL; l++) { xt[i][l] = xb[32 * l + i]; wt[i][l] = w[32 * l + i]; }
            }
            uint8_t cand[3][176];
            kquant_t k;
            /* ggml_rows */
            if (!importance) {
                k_ggml_ref(xt, nmax, ref_rmin, ref_rdelta, ref_nstep, &k);
            } else {
                /* sigma2 = 2 * sum(x^2) / 256, summed value-major (term 8i + g is value i of group g) */
                float s = 0.0f;
                vf qw[32];
                for (int i = 0; i < 32; i++) {
                    for (int g = 0; g < 8; g++) s += xt[i][g] * xt[i][g];
                }
                const float sigma2 = (2.0f * s) / 256.0f;
                for (int i = 0; i < 32; i++) qw[i] = wt[i] * vsqrt(F(sigma2) + xt[i] * xt[i]);
                k_fit(xt, qw, nmax, -0.9f, 0.05f, 36, &k);
            }
            pack(cand[0], &k);
            /* ours, and ours refitted */
            k_fit(xt, wt, nmax, our_rmin, our_rdelta, 15, &k);
            pack(cand[1], &k);
            k_refit(xt, wt, nmax, &k);
            pack(cand[2], &k);
            float y[QK_K], err[3];
            for (int c = 0; c < 3; c++) {
                dequant(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, QK_K);
            }
            memcpy(o, cand[argmin_first(err, 3)], (size_t)bsize);
        }
    }
}

void nemoq_quantize_q4_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_k(x, out, nrows, n_per_row, importance, 0);
}

void nemoq_quantize_q5_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_k(x, out, nrows, n_per_row, importance, 1);
}
