// cache.cu: storage and divergence ops of the caching policies: per-row int8
// quantization of a sub-module output, the gated reuse op reading that int8
// cache, and deterministic two-pass reductions (sum |a - b|, sum |b|; sum |a|,
// sum a^2) whose few results the host reads once.
// Argument structs and exact semantics: qc_types.h (cache.cu section).
#include "common.cuh"

namespace qc {
namespace cache {

constexpr int kQmax = 127;

// base[i*V .. i*V + V) of int8 in one access (V = 1, 4 or 8).
template <int V> __device__ __forceinline__ void load_i8(const int8_t* base, int64_t i, int8_t (&dst)[V]) {
    load_vec<V>(base, i, dst);
}

// clamp(roundf(v / s), -127, 127): a correctly rounded f32 division (as the CPU's),
// ties away from zero; a NaN quotient converts to 0 (cvt.rzi of NaN).
__device__ __forceinline__ int8_t quantize1(float v, float s) {
    const int r = static_cast<int>(roundf(__fdiv_rn(v, s)));
    return static_cast<int8_t>(max(-kQmax, min(kQmax, r)));
}

// One row of `cols` elements, V per access. Whole block; block-uniform.
template <typename T, int V>
__device__ __forceinline__ void quantize_row(const T* __restrict__ x, int8_t* __restrict__ q, float* scale_out,
                                             int cols, float* scratch) {
    const int nv = cols / V;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = block_max(amax, scratch);
    const float s = __fdiv_rn(amax, static_cast<float>(kQmax));
    if (threadIdx.x == 0) *scale_out = s;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
        int8_t o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = amax > 0.0f ? quantize1(v[j], s) : static_cast<int8_t>(0);
        store_vec<V>(q, i, o);
    }
}

template <typename T>
__device__ __forceinline__ void quantize_rows(const QcCacheQuantizeArgs& a) {
    __shared__ float scratch[32];
    constexpr int V = Vec16<T>::N;
    const T* x = dev_ptr<const T>(a.x);
    int8_t* q = dev_ptr<int8_t>(a.q);
    float* scale = dev_ptr<float>(a.scale);
    // Rows of whole vectors: x rows 16-byte aligned, q rows V-byte aligned.
    const bool vec = a.cols % V == 0 && aligned16(x) && (reinterpret_cast<uintptr_t>(q) % V) == 0;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        if (vec)
            quantize_row<T, V>(x + r * a.cols, q + r * a.cols, scale + r, a.cols, scratch);
        else
            quantize_row<T, 1>(x + r * a.cols, q + r * a.cols, scale + r, a.cols, scratch);
    }
}

// x[r, :] += bf16(gate * bf16(q * s)), V elements per access (8 bf16 of x, 8 int8 of q).
template <int V>
__device__ __forceinline__ void add_gated_i8_rows(const QcCacheAddGatedI8Args& a) {
    bf16* __restrict__ x = dev_ptr<bf16>(a.x);
    const int8_t* __restrict__ q = dev_ptr<const int8_t>(a.q);
    const float* __restrict__ scale = dev_ptr<const float>(a.scale);
    const float* __restrict__ gate = dev_ptr<const float>(a.gate);
    const int* __restrict__ gi = dev_ptr<const int>(a.group_index);
    const int nv = a.cols / V;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        bf16* xr = x + r * a.cols;
        const int8_t* qr = q + r * a.cols;
        const float s = scale[r];
        const int64_t g0 = r / a.group_size;
        const float* gr = gate ? gate + (gi ? gi[g0] : g0) * a.gate_stride : nullptr;
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float u[V];
            int8_t c[V];
            load_f32<V>(xr, i, u);
            load_i8<V>(qr, i, c);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float v = round_to<bf16>(__fmul_rn(static_cast<float>(c[j]), s));
                const float g = gr ? gr[i * V + j] : 1.0f;
                u[j] = __fadd_rn(u[j], round_to<bf16>(__fmul_rn(g, v)));
            }
            store_f32<V>(xr, i, u);
        }
    }
}

__device__ __forceinline__ void add_gated_i8(const QcCacheAddGatedI8Args& a) {
    constexpr int V = Vec16<bf16>::N;
    if (a.cols % V == 0 && aligned16(dev_ptr<const bf16>(a.x)) && (a.q % V) == 0)
        add_gated_i8_rows<V>(a);
    else
        add_gated_i8_rows<1>(a);
}

// The two sums of one element pair: (|a - b|, |b|) for l1, (|a|, a^2) otherwise.
template <bool L1> __device__ __forceinline__ void accumulate(float u, float v, float& s0, float& s1) {
    if constexpr (L1) {
        s0 += fabsf(u - v);
        s1 += fabsf(v);
    } else {
        s0 += fabsf(u);
        s1 = fmaf(u, u, s1);
    }
}

