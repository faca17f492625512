/* The block formats moe.c and moe_q8.c read: ggml type ids, level tables, which build runs
 * (MOE_AVX2), and for the plain-C build the block decoders (one block -> int8 levels and float
 * group scales). Layouts: nemoq/quant/formats/<format>.py. */
#ifndef NEMOQ_MOE_LEVELS_H
#define NEMOQ_MOE_LEVELS_H

#include <stdint.h>

#include "scalar_common.h"

/* AVX2 row dots (moe_avx2.h, moe_q8_avx2.h) where the compiler targets AVX2 with FMA and F16C;
 * -DNEMOQ_MOE_PORTABLE forces the plain C (what other CPUs run; the tests build and check both). */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(NEMOQ_MOE_PORTABLE)
#define MOE_AVX2 1
#else
#define MOE_AVX2 0
#endif

enum {  /* ggml type ids (gguf-py GGMLQuantizationType) */
    FMT_Q5_0 = 6, FMT_Q8_0 = 8, FMT_Q4_K = 12, FMT_Q5_K = 13, FMT_Q6_K = 14,
    FMT_IQ4_NL = 20, FMT_MXFP4 = 39, FMT_NVFP4 = 40,
};

/* Every format the MoE kernels read, one X(name, type id, values and bytes per block, values per
 * scale, mins?) each: both kernels instantiate their row dots and build their format tables
 * from this one list. */
#define MOE_FORMATS(X)                          \
    X(q8_0, FMT_Q8_0, 32, 34, 32, 0)            \
    X(q5_0, FMT_Q5_0, 32, 22, 32, 0)            \
    X(iq4_nl, FMT_IQ4_NL, 32, 18, 32, 0)        \
    X(mxfp4, FMT_MXFP4, 32, 17, 32, 0)          \
    X(nvfp4, FMT_NVFP4, 64, 36, 16, 0)          \
    X(q4_k, FMT_Q4_K, 256, 144, 32, 1)          \
    X(q5_k, FMT_Q5_K, 256, 176, 32, 1)          \
    X(q6_k, FMT_Q6_K, 256, 210, 16, 0)

/* E2M1 doubled to integers (ggml's kvalues_mxfp4) and IQ4_NL's non-linear levels. */
static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static const int8_t IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Ask for the row after next (rows of one expert are contiguous): from memory 3-15% faster on
 * the machine we measure than the hardware prefetchers alone. Rows past r1 are not touched. */
static inline void prefetch_row_after_next(const uint8_t * row, int64_t r, int64_t r1, int64_t row_bytes) {
    if (r + 2 < r1)
        for (int64_t at = 0; at < row_bytes; at += 64) __builtin_prefetch(row + 2 * row_bytes + at);
}

#if !MOE_AVX2

#define MAX_BLOCK 256

