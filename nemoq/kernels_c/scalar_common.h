/* Scalars shared by the C kernels (quants.h, widen.c) and their CUDA twins
 * (quants_common.cuh, moe.cu): half floats, the E8M0 / UE4M3 scales of the FP4 formats, numpy's
 * min / max / divide. One source, so the CPU and the GPU turn the same bytes into the same floats.
 *
 * C11 and CUDA C++ alike: under nvcc each helper is __host__ __device__ (the emulation builds run
 * them on the CPU). build.py hashes this header into the C library's cache key; cuda.py hashes
 * every file a .cu includes into the CUDA libraries' keys. */
#ifndef NEMOQ_SCALAR_COMMON_H
#define NEMOQ_SCALAR_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define NQ_HD static __host__ __device__ inline
#else
#define NQ_HD static inline
#endif

/* ggml's GROUP_MAX_EPS: a group whose largest value is below it quantizes to zero */
#define GROUP_MAX_EPS 1e-15f

/* float <-> its IEEE bits */
#ifdef __CUDA_ARCH__
NQ_HD float as_float(uint32_t u) { return __uint_as_float(u); }
NQ_HD uint32_t as_bits(float f) { return __float_as_uint(f); }
#else
NQ_HD float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
NQ_HD uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
#endif

/* ---- IEEE half ---- */

/* float -> half, round to nearest even (what numpy's astype(float16) does). */
NQ_HD uint16_t fp32_to_fp16(float f) {
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

/* half -> float in integer operations only: exact whatever the floating-point mode (the
 * quantizers, which must equal numpy everywhere). */
NQ_HD float fp16_to_fp32(uint16_t h) {
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
    return as_float(x);
}

/* The same value without branches or loops, for widening whole tensors (widen.c): shift into a float's
 * exponent and mantissa, then 2^112 rebiases normals and subnormals alike (exact, as long as
 * subnormals are not flushed to zero); inf and NaN keep an all-ones exponent. */
NQ_HD float fp16_to_fp32_rebias(uint16_t h) {
    const uint32_t em = h & 0x7fffu;
    uint32_t bits = as_bits(as_float(em << 13) * 0x1p112f);
    if (em >= 0x7c00u) bits = 0x7f800000u | em << 13;
    return as_float(bits | (uint32_t)(h & 0x8000u) << 16);   /* the sign as a bit: vectorises */
}

NQ_HD float f16_round(float f) { return fp16_to_fp32(fp32_to_fp16(f)); }

/* C's roundf (ties away from zero, as ggml) without a libm call or a branch: x86 compilers call
 * libm's roundf per value, and a branch on the tie mispredicts. x - truncf(x) is exact. */
NQ_HD float round_half_away(float x) {
    const float t = truncf(x);
    return t + (float)(fabsf(x - t) >= 0.5f) * copysignf(1.0f, x);
}

/* little-endian halves in a block */
NQ_HD void put_f16(uint8_t * p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

NQ_HD float get_f16(const uint8_t * p) { return fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }
NQ_HD float get_f16_rebias(const uint8_t * p) { return fp16_to_fp32_rebias((uint16_t)(p[0] | (p[1] << 8))); }

/* ---- numpy's element-wise operations ---- */

/* np.minimum / np.maximum: NaN propagates, and on equality the second operand comes back. */
NQ_HD float np_minf(float a, float b) { return (a < b || a != a) ? a : b; }
NQ_HD float np_maxf(float a, float b) { return (a > b || a != a) ? a : b; }

/* search.divide: a / b where b != 0, else 0 (float32 operands). */
NQ_HD float divf(float a, float b) { return b != 0.0f ? a / b : 0.0f; }

/* ---- FP4 scales (mxfp4.py, nvfp4.py) ---- */

/* Half the E8M0 scale, 2^(e - 128), from bits, as ggml_e8m0_to_fp32_half (denormal for e < 2). */
NQ_HD float e8m0_half(uint8_t e) { return as_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23); }

/* nvfp4.UE4M3's scale of a code times 2^-shift: 4 exponent bits (bias 7) and 3 mantissa bits in
 * the low 7 bits (the top bit is ignored); codes 0 and 0x7F mean zero. Exact for shift 0 and 1. */
NQ_HD float ue4m3_shifted(uint8_t code, uint32_t shift) {
    const uint32_t exp = (code >> 3) & 0xfu, man = code & 7u;
    if (code == 0x7f) return 0.0f;
    return exp == 0 ? (float)man * as_float((118u - shift) << 23) : as_float((exp + 120u - shift) << 23 | man << 20);
}

NQ_HD float ue4m3(uint8_t code) { return ue4m3_shifted(code, 0); }
/* for tables of doubled E2M1 values (ggml's kvalues_mxfp4) */
NQ_HD float ue4m3_half(uint8_t code) { return ue4m3_shifted(code, 1); }

/* float -> UE4M3 code: round to nearest on 3 mantissa bits, saturating to 0x7E. */
NQ_HD int fp32_to_ue4m3(float x) {
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

#endif
