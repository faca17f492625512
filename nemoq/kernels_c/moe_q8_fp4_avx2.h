/* The row dots of moe_q8_avx2.h for MXFP4 and NVFP4: included by it only, after its building
 * blocks (q8_vec, int_dot32, q8_block_dot, the E8M0 / UE4M3 scale decoders).
 *
 * MXFP4 and NVFP4 rows are read 64 values at a time: 32 code bytes in one register (two MXFP4
 * blocks, one NVFP4 block), split into their low and high nibbles by one and, one shift and one
 * and; the two halves' maddubs outputs are added as int16 (levels + 12 <= 24: 2 * 2 * 24 * 127
 * fits), then one madd, one conversion and one multiply-add serve 64 values. A code byte holds
 * values j and j + Q8_HALF of its 2 * Q8_HALF-value group (MXFP4 block, NVFP4 group), so the
 * activations of each whole 64-value chunk of a row are stored low halves first:
 *   [group 0 values 0 .. h-1, group 1 values 0 .. h-1, ... | group 0 values h .. 2h-1, ...]
 * (nemoq_q8_quantize takes the weights' type for this). 20-30% faster in cache than a part at a
 * time (fewer conversions and multiply-adds, and NVFP4 one permute less per 32 values). Q5_0
 * (levels + 16, fifth bits regrouped for two blocks) was 3% slower so: it stays a block at a time. */
#ifndef NEMOQ_MOE_Q8_FP4_AVX2_H
#define NEMOQ_MOE_Q8_FP4_AVX2_H

#define Q8_HALF(type) ((type) == FMT_MXFP4 ? 16 : (type) == FMT_NVFP4 ? 8 : 0)

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

#endif
