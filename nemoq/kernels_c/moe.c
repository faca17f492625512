/* Routed experts of a Nemotron-H MoE layer, read straight from the quantized GGUF stacks.
 *
 *     y_t = sum_j  w_j * down[e_j] @ relu(up[e_j] @ x_t)^2
 *
 * numpy reference: nemoq/quant/moe_reference.py; ctypes wrapper: nemoq/kernels_c/moe.py.
 * `up` holds E * I rows of H values and `down` E * H rows of I values, each in a ggml block
 * format named by its ggml type id. Nothing is dequantized beyond one block: each block is
 * decoded into a small buffer on the stack and dotted at once with every token routed to that
 * expert, so an expert's bytes are read once per call however many tokens share it. float32
 * throughout; sums keep LANES partial sums (vectorisable without -ffast-math) added pairwise.
 *
 * Work comes as groups: one group per distinct expert, listing its slots (token, weight).
 * Two phases with a barrier between, the caller splitting rows across threads (ctypes drops
 * the GIL), so the C code stays single-threaded:
 *   nemoq_moe_up    rows [r0, r1) of I:  hidden[s, r] = relu(scale_e * up_e[r] . x[token(s)])^2
 *   nemoq_moe_down  rows [r0, r1) of H:  out[token(s), r] += w_s * scale_e * down_e[r] . hidden[s]
 * A thread owns its output rows, so results do not depend on the number of threads. */
#include <stdint.h>
#include <string.h>

enum {  /* ggml type ids (gguf-py GGMLQuantizationType) */
    FMT_Q5_0 = 6, FMT_Q8_0 = 8, FMT_Q4_K = 12, FMT_Q5_K = 13, FMT_Q6_K = 14,
    FMT_IQ4_NL = 20, FMT_MXFP4 = 39, FMT_NVFP4 = 40,
};

#define LANES 16     /* partial sums per dot product: two AVX2 / four NEON registers */
#define MAX_VECS 4   /* vectors dotted with one decoded block at a time */
#define MAX_BLOCK 256

/* ---- scalars stored in the blocks ---- */

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half: shift into a float's exponent and mantissa, then 2^112 rebiases normals and
 * subnormals alike (exactly); inf and nan keep an all-ones exponent. */
static inline float half_to_float(const uint8_t * p) {
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
    float f = bits_to_float(em << 13) * 0x1p112f;
    if (em >= 0x7c00u) f = bits_to_float(0x7f800000u | em << 13);
    return sign ? -f : f;
}

/* Half the E8M0 scale, 2^(e - 128), as ggml_e8m0_to_fp32_half (denormal for e < 2). */
static inline float e8m0_half(uint8_t e) {
    return bits_to_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

/* UE4M3 as nemoq/quant/formats/nvfp4.py decodes it: 4 exponent bits (bias 7), 3 mantissa
 * bits; codes 0 and 0x7F are zero. */
static inline float ue4m3(uint8_t code) {
    const uint32_t exp = (code >> 3) & 0xfu, man = code & 7u;
    if (code == 0 || code == 0x7f) return 0.0f;
    return exp == 0 ? (float)man * 0x1p-9f : bits_to_float((exp + 120u) << 23 | man << 20);
}

/* E2M1 doubled to integers, as ggml's kvalues_mxfp4; IQ4_NL's non-linear table. */
static const float E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static const float IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---- one block -> float values (layouts: nemoq/quant/formats/<format>.py) ---- */

static inline void decode_q8_0(const uint8_t * b, float * y) {
    const float d = half_to_float(b);
    for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)b[2 + j];
}

