/* moe.c's routed experts with the activations quantized to Q8_0, as llama.cpp's CPU backend
 * computes a quantized matmul:
 *
 *     y_t = sum_j  w_j * down[e_j] @ Q8_0(relu(up[e_j] @ Q8_0(x_t))^2)
 *
 * numpy reference: nemoq/quant/moe_reference.py (activations="q8_0"); ctypes wrapper:
 * nemoq/kernels_c/moe.py. Each vector (a token's x for the up phase, a slot's hidden vector for
 * the down phase) is quantized once per call by nemoq_q8_quantize, which is ggml's
 * quantize_row_q8_0_ref: per 32 values d = max|x| / 127, q = roundf(x / d), d rounded to f16 (the
 * value used as the scale). A row dot is then, per group of 32 (or 16) values, an integer dot
 * product of the weight levels with q, exact in int32, times one float scale:
 *     acc += (d_w_group * d_x_block) * sum_j level_j q_j
 * and for Q4_K / Q5_K the mins:  acc -= m_group * (d_x_block * sum of q in the block), the last
 * factor precomputed per block (ds). Only float rounding of the scales and of the running sum
 * separates the result from the float64 oracle on the same quantized values.
 *
 * Phases, threads and groups as in moe.c: the caller quantizes x, runs nemoq_moe_q8_up on row
 * ranges, quantizes the hidden vectors, runs nemoq_moe_q8_down on row ranges. The AVX2 row dots
 * (ggml's maddubs / madd) are in moe_q8_avx2.h; -DNEMOQ_MOE_PORTABLE forces the plain C below,
 * which gives the same integer sums, so the two builds differ only in float rounding. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moe_levels.h"   /* type ids, level tables, MOE_AVX2, plain-C block decoders */
#include "moe_phases.h"

#define Q8_MAX_VECS 4   /* vectors dotted with one decoded block at a time */

/* One quantized vector of n values: q[n] int8, d[n / 32] the f16-rounded block scales as floats,
 * ds[n / 32] = d * (sum of the block's q), for the k-quant mins and offset levels (Q5_0, MXFP4),
 * s16[n / 16] = the sum of each 16 q, for NVFP4's offset levels (16-value groups). */
typedef struct {
    const int8_t * q;
    const float * d;
    const float * ds;
    const float * s16;
} q8_vec;

#if MOE_AVX2
#include "moe_q8_avx2.h"   /* q8_row_dot_<format>: maddubs / madd on 32 levels at a time */
#else
#define Q8_HALF(type) 0   /* the plain C reads every format's activations in order */
#endif

/* ggml's nearest_int: round half to even for |v| < 2^22, by the 1.5 * 2^23 trick. */
static inline int nearest_int(float v) {
    const float shifted = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &shifted, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* Values per activation block for weights in `type`: ggml's CPU backend pairs the k-quants with
 * Q8_K (256 values, a float32 scale), every other format here with Q8_0 (32, an f16 scale). */
int nemoq_q8_block_values(int type) { return type == FMT_Q4_K || type == FMT_Q5_K || type == FMT_Q6_K ? 256 : 32; }

/* One Q8_0 block, bit for bit ggml's quantize_row_q8_0_ref; its scale as a float. */
static float q8_0_block(const float * x, int8_t * q) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;   /* fmaxf: a libm call on x86 */
    const float scale = amax / 127.0f, inv = scale ? 1.0f / scale : 0.0f;
    for (int j = 0; j < 32; j++) q[j] = (int8_t)round_half_away(x[j] * inv);
    return fp16_to_fp32(fp32_to_fp16(scale));
}

/* One Q8_K block of 256, bit for bit ggml's quantize_row_q8_K_ref (what its x86 backend runs):
 * the signed value of largest magnitude (the first) maps to -127; its scale. */
static float q8_k_block(const float * x, int8_t * q) {
    float max = 0.0f, amax = 0.0f;
    for (int j = 0; j < 256; j++)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    if (!amax) {
        memset(q, 0, 256);
        return 0.0f;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < 256; j++) {
        const int v = nearest_int(iscale * x[j]);
        q[j] = (int8_t)(v < 127 ? v : 127);
    }
    return 1.0f / iscale;
}

/* The fewest consecutive values of vectors of n that nemoq_q8_quantize may be given at a time
 * (threads split the work in these): an activation block, 64 values where the row dot reads whole
 * 64-value chunks in its own order (Q8_HALF), or whole vectors where a 32-value block is left over. */
int64_t nemoq_q8_unit(int type, int64_t n) {
    if (!Q8_HALF(type)) return nemoq_q8_block_values(type);
    return n % 64 ? n : 64;
}

