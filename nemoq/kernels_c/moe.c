/* The routed experts of a Nemotron-H MoE layer, read straight from the quantized GGUF stacks:
 * the reference a runtime port can check its own kernel against. No nemoq command runs it
 * (llama.cpp does the inference); it is kept plain so that it is easy to trust.
 *
 *     y_t = sum_j  w_j * down_scale[e_j] * down[e_j] @ relu(up_scale[e_j] * up[e_j] @ x_t)^2
 *
 * numpy reference: nemoq/quant/moe_reference.py; CUDA twin: moe.cu; ctypes wrapper: moe.py.
 * `up` holds E * I rows of H values and `down` E * H rows of I values, each row a whole number
 * of blocks of one ggml format, named by its ggml type id. A row dot dequantizes one block at a
 * time with the format's own dequantizer (quants_*.c, numpy's values bit for bit), multiplies it
 * with the vector and adds the products in value order into one float32 sum. moe.cu does the
 * same float32 operations in the same order, so the two agree bit for bit. */
#include <stdint.h>
#include <stdlib.h>

/* X(name, ggml type id, values per block, bytes per block): every format with a C dequantizer */
#define MOE_FORMATS(X)         \
    X(q8_0, 8, 32, 34)         \
    X(q5_1, 7, 32, 24)         \
    X(q5_0, 6, 32, 22)         \
    X(q4_0, 2, 32, 18)         \
    X(iq4_nl, 20, 32, 18)      \
    X(q4_k, 12, 256, 144)      \
    X(q5_k, 13, 256, 176)      \
    X(q6_k, 14, 256, 210)      \
    X(mxfp4, 39, 32, 17)       \
    X(nvfp4, 40, 64, 36)

#define MAX_BLOCK 256

/* rows of blocks -> float32, defined in quants_*.c */
typedef void (*dequantize_fn)(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row);
#define DECLARE(NAME, TYPE, BLOCK, BYTES) void nemoq_dequantize_##NAME(const uint8_t *, float *, int64_t, int64_t);
MOE_FORMATS(DECLARE)

typedef struct {
    int type, block, bytes;
    dequantize_fn dequantize;
} format;

#define ROW(NAME, TYPE, BLOCK, BYTES) {TYPE, BLOCK, BYTES, nemoq_dequantize_##NAME},
static const format FORMATS[] = {MOE_FORMATS(ROW)};

static const format * find_format(int type) {
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].type == type) return &FORMATS[i];
    return NULL;
}

/* 1 if the kernel reads `type` (a ggml type id), else 0. */
int nemoq_moe_supports(int type) { return find_format(type) != NULL; }

/* row . x for a row of n values in format f */
static float row_dot(const format * f, const uint8_t * row, const float * x, int64_t n) {
    float v[MAX_BLOCK];
    float acc = 0.0f;
    for (int64_t b = 0; b < n / f->block; b++) {
        f->dequantize(row + b * f->bytes, v, 1, f->block);
        for (int j = 0; j < f->block; j++) acc += v[j] * x[b * f->block + j];
    }
    return acc;
}

/* out (T, H) = the routed experts of x (T, H). expert_ids and expert_weights: (T, k), row-major;
 * up_scale, down_scale: (E,) or NULL for ones. A slot whose weight is 0 adds nothing, and its
 * expert is not read. Returns 0; -1 for a format it does not read or a width its block does not
 * divide, -2 when the hidden vector cannot be allocated, -3 for an expert id out of range. */
int nemoq_moe_reference(const uint8_t * up, int up_type, const uint8_t * down, int down_type,
                        int64_t n_experts, int64_t n_ff, int64_t hidden, const float * x, int64_t n_tokens,
                        int64_t top_k, const int32_t * expert_ids, const float * expert_weights,
                        const float * up_scale, const float * down_scale, float * out) {
    const format * fu = find_format(up_type), * fd = find_format(down_type);
    if (!fu || !fd || hidden % fu->block || n_ff % fd->block) return -1;
    for (int64_t i = 0; i < n_tokens * top_k; i++)
        if (expert_ids[i] < 0 || expert_ids[i] >= n_experts) return -3;
    float * h = malloc(sizeof(float) * (size_t)n_ff + 1);
    if (!h) return -2;
    const int64_t up_row = hidden / fu->block * fu->bytes, down_row = n_ff / fd->block * fd->bytes;
    for (int64_t t = 0; t < n_tokens; t++) {
        const float * xt = x + t * hidden;
        float * yt = out + t * hidden;
        for (int64_t r = 0; r < hidden; r++) yt[r] = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            const float w = expert_weights[t * top_k + j];
            if (w == 0.0f) continue;
            const int64_t e = expert_ids[t * top_k + j];
            const float su = up_scale ? up_scale[e] : 1.0f, sd = down_scale ? down_scale[e] : 1.0f;
            for (int64_t r = 0; r < n_ff; r++) {  /* Nemotron-H's experts: squared ReLU, no gate */
                const float a = row_dot(fu, up + (e * n_ff + r) * up_row, xt, hidden) * su;
                h[r] = a > 0.0f ? a * a : 0.0f;
            }
            for (int64_t r = 0; r < hidden; r++)
                yt[r] += w * (row_dot(fd, down + (e * hidden + r) * down_row, h, n_ff) * sd);
        }
    }
    free(h);
    return 0;
}
