// Routed experts of a Nemotron-H MoE layer on an NVIDIA GPU, read straight from the quantized
// GGUF stacks: the CUDA twin of moe.c (same math, same routing groups; numpy reference in
// nemoq/quant/moe_reference.py, Python side in nemoq/kernels_c/cuda.py).
//
//     y_t = sum_j  w_j * down[e_j] @ relu(up[e_j] @ x_t)^2
//
// One warp per (expert group, output row). Lane l takes the row's 32-value chunks l, l + 32, ...,
// decodes each into registers (never a dequantized matrix), dots it with every token routed to
// the expert, and the warp adds its 32 partial sums in a fixed tree. Three kernels:
//   up:     hidden[s, r] = relu(scale_e * up_e[r] . x[token(s)])^2
//   down:   part[s, r]   = w_s * scale_e * down_e[r] . hidden[s]
//   gather: out[t, r]    = sum of part[s, r] over token t's slots, in slot order (no atomics,
//           so results are deterministic).
// The decoders and the per-lane work are __host__ __device__: nemoq_moe_cuda_emulate runs the
// same code on the CPU, lane by lane, so the decoding is tested where no GPU is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_host.cuh"
#include "scalar_common.h"

namespace {

enum : int {  // ggml type ids (gguf-py GGMLQuantizationType)
    Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, MXFP4 = 39, NVFP4 = 40,
};

constexpr int WARP = 32;
constexpr int MAX_VECS = 8;          // tokens dotted with one decoded chunk at a time
constexpr int WARPS_PER_BLOCK = 8;

// Values and bytes per block of each format.
template <int T> struct Block;
template <> struct Block<Q8_0> { static constexpr int size = 32, bytes = 34; };
template <> struct Block<Q5_0> { static constexpr int size = 32, bytes = 22; };
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
    return with_type<Q8_0, Q5_0, IQ4_NL, MXFP4, NVFP4, Q4_K, Q5_K, Q6_K>(type, f);
}

int block_size(int type) {
    int size = 0;
    with_format(type, [&]<int T>() { size = Block<T>::size; });
    return size;
}

// ---- scalars stored in the blocks (the rest: scalar_common.h, shared with the C kernels) ----

__host__ __device__ inline float e2m1_x2(int nibble) {  // ggml's kvalues_mxfp4
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

// ---- chunk c (values 32c .. 32c + 31) of a row -> v[32]; layouts: nemoq/quant/formats/ ----

template <int T>
__host__ __device__ inline void decode_chunk(const uint8_t * row, int64_t c, float * v) {
    if constexpr (T == Q8_0) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16_rebias(b);
        for (int j = 0; j < 32; j++) v[j] = d * (float)(int8_t)b[2 + j];
    } else if constexpr (T == Q5_0) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16_rebias(b);
        const uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
        for (int j = 0; j < 16; j++) {
            v[j] = d * (float)((int)((b[6 + j] & 15) | ((qh >> j) & 1) << 4) - 16);
            v[j + 16] = d * (float)((int)((b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16);
        }
    } else if constexpr (T == IQ4_NL) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = get_f16_rebias(b);
        for (int j = 0; j < 16; j++) {
            v[j] = d * iq4nl(b[2 + j] & 15);
            v[j + 16] = d * iq4nl(b[2 + j] >> 4);
        }
    } else if constexpr (T == MXFP4) {
        const uint8_t * b = row + c * Block<T>::bytes;
        const float d = e8m0_half(b[0]);
        for (int j = 0; j < 16; j++) {
            v[j] = d * e2m1_x2(b[1 + j] & 15);
            v[j + 16] = d * e2m1_x2(b[1 + j] >> 4);
        }
    } else if constexpr (T == NVFP4) {  // half a block: groups 2h and 2h + 1 of 16
        const uint8_t * b = row + (c / 2) * Block<T>::bytes;
        for (int gg = 0; gg < 2; gg++) {
            const int g = 2 * (int)(c % 2) + gg;
            const float d = ue4m3_half(b[g]);
            const uint8_t * qs = b + 4 + 8 * g;
            for (int j = 0; j < 8; j++) {
                v[16 * gg + j] = d * e2m1_x2(qs[j] & 15);
                v[16 * gg + j + 8] = d * e2m1_x2(qs[j] >> 4);
            }
        }
    } else if constexpr (T == Q4_K || T == Q5_K) {  // group g of a super-block
        const uint8_t * b = row + (c / 8) * Block<T>::bytes;
        const int g = (int)(c % 8);
        const uint8_t * s = b + 4;
        const int sc = g < 4 ? s[g] & 63 : (s[g + 4] & 15) | (s[g - 4] >> 6) << 4;
        const int m = g < 4 ? s[g + 4] & 63 : (s[g + 4] >> 4) | (s[g] >> 6) << 4;
        const float dd = get_f16_rebias(b) * (float)sc, dm = get_f16_rebias(b + 2) * (float)m;
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
        const float d = get_f16_rebias(b + 208);
        for (int l = 0; l < 32; l++) {
            const int q = (((lo[l] >> (4 * (k / 2))) & 15) | ((qh[l] >> (2 * k)) & 3) << 4) - 32;
            v[l] = d * (float)(int8_t)b[192 + 8 * h + 2 * k + l / 16] * (float)q;
        }
    }
}

