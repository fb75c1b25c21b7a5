// baseline.cu: the row softmax of the straightforward attention that qc-bench
// times the attention kernels against (its two products run in cuBLASLt).
// Not used by the engine. Semantics: qc_types.h (baseline.cu section).
#include "common.cuh"

// Row softmax, bf16 in and out, f32 math; three passes over the row (max, sum,
// write), which stays in L1/L2 between them.
extern "C" __global__ void __launch_bounds__(1024) qc_softmax_rows_bf16(const QcSoftmaxArgs a) {
    __shared__ float scratch[32];
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const qc::bf16* x = qc::dev_ptr<const qc::bf16>(a.x) + r * a.ld;
        qc::bf16* y = qc::dev_ptr<qc::bf16>(a.y) + r * a.ld;
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) mx = fmaxf(mx, qc::to_f32(x[j]));
        mx = qc::block_max(mx, scratch);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) sum += __expf(qc::to_f32(x[j]) - mx);
        const float inv = 1.0f / qc::block_sum(sum, scratch);
        // Each thread rewrites only the elements it read: in place is safe.
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) y[j] = qc::from_f32<qc::bf16>(__expf(qc::to_f32(x[j]) - mx) * inv);
    }
}
