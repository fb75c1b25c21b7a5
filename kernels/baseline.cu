// baseline.cu: the row softmax of the straightforward attention that qc-bench
// times the attention kernels against (its two products run in cuBLASLt).
// Not used by the engine. Semantics: qc_types.h (baseline.cu section).
#include "common.cuh"

namespace qc {
namespace baseline {

// Maximum over the block (blockDim.x a multiple of 32); every thread gets it.
// scratch: __shared__ float[32], may be shared with block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    __syncthreads();  // the previous reduction's reads of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : -INFINITY;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

}  // namespace baseline
}  // namespace qc

// Row softmax, bf16 in and out, f32 math; three passes over the row (max, sum,
// write), which stays in L1/L2 between them.
extern "C" __global__ void __launch_bounds__(1024) qc_softmax_rows_bf16(const QcSoftmaxArgs a) {
    __shared__ float scratch[32];
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const qc::bf16* x = qc::dev_ptr<const qc::bf16>(a.x) + r * a.ld;
        qc::bf16* y = qc::dev_ptr<qc::bf16>(a.y) + r * a.ld;
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) mx = fmaxf(mx, qc::to_f32(x[j]));
        mx = qc::baseline::block_max(mx, scratch);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) sum += __expf(qc::to_f32(x[j]) - mx);
        const float inv = 1.0f / qc::block_sum(sum, scratch);
        // Each thread rewrites only the elements it read: in place is safe.
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) y[j] = qc::from_f32<qc::bf16>(__expf(qc::to_f32(x[j]) - mx) * inv);
    }
}
