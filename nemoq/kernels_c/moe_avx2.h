/* The row dot products of moe.c for CPUs with AVX2 (and FMA, F16C): included by moe.c only.
 *
 * out[v] = row . xs[v] for nvec <= MAX_VECS float vectors, each block decoded once, straight
 * into float registers: a block is read as parts of 32 values (a whole Q8_0 / Q5_0 / IQ4_NL /
 * MXFP4 block, half an NVFP4 block, an eighth of a k-quant super-block) and turned into four
 * vectors of 8 floats, dotted with x; the group scale multiplies the group's partial sum once.
 * Nothing goes through memory but the block and x, so the loop is bound by shuffles and
 * conversions, about 2.5 vector operations per 8 values besides the multiply-add:
 *   - 4-bit codes (Q5_0, IQ4_NL, MXFP4, NVFP4): 16 code bytes loaded into both 128-bit halves,
 *     nibbles looked up with one byte shuffle each, then one more in-lane shuffle per 8 values
 *     puts each level in the top byte of a 32-bit lane (widening and sign extension in one
 *     operation, instead of a sign extension and a move between halves); the levels come out
 *     times 2^24, which the block scale absorbs (TOP8_SCALE);
 *   - Q4_K / Q5_K: the mins term -m_g * sum(x in group g) uses sums of x per 32 values computed
 *     once per call (moe.c), one multiply-add per super-block instead of adds per group;
 *   - Q8_0, Q4_K, Q6_K, Q5_K: levels sign- or zero-extended straight from the block or a register.
 * Two running sums per vector (even / odd parts, or the two 16-value groups of a part) so that
 * consecutive fused multiply-adds do not wait on each other. Float32 throughout, as the plain
 * C, fused multiply-adds, and a different order of additions: not bit for bit the plain C's
 * result, both within the tests' 1e-5 of float64. */
#ifndef NEMOQ_MOE_AVX2_H
#define NEMOQ_MOE_AVX2_H

#include <immintrin.h>

#define MOE_INLINE static inline __attribute__((always_inline))

/* ---- building blocks ---- */

/* 16 int8 levels -> two vectors of 8 floats. */
MOE_INLINE void widen16(__m128i q, __m256 * out) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
}

/* 32 int8 levels -> four vectors of 8 floats. */
MOE_INLINE void widen32(__m256i q, __m256 * out) {
    widen16(_mm256_castsi256_si128(q), out);
    widen16(_mm256_extracti128_si256(q, 1), out + 2);
}

/* 8 bytes at p -> 8 int32 lanes, zero-extended. */
MOE_INLINE __m256i bytes8_u32(const uint8_t * p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* 16 bytes of nibble pairs -> table[low nibble], table[high nibble], each 16 levels repeated in
 * both 128-bit halves (for top8). */
MOE_INLINE void lut_nibbles(const int8_t * table, const uint8_t * b, __m256i * lo, __m256i * hi) {
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b));
    const __m256i mask = _mm256_set1_epi8(15);
    *lo = _mm256_shuffle_epi8(t, _mm256_and_si256(v, mask));
    *hi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
}

/* 16 levels repeated in both halves -> levels 8i .. 8i + 7 (i = 0, 1) times 2^24 as floats: one
 * in-lane shuffle puts each level in the top byte of a 32-bit lane (zeros below), which widens
 * and sign-extends at once; the caller folds 2^-24 into the scale. */
#define TOP8 -1, -1, -1
MOE_INLINE __m256 top8(__m256i levels, int i) {
    const __m256i control = i ? _mm256_setr_epi8(TOP8, 8, TOP8, 9, TOP8, 10, TOP8, 11,    /* low half */
                                                 TOP8, 12, TOP8, 13, TOP8, 14, TOP8, 15)  /* high half */
                              : _mm256_setr_epi8(TOP8, 0, TOP8, 1, TOP8, 2, TOP8, 3, TOP8, 4, TOP8, 5, TOP8, 6, TOP8, 7);
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(levels, control));
}
#undef TOP8
#define TOP8_SCALE 0x1p-24f

/* 32 bytes -> their low (high = 0) or high (high = 1) nibbles. */
MOE_INLINE __m256i nibbles32(const uint8_t * b, int high) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)b);
    return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
}

/* The 32 bits of 4 little-endian bytes -> byte j = 16 * (bit j). */
MOE_INLINE __m256i expand_bits32(const uint8_t * b) {
    uint32_t word;
    memcpy(&word, b, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)word), _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(16));
}

