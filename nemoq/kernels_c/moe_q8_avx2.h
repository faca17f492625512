/* The row dot products of moe_q8.c for CPUs with AVX2 (and FMA, F16C): included by moe_q8.c only.
 *
 * ggml's way: a block is read as parts of 32 values, each turned into 32 int8 levels in one
 * register (4-bit codes: 16 bytes, the high nibbles shifted into the upper 128 bits, one byte
 * shuffle through the level table), then multiplied with 32 int8 activations:
 *   maddubs(|w|, sign(x, w))   16 int16: sums of 2 products (|w| <= 128, |x| <= 127: at most
 *                              2 * 128 * 127 = 32512, no saturation, even for a Q8_0 level -128,
 *                              which is why the sign goes onto x and not onto w)
 *   madd(.., ones)             8 int32 lanes, lane i the sum of products 4i .. 4i + 3
 *   cvt, fma                   times the part's scale(s) d_w * d_x into a float running sum.
 * Formats with levels >= 0 (Q4_K, Q5_K, and Q5_0 as level + 16) skip the two sign operations.
 * Q6_K's 16-value groups take lanes 0-3 and 4-7 of a part, so a scale vector of two halves does;
 * combined scales d_w * d_x are made per block as vectors and spread to a part's lanes by one
 * permute. MXFP4 and NVFP4 go 64 values at a time (Q8_HALF, below). Per 32 values that is about 13 vector operations (IQ4_NL: load,
 * shift, insert, and, shuffle, 2 signs, x load, maddubs, madd, cvt, fma, scale broadcast) plus
 * the block scale's decode and multiply (3-4, shared by a block's parts). Building blocks
 * (scales of the k-quants, bit and nibble unpacking) are moe_avx2.h's. */
#ifndef NEMOQ_MOE_Q8_AVX2_H
#define NEMOQ_MOE_Q8_AVX2_H

#include <immintrin.h>

#include "moe_avx2.h"

/* ---- per format: q8_scales_<f>(block, d, m) once per block: group scales (and Q4_K / Q5_K
 * mins) as floats; q8_part_<f>(block, p): 32 int8 levels of values 32p .. 32p + 31, in order ---- */

/* 16 code bytes -> 32 codes: low nibbles in bytes 0-15, high nibbles in 16-31 (ggml's
 * bytes_from_nibbles_32). The bytes are loaded into both halves at once (a broadcast load costs
 * no vector operation) and the upper half shifted: two operations instead of ggml's three, 12%
 * faster for IQ4_NL in cache. */
MOE_INLINE __m256i codes32(const uint8_t * b) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
}

MOE_INLINE __m256i lookup32(const int8_t * table, __m256i codes) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table)), codes);
}

MOE_INLINE void q8_scales_f16(const uint8_t * b, float * d, float * m) { (void)m; d[0] = half_f16c(b); }
#define q8_scales_q8_0 q8_scales_f16
#define q8_scales_q5_0 q8_scales_f16
#define q8_scales_iq4_nl q8_scales_f16
MOE_INLINE void q8_scales_mxfp4(const uint8_t * b, float * d, float * m) { (void)m; d[0] = e8m0_half(b[0]); }
/* The eight UE4M3 codes of two NVFP4 blocks (b[0..3], b[36..39]; the second block's are taken as
 * zeros for pair = 0) -> their scales halved (scalar_common.h's ue4m3_half) times 2^-7: the low 7
 * code bits shifted into an f16's exponent and mantissa give 2^(e-15) (1 + m/8), or m/8 * 2^-14
 * for e = 0 (an f16 subnormal, which the conversion handles without a slow path); code 0x7F
 * (not 0xFF) is zero. The row dot multiplies the 2^7 back (exact). */
MOE_INLINE __m256 q8_scales8_nvfp4(const uint8_t * b, int pair) {
    uint32_t lo, hi = 0;
    memcpy(&lo, b, 4);
    if (pair) memcpy(&hi, b + 36, 4);
    const __m128i raw = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)((uint64_t)hi << 32 | lo)));
    const __m128i h = _mm_slli_epi16(_mm_and_si128(raw, _mm_set1_epi16(0x7f)), 7);
    const __m128i zero = _mm_cmpeq_epi16(raw, _mm_set1_epi16(0x7f));
    return _mm256_cvtph_ps(_mm_andnot_si128(zero, h));
}