static inline void decode_q5_0(const uint8_t * b, float * y) {
    const float d = half_to_float(b);
    const uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
    for (int j = 0; j < 16; j++) {
        const int lo = (b[6 + j] & 15) | (int)((qh >> j) & 1) << 4;
        const int hi = (b[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void decode_iq4_nl(const uint8_t * b, float * y) {
    const float d = half_to_float(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * IQ4NL[b[2 + j] & 15];
        y[j + 16] = d * IQ4NL[b[2 + j] >> 4];
    }
}

static inline void decode_mxfp4(const uint8_t * b, float * y) {
    const float d = e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) {
        y[j] = d * E2M1_X2[b[1 + j] & 15];
        y[j + 16] = d * E2M1_X2[b[1 + j] >> 4];
    }
}

static inline void decode_nvfp4(const uint8_t * b, float * y) {
    for (int g = 0; g < 4; g++) {
        const float d = ue4m3(b[g]) * 0.5f;  /* halved for the doubled E2M1 table, as ggml */
        const uint8_t * qs = b + 4 + 8 * g;
        for (int j = 0; j < 8; j++) {
            y[16 * g + j] = d * E2M1_X2[qs[j] & 15];
            y[16 * g + j + 8] = d * E2M1_X2[qs[j] >> 4];
        }
    }
}

/* Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes. */
static inline void k_scales(const uint8_t * s, int g, int * sc, int * m) {
    if (g < 4) {
        *sc = s[g] & 63;
        *m = s[g + 4] & 63;
    } else {
        *sc = (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
        *m = (s[g + 4] >> 4) | (s[g] >> 6) << 4;
    }
}

/* Q4_K (qh NULL) and Q5_K: group g = 2c + h of 32 values takes the low (h = 0) or high nibble
 * of bytes 32c..32c+31, and for Q5_K bit g of qh[l] as its fifth bit. */
static inline void decode_k_4_5(const uint8_t * b, const uint8_t * qh, const uint8_t * qs, float * y) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    for (int g = 0; g < 8; g++) {
        int sc, m;
        k_scales(b + 4, g, &sc, &m);
        const float dd = d * (float)sc, dm = dmin * (float)m;
        const uint8_t * q = qs + 32 * (g / 2);
        const int shift = 4 * (g & 1);
        for (int l = 0; l < 32; l++) {
            const int hb = qh ? ((qh[l] >> g) & 1) << 4 : 0;
            y[32 * g + l] = dd * (float)(((q[l] >> shift) & 15) | hb) - dm;
        }
    }
}

static inline void decode_q4_k(const uint8_t * b, float * y) { decode_k_4_5(b, NULL, b + 16, y); }
static inline void decode_q5_k(const uint8_t * b, float * y) { decode_k_4_5(b, b + 16, b + 48, y); }

/* Q6_K: value 128h + 32k + l has its low nibble in ql[64h + 32(k % 2) + l] (high half of the
 * byte for k >= 2), its top two bits in qh[32h + l] at bit 2k, and group scale sc[(128h + 32k + l) / 16]. */
static inline void decode_q6_k(const uint8_t * b, float * y) {
    const uint8_t * ql = b, * qh = b + 128;
    const int8_t * sc = (const int8_t *)(b + 192);
    const float d = half_to_float(b + 208);
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 4; k++) {
            const uint8_t * lo = ql + 64 * h + 32 * (k % 2);
            const int shift = 4 * (k / 2);
            for (int half = 0; half < 2; half++) {
                const float dd = d * (float)sc[8 * h + 2 * k + half];
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    const int q = ((lo[l] >> shift) & 15) | ((qh[32 * h + l] >> (2 * k)) & 3) << 4;
                    y[128 * h + 32 * k + l] = dd * (float)(q - 32);
                }
            }
        }
    }
}

/* ---- dot products of quantized rows with float vectors ---- */

static inline void dot_block(const float * restrict w, const float * restrict x, int n, float * restrict acc) {
    for (int j = 0; j < n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += w[j + l] * x[j + l];
}

static inline float sum_lanes(float * acc) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* out[v] = row . xs[v] for nvec <= MAX_VECS vectors of n values; the row is decoded once.
 * One vector (a lone token per expert, the common case) gets its own loop so that the
 * partial sums stay in registers. */
#define DEFINE_ROW_DOT(NAME, QK, BYTES)                                                       \
    static void row_dot_##NAME(const uint8_t * restrict row, int64_t n,                       \
                               const float * const * xs, int nvec, float * out) {             \
        float buf[QK];                                                                         \
        const int64_t nb = n / QK;                                                            \
        if (nvec == 1) {                                                                       \
            float acc[LANES] = {0};                                                            \
            for (int64_t b = 0; b < nb; b++) {                                                \
                decode_##NAME(row + b * BYTES, buf);                                           \
                dot_block(buf, xs[0] + b * QK, QK, acc);                                       \
            }                                                                                  \
            out[0] = sum_lanes(acc);                                                           \
            return;                                                                            \
        }                                                                                      \
        float acc[MAX_VECS][LANES] = {{0}};                                                    \
        for (int64_t b = 0; b < nb; b++) {                                                    \
            decode_##NAME(row + b * BYTES, buf);                                               \
            for (int v = 0; v < nvec; v++) dot_block(buf, xs[v] + b * QK, QK, acc[v]);        \
        }                                                                                      \
        for (int v = 0; v < nvec; v++) out[v] = sum_lanes(acc[v]);                            \
    }

