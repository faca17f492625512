/* Routed experts of a Nemotron-H MoE layer, read straight from the quantized GGUF stacks.
 *
 *     y_t = sum_j  w_j * down[e_j] @ relu(up[e_j] @ x_t)^2
 *
 * numpy reference: nemoq/quant/moe_reference.py; ctypes wrapper: nemoq/kernels_c/moe.py.
 * `up` holds E * I rows of H values and `down` E * H rows of I values, each in a ggml block
 * format named by its ggml type id. Nothing is dequantized beyond one block: a block is decoded
 * into its integer levels (int8) and float group scales on the stack, then dotted at once with
 * every token routed to that expert, so an expert's bytes are read once per call however many
 * tokens share it. float32 throughout: per group sum_j q_j x_j, then acc += d_g * that.
 *
 * Work comes as groups: one group per distinct expert, listing its slots (token, weight).
 * Two phases with a barrier between, the caller splitting rows across threads (ctypes drops
 * the GIL), so the C code stays single-threaded:
 *   nemoq_moe_up    rows [r0, r1) of I:  hidden[s, r] = relu(scale_e * up_e[r] . x[token(s)])^2
 *   nemoq_moe_down  rows [r0, r1) of H:  out[token(s), r] += w_s * scale_e * down_e[r] . hidden[s]
 * A thread owns its output rows, so results do not depend on the number of threads.
 *
 * Portable C11. Where the compiler targets AVX2 (with FMA and F16C) the row dot products come
 * from moe_avx2.h instead, which decodes each block straight into float registers, because
 * compilers do not vectorise the plain C well; -DNEMOQ_MOE_PORTABLE forces the plain C (what
 * other CPUs run; the tests build and check both). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moe_levels.h"   /* type ids, level tables, MOE_AVX2, plain-C block decoders */
#include "moe_phases.h"

#define MAX_VECS 4   /* vectors dotted with one decoded block at a time */

#if MOE_AVX2
#include "moe_avx2.h"   /* row_dot_<format>: blocks decoded in float registers */
#else  /* the plain C: a block decoded to int8 levels on the stack, then dotted */

#define LANES 16     /* partial sums per dot product: two AVX2 / four NEON registers */

/* ---- dot products of decoded blocks with float vectors ---- */

/* acc[l] += d * sum_i q[16 i + l] x[16 i + l] for one group of 16 * n16 values, and with
 * mins acc[l] -= m * sum_i x[16 i + l]. */
static inline void dot_group(const int8_t * restrict q, const float * restrict x, int n16, float d,
                             int has_min, float m, float * restrict acc) {
    float t[LANES] = {0}, s[LANES] = {0};
    for (int i = 0; i < n16; i++)
        for (int l = 0; l < LANES; l++) t[l] += (float)q[16 * i + l] * x[16 * i + l];
    if (has_min)
        for (int i = 0; i < n16; i++)
            for (int l = 0; l < LANES; l++) s[l] += x[16 * i + l];
    for (int l = 0; l < LANES; l++) acc[l] += d * t[l] - m * s[l];
}

static inline void dot_levels(const levels * restrict L, int qk, int group, int has_min, const float * restrict x,
                              float * restrict acc) {
    for (int g = 0; g < qk / group; g++)
        dot_group(L->qp + g * group, x + g * group, group / 16, L->d[g], has_min,
                  has_min ? L->m[g] : 0.0f, acc);
}

static inline float sum_lanes(float * acc) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* out[v] = row . xs[v] for nvec <= MAX_VECS vectors of n values; each block is decoded once.
 * One vector (a lone token per expert, the common case) gets its own loop so that the partial
 * sums can stay in registers. */
