/* make_qkx_quants (search.py; ggml's make_qkx2/qkx3_quants) for NL groups of 32 at once, shared by
 * the K-quants (quants_k.c: the 8 groups of a super-block are the lanes) and Q5_1 (quants_q5_1.c: 8
 * consecutive blocks). */
#ifndef NEMOQ_QKX_SEARCH_H
#define NEMOQ_QKX_SEARCH_H

#include "lanes.h"

/* x ~ scale * L - min with L in [0, nmax]; returns scale, writes -min and L. float32. */
static vf v_make_qkx_quants(int nmax, float rmin, float rdelta, int nstep, const vf * x, const vf * w,
                            vf * the_min, vf * L) {
    const float fn = (float)nmax;
    vf mn = x[0], mx = x[0], sum_w = F(0.0f), sum_x = F(0.0f), best = F(0.0f);
    for (int i = 1; i < 32; i++) { mn = vmin(x[i], mn); mx = vmax(x[i], mx); }   /* the first of equals stays */
    for (int i = 0; i < 32; i++) { sum_w += w[i]; sum_x += w[i] * x[i]; }
    mn = sel(mn > F(0.0f), F(0.0f), mn);
    const vi flat = mx <= mn;
    const vf iscale = F(fn) / sel(flat, F(1.0f), mx - mn);
    vf scale = F(1.0f) / iscale;
    for (int i = 0; i < 32; i++) {
        L[i] = vclip(vrint((x[i] - mn) * iscale), 0.0f, fn);
        const vf diff = ((scale * L[i]) + mn) - x[i];
        best += w[i] * (diff * diff);
    }
    vf lv[32];
    for (int step = 0; step <= nstep; step++) {
        const vf is = F((rmin + rdelta * (float)step) + fn) / sel(flat, F(1.0f), mx - mn);
        vf sum_l = F(0.0f), sum_l2 = F(0.0f), sum_xl = F(0.0f), cur = F(0.0f);
        for (int i = 0; i < 32; i++) {
            const vf v = vclip(vrint((x[i] - mn) * is), 0.0f, fn);
            const vf wl = w[i] * v;
            lv[i] = v;
            sum_l += wl;
            sum_l2 += wl * v;
            sum_xl += wl * x[i];
        }
        const vf det = sum_w * sum_l2 - sum_l * sum_l;
        const vf s = (sum_w * sum_xl - sum_x * sum_l) / det;
        const vf m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const vi positive = m > F(0.0f);
        const vf this_scale = sel(positive, sum_xl / sum_l2, s);
        const vf this_min = sel(positive, F(0.0f), m);
        for (int i = 0; i < 32; i++) {
            const vf diff = ((this_scale * lv[i]) + this_min) - x[i];
            cur += w[i] * (diff * diff);
        }
        const vi better = (det > F(0.0f)) & (cur < best);
        best = sel(better, cur, best);
        scale = sel(better, this_scale, scale);
        mn = sel(better, this_min, mn);
        for (int i = 0; i < 32; i++) L[i] = sel(better, lv[i], L[i]);
    }
    for (int i = 0; i < 32; i++) L[i] = sel(flat, F(0.0f), L[i]);
    *the_min = -mn;
    return sel(flat, F(0.0f), scale);
}

#endif
