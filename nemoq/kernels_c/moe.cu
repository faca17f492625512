// The CUDA twin of moe.c, the MoE reference kernel: the routed experts of a Nemotron-H MoE layer
// read straight from the quantized GGUF stacks (numpy reference nemoq/quant/moe_reference.py,
// Python side nemoq/kernels_c/cuda.py).
//
//     y_t = sum_j  w_j * down_scale[e_j] * down[e_j] @ relu(up_scale[e_j] * up[e_j] @ x_t)^2
//
// Kept as plain as moe.c, and in the same order: one thread per output value; its row dot
// decodes the row 32 values at a time into registers and adds the products in value order into
// one float32 sum. Built with -fmad=false (and -ffp-contract=off for the host), so the GPU, the
// CPU emulation and moe.c give the same bits. Two kernels:
//   up:   one thread per (slot s = t * k + j, row r):  h[s, r] = relu(up_scale_e * up_e[r] . x_t)^2
//   down: one thread per (token t, row r):             y[t, r] = sum_j w_j * (down_e[r] . h[s] * down_scale_e)
// The per-thread functions are __host__ __device__: with emulate set, nemoq_moe_cuda_matvec runs
// them on the CPU, one thread after another, which tests this code where no GPU is present.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_host.cuh"
#include "scalar_common.h"

