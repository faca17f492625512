// K-quant super-blocks (Q4_K, Q5_K) for quants.cu: one GPU thread per 256 values, the C kernels'
// (quants_k.c) per-lane arithmetic as scalar code, group after group.
#pragma once

#include "qp_quants.h"
#include "quants_common.cuh"

namespace {

// ---- Q4_K and Q5_K (q4_k.py, q5_k.py): 8 groups of 32 levels in [0, nmax], 6-bit scales ----

// make_qkx_quants for one group of 32: x ~ scale * L - min, L in [0, nmax]; returns the scale,
// writes -min (the stored min) and L.
HD float make_qkx_quants(int nmax, float rmin, float rdelta, int nstep, const float * x, Weights w,
                         float * the_min, float * L) {
    const float fn = (float)nmax;
    float mn = x[0], mx = x[0], sum_w = 0.0f, sum_x = 0.0f, best = 0.0f;
    for (int i = 1; i < 32; i++) { mn = np_minf(x[i], mn); mx = np_maxf(x[i], mx); }   // the first of equals stays
    for (int i = 0; i < 32; i++) { sum_w += w[i]; sum_x += w[i] * x[i]; }
    mn = mn > 0.0f ? 0.0f : mn;
    const bool flat = mx <= mn;
    const float iscale = fn / (flat ? 1.0f : mx - mn);
    float scale = 1.0f / iscale;
    for (int i = 0; i < 32; i++) {
        L[i] = clip(rintf((x[i] - mn) * iscale), 0.0f, fn);
        const float diff = ((scale * L[i]) + mn) - x[i];
        best += w[i] * (diff * diff);
    }
    float lv[32];
    for (int step = 0; step <= nstep; step++) {
        const float is = ((rmin + rdelta * (float)step) + fn) / (flat ? 1.0f : mx - mn);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f, cur = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float v = clip(rintf((x[i] - mn) * is), 0.0f, fn);
            const float wl = w[i] * v;
            lv[i] = v;
            sum_l += wl;
            sum_l2 += wl * v;
            sum_xl += wl * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        const float s = (sum_w * sum_xl - sum_x * sum_l) / det;
        const float m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const bool positive = m > 0.0f;
        const float this_scale = positive ? sum_xl / sum_l2 : s;
        const float this_min = positive ? 0.0f : m;
        for (int i = 0; i < 32; i++) {
            const float diff = ((this_scale * lv[i]) + this_min) - x[i];
            cur += w[i] * (diff * diff);
        }
        if (det > 0.0f && cur < best) {
            best = cur;
            scale = this_scale;
            mn = this_min;
            for (int i = 0; i < 32; i++) L[i] = lv[i];
        }
    }
    if (flat) for (int i = 0; i < 32; i++) L[i] = 0.0f;
    *the_min = -mn;
    return flat ? 0.0f : scale;
}

struct KQuant {  // one super-block: value 32g + i is level L[32g + i] of group g
    float d, dmin, sc[8], m[8], L[256];
};

// Q4_K.levels: nearest levels for the stored scales and mins (groups with d * sc = 0 keep L).
HD void k_levels(const float * x, KQuant & k, int nmax) {
    for (int g = 0; g < 8; g++) {
        const float dd = k.d * k.sc[g], dm = k.dmin * k.m[g];
        if (dd == 0.0f) continue;
        for (int i = 0; i < 32; i++) k.L[32 * g + i] = clip(rintf((x[32 * g + i] + dm) / dd), 0.0f, (float)nmax);
    }
}

// Q4_K.fit: group fits, then the 6-bit scales and mins.
HD void k_fit(const float * x, Weights w, int nmax, float rmin, float rdelta, int nstep, KQuant & k) {
    float scales[8], mins[8], sws[8], L[8];
    for (int g = 0; g < 8; g++) {
        scales[g] = make_qkx_quants(nmax, rmin, rdelta, nstep, x + 32 * g, w.at(32 * g), &mins[g], k.L + 32 * g);
        float sw = 0.0f;
        for (int i = 0; i < 32; i++) sw += w[32 * g + i];
        sws[g] = sw;
    }
    k.d = f16_round(make_qp_quants(scales, sws, 8, 63, L));
    for (int g = 0; g < 8; g++) k.sc[g] = L[g];
    k.dmin = f16_round(make_qp_quants(mins, sws, 8, 63, L));
    for (int g = 0; g < 8; g++) k.m[g] = L[g];
    k_levels(x, k, nmax);
}

// Q4_K.ggml_ref (quantize_row_q4_K_ref): weights rms|x| + |x|, scales and mins as 63 * v / max.
HD void k_ggml_ref(const float * x, int nmax, float rmin, float rdelta, int nstep, KQuant & k) {
    float scales[8], mins[8];
    for (int g = 0; g < 8; g++) {
        const float * xg = x + 32 * g;
        float av_x = 0.0f, w[32];
        for (int i = 0; i < 32; i++) av_x += xg[i] * xg[i];
        av_x = sqrtf(av_x / 32.0f);
        for (int i = 0; i < 32; i++) w[i] = av_x + fabsf(xg[i]);
        scales[g] = make_qkx_quants(nmax, rmin, rdelta, nstep, xg, Weights{w}, &mins[g], k.L + 32 * g);
    }
    float max_scale = scales[0], max_min = mins[0];
    for (int g = 1; g < 8; g++) {
        max_scale = np_maxf(max_scale, scales[g]);
        max_min = np_maxf(max_min, mins[g]);
    }
    max_scale = np_maxf(max_scale, 0.0f);
    max_min = np_maxf(max_min, 0.0f);
    const float iscale = divf(63.0f, max_scale), imin = divf(63.0f, max_min);
    for (int g = 0; g < 8; g++) {
        k.sc[g] = clip(rintf(iscale * scales[g]), 0.0f, 63.0f);
        k.m[g] = clip(rintf(imin * mins[g]), 0.0f, 63.0f);
    }
    k.d = f16_round(max_scale / 63.0f);
    k.dmin = f16_round(max_min / 63.0f);
    k_levels(x, k, nmax);
}

// Q4_K.refit: with d and dmin fixed, each group's least-squares scale and min for its levels,
// rounded to 6 bits; then the levels again (twice).
HD void k_refit(const float * x, Weights w, int nmax, KQuant & k) {
    for (int it = 0; it < 2; it++) {
        for (int g = 0; g < 8; g++) {
            const float * xg = x + 32 * g;
            const Weights wg = w.at(32 * g);
            const float * L = k.L + 32 * g;
            float sum_w = 0.0f, sum_x = 0.0f, sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
            for (int i = 0; i < 32; i++) sum_w += wg[i];
            for (int i = 0; i < 32; i++) sum_x += wg[i] * xg[i];
            for (int i = 0; i < 32; i++) {
                const float wl = wg[i] * L[i];
                sum_l += wl;
                sum_l2 += wl * L[i];
                sum_xl += wl * xg[i];
            }
            const float det = sum_w * sum_l2 - sum_l * sum_l;
            const float scale = divf(sum_w * sum_xl - sum_x * sum_l, det);
            const float neg_min = divf(sum_l * sum_xl - sum_l2 * sum_x, det);
            if (det > 0.0f) {
                k.sc[g] = clip(rintf(divf(scale, k.d)), 0.0f, 63.0f);
                k.m[g] = clip(rintf(divf(neg_min, k.dmin)), 0.0f, 63.0f);
            }
        }
        k_levels(x, k, nmax);
    }
}

template <int T>
HD void pack_k(uint8_t * o, const KQuant & k) {
    put_f16(o, k.d);
    put_f16(o + 2, k.dmin);
    int sc[8], m[8];
    for (int g = 0; g < 8; g++) {
        sc[g] = (int)k.sc[g];
        m[g] = (int)k.m[g];
    }
    for (int j = 0; j < 4; j++) {
        o[4 + j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        o[8 + j] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
        o[12 + j] = (uint8_t)((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
    }
    uint8_t * qs = o + (T == Q4_K ? 16 : 48);
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            const int lo = (int)k.L[32 * (2 * c) + l], hi = (int)k.L[32 * (2 * c + 1) + l];
            qs[32 * c + l] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
        }
    if constexpr (T == Q5_K)
        for (int l = 0; l < 32; l++) {
            int qh = 0;
            for (int g = 0; g < 8; g++) qh |= (((int)k.L[32 * g + l] >> 4) & 1) << g;
            o[16 + l] = (uint8_t)qh;
        }
}

// Value 32g + l of a packed super-block (quants_k.c's dequant_block_q4_k / q5_k).
template <int T>
HD float dequant_k(const uint8_t * b, int g, int l) {
    const uint8_t * s = b + 4;
    const int sc = g < 4 ? s[g] & 63 : (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
    const int m = g < 4 ? s[g + 4] & 63 : (s[g + 4] >> 4) | (s[g] >> 6) << 4;
    const float dd = get_f16(b) * (float)sc, dm = get_f16(b + 2) * (float)m;
    int q = (b[(T == Q4_K ? 16 : 48) + 32 * (g / 2) + l] >> (4 * (g % 2))) & 15;
    if constexpr (T == Q5_K) q |= ((b[16 + l] >> g) & 1) << 4;
    return dd * (float)q - dm;
}

// Format.best_of's error of a packed candidate: numpy's pairwise sum of (w * diff) * diff over
// 256 values (two halves of 128, each with 8 accumulators), from the identity 0.
template <int T>
HD float block_error_k(const float * x, const uint8_t * b, Weights w) {
    float halves[2];
    for (int h = 0; h < 2; h++) {
        float r[8];
        for (int i = 0; i < 128; i += 8)
            for (int j = 0; j < 8; j++) {
                const int v = 128 * h + i + j;
                const float diff = x[v] - dequant_k<T>(b, v / 32, v % 32);
                const float t = (w[v] * diff) * diff;
                r[j] = i == 0 ? t : r[j] + t;
            }
        halves[h] = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    }
    return 0.0f + (halves[0] + halves[1]);
}

template <int T>
HD void quantize_unit_k(const float * x, Weights w, uint8_t * o) {
    constexpr bool is5 = T == Q5_K;
    constexpr int nmax = is5 ? 31 : 15, bytes = Unit<T>::bytes;
    // (rmin, rdelta, nstep) of ggml's _ref search and of ours; with importance ggml's is (-0.9, 0.05, 36)
    const float ref_rmin = is5 ? -0.5f : -1.0f, ref_rdelta = 0.1f;
    const int ref_nstep = is5 ? 15 : 20;
    const float our_rmin = is5 ? -3.0f : -1.5f, our_rdelta = is5 ? 0.8f : 0.4f;
    uint8_t cand[3][bytes];
    KQuant k;
    if (!w.p) {
        k_ggml_ref(x, nmax, ref_rmin, ref_rdelta, ref_nstep, k);
    } else {
        // sigma2 = 2 * sum(x^2) / 256, added in order as ggml
        float s = 0.0f, qw[256];
        for (int v = 0; v < 256; v++) s += x[v] * x[v];
        const float sigma2 = (2.0f * s) / 256.0f;
        for (int v = 0; v < 256; v++) qw[v] = w[v] * sqrtf(sigma2 + x[v] * x[v]);
        k_fit(x, Weights{qw}, nmax, -0.9f, 0.05f, 36, k);
    }
    pack_k<T>(cand[0], k);
    k_fit(x, w, nmax, our_rmin, our_rdelta, 15, k);  // ours
    pack_k<T>(cand[1], k);
    k_refit(x, w, nmax, k);                          // ours, refitted
    pack_k<T>(cand[2], k);
    // np.argmin over the errors: the first minimum, a NaN wins
    int best = 0;
    float err[3];
    for (int c = 0; c < 3; c++) err[c] = block_error_k<T>(x, cand[c], w);
    for (int c = 1; c < 3; c++) {
        if (err[best] != err[best]) break;
        if (err[c] < err[best] || err[c] != err[c]) best = c;
    }
    for (int j = 0; j < bytes; j++) o[j] = cand[best][j];
}

}  // namespace