static const int8_t Q4_LEVELS[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* A decoded block: value j = d[j / group] * qp[j] - m[j / 32] (m only for Q4_K and Q5_K); qp
 * points into q, or straight into the block where it holds int8 levels (Q8_0). */
typedef struct {
    const int8_t * qp;
    int8_t q[MAX_BLOCK];
    float d[16];
    float m[8];
} levels;

/* 16 bytes of nibble pairs -> 32 levels table[nibble]. interleave 16 (Q4_0-like blocks): value
 * i is the low nibble of byte i, value i + 16 its high nibble; interleave 8 (NVFP4): the same
 * within each half of 8 bytes. */
static inline void lut32(const int8_t * table, const uint8_t * b, int interleave, int8_t * out) {
    for (int part = 0; part < 16 / interleave; part++, b += interleave, out += 2 * interleave)
        for (int j = 0; j < interleave; j++) {
            out[j] = table[b[j] & 15];
            out[interleave + j] = table[b[j] >> 4];
        }
}

/* 32 bytes -> lo[l] = b[l] & 15, hi[l] = b[l] >> 4. */
static inline void split_nibbles32(const uint8_t * b, int8_t * lo, int8_t * hi) {
    for (int l = 0; l < 32; l++) {
        lo[l] = (int8_t)(b[l] & 15);
        hi[l] = (int8_t)(b[l] >> 4);
    }
}

/* The 32 bits of 4 little-endian bytes -> bits[j] = 16 * (bit j), the fifth bit of a level. */
static inline void expand_bits32(const uint8_t * b, int8_t * bits) {
    for (int j = 0; j < 32; j++) bits[j] = (int8_t)(((b[j / 8] >> (j % 8)) & 1) << 4);
}

/* ---- one block -> levels (layouts: nemoq/quant/formats/<format>.py) ---- */

static inline void decode_q8_0(const uint8_t * b, levels * L) {
    L->d[0] = get_f16_rebias(b);
    L->qp = (const int8_t *)(b + 2);
}

/* Q5_0: byte j of qs holds the low 4 bits of values j and j + 16; bit j of qh the fifth of value j. */
static inline void decode_q5_0(const uint8_t * b, levels * L) {
    int8_t high[32];
    L->d[0] = get_f16_rebias(b);
    expand_bits32(b + 2, high);
    lut32(Q4_LEVELS, b + 6, 16, L->q);
    for (int j = 0; j < 32; j++) L->q[j] = (int8_t)(L->q[j] + high[j] - 16);
}

static inline void decode_iq4_nl(const uint8_t * b, levels * L) {
    L->d[0] = get_f16_rebias(b);
    lut32(IQ4NL, b + 2, 16, L->q);
}

static inline void decode_mxfp4(const uint8_t * b, levels * L) {
    L->d[0] = e8m0_half(b[0]);
    lut32(E2M1_X2, b + 1, 16, L->q);
}

/* Group g's 8 bytes hold its values 0-7 (low nibbles) and 8-15 (high nibbles). */
static inline void decode_nvfp4(const uint8_t * b, levels * L) {
    for (int g = 0; g < 4; g++) L->d[g] = ue4m3_half(b[g]);  /* halved, for the doubled E2M1 table */
    lut32(E2M1_X2, b + 4, 8, L->q);
    lut32(E2M1_X2, b + 20, 8, L->q + 32);
}

/* Q4_K (qh NULL) and Q5_K: eight 6-bit scales and mins packed in 12 bytes; group g = 2c + h of
 * 32 values takes the low (h = 0) or high nibble of bytes 32c..32c+31, and for Q5_K bit g of
 * qh[l] as its fifth bit. */
static inline void decode_k_4_5(const uint8_t * b, const uint8_t * qh, const uint8_t * qs, levels * L) {
    const float d = get_f16_rebias(b), dmin = get_f16_rebias(b + 2);
    const uint8_t * s = b + 4;
    for (int g = 0; g < 8; g++) {
        const int sc = g < 4 ? s[g] & 63 : (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
        const int m = g < 4 ? s[g + 4] & 63 : (s[g + 4] >> 4) | (s[g] >> 6) << 4;
        L->d[g] = d * (float)sc;
        L->m[g] = dmin * (float)m;
    }
    for (int c = 0; c < 4; c++) {
        int8_t * lo = L->q + 64 * c, * hi = lo + 32;
        split_nibbles32(qs + 32 * c, lo, hi);
        if (qh)
            for (int l = 0; l < 32; l++) {
                lo[l] = (int8_t)(lo[l] | ((qh[l] >> (2 * c)) & 1) << 4);
                hi[l] = (int8_t)(hi[l] | ((qh[l] >> (2 * c + 1)) & 1) << 4);
            }
    }
}

static inline void decode_q4_k(const uint8_t * b, levels * L) { decode_k_4_5(b, NULL, b + 16, L); }
static inline void decode_q5_k(const uint8_t * b, levels * L) { decode_k_4_5(b, b + 16, b + 48, L); }

/* Q6_K: value 128h + 32k + l has its low nibble in ql[64h + 32(k % 2) + l] (high half of the
 * byte for k >= 2), its top two bits in qh[32h + l] at bit 2k, and scale sc[(128h + 32k + l) / 16]. */
static inline void decode_q6_k(const uint8_t * b, levels * L) {
    const uint8_t * ql = b, * qh = b + 128;
    const float d = get_f16_rebias(b + 208);
    for (int g = 0; g < 16; g++) L->d[g] = d * (float)(int8_t)b[192 + g];
    for (int h = 0; h < 2; h++) {
        int8_t * q = L->q + 128 * h;  /* low nibbles of k = 0, 1, 2, 3 at q + 32k */
        split_nibbles32(ql + 64 * h, q, q + 64);
        split_nibbles32(ql + 64 * h + 32, q + 32, q + 96);
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < 32; l++)
                q[32 * k + l] = (int8_t)((q[32 * k + l] | ((qh[32 * h + l] >> (2 * k)) & 3) << 4) - 32);
    }
}
#endif  /* !MOE_AVX2 */
#endif