/* Each whole 64-value chunk of each row reordered as Q8_HALF (moe_q8_fp4_avx2.h) describes: the first
 * h values of every 2h-value group, then the last h of every group (pieces of h bytes moved). */
static void halves_first(int8_t * q, int64_t rows, int64_t n, int h) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c + 64 <= n; c += 64) {
            int8_t chunk[64], * at = q + r * n + c;
            memcpy(chunk, at, 64);
            for (int piece = 0; piece < 64 / h; piece++)   /* group piece / 2, its half piece % 2 */
                memcpy(at + 32 * (piece % 2) + h * (piece / 2), chunk + h * piece, (size_t)h);
        }
}

/* rows vectors of n values -> the activations ggml's CPU backend multiplies weights in `type`
 * with (n a multiple of nemoq_q8_block_values(type)): Q8_0, or Q8_K for the k-quants, their
 * levels in q and, per 32 values, the block's scale in d (a Q8_K scale repeated over its eight
 * 32-value parts) and d * (sum of the 32 levels) in ds; s16 the sums of each 16 levels. Where
 * this build's row dot for `type` reads the levels in another order (Q8_HALF: the AVX2 MXFP4 and
 * NVFP4 dots), q is stored in it; d, ds and s16 stay in value order. */
void nemoq_q8_quantize(const float * x, int64_t rows, int64_t n, int type, int8_t * q, float * d, float * ds,
                       float * s16) {
    const int per_block = nemoq_q8_block_values(type);
    for (int64_t k = 0; k < rows * (n / per_block); k++) {
        int8_t * qk = q + per_block * k;
        const float scale = per_block == 256 ? q8_k_block(x + 256 * k, qk) : q8_0_block(x + 32 * k, qk);
        for (int64_t b = per_block / 32 * k; b < per_block / 32 * (k + 1); b++) {
            int32_t sum[2] = {0, 0};
            for (int j = 0; j < 32; j++) sum[j / 16] += q[32 * b + j];
            d[b] = scale;
            ds[b] = scale * (float)(sum[0] + sum[1]);   /* Q8_0: exact (11 + 12 significant bits) */
            s16[2 * b] = (float)sum[0];
            s16[2 * b + 1] = (float)sum[1];
        }
    }
    const int h = Q8_HALF(type);
    if (h) halves_first(q, rows, n, h);
}

#if !MOE_AVX2

static inline int32_t int_dot(const int8_t * restrict w, const int8_t * restrict x, int n) {
    int32_t s = 0;
    for (int j = 0; j < n; j++) s += (int32_t)w[j] * x[j];
    return s;
}

/* One decoded block (values off .. off + qk - 1 of the row) . x. */
static inline float block_dot(const levels * restrict L, int qk, int group, int has_min, const q8_vec * x,
                              int64_t off) {
    float acc = 0.0f;
    for (int g = 0; g < qk / group; g++)
        acc += (L->d[g] * x->d[(off + g * group) / 32]) * (float)int_dot(L->qp + g * group, x->q + off + g * group, group);
    if (has_min)
        for (int g = 0; g < qk / 32; g++) acc -= L->m[g] * x->ds[off / 32 + g];
    return acc;
}

#define DEFINE_Q8_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN)                                               \
    static void q8_row_dot_##NAME(const uint8_t * restrict row, int64_t n, const q8_vec * xs, int nvec, \
                                  float * out) {                                                        \
        levels L;                                                                                       \
        L.qp = L.q;                                                                                     \
        float acc[Q8_MAX_VECS] = {0};                                                                   \
        for (int64_t b = 0; b < n / QK; b++) {                                                          \
            decode_##NAME(row + b * BYTES, &L);                                                         \
            for (int v = 0; v < nvec; v++) acc[v] += block_dot(&L, QK, GROUP, HAS_MIN, &xs[v], b * QK); \
        }                                                                                               \
        for (int v = 0; v < nvec; v++) out[v] = acc[v];                                                 \
    }

#endif

#define Q8_ROW_DOT(NAME, TYPE, QK, BYTES, GROUP, HAS_MIN) DEFINE_Q8_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN)
MOE_FORMATS(Q8_ROW_DOT)

typedef void (*q8_row_dot_fn)(const uint8_t *, int64_t, const q8_vec *, int, float *);

typedef struct {
    int type;
    int block;
    int bytes;
    q8_row_dot_fn dot;
} q8_format;

#define Q8_FORMAT(NAME, TYPE, QK, BYTES, GROUP, HAS_MIN) {TYPE, QK, BYTES, q8_row_dot_##NAME},
static const q8_format Q8_FORMATS[] = {MOE_FORMATS(Q8_FORMAT)};