DEFINE_ROW_DOT(q8_0, 32, 34)
DEFINE_ROW_DOT(q5_0, 32, 22)
DEFINE_ROW_DOT(iq4_nl, 32, 18)
DEFINE_ROW_DOT(mxfp4, 32, 17)
DEFINE_ROW_DOT(nvfp4, 64, 36)
DEFINE_ROW_DOT(q4_k, 256, 144)
DEFINE_ROW_DOT(q5_k, 256, 176)
DEFINE_ROW_DOT(q6_k, 256, 210)

typedef void (*row_dot_fn)(const uint8_t *, int64_t, const float * const *, int, float *);

typedef struct {
    int type;
    int block;
    int bytes;
    row_dot_fn dot;
} format_info;

static const format_info FORMATS[] = {
    {FMT_Q8_0, 32, 34, row_dot_q8_0},     {FMT_Q5_0, 32, 22, row_dot_q5_0},
    {FMT_IQ4_NL, 32, 18, row_dot_iq4_nl}, {FMT_MXFP4, 32, 17, row_dot_mxfp4},
    {FMT_NVFP4, 64, 36, row_dot_nvfp4},   {FMT_Q4_K, 256, 144, row_dot_q4_k},
    {FMT_Q5_K, 256, 176, row_dot_q5_k},   {FMT_Q6_K, 256, 210, row_dot_q6_k},
};

static const format_info * find_format(int type, int64_t n) {
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].type == type) return n % FORMATS[i].block ? NULL : &FORMATS[i];
    return NULL;
}

/* 1 if this library can read `type` (a ggml type id), else 0. */
int nemoq_moe_supports(int type) { return find_format(type, 0) != NULL; }

/* ---- the two phases ----
 * groups: n_groups distinct experts group_expert[g] with slots group_start[g] .. group_start[g+1]-1;
 * slot s belongs to token slot_token[s] with router weight slot_weight[s]. expert_scale: (E,) or NULL.
 * Return 0, or -1 for a format this library does not read (or one whose block does not divide n). */

int nemoq_moe_up(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const float * x,
                 int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                 const int32_t * slot_token, const float * expert_scale,
                 float * h, int64_t r0, int64_t r1) {
    const format_info * f = find_format(type, hidden);
    if (!f) return -1;
    const int64_t row_bytes = hidden / f->block * f->bytes;
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t e = group_expert[g];
        const float scale = expert_scale ? expert_scale[e] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {  /* rows outer: a row is read from memory once */
            const uint8_t * row = up + (e * n_ff + r) * row_bytes;
            for (int64_t s0 = group_start[g]; s0 < group_start[g + 1]; s0 += MAX_VECS) {
                const int nvec = (int)(group_start[g + 1] - s0 < MAX_VECS ? group_start[g + 1] - s0 : MAX_VECS);
                const float * xs[MAX_VECS];
                float dots[MAX_VECS];
                for (int v = 0; v < nvec; v++) xs[v] = x + (int64_t)slot_token[s0 + v] * hidden;
                f->dot(row, hidden, xs, nvec, dots);
                for (int v = 0; v < nvec; v++) {
                    const float a = dots[v] * scale;
                    h[(s0 + v) * n_ff + r] = a > 0.0f ? a * a : 0.0f;
                }
            }
        }
    }
    return 0;
}

int nemoq_moe_down(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const float * h,
                   int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                   const int32_t * slot_token, const float * slot_weight, const float * expert_scale,
                   float * out, int64_t r0, int64_t r1) {
    const format_info * f = find_format(type, n_ff);
    if (!f) return -1;
    const int64_t row_bytes = n_ff / f->block * f->bytes;
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t e = group_expert[g];
        const float scale = expert_scale ? expert_scale[e] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t * row = down + (e * hidden + r) * row_bytes;
            for (int64_t s0 = group_start[g]; s0 < group_start[g + 1]; s0 += MAX_VECS) {
                const int nvec = (int)(group_start[g + 1] - s0 < MAX_VECS ? group_start[g + 1] - s0 : MAX_VECS);
                const float * hs[MAX_VECS];
                float dots[MAX_VECS];
                for (int v = 0; v < nvec; v++) hs[v] = h + (s0 + v) * n_ff;
                f->dot(row, n_ff, hs, nvec, dots);
                for (int v = 0; v < nvec; v++)
                    out[(int64_t)slot_token[s0 + v] * hidden + r] += slot_weight[s0 + v] * (dots[v] * scale);
            }
        }
    }
    return 0;
}