MOE_INLINE float half_f16c(const uint8_t * p) {
    return _cvtsh_ss((unsigned short)((uint32_t)p[0] | (uint32_t)p[1] << 8));
}

/* Four UE4M3 codes -> their scales halved (scalar_common.h's ue4m3_half) times 2^-24 (top8):
 * exponent and mantissa shifted into a float's and rebiased, or for exponent 0 the mantissa
 * times 2^-34 (no subnormal floats on the way: they are slow); code 0x7F (not 0xFF) is zero. */
MOE_INLINE void ue4m3_half_top8_x4(const uint8_t * codes, float * d) {
    int32_t word;
    memcpy(&word, codes, 4);
    const __m128i raw = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word)), c = _mm_and_si128(raw, _mm_set1_epi32(0x7f));
    const __m128 normal = _mm_castsi128_ps(_mm_add_epi32(_mm_slli_epi32(c, 20), _mm_set1_epi32((119 - 24) << 23)));
    const __m128 sub = _mm_mul_ps(_mm_cvtepi32_ps(_mm_and_si128(c, _mm_set1_epi32(7))), _mm_set1_ps(0x1p-34f));
    const __m128i is_sub = _mm_cmpgt_epi32(_mm_set1_epi32(8), c);
    const __m128 v = _mm_blendv_ps(normal, sub, _mm_castsi128_ps(is_sub));
    _mm_storeu_ps(d, _mm_andnot_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(raw, _mm_set1_epi32(0x7f))), v));
}

/* ---- per format: scales_<f>(block, d, m) once per block, part_<f>(block, p, q) per 32 values:
 * q[i] holds values 32p + 8i .. 32p + 8i + 7 (layouts: nemoq/quant/formats/<format>.py) ---- */

static const int8_t Q5_LOW[16] = {-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1};

MOE_INLINE void scales_q8_0(const uint8_t * b, float * d, float * m) { (void)m; d[0] = half_f16c(b); }
MOE_INLINE void scales_top8(const uint8_t * b, float * d, float * m) { (void)m; d[0] = half_f16c(b) * TOP8_SCALE; }
#define scales_q5_0 scales_top8
#define scales_iq4_nl scales_top8

/* E8M0 codes 0-2 halve to 2^-128 .. 2^-126, which times 2^-24 (TOP8_SCALE) underflow: such blocks
 * (never in trained weights) take their levels unscaled instead, see part_mxfp4. */
#define MXFP4_TINY(b) __builtin_expect((b)[0] < 3, 0)
MOE_INLINE void scales_mxfp4(const uint8_t * b, float * d, float * m) {
    (void)m;
    d[0] = MXFP4_TINY(b) ? e8m0_half(b[0]) : e8m0_half(b[0]) * TOP8_SCALE;
}
MOE_INLINE void scales_nvfp4(const uint8_t * b, float * d, float * m) { (void)m; ue4m3_half_top8_x4(b, d); }

MOE_INLINE void part_q8_0(const uint8_t * b, int p, __m256 * q) {
    (void)p;
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i))));
}

/* Q5_0: low 4 bits of values j and j + 16 in qs[j], the fifth of value j in bit j of qh. */
MOE_INLINE void part_q5_0(const uint8_t * b, int p, __m256 * q) {
    (void)p;
    __m256i lo, hi;
    lut_nibbles(Q5_LOW, b + 6, &lo, &hi);   /* nibble - 16, then + 16 where the fifth bit is set */
    const __m256i high = expand_bits32(b + 2);
    lo = _mm256_add_epi8(lo, _mm256_permute4x64_epi64(high, 0x44));
    hi = _mm256_add_epi8(hi, _mm256_permute4x64_epi64(high, 0xEE));
    q[0] = top8(lo, 0), q[1] = top8(lo, 1), q[2] = top8(hi, 0), q[3] = top8(hi, 1);
}

/* IQ4_NL / MXFP4: values 0-15 in the low nibbles, 16-31 in the high ones. */
MOE_INLINE void part_iq4_nl(const uint8_t * b, int p, __m256 * q) {
    (void)p;
    __m256i lo, hi;
    lut_nibbles(IQ4NL, b + 2, &lo, &hi);
    q[0] = top8(lo, 0), q[1] = top8(lo, 1), q[2] = top8(hi, 0), q[3] = top8(hi, 1);
}

