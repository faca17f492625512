/* The row dots of moe_q8_avx2.h for Q4_K, Q5_K and Q6_K: included by it only, after its building
 * blocks (q8_vec, Q8_ROW_DOT_BY_VECS; the k-quant scale unpacking and nibbles32 of moe_avx2.h). */
#ifndef NEMOQ_MOE_Q8_K_AVX2_H
#define NEMOQ_MOE_Q8_K_AVX2_H

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

/* Bits bit .. bit + width - 1 of every byte of v, moved to bits to .. to + width - 1 (the other
 * bits zero): one 16-bit shift and an and (what the shift carries over from the neighbouring
 * byte is masked off). */
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

#endif
