/* Shared by the block quantizers (quants_*.c): portable C, bit-identical to the numpy references
 * in nemoq/quant/formats. One .c file per format family includes this header; build.py compiles
 * them into one library and hashes the headers into its cache key.
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
 *    in float32, double where a float64 constant (the search factors, exact literals on both
 *    sides) promotes the arithmetic to float64; no libm function whose rounding varies between
 *    C libraries (log2f, expf, powf) decides an output bit;
 *  - sums over a group (search.dot / search.total) add in order from +0; the per-block errors
 *    of Format.best_of are numpy's pairwise sum (pairwise_sum below); Q4_0/Q5_0's per-row
 *    mean square adds the row in order, as ggml;
 *  - rounding is rint (ties to even, numpy's np.rint) except where numpy truncates;
 *  - nearest-level lookups give what search.Grid's tables give;
 *  - ties: first candidate wins (np.argmin, strict `<` / `>` updates), as in numpy.
 * Non-finite inputs are outside the contract (numpy's own casts of NaN are platform-defined).
 *
 * Speed: like numpy, the searches run over NL = 8 groups at once (the groups of a super-block,
 * or 8 consecutive blocks), value-major as numpy's groups_first lays them out: x[i] holds value i
 * of each group, one group per vector lane. Each lane does exactly the scalar operations in the
 * scalar order, so the vectors change nothing in the results.
 *
 * Constants from the numpy references sit beside the code that uses them (TARGETS_*: the float64
 * targets of nemoq's own searches as exact hex literals; MIDS_*: the midpoints between
 * neighbouring levels of a search.Grid in units of its step); tests/test_kernels_c.py checks them
 * against the modules. */
#ifndef NEMOQ_QUANTS_H
#define NEMOQ_QUANTS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "scalar_common.h"   /* half floats, FP4 scales, np_minf / np_maxf / divf */

#define QK8_0 32
#define QK4_0 32
#define QK_K 256

/* weights of 1: the error measure without importance */
#define ONES8 1, 1, 1, 1, 1, 1, 1, 1
#define ONES64 ONES8, ONES8, ONES8, ONES8, ONES8, ONES8, ONES8, ONES8
static const float ONES[256] = {ONES64, ONES64, ONES64, ONES64};


/* ---------------------------------------------------------------------------------------------
 * Small helpers (half floats and the other scalars shared with the CUDA kernels: scalar_common.h)
 * ------------------------------------------------------------------------------------------- */

/* IEEE double -> half in one rounding (numpy's float64.astype(float16); not via float32). */
static inline uint16_t fp64_to_fp16(double f) {
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

/* np.clip: np.minimum(np.maximum(v, lo), hi) */
static inline float clipf(float v, float lo, float hi) { return np_minf(np_maxf(v, lo), hi); }

/* search.signed_absmax of a float or double array: the value of largest magnitude, with its
 * sign (first on ties); +0 for zeros. */
#define signed_absmax(x, n) __extension__({                                                  \
    const __typeof__((x)[0]) * p_ = (x);                                                      \
    int best_ = 0;                                                                            \
    for (int i_ = 1; i_ < (n); i_++) if (fabs(p_[i_]) > fabs(p_[best_])) best_ = i_;          \
    p_[best_] == 0 ? (__typeof__((x)[0]))0 : p_[best_];                                       \
})

/* numpy's pairwise summation (pairwise_sum in loops_utils.h.src), which np.sum uses along a
 * contiguous axis: 8 accumulators up to 128 values, halving above that. */
static inline float pairwise_sum(const float * a, int64_t n) {
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

/* np.sum(axis=-1) of a row: the reduction starts from the identity 0. */
static inline float np_sum(const float * a, int64_t n) { return 0.0f + pairwise_sum(a, n); }

/* Format.best_of's error of one block: sum of (w * diff) * diff, numpy's pairwise order.
 * w may be NULL (all ones). */
static inline float block_error(const float * x, const float * y, const float * w, int n) {
    float t[QK_K];
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - y[i];
        t[i] = (w ? w[i] : 1.0f) * diff * diff;
    }
    return np_sum(t, n);
}

/* np.argmin over candidate errors: the first minimum; a NaN wins (as numpy's argmin). */
static inline int argmin_first(const float * err, int n) {
    int best = 0;
    for (int k = 1; k < n; k++) {
        if (err[best] != err[best]) break;
        if (err[k] < err[best] || err[k] != err[k]) best = k;
    }
    return best;
}

/* nemoq_dequantize_<name>: rows of blocks, one block function */
#define DEQUANT_ROWS(name, block, bytes, fn)                                                  \
    void nemoq_dequantize_##name(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row) { \
        const int64_t nb = n_per_row / (block);                                               \
        for (int64_t r = 0; r < nrows; r++) {                                                 \
            for (int64_t b = 0; b < nb; b++) {                                                \
                fn(data + (r * nb + b) * (bytes), y + r * n_per_row + b * (block));           \
            }                                                                                 \
        }                                                                                     \
    }

#endif