#define DEFINE_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN)                                        \
    static void row_dot_##NAME(const uint8_t * restrict row, int64_t n, const float * const * xs, \
                               const float * const * sums, int nvec, float * out) {           \
        (void)sums;  /* the mins' sums of x are summed with the dot here */                    \
        levels L;                                                                              \
        L.qp = L.q;                                                                            \
        const int64_t nb = n / QK;                                                            \
        if (nvec == 1) {                                                                       \
            float acc[LANES] = {0};                                                            \
            for (int64_t b = 0; b < nb; b++) {                                                \
                decode_##NAME(row + b * BYTES, &L);                                            \
                dot_levels(&L, QK, GROUP, HAS_MIN, xs[0] + b * QK, acc);             \
            }                                                                                  \
            out[0] = sum_lanes(acc);                                                           \
            return;                                                                            \
        }                                                                                      \
        float acc[MAX_VECS][LANES] = {{0}};                                                    \
        for (int64_t b = 0; b < nb; b++) {                                                    \
            decode_##NAME(row + b * BYTES, &L);                                                \
            for (int v = 0; v < nvec; v++)                                                     \
                dot_levels(&L, QK, GROUP, HAS_MIN, xs[v] + b * QK, acc[v]);          \
        }                                                                                      \
        for (int v = 0; v < nvec; v++) out[v] = sum_lanes(acc[v]);                            \
    }

#endif

#define ROW_DOT(NAME, TYPE, QK, BYTES, GROUP, HAS_MIN) DEFINE_ROW_DOT(NAME, QK, BYTES, GROUP, HAS_MIN)
MOE_FORMATS(ROW_DOT)

/* (row, n, vectors, their sums of each 32 values (formats with mins) or NULL, nvec, out) */
typedef void (*row_dot_fn)(const uint8_t *, int64_t, const float * const *, const float * const *, int, float *);

typedef struct {
    int type;
    int block;
    int bytes;
    int has_min;
    row_dot_fn dot;
} format_info;

#define FORMAT_INFO(NAME, TYPE, QK, BYTES, GROUP, HAS_MIN) {TYPE, QK, BYTES, HAS_MIN, row_dot_##NAME},
static const format_info FORMATS[] = {MOE_FORMATS(FORMAT_INFO)};

static const format_info * find_format(int type, int64_t n) {
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].type == type) return n % FORMATS[i].block ? NULL : &FORMATS[i];
    return NULL;
}

/* 1 if this library can read `type` (a ggml type id), else 0. */
int nemoq_moe_supports(int type) { return find_format(type, 0) != NULL; }

/* 1 if the row dots of this build are the AVX2 ones (moe_avx2.h, moe_q8_avx2.h), 0 for plain C. */
int nemoq_moe_avx2(void) { return MOE_AVX2; }

/* For a format with mins: sums[s * (n / 32) + g] = the sum of values 32g .. 32g + 31 of slot s's
 * vector (at base + row_of[s] * n, or base + s * n where row_of is NULL), and 1; 0 for a format
 * without mins (sums untouched), -1 for one this library does not read. */
int moe_slot_sums(int type, const float * base, int64_t n, int64_t n_slots, const int32_t * row_of, float * sums) {
    const format_info * f = find_format(type, 0);
    if (!f) return -1;
    if (!f->has_min) return 0;
    for (int64_t s = 0; s < n_slots; s++) {
        const float * x = base + (row_of ? row_of[s] : s) * n;
        for (int64_t g = 0; g < n / 32; g++) {
            float t = 0.0f;
            for (int l = 0; l < 32; l++) t += x[32 * g + l];
            sums[s * (n / 32) + g] = t;
        }
    }
    return 1;
}

/* moe_slot_sums into a malloc'ed array for a format with mins; NULL otherwise, and *failed = 1
 * when the allocation fails. */
static float * slot_sums(const format_info * f, const float * base, int64_t n, int64_t n_slots,
                         const int32_t * row_of, int * failed) {
    *failed = 0;
    if (!f->has_min) return NULL;
    float * sums = malloc(sizeof(float) * (size_t)(n_slots * (n / 32)) + 1);
    if (!sums) {
        *failed = 1;
        return NULL;
    }
    moe_slot_sums(f->type, base, n, n_slots, row_of, sums);
    return sums;
}

/* The group sums of slot s, or NULL. */
static inline const float * sums_of(const float * sums, int64_t s, int64_t n) { return sums ? sums + s * (n / 32) : NULL; }

/* ---- the two phases ----
 * groups: n_groups distinct experts group_expert[g] with slots group_start[g] .. group_start[g+1]-1;
 * slot s belongs to token slot_token[s] with router weight slot_weight[s]. expert_scale: (E,) or NULL.
 * Return 0, or -1 for a format this library does not read (or one whose block does not divide n),
 * -2 when scratch memory cannot be allocated. */