namespace {

enum : int {  // ggml type ids (gguf-py GGMLQuantizationType)
    Q4_0 = 2, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, MXFP4 = 39, NVFP4 = 40,
};

// Values and bytes per block of each format.
template <int T> struct Block;
template <> struct Block<Q4_0> { static constexpr int size = 32, bytes = 18; };
template <> struct Block<Q5_0> { static constexpr int size = 32, bytes = 22; };
template <> struct Block<Q5_1> { static constexpr int size = 32, bytes = 24; };
template <> struct Block<Q8_0> { static constexpr int size = 32, bytes = 34; };
template <> struct Block<IQ4_NL> { static constexpr int size = 32, bytes = 18; };
template <> struct Block<MXFP4> { static constexpr int size = 32, bytes = 17; };
template <> struct Block<NVFP4> { static constexpr int size = 64, bytes = 36; };
template <> struct Block<Q4_K> { static constexpr int size = 256, bytes = 144; };
template <> struct Block<Q5_K> { static constexpr int size = 256, bytes = 176; };
template <> struct Block<Q6_K> { static constexpr int size = 256, bytes = 210; };

template <int T>
__host__ __device__ inline int64_t row_bytes(int64_t n) { return n / Block<T>::size * Block<T>::bytes; }

// Calls f.template operator()<T>() for the format with ggml type id `type`; false if unknown.
template <typename F>
bool with_format(int type, F && f) {
    return with_type<Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4, NVFP4, Q4_K, Q5_K, Q6_K>(type, f);
}

int block_size(int type) {
    int size = 0;
    with_format(type, [&]<int T>() { size = Block<T>::size; });
    return size;
}

// ---- levels stored in the blocks (the scales: scalar_common.h, shared with the C kernels) ----

__host__ __device__ inline float e2m1_x2(int nibble) {  // ggml's kvalues_mxfp4: E2M1 doubled
    const int m = nibble & 7;
    const int v = m + (m > 4 ? m - 4 : 0) + (m > 6 ? 2 : 0);  // 0 1 2 3 4 6 8 12
    return (float)((nibble & 8) ? -v : v);
}

__host__ __device__ inline float iq4nl(int nibble) {
    switch (nibble) {
        case 0: return -127; case 1: return -104; case 2: return -83; case 3: return -65;
        case 4: return -49; case 5: return -35; case 6: return -22; case 7: return -10;
        case 8: return 1; case 9: return 13; case 10: return 25; case 11: return 38;
        case 12: return 53; case 13: return 69; case 14: return 89; default: return 113;
    }
}

// The fifth bit of value j of a Q5_0 / Q5_1 block: bit j of the little-endian qh.
__host__ __device__ inline int fifth_bit(const uint8_t * qh, int j) { return (qh[j / 8] >> (j % 8)) & 1; }

// ---- chunk c (values 32c .. 32c + 31) of a row -> v[32], as the numpy formats dequantize ----
// (layouts: nemoq/quant/formats/<format>.py)

template <int T>
__host__ __device__ inline void decode_chunk(const uint8_t * row, int64_t c, float * v) {
    if constexpr (T == Q8_0) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16(b);
        for (int j = 0; j < 32; j++) v[j] = d * (float)(int8_t)b[2 + j];
    } else if constexpr (T == Q4_0) {  // byte j: value j (low nibble), value j + 16 (high)
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16(b);
        for (int j = 0; j < 16; j++) {
            v[j] = d * (float)((b[2 + j] & 15) - 8);
            v[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
    } else if constexpr (T == Q5_0) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16(b);
        for (int j = 0; j < 16; j++) {
            v[j] = d * (float)(((b[6 + j] & 15) | fifth_bit(b + 2, j) << 4) - 16);
            v[j + 16] = d * (float)(((b[6 + j] >> 4) | fifth_bit(b + 2, j + 16) << 4) - 16);
        }
    } else if constexpr (T == Q5_1) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16(b), m = get_f16(b + 2);
        for (int j = 0; j < 16; j++) {
            v[j] = d * (float)((b[8 + j] & 15) | fifth_bit(b + 4, j) << 4) + m;
            v[j + 16] = d * (float)((b[8 + j] >> 4) | fifth_bit(b + 4, j + 16) << 4) + m;
        }
    } else if constexpr (T == IQ4_NL) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16(b);
        for (int j = 0; j < 16; j++) {
            v[j] = d * iq4nl(b[2 + j] & 15);
            v[j + 16] = d * iq4nl(b[2 + j] >> 4);
        }
    } else if constexpr (T == MXFP4) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = e8m0_half(b[0]);  // halved, for the doubled E2M1 levels
        for (int j = 0; j < 16; j++) {
            v[j] = d * e2m1_x2(b[1 + j] & 15);
            v[j + 16] = d * e2m1_x2(b[1 + j] >> 4);
        }
    } else if constexpr (T == NVFP4) {  // half a block: groups 2h and 2h + 1 of 16 values
        const uint8_t * b = row + (c / 2) * Block<T>::bytes;
        for (int gg = 0; gg < 2; gg++) {
            const int g = 2 * (int)(c % 2) + gg;
            const float d = ue4m3_half(b[g]);
            const uint8_t * qs = b + 4 + 8 * g;  // byte j: value j (low nibble), value j + 8 (high)
            for (int j = 0; j < 8; j++) {
                v[16 * gg + j] = d * e2m1_x2(qs[j] & 15);
                v[16 * gg + j + 8] = d * e2m1_x2(qs[j] >> 4);
            }
        }
    } else if constexpr (T == Q4_K || T == Q5_K) {  // group g of 32 in a super-block of 256
        const uint8_t * b = row + (c / 8) * Block<T>::bytes;
        const int g = (int)(c % 8);
        const uint8_t * s = b + 4;  // eight 6-bit scales and mins packed in 12 bytes
        const int sc = g < 4 ? s[g] & 63 : (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
        const int m = g < 4 ? s[g + 4] & 63 : (s[g + 4] >> 4) | (s[g] >> 6) << 4;
        const float dd = get_f16(b) * (float)sc, dm = get_f16(b + 2) * (float)m;
        const uint8_t * qs = b + (T == Q4_K ? 16 : 48) + 32 * (g / 2);
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> (4 * (g % 2))) & 15;
            if constexpr (T == Q5_K) q |= ((b[16 + l] >> g) & 1) << 4;
            v[l] = dd * (float)q - dm;
        }
    } else {  // Q6_K: chunk 4h + k holds values 128h + 32k + l
        static_assert(T == Q6_K, "unknown format");
        const uint8_t * b = row + (c / 8) * Block<T>::bytes;
        const int h = (int)(c % 8) / 4, k = (int)(c % 4);
        const uint8_t * lo = b + 64 * h + 32 * (k % 2);
        const uint8_t * qh = b + 128 + 32 * h;
        const float d = get_f16(b + 208);
        for (int l = 0; l < 32; l++) {
            const int q = (((lo[l] >> (4 * (k / 2))) & 15) | ((qh[l] >> (2 * k)) & 3) << 4) - 32;
            v[l] = d * (float)(int8_t)b[192 + 8 * h + 2 * k + l / 16] * (float)q;
        }
    }
}

// row . x for a row of n values
template <int T>
__host__ __device__ inline float row_dot(const uint8_t * row, const float * x, int64_t n) {
    float v[32];
    float acc = 0.0f;
    for (int64_t c = 0; c < n / 32; c++) {
        decode_chunk<T>(row, c, v);
        for (int j = 0; j < 32; j++) acc += v[j] * x[32 * c + j];
    }
    return acc;
}

