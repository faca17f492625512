// Block quantizers on an NVIDIA GPU for NVFP4, Q8_0, Q4_K and Q5_K: the CUDA twin of the C kernels
// (quants_fp4.c, quants_legacy.c, quants_k.c), bit for bit (Python side: cuda_quant.py; numpy
// references: nemoq/quant/formats/).
//
// One thread per unit: a Q8_0 block (32 values), an NVFP4 group (16 values of a 64-value block;
// the 4 threads of a block write disjoint bytes) or a K super-block (256 values). Each thread runs
// the C kernels' per-lane arithmetic as plain scalar code: same candidates, same order of sums from
// +0, same tie rules, float32 where the C is float32 (no float64 in these formats). Built with
// -fmad=false (no fused multiply-adds, like the C kernels' -ffp-contract=off), IEEE division and
// square roots (nvcc's defaults), denormals kept.
//
// The per-unit code is __host__ __device__: nemoq_quant_cuda_rows(..., emulate = 1, ...) runs the
// same source on the CPU, so tests compare it with the C kernels where no GPU is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#define HD __host__ __device__ inline

namespace {

enum : int { Q8_0 = 8, Q4_K = 12, Q5_K = 13, NVFP4 = 40 };  // ggml type ids

// Values per thread and (values, bytes) per stored block of each format.
template <int T> struct Unit;
template <> struct Unit<Q8_0> { static constexpr int values = 32, block = 32, bytes = 34; };
template <> struct Unit<NVFP4> { static constexpr int values = 16, block = 64, bytes = 36; };
template <> struct Unit<Q4_K> { static constexpr int values = 256, block = 256, bytes = 144; };
template <> struct Unit<Q5_K> { static constexpr int values = 256, block = 256, bytes = 176; };

template <typename F>
bool with_format(int type, F && f) {
    switch (type) {
        case Q8_0: f.template operator()<Q8_0>(); return true;
        case NVFP4: f.template operator()<NVFP4>(); return true;
        case Q4_K: f.template operator()<Q4_K>(); return true;
        case Q5_K: f.template operator()<Q5_K>(); return true;
        default: return false;
    }
}

// ---- scalars: half floats, numpy's min / max / clip, rounding ----

HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

HD uint32_t as_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

// IEEE half <-> float, round to nearest even (the C kernels' fp32_to_fp16 / fp16_to_fp32).
HD uint16_t fp32_to_fp16(float f) {
    const uint32_t x = as_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t mant = x & 0x7fffffu;
    int32_t exp = (int32_t)((x >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    exp -= 127 - 15;
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        const uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1);
        const uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

HD float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
    if (exp == 0x1f) x = sign | 0x7f800000u | (mant << 13);
    else if (exp) x = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) x = sign;
    else {  // subnormal half: normalise
        exp = 113;
        while (!(mant & 0x400u)) { mant <<= 1; exp--; }
        x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    return as_float(x);
}

HD float f16_round(float f) { return fp16_to_fp32(fp32_to_fp16(f)); }

HD void put_f16(uint8_t * p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

HD float get_f16(const uint8_t * p) { return fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }

// np.minimum / np.maximum: NaN propagates, on equality the second operand comes back.
HD float np_minf(float a, float b) { return (a < b || a != a) ? a : b; }
HD float np_maxf(float a, float b) { return (a > b || a != a) ? a : b; }
// lanes.h's vclip (constant bounds): a bound replaces a value equal to it, so -0 becomes +0.
HD float clip(float v, float lo, float hi) {
    v = v <= lo ? lo : v;
    return v >= hi ? hi : v;
}
// search.divide: a / b where b != 0, else 0.
HD float divf(float a, float b) { return b != 0.0f ? a / b : 0.0f; }

// Importance weights of a unit, or all ones without an importance vector.
struct Weights {
    const float * p;
    HD float operator[](int i) const { return p ? p[i] : 1.0f; }
    HD Weights at(int offset) const { return {p ? p + offset : nullptr}; }
};

// ---- Q8_0 (ggml's quantize_row_q8_0_ref; importance ignored, as ggml) ----

HD void quantize_unit_q8_0(const float * x, Weights, uint8_t * o) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(o, d);
    for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);  // ties away, as ggml
}

// ---- NVFP4 (nvfp4.py): one group of 16 E2M1 values with a UE4M3 scale ----

HD float ue4m3(int code) {  // nvfp4.UE4M3: 0 and 0x7F mean zero
    const uint32_t exp = (code >> 3) & 0xF, man = code & 7;
    if (code == 0 || code == 0x7F) return 0.0f;
    return exp == 0 ? (float)man * 0.001953125f : as_float((exp + 120u) << 23 | man << 20);
}

HD int fp32_to_ue4m3(float x) {  // round to nearest on 3 mantissa bits, saturating to 0x7E
    if (!(x > 0.0f)) return 0;
    x = np_minf(x, 448.0f);
    const uint32_t bits = as_bits(x);
    const int exp = (int)((bits >> 23) & 0xFF) - 127 + 7;
    int man = (int)(((bits >> 20) & 7) + ((bits >> 19) & 1));
    if (exp <= 0) {
        const int64_t sub = (int64_t)(x * 512.0f + 0.5f);
        return sub < 0 ? 0 : (sub > 7 ? 7 : (int)sub);
    }
    int rexp = exp;
    if (man > 7) { rexp = exp + 1; man = 0; }
    return rexp >= 15 ? 0x7E : (rexp << 3) | man;
}

// mxfp4.E2M1_GRID with ties down: the index of the nearest magnitude is #mids < ceil(4 v).
HD int e2m1_index(float v) {
    const float K = ceilf(v * 4.0f);
    const float mids[7] = {1, 3, 5, 7, 10, 14, 20};
    int c = 0;
    for (int k = 0; k < 7; k++) c += mids[k] < K;
    return c;
}

HD float e2m1_value(int m) {
    const float values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return values[m];
}

HD void quantize_unit_nvfp4(const float * x, Weights w, uint8_t * block, int g) {
    const int steps[10] = {0, -8, -7, -6, -5, -4, -3, -2, -1, 1};  // codes tried, relative to ggml's
    float amax = fabsf(x[0]);
    for (int i = 1; i < 16; i++) amax = np_maxf(amax, fabsf(x[i]));
    const int ggml_code = fp32_to_ue4m3(amax / 6.0f);
    // best_e2m1_scale: the candidate with the lowest weighted error (first on ties)
    int pick_code = 0;
    float best = 0.0f;
    for (int k = 0; k < 10; k++) {
        int c = ggml_code;
        if (k > 0) {
            c += steps[k];
            c = amax > 0.0f ? (c < 1 ? 1 : (c > 0x7E ? 0x7E : c)) : 0;
        }
        const float scale = ue4m3(c), inv = divf(1.0f, scale);
        float err = 0.0f;
        for (int i = 0; i < 16; i++) {
            const float ax = fabsf(x[i]);
            const float diff = ax - scale * e2m1_value(e2m1_index(ax * inv));
            err += (w[i] * diff) * diff;
        }
        if (k == 0 || err < best) {
            best = err;
            pick_code = c;
        }
    }
    // e2m1_encode: the nearest nibble, checking the neighbours by |v * scale - |x||
    const float scale = ue4m3(pick_code), inv = divf(1.0f, scale);
    int nib[16];
    for (int i = 0; i < 16; i++) {
        const float ax = fabsf(x[i]);
        int m = e2m1_index(ax * inv);
        const int lower = (m > 1 ? m : 1) - 1;
        if (fabsf(e2m1_value(lower) * scale - ax) <= fabsf(e2m1_value(m) * scale - ax)) m = lower;
        const int upper = m + 1 < 7 ? m + 1 : 7;
        if (fabsf(e2m1_value(upper) * scale - ax) < fabsf(e2m1_value(m) * scale - ax)) m = upper;
        nib[i] = m + ((x[i] < 0.0f && m > 0) ? 8 : 0);
    }
    block[g] = (uint8_t)pick_code;
    for (int j = 0; j < 8; j++) block[4 + 8 * g + j] = (uint8_t)(nib[j] | nib[j + 8] << 4);
}

// ---- Q4_K and Q5_K (q4_k.py, q5_k.py): 8 groups of 32 levels in [0, nmax], 6-bit scales ----

constexpr float GROUP_MAX_EPS = 1e-15f;

// make_qkx_quants for one group of 32: x ~ scale * L - min, L in [0, nmax]; returns the scale,
// writes -min (the stored min) and L.
HD float make_qkx_quants(int nmax, float rmin, float rdelta, int nstep, const float * x, Weights w,
                         float * the_min, float * L) {
    const float fn = (float)nmax;
    float mn = x[0], mx = x[0], sum_w = 0.0f, sum_x = 0.0f, best = 0.0f;
    for (int i = 1; i < 32; i++) { mn = np_minf(mn, x[i]); mx = np_maxf(mx, x[i]); }
    for (int i = 0; i < 32; i++) { sum_w += w[i]; sum_x += w[i] * x[i]; }
    mn = np_minf(mn, 0.0f);
    const bool flat = mx <= mn;
    const float iscale = fn / (flat ? 1.0f : mx - mn);
    float scale = 1.0f / iscale;
    for (int i = 0; i < 32; i++) {
        L[i] = clip(rintf((x[i] - mn) * iscale), 0.0f, fn);
        const float diff = ((scale * L[i]) + mn) - x[i];
        best += (w[i] * diff) * diff;
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
            cur += (w[i] * diff) * diff;
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

// make_qp_quants: the 8 group scales (or mins) as levels in [0, nmax] times one scale.
HD float make_qp_quants(const float * x, const float * w, int n, int nmax, float * L) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = np_maxf(max, x[i]);
    const bool zero = max < GROUP_MAX_EPS;
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
        bool changed = false;
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
                changed = true;
            }
        }
        if (!changed) break;
    }
    if (zero) {
        for (int i = 0; i < n; i++) L[i] = 0.0f;
        return 0.0f;
    }
    return divf(sumlx, suml2);
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
        // sigma2 = 2 * sum(x^2) / 256, summed value-major: value i of each group g in turn
        float s = 0.0f, qw[256];
        for (int i = 0; i < 32; i++)
            for (int g = 0; g < 8; g++) s += x[32 * g + i] * x[32 * g + i];
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

