/* Block quantizers in portable C, bit-identical to the numpy references in nemoq/quant/formats.
 *
 * Each function handles `nrows` rows of `n_per_row` values; the caller splits rows across
 * threads (ctypes releases the GIL), so the C code stays single-threaded and simple.
 * Quantizers take an optional importance vector (one non-negative weight per column, NULL for
 * none); dequantizers turn the bytes back into float32 exactly as the numpy references do.
 *
 * How the C stays bit-identical to numpy (plain C11 + libm, built with -ffp-contract=off):
 *  - every operation is done in the dtype numpy does it in: float32 where the reference stays
 *    in float32, double where a float64 constant (np.geomspace / np.linspace search factors)
 *    promotes the arithmetic to float64; each step names the numpy line it ports;
 *  - sums over a group (search.dot / search.total) add in order from +0; the per-block errors
 *    of Format.best_of are numpy's pairwise sum (pairwise_sum below); Q4_0/Q5_0's per-row
 *    mean square is numpy's pairwise sum over the row;
 *  - rounding is rint (ties to even, numpy's np.rint) except where numpy truncates;
 *  - nearest-level lookups use the same tables as search.Grid (quants_tables.h);
 *  - ties: first candidate wins (np.argmin, strict `<` / `>` updates), as in numpy.
 * Non-finite inputs are outside the contract (numpy's own casts of NaN are platform-defined). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "quants_tables.h"

#define QK8_0 32
#define QK4_0 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

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
static inline double clipd(double v, double lo, double hi) {
    v = (v > lo || v != v) ? v : lo;
    return (v < hi || v != v) ? v : hi;
}

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
 * search.Grid: nearest table level, constant on cells of width `step`
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t * lut;
    int lo, len;
    float inv_step;      /* 1 / step, as numpy's `1 / self.step` in float32 */
    const float * values;
} grid_t;

static inline int lut_at(const grid_t * g, float k) {     /* k already shifted by lo */
    if (!(k >= 0.0f)) return g->lut[0];
    if (k > (float)(g->len - 1)) return g->lut[g->len - 1];
    return g->lut[(int)k];
}

static inline int lut_at_d(const grid_t * g, double k) {
    if (!(k >= 0.0)) return g->lut[0];
    if (k > (double)(g->len - 1)) return g->lut[g->len - 1];
    return g->lut[(int)k];
}

/* Grid.index for float32 v: floor(v * (1 / step)) - lo, clipped, looked up. */
static inline int grid_index_f(const grid_t * g, float v) {
    return lut_at(g, floorf(v * g->inv_step) - (float)g->lo);
}

/* Grid.index for float64 v (the float64 search paths). */
static inline int grid_index_d(const grid_t * g, double v) {
    return lut_at_d(g, floor(v * (double)g->inv_step) - (double)g->lo);
}

/* Grid.index(..., ties_down=True): ceil(v / step) - (lo + 1). */
static inline int grid_index_down_f(const grid_t * g, float v) {
    return lut_at(g, ceilf(v * g->inv_step) - (float)(g->lo + 1));
}