struct Call {  // one call's shapes and arrays: on the device for a GPU run, on the host when emulated
    int64_t n_ff, hidden, n_tokens, top_k;
    const uint8_t * up;
    const uint8_t * down;
    const float * x;               // (T, H)
    const int32_t * expert_ids;    // (T, k)
    const float * expert_weights;  // (T, k)
    const float * up_scale;        // (E,) or null
    const float * down_scale;      // (E,) or null
    float * h;                     // (T * k, I): each slot's hidden vector
    float * out;                   // (T, H)
};

// ---- what one thread does ----

template <int T>
__host__ __device__ inline void up_value(const Call & c, int64_t s, int64_t r) {
    if (c.expert_weights[s] == 0.0f) return;  // the slot adds nothing: its hidden vector is not read
    const int64_t e = c.expert_ids[s];
    const float scale = c.up_scale ? c.up_scale[e] : 1.0f;
    const float a = row_dot<T>(c.up + (e * c.n_ff + r) * row_bytes<T>(c.hidden), c.x + (s / c.top_k) * c.hidden,
                               c.hidden) * scale;
    c.h[s * c.n_ff + r] = a > 0.0f ? a * a : 0.0f;  // Nemotron-H's experts: squared ReLU, no gate
}

template <int T>
__host__ __device__ inline void down_value(const Call & c, int64_t t, int64_t r) {
    float y = 0.0f;
    for (int64_t s = t * c.top_k; s < (t + 1) * c.top_k; s++) {
        const float w = c.expert_weights[s];
        if (w == 0.0f) continue;
        const int64_t e = c.expert_ids[s];
        const float scale = c.down_scale ? c.down_scale[e] : 1.0f;
        y += w * (row_dot<T>(c.down + (e * c.hidden + r) * row_bytes<T>(c.n_ff), c.h + s * c.n_ff, c.n_ff) * scale);
    }
    c.out[t * c.hidden + r] = y;
}

// ---- kernels: one thread per value ----

constexpr int THREADS = 128;

template <int T>
__global__ void up_kernel(Call c) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < c.n_tokens * c.top_k * c.n_ff) up_value<T>(c, i / c.n_ff, i % c.n_ff);
}

template <int T>
__global__ void down_kernel(Call c) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < c.n_tokens * c.hidden) down_value<T>(c, i / c.hidden, i % c.hidden);
}

unsigned grid(int64_t n) { return (unsigned)((n + THREADS - 1) / THREADS); }

void run_emulated(const Call & c, int up_type, int down_type) {
    with_format(up_type, [&]<int T>() {
        for (int64_t s = 0; s < c.n_tokens * c.top_k; s++)
            for (int64_t r = 0; r < c.n_ff; r++) up_value<T>(c, s, r);
    });
    with_format(down_type, [&]<int T>() {
        for (int64_t t = 0; t < c.n_tokens; t++)
            for (int64_t r = 0; r < c.hidden; r++) down_value<T>(c, t, r);
    });
}

// A device allocation of `bytes` (+ 1: never zero bytes) into buffer; false (and err) on failure.
bool allocate(DeviceBuffer & buffer, size_t bytes, char * err, int errlen) {
    const cudaError_t e = cudaMalloc(&buffer.p, bytes + 1);
    if (e != cudaSuccess) set_error(err, errlen, "cudaMalloc", e);
    return e == cudaSuccess;
}

// `bytes` from the host copied into buffer, a new device allocation; false (and err) on failure.
bool to_device(DeviceBuffer & buffer, const void * host, size_t bytes, char * err, int errlen) {
    if (!allocate(buffer, bytes, err, errlen)) return false;
    const cudaError_t e = cudaMemcpy(buffer.p, host, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) set_error(err, errlen, "copy to device", e);
    return e == cudaSuccess;
}