MOE_INLINE void part_mxfp4(const uint8_t * b, int p, __m256 * q) {
    (void)p;
    __m256i lo, hi;
    lut_nibbles(E2M1_X2, b + 1, &lo, &hi);
    if (MXFP4_TINY(b)) {   /* levels as they are (scales_mxfp4) */
        widen16(_mm256_castsi256_si128(lo), q);
        widen16(_mm256_castsi256_si128(hi), q + 2);
        return;
    }
    q[0] = top8(lo, 0), q[1] = top8(lo, 1), q[2] = top8(hi, 0), q[3] = top8(hi, 1);
}

/* NVFP4: part p is groups 2p and 2p + 1, 8 bytes each: values 0-7 low nibbles, 8-15 high. */
MOE_INLINE void part_nvfp4(const uint8_t * b, int p, __m256 * q) {
    __m256i lo, hi;
    lut_nibbles(E2M1_X2, b + 4 + 16 * p, &lo, &hi);
    q[0] = top8(lo, 0), q[1] = top8(hi, 0), q[2] = top8(lo, 1), q[3] = top8(hi, 1);
}

/* Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes, unpacked four at a time in 32-bit words
 * (as ggml does) into scales 0-7 in bytes 0-7 and mins 0-7 in bytes 8-15. */
MOE_INLINE __m128i k_4_5_scale_bytes(const uint8_t * b) {
    uint32_t u[4];
    memcpy(u, b + 4, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & top2) << 4);
    const uint32_t mins_low = u[1] & low6;
    u[1] = (u[2] & low4) | (((u[0] >> 6) & top2) << 4);
    u[2] = mins_low;
    u[0] &= low6;
    return _mm_loadu_si128((const __m128i *)u);
}

/* Q4_K / Q5_K scales and mins as floats (times d, dmin). */
MOE_INLINE void scales_k_4_5(const uint8_t * b, float * d, float * m) {
    const __m128i bytes = k_4_5_scale_bytes(b);
    _mm256_storeu_ps(d, _mm256_mul_ps(_mm256_set1_ps(half_f16c(b)),
                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes))));
    _mm256_storeu_ps(m, _mm256_mul_ps(_mm256_set1_ps(half_f16c(b + 2)),
                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)))));
}
#define scales_q4_k scales_k_4_5
#define scales_q5_k scales_k_4_5

/* Q4_K group p: the low (p even) or high nibbles of qs[32 (p / 2) ..], widened from memory. */
MOE_INLINE void part_q4_k(const uint8_t * b, int p, __m256 * q) {
    const uint8_t * qs = b + 16 + 32 * (p / 2);
    for (int i = 0; i < 4; i++) {
        const __m256i v = bytes8_u32(qs + 8 * i);
        q[i] = _mm256_cvtepi32_ps(p % 2 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
    }
}

/* Q5_K group p: as Q4_K (qs at b + 48), and bit p of qh[l] as the fifth bit of value l. */
MOE_INLINE void part_q5_k(const uint8_t * b, int p, __m256 * q) {
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    const __m256i fifth = _mm256_and_si256(_mm256_srli_epi16(qh, p), _mm256_set1_epi8(1));
    widen32(_mm256_or_si256(nibbles32(b + 48 + 32 * (p / 2), p % 2), _mm256_slli_epi16(fifth, 4)), q);
}

/* Q6_K: 16 signed 8-bit scales times d. */
MOE_INLINE void scales_q6_k(const uint8_t * b, float * d, float * m) {
    (void)m;
    const __m256 dd = _mm256_set1_ps(half_f16c(b + 208));
    const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    _mm256_storeu_ps(d, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    const __m128i sc_high = _mm_unpackhi_epi64(sc, sc);
    _mm256_storeu_ps(d + 8, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc_high))));
}

/* Q6_K part p = 4h + k: low nibbles in ql[64h + 32(k % 2) ..] (high halves for k >= 2), top two
 * bits at bit 2k of qh[32h ..], minus 32. */
MOE_INLINE void part_q6_k(const uint8_t * b, int p, __m256 * q) {
    const int h = p / 4, k = p % 4;
    const __m256i low = nibbles32(b + 64 * h + 32 * (k % 2), k >= 2);
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    const __m256i top = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), _mm256_set1_epi8(3)), 4);
    widen32(_mm256_sub_epi8(_mm256_or_si256(low, top), _mm256_set1_epi8(32)), q);
}

/* ---- the dot products ---- */