static const float LEVELS_Q4_0[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
static const float LEVELS_Q5_0[32] = {-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1,
                                      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const float KVALUES_IQ4_NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float E2M1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
static const float KVALUES_FP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static const grid_t GRID_Q4_0 = {LUT_Q4_0, -17, 33, 2.0f, LEVELS_Q4_0};
static const grid_t GRID_Q5_0 = {LUT_Q5_0, -33, 65, 2.0f, LEVELS_Q5_0};
static const grid_t GRID_IQ4_NL = {LUT_IQ4_NL, -255, 483, 2.0f, KVALUES_IQ4_NL};
static const grid_t GRID_E2M1 = {LUT_E2M1, -1, 27, 4.0f, E2M1};

/* ---------------------------------------------------------------------------------------------
 * The scale searches of search.py, one group at a time
 * ------------------------------------------------------------------------------------------- */

/* make_qx_quants with ggml's float32 targets nmax + 0.1 * step, step = 0, -9..-1, 1..9:
 * levels L in [-nmax, nmax - 1] and scale, everything in float32. */
static float make_qx_quants_f(const float * x, const float * w, int n, int nmax, float * L) {
    float wx[QK_K], l[QK_K];
    for (int i = 0; i < n; i++) wx[i] = w[i] * x[i];
    float max = signed_absmax_f(x, n);
    const int zero = fabsf(max) < GROUP_MAX_EPS;
    if (zero) max = 1.0f;
    float scale = 0.0f, best = 0.0f;
    for (int k = 0; k < 19; k++) {
        const int step = k == 0 ? 0 : (k <= 9 ? k - 10 : k - 9);
        const float target = (float)nmax + 0.1f * (float)step;
        const float iscale = -target / max;
        float sumlx = 0.0f, suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            l[i] = clipf(rintf(iscale * x[i]), (float)-nmax, (float)(nmax - 1));
            sumlx += wx[i] * l[i];
        }
        for (int i = 0; i < n; i++) suml2 += (w[i] * l[i]) * l[i];
        const float this_scale = suml2 > 0.0f ? sumlx / suml2 : 0.0f;
        if (k == 0 || (suml2 > 0.0f && sumlx * sumlx > best * suml2)) {
            memcpy(L, l, (size_t)n * sizeof(float));
            scale = this_scale;
            best = this_scale * sumlx;
        }
    }
    if (zero) {
        scale = 0.0f;
        for (int i = 0; i < n; i++) L[i] = (float)-nmax;
    }
    return scale;
}

/* make_qx_quants with float64 targets (nemoq's own searches): numpy promotes the scale, levels
 * and sums to float64. */
static double make_qx_quants_d(const float * x, const float * w, int n, int nmax,
                               const double * targets, int ntargets, double * L) {
    float wx[QK_K];
    double l[QK_K];
    for (int i = 0; i < n; i++) wx[i] = w[i] * x[i];
    float maxf = signed_absmax_f(x, n);
    const int zero = fabsf(maxf) < GROUP_MAX_EPS;
    if (zero) maxf = 1.0f;
    const double max = (double)maxf;
    double scale = 0.0, best = 0.0;
    for (int k = 0; k < ntargets; k++) {
        const double iscale = -targets[k] / max;
        double sumlx = 0.0, suml2 = 0.0;
        for (int i = 0; i < n; i++) {
            l[i] = clipd(rint(iscale * (double)x[i]), (double)-nmax, (double)(nmax - 1));
            sumlx += (double)wx[i] * l[i];
        }
        for (int i = 0; i < n; i++) suml2 += ((double)w[i] * l[i]) * l[i];
        const double this_scale = suml2 > 0.0 ? sumlx / suml2 : 0.0;
        if (k == 0 || (suml2 > 0.0 && sumlx * sumlx > best * suml2)) {
            memcpy(L, l, (size_t)n * sizeof(double));
            scale = this_scale;
            best = this_scale * sumlx;
        }
    }
    if (zero) {
        scale = 0.0;
        for (int i = 0; i < n; i++) L[i] = (double)-nmax;
    }
    return scale;
}

/* refine_on_grid: two rounds of (nearest levels for d, least-squares d for the levels), then d
 * rounded to half and the nearest levels for it. `d` is float64 when d64 (the Q4_0/Q5_0 search
 * returns float64 scales, and numpy keeps d float64 until the half rounding). */
static float refine_on_grid(const float * x, const float * w, int n, double d, int d64,
                            const grid_t * g, uint8_t * idx) {
    float q[QK_K];
    for (int it = 0; it < 2; it++) {
        const float inv = d != 0.0 ? (d64 ? (float)(1.0 / d) : 1.0f / (float)d) : 0.0f;
        for (int i = 0; i < n; i++) q[i] = g->values[grid_index_f(g, x[i] * inv)];
        float sxq = 0.0f, sqq = 0.0f;
        for (int i = 0; i < n; i++) sxq += (w[i] * x[i]) * q[i];
        for (int i = 0; i < n; i++) sqq += (w[i] * q[i]) * q[i];
        const float fit = divf(sxq, sqq);
        if (fit != 0.0f) d = (double)fit;
    }
    const float dh = fp16_to_fp32(d64 ? fp64_to_fp16(d) : fp32_to_fp16((float)d));
    const float inv = divf(1.0f, dh);
    for (int i = 0; i < n; i++) idx[i] = (uint8_t)grid_index_f(g, x[i] * inv);
    return dh;
}

/* make_qkx_quants (ggml's make_qkx2/qkx3_quants): x ~ scale * L - min with L in [0, nmax];
 * returns scale, writes -min (the value stored as the group's min) and L. float32 throughout. */
static float make_qkx_quants(const float * x, const float * w, int n, int nmax, float rmin,
                             float rdelta, int nstep, float * the_min, float * L) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; i++) {
        mn = np_minf(mn, x[i]);
        mx = np_maxf(mx, x[i]);
    }
    mn = np_minf(mn, 0.0f);
    const int flat = mx <= mn;
    float sum_w = 0.0f, sum_x = 0.0f;
    for (int i = 0; i < n; i++) sum_w += w[i];
    for (int i = 0; i < n; i++) sum_x += w[i] * x[i];

    const float iscale = (float)nmax / (flat ? 1.0f : mx - mn);
    float scale = 1.0f / iscale;
    for (int i = 0; i < n; i++) L[i] = clipf(rintf((x[i] - mn) * iscale), 0.0f, (float)nmax);
    float best = 0.0f;
    for (int i = 0; i < n; i++) {
        const float diff = ((scale * L[i]) + mn) - x[i];
        best += (w[i] * diff) * diff;
    }
    float l[QK_K], wl[QK_K];
    for (int step = 0; step <= nstep; step++) {
        const float rng = flat ? 1.0f : mx - mn;
        const float is = ((rmin + rdelta * (float)step) + (float)nmax) / rng;
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; i++) {
            l[i] = clipf(rintf((x[i] - mn) * is), 0.0f, (float)nmax);
            wl[i] = w[i] * l[i];
        }
        for (int i = 0; i < n; i++) sum_l += wl[i];
        for (int i = 0; i < n; i++) sum_l2 += wl[i] * l[i];
        for (int i = 0; i < n; i++) sum_xl += wl[i] * x[i];
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0.0f) {
            this_scale = sum_xl / sum_l2;
            this_min = 0.0f;
        }
        float cur = 0.0f;
        for (int i = 0; i < n; i++) {
            const float diff = ((this_scale * l[i]) + this_min) - x[i];
            cur += (w[i] * diff) * diff;
        }
        if (D > 0.0f && cur < best) {
            memcpy(L, l, (size_t)n * sizeof(float));
            best = cur;
            scale = this_scale;
            mn = this_min;
        }
    }
    if (flat) {
        scale = 0.0f;
        for (int i = 0; i < n; i++) L[i] = 0.0f;
    }
    *the_min = -mn;
    return scale;
}

