/* Half-precision storage to float32, exactly (numpy's astype(np.float32) for f16, a shift for
 * bf16), at memory speed: numpy's f16 cast is a scalar loop (~0.7 GB/s here). */
#include <stdint.h>
#include <string.h>

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    uint32_t bits = em << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f;                       /* rebias the exponent; exact, subnormals included */
    memcpy(&bits, &f, 4);
    if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;   /* inf and NaN keep their payload */
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}

void nemoq_widen_f16(const uint16_t * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

void nemoq_widen_bf16(const uint16_t * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &bits, 4);
    }
}
