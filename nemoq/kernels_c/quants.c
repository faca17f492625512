/* Block quantizers in portable C, bit-identical to the numpy references in nemoq/quant/formats.
 * Each function handles `nrows` rows of `n_per_row` values; the caller splits rows across
 * threads (ctypes releases the GIL), so the C code stays single-threaded and simple. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK8_0 32

/* IEEE half <-> float, round to nearest even (what numpy's astype(float16) does). */
static uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
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

static float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
    if (exp == 0x1f) x = sign | 0x7f800000u | (mant << 13);
    else if (exp) x = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) x = sign;
    else {  /* subnormal half: normalise */
        exp = 113;
        while (!(mant & 0x400u)) { mant <<= 1; exp--; }
        x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* C's roundf: ties away from zero, as ggml. */
static inline float round_half_away(float x) { return roundf(x); }

void nemoq_quantize_q8_0(const float * x, uint8_t * out, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const float * xr = x + r * n_per_row;
        uint8_t * o = out + r * nb * (2 + QK8_0);
        for (int64_t b = 0; b < nb; b++, o += 2 + QK8_0) {
            const float * xb = xr + b * QK8_0;
            float amax = 0.0f;
            for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t dh = fp32_to_fp16(d);
            memcpy(o, &dh, 2);
            for (int j = 0; j < QK8_0; j++) o[2 + j] = (uint8_t)(int8_t)round_half_away(xb[j] * id);
        }
    }
}

void nemoq_dequantize_q8_0(const uint8_t * data, float * y, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = n_per_row / QK8_0;
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t * q = data + r * nb * (2 + QK8_0);
        float * yr = y + r * n_per_row;
        for (int64_t b = 0; b < nb; b++, q += 2 + QK8_0) {
            uint16_t dh;
            memcpy(&dh, q, 2);
            const float d = fp16_to_fp32(dh);
            for (int j = 0; j < QK8_0; j++) yr[b * QK8_0 + j] = d * (float)(int8_t)q[2 + j];
        }
    }
}