MOE_INLINE __m256i q8_part_q8_0(const uint8_t * b, int p) { (void)p; return _mm256_loadu_si256((const __m256i *)(b + 2)); }

/* Q5_0: nibble | 16 * fifth bit, the level plus Q8_OFFSET_q5_0; expand_bits32 puts bit j of qh
 * at byte j as 16. */
MOE_INLINE __m256i q8_part_q5_0(const uint8_t * b, int p) {
    (void)p;
    return _mm256_or_si256(codes32(b + 6), expand_bits32(b + 2));
}

MOE_INLINE __m256i q8_part_iq4_nl(const uint8_t * b, int p) { (void)p; return lookup32(IQ4NL, codes32(b + 2)); }
/* E2M1 levels (doubled) plus 12: >= 0, see Q8_OFFSET_mxfp4 */
static const int8_t E2M1_X2_PLUS_12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
MOE_INLINE __m256i q8_part_mxfp4(const uint8_t * b, int p) { (void)p; return lookup32(E2M1_X2_PLUS_12, codes32(b + 1)); }

/* Levels as q8_part_<f> returns them: signed (|w| and the sign moved onto x), >= 0 (the k-quants
 * with mins), or >= 0 as level + offset (Q5_0: no sign operations nor subtraction of 16; the row
 * dot subtracts offset * sum_b d_w d_x sum(q), from the per-block sums ds (per 16 values for
 * NVFP4: s16); for Q5_0 9% faster in cache, for MXFP4 and NVFP4 (levels + 12) 5-7%, now that
 * the correction costs one vector multiply-add per eight scales. Relative error stays ~1e-6). */
#define Q8_OFFSET_q8_0 0
#define Q8_OFFSET_q5_0 16
#define Q8_OFFSET_iq4_nl 0
#define Q8_OFFSET_mxfp4 12
#define Q8_OFFSET_nvfp4 12

/* MXFP4 and NVFP4 rows are read 64 values at a time: 32 code bytes in one register (two MXFP4
 * blocks, one NVFP4 block), split into their low and high nibbles by one and, one shift and one
 * and; the two halves' maddubs outputs are added as int16 (levels + 12 <= 24: 2 * 2 * 24 * 127
 * fits), then one madd, one conversion and one multiply-add serve 64 values. A code byte holds
 * values j and j + Q8_HALF of its 2 * Q8_HALF-value group (MXFP4 block, NVFP4 group), so the
 * activations of each whole 64-value chunk of a row are stored low halves first:
 *   [group 0 values 0 .. h-1, group 1 values 0 .. h-1, ... | group 0 values h .. 2h-1, ...]
 * (nemoq_q8_quantize takes the weights' type for this). 20-30% faster in cache than a part at a
 * time (fewer conversions and multiply-adds, and NVFP4 one permute less per 32 values). Q5_0
 * (levels + 16, fifth bits regrouped for two blocks) was 3% slower so: it stays a block at a time. */
#define Q8_HALF(type) ((type) == FMT_MXFP4 ? 16 : (type) == FMT_NVFP4 ? 8 : 0)

/* ---- the dot products ---- */

/* One copy of a row dot q8_row_dot_<f>_n per vector count, so that the sums stay in registers. */
#define Q8_ROW_DOT_BY_VECS(NAME)                                                                                \
    static void q8_row_dot_##NAME(const uint8_t * restrict row, int64_t n, const q8_vec * xs, int nvec,        \
                                  float * out) {                                                               \
        switch (nvec) {                                                                                        \
        case 1: q8_row_dot_##NAME##_n(row, n, xs, 1, out); break;                                              \
        case 2: q8_row_dot_##NAME##_n(row, n, xs, 2, out); break;                                              \
        case 3: q8_row_dot_##NAME##_n(row, n, xs, 3, out); break;                                              \
        default: q8_row_dot_##NAME##_n(row, n, xs, 4, out); break;                                             \
        }                                                                                                      \
    }