static const q8_format * find_q8_format(int type, int64_t n) {
    if (n % 32) return NULL;   /* the activations' blocks */
    for (size_t i = 0; i < sizeof Q8_FORMATS / sizeof Q8_FORMATS[0]; i++)
        if (Q8_FORMATS[i].type == type) return n % Q8_FORMATS[i].block ? NULL : &Q8_FORMATS[i];
    return NULL;
}

static inline q8_vec vec_at(const int8_t * q, const float * d, const float * ds, const float * s16, int64_t i,
                            int64_t n) {
    return (q8_vec){q + i * n, d + i * (n / 32), ds + i * (n / 32), s16 + i * (n / 16)};
}

/* For every group g (expert group_expert[g], slots group_start[g] .. group_start[g+1]-1) and rows
 * [r0, r1) of its matrix in `stack` (rows of n values): dots[s * stride + r] = row r . vector
 * vec_of[s] (or s where vec_of is NULL) times the expert's scale. A row is read once per call. */
static int rows_dot(const uint8_t * stack, int type, int64_t rows, int64_t n, const int8_t * q, const float * d,
                    const float * ds, const float * s16, int64_t n_groups, const int32_t * group_expert,
                    const int64_t * group_start, const int32_t * vec_of, const float * expert_scale, int64_t r0, int64_t r1,
                    float * dots, int64_t stride) {
    const q8_format * f = find_q8_format(type, n);
    if (!f) return -1;
    const int64_t row_bytes = n / f->block * f->bytes;
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t e = group_expert[g];
        const float scale = expert_scale ? expert_scale[e] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t * row = stack + (e * rows + r) * row_bytes;
            prefetch_row_after_next(row, r, r1, row_bytes);
            for (int64_t s0 = group_start[g]; s0 < group_start[g + 1]; s0 += Q8_MAX_VECS) {
                const int64_t left = group_start[g + 1] - s0;
                const int nvec = (int)(left < Q8_MAX_VECS ? left : Q8_MAX_VECS);
                q8_vec xs[Q8_MAX_VECS];
                float out[Q8_MAX_VECS];
                for (int v = 0; v < nvec; v++) xs[v] = vec_at(q, d, ds, s16, vec_of ? vec_of[s0 + v] : s0 + v, n);
                f->dot(row, n, xs, nvec, out);
                for (int v = 0; v < nvec; v++) dots[(s0 + v) * stride + r] = out[v] * scale;
            }
        }
    }
    return 0;
}

/* ---- the two phases (arguments as moe.c's, x and h given as their Q8_0 quantization) ----
 * Return 0, or -1 for a format this library does not read or a width it does not divide. */

/* rows [r0, r1) of I:  h[s, r] = relu(scale_e * up_e[r] . xq[token(s)])^2 */
int nemoq_moe_q8_up(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const int8_t * xq,
                    const float * xd, const float * xds, const float * xs16, int64_t n_groups, const int32_t * group_expert,
                    const int64_t * group_start, const int32_t * slot_token, const float * expert_scale,
                    float * h, int64_t r0, int64_t r1) {
    const int rc = rows_dot(up, type, n_ff, hidden, xq, xd, xds, xs16, n_groups, group_expert, group_start, slot_token,
                            expert_scale, r0, r1, h, n_ff);
    if (rc) return rc;
    for (int64_t s = 0; s < group_start[n_groups]; s++)
        for (int64_t r = r0; r < r1; r++) {
            const float a = h[s * n_ff + r];
            h[s * n_ff + r] = a > 0.0f ? a * a : 0.0f;
        }
    return 0;
}

/* rows [r0, r1) of H:  out[token(s), r] += w_s * (scale_e * down_e[r] . hq[s]); dots: scratch of
 * (slots, hidden) floats, of which this call uses its rows. */
int nemoq_moe_q8_down(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const int8_t * hq,
                      const float * hd, const float * hds, const float * hs16, int64_t n_groups, const int32_t * group_expert,
                      const int64_t * group_start, const int32_t * slot_token, const float * slot_weight,
                      const float * expert_scale, float * dots, float * out, int64_t r0, int64_t r1) {
    const int rc = rows_dot(down, type, hidden, n_ff, hq, hd, hds, hs16, n_groups, group_expert, group_start, NULL,
                            expert_scale, r0, r1, dots, hidden);
    if (rc) return rc;
    for (int64_t s = 0; s < group_start[n_groups]; s++)   /* slots in expert order, as moe.c adds them */
        for (int64_t r = r0; r < r1; r++)
            out[(int64_t)slot_token[s] * hidden + r] += slot_weight[s] * dots[s * hidden + r];
    return 0;
}
