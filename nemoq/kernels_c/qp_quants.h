/* make_qp_quants (ggml's), one super-block at a time: the 8 group scales (or mins) of a K-quant
 * super-block as levels in [0, nmax] times one scale: an iscale search, then coordinate descent on
 * single levels. Plain scalar float32, shared by the K-quant kernels in C (quants_k.c) and CUDA
 * (quants_k.cuh), so both do the same operations in the same order. */
#ifndef NEMOQ_QP_QUANTS_H
#define NEMOQ_QP_QUANTS_H

#include <math.h>

#include "scalar_common.h"

NQ_HD float make_qp_quants(const float * x, const float * w, int n, int nmax, float * L) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = np_maxf(max, x[i]);
    const int zero = max < GROUP_MAX_EPS;
    if (zero) max = 1.0f;
    const float fnmax = (float)nmax;

    float iscale = fnmax / max, best = 0.0f;
    {
        const float scale = 1.0f / iscale;
        for (int i = 0; i < n; i++) {
            const float diff = x[i] - scale * rintf(iscale * x[i]);
            best += (w[i] * diff) * diff;
        }
    }
    for (int step = -4; step <= 4; step++) {
        if (step == 0) continue;
        const float is = (0.1f * (float)step + fnmax) / max;
        const float scale = 1.0f / is;
        float err = 0.0f;
        for (int i = 0; i < n; i++) {
            const float diff = x[i] - scale * np_minf(fnmax, rintf(is * x[i]));
            err += (w[i] * diff) * diff;
        }
        if (err < best) {
            best = err;
            iscale = is;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) L[i] = np_minf(fnmax, rintf(iscale * x[i]));
    for (int i = 0; i < n; i++) sumlx += (w[i] * x[i]) * L[i];
    for (int i = 0; i < n; i++) suml2 += (w[i] * L[i]) * L[i];
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            const float wi = w[i], xi = x[i], li = L[i];
            const float slx_rest = sumlx - (wi * xi) * li;
            const float sl2_rest = suml2 - (wi * li) * li;
            const float new_l = np_minf(fnmax, rintf((xi * sl2_rest) / slx_rest));
            const float slx = slx_rest + (wi * xi) * new_l;
            const float sl2 = sl2_rest + (wi * new_l) * new_l;
            if (slx_rest > 0.0f && sl2_rest > 0.0f && new_l != li && (slx * slx) * suml2 > (sumlx * sumlx) * sl2) {
                L[i] = new_l;
                sumlx = slx;
                suml2 = sl2;
                changed = 1;
            }
        }
        if (!changed) break;   /* a pass that changes nothing leaves the next ones nothing to do */
    }
    if (zero) {
        for (int i = 0; i < n; i++) L[i] = 0.0f;
        return 0.0f;
    }
    return divf(sumlx, suml2);
}

#endif