int nemoq_moe_up(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const float * x,
                 int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                 const int32_t * slot_token, const float * expert_scale,
                 float * h, int64_t r0, int64_t r1) {
    const format_info * f = find_format(type, hidden);
    if (!f) return -1;
    int failed;
    float * sums = slot_sums(f, x, hidden, group_start[n_groups], slot_token, &failed);
    if (failed) return -2;
    moe_up_rows(up, type, n_ff, hidden, x, n_groups, group_expert, group_start, slot_token, expert_scale, sums, h,
                r0, r1);
    free(sums);
    return 0;
}

/* nemoq_moe_up with the sums of x given (moe_slot_sums over the slots' tokens; NULL for a
 * format without mins). */
int moe_up_rows(const uint8_t * up, int type, int64_t n_ff, int64_t hidden, const float * x, int64_t n_groups,
                const int32_t * group_expert, const int64_t * group_start, const int32_t * slot_token,
                const float * expert_scale, const float * sums, float * h, int64_t r0, int64_t r1) {
    const format_info * f = find_format(type, hidden);
    if (!f) return -1;
    const int64_t row_bytes = hidden / f->block * f->bytes;
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t e = group_expert[g];
        const float scale = expert_scale ? expert_scale[e] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {  /* rows outer: a row is read from memory once */
            const uint8_t * row = up + (e * n_ff + r) * row_bytes;
            prefetch_row_after_next(row, r, r1, row_bytes);
            for (int64_t s0 = group_start[g]; s0 < group_start[g + 1]; s0 += MAX_VECS) {
                const int nvec = (int)(group_start[g + 1] - s0 < MAX_VECS ? group_start[g + 1] - s0 : MAX_VECS);
                const float * xs[MAX_VECS], * xsums[MAX_VECS];
                float dots[MAX_VECS];
                for (int v = 0; v < nvec; v++) {
                    xs[v] = x + (int64_t)slot_token[s0 + v] * hidden;
                    xsums[v] = sums_of(sums, s0 + v, hidden);
                }
                f->dot(row, hidden, xs, xsums, nvec, dots);
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
    int failed;
    float * sums = slot_sums(f, h, n_ff, group_start[n_groups], NULL, &failed);
    if (failed) return -2;
    moe_down_rows(down, type, hidden, n_ff, h, n_groups, group_expert, group_start, slot_token, slot_weight,
                  expert_scale, sums, out, r0, r1);
    free(sums);
    return 0;
}

/* nemoq_moe_down with the sums of h given (moe_slot_sums over the slots; NULL for a format
 * without mins). */
int moe_down_rows(const uint8_t * down, int type, int64_t hidden, int64_t n_ff, const float * h, int64_t n_groups,
                  const int32_t * group_expert, const int64_t * group_start, const int32_t * slot_token,
                  const float * slot_weight, const float * expert_scale, const float * sums, float * out,
                  int64_t r0, int64_t r1) {
    const format_info * f = find_format(type, n_ff);
    if (!f) return -1;
    const int64_t row_bytes = n_ff / f->block * f->bytes;
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t e = group_expert[g];
        const float scale = expert_scale ? expert_scale[e] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t * row = down + (e * hidden + r) * row_bytes;
            prefetch_row_after_next(row, r, r1, row_bytes);
            for (int64_t s0 = group_start[g]; s0 < group_start[g + 1]; s0 += MAX_VECS) {
                const int nvec = (int)(group_start[g + 1] - s0 < MAX_VECS ? group_start[g + 1] - s0 : MAX_VECS);
                const float * hs[MAX_VECS], * hsums[MAX_VECS];
                float dots[MAX_VECS];
                for (int v = 0; v < nvec; v++) {
                    hs[v] = h + (s0 + v) * n_ff;
                    hsums[v] = sums_of(sums, s0 + v, n_ff);
                }
                f->dot(row, n_ff, hs, hsums, nvec, dots);
                for (int v = 0; v < nvec; v++)
                    out[(int64_t)slot_token[s0 + v] * hidden + r] += slot_weight[s0 + v] * (dots[v] * scale);
            }
        }
    }
    return 0;
}