/* make_qp_quants: the 8 group scales (or mins) of a super-block as levels in [0, nmax] times one
 * scale; an iscale search, then coordinate descent on single levels. float32 throughout. */
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

/* ---------------------------------------------------------------------------------------------
 * Q4_0 and Q5_0 (q4_0.py, q5_0.py): signed levels -nmax..nmax-1 times an f16 scale
 * ------------------------------------------------------------------------------------------- */

/* Block bytes from d and unsigned levels q = l + nmax in 0..2 nmax - 1. */
static void pack_q4_0(uint8_t * o, float d, const uint8_t * q) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)((q[j] & 0x0F) | (q[j + 16] << 4));
}

static void pack_q5_0(uint8_t * o, float d, const uint8_t * q) {
    put_f16(o, d);
    uint32_t qh = 0;
    for (int j = 0; j < 32; j++) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
    for (int k = 0; k < 4; k++) o[2 + k] = (uint8_t)(qh >> (8 * k));
    for (int j = 0; j < 16; j++) o[6 + j] = (uint8_t)((q[j] & 0x0F) | (q[j + 16] << 4));
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
    const grid_t * grid = is5 ? &GRID_Q5_0 : &GRID_Q4_0;
    const double * targets = is5 ? TARGETS_Q5_0 : TARGETS_Q4_0;
    void (*pack)(uint8_t *, float, const uint8_t *) = is5 ? pack_q5_0 : pack_q4_0;
    void (*dequant)(const uint8_t *, float *) = is5 ? dequant_block_q5_0 : dequant_block_q4_0;
    static const float ones[QK4_0] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                      1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const int64_t nb = n_per_row / QK4_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * bsize;
        /* q4_0.py ggml_rows: sigma2 = (x * x).sum(axis=-1) / n, numpy's pairwise sum */
        const float sigma2 = importance ? np_sum_sq_row(xr, n_per_row) / (float)n_per_row : 0.0f;
        for (int64_t b = 0; b < nb; b++, o += bsize) {
            const float * xb = xr + b * QK4_0;
            const float * w = importance ? importance + b * QK4_0 : ones;
            uint8_t cand[2][22], q[QK4_0];
            /* ggml's choice (ggml_rows) */
            if (!importance) {
                const float d = signed_absmax_f(xb, QK4_0) / (float)-nmax;
                const float inv = d == 0.0f ? 0.0f : 1.0f / d;
                for (int j = 0; j < QK4_0; j++) {
                    const float t = np_minf((float)(2 * nmax - 1), truncf(xb[j] * inv + ((float)nmax + 0.5f)));
                    q[j] = (uint8_t)(int)t;
                }
                pack(cand[0], d, q);
            } else {
                float qw[QK4_0], L[QK4_0];
                for (int j = 0; j < QK4_0; j++) qw[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
                const float d = make_qx_quants_f(xb, qw, QK4_0, nmax, L);
                for (int j = 0; j < QK4_0; j++) q[j] = (uint8_t)(int)(L[j] + (float)nmax);
                pack(cand[0], d, q);
            }
            /* ours: a wider search for the error itself, refined on the grid */
            {
                double L[QK4_0];
                const double d = make_qx_quants_d(xb, w, QK4_0, nmax, targets, 12, L);
                const float dh = refine_on_grid(xb, w, QK4_0, d, 1, grid, q);
                pack(cand[1], dh, q);
            }
            /* best_of */
            float y[QK4_0], err[2];
            for (int c = 0; c < 2; c++) {
                dequant(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, QK4_0);
            }
            memcpy(o, cand[argmin_first(err, 2)], (size_t)bsize);
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

/* iq4_nl.scale_search with ggml's candidate inverse scales (float32): 1 / (max / 127), then
 * (t - 127) / max for t in -7..7. Returns d; idx gets the nearest entries for that d. */
static float iq4_nl_scale_search_ggml(const float * x, const float * w, uint8_t * idx) {
    float wx[32], q[32];
    for (int i = 0; i < 32; i++) wx[i] = w[i] * x[i];
    float max = signed_absmax_f(x, 32);
    const int zero = fabsf(max) < GROUP_MAX_EPS;
    if (zero) max = 1.0f;
    float d = 0.0f, best = 0.0f;
    for (int k = 0; k < 16; k++) {
        const float id = k == 0 ? 1.0f / (max / 127.0f) : (float)(k - 8 - 127) / max;
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int i = 0; i < 32; i++) q[i] = KVALUES_IQ4_NL[grid_index_f(&GRID_IQ4_NL, id * x[i])];
        for (int i = 0; i < 32; i++) sumqx += wx[i] * q[i];
        for (int i = 0; i < 32; i++) sumq2 += (w[i] * q[i]) * q[i];
        const float this_d = sumq2 > 0.0f ? sumqx / sumq2 : 0.0f;
        if (k == 0 || (sumq2 > 0.0f && sumqx * sumqx > best * sumq2)) {
            d = this_d;
            best = this_d * sumqx;
        }
    }
    if (zero) d = 0.0f;
    const float inv = divf(1.0f, d);
    for (int i = 0; i < 32; i++) idx[i] = (uint8_t)grid_index_f(&GRID_IQ4_NL, x[i] * inv);
    return d;
}

/* The same with our float64 targets t / max (t = KVALUES ends times the search factors). */
static float iq4_nl_scale_search_ours(const float * x, const float * w) {
    float wx[32], q[32];
    for (int i = 0; i < 32; i++) wx[i] = w[i] * x[i];
    float max = signed_absmax_f(x, 32);
    const int zero = fabsf(max) < GROUP_MAX_EPS;
    if (zero) max = 1.0f;
    float d = 0.0f, best = 0.0f;
    for (int k = 0; k < 16; k++) {
        const double id = TARGETS_IQ4_NL[k] / (double)max;
        float sumqx = 0.0f, sumq2 = 0.0f;
        for (int i = 0; i < 32; i++) q[i] = KVALUES_IQ4_NL[grid_index_d(&GRID_IQ4_NL, id * (double)x[i])];
        for (int i = 0; i < 32; i++) sumqx += wx[i] * q[i];
        for (int i = 0; i < 32; i++) sumq2 += (w[i] * q[i]) * q[i];
        const float this_d = sumq2 > 0.0f ? sumqx / sumq2 : 0.0f;
        if (k == 0 || (sumq2 > 0.0f && sumqx * sumqx > best * sumq2)) {
            d = this_d;
            best = this_d * sumqx;
        }
    }
    return zero ? 0.0f : d;
}

static void pack_iq4_nl(uint8_t * o, float d, const uint8_t * idx) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)((idx[j] & 0x0F) | (idx[j + 16] << 4));
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
    static const float ones[32] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * 18;
        for (int64_t b = 0; b < nb; b++, o += 18) {
            const float * xb = xr + b * 32;
            const float * w = importance ? importance + b * 32 : ones;
            uint8_t cand[2][18], idx[32];
            /* ggml_rows: weights x^2, or importance * sqrt(2 mean(x^2) + x^2) */
            float gw[32];
            if (!importance) {
                for (int i = 0; i < 32; i++) gw[i] = xb[i] * xb[i];
            } else {
                float s = 0.0f;
                for (int i = 0; i < 32; i++) s += xb[i] * xb[i];
                const float sigma2 = (2.0f * s) / 32.0f;
                for (int i = 0; i < 32; i++) gw[i] = w[i] * sqrtf(sigma2 + xb[i] * xb[i]);
            }
            const float dg = iq4_nl_scale_search_ggml(xb, gw, idx);
            pack_iq4_nl(cand[0], dg, idx);
            /* ours */
            const float d = iq4_nl_scale_search_ours(xb, w);
            const float dh = refine_on_grid(xb, w, 32, (double)d, 0, &GRID_IQ4_NL, idx);
            pack_iq4_nl(cand[1], dh, idx);
            float y[32], err[2];
            for (int c = 0; c < 2; c++) {
                dequant_block_iq4_nl(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, 32);
            }
            memcpy(o, cand[argmin_first(err, 2)], 18);
        }
    }
}

