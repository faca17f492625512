/* IQ4_NL (iq4_nl.py): 32 indices into a fixed non-linear table times an f16 scale. */
#include "lanes.h"

/* iq4_nl.KVALUES, and the midpoints between neighbours in units of GRID's step (0.5) */
static const float KVALUES_IQ4_NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float MIDS_IQ4_NL[15] = {-231, -187, -148, -114, -84, -57, -32, -9, 14, 38, 63, 91, 122, 158, 202};

/* KVALUES ends * search_factors of iq4_nl.py, as exact hex literals */
static const double TARGETS_IQ4_NL[16] = {
    -0x1.afccccccccccdp+6, -0x1.f7bfc04ebf601p+6, -0x1.25d7e33a18130p+7, -0x1.56ce21201f7cap+7,
    -0x1.8fece6441b7abp+7, -0x1.d29033593c44ap+7, -0x1.102702c6775a2p+8, -0x1.3d80000000000p+8,
    0x1.8033333333333p+6, 0x1.c037b733eccc7p+6, 0x1.05737d9472251p+7, 0x1.31040140dd871p+7,
    0x1.63d6d0e9f42abp+7, 0x1.9f219075b299dp+7, 0x1.e44d7bde27093p+7, 0x1.1a80000000000p+8
};

/* iq4_nl.GRID: index = #mids <= K with K = floor(2 v); the level itself is KVALUES[0] plus the
 * steps passed (integers, exact). */
static inline vf iq4nl_index(vf K) {
    vf c = F(0.0f);
    for (int k = 0; k < 15; k++) c += sel(K >= F(MIDS_IQ4_NL[k]), F(1.0f), F(0.0f));
    return c;
}

static inline vf iq4nl_value(vf K) {
    vf v = F(KVALUES_IQ4_NL[0]);
    for (int k = 0; k < 15; k++) {
        v += sel(K >= F(MIDS_IQ4_NL[k]), F(KVALUES_IQ4_NL[k + 1] - KVALUES_IQ4_NL[k]), F(0.0f));
    }
    return v;
}

/* floor(2 v) of the float64 path, for iq4nl_value: clipped to the table's range (exact, and it
 * changes no count) so that it is exact in float32 too. */
static inline vd iq4nl_cell_d(vd v) { return vclipd(vfloord(v * D(2.0)), -256.0, 256.0); }

static inline vf iq4nl_kvalue(vf idx) {
    vf v;
    for (int l = 0; l < NL; l++) v[l] = KVALUES_IQ4_NL[(int)idx[l]];
    return v;
}

/* refine_on_grid for IQ4_NL, whose search gives a float32 d. */
static vf v_refine_iq4_nl(const vf * x, const vf * w, vf d, vf * idx) {
    for (int it = 0; it < 2; it++) {
        const vf inv = vdiv(F(1.0f), d);
        vf sxq = F(0.0f), sqq = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(vfloor(x[i] * inv * F(2.0f)));
            sxq += (w[i] * x[i]) * q;
            sqq += (w[i] * q) * q;
        }
        const vf fit = sel(sqq != F(0.0f), sxq / sqq, F(0.0f));
        d = sel(fit != F(0.0f), fit, d);
    }
    vf dh;
    for (int l = 0; l < NL; l++) dh[l] = f16_round(d[l]);
    const vf inv = vdiv(F(1.0f), dh);
    for (int i = 0; i < 32; i++) idx[i] = iq4nl_index(vfloor(x[i] * inv * F(2.0f)));
    return dh;
}

/* iq4_nl.scale_search with ggml's inverse scales (float32): 1 / (max / 127), then (t - 127) / max
 * for t in -7..7. Returns d; idx gets the nearest indices for it. */
static vf v_iq4_nl_search_ggml(const vf * x, const vf * w, vf * idx) {
    vf wx[32];
    for (int i = 0; i < 32; i++) wx[i] = w[i] * x[i];
    vf max = v_signed_absmax(x, 32);
    const vi zero = vabs(max) < F(GROUP_MAX_EPS);
    max = sel(zero, F(1.0f), max);
    vf d = F(0.0f), best = F(0.0f);
    for (int k = 0; k < 16; k++) {
        const vf id = k == 0 ? F(1.0f) / (max / F(127.0f)) : F((float)(k - 8 - 127)) / max;
        vf sumqx = F(0.0f), sumq2 = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(vfloor(id * x[i] * F(2.0f)));
            sumqx += wx[i] * q;
            sumq2 += (w[i] * q) * q;
        }
        const vi pos = sumq2 > F(0.0f);
        const vf this_d = sel(pos, sumqx / sumq2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumqx * sumqx > best * sumq2);
        d = sel(take, this_d, d);
        best = sel(take, this_d * sumqx, best);
    }
    d = sel(zero, F(0.0f), d);
    const vf inv = vdiv(F(1.0f), d);
    for (int i = 0; i < 32; i++) idx[i] = iq4nl_index(vfloor(x[i] * inv * F(2.0f)));
    return d;
}