/* 8 int32 lanes: lane i = sum of w_j x_j over j = 4i .. 4i + 3, exact. aw = |w| (signed) or w (>= 0). */
MOE_INLINE __m256i int_dot32(__m256i aw, __m256i w, __m256i x, int is_signed) {
    const __m256i p16 = _mm256_maddubs_epi16(aw, is_signed ? _mm256_sign_epi8(x, w) : x);
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* acc[v][slot] += one 32-value block . x[v] (the block at values off ..); offset levels add
 * d_w * ds to corr[v][slot]. */
#define DEFINE_Q8_BLOCK_DOT(NAME, OFFSET)                                                                        \
    MOE_INLINE void q8_block_dot_##NAME(const uint8_t * blk, const q8_vec * xs, int64_t off, const int nvec,    \
                                        int slot, __m256 (*acc)[2], float (*corr)[2]) {                          \
        enum { SIGNED = !(OFFSET) };                                                                             \
        float d[1], m[1];                                                                                        \
        q8_scales_##NAME(blk, d, m);                                                                             \
        const __m256i w = q8_part_##NAME(blk, 0);                                                                \
        const __m256i aw = SIGNED ? _mm256_sign_epi8(w, w) : w;                                                  \
        for (int v = 0; v < nvec; v++) {                                                                         \
            if (OFFSET) corr[v][slot] = fmaf(d[0], xs[v].ds[off / 32], corr[v][slot]);                           \
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xs[v].q + off));                              \
            const __m256 dot = _mm256_cvtepi32_ps(int_dot32(aw, w, x, SIGNED));                                  \
            acc[v][slot] = _mm256_fmadd_ps(_mm256_set1_ps(d[0] * xs[v].d[off / 32]), dot, acc[v][slot]);         \
        }                                                                                                        \
    }

/* ---- one-part blocks (Q8_0, Q5_0, IQ4_NL), eight at a time; MXFP4 pairs eight at a time below ----
 * The combined scales d_w * d_x of eight blocks are made at once: the weight scales gathered in
 * general-purpose registers (loads, shifts, ors: no vector operations), converted and multiplied
 * as one vector, stored, and each broadcast back from memory, which costs a load and no vector
 * operation (MXFP4 spreads them by a permute per pair); one block at a time the same work took
 * about four vector operations per block. */

/* Weight scales of the 8 blocks blk, blk + bytes, ... as floats. */
MOE_INLINE __m256 q8_scales8_f16(const uint8_t * blk, int bytes) {
    uint64_t half[2] = {0, 0};
    for (int i = 0; i < 8; i++) {
        uint16_t h;
        memcpy(&h, blk + i * bytes, 2);
        half[i / 4] |= (uint64_t)h << (16 * (i % 4));
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)half[1], (long long)half[0]));
}
#define q8_scales8_q8_0 q8_scales8_f16
#define q8_scales8_q5_0 q8_scales8_f16
#define q8_scales8_iq4_nl q8_scales8_f16

/* E8M0 exponents -> scalar_common.h's e8m0_half, eight at a time: 2^(e - 128) is the float with
 * exponent field e - 1, made by subtracting 1 from each byte while still gathered (no byte
 * borrows: all >= 2) and shifting; exponents 0 and 1 (subnormal halves, which trained weights
 * never have) take a slower exact path. */
MOE_INLINE __m256 q8_scales8_mxfp4(const uint8_t * blk, int bytes) {
    uint64_t bits = 0;
    for (int i = 0; i < 8; i++) bits |= (uint64_t)blk[i * bytes] << (8 * i);
    const uint64_t ones = 0x0101010101010101ULL;
    if (__builtin_expect(((bits - 2 * ones) & ~bits & 0x80 * ones) == 0, 1))   /* no byte below 2 */
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)(bits - ones))), 23));
    const __m256i e = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bits));
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
}

/* acc[v][.] += blocks b .. b + 7 . x[v]; offset levels add d_w * ds to corr[v]. */
#define DEFINE_Q8_BLOCKS8(NAME, BYTES, OFFSET)                                                                  \
    MOE_INLINE void q8_blocks8_##NAME(const uint8_t * blk, const q8_vec * xs, int64_t b, const int nvec,      \
                                      __m256 (*acc)[2], __m256 * corr) {                                     \
        enum { SIGNED = !(OFFSET) };                                                                         \
        const __m256 dw = q8_scales8_##NAME(blk, BYTES);                                                     \
        float scale[Q8_MAX_VECS][8] __attribute__((aligned(32)));                                            \
        for (int v = 0; v < nvec; v++) {                                                                     \
            _mm256_store_ps(scale[v], _mm256_mul_ps(dw, _mm256_loadu_ps(xs[v].d + b)));                      \
            if (OFFSET) corr[v] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xs[v].ds + b), corr[v]);              \
        }                                                                                                    \
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) {                                                \
            const __m256i w = q8_part_##NAME(blk + i * BYTES, 0);                                            \
            const __m256i aw = SIGNED ? _mm256_sign_epi8(w, w) : w;                                          \
            for (int v = 0; v < nvec; v++) {                                                                 \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xs[v].q + 32 * (b + i)));             \
                const __m256 dot = _mm256_cvtepi32_ps(int_dot32(aw, w, x, SIGNED));                          \
                acc[v][i & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[v][i]), dot, acc[v][i & 1]);      \
            }                                                                                                \
        }                                                                                                    \
    }

