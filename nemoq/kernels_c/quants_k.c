/* Q4_K and Q5_K (q4_k.py, q5_k.py). */
#include "qkx_search.h"
#include "qp_quants.h"

/* ---------------------------------------------------------------------------------------------
 * Q4_K and Q5_K (q4_k.py, q5_k.py): 8 groups of 32 levels in [0, nmax], 6-bit group scales and
 * mins, f16 d and dmin; value = d * sc * q - dmin * m. The 8 groups of a super-block are the
 * lanes: x[i] lane g is value i of group g.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    float d, dmin;
    vf sc, m, L[32];
} kquant_t;

static void pack_scales_k(uint8_t * s, vf scf, vf mf) {
    uint8_t sc[8], m[8];
    for (int g = 0; g < 8; g++) {
        sc[g] = (uint8_t)(int)scf[g];
        m[g] = (uint8_t)(int)mf[g];
    }
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[4 + j] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
        s[8 + j] = (uint8_t)((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
    }
}

static void unpack_scales_k(const uint8_t * s, int * sc, int * m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[4 + j] & 63;
        sc[j + 4] = (s[8 + j] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
    }
}

static void pack_q4_k(uint8_t * o, const kquant_t * k) {
    put_f16(o, k->d);
    put_f16(o + 2, k->dmin);
    pack_scales_k(o + 4, k->sc, k->m);
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            const int lo = (int)k->L[l][2 * c], hi = (int)k->L[l][2 * c + 1];
            o[16 + 32 * c + l] = (uint8_t)((lo & 0x0F) | (hi << 4));
        }
    }
}

static void pack_q5_k(uint8_t * o, const kquant_t * k) {
    put_f16(o, k->d);
    put_f16(o + 2, k->dmin);
    pack_scales_k(o + 4, k->sc, k->m);
    for (int l = 0; l < 32; l++) {
        int qh = 0;
        for (int g = 0; g < 8; g++) qh |= (((int)k->L[l][g] >> 4) & 1) << g;
        o[16 + l] = (uint8_t)qh;
    }
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            const int lo = (int)k->L[l][2 * c], hi = (int)k->L[l][2 * c + 1];
            o[48 + 32 * c + l] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
        }
    }
}

static void dequant_block_q4_k(const uint8_t * b, float * y) {
    const float d = get_f16(b), dmin = get_f16(b + 2);
    int sc[8], m[8];
    unpack_scales_k(b + 4, sc, m);
    for (int g = 0; g < 8; g++) {
        const float dd = d * (float)sc[g], dm = dmin * (float)m[g];
        const uint8_t * q = b + 16 + 32 * (g / 2);
        const int shift = 4 * (g % 2);
        for (int l = 0; l < 32; l++) y[32 * g + l] = dd * (float)((q[l] >> shift) & 0x0F) - dm;
    }
}

static void dequant_block_q5_k(const uint8_t * b, float * y) {
    const float d = get_f16(b), dmin = get_f16(b + 2);
    int sc[8], m[8];
    unpack_scales_k(b + 4, sc, m);
    const uint8_t * qh = b + 16;
    for (int g = 0; g < 8; g++) {
        const float dd = d * (float)sc[g], dm = dmin * (float)m[g];
        const uint8_t * q = b + 48 + 32 * (g / 2);
        const int shift = 4 * (g % 2);
        for (int l = 0; l < 32; l++) {
            const int v = ((q[l] >> shift) & 0x0F) | (((qh[l] >> g) & 1) << 4);
            y[32 * g + l] = dd * (float)v - dm;
        }
    }
}

DEQUANT_ROWS(q4_k, 256, 144, dequant_block_q4_k)
DEQUANT_ROWS(q5_k, 256, 176, dequant_block_q5_k)

/* Q4_K.levels: nearest levels for the stored scales and mins (groups with d * sc = 0 keep L). */
static void k_levels(const vf * x, kquant_t * k, int nmax) {
    const vf dd = F(k->d) * k->sc, dm = F(k->dmin) * k->m;
    const vi nz = dd != F(0.0f);
    for (int i = 0; i < 32; i++) k->L[i] = sel(nz, vclip(vrint((x[i] + dm) / dd), 0.0f, (float)nmax), k->L[i]);
}

/* Q4_K.fit (quantize_row_q4_K_impl's pipeline): group fits, then the 6-bit scales and mins. */
static void k_fit(const vf * x, const vf * w, int nmax, float rmin, float rdelta, int nstep, kquant_t * k) {
    vf mins, sw = F(0.0f);
    const vf scales = v_make_qkx_quants(nmax, rmin, rdelta, nstep, x, w, &mins, k->L);
    for (int i = 0; i < 32; i++) sw += w[i];
    float s[8], m[8], sws[8], L[8];
    memcpy(s, &scales, sizeof s);
    memcpy(m, &mins, sizeof m);
    memcpy(sws, &sw, sizeof sws);
    k->d = f16_round(make_qp_quants(s, sws, 8, 63, L));
    memcpy(&k->sc, L, sizeof L);
    k->dmin = f16_round(make_qp_quants(m, sws, 8, 63, L));
    memcpy(&k->m, L, sizeof L);
    k_levels(x, k, nmax);
}

/* Q4_K.ggml_ref (quantize_row_q4_K_ref / q5_K_ref): weights mean|x| + |x|, scales and mins
 * stored as 63 * value / max. */
