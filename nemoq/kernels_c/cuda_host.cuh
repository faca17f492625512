// Host-side CUDA plumbing shared by moe.cu and quants.cu: errors as ctypes messages, device
// buffers and timing events freed when they go out of scope, the format dispatch, the number of GPUs.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

namespace {

void set_error(char * err, int errlen, const char * what, cudaError_t e) {
    if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "%s: %s", what, cudaGetErrorString(e));
}

struct DeviceBuffer {
    void * p = nullptr;
    ~DeviceBuffer() { if (p) cudaFree(p); }
};

struct Timer {  // CUDA events around a launch
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

// Calls f.template operator()<T>() for the T among Types equal to `type` (a ggml type id): the
// one place where a run-time format picks a kernel template; false if none is.
template <int... Types, typename F>
bool with_type(int type, F && f) {
    return ((type == Types && (f.template operator()<Types>(), true)) || ...);
}

// Number of usable GPUs; 0 with the reason in err when there is none (or no driver).
int device_count(char * err, int errlen) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        set_error(err, errlen, "cudaGetDeviceCount", e);
        return 0;
    }
    return n;
}

}  // namespace