/* Eight blocks at a time, the last (fewer than 8) one by one as q8_block_dot does. */
#define DEFINE_Q8_ROW_DOT_B32(NAME, BYTES, OFFSET)                                                              \
    DEFINE_Q8_BLOCKS8(NAME, BYTES, OFFSET)                                                                      \
    DEFINE_Q8_BLOCK_DOT(NAME, OFFSET)                                                                          \
    MOE_INLINE void q8_row_dot_##NAME##_n(const uint8_t * restrict row, int64_t n, const q8_vec * xs,          \
                                          const int nvec, float * out) {                                       \
        __m256 acc[Q8_MAX_VECS][2], corr[Q8_MAX_VECS];                                                         \
        float tail_corr[Q8_MAX_VECS][2];                                                                       \
        for (int v = 0; v < nvec; v++) {                                                                       \
            acc[v][0] = acc[v][1] = corr[v] = _mm256_setzero_ps();                                             \
            tail_corr[v][0] = tail_corr[v][1] = 0.0f;                                                          \
        }                                                                                                      \
        const int64_t nb = n / 32;                                                                             \
        int64_t b = 0;                                                                                         \
        for (; b + 8 <= nb; b += 8) q8_blocks8_##NAME(row + b * BYTES, xs, b, nvec, acc, corr);                \
        for (; b < nb; b++) q8_block_dot_##NAME(row + b * BYTES, xs, 32 * b, nvec, 0, acc, tail_corr);         \
        for (int v = 0; v < nvec; v++)                                                                         \
            out[v] = hsum256(_mm256_add_ps(acc[v][0], acc[v][1])) -                                            \
                     (float)(OFFSET) * (hsum256(corr[v]) + tail_corr[v][0]);                                   \
    }                                                                                                          \
    Q8_ROW_DOT_BY_VECS(NAME)

/* ---- MXFP4 and NVFP4: 64 values per register of codes (see Q8_HALF) ---- */

/* 32 code bytes -> the levels + 12 of their low nibbles and of their high nibbles. */
MOE_INLINE void fp4_levels64(const __m256i codes, __m256i * lo, __m256i * hi) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS_12));
    const __m256i low4 = _mm256_set1_epi8(15);
    *lo = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, low4));
    *hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4));
}

/* (lo, hi) . the 64 activations at x (stored as Q8_HALF says): lane i sums the products of code
 * bytes 4i .. 4i + 3, both nibbles; exact (int16 sums of at most 4 * 24 * 127). */
MOE_INLINE __m256 dot64(const __m256i lo, const __m256i hi, const int8_t * x) {
    const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* ---- 32-value blocks in pairs (MXFP4): a pair's codes in one register ----
 * q8_pair_levels_<f>(blk, lo, hi): the levels (>= 0, + Q8_OFFSET) of blocks b, b + 1 as Q8_HALF = 16
 * orders them: lo = values 0-15 of b | of b + 1, hi = values 16-31 of b | of b + 1 (their dot's
 * lanes 0-3 are block b's, 4-7 block b + 1's); q8_scale1_<f>(blk): one block's weight scale. */
MOE_INLINE void q8_pair_levels_mxfp4(const uint8_t * blk, __m256i * lo, __m256i * hi) {
    fp4_levels64(_mm256_loadu2_m128i((const __m128i *)(blk + 17 + 1), (const __m128i *)(blk + 1)), lo, hi);
}
MOE_INLINE float q8_scale1_mxfp4(const uint8_t * blk) { return e8m0_half(blk[0]); }


/* Blocks b, b + 1 . x[v], their combined scales d_w * d_x in lanes i, i + 1 of S[v]. */
#define DEFINE_Q8_PAIR(NAME)                                                                                   \
    MOE_INLINE void q8_pair_##NAME(const uint8_t * blk, const q8_vec * xs, int64_t b, const int nvec,          \
                                   const __m256 * S, const int i, __m256 (*acc)[2], const int slot) {          \
        __m256i lo, hi;                                                                                        \
        q8_pair_levels_##NAME(blk, &lo, &hi);                                                                  \
        const __m256i spread = _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1);                      \
        for (int v = 0; v < nvec; v++)                                                                         \
            acc[v][slot] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(S[v], spread),                             \
                                           dot64(lo, hi, xs[v].q + 32 * b), acc[v][slot]);                 \
    }

