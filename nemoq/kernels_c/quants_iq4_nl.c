/* IQ4_NL (iq4_nl.py): 32 indices into a fixed non-linear table times an f16 scale. */
#include "lanes.h"

/* iq4_nl.KVALUES, and the midpoints between neighbours in units of GRID's step (0.5) */
static const float KVALUES_IQ4_NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float MIDS_IQ4_NL[15] = {-231, -187, -148, -114, -84, -57, -32, -9, 14, 38, 63, 91, 122, 158, 202};

/* IQ4_NL.targets(): float32, as exact hex literals; 8 factors at each end of the table, of
 * which the first PLAIN_FACTORS without importance */
#define FACTORS 8
#define PLAIN_FACTORS 3
static const float TARGETS_IQ4_NL[16] = {
    -0x1.afccccp+6, -0x1.f7bfc0p+6, -0x1.25d7e4p+7, -0x1.56ce22p+7,
    -0x1.8fece6p+7, -0x1.d29034p+7, -0x1.102702p+8, -0x1.3d8000p+8,
    0x1.803334p+6, 0x1.c037b8p+6, 0x1.05737ep+7, 0x1.310402p+7,
    0x1.63d6d0p+7, 0x1.9f2190p+7, 0x1.e44d7cp+7, 0x1.1a8000p+8
};

/* iq4_nl.GRID as tables over the cells K = floor(2 v) in [-1024, 1023] (row K + 1024): the
 * nearest level and its index (#mids <= K, as GRID.lut). Beyond the outer mids every cell has
 * the end level, so clipping v to the table changes nothing. Built once, when the library loads. */
#define IQ4NL_ROWS 2048
static float IQ4NL_LEVEL[IQ4NL_ROWS], IQ4NL_INDEX[IQ4NL_ROWS];

__attribute__((constructor)) static void iq4nl_tables(void) {
    for (int r = 0; r < IQ4NL_ROWS; r++) {
        int n = 0;
        for (int k = 0; k < 15; k++) n += (float)(r - IQ4NL_ROWS / 2) >= MIDS_IQ4_NL[k];
        IQ4NL_LEVEL[r] = KVALUES_IQ4_NL[n];
        IQ4NL_INDEX[r] = (float)n;
    }
}

/* The row of 2 v where |2 v| < 1024 is known, as in the scale searches (|id * x| <= |target|);
 * the mask only keeps a stray NaN inside the table. */
static inline vi iq4nl_row_near(vf v2) {
    return (__builtin_convertvector(vfloor(v2), vi) + I(IQ4NL_ROWS / 2)) & I(IQ4NL_ROWS - 1);
}

/* The row of any 2 v (NaN: the first row, as the comparisons of GRID give) */
static inline vi iq4nl_row(vf v2) {
    v2 = sel(v2 > F(-1024.0f), v2, F(-1024.0f));
    return iq4nl_row_near(sel(v2 < F(1023.0f), v2, F(1023.0f)));
}

static inline vf iq4nl_level(vf v2) { return lookup(IQ4NL_LEVEL, iq4nl_row(v2)); }
static inline vf iq4nl_index(vf v2) { return lookup(IQ4NL_INDEX, iq4nl_row(v2)); }

/* refine_on_grid on IQ4_NL's levels, looked up at 2 v (arg unused) */
static inline vf iq4nl_grid_level(vf v, float arg) { (void)arg; return iq4nl_level(v * F(2.0f)); }
static inline vf iq4nl_grid_index(vf v, float arg) { (void)arg; return iq4nl_index(v * F(2.0f)); }
DEFINE_REFINE_ON_GRID(v_refine_iq4_nl, iq4nl_grid_level, iq4nl_grid_index)

/* iq4_nl.scale_search: for each inverse scale ids[k] (per lane), the nearest levels of id * x
 * and their least-squares d; the first is taken, later ones when their fit is better (as ggml).
 * Returns d, 0 for the zero blocks. (2 id) * x is 2 (id * x) but where id * x is subnormal, and
 * there both are in cells -1 or 0, which share a level. */
static vf v_iq4_nl_scale_search(const vf * x, const vf * w, const vf * ids, int n, vi zero) {
    vf d = F(0.0f), best = F(0.0f);
    for (int k = 0; k < n; k++) {
        const vf id2 = ids[k] * F(2.0f);
        vf sumqx = F(0.0f), sumq2 = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf q = lookup(IQ4NL_LEVEL, iq4nl_row_near(id2 * x[i]));
            const vf wq = w[i] * q;   /* (w q) x, as ggml rounds it */
            sumqx += wq * x[i];
            sumq2 += wq * q;
        }
        const vi pos = sumq2 > F(0.0f);
        const vf this_d = sel(pos, sumqx / sumq2, F(0.0f));
        const vi take = k == 0 ? I(-1) : pos & (sumqx * sumqx > best * sumq2);
        d = sel(take, this_d, d);
        best = sel(take, this_d * sumqx, best);
    }
    return sel(zero, F(0.0f), d);
}

/* ggml's inverse scales: 1 / (max / 127), then (t - 127) / max for t in -7..7; idx gets the
 * nearest indices for the d found. */
static vf v_iq4_nl_search_ggml(const vf * x, const vf * w, vf max, vi zero, vf * idx) {
    vf ids[16];
    ids[0] = F(1.0f) / (max / F(127.0f));
    for (int k = 1; k < 16; k++) ids[k] = F((float)(k - 8 - 127)) / max;
    const vf d = v_iq4_nl_scale_search(x, w, ids, 16, zero);
    const vf inv = vdiv(F(1.0f), d);
    for (int i = 0; i < 32; i++) idx[i] = iq4nl_index(x[i] * inv * F(2.0f));
    return d;
}

/* ours: t / max for IQ4_NL.targets(weighted) */
static vf v_iq4_nl_search_ours(const vf * x, const vf * w, vf max, vi zero, int weighted) {
    const int nf = weighted ? FACTORS : PLAIN_FACTORS;
    vf ids[2 * FACTORS];
    for (int end = 0; end < 2; end++) {
        for (int f = 0; f < nf; f++) ids[end * nf + f] = F(TARGETS_IQ4_NL[end * FACTORS + f]) / max;
    }
    return v_iq4_nl_scale_search(x, w, ids, 2 * nf, zero);
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
            const vf max = v_signed_absmax(xt, 32);
            const vi zero = vabs(max) < F(GROUP_MAX_EPS);
            const vf max1 = sel(zero, F(1.0f), max);
            const vf dg = v_iq4_nl_search_ggml(xt, gw, max1, zero, ig);
            /* ours */
            const vf dh = v_refine_iq4_nl(xt, wt, v_iq4_nl_search_ours(xt, wt, max1, zero, importance != NULL), 0.0f, io);
            /* best_of */
            vf dgh;
            for (int l = 0; l < NL; l++) dgh[l] = f16_round(dg[l]);
            for (int i = 0; i < 32; i++) y[i] = dgh * lookup(KVALUES_IQ4_NL, __builtin_convertvector(ig[i], vi));
            const vf eg = v_error32(xt, y, wt);
            for (int i = 0; i < 32; i++) y[i] = dh * lookup(KVALUES_IQ4_NL, __builtin_convertvector(io[i], vi));
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