// First pass: one f32 partial pair per block (see QcDivergenceArgs).
template <typename T, bool L1>
__device__ __forceinline__ void partials(const QcDivergenceArgs& a) {
    __shared__ float scratch[32];
    constexpr int V = Vec16<T>::N;
    const int64_t part = blockIdx.x / a.blocks_per_part;
    if (part >= a.parts) return;  // block-uniform: a grid larger than asked for
    const int64_t k = blockIdx.x - part * a.blocks_per_part;
    const T* x = dev_ptr<const T>(a.a) + part * a.part_len;
    const T* y = L1 ? dev_ptr<const T>(a.b) + part * a.part_len : x;
    const int64_t first = k * blockDim.x + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(a.blocks_per_part) * blockDim.x;
    // Whole 16-byte vectors when the part starts aligned, then the scalar tail.
    const int64_t nvec = (aligned16(x) && aligned16(y)) ? a.part_len / V : 0;
    float s0 = 0.0f, s1 = 0.0f;
    for (int64_t i = first; i < nvec; i += stride) {
        float u[V], v[V];
        load_f32<V>(x, i, u);
        if constexpr (L1) load_f32<V>(y, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) accumulate<L1>(u[j], L1 ? v[j] : 0.0f, s0, s1);
    }
    for (int64_t i = nvec * V + first; i < a.part_len; i += stride)
        accumulate<L1>(to_f32(x[i]), L1 ? to_f32(y[i]) : 0.0f, s0, s1);
    s0 = block_sum(s0, scratch);
    s1 = block_sum(s1, scratch);
    if (threadIdx.x == 0) {
        float* p = dev_ptr<float>(a.partials) + 2 * static_cast<int64_t>(blockIdx.x);
        p[0] = s0;
        p[1] = s1;
    }
}

// block_sum in f64. scratch: __shared__ double[32].
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();  // the previous call's reads of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Second pass: each part's partials summed in f64, in a fixed order.
__device__ __forceinline__ void sum_partials(const QcDivergenceArgs& a) {
    __shared__ double scratch[32];
    const float* p = dev_ptr<const float>(a.partials);
    float* out = dev_ptr<float>(a.out);
    for (int part = blockIdx.x; part < a.parts; part += gridDim.x) {
        const float* pp = p + 2 * static_cast<int64_t>(part) * a.blocks_per_part;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            double s = 0.0;
            for (int i = threadIdx.x; i < a.blocks_per_part; i += blockDim.x) s += static_cast<double>(pp[2 * i + j]);
            s = block_sum_f64(s, scratch);
            if (threadIdx.x == 0) out[2 * part + j] = static_cast<float>(s);
        }
    }
}

}  // namespace cache
}  // namespace qc

// Per-row int8 cache: scale = max |x| / 127, q = round(x / scale), f32 input.
extern "C" __global__ void __launch_bounds__(1024) qc_cache_quantize_f32(const QcCacheQuantizeArgs a) {
    qc::cache::quantize_rows<float>(a);
}
// Per-row int8 cache: scale = max |x| / 127, q = round(x / scale), bf16 input.
extern "C" __global__ void __launch_bounds__(1024) qc_cache_quantize_bf16(const QcCacheQuantizeArgs a) {
    qc::cache::quantize_rows<qc::bf16>(a);
}
// x += gate * (q * scale) per row, x bf16, q int8.
extern "C" __global__ void __launch_bounds__(1024) qc_cache_add_gated_i8_bf16(const QcCacheAddGatedI8Args a) {
    qc::cache::add_gated_i8(a);
}
// Per block: sum |a - b| and sum |b| over its share of one part, f32.
extern "C" __global__ void __launch_bounds__(256) qc_l1_partials_f32(const QcDivergenceArgs a) {
    qc::cache::partials<float, true>(a);
}
// Per block: sum |a - b| and sum |b| over its share of one part, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_l1_partials_bf16(const QcDivergenceArgs a) {
    qc::cache::partials<qc::bf16, true>(a);
}
// Per block: sum |a| and sum a^2 over its share of one part, f32.
extern "C" __global__ void __launch_bounds__(256) qc_abs_sum_partials_f32(const QcDivergenceArgs a) {
    qc::cache::partials<float, false>(a);
}
// Per block: sum |a| and sum a^2 over its share of one part, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_abs_sum_partials_bf16(const QcDivergenceArgs a) {
    qc::cache::partials<qc::bf16, false>(a);
}
// Per part: the f64 sum of its blocks' partials, stored as f32.
extern "C" __global__ void __launch_bounds__(1024) qc_sum_partials(const QcDivergenceArgs a) {
    qc::cache::sum_partials(a);
}
