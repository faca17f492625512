// Shared by quants.cu and quants_k.cuh: ggml type ids, the unit each GPU thread quantizes, and
// the scalar helpers of the C kernels (scalar_common.h: half floats, FP4 scales, numpy's min / max,
// divide; here: clip), all __host__ __device__ so the CPU run of quants.cu does exactly what the
// GPU does.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "scalar_common.h"

#define HD __host__ __device__ inline

namespace {

enum : int { Q8_0 = 8, Q4_K = 12, Q5_K = 13, NVFP4 = 40 };  // ggml type ids

// Values per thread and (values, bytes) per stored block of each format.
template <int T> struct Unit;
template <> struct Unit<Q8_0> { static constexpr int values = 32, block = 32, bytes = 34; };
template <> struct Unit<NVFP4> { static constexpr int values = 16, block = 64, bytes = 36; };
template <> struct Unit<Q4_K> { static constexpr int values = 256, block = 256, bytes = 144; };
template <> struct Unit<Q5_K> { static constexpr int values = 256, block = 256, bytes = 176; };

// ---- scalars (the rest: scalar_common.h, shared with the C kernels and moe.cu) ----

// lanes.h's vclip (constant bounds): a bound replaces a value equal to it, so -0 becomes +0.
HD float clip(float v, float lo, float hi) {
    v = v <= lo ? lo : v;
    return v >= hi ? hi : v;
}

// Importance weights of a unit, or all ones without an importance vector.
struct Weights {
    const float * p;
    HD float operator[](int i) const { return p ? p[i] : 1.0f; }
    HD Weights at(int offset) const { return {p ? p + offset : nullptr}; }
};

}  // namespace
