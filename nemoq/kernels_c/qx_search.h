/* make_qx_quants (search.py) for NL groups at once, shared by Q4_0/Q5_0 and Q6_K: signed levels
 * L in [-nmax, nmax - 1] times a scale per group. ggml's targets are float32 and keep the whole
 * search in float32; nemoq's float64 targets make numpy promote the scale, levels and sums to
 * float64, which runs on half the lanes at a time. One target loop serves both lane types. */
#ifndef NEMOQ_QX_SEARCH_H
#define NEMOQ_QX_SEARCH_H

#include "lanes.h"

/* The target loop over lanes of type V (mask M, scalar S): for each target t the levels of
 * (-t / max) * x, their least-squares scale, kept when the fit is better (the first target
 * unconditionally, as ggml). wx = w * x, rounded in float32 as numpy does; max has the zero
 * groups set to 1, and those get scale 0 and levels -nmax. Writes the levels when L is not NULL.
 * Targets go QX_TOGETHER at a time through the values: each target's sums still add value
 * after value (numpy's order), but the running sums of different targets do not wait on each
 * other (one target at a time, the loop is bound by the latency of the additions). A last
 * partial group repeats its last target and ignores the copies. */
#define QX_TOGETHER 4
#define DEFINE_QX_SEARCH(name, V, M, S, splat, select, rint, clip)                              \
    static V name(int n, int nmax, const S * targets, int ntargets, const V * x, const V * w,   \
                  const V * wx, V max, M zero, V * L) {                                         \
        V lv[QX_TOGETHER][32], scale = splat(0), best = splat(0);                               \
        for (int k0 = 0; k0 < ntargets; k0 += QX_TOGETHER) {                                    \
            V iscale[QX_TOGETHER], sumlx[QX_TOGETHER], suml2[QX_TOGETHER];                      \
            for (int j = 0; j < QX_TOGETHER; j++) {                                             \
                const int k = k0 + j < ntargets ? k0 + j : ntargets - 1;                        \
                iscale[j] = splat(-targets[k]) / max;                                           \
                sumlx[j] = suml2[j] = splat(0);                                                 \
            }                                                                                   \
            for (int i = 0; i < n; i++)                                                         \
                for (int j = 0; j < QX_TOGETHER; j++) {                                         \
                    const V v = clip(rint(iscale[j] * x[i]), (S)-nmax, (S)(nmax - 1));          \
                    lv[j][i] = v;                                                               \
                    sumlx[j] += wx[i] * v;                                                      \
                    suml2[j] += (w[i] * v) * v;                                                 \
                }                                                                               \
            for (int j = 0; j < QX_TOGETHER && k0 + j < ntargets; j++) {                        \
                const int k = k0 + j;                                                           \
                const M pos = suml2[j] > splat(0);                                              \
                const V this_scale = select(pos, sumlx[j] / suml2[j], splat(0));                \
                const M take = k == 0 ? pos == pos : pos & (sumlx[j] * sumlx[j] > best * suml2[j]); \
                scale = select(take, this_scale, scale);                                        \
                best = select(take, this_scale * sumlx[j], best);                               \
                if (L) for (int i = 0; i < n; i++) L[i] = k == 0 ? lv[j][i] : select(take, lv[j][i], L[i]); \
            }                                                                                   \
        }                                                                                       \
        if (L) for (int i = 0; i < n; i++) L[i] = select(zero, splat((S)-nmax), L[i]);          \
        return select(zero, splat(0), scale);                                                   \
    }

DEFINE_QX_SEARCH(qx_search_f, vf, vi, float, F, sel, vrint, vclip)
DEFINE_QX_SEARCH(qx_search_d, vd, vl, double, D, seld, vrintd, vclipd)

/* ggml's make_qx_quants: float32 targets nmax + 0.1 * step, step = 0, -9..-1, 1..9.
 * Returns the scales; L gets the levels. */
static vf v_make_qx_quants_f(int n, int nmax, const vf * x, const vf * w, vf * L) {
    float targets[19];
    vf wx[32];
    for (int k = 0; k < 19; k++) {
        const int step = k == 0 ? 0 : (k <= 9 ? k - 10 : k - 9);
        targets[k] = (float)nmax + 0.1f * (float)step;
    }
    for (int i = 0; i < n; i++) wx[i] = w[i] * x[i];
    const vf max = v_signed_absmax(x, n);
    const vi zero = vabs(max) < F(GROUP_MAX_EPS);
    return qx_search_f(n, nmax, targets, 19, x, w, wx, sel(zero, F(1.0f), max), zero, L);
}

/* nemoq's search with float64 targets: writes the 8 scales, and the levels (L[i][h]: lanes
 * 4h .. 4h + 3) when L is not NULL. */
static void v_make_qx_quants_d(int n, int nmax, const double * targets, int ntargets,
                               const vf * x, const vf * w, double * scale_out, vd (*L)[2]) {
    const vf max = v_signed_absmax(x, n);
    const vi zero = vabs(max) < F(GROUP_MAX_EPS);
    const vf max1 = sel(zero, F(1.0f), max);
    for (int h = 0; h < 2; h++) {
        vd xd[32], wd[32], wxd[32], Lh[32];
        for (int i = 0; i < n; i++) {
            xd[i] = half_d(x[i], h);
            wd[i] = half_d(w[i], h);
            wxd[i] = half_d(w[i] * x[i], h);
        }
        const vd scale = qx_search_d(n, nmax, targets, ntargets, xd, wd, wxd, half_d(max1, h),
                                     half_mask(zero, h), L ? Lh : NULL);
        if (L) for (int i = 0; i < n; i++) L[i][h] = Lh[i];
        memcpy(scale_out + 4 * h, &scale, sizeof scale);
    }
}

#endif