// One lane's share of row . xs[v] for nvec <= MAX_VECS vectors: chunks lane, lane + 32, ...
template <int T>
__host__ __device__ inline void lane_dots(const uint8_t * row, int64_t n_chunks, int lane,
                                          const float * const * xs, int nvec, float * acc) {
#pragma unroll
    for (int v = 0; v < MAX_VECS; v++) acc[v] = 0.0f;
    float w[32];
    for (int64_t c = lane; c < n_chunks; c += WARP) {
        decode_chunk<T>(row, c, w);
#pragma unroll
        for (int v = 0; v < MAX_VECS; v++) {
            if (v >= nvec) break;
            const float * x = xs[v] + 32 * c;
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < 32; j++) s += w[j] * x[j];
            acc[v] += s;
        }
    }
}

struct Groups {  // slots grouped by expert, as nemoq/kernels_c/moe.py's Routing
    const int32_t * expert;  // (G,)
    const int64_t * start;   // (G + 1,)
    const int32_t * token;   // (S,)
    const float * weight;    // (S,)
};

// What one warp does for (group gi, row r) of the up (DOWN false) or down (DOWN true) phase,
// given each lane's partial sums; `finish` writes lane 0's total of vector v.
//   up:   vectors x[token(s)], result relu(scale * dot)^2 into h[s, r]
//   down: vectors h[s],        result weight(s) * scale * dot into part[s, r]
template <bool DOWN>
__host__ __device__ inline float finish(float total, float scale, float weight) {
    const float a = total * scale;
    if (DOWN) return weight * a;
    return a > 0.0f ? a * a : 0.0f;
}

// ---- kernels ----

__device__ inline float warp_sum(float a) {  // lane 0 ends with the total, in a fixed order
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) a += __shfl_down_sync(0xffffffffu, a, offset);
    return a;
}