DEQUANT_ROWS(iq4_nl, 32, 18, dequant_block_iq4_nl)

/* ---------------------------------------------------------------------------------------------
 * E2M1 values (mxfp4.py), shared by MXFP4 and NVFP4
 * ------------------------------------------------------------------------------------------- */

/* e2m1_magnitudes: index of the E2M1 magnitude nearest to ax / scale (ties down). */
static inline int e2m1_magnitude(float ax, float inv_scale) {
    return grid_index_down_f(&GRID_E2M1, ax * inv_scale);
}

/* e2m1_encode: the nearest nibble, checking the neighbours by |v * scale - |x||. */
static inline uint8_t e2m1_encode(float x, float scale, float inv_scale) {
    const float ax = fabsf(x);
    int mag = e2m1_magnitude(ax, inv_scale);
    const int lower = (mag > 1 ? mag : 1) - 1;
    if (fabsf(E2M1[lower] * scale - ax) <= fabsf(E2M1[mag] * scale - ax)) mag = lower;
    const int upper = mag + 1 < 7 ? mag + 1 : 7;
    if (fabsf(E2M1[upper] * scale - ax) < fabsf(E2M1[mag] * scale - ax)) mag = upper;
    return (uint8_t)(mag | ((x < 0.0f && mag > 0) ? 8 : 0));
}

