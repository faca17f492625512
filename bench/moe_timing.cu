// Timing entry points for bench/kernels.py (not part of nemoq's library): moe.cu's own kernels,
// launched on inputs already on the device and timed with CUDA events, and the device-to-device
// copy bandwidth they are compared with. Each timed call starts with a cold L2 (a buffer larger
// than the cache is written first), as in decoding, where the other layers' weights evict a
// layer's experts. Built by bench/kernels.py with -I nemoq/kernels_c.
#include "moe.cu"

namespace {

struct Timer {  // CUDA events around one call
    cudaEvent_t start = nullptr, stop = nullptr;
    cudaError_t create() {
        cudaError_t e = cudaEventCreate(&start);
        return e == cudaSuccess ? cudaEventCreate(&stop) : e;
    }
    ~Timer() {
        if (start) cudaEventDestroy(start);
        if (stop) cudaEventDestroy(stop);
    }
};

void set_message(char * err, int errlen, const char * what) {
    if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "%s", what);
}

}  // namespace

extern "C" {

// ms[i] = milliseconds of copy i of `bytes` bytes from one device buffer to another.
int nemoq_bench_copy(int64_t bytes, int iters, float * ms, char * err, int errlen) {
    DeviceBuffer a, b;
    Timer t;
    cudaError_t e;
    if ((e = cudaMalloc(&a.p, (size_t)bytes)) != cudaSuccess || (e = cudaMalloc(&b.p, (size_t)bytes)) != cudaSuccess ||
        (e = cudaMemset(a.p, 1, (size_t)bytes)) != cudaSuccess || (e = t.create()) != cudaSuccess ||
        (e = cudaMemcpy(b.p, a.p, (size_t)bytes, cudaMemcpyDeviceToDevice)) != cudaSuccess) {  // warm-up
        set_error(err, errlen, "copy setup", e);
        return -1;
    }
    for (int i = 0; i < iters; i++) {
        cudaEventRecord(t.start);
        cudaMemcpyAsync(b.p, a.p, (size_t)bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(t.stop);
        if ((e = cudaEventSynchronize(t.stop)) != cudaSuccess) {
            set_error(err, errlen, "copy", e);
            return -1;
        }
        cudaEventElapsedTime(&ms[i], t.start, t.stop);
    }
    return 0;
}

// nemoq_moe_cuda_matvec's GPU path (same arguments, up / down on the device), run `iters` times:
// ms[i] = milliseconds of the three kernels of call i, each after writing `flush_bytes` bytes.
// out gets the last call's result.
int nemoq_bench_moe(const void * up, int up_type, const void * down, int down_type,
                    int64_t n_experts, int64_t n_ff, int64_t hidden, const float * x, int64_t n_tokens,
                    int64_t n_groups, const int32_t * group_expert, const int64_t * group_start,
                    int64_t n_slots, const int32_t * slot_token, const float * slot_weight,
                    const int64_t * token_start, const int32_t * token_slot, float * out,
                    int iters, int64_t flush_bytes, float * ms, char * err, int errlen) {
    const int up_block = block_size(up_type), down_block = block_size(down_type);
    if (!up_block || !down_block || hidden % up_block || n_ff % down_block || n_groups <= 0) {
        set_message(err, errlen, "unsupported formats or widths, or no routed slot");
        return -1;
    }
    DeviceBuffer d_x, d_ge, d_gs, d_st, d_sw, d_ts, d_tsl, d_h, d_part, d_out, d_flush;
    struct Copy { DeviceBuffer * dst; const void * src; size_t bytes; };
    const Copy copies[] = {
        {&d_x, x, sizeof(float) * (size_t)(n_tokens * hidden)},
        {&d_ge, group_expert, sizeof(int32_t) * (size_t)n_groups},
        {&d_gs, group_start, sizeof(int64_t) * (size_t)(n_groups + 1)},
        {&d_st, slot_token, sizeof(int32_t) * (size_t)n_slots},
        {&d_sw, slot_weight, sizeof(float) * (size_t)n_slots},
        {&d_ts, token_start, sizeof(int64_t) * (size_t)(n_tokens + 1)},
        {&d_tsl, token_slot, sizeof(int32_t) * (size_t)n_slots},
    };
    cudaError_t e = cudaSuccess;
    for (const Copy & c : copies) {
        if ((e = cudaMalloc(&c.dst->p, c.bytes)) != cudaSuccess ||
            (e = cudaMemcpy(c.dst->p, c.src, c.bytes, cudaMemcpyHostToDevice)) != cudaSuccess) {
            set_error(err, errlen, "copy to device", e);
            return -1;
        }
    }
    const size_t out_bytes = sizeof(float) * (size_t)(n_tokens * hidden);
    Timer t;
    if ((e = cudaMalloc(&d_h.p, sizeof(float) * (size_t)(n_slots * n_ff))) != cudaSuccess ||
        (e = cudaMalloc(&d_part.p, sizeof(float) * (size_t)(n_slots * hidden))) != cudaSuccess ||
        (e = cudaMalloc(&d_out.p, out_bytes)) != cudaSuccess ||
        (e = cudaMalloc(&d_flush.p, (size_t)flush_bytes)) != cudaSuccess || (e = t.create()) != cudaSuccess) {
        set_error(err, errlen, "cudaMalloc", e);
        return -1;
    }
    const Groups g{(const int32_t *)d_ge.p, (const int64_t *)d_gs.p, (const int32_t *)d_st.p, (const float *)d_sw.p};
    const dim3 block(WARP * WARPS_PER_BLOCK);
    const int64_t n_out = n_tokens * hidden;
    for (int i = 0; i < iters; i++) {
        cudaMemsetAsync(d_flush.p, i & 0xff, (size_t)flush_bytes);  // evicts the experts from L2
        cudaEventRecord(t.start);
        with_format(up_type, [&]<int T>() {
            const dim3 grid((unsigned)((n_ff + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK), (unsigned)n_groups);
            rows_kernel<T, false><<<grid, block>>>((const uint8_t *)up, n_ff, hidden, (const float *)d_x.p, g,
                                                   nullptr, (float *)d_h.p);
        });
        with_format(down_type, [&]<int T>() {
            const dim3 grid((unsigned)((hidden + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK), (unsigned)n_groups);
            rows_kernel<T, true><<<grid, block>>>((const uint8_t *)down, hidden, n_ff, (const float *)d_h.p, g,
                                                  nullptr, (float *)d_part.p);
        });
        gather_kernel<<<(unsigned)((n_out + 255) / 256), 256>>>((const float *)d_part.p, hidden, n_tokens,
                                                                 (const int64_t *)d_ts.p, (const int32_t *)d_tsl.p,
                                                                 (float *)d_out.p);
        cudaEventRecord(t.stop);
        if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaEventSynchronize(t.stop)) != cudaSuccess) {
            set_error(err, errlen, "kernel", e);
            return -1;
        }
        cudaEventElapsedTime(&ms[i], t.start, t.stop);
    }
    if ((e = cudaMemcpy(out, d_out.p, out_bytes, cudaMemcpyDeviceToHost)) != cudaSuccess) {
        set_error(err, errlen, "copy from device", e);
        return -1;
    }
    return 0;
}

}  // extern "C"
