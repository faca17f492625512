// Timing entry points for bench/kernels.py (not part of nemoq's library): moe.cu's own kernels,
// launched on inputs already on the device and timed with CUDA events, and the device-to-device
// copy bandwidth they are compared with. Each timed call starts with a cold L2 (a buffer larger
// than the cache is written first), as in decoding, where the other layers' weights evict a
// layer's experts. Built by bench/kernels.py with -I nemoq/kernels_c.
#include "moe.cu"

namespace {

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
    if (!formats_fit(up_type, down_type, hidden, n_ff) || n_groups <= 0) {
        set_message(err, errlen, "unsupported formats or widths, or no routed slot");
        return -1;
    }
    const HostCall c{n_experts, n_ff, hidden, n_tokens, n_groups, n_slots, x, group_expert, group_start,
                     slot_token, slot_weight, token_start, token_slot, nullptr, nullptr};
    DeviceCall d;
    DeviceBuffer flush;
    Timer t;
    if (!to_device(c, d, err, errlen)) return -1;
    cudaError_t e;
    if ((e = cudaMalloc(&flush.p, (size_t)flush_bytes)) != cudaSuccess || (e = t.create()) != cudaSuccess) {
        set_error(err, errlen, "cudaMalloc", e);
        return -1;
    }
    for (int i = 0; i < iters; i++) {
        cudaMemsetAsync(flush.p, i & 0xff, (size_t)flush_bytes);  // evicts the experts from L2
        cudaEventRecord(t.start);
        launch(c, d, up, up_type, down, down_type);
        cudaEventRecord(t.stop);
        if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaEventSynchronize(t.stop)) != cudaSuccess) {
            set_error(err, errlen, "kernel", e);
            return -1;
        }
        cudaEventElapsedTime(&ms[i], t.start, t.stop);
    }
    if ((e = cudaMemcpy(out, d.out.p, sizeof(float) * (size_t)(n_tokens * hidden), cudaMemcpyDeviceToHost)) !=
        cudaSuccess) {
        set_error(err, errlen, "copy from device", e);
        return -1;
    }
    return 0;
}

}  // extern "C"
