/* The 32-value block formats with a linear grid: Q8_0, Q4_0 and Q5_0 (q8_0.py, q4_0.py, q5_0.py). */
#include "qx_search.h"

/* nmax * search_factors of q4_0.py / q5_0.py: the float64 products as hex literals, rounded to
 * float32 (numpy's astype) by the declaration */
static const float TARGETS_Q4_0[12] = {
    0x1.b333333333333p+2, 0x1.e00b73de1d44dp+2, 0x1.08c15688bb8e3p+3, 0x1.24096258bcca8p+3,
    0x1.4221181b4c0f6p+3, 0x1.6352a0030b42bp+3, 0x1.87efc677a41e4p+3, 0x1.b052c5a912ae6p+3,
    0x1.dcdf23e8584a2p+3, 0x1.07015474c2245p+4, 0x1.221b3625bad22p+4, 0x1.4000000000000p+4
};
static const float TARGETS_Q5_0[12] = {
    0x1.b333333333333p+3, 0x1.e00b73de1d44dp+3, 0x1.08c15688bb8e3p+4, 0x1.24096258bcca8p+4,
    0x1.4221181b4c0f6p+4, 0x1.6352a0030b42bp+4, 0x1.87efc677a41e4p+4, 0x1.b052c5a912ae6p+4,
    0x1.dcdf23e8584a2p+4, 0x1.07015474c2245p+5, 0x1.221b3625bad22p+5, 0x1.4000000000000p+5
};

/* ---------------------------------------------------------------------------------------------
 * Q8_0 (ggml's quantize_row_q8_0_ref; importance ignored, as ggml)
 * ------------------------------------------------------------------------------------------- */

/* roundf(q) (ties away from zero) as int32 per lane, for |q| < 2^31: truncate, then one step
 * away from zero where the exact remainder is at least a half. */
static inline vi round_half_away_lanes(vf q) {
    const vi t = __builtin_convertvector(q, vi);
    const vi up = vabs(q - __builtin_convertvector(t, vf)) >= F(0.5f);
    return t + (up & ((q < F(0.0f)) | I(1)));
}

void nemoq_quantize_q8_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    (void)importance;
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * (2 + QK8_0);
        for (int64_t b = 0; b < nb; b++, o += 2 + QK8_0) {
            vf xb[QK8_0 / NL];
            memcpy(xb, xr + b * QK8_0, sizeof xb);
            /* max |x| on the bits, monotonic for |x| (a NaN cannot get here: inputs are scanned) */
            vi m = (vi)vabs(xb[0]);
            for (int k = 1; k < QK8_0 / NL; k++) {
                const vi a = (vi)vabs(xb[k]);
                m = (vi)sel(a > m, (vf)a, (vf)m);
            }
            int32_t abits = 0;
            for (int l = 0; l < NL; l++) abits = m[l] > abits ? m[l] : abits;
            float amax;
            memcpy(&amax, &abits, 4);
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            put_f16(o, d);
            for (int k = 0; k < QK8_0 / NL; k++) {
                const vi q = round_half_away_lanes(xb[k] * F(id));
                for (int l = 0; l < NL; l++) o[2 + NL * k + l] = (uint8_t)(int8_t)q[l];
            }
        }
    }
}

