// rope.cu: rotary position embedding, in place, GPT-J interleaved pairs
// (rotary_embedding_torch 0.5.3 rotate_queries_or_keys). Semantics: qc_types.h (QcRopeArgs).
#include "common.cuh"

namespace qc {

// One block per (batch, position) row, threads over heads * head_dim/2 pairs.
// V = 2 loads a pair with one access (pair 2-element aligned), V = 1 two accesses.
template <typename T, int V>
__device__ __forceinline__ void rope_rows(const QcRopeArgs& a) {
    T* __restrict__ x = dev_ptr<T>(a.x);
    const float* __restrict__ freqs = dev_ptr<const float>(a.freqs);
    const int half = a.head_dim / 2;
    const int pairs = a.heads * half;
    const int64_t rows = a.batch * a.seq;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t n = r / a.seq;
        const int p = static_cast<int>(r - n * a.seq);
        T* xr = x + n * a.batch_stride + static_cast<int64_t>(p) * a.seq_stride;
        for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
            const int h = t / half;
            const int k = t - h * half;
            T* px = xr + static_cast<int64_t>(h) * a.head_stride + 2 * k;
            // PyTorch: freqs = pos.float() * f (f32), then cos/sin (precise, not fast-math).
            const float angle = __fmul_rn(static_cast<float>(p), freqs[k]);
            float sn, cs;
            sincosf(angle, &sn, &cs);
            float v[2];
            if constexpr (V == 2) {
                load_f32<2>(px, 0, v);
            } else {
                v[0] = to_f32(px[0]);
                v[1] = to_f32(px[1]);
            }
            // t * cos + rotate_half(t) * sin, each product rounded (no FMA), as in PyTorch.
            float o[2];
            o[0] = __fadd_rn(__fmul_rn(v[0], cs), __fmul_rn(-v[1], sn));
            o[1] = __fadd_rn(__fmul_rn(v[1], cs), __fmul_rn(v[0], sn));
            if constexpr (V == 2) {
                store_f32<2>(px, 0, o);
            } else {
                px[0] = from_f32<T>(o[0]);
                px[1] = from_f32<T>(o[1]);
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void rope(const QcRopeArgs& a) {
    const bool pair_aligned = (reinterpret_cast<uintptr_t>(dev_ptr<T>(a.x)) % (2 * sizeof(T))) == 0 &&
                              a.batch_stride % 2 == 0 && a.seq_stride % 2 == 0 &&
                              a.head_stride % 2 == 0;
    if (pair_aligned)
        rope_rows<T, 2>(a);
    else
        rope_rows<T, 1>(a);
}

}  // namespace qc

// x[n, p, h, 2k:2k+2] rotated by angle p * freqs[k] (interleaved RoPE), in place, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_rope_f32(const QcRopeArgs a) {
    qc::rope<float>(a);
}
// x[n, p, h, 2k:2k+2] rotated by angle p * freqs[k] (interleaved RoPE), in place, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_rope_bf16(const QcRopeArgs a) {
    qc::rope<qc::bf16>(a);
}