/* The same with our float64 targets t / max (t = KVALUES ends times the search factors). */
static vf v_iq4_nl_search_ours(const vf * x, const vf * w) {
    vf wx[32];
    vd xd[2][32];
    for (int i = 0; i < 32; i++) {
        wx[i] = w[i] * x[i];
        xd[0][i] = half_d(x[i], 0);
        xd[1][i] = half_d(x[i], 1);
    }
    vf maxf = v_signed_absmax(x, 32);
    const vi zero = vabs(maxf) < F(GROUP_MAX_EPS);
    maxf = sel(zero, F(1.0f), maxf);
    const vd max0 = half_d(maxf, 0), max1 = half_d(maxf, 1);
    vf d = F(0.0f), best = F(0.0f);
    for (int k = 0; k < 16; k++) {
        const vd id0 = D(TARGETS_IQ4_NL[k]) / max0, id1 = D(TARGETS_IQ4_NL[k]) / max1;
        vf sumqx = F(0.0f), sumq2 = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = iq4nl_value(join_f(iq4nl_cell_d(id0 * xd[0][i]), iq4nl_cell_d(id1 * xd[1][i])));
            sumqx += wx[i] * q;
            sumq2 += (w[i] * q) * q;
        }
        const vi pos = sumq2 > F(0.0f);
        const vf this_d = sel(pos, sumqx / sumq2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumqx * sumqx > best * sumq2);
        d = sel(take, this_d, d);
        best = sel(take, this_d * sumqx, best);
    }
    return sel(zero, F(0.0f), d);
}

static void pack_iq4_nl(uint8_t * o, float d, const vf * idx, int l) {
    put_f16(o, d);
    for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(((int)idx[j][l] & 0x0F) | ((int)idx[j + 16][l] << 4));
}

static void dequant_block_iq4_nl(const uint8_t * b, float * y) {
    const float d = get_f16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * KVALUES_IQ4_NL[b[2 + j] & 0x0F];
        y[j + 16] = d * KVALUES_IQ4_NL[b[2 + j] >> 4];
    }
}

void nemoq_quantize_iq4_nl(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row,
                           const float * importance) {
    const int64_t nb = n_per_row / 32;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        for (int64_t b0 = 0; b0 < nb; b0 += NL) {
            vf xt[32], wt[32], gw[32], ig[32], io[32], y[32];
            load_blocks(xr, importance, b0, nb, 32, xt, wt);
            /* ggml_rows: weights x^2, or importance * sqrt(2 mean(x^2) + x^2) */
            if (!importance) {
                for (int i = 0; i < 32; i++) gw[i] = xt[i] * xt[i];
            } else {
                vf sigma2 = F(0.0f);
                for (int i = 0; i < 32; i++) sigma2 += xt[i] * xt[i];
                sigma2 = (F(2.0f) * sigma2) / F(32.0f);
                for (int i = 0; i < 32; i++) gw[i] = wt[i] * vsqrt(sigma2 + xt[i] * xt[i]);
            }
            const vf dg = v_iq4_nl_search_ggml(xt, gw, ig);
            /* ours */
            const vf dh = v_refine_iq4_nl(xt, wt, v_iq4_nl_search_ours(xt, wt), io);
            /* best_of */
            vf dgh;
            for (int l = 0; l < NL; l++) dgh[l] = f16_round(dg[l]);
            for (int i = 0; i < 32; i++) y[i] = dgh * iq4nl_kvalue(ig[i]);
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * iq4nl_kvalue(io[i]);
            const vf eo = v_error32(xt, y, wt);
            for (int l = 0; l < NL && b0 + l < nb; l++) {
                const float err[2] = {eg[l], eo[l]};
                uint8_t * o = out + (r * nb + b0 + l) * 18;
                if (argmin_first(err, 2) == 0) pack_iq4_nl(o, dg[l], ig, l);
                else pack_iq4_nl(o, dh[l], io, l);
            }
        }
    }
}

DEQUANT_ROWS(iq4_nl, 32, 18, dequant_block_iq4_nl)
