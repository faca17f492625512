// Shared by quants.cu and quants_k.cuh: ggml type ids, the unit each GPU thread quantizes, and
// the scalar helpers of the C kernels (half floats, numpy's min / max / clip, divide), all
// __host__ __device__ so the CPU run of quants.cu does exactly what the GPU does.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
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

}  // namespace
