/* Q6_K (q6_k.py). */
#include "qx_search.h"

/* 32 * search_factors of q6_k.py, as exact hex literals */
static const double TARGETS_Q6_K[19] = {
    0x1.3333333333333p+4, 0x1.4000000000000p+4, 0x1.4cccccccccccdp+4, 0x1.599999999999ap+4,
    0x1.6666666666666p+4, 0x1.7333333333333p+4, 0x1.8000000000000p+4, 0x1.8cccccccccccdp+4,
    0x1.999999999999ap+4, 0x1.a666666666666p+4, 0x1.b333333333334p+4, 0x1.c000000000000p+4,
    0x1.ccccccccccccdp+4, 0x1.d99999999999ap+4, 0x1.e666666666667p+4, 0x1.f333333333334p+4,
    0x1.0000000000000p+5, 0x1.0666666666667p+5, 0x1.0cccccccccccdp+5
};

/* ---------------------------------------------------------------------------------------------
 * Q6_K (q6_k.py): 16 groups of 16 signed 6-bit levels, int8 group scales, one f16 d.
 * A super-block is searched as two halves of NL = 8 groups: x[h][i] lane l = value i of group
 * 8h + l.
 * ------------------------------------------------------------------------------------------- */

static void pack_q6_k(uint8_t * o, float d, const int8_t * sc, const uint8_t * q /* L + 32 */) {
    /* value 128h + 32k + l: low nibble in ql[64h + 32(k % 2) + l] (high half for k >= 2),
     * high two bits in qh[32h + l] at bit 2k */
    uint8_t * ql = o, * qh = o + 128;
    for (int h = 0; h < 2; h++) {
        for (int l = 0; l < 32; l++) {
            const uint8_t * v = q + 128 * h + l;
            ql[64 * h + l] = (uint8_t)((v[0] & 0x0F) | (v[64] << 4));
            ql[64 * h + 32 + l] = (uint8_t)((v[32] & 0x0F) | (v[96] << 4));
            qh[32 * h + l] = (uint8_t)((v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6));
        }
    }
    memcpy(o + 192, sc, 16);
    put_f16(o + 208, d);
}

static void dequant_block_q6_k(const uint8_t * b, float * y) {
    const uint8_t * ql = b, * qh = b + 128;
    const int8_t * sc = (const int8_t *)(b + 192);
    const float d = get_f16(b + 208);
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 4; k++) {
            for (int l = 0; l < 32; l++) {
                const int lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
                const int v = 128 * h + 32 * k + l;
                y[v] = (d * (float)sc[v / 16]) * (float)((lo | (hi << 4)) - 32);
            }
        }
    }
}

DEQUANT_ROWS(q6_k, 256, 210, dequant_block_q6_k)

/* Candidate bytes from d, the 16 group scales and the levels L[h][i] (lane = group 8h + lane). */
static void pack_q6_k_f(uint8_t * o, float d, const float * sc, vf (*L)[16]) {
    int8_t sc8[16];
    uint8_t q[QK_K];
    for (int g = 0; g < 16; g++) sc8[g] = (int8_t)(int)sc[g];
    for (int g = 0; g < 16; g++) {
        for (int i = 0; i < 16; i++) q[16 * g + i] = (uint8_t)(int)(L[g / 8][i][g % 8] + 32.0f);
    }
    pack_q6_k(o, d, sc8, q);
}

static void pack_q6_k_d(uint8_t * o, float d, const double * sc, vd (*L)[16][2]) {
    int8_t sc8[16];
    uint8_t q[QK_K];
    for (int g = 0; g < 16; g++) sc8[g] = (int8_t)(int)sc[g];
    for (int g = 0; g < 16; g++) {
        for (int i = 0; i < 16; i++) q[16 * g + i] = (uint8_t)(int)(L[g / 8][i][(g % 8) / 4][g % 4] + 32.0);
    }
    pack_q6_k(o, d, sc8, q);
}

