/* Half-precision storage to float32, exactly (numpy's astype(np.float32) for f16, a shift for
 * bf16), at memory speed: numpy's f16 cast is a scalar loop (~0.7 GB/s here). */
#include <stdint.h>
#include <string.h>

#include "scalar_common.h"

void nemoq_widen_f16(const uint16_t * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fp16_to_fp32_rebias(src[i]);
}

void nemoq_widen_bf16(const uint16_t * src, float * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &bits, 4);
    }
}
