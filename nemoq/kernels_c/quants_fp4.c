/* The E2M1 formats (mxfp4.py, nvfp4.py): MXFP4 and NVFP4, and their per-matrix scale search. */
#include <stdlib.h>

#include "lanes.h"

/* the E2M1 grid's midpoints in units of its step (0.25), and the 16 nibbles' values */
static const float MIDS_E2M1[7] = {1, 3, 5, 7, 10, 14, 20};
static const float KVALUES_FP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* mxfp4.E2M1_GRID (levels 0, 0.5, 1, 1.5, 2, 3, 4, 6) with ties_down: index = #mids < ceil(4 v). */
static inline vf e2m1_index(vf v) {
    const vf K = vceil(v * F(4.0f));
    vf c = F(0.0f);
    for (int k = 0; k < 7; k++) c += sel(F(MIDS_E2M1[k]) < K, F(1.0f), F(0.0f));
    return c;
}

/* E2M1[m] for an index m held as a float */
static inline vf e2m1_value(vf m) {
    const vf low = F(0.5f) * m;
    return sel(m <= F(4.0f), low, sel(m == F(5.0f), F(3.0f), sel(m == F(6.0f), F(4.0f), F(6.0f))));
}

/* ---------------------------------------------------------------------------------------------
 * E2M1 values (mxfp4.py), shared by MXFP4 and NVFP4
 * ------------------------------------------------------------------------------------------- */

/* best_e2m1_scale: per lane, the candidate scale (scales[k]) with the lowest weighted error after
 * rounding to the nearest magnitude (first on ties); returns the candidates' index per lane. */
static vi v_best_e2m1_scale(int n, int ns, const vf * x, const vf * w, const vf * scales) {
    vf best = F(0.0f);
    vi pick = I(0);
    for (int k = 0; k < ns; k++) {
        const vf inv = vdiv(F(1.0f), scales[k]);
        vf err = F(0.0f);
        for (int i = 0; i < n; i++) {
            const vf ax = vabs(x[i]);
            const vf diff = ax - scales[k] * e2m1_value(e2m1_index(ax * inv));
            err += (w[i] * diff) * diff;
        }
        const vi take = k == 0 ? I(-1) : err < best;
        best = sel(take, err, best);
        pick = (take & I(k)) | (~take & pick);
    }
    return pick;
}

/* e2m1_encode: the nearest nibble of x for `scale` (sign in bit 3, never for zero), checking
 * the neighbours by |v * scale - |x||, as numpy. */
static void v_e2m1_encode(int n, const vf * x, vf scale, vf * nib) {
    const vf inv = vdiv(F(1.0f), scale);
    for (int i = 0; i < n; i++) {
        const vf ax = vabs(x[i]);
        vf m = e2m1_index(ax * inv);
        const vf lower = vmax(m, F(1.0f)) - F(1.0f);
        m = sel(vabs(e2m1_value(lower) * scale - ax) <= vabs(e2m1_value(m) * scale - ax), lower, m);
        const vf upper = vmin(m + F(1.0f), F(7.0f));
        m = sel(vabs(e2m1_value(upper) * scale - ax) < vabs(e2m1_value(m) * scale - ax), upper, m);
        nib[i] = m + sel((x[i] < F(0.0f)) & (m > F(0.0f)), F(8.0f), F(0.0f));
    }
}

/* ---------------------------------------------------------------------------------------------
 * MXFP4 (mxfp4.py): 32 E2M1 values and an E8M0 exponent
 * ------------------------------------------------------------------------------------------- */

void nemoq_quantize_mxfp4(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                          const float * importance) {
    static const int steps[4] = {0, -2, -1, 1};   /* exponents tried, relative to ggml's */
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], nib[32], scales[4], scale;
            uint8_t exps[4][NL];
            load_blocks(xr, importance, b0, nb, 32, xt, wt);
            vf amax = vabs(xt[0]);
            for (int i = 1; i < 32; i++) amax = vmax(amax, vabs(xt[i]));
            for (int l = 0; l < NL; l++) {
                /* ggml_exponent: floor(log2(amax)) - 2 + 127, the floor exact from frexpf (not
                 * log2f, whose rounding near powers of two differs between C libraries) */
                int ex = 0;
                if (amax[l] > 0.0f) frexpf(amax[l], &ex);
                const float e = amax[l] > 0.0f ? (float)(ex - 1 - 2 + 127) : 0.0f;
                for (int k = 0; k < 4; k++) {
                    exps[k][l] = (uint8_t)(int)clipf(e + (float)steps[k], 0.0f, 254.0f);
                    scales[k][l] = 2.0f * e8m0_half(exps[k][l]);
                }
            }
            const vi pick = v_best_e2m1_scale(32, 4, xt, wt, scales);
            for (int l = 0; l < NL; l++) scale[l] = scales[pick[l]][l];
            v_e2m1_encode(32, xt, scale, nib);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                uint8_t * o = out + (r * nb + b0 + l) * 17;
                o[0] = exps[pick[l]][l];
                for (int j = 0; j < 16; j++) o[1 + j] = (uint8_t)((int)nib[j][l] | ((int)nib[j + 16][l] << 4));
            }
        }
    }
}

static void dequant_block_mxfp4(const uint8_t * b, float * y) {
    const float d = e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) {
        y[j] = d * KVALUES_FP4[b[1 + j] & 0x0F];
        y[j + 16] = d * KVALUES_FP4[b[1 + j] >> 4];
    }
}

DEQUANT_ROWS(mxfp4, 32, 17, dequant_block_mxfp4)