static void k_ggml_ref(const vf * x, int nmax, float rmin, float rdelta, int nstep, kquant_t * k) {
    vf av_x = F(0.0f), w[32], mins;
    for (int i = 0; i < 32; i++) av_x += x[i] * x[i];
    av_x = vsqrt(av_x / F(32.0f));
    for (int i = 0; i < 32; i++) w[i] = av_x + vabs(x[i]);
    const vf scales = v_make_qkx_quants(nmax, rmin, rdelta, nstep, x, w, &mins, k->L);
    float max_scale = scales[0], max_min = mins[0];
    for (int g = 1; g < 8; g++) {
        max_scale = np_maxf(max_scale, scales[g]);
        max_min = np_maxf(max_min, mins[g]);
    }
    max_scale = np_maxf(max_scale, 0.0f);
    max_min = np_maxf(max_min, 0.0f);
    k->sc = vclip(vrint(F(divf(63.0f, max_scale)) * scales), 0.0f, 63.0f);
    k->m = vclip(vrint(F(divf(63.0f, max_min)) * mins), 0.0f, 63.0f);
    k->d = f16_round(max_scale / 63.0f);
    k->dmin = f16_round(max_min / 63.0f);
    k_levels(x, k, nmax);
}

/* Q4_K.refit: with d and dmin fixed, the least-squares scale and min of each group for its
 * levels, rounded to 6 bits; then re-round the levels (twice). */
static void k_refit(const vf * x, const vf * w, int nmax, kquant_t * k) {
    vf sum_w = F(0.0f), sum_x = F(0.0f);
    for (int i = 0; i < 32; i++) sum_w += w[i];
    for (int i = 0; i < 32; i++) sum_x += w[i] * x[i];
    for (int it = 0; it < 2; it++) {
        vf sum_l = F(0.0f), sum_l2 = F(0.0f), sum_xl = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf wl = w[i] * k->L[i];
            sum_l += wl;
            sum_l2 += wl * k->L[i];
            sum_xl += wl * x[i];
        }
        const vf det = sum_w * sum_l2 - sum_l * sum_l;
        const vf scale = vdiv(sum_w * sum_xl - sum_x * sum_l, det);
        const vf neg_min = vdiv(sum_l * sum_xl - sum_l2 * sum_x, det);
        const vi pos = det > F(0.0f);
        k->sc = sel(pos, vclip(vrint(vdiv(scale, F(k->d))), 0.0f, 63.0f), k->sc);
        k->m = sel(pos, vclip(vrint(vdiv(neg_min, F(k->dmin))), 0.0f, 63.0f), k->m);
        k_levels(x, k, nmax);
    }
}

static void quantize_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                       const float * importance, int is5) {
    const int nmax = is5 ? 31 : 15, bsize = is5 ? 176 : 144;
    /* (rmin, rdelta, nstep) of ggml's _ref search and of ours; the importance path's is
     * (-0.9, 0.05, 36) for both */
    const float ref_rmin = is5 ? -0.5f : -1.0f, ref_rdelta = 0.1f;
    const int ref_nstep = is5 ? 15 : 20;
    const float our_rmin = is5 ? -3.0f : -1.5f, our_rdelta = is5 ? 0.8f : 0.4f;
    void (*pack)(uint8_t *, const kquant_t *) = is5 ? pack_q5_k : pack_q4_k;
    void (*dequant)(const uint8_t *, float *) = is5 ? dequant_block_q5_k : dequant_block_q4_k;
    const int64_t nb = n_per_row / QK_K;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * bsize;
        for (int64_t b = 0; b < nb; b++, o += bsize) {
            const float * xb = xr + b * QK_K;
            const float * w = importance ? importance + b * QK_K : ONES;
            vf xt[32], wt[32];
            for (int i = 0; i < 32; i++) {
                for (int l = 0; l < NL; l++) { xt[i][l] = xb[32 * l + i]; wt[i][l] = w[32 * l + i]; }
            }
            uint8_t cand[3][176];
            kquant_t k;
            /* ggml_rows */
            if (!importance) {
                k_ggml_ref(xt, nmax, ref_rmin, ref_rdelta, ref_nstep, &k);
            } else {
                /* sigma2 = 2 * sum(x^2) / 256, added in order as ggml */
                float s = 0.0f;
                vf qw[32];
                for (int v = 0; v < QK_K; v++) s += xb[v] * xb[v];
                const float sigma2 = (2.0f * s) / 256.0f;
                for (int i = 0; i < 32; i++) qw[i] = wt[i] * vsqrt(F(sigma2) + xt[i] * xt[i]);
                k_fit(xt, qw, nmax, -0.9f, 0.05f, 36, &k);
            }
            pack(cand[0], &k);
            /* ours, and ours refitted */
            k_fit(xt, wt, nmax, our_rmin, our_rdelta, 15, &k);
            pack(cand[1], &k);
            k_refit(xt, wt, nmax, &k);
            pack(cand[2], &k);
            float y[QK_K], err[3];
            for (int c = 0; c < 3; c++) {
                dequant(cand[c], y);
                err[c] = block_error(xb, y, importance ? w : NULL, QK_K);
            }
            memcpy(o, cand[argmin_first(err, 3)], (size_t)bsize);
        }
    }
}

void nemoq_quantize_q4_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_k(x, out, nrows, n_per_row, importance, 0);
}

void nemoq_quantize_q5_k(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                         const float * importance) {
    quantize_k(x, out, nrows, n_per_row, importance, 1);
}