MOE_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* acc[v][0..1] += block . x[v] (x[v] at this block's values); GROUP 32 parts alternate their
 * running sum starting at `slot`, GROUP 16 parts use both; the mins (8 groups of 32 per block)
 * against the sums of x[v]'s groups of 32, computed once per call, go to the same running sums
 * (so that they cancel block by block, not at the end). */
#define DEFINE_BLOCK_DOT(NAME, QK, GROUP, HAS_MIN)                                                            \
    MOE_INLINE void block_dot_##NAME(const uint8_t * blk, const float * const * xs,                           \
                                     const float * const * sums, int64_t off, const int nvec,                 \
                                     int slot, __m256 (*acc)[2]) {                                            \
        float d[QK / GROUP], m[HAS_MIN ? 8 : 1];                                                              \
        scales_##NAME(blk, d, m);                                                                             \
        if (HAS_MIN)                                                                                          \
            for (int v = 0; v < nvec; v++)                                                                    \
                acc[v][slot] = _mm256_fnmadd_ps(_mm256_loadu_ps(m), _mm256_loadu_ps(sums[v] + off / 32),     \
                                                acc[v][slot]);                                                \
        _Pragma("GCC unroll 8") for (int p = 0; p < QK / 32; p++) {                                           \
            __m256 q[4];                                                                                      \
            part_##NAME(blk, p, q);                                                                           \
            for (int v = 0; v < nvec; v++) {                                                                  \
                const float * x = xs[v] + off + 32 * p;                                                       \
                const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);                            \
                const __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);                      \
                if (GROUP == 32) {                                                                            \
                    __m256 t = _mm256_fmadd_ps(q[1], x1, _mm256_mul_ps(q[0], x0));                            \
                    t = _mm256_fmadd_ps(q[3], x3, _mm256_fmadd_ps(q[2], x2, t));                              \
                    const int s = (slot + p) & 1;                                                             \
                    acc[v][s] = _mm256_fmadd_ps(_mm256_set1_ps(d[p]), t, acc[v][s]);                          \
                } else {                                                                                      \
                    const __m256 t0 = _mm256_fmadd_ps(q[1], x1, _mm256_mul_ps(q[0], x0));                     \
                    const __m256 t1 = _mm256_fmadd_ps(q[3], x3, _mm256_mul_ps(q[2], x2));                     \
                    acc[v][0] = _mm256_fmadd_ps(_mm256_set1_ps(d[2 * p]), t0, acc[v][0]);                     \
                    acc[v][1] = _mm256_fmadd_ps(_mm256_set1_ps(d[2 * p + 1]), t1, acc[v][1]);                 \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }

/* Blocks in pairs, so that one-part blocks alternate their running sums too; one copy of the loop
 * per vector count, so the sums stay in registers. */
#define DEFINE_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN)                                                       \
    DEFINE_BLOCK_DOT(NAME, QK, GROUP, HAS_MIN)                                                                \
    MOE_INLINE void row_dot_##NAME##_n(const uint8_t * restrict row, int64_t n, const float * const * xs,     \
                                       const float * const * sums, const int nvec, float * out) {             \
        __m256 acc[MAX_VECS][2];                                                                              \
        for (int v = 0; v < nvec; v++) acc[v][0] = acc[v][1] = _mm256_setzero_ps();                           \
        const int64_t nb = n / QK;                                                                            \
        int64_t b = 0;                                                                                        \
        for (; b + 1 < nb; b += 2) {                                                                          \
            block_dot_##NAME(row + b * BYTES, xs, sums, b * QK, nvec, 0, acc);                                \
            block_dot_##NAME(row + (b + 1) * BYTES, xs, sums, (b + 1) * QK, nvec, 1, acc);                    \
        }                                                                                                     \
        if (b < nb) block_dot_##NAME(row + b * BYTES, xs, sums, b * QK, nvec, 0, acc);                        \
        for (int v = 0; v < nvec; v++)                                                                        \
            out[v] = hsum256(_mm256_add_ps(acc[v][0], acc[v][1]));                                            \
    }                                                                                                         \
    static void row_dot_##NAME(const uint8_t * restrict row, int64_t n, const float * const * xs,             \
                               const float * const * sums, int nvec, float * out) {                           \
        switch (nvec) {                                                                                       \
        case 1: row_dot_##NAME##_n(row, n, xs, sums, 1, out); break;                                          \
        case 2: row_dot_##NAME##_n(row, n, xs, sums, 2, out); break;                                          \
        case 3: row_dot_##NAME##_n(row, n, xs, sums, 3, out); break;                                          \
        default: row_dot_##NAME##_n(row, n, xs, sums, 4, out); break;                                         \
        }                                                                                                     \
    }

#endif