// One warp per (group blockIdx.y, row); rows = n_ff (up) or hidden (down), each of n values.
template <int T, bool DOWN>
__global__ void rows_kernel(const uint8_t * stack, int64_t rows, int64_t n, const float * vecs,
                            Groups g, const float * scale, float * result) {
    const int lane = threadIdx.x % WARP;
    const int64_t r = (int64_t)blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / WARP;
    if (r >= rows) return;  // r is the same for the whole warp
    const int64_t e = g.expert[blockIdx.y];
    const float s = scale ? scale[e] : 1.0f;
    const uint8_t * row = stack + (e * rows + r) * row_bytes<T>(n);
    for (int64_t s0 = g.start[blockIdx.y]; s0 < g.start[blockIdx.y + 1]; s0 += MAX_VECS) {
        const int nvec = (int)min((int64_t)MAX_VECS, g.start[blockIdx.y + 1] - s0);
        const float * xs[MAX_VECS];
        float acc[MAX_VECS];
#pragma unroll
        for (int v = 0; v < MAX_VECS; v++)
            xs[v] = vecs + (v < nvec ? (DOWN ? s0 + v : (int64_t)g.token[s0 + v]) : 0) * n;
        lane_dots<T>(row, n / 32, lane, xs, nvec, acc);
#pragma unroll
        for (int v = 0; v < MAX_VECS; v++) {
            if (v >= nvec) break;
            const float total = warp_sum(acc[v]);
            if (lane == 0) result[(s0 + v) * rows + r] = finish<DOWN>(total, s, DOWN ? g.weight[s0 + v] : 0.0f);
        }
    }
}

// out[t, r] = sum of part[s, r] over token t's slots token_slot[token_start[t] ..], in order.
__global__ void gather_kernel(const float * part, int64_t hidden, int64_t n_tokens,
                              const int64_t * token_start, const int32_t * token_slot, float * out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_tokens * hidden) return;
    const int64_t t = i / hidden, r = i % hidden;
    float a = 0.0f;
    for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) a += part[(int64_t)token_slot[k] * hidden + r];
    out[i] = a;
}

// ---- the same on the CPU, lane by lane (nemoq_moe_cuda_emulate) ----

template <int T, bool DOWN>
void rows_emulated(const uint8_t * stack, int64_t rows, int64_t n, const float * vecs, Groups g,
                   int64_t n_groups, const float * scale, float * result) {
    for (int64_t gi = 0; gi < n_groups; gi++) {
        const int64_t e = g.expert[gi];
        const float s = scale ? scale[e] : 1.0f;
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t * row = stack + (e * rows + r) * row_bytes<T>(n);
            for (int64_t s0 = g.start[gi]; s0 < g.start[gi + 1]; s0 += MAX_VECS) {
                const int nvec = (int)std::min<int64_t>(MAX_VECS, g.start[gi + 1] - s0);
                const float * xs[MAX_VECS];
                float acc[WARP][MAX_VECS];
                for (int v = 0; v < MAX_VECS; v++)
                    xs[v] = vecs + (v < nvec ? (DOWN ? s0 + v : (int64_t)g.token[s0 + v]) : 0) * n;
                for (int lane = 0; lane < WARP; lane++) lane_dots<T>(row, n / 32, lane, xs, nvec, acc[lane]);
                for (int v = 0; v < nvec; v++) {
                    float a[WARP];
                    for (int lane = 0; lane < WARP; lane++) a[lane] = acc[lane][v];
                    for (int offset = WARP / 2; offset > 0; offset /= 2)  // __shfl_down_sync's tree
                        for (int lane = 0; lane + offset < WARP; lane++) a[lane] += a[lane + offset];
                    result[(s0 + v) * rows + r] = finish<DOWN>(a[0], s, DOWN ? g.weight[s0 + v] : 0.0f);
                }
            }
        }
    }
}

// ---- the GPU run: the host arrays on the device, then the three kernels ----

// Both formats known, each block dividing the rows it is read from.
bool formats_fit(int up_type, int down_type, int64_t hidden, int64_t n_ff) {
    const int up_block = block_size(up_type), down_block = block_size(down_type);
    return up_block && down_block && hidden % up_block == 0 && n_ff % down_block == 0;
}

struct HostCall {  // one call's shapes and host arrays, as nemoq_moe_cuda_matvec takes them
    int64_t n_experts, n_ff, hidden, n_tokens, n_groups, n_slots;
    const float * x;
    const int32_t * group_expert;
    const int64_t * group_start;
    const int32_t * slot_token;
    const float * slot_weight;
    const int64_t * token_start;
    const int32_t * token_slot;
    const float * up_scale;    // (E,) or null
    const float * down_scale;  // (E,) or null
};