/* Eight blocks as four pairs, their weight scales decoded as one vector; then the pairs left one
 * by one (scalar scales), then an odd last block as q8_block_dot does (activations in order).
 * Offset levels: d_w * ds into corr. */
#define DEFINE_Q8_ROW_DOT_PAIRS(NAME, QK, BYTES, GROUP, HAS_MIN)                                                \
    DEFINE_Q8_PAIR(NAME)                                                                                        \
    DEFINE_Q8_BLOCK_DOT(NAME, Q8_OFFSET_##NAME)                                                                 \
    MOE_INLINE void q8_row_dot_##NAME##_n(const uint8_t * restrict row, int64_t n, const q8_vec * xs,          \
                                          const int nvec, float * out) {                                       \
        __m256 acc[Q8_MAX_VECS][2], corr[Q8_MAX_VECS], S[Q8_MAX_VECS];                                         \
        float last_corr[Q8_MAX_VECS][2];                                                                       \
        for (int v = 0; v < nvec; v++) {                                                                       \
            acc[v][0] = acc[v][1] = corr[v] = _mm256_setzero_ps();                                             \
            last_corr[v][0] = last_corr[v][1] = 0.0f;                                                          \
        }                                                                                                      \
        const int64_t nb = n / 32;                                                                             \
        int64_t b = 0;                                                                                         \
        for (; b + 8 <= nb; b += 8) {                                                                          \
            const uint8_t * blk = row + b * BYTES;                                                             \
            const __m256 dw = q8_scales8_##NAME(blk, BYTES);                                                   \
            for (int v = 0; v < nvec; v++) {                                                                   \
                S[v] = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[v].d + b));                                        \
                corr[v] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xs[v].ds + b), corr[v]);                         \
            }                                                                                                  \
            _Pragma("GCC unroll 4") for (int i = 0; i < 8; i += 2)                                             \
                q8_pair_##NAME(blk + i * BYTES, xs, b + i, nvec, S, i, acc, (i / 2) & 1);                      \
        }                                                                                                      \
        for (; b + 2 <= nb; b += 2) {                                                                          \
            const uint8_t * blk = row + b * BYTES;                                                             \
            const float d0 = q8_scale1_##NAME(blk), d1 = q8_scale1_##NAME(blk + BYTES);                        \
            for (int v = 0; v < nvec; v++) {                                                                   \
                S[v] = _mm256_setr_ps(d0 * xs[v].d[b], d1 * xs[v].d[b + 1], 0, 0, 0, 0, 0, 0);                 \
                last_corr[v][1] += d0 * xs[v].ds[b] + d1 * xs[v].ds[b + 1];                                    \
            }                                                                                                  \
            q8_pair_##NAME(blk, xs, b, nvec, S, 0, acc, 0);                                                    \
        }                                                                                                      \
        if (b < nb) q8_block_dot_##NAME(row + b * BYTES, xs, 32 * b, nvec, 0, acc, last_corr);                 \
        for (int v = 0; v < nvec; v++)                                                                         \
            out[v] = hsum256(_mm256_add_ps(acc[v][0], acc[v][1])) -                                            \
                     (float)Q8_OFFSET_##NAME * (hsum256(corr[v]) + last_corr[v][0] + last_corr[v][1]);         \
    }                                                                                                          \
    Q8_ROW_DOT_BY_VECS(NAME)

/* NVFP4 blocks k, k + 1 (pair = 1) or k alone: the eight UE4M3 group scales decoded as one vector
 * and multiplied by d_x (one per two groups); a block's codes in one register (group g in lanes
 * 2g, 2g + 1 of the dot), its four scales spread by one permute. Levels + 12: the offset's
 * 12 * d_w d_x * (sum of the group's q) goes into corr, one multiply-add per eight groups. */