/* ---------------------------------------------------------------------------------------------
 * NVFP4 (nvfp4.py): 4 groups of 16 E2M1 values, each with a UE4M3 scale. The lanes are NL
 * consecutive groups of a row.
 * ------------------------------------------------------------------------------------------- */

void nemoq_quantize_nvfp4(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                          const float * importance) {
    static const int steps[10] = {0, -8, -7, -6, -5, -4, -3, -2, -1, 1};   /* codes tried, relative to ggml's */
    const int64_t ng = n_per_row / 16;   /* groups of 16 in a row, 4 to a block */
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t g0 = 0; g0 < ng; g0 += NL) {
            vf xt[16], wt[16], nib[16], scales[10], scale;
            int codes[10][NL];
            load_blocks(xr, importance, g0, ng, 16, xt, wt);
            vf amax = vabs(xt[0]);
            for (int i = 1; i < 16; i++) amax = vmax(amax, vabs(xt[i]));
            for (int l = 0; l < NL; l++) {
                const int ggml_code = fp32_to_ue4m3(amax[l] / 6.0f);
                for (int k = 0; k < 10; k++) {
                    int c = ggml_code;
                    if (k > 0) {
                        c += steps[k];
                        c = amax[l] > 0.0f ? (c < 1 ? 1 : (c > 0x7E ? 0x7E : c)) : 0;
                    }
                    codes[k][l] = c;
                    scales[k][l] = ue4m3((uint8_t)c);
                }
            }
            const vi pick = v_best_e2m1_scale(16, 10, xt, wt, scales);
            for (int l = 0; l < NL; l++) scale[l] = scales[pick[l]][l];
            v_e2m1_encode(16, xt, scale, nib);
            for (int l = 0; l < NL && g0 + l < ng; l++) {
                const int64_t g = g0 + l;
                uint8_t * o = out + (r * ng + g) / 4 * 36;
                o[g % 4] = (uint8_t)codes[pick[l]][l];
                for (int j = 0; j < 8; j++) {
                    o[4 + 8 * (g % 4) + j] = (uint8_t)((int)nib[j][l] | ((int)nib[j + 8][l] << 4));
                }
            }
        }
    }
}

static void dequant_block_nvfp4(const uint8_t * b, float * y) {
    for (int g = 0; g < 4; g++) {
        const float d = ue4m3_half(b[g]);
        for (int j = 0; j < 8; j++) {
            y[16 * g + j] = d * KVALUES_FP4[b[4 + 8 * g + j] & 0x0F];
            y[16 * g + j + 8] = d * KVALUES_FP4[b[4 + 8 * g + j] >> 4];
        }
    }
}

DEQUANT_ROWS(nvfp4, 64, 36, dequant_block_nvfp4)

/* ---------------------------------------------------------------------------------------------
 * The per-matrix scale search of nemoq/quant/tensor_scale.py's best_scale: for sample rows x and
 * candidate scales s_c, errors[r * n_scales + c] = sum_j w_j (deq(quant(x_rj / s_c)) s_c - x_rj)^2,
 * summed in double. numpy built (candidates x rows x n) arrays for this; here each row is divided,
 * quantized, dequantized and compared while in cache. w = importance, or ones.
 * ------------------------------------------------------------------------------------------- */

typedef void (*fp4_quantize_fn)(const float *, uint8_t *, int64_t, int64_t, const float *);
typedef void (*fp4_dequantize_fn)(const uint8_t *, float *, int64_t, int64_t);

static const struct {
    int type;   /* ggml type id */
    fp4_quantize_fn quantize;
    fp4_dequantize_fn dequantize;
    int block, bytes;
} SCALE_SEARCH_FORMATS[] = {
    {39, nemoq_quantize_mxfp4, nemoq_dequantize_mxfp4, 32, 17},
    {40, nemoq_quantize_nvfp4, nemoq_dequantize_nvfp4, 64, 36},
};

/* Returns 0, -1 for a type not listed above (or a width its block does not divide), -2 when
 * scratch memory cannot be allocated. */
int nemoq_scale_errors(int type, const float * x, int64_t nrows, int64_t n, const float * scales, int64_t n_scales,
                       const float * importance, double * errors) {
    int f = -1;
    for (int i = 0; i < (int)(sizeof SCALE_SEARCH_FORMATS / sizeof SCALE_SEARCH_FORMATS[0]); i++)
        if (SCALE_SEARCH_FORMATS[i].type == type) f = i;
    if (f < 0 || n % SCALE_SEARCH_FORMATS[f].block) return -1;
    float * scaled = malloc(sizeof(float) * 2 * (size_t)n);
    uint8_t * blocks = malloc((size_t)(n / SCALE_SEARCH_FORMATS[f].block * SCALE_SEARCH_FORMATS[f].bytes));
    if (!scaled || !blocks) {
        free(scaled);
        free(blocks);
        return -2;
    }
    float * values = scaled + n;
    for (int64_t r = 0; r < nrows; r++) {
        const float * row = x + r * n;
        for (int64_t c = 0; c < n_scales; c++) {
            for (int64_t j = 0; j < n; j++) scaled[j] = row[j] / scales[c];
            SCALE_SEARCH_FORMATS[f].quantize(scaled, blocks, 1, n, importance);
            SCALE_SEARCH_FORMATS[f].dequantize(blocks, values, 1, n);
            double err = 0.0;
            for (int64_t j = 0; j < n; j++) {
                const float diff = values[j] * scales[c] - row[j];   /* float32, as numpy */
                err += (double)diff * diff * (importance ? (double)importance[j] : 1.0);
            }
            errors[r * n_scales + c] = err;
        }
    }
    free(scaled);
    free(blocks);
    return 0;
}