struct DeviceCall {  // the same arrays on the device, and the intermediate and final results
    DeviceBuffer x, group_expert, group_start, slot_token, slot_weight, token_start, token_slot, up_scale, down_scale;
    DeviceBuffer h, part, out;
};

// Copies c's arrays into d and allocates d's results; false, with a message in err, on failure.
bool to_device(const HostCall & c, DeviceCall & d, char * err, int errlen) {
    struct Copy { DeviceBuffer * dst; const void * src; size_t bytes; };
    const Copy copies[] = {
        {&d.x, c.x, sizeof(float) * (size_t)(c.n_tokens * c.hidden)},
        {&d.group_expert, c.group_expert, sizeof(int32_t) * (size_t)c.n_groups},
        {&d.group_start, c.group_start, sizeof(int64_t) * (size_t)(c.n_groups + 1)},
        {&d.slot_token, c.slot_token, sizeof(int32_t) * (size_t)c.n_slots},
        {&d.slot_weight, c.slot_weight, sizeof(float) * (size_t)c.n_slots},
        {&d.token_start, c.token_start, sizeof(int64_t) * (size_t)(c.n_tokens + 1)},
        {&d.token_slot, c.token_slot, sizeof(int32_t) * (size_t)c.n_slots},
        {&d.up_scale, c.up_scale, c.up_scale ? sizeof(float) * (size_t)c.n_experts : 0},
        {&d.down_scale, c.down_scale, c.down_scale ? sizeof(float) * (size_t)c.n_experts : 0},
    };
    cudaError_t e = cudaSuccess;
    for (const Copy & copy : copies) {
        if (!copy.bytes) continue;
        if ((e = cudaMalloc(&copy.dst->p, copy.bytes)) != cudaSuccess ||
            (e = cudaMemcpy(copy.dst->p, copy.src, copy.bytes, cudaMemcpyHostToDevice)) != cudaSuccess) {
            set_error(err, errlen, "copy to device", e);
            return false;
        }
    }
    if ((e = cudaMalloc(&d.h.p, sizeof(float) * (size_t)(c.n_slots * c.n_ff) + 1)) != cudaSuccess ||
        (e = cudaMalloc(&d.part.p, sizeof(float) * (size_t)(c.n_slots * c.hidden) + 1)) != cudaSuccess ||
        (e = cudaMalloc(&d.out.p, sizeof(float) * (size_t)(c.n_tokens * c.hidden))) != cudaSuccess) {
        set_error(err, errlen, "cudaMalloc", e);
        return false;
    }
    return true;
}