MOE_INLINE void q8_nvfp4_blocks(const uint8_t * blk, const q8_vec * xs, int64_t k, const int nvec, const int pair,
                                __m256 (*acc)[2], __m256 * corr) {
    const __m256 dw = q8_scales8_nvfp4(blk, pair);
    __m256 S[Q8_MAX_VECS];
    for (int v = 0; v < nvec; v++) {
        const __m256 dx = _mm256_permutevar8x32_ps(                     /* pair = 0: lanes 4-7 are zeros */
            _mm256_castps128_ps256(pair ? _mm_loadu_ps(xs[v].d + 2 * k)
                                        : _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xs[v].d + 2 * k)))),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        S[v] = _mm256_mul_ps(dw, dx);
        const __m256 s16 = pair ? _mm256_loadu_ps(xs[v].s16 + 4 * k)   /* pair = 0: lanes 4-7 zeros, not garbage */
                                : _mm256_set_m128(_mm_setzero_ps(), _mm_loadu_ps(xs[v].s16 + 4 * k));
        corr[v] = _mm256_fmadd_ps(S[v], s16, corr[v]);
    }
    for (int j = 0; j < 1 + pair; j++) {
        __m256i lo, hi;
        fp4_levels64(_mm256_loadu_si256((const __m256i *)(blk + 36 * j + 4)), &lo, &hi);
        const int g = 4 * j;
        const __m256i spread = _mm256_setr_epi32(g, g, g + 1, g + 1, g + 2, g + 2, g + 3, g + 3);
        for (int v = 0; v < nvec; v++)
            acc[v][j] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(S[v], spread),
                                        dot64(lo, hi, xs[v].q + 64 * (k + j)), acc[v][j]);
    }
}

#define DEFINE_Q8_ROW_DOT_NVFP4(NAME, QK, BYTES, GROUP, HAS_MIN)                                                \
    MOE_INLINE void q8_row_dot_##NAME##_n(const uint8_t * restrict row, int64_t n, const q8_vec * xs,          \
                                          const int nvec, float * out) {                                       \
        __m256 acc[Q8_MAX_VECS][2], corr[Q8_MAX_VECS];                                                         \
        for (int v = 0; v < nvec; v++) acc[v][0] = acc[v][1] = corr[v] = _mm256_setzero_ps();                  \
        const int64_t nb = n / 64;                                                                             \
        int64_t k = 0;                                                                                         \
        for (; k + 2 <= nb; k += 2) q8_nvfp4_blocks(row + k * 36, xs, k, nvec, 1, acc, corr);                  \
        if (k < nb) q8_nvfp4_blocks(row + k * 36, xs, k, nvec, 0, acc, corr);                                  \
        for (int v = 0; v < nvec; v++)                                                                         \
            out[v] = 0x1p7f * (hsum256(_mm256_add_ps(acc[v][0], acc[v][1])) -                                  \
                               (float)Q8_OFFSET_nvfp4 * hsum256(corr[v]));                                     \
    }                                                                                                          \
    Q8_ROW_DOT_BY_VECS(NAME)

/* ---- k-quants against Q8_K: a super-block's sub-block scales as int16 multipliers ----
 * Q8_K has one activation scale per 256 values, so a super-block's dot is, as ggml computes it,
 *   d_w d_x * sum_g scale_g * (levels_g . q_g)   minus the mins' or the offset's term,
 * the sum exact in int32: per 32 values one maddubs, one madd that multiplies the pair sums by
 * the group's scale (spread to the lanes by one byte shuffle) and one add; per 256 values one
 * conversion and one multiply-add. The levels are >= 0: Q4_K / Q5_K as stored, with their mins
 * (dmin * m_g as floats) against the activations' ds (d_x * sum of q per 32), one multiply-add
 * per super-block; Q6_K as q + 32, the offset's 32 * d_w d_x * sum_g scale_g * s16_g kept per
 * row as the other offset levels are (no sign operations). Q8K_CORR_<f>: the factor of that
 * term. */
#define Q8K_CORR_q4_k 1
#define Q8K_CORR_q5_k 1
#define Q8K_CORR_q6_k 32

/* Bit `bit` of every byte of v, moved to bit `to` (the other bits zero): one 16-bit shift and an
 * and (what a shift carries over from the neighbouring byte is masked off). */