// ---- unit u of a (rows, n) matrix: where its values, weights and bytes are ----

template <int T>
HD void quantize_unit(const float * x, uint8_t * out, int64_t n, const float * importance, int64_t u) {
    const int64_t per_row = n / Unit<T>::values, r = u / per_row, c = u % per_row;
    const int64_t col = c * Unit<T>::values;
    const float * xu = x + r * n + col;
    const Weights w{importance ? importance + col : nullptr};
    uint8_t * row = out + r * (n / Unit<T>::block * Unit<T>::bytes);
    if constexpr (T == Q8_0) quantize_unit_q8_0(xu, w, row + c * Unit<T>::bytes);
    else if constexpr (T == NVFP4) quantize_unit_nvfp4(xu, w, row + (c / 4) * Unit<T>::bytes, (int)(c % 4));
    else quantize_unit_k<T>(xu, w, row + c * Unit<T>::bytes);
}

constexpr int THREADS = 128;

template <int T>
__global__ void quantize_kernel(const float * x, uint8_t * out, int64_t n, const float * importance, int64_t units) {
    const int64_t u = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (u < units) quantize_unit<T>(x, out, n, importance, u);
}

void set_error(char * err, int errlen, const char * what, cudaError_t e) {
    if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "%s: %s", what, cudaGetErrorString(e));
}