/* best_e2m1_scale: the candidate scale with the lowest weighted error (first on ties). */
static int best_e2m1_scale(const float * x, const float * w, int n, const float * scales, int ns) {
    int pick = 0;
    float best = 0.0f;
    for (int k = 0; k < ns; k++) {
        const float scale = scales[k], inv = divf(1.0f, scale);
        float err = 0.0f;
        for (int i = 0; i < n; i++) {
            const float ax = fabsf(x[i]);
            const float diff = ax - scale * E2M1[e2m1_magnitude(ax, inv)];
            err += (w[i] * diff) * diff;
        }
        if (k == 0 || err < best) {
            best = err;
            pick = k;
        }
    }
    return pick;
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
    static const float ones[32] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    static const int steps[4] = {0, -2, -1, 1};
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * 17;
        for (int64_t b = 0; b < nb; b++, o += 17) {
            const float * xb = xr + b * 32;
            const float * w = importance ? importance + b * 32 : ones;
            float amax = fabsf(xb[0]);
            for (int i = 1; i < 32; i++) amax = np_maxf(amax, fabsf(xb[i]));
            /* ggml_exponent: floor(log2(amax)) - 2 + 127 (float32), 0 for an all-zero block */
            const float e = amax > 0.0f ? (floorf(log2f(amax)) - 2.0f) + 127.0f : 0.0f;
            uint8_t exps[4];
            float scales[4];
            for (int k = 0; k < 4; k++) {
                exps[k] = (uint8_t)(int)clipf(e + (float)steps[k], 0.0f, 254.0f);
                scales[k] = 2.0f * e8m0_half(exps[k]);
            }
            const int k = best_e2m1_scale(xb, w, 32, scales, 4);
            const float scale = scales[k], inv = divf(1.0f, scale);
            o[0] = exps[k];
            for (int j = 0; j < 16; j++) {
                o[1 + j] = (uint8_t)(e2m1_encode(xb[j], scale, inv) | (e2m1_encode(xb[j + 16], scale, inv) << 4));
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
 * NVFP4 (nvfp4.py): 4 groups of 16 E2M1 values, each with a UE4M3 scale
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
    static const float ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    static const int steps[10] = {0, -8, -7, -6, -5, -4, -3, -2, -1, 1};
    const int64_t nb = n_per_row / 64;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * 36;
        for (int64_t b = 0; b < nb; b++, o += 36) {
            for (int g = 0; g < 4; g++) {
                const float * xg = xr + b * 64 + g * 16;
                const float * w = importance ? importance + b * 64 + g * 16 : ones;
                float amax = fabsf(xg[0]);
                for (int i = 1; i < 16; i++) amax = np_maxf(amax, fabsf(xg[i]));
                const int ggml_code = fp32_to_ue4m3(amax / 6.0f);
                int codes[10];
                float scales[10];
                for (int k = 0; k < 10; k++) {
                    int c = ggml_code;
                    if (k > 0) {
                        c += steps[k];
                        c = amax > 0.0f ? (c < 1 ? 1 : (c > 0x7E ? 0x7E : c)) : 0;
                    }
                    codes[k] = c;
                    scales[k] = ue4m3((uint8_t)c);
                }
                const int k = best_e2m1_scale(xg, w, 16, scales, 10);
                const float scale = scales[k], inv = divf(1.0f, scale);
                o[g] = (uint8_t)codes[k];
                for (int j = 0; j < 8; j++) {
                    o[4 + 8 * g + j] = (uint8_t)(e2m1_encode(xg[j], scale, inv) | (e2m1_encode(xg[j + 8], scale, inv) << 4));
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
