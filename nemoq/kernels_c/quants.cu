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
#include <cstdio>

#include "cuda_host.cuh"
#include "quants_common.cuh"
#include "quants_k.cuh"

namespace {

template <typename F>
bool with_format(int type, F && f) {
    return with_type<Q8_0, NVFP4, Q4_K, Q5_K>(type, f);
}

// ---- Q8_0 (ggml's quantize_row_q8_0_ref; importance ignored, as ggml) ----

HD void quantize_unit_q8_0(const float * x, Weights, uint8_t * o) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(o, d);
    for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);  // ties away, as ggml
}

// ---- NVFP4 (nvfp4.py): one group of 16 E2M1 values with a UE4M3 scale (scalar_common.h) ----

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

}  // namespace

// ---- the C interface (ctypes); 0 on success, else -1 with a message in err ----

extern "C" {

int nemoq_quant_cuda_supports(int type) {
    int values = 0;
    with_format(type, [&]<int T>() { values = Unit<T>::values; });
    return values > 0;
}

int nemoq_quant_cuda_device_count(char * err, int errlen) { return device_count(err, errlen); }

// out (nrows, n / block * bytes) = the rows of x (nrows, n) quantized to ggml type `type`;
// importance: n weights or NULL. All pointers are host memory. emulate: run the same per-unit
// code on the CPU instead. kernel_ms (may be NULL): the kernel's own time, without the copies.
int nemoq_quant_cuda_rows(int type, const float * x, uint8_t * out, int64_t nrows, int64_t n,
                          const float * importance, int emulate, float * kernel_ms, char * err, int errlen) {
    int64_t block = 0, bytes = 0, values = 0;
    with_format(type, [&]<int T>() { block = Unit<T>::block, bytes = Unit<T>::bytes, values = Unit<T>::values; });
    if (!block || n % block || nrows < 0) {
        if (err && errlen > 0)
            std::snprintf(err, (size_t)errlen, "type %d cannot hold rows of %lld", type, (long long)n);
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
        (importance &&
         (e = cudaMemcpy(d_imp.p, importance, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice)) != cudaSuccess)) {
        set_error(err, errlen, "copy to device", e);
        return -1;
    }
    Timer ev;
    if ((e = ev.create()) != cudaSuccess) {
        set_error(err, errlen, "cudaEventCreate", e);
        return -1;
    }
    const unsigned grid = (unsigned)((units + THREADS - 1) / THREADS);
    cudaEventRecord(ev.start);
    with_format(type, [&]<int T>() {
        quantize_kernel<T><<<grid, THREADS>>>((const float *)d_x.p, (uint8_t *)d_out.p, n, (const float *)d_imp.p,
                                              units);
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