MOE_INLINE __m256i bit_to(__m256i v, int bit, int to, int width) {
    const __m256i moved = bit < to ? _mm256_slli_epi16(v, to - bit) : bit > to ? _mm256_srli_epi16(v, bit - to) : v;
    return _mm256_and_si256(moved, _mm256_set1_epi8((char)(((1 << width) - 1) << to)));
}

/* Q4_K group p: the low (p even) or high nibbles of qs[32 (p / 2) ..]. */
MOE_INLINE __m256i q8_part_q4_k(const uint8_t * b, int p) { return nibbles32(b + 16 + 32 * (p / 2), p % 2); }

/* Q5_K group p: as Q4_K (qs at b + 48), and bit p of qh[l] as the fifth bit of value l. */
MOE_INLINE __m256i q8_part_q5_k(const uint8_t * b, int p) {
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    return _mm256_or_si256(nibbles32(b + 48 + 32 * (p / 2), p % 2), bit_to(qh, p, 4, 1));
}

/* Q6_K part p = 4h + k: low nibbles in ql[64h + 32(k % 2) ..] (high halves for k >= 2), top two
 * bits at bit 2k of qh[32h ..]: the level plus 32. */
MOE_INLINE __m256i q8_part_q6_k(const uint8_t * b, int p) {
    const int h = p / 4, k = p % 4;
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    return _mm256_or_si256(nibbles32(b + 64 * h + 32 * (k % 2), k >= 2), bit_to(qh, 2 * k, 4, 2));
}

/* Q4_K / Q5_K: the eight six-bit scales as int16 (in both 128-bit halves), dmin * m_g as floats;
 * returns d. */
MOE_INLINE float q8k_scales_k_4_5(const uint8_t * b, __m256i * scales, __m256 * w) {
    const __m128i bytes = k_4_5_scale_bytes(b);
    scales[0] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(bytes));
    w[0] = _mm256_mul_ps(_mm256_set1_ps(half_f16c(b + 2)),
                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes))));
    return half_f16c(b);
}
#define q8k_scales_q4_k q8k_scales_k_4_5
#define q8k_scales_q5_k q8k_scales_k_4_5

/* Q6_K: the sixteen int8 scales as int16, 0-7 and 8-15 each in both halves, and as floats. */
MOE_INLINE float q8k_scales_q6_k(const uint8_t * b, __m256i * scales, __m256 * w) {
    const __m128i s8 = _mm_loadu_si128((const __m128i *)(b + 192));
    const __m256i s16 = _mm256_cvtepi8_epi16(s8);
    scales[0] = _mm256_permute2x128_si256(s16, s16, 0x00);
    scales[1] = _mm256_permute2x128_si256(s16, s16, 0x11);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(s8, s8)));
    return half_f16c(b + 208);
}

/* Part p's multipliers: int16 word a of `scales` in the low 128-bit half, word c in the high one. */
MOE_INLINE __m256i spread_words(__m256i scales, int a, int c) {
    const char a0 = (char)(2 * a), a1 = (char)(2 * a + 1), c0 = (char)(2 * c), c1 = (char)(2 * c + 1);
    return _mm256_shuffle_epi8(scales, _mm256_setr_epi8(a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1,
                                                        c0, c1, c0, c1, c0, c1, c0, c1, c0, c1, c0, c1, c0, c1, c0, c1));
}
/* 32-value groups: group p everywhere; Q6_K's 16-value groups: 2p in the low half, 2p + 1 high */
MOE_INLINE __m256i q8k_part_scale_k_4_5(const __m256i * scales, int p) { return spread_words(scales[0], p, p); }
#define q8k_part_scale_q4_k q8k_part_scale_k_4_5
#define q8k_part_scale_q5_k q8k_part_scale_k_4_5
MOE_INLINE __m256i q8k_part_scale_q6_k(const __m256i * scales, int p) {
    return spread_words(scales[p / 4], (2 * p) % 8, (2 * p + 1) % 8);
}

/* corr += what Q8K_CORR_<f> times it is subtracted: the mins' sum_g dmin m_g * ds_g (d_x in ds),
 * or Q6_K's D * sum_g scale_g * s16_g (D = d_w d_x) for super-block k. */