// The GPU run: the host arrays of c copied to the device (the stacks are there already), the two
// kernels, the result copied back into c.out. 0, or -1 with err.
int run_on_device(Call c, int up_type, int down_type, int64_t n_experts, char * err, int errlen) {
    const int64_t slots = c.n_tokens * c.top_k;
    DeviceBuffer x, ids, weights, up_scale, down_scale, h, out;
    const size_t scales = c.up_scale || c.down_scale ? sizeof(float) * (size_t)n_experts : 0;
    if (!to_device(x, c.x, sizeof(float) * (size_t)(c.n_tokens * c.hidden), err, errlen) ||
        !to_device(ids, c.expert_ids, sizeof(int32_t) * (size_t)slots, err, errlen) ||
        !to_device(weights, c.expert_weights, sizeof(float) * (size_t)slots, err, errlen) ||
        (c.up_scale && !to_device(up_scale, c.up_scale, scales, err, errlen)) ||
        (c.down_scale && !to_device(down_scale, c.down_scale, scales, err, errlen)) ||
        !allocate(h, sizeof(float) * (size_t)(slots * c.n_ff), err, errlen) ||
        !allocate(out, sizeof(float) * (size_t)(c.n_tokens * c.hidden), err, errlen))
        return -1;
    float * host_out = c.out;
    c.x = (const float *)x.p, c.expert_ids = (const int32_t *)ids.p, c.expert_weights = (const float *)weights.p;
    c.up_scale = (const float *)up_scale.p, c.down_scale = (const float *)down_scale.p;
    c.h = (float *)h.p, c.out = (float *)out.p;
    if (slots * c.n_ff > 0)  // (a launch of no blocks is an error)
        with_format(up_type, [&]<int T>() { up_kernel<T><<<grid(slots * c.n_ff), THREADS>>>(c); });
    if (c.n_tokens * c.hidden > 0)
        with_format(down_type, [&]<int T>() { down_kernel<T><<<grid(c.n_tokens * c.hidden), THREADS>>>(c); });
    cudaError_t e;
    if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaDeviceSynchronize()) != cudaSuccess ||
        (e = cudaMemcpy(host_out, c.out, sizeof(float) * (size_t)(c.n_tokens * c.hidden), cudaMemcpyDeviceToHost)) !=
            cudaSuccess) {
        set_error(err, errlen, "kernel", e);
        return -1;
    }
    return 0;
}

}  // namespace

// ---- the C interface (ctypes) ----

extern "C" {

int nemoq_moe_cuda_supports(int type) { return block_size(type) > 0; }

// Number of usable GPUs; 0 with the reason in err when there is none (or no driver).
int nemoq_moe_cuda_device_count(char * err, int errlen) { return device_count(err, errlen); }

// Copies `bytes` bytes to a new device allocation; NULL (and err) on failure.
void * nemoq_moe_cuda_upload(const void * host, int64_t bytes, char * err, int errlen) {
    DeviceBuffer buffer;
    if (!to_device(buffer, host, (size_t)bytes, err, errlen)) return nullptr;
    void * dev = buffer.p;
    buffer.p = nullptr;  // the caller owns it now
    return dev;
}

int nemoq_moe_cuda_free(void * dev) { return cudaFree(dev) == cudaSuccess ? 0 : -1; }

// out (T, H) = the routed experts of x (T, H), with the arguments of moe.c's nemoq_moe_reference.
// up / down: device pointers to the stacks, every other array on the host; with emulate set,
// everything is on the host and runs on the CPU. 0, or -1 with a message in err.
int nemoq_moe_cuda_matvec(const void * up, int up_type, const void * down, int down_type, int64_t n_experts,
                          int64_t n_ff, int64_t hidden, const float * x, int64_t n_tokens, int64_t top_k,
                          const int32_t * expert_ids, const float * expert_weights, const float * up_scale,
                          const float * down_scale, float * out, int emulate, char * err, int errlen) {
    const int up_block = block_size(up_type), down_block = block_size(down_type);
    if (!up_block || !down_block || hidden % up_block || n_ff % down_block) {
        if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "unsupported formats %d / %d for widths %lld / %lld",
                                             up_type, down_type, (long long)hidden, (long long)n_ff);
        return -1;
    }
    for (int64_t s = 0; s < n_tokens * top_k; s++)
        if (expert_ids[s] < 0 || expert_ids[s] >= n_experts) {
            if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "expert id %d out of range", expert_ids[s]);
            return -1;
        }
    Call c{n_ff, hidden, n_tokens, top_k, (const uint8_t *)up, (const uint8_t *)down, x, expert_ids, expert_weights,
           up_scale, down_scale, nullptr, out};
    if (!emulate) return run_on_device(c, up_type, down_type, n_experts, err, errlen);
    std::vector<float> h((size_t)(n_tokens * top_k * n_ff));
    c.h = h.data();
    run_emulated(c, up_type, down_type);
    return 0;
}

}  // extern "C"