// up, down and gather into d.out, queued on the default stream; up / down: the stacks on the device.
void launch(const HostCall & c, const DeviceCall & d, const void * up, int up_type, const void * down, int down_type) {
    const Groups g{(const int32_t *)d.group_expert.p, (const int64_t *)d.group_start.p, (const int32_t *)d.slot_token.p,
                   (const float *)d.slot_weight.p};
    if (c.n_groups > 0) {
        const dim3 block(WARP * WARPS_PER_BLOCK);
        with_format(up_type, [&]<int T>() {
            const dim3 grid((unsigned)((c.n_ff + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK), (unsigned)c.n_groups);
            rows_kernel<T, false><<<grid, block>>>((const uint8_t *)up, c.n_ff, c.hidden, (const float *)d.x.p, g,
                                                   (const float *)d.up_scale.p, (float *)d.h.p);
        });
        with_format(down_type, [&]<int T>() {
            const dim3 grid((unsigned)((c.hidden + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK), (unsigned)c.n_groups);
            rows_kernel<T, true><<<grid, block>>>((const uint8_t *)down, c.hidden, c.n_ff, (const float *)d.h.p, g,
                                                  (const float *)d.down_scale.p, (float *)d.part.p);
        });
    }
    const int64_t n_out = c.n_tokens * c.hidden;
    gather_kernel<<<(unsigned)((n_out + 255) / 256), 256>>>((const float *)d.part.p, c.hidden, c.n_tokens,
                                                             (const int64_t *)d.token_start.p,
                                                             (const int32_t *)d.token_slot.p, (float *)d.out.p);
}

}  // namespace

// ---- the C interface (ctypes); each returns 0 on success, else -1 with a message in err ----

extern "C" {

int nemoq_moe_cuda_supports(int type) { return block_size(type) > 0; }

// Number of usable GPUs; 0 with the reason in err when there is none (or no driver).
int nemoq_moe_cuda_device_count(char * err, int errlen) { return device_count(err, errlen); }

// Copies `bytes` bytes to a new device allocation; NULL (and err) on failure.
void * nemoq_moe_cuda_upload(const void * host, int64_t bytes, char * err, int errlen) {
    void * dev = nullptr;
    cudaError_t e = cudaMalloc(&dev, (size_t)bytes);
    if (e == cudaSuccess) e = cudaMemcpy(dev, host, (size_t)bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        set_error(err, errlen, "upload", e);
        if (dev) cudaFree(dev);
        return nullptr;
    }
    return dev;
}

int nemoq_moe_cuda_free(void * dev) { return cudaFree(dev) == cudaSuccess ? 0 : -1; }

// out (T, H) = the routed experts of x (T, H). up / down: device pointers to the stacks (host
// pointers when emulate is set: then everything runs on the CPU, lane by lane); every other
// array is on the host. Routing as moe.py's Routing, plus token t's slots token_slot[token_start[t] ..].
int nemoq_moe_cuda_matvec(const void * up, int up_type, const void * down, int down_type,
                          int64_t n_experts, int64_t n_ff, int64_t hidden, const float * x, int64_t n_tokens,
                          int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                          int64_t n_slots, const int32_t * slot_token, const float * slot_weight,
                          const int64_t * token_start, const int32_t * token_slot,
                          const float * up_scale, const float * down_scale, float * out,
                          int emulate, char * err, int errlen) {
    if (!formats_fit(up_type, down_type, hidden, n_ff)) {
        if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "unsupported formats %d / %d for widths %lld / %lld",
                                             up_type, down_type, (long long)hidden, (long long)n_ff);
        return -1;
    }
    if (emulate) {
        const Groups g{group_expert, group_start, slot_token, slot_weight};
        std::vector<float> h((size_t)(n_slots * n_ff)), part((size_t)(n_slots * hidden));
        with_format(up_type, [&]<int T>() {
            rows_emulated<T, false>((const uint8_t *)up, n_ff, hidden, x, g, n_groups, up_scale, h.data());
        });
        with_format(down_type, [&]<int T>() {
            rows_emulated<T, true>((const uint8_t *)down, hidden, n_ff, h.data(), g, n_groups, down_scale, part.data());
        });
        for (int64_t t = 0; t < n_tokens; t++)
            for (int64_t r = 0; r < hidden; r++) {
                float a = 0.0f;
                for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) a += part[(size_t)(token_slot[k] * hidden + r)];
                out[t * hidden + r] = a;
            }
        return 0;
    }

    const HostCall c{n_experts, n_ff, hidden, n_tokens, n_groups, n_slots, x, group_expert, group_start,
                     slot_token, slot_weight, token_start, token_slot, up_scale, down_scale};
    DeviceCall d;
    if (!to_device(c, d, err, errlen)) return -1;
    launch(c, d, up, up_type, down, down_type);
    cudaError_t e;
    if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaDeviceSynchronize()) != cudaSuccess ||
        (e = cudaMemcpy(out, d.out.p, sizeof(float) * (size_t)(n_tokens * hidden), cudaMemcpyDeviceToHost)) !=
            cudaSuccess) {
        set_error(err, errlen, "kernel", e);
        return -1;
    }
    return 0;
}

}  // extern "C"