void nemoq_dequantize_q8_0(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t * q = data + r * nb * (2 + QK8_0);
        float * yr = y + r * n_per_row;
        for (int64_t b = 0; b < nb; b++, q += 2 + QK8_0) {
            const float d = get_f16(q);
            for (int j = 0; j < QK8_0; j++) yr[b * QK8_0 + j] = d * (float)(int8_t)q[2 + j];
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_0 and Q5_0 (q4_0.py, q5_0.py): signed levels -nmax..nmax-1 times an f16 scale
 * ------------------------------------------------------------------------------------------- */

/* Grid(np.arange(-nmax, nmax), 0.5) (Q4_0, Q5_0): the index of the nearest level of v, ties up:
 * with K = floor(2 v), floor((K + 1) / 2) + nmax clipped to the table; NaN gives 0 as the table. */
static inline vf int_grid_index(vf v, float nmax) {
    const vf K = vfloor(v * F(2.0f));
    vf t = vfloor((K + F(1.0f)) * F(0.5f)) + F(nmax);
    t = sel(t > F(0.0f), t, F(0.0f));
    return sel(t < F(2.0f * nmax - 1.0f), t, F(2.0f * nmax - 1.0f));
}

/* refine_on_grid for Q4_0 / Q5_0: the integer grid -nmax .. nmax - 1 (arg = nmax) */
static inline vf int_grid_level(vf v, float nmax) { return int_grid_index(v, nmax) - F(nmax); }
DEFINE_REFINE_ON_GRID(v_refine_int_grid, int_grid_level, int_grid_index)

/* Block bytes from d and lane l of the unsigned levels q = level + nmax. */
static void pack_q4_0(uint8_t * o, float d, const vf * q, int l) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(((int)q[j][l] & 0x0F) | ((int)q[j + 16][l] << 4));
}

static void pack_q5_0(uint8_t * o, float d, const vf * q, int l) {
    put_f16(o, d);
    uint32_t qh = 0;
    for (int j = 0; j < 32; j++) qh |= (uint32_t)(((int)q[j][l] >> 4) & 1) << j;
    for (int k = 0; k < 4; k++) o[2 + k] = (uint8_t)(qh >> (8 * k));
    for (int j = 0; j < 16; j++) o[6 + j] = (uint8_t)(((int)q[j][l] & 0x0F) | ((int)q[j + 16][l] << 4));
}

static void dequant_block_q4_0(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(b[2 + j] & 0x0F) - 8);
        y[j + 16] = d * (float)((int)(b[2 + j] >> 4) - 8);
    }
}

static void dequant_block_q5_0(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        const int hi = (b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void quantize_x_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance, int nmax) {
    const int is5 = nmax == 16;
    const int bsize = is5 ? 22 : 18;
    const float fn = (float)nmax;
    const float * targets = is5 ? TARGETS_Q5_0 : TARGETS_Q4_0;
    void (*pack)(uint8_t *, float, const vf *, int) = is5 ? pack_q5_0 : pack_q4_0;
    const int64_t nb = n_per_row / QK4_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        const float sigma2 = importance ? row_mean_square(xr, n_per_row) : 0.0f;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], qg[32], qo[32], y[32], dg;
            load_blocks(xr, importance, b0, nb, QK4_0, xt, wt);
            /* ggml's choice (ggml_rows): the _ref quantizer, or make_qx_quants with importance */
            if (!importance) {
                dg = v_signed_absmax(xt, 32) / F(-fn);
                const vf inv = sel(dg == F(0.0f), F(0.0f), F(1.0f) / dg);
                for (int i = 0; i < 32; i++) qg[i] = vmin(F(2.0f * fn - 1.0f), vtrunc(xt[i] * inv + F(fn + 0.5f)));
            } else {
                vf qw[32];
                for (int i = 0; i < 32; i++) qw[i] = wt[i] * vsqrt(F(sigma2) + xt[i] * xt[i]);
                dg = v_make_qx_quants_f(32, nmax, xt, qw, qg);
                for (int i = 0; i < 32; i++) qg[i] = qg[i] + F(fn);
            }
            /* ours: a wider search for the error itself (float32, as q4_0.py), refined on the grid */
            vf wx[32];
            for (int i = 0; i < 32; i++) wx[i] = wt[i] * xt[i];
            const vf max = v_signed_absmax(xt, 32);
            const vi zero = vabs(max) < F(GROUP_MAX_EPS);
            const vf d = qx_search_f(32, nmax, targets, 12, xt, wt, wx, sel(zero, F(1.0f), max), zero, NULL);
            const vf dh = v_refine_int_grid(xt, wt, d, fn, qo);
            /* best_of: the errors of the dequantized candidates */
            vf dgh;
            for (int l = 0; l < NL; l++) dgh[l] = f16_round(dg[l]);
            for (int i = 0; i < 32; i++) y[i] = dgh * (qg[i] - F(fn));
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * (qo[i] - F(fn));
            const vf eo = v_error32(xt, y, wt);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                const float err[2] = {eg[l], eo[l]};
                uint8_t * o = out + (r * nb + b0 + l) * bsize;
                if (argmin_first(err, 2) == 0) pack(o, dg[l], qg, l);
                else pack(o, dh[l], qo, l);
            }
        }
    }
}

void nemoq_quantize_q4_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_x_0(x, out, nrows, n_per_row, importance, 8);
}

void nemoq_quantize_q5_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_x_0(x, out, nrows, n_per_row, importance, 16);
}

DEQUANT_ROWS(q4_0, 32, 18, dequant_block_q4_0)
DEQUANT_ROWS(q5_0, 32, 22, dequant_block_q5_0)
