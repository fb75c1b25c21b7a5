// norm.cu: LayerNorm (no affine) fused with t2i modulate, and LlamaRMSNorm.
// Argument structs and exact semantics: qc_types.h (QcLayerNormArgs, QcRmsNormArgs).
#include "common.cuh"

namespace qc {

// One row of y = LN(x) * (1 + scale) + shift, V elements per access (V divides
// cols and every pointer is V-element aligned). Whole block; block-uniform.
template <typename T, int V>
__device__ __forceinline__ void layernorm_row(const T* __restrict__ x, T* __restrict__ y,
                                              const T* __restrict__ shift,
                                              const T* __restrict__ scale, int cols, float eps,
                                              float* scratch) {
    const int nv = cols / V;
    float mean, rstd;
    row_mean_rstd<T, V>(x, cols, eps, scratch, mean, rstd);

    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = round_to<T>((v[j] - mean) * rstd);  // norm(x) as T
        if (scale != nullptr) {
            float s[V];
            load_f32<V>(scale, i, s);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = round_to<T>(v[j] * round_to<T>(1.0f + s[j]));
        }
        if (shift != nullptr) {
            float s[V];
            load_f32<V>(shift, i, s);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] += s[j];  // rounded by the store
        }
        store_f32<V>(y, i, v);
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_mod(const QcLayerNormArgs& a) {
    __shared__ float scratch[32];
    constexpr int V = Vec16<T>::N;
    const T* x = dev_ptr<const T>(a.x);
    T* y = dev_ptr<T>(a.y);
    const T* shift = dev_ptr<const T>(a.shift);
    const T* scale = dev_ptr<const T>(a.scale);
    const bool vec = a.cols % V == 0 && a.x_row_stride % V == 0 && a.y_row_stride % V == 0 &&
                     a.shift_stride % V == 0 && a.scale_stride % V == 0 && aligned16(x) &&
                     aligned16(y) && aligned16(shift) && aligned16(scale);
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const int64_t b = r / a.rows_per_sample;
        const T* xr = x + r * a.x_row_stride;
        T* yr = y + r * a.y_row_stride;
        const T* sh = shift != nullptr ? shift + b * a.shift_stride : nullptr;
        const T* sc = scale != nullptr ? scale + b * a.scale_stride : nullptr;
        if (vec)
            layernorm_row<T, V>(xr, yr, sh, sc, a.cols, a.eps, scratch);
        else
            layernorm_row<T, 1>(xr, yr, sh, sc, a.cols, a.eps, scratch);
    }
}

// One warp per row: y = w * (x * rsqrt(mean(x^2) + eps)); y may equal x, so
// x and y are not __restrict__ (each element is read, then written, by one lane).
template <typename T>
__device__ __forceinline__ void rmsnorm(const QcRmsNormArgs& a) {
    const T* x = dev_ptr<const T>(a.x);
    T* y = dev_ptr<T>(a.y);
    const T* __restrict__ w = dev_ptr<const T>(a.w);
    const int lane = threadIdx.x & 31;
    const int64_t rows = a.n_outer * a.n_inner;
    const float inv_dim = 1.0f / static_cast<float>(a.dim);
    // Warp-uniform loop: blockDim.x is a multiple of 32.
    for (int64_t r = global_thread_id() >> 5; r < rows; r += global_thread_count() >> 5) {
        const int64_t o = r / a.n_inner;
        const int64_t i = r - o * a.n_inner;
        const T* xr = x + o * a.x_outer_stride + i * a.x_inner_stride;
        T* yr = y + o * a.y_outer_stride + i * a.y_inner_stride;
        float sq = 0.0f;
        for (int j = lane; j < a.dim; j += 32) {
            const float v = to_f32(xr[j]);
            sq += v * v;
        }
        const float inv = rsqrtf(warp_sum(sq) * inv_dim + a.eps);
        for (int j = lane; j < a.dim; j += 32) {
            const float n = round_to<T>(to_f32(xr[j]) * inv);  // hidden.to(input_dtype)
            yr[j] = from_f32<T>(to_f32(w[j]) * n);
        }
    }
}

}  // namespace qc

// y = LN(x) * (1 + scale[b]) + shift[b] over rows (plain LN when shift = scale = 0), f32.
extern "C" __global__ void __launch_bounds__(1024) qc_layernorm_mod_f32(const QcLayerNormArgs a) {
    qc::layernorm_mod<float>(a);
}
// y = LN(x) * (1 + scale[b]) + shift[b] over rows (plain LN when shift = scale = 0), bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_layernorm_mod_bf16(const QcLayerNormArgs a) {
    qc::layernorm_mod<qc::bf16>(a);
}
// y = w * x * rsqrt(mean(x^2) + eps) per strided row (LlamaRMSNorm), f32.
extern "C" __global__ void __launch_bounds__(1024) qc_rmsnorm_f32(const QcRmsNormArgs a) {
    qc::rmsnorm<float>(a);
}
// y = w * x * rsqrt(mean(x^2) + eps) per strided row (LlamaRMSNorm), bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_rmsnorm_bf16(const QcRmsNormArgs a) {
    qc::rmsnorm<qc::bf16>(a);
}