struct DeviceBuffer {  // freed when it goes out of scope
    void * p = nullptr;
    ~DeviceBuffer() { if (p) cudaFree(p); }
};

struct Events {  // a timed kernel launch
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
        if (start) cudaEventDestroy(start);
        if (stop) cudaEventDestroy(stop);
    }
};

}  // namespace

// ---- the C interface (ctypes); 0 on success, else -1 with a message in err ----

extern "C" {

int nemoq_quant_cuda_supports(int type) {
    int values = 0;
    with_format(type, [&]<int T>() { values = Unit<T>::values; });
    return values > 0;
}

int nemoq_quant_cuda_device_count(char * err, int errlen) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        set_error(err, errlen, "cudaGetDeviceCount", e);
        return 0;
    }
    return n;
}

// out (nrows, n / block * bytes) = the rows of x (nrows, n) quantized to ggml type `type`;
// importance: n weights or NULL. All pointers are host memory. emulate: run the same per-unit
// code on the CPU instead. kernel_ms (may be NULL): the kernel's own time, without the copies.
int nemoq_quant_cuda_rows(int type, const float * x, uint8_t * out, int64_t nrows, int64_t n,
                          const float * importance, int emulate, float * kernel_ms, char * err, int errlen) {
    int64_t block = 0, bytes = 0, values = 0;
    with_format(type, [&]<int T>() { block = Unit<T>::block, bytes = Unit<T>::bytes, values = Unit<T>::values; });
    if (!block || n % block || nrows < 0) {
        if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "type %d cannot hold rows of %lld", type, (long long)n);
        return -1;
    }
    const int64_t units = nrows * (n / values);
    if (kernel_ms) *kernel_ms = 0.0f;
    if (emulate) {
        with_format(type, [&]<int T>() {
            for (int64_t u = 0; u < units; u++) quantize_unit<T>(x, out, n, importance, u);
        });
        return 0;
    }
    if (!units) return 0;
    DeviceBuffer d_x, d_out, d_imp;
    const size_t x_bytes = sizeof(float) * (size_t)(nrows * n), out_bytes = (size_t)(nrows * (n / block) * bytes);
    cudaError_t e;
    if ((e = cudaMalloc(&d_x.p, x_bytes)) != cudaSuccess || (e = cudaMalloc(&d_out.p, out_bytes)) != cudaSuccess ||
        (importance && (e = cudaMalloc(&d_imp.p, sizeof(float) * (size_t)n)) != cudaSuccess)) {
        set_error(err, errlen, "cudaMalloc", e);
        return -1;
    }
    if ((e = cudaMemcpy(d_x.p, x, x_bytes, cudaMemcpyHostToDevice)) != cudaSuccess ||
        (importance && (e = cudaMemcpy(d_imp.p, importance, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice)) != cudaSuccess)) {
        set_error(err, errlen, "copy to device", e);
        return -1;
    }
    Events ev;
    if ((e = cudaEventCreate(&ev.start)) != cudaSuccess || (e = cudaEventCreate(&ev.stop)) != cudaSuccess) {
        set_error(err, errlen, "cudaEventCreate", e);
        return -1;
    }
    const unsigned grid = (unsigned)((units + THREADS - 1) / THREADS);
    cudaEventRecord(ev.start);
    with_format(type, [&]<int T>() {
        quantize_kernel<T><<<grid, THREADS>>>((const float *)d_x.p, (uint8_t *)d_out.p, n, (const float *)d_imp.p, units);
    });
    cudaEventRecord(ev.stop);
    if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaEventSynchronize(ev.stop)) != cudaSuccess) {
        set_error(err, errlen, "kernel", e);
        return -1;
    }
    if (kernel_ms) cudaEventElapsedTime(kernel_ms, ev.start, ev.stop);
    if ((e = cudaMemcpy(out, d_out.p, out_bytes, cudaMemcpyDeviceToHost)) != cudaSuccess) {
        set_error(err, errlen, "copy from device", e);
        return -1;
    }
    return 0;
}

}  // extern "C"