MOE_INLINE void q8k_corr_k_4_5(const __m256 * w, const q8_vec * x, int64_t k, float D, __m256 * corr) {
    (void)D;
    *corr = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x->ds + 8 * k), *corr);
}
#define q8k_corr_q4_k q8k_corr_k_4_5
#define q8k_corr_q5_k q8k_corr_k_4_5
MOE_INLINE void q8k_corr_q6_k(const __m256 * w, const q8_vec * x, int64_t k, float D, __m256 * corr) {
    const __m256 t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x->s16 + 16 * k + 8),
                                     _mm256_mul_ps(w[0], _mm256_loadu_ps(x->s16 + 16 * k)));
    *corr = _mm256_fmadd_ps(_mm256_set1_ps(D), t, *corr);
}

#define DEFINE_Q8_ROW_DOT_SUPER(NAME, QK, BYTES, GROUP, HAS_MIN)                                                \
    MOE_INLINE void q8_row_dot_##NAME##_n(const uint8_t * restrict row, int64_t n, const q8_vec * xs,          \
                                          const int nvec, float * out) {                                       \
        __m256 acc[Q8_MAX_VECS][2], corr[Q8_MAX_VECS];                                                         \
        for (int v = 0; v < nvec; v++) acc[v][0] = acc[v][1] = corr[v] = _mm256_setzero_ps();                  \
        for (int64_t k = 0; k < n / 256; k++) {                                                                \
            const uint8_t * blk = row + k * BYTES;                                                             \
            __m256i scales[2];                                                                                 \
            __m256 w[2];                                                                                       \
            const float d = q8k_scales_##NAME(blk, scales, w);                                                 \
            __m256i isum[Q8_MAX_VECS];                                                                         \
            for (int v = 0; v < nvec; v++) isum[v] = _mm256_setzero_si256();                                  \
            _Pragma("GCC unroll 8") for (int p = 0; p < 8; p++) {                                              \
                const __m256i levels = q8_part_##NAME(blk, p), s = q8k_part_scale_##NAME(scales, p);           \
                for (int v = 0; v < nvec; v++) {                                                               \
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(xs[v].q + 256 * k + 32 * p));       \
                    isum[v] = _mm256_add_epi32(isum[v], _mm256_madd_epi16(_mm256_maddubs_epi16(levels, x), s)); \
                }                                                                                              \
            }                                                                                                  \
            for (int v = 0; v < nvec; v++) {                                                                   \
                const float D = d * xs[v].d[8 * k];                                                            \
                acc[v][k & 1] = _mm256_fmadd_ps(_mm256_set1_ps(D), _mm256_cvtepi32_ps(isum[v]), acc[v][k & 1]); \
                q8k_corr_##NAME(w, &xs[v], k, D, &corr[v]);                                                    \
            }                                                                                                  \
        }                                                                                                      \
        for (int v = 0; v < nvec; v++)                                                                         \
            out[v] = hsum256(_mm256_add_ps(acc[v][0], acc[v][1])) - (float)Q8K_CORR_##NAME * hsum256(corr[v]);  \
    }                                                                                                          \
    Q8_ROW_DOT_BY_VECS(NAME)

/* Which row dot each format takes: 32-value blocks eight at a time, MXFP4's pairs, NVFP4's 64-value
 * blocks, or the k-quants' super-blocks. */
#define Q8_ROWS_q8_0 B32_ARGS
#define Q8_ROWS_q5_0 B32_ARGS
#define Q8_ROWS_iq4_nl B32_ARGS
#define Q8_ROWS_mxfp4 PAIRS
#define Q8_ROWS_nvfp4 NVFP4
#define Q8_ROWS_q4_k SUPER
#define Q8_ROWS_q5_k SUPER
#define Q8_ROWS_q6_k SUPER
#define DEFINE_Q8_ROW_DOT_B32_ARGS(NAME, QK, BYTES, GROUP, HAS_MIN) DEFINE_Q8_ROW_DOT_B32(NAME, BYTES, Q8_OFFSET_##NAME)
#define Q8_PASTE(a, b) a##b
#define Q8_PASTE_EXPANDED(a, b) Q8_PASTE(a, b)   /* b macro-expanded first */
#define DEFINE_Q8_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN) \
    Q8_PASTE_EXPANDED(DEFINE_Q8_ROW_DOT_, Q8_ROWS_##NAME)(NAME, QK, BYTES, GROUP, HAS_MIN)

#endif
