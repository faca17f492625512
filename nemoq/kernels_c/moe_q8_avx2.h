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
 * Formats with levels >= 0 (Q5_0 as level + 16, MXFP4 / NVFP4 as level + 12) skip the two sign
 * operations. Per 32 values that is about 13 vector operations (IQ4_NL: load, shift, insert,
 * and, shuffle, 2 signs, x load, maddubs, madd, cvt, fma, scale broadcast) plus the block scale's
 * decode and multiply (3-4, shared by a block's parts). MXFP4 and NVFP4 go 64 values at a time
 * (moe_q8_fp4_avx2.h), the k-quants a super-block's groups in int32 (moe_q8_k_avx2.h). Building
 * blocks (scales of the k-quants, bit and nibble unpacking) are moe_avx2.h's; moe_q8.c reads
 * the formats' activations in the order Q8_HALF (moe_q8_fp4_avx2.h) gives. */
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

/* ---- one-part blocks (Q8_0, Q5_0, IQ4_NL), eight at a time (MXFP4 in pairs: moe_q8_fp4_avx2.h) ----
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
#define DEFINE_Q8_ROW_DOT_B32(NAME, QK, BYTES, GROUP, HAS_MIN)                                                  \
    DEFINE_Q8_BLOCKS8(NAME, BYTES, Q8_OFFSET_##NAME)                                                            \
    DEFINE_Q8_BLOCK_DOT(NAME, Q8_OFFSET_##NAME)                                                                 \
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
                     (float)Q8_OFFSET_##NAME * (hsum256(corr[v]) + tail_corr[v][0]);                           \
    }                                                                                                          \
    Q8_ROW_DOT_BY_VECS(NAME)

#include "moe_q8_fp4_avx2.h"   /* MXFP4 (pairs of blocks) and NVFP4: 64 values per register of codes */
#include "moe_q8_k_avx2.h"     /* Q4_K, Q5_K, Q6_K against Q8_K: integer sub-block scales */

/* Which row dot each format takes: 32-value blocks eight at a time, MXFP4's pairs, NVFP4's 64-value
 * blocks, or the k-quants' super-blocks. */
#define Q8_ROWS_q8_0 B32
#define Q8_ROWS_q5_0 B32
#define Q8_ROWS_iq4_nl B32
#define Q8_ROWS_mxfp4 PAIRS
#define Q8_ROWS_nvfp4 NVFP4
#define Q8_ROWS_q4_k SUPER
#define Q8_ROWS_q5_k SUPER
#define Q8_ROWS_q6_k SUPER
#define Q8_PASTE(a, b) a##b
#define Q8_PASTE_EXPANDED(a, b) Q8_PASTE(a, b)   /* b macro-expanded first */
#define DEFINE_Q8_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN) \
    Q8_PASTE_EXPANDED(DEFINE_Q8_ROW_DOT_, Q8_ROWS_##NAME)(NAME, QK, BYTES, GROUP, HAS_MIN)

#endif