static inline vf load8(const float * p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vd load4d(const double * p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Q6_K.levels with float32 scales (the ggml path): nearest levels for d * sc, else keep L. */
static void q6_k_levels_f(vf (*x)[16], float d, const float * sc, vf (*L)[16]) {
    for (int h = 0; h < 2; h++) {
        const vf dd = F(d) * load8(sc + 8 * h);
        for (int i = 0; i < 16; i++) L[h][i] = sel(dd != F(0.0f), vclip(vrint(x[h][i] / dd), -32.0f, 31.0f), L[h][i]);
    }
}

/* Q6_K.levels with float64 scales (our path): numpy divides float32 x by the float64 d * sc,
 * rounds the quotient to float32, then to the nearest level. */
static void q6_k_levels_d(vf (*x)[16], float d, const double * sc, vd (*L)[16][2]) {
    for (int h = 0; h < 2; h++) {
        const vd dd0 = D((double)d) * load4d(sc + 8 * h), dd1 = D((double)d) * load4d(sc + 8 * h + 4);
        const vl nz0 = dd0 != D(0.0), nz1 = dd1 != D(0.0);
        for (int i = 0; i < 16; i++) {
            const vf v = vclip(vrint(join_f(half_d(x[h][i], 0) / dd0, half_d(x[h][i], 1) / dd1)), -32.0f, 31.0f);
            L[h][i][0] = seld(nz0, half_d(v, 0), L[h][i][0]);
            L[h][i][1] = seld(nz1, half_d(v, 1), L[h][i][1]);
        }
    }
}

void nemoq_quantize_q6_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    const int64_t nb = n_per_row / QK_K;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * 210;
        for (int64_t b = 0; b < nb; b++, o += 210) {
            const float * xb = xr + b * QK_K;
            const float * w = importance ? importance + b * QK_K : ONES;
            vf xt[2][16], wt[2][16], gw[2][16], Lf[2][16];
            vd Ld[2][16][2];
            uint8_t cand[3][210];
            for (int h = 0; h < 2; h++) {
                for (int i = 0; i < 16; i++) {
                    for (int l = 0; l < NL; l++) {
                        xt[h][i][l] = xb[16 * (8 * h + l) + i];
                        wt[h][i][l] = w[16 * (8 * h + l) + i];
                    }
                    gw[h][i] = importance ? wt[h][i] : xt[h][i] * xt[h][i];
                }
            }
            /* ggml_rows: make_qx_quants per group (weights x^2 or the importance), store_scales */
            {
                float scales[16], sc[16];
                for (int h = 0; h < 2; h++) {
                    const vf s = v_make_qx_quants_f(16, 32, xt[h], gw[h], Lf[h]);
                    memcpy(scales + 8 * h, &s, sizeof s);
                }
                const float max_scale = signed_absmax(scales, 16);
                const int zero = fabsf(max_scale) < GROUP_MAX_EPS;
                const float iscale = -128.0f / (zero ? 1.0f : max_scale);
                const float d = zero ? 0.0f : f16_round(1.0f / iscale);
                for (int g = 0; g < 16; g++) sc[g] = zero ? 0.0f : np_minf(127.0f, rintf(iscale * scales[g]));
                if (zero) for (int h = 0; h < 2; h++) for (int i = 0; i < 16; i++) Lf[h][i] = F(-32.0f);
                q6_k_levels_f(xt, d, sc, Lf);
                pack_q6_k_f(cand[0], d, sc, Lf);
            }
            /* ours: make_qx_quants with float64 targets, store_scales in float64, then refit */
            {
                double scales[16], sc[16];
                for (int h = 0; h < 2; h++) {
                    v_make_qx_quants_d(16, 32, TARGETS_Q6_K, 19, xt[h], wt[h], scales + 8 * h, Ld[h]);
                }
                const double max_scale = signed_absmax(scales, 16);
                const int zero = fabs(max_scale) < (double)GROUP_MAX_EPS;
                const double iscale = -128.0 / (zero ? 1.0 : max_scale);
                const float d = zero ? 0.0f : f16_round((float)(1.0 / iscale));
                for (int g = 0; g < 16; g++) {
                    const double s = rint(iscale * scales[g]);
                    sc[g] = zero ? 0.0 : (s < 127.0 || s != s ? s : 127.0);
                }
                if (zero) for (int h = 0; h < 2; h++) for (int i = 0; i < 16; i++) Ld[h][i][0] = Ld[h][i][1] = D(-32.0);
                q6_k_levels_d(xt, d, sc, Ld);
                pack_q6_k_d(cand[1], d, sc, Ld);
                /* refit: the least-squares group scale for the levels, rounded to int8 (twice) */
                for (int it = 0; it < 2 && d != 0.0f; it++) {
                    for (int h = 0; h < 2; h++) {
                        vd fit[2];
                        for (int lh = 0; lh < 2; lh++) {
                            vd s1 = D(0.0), s2 = D(0.0);
                            for (int i = 0; i < 16; i++) {
                                s1 += half_d(wt[h][i] * xt[h][i], lh) * Ld[h][i][lh];
                                s2 += (half_d(wt[h][i], lh) * Ld[h][i][lh]) * Ld[h][i][lh];
                            }
                            fit[lh] = seld(s2 != D(0.0), s1 / s2, D(0.0));
                        }
                        const vf s = vclip(vrint(join_f(fit[0], fit[1]) / F(d)), -128.0f, 127.0f);
                        for (int l = 0; l < NL; l++) sc[8 * h + l] = (double)s[l];
                    }
                    q6_k_levels_d(xt, d, sc, Ld);
                }
                pack_q6_k_d(cand[2], d, sc, Ld);
            }
            float y[QK_K], err[3];
            for (int c = 0; c < 3; c++) {
                dequant_block_q6_k(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, QK_K);
            }
            memcpy(o, cand[argmin_first(err, 3)], 210);
        }
    }
}

