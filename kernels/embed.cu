// embed.cu: sinusoidal timestep embedding and the x_mask row select.
// Argument structs and exact semantics: qc_types.h (QcTimestepEmbedArgs, QcMaskSelectArgs).
#include "common.cuh"

namespace qc {

// out[r, j] = cos(t[r] f_j) for j < half, sin(t[r] f_{j-half}) for half <= j < 2 half,
// 0 for j = 2 half (odd dim); f_i = exp(-ln(max_period) * i / half). Flat grid-stride.
template <typename T>
__device__ __forceinline__ void timestep_embed(const QcTimestepEmbedArgs& a) {
    const float* __restrict__ t = dev_ptr<const float>(a.t);
    T* __restrict__ out = dev_ptr<T>(a.out);
    const int half = a.dim / 2;
    // PyTorch: -math.log(max_period) (a double) used as an f32 scalar.
    const float neg_log_period = static_cast<float>(-log(static_cast<double>(a.max_period)));
    const int64_t total = a.n * a.dim;
    for (int64_t e = global_thread_id(); e < total; e += global_thread_count()) {
        const int64_t r = e / a.dim;
        const int j = static_cast<int>(e - r * a.dim);
        float v = 0.0f;
        if (j < 2 * half) {
            const int i = j < half ? j : j - half;
            // exp(-log(max_period) * arange(half) / half) in f32, op by op.
            const float f = expf(__fdiv_rn(__fmul_rn(neg_log_period, static_cast<float>(i)),
                                           static_cast<float>(half)));
            const float arg = __fmul_rn(t[r], f);
            v = j < half ? cosf(arg) : sinf(arg);
        }
        out[e] = from_f32<T>(v);
    }
}

// out[r, :] = mask[r / rows_per_mask] ? a[r, :] : b[r, :]: one block per row, the
// chosen row is copied (skipped when it is out itself). out may equal a or b.
template <typename T, int V>
__device__ __forceinline__ void mask_select_rows(const QcMaskSelectArgs& a) {
    const T* pa = dev_ptr<const T>(a.a);
    const T* pb = dev_ptr<const T>(a.b);
    T* out = dev_ptr<T>(a.out);
    const uint8_t* __restrict__ mask = dev_ptr<const uint8_t>(a.mask);
    const int nv = a.cols / V;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T* src = (mask[r / a.rows_per_mask] != 0 ? pa : pb) + r * a.cols;
        T* dst = out + r * a.cols;
        if (src == dst) continue;  // block-uniform
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            T v[V];
            load_vec<V>(src, i, v);
            store_vec<V>(dst, i, v);
        }
    }
}

template <typename T>
__device__ __forceinline__ void mask_select(const QcMaskSelectArgs& a) {
    constexpr int V = Vec16<T>::N;
    if (a.cols % V == 0 && aligned16(dev_ptr<const T>(a.a)) && aligned16(dev_ptr<const T>(a.b)) &&
        aligned16(dev_ptr<const T>(a.out)))
        mask_select_rows<T, V>(a);
    else
        mask_select_rows<T, 1>(a);
}

}  // namespace qc

// out[r, :] = [cos(t[r] f), sin(t[r] f)], f_i = exp(-ln(max_period) i / half), f32.
extern "C" __global__ void __launch_bounds__(1024) qc_timestep_embed_f32(const QcTimestepEmbedArgs a) {
    qc::timestep_embed<float>(a);
}
// out[r, :] = [cos(t[r] f), sin(t[r] f)], f_i = exp(-ln(max_period) i / half), bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_timestep_embed_bf16(const QcTimestepEmbedArgs a) {
    qc::timestep_embed<qc::bf16>(a);
}
// out[r, :] = mask[r / rows_per_mask] ? a[r, :] : b[r, :] (x_mask select), f32.
extern "C" __global__ void __launch_bounds__(1024) qc_mask_select_f32(const QcMaskSelectArgs a) {
    qc::mask_select<float>(a);
}
// out[r, :] = mask[r / rows_per_mask] ? a[r, :] : b[r, :] (x_mask select), bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_mask_select_bf16(const QcMaskSelectArgs a) {
    qc::mask_select<qc::bf16>(a);
}
