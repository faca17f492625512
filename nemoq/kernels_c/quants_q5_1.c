/* Q5_1 (q5_1.py): 32 levels in 0..31 times an f16 scale, plus an f16 min, per 32-value block.
 * The NL lanes are 8 consecutive blocks of a row. */
#include "qkx_search.h"

#define QK5_1 32

static void pack_q5_1(uint8_t * o, float d, float m, const vf * q, int l) {
    put_f16(o, d);
    put_f16(o + 2, m);
    uint32_t qh = 0;
    for (int j = 0; j < 32; j++) qh |= (uint32_t)(((int)q[j][l] >> 4) & 1) << j;
    for (int k = 0; k < 4; k++) o[4 + k] = (uint8_t)(qh >> (8 * k));
    for (int j = 0; j < 16; j++) o[8 + j] = (uint8_t)(((int)q[j][l] & 0x0F) | (((int)q[j + 16][l] & 0x0F) << 4));
}

static void dequant_block_q5_1(const uint8_t * b, float * y) {
    const float d = get_f16(b), m = get_f16(b + 2);
    const uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[8 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        const int hi = (b[8 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

void nemoq_quantize_q5_1(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    const int64_t nb = n_per_row / QK5_1;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        const float sigma2 = importance ? row_mean_square(xr, n_per_row) : 0.0f;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], qg[32], qo[32], y[32], dg, mg, neg_min;
            load_blocks(xr, importance, b0, nb, QK5_1, xt, wt);
            /* ggml's choice (ggml_rows) */
            if (!importance) {   /* ggml_ref: [min, max] onto 0..31 */
                vf mn = xt[0], mx = xt[0];
                for (int i = 1; i < 32; i++) { mn = vmin(xt[i], mn); mx = vmax(xt[i], mx); }
                dg = (mx - mn) / F(31.0f);
                const vf inv = sel(dg == F(0.0f), F(0.0f), F(1.0f) / dg);
                for (int i = 0; i < 32; i++) qg[i] = vtrunc((xt[i] - mn) * inv + F(0.5f));
                mg = mn;
            } else {
                vf qw[32];
                for (int i = 0; i < 32; i++) qw[i] = wt[i] * vsqrt(F(sigma2) + xt[i] * xt[i]);
                dg = v_make_qkx_quants(31, -0.9f, 0.05f, 36, xt, qw, &neg_min, qg);
                mg = -neg_min;
            }
            /* ours: the search for the error itself, levels re-rounded for the stored d and m */
            const vf s = v_make_qkx_quants(31, -2.0f, 0.25f, 24, xt, wt, &neg_min, qo);
            vf dh, mh, dgh, mgh;
            for (int l = 0; l < NL; l++) {
                dh[l] = f16_round(s[l]);
                mh[l] = f16_round(-neg_min[l]);
                dgh[l] = f16_round(dg[l]);
                mgh[l] = f16_round(mg[l]);
            }
            const vi nz = dh != F(0.0f);
            for (int i = 0; i < 32; i++) qo[i] = sel(nz, vclip(vrint(vdiv(xt[i] - mh, dh)), 0.0f, 31.0f), qo[i]);
            /* best_of: the errors of the dequantized candidates */
            for (int i = 0; i < 32; i++) y[i] = dgh * qg[i] + mgh;
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * qo[i] + mh;
            const vf eo = v_error32(xt, y, wt);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                const float err[2] = {eg[l], eo[l]};
                uint8_t * o = out + (r * nb + b0 + l) * 24;
                if (argmin_first(err, 2) == 0) pack_q5_1(o, dg[l], mg[l], qg, l);
                else pack_q5_1(o, dh[l], mh[l], qo, l);
            }
        }
    }
}

DEQUANT_ROWS(q5_1, 32, 24, dequant_block_q5_1)
