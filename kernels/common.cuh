// common.cuh: device helpers shared by every kernels/*.cu file.
//
// All kernels are compiled into one module (build.rs generates a single
// translation unit that #includes every kernels/*.cu), so this header is
// included several times per TU and everything here is inline / templates.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "qc_types.h"

namespace qc {

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------- dtypes

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as PyTorch's float -> bfloat16 conversion.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T's precision (identity for float): where PyTorch would store
// an intermediate result as T, the bf16 kernels round it here too.
template <typename T> __device__ __forceinline__ float round_to(float v) {
    return to_f32(from_f32<T>(v));
}

// ------------------------------------------------------ addresses, vectors

template <typename T> __device__ __forceinline__ T* dev_ptr(qc_dptr a) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Elements of T in one 16-byte vector: 4 f32, 8 bf16.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / static_cast<int>(sizeof(T));
};

// An unsigned type of exactly BYTES bytes and the same alignment: vector
// accesses go through these so that nvcc emits single 16/8/4/2-byte loads
// and stores.
template <int BYTES> struct Raw;
template <> struct Raw<16> { typedef uint4 type; };
template <> struct Raw<8> { typedef uint2 type; };
template <> struct Raw<4> { typedef unsigned int type; };
template <> struct Raw<2> { typedef unsigned short type; };
template <> struct Raw<1> { typedef unsigned char type; };

// The vector accessors below take (base, i) and touch base[i*N .. i*N + N),
// base aligned to N * sizeof(T). They index base as an array of Raw vectors:
// written as a T-pointer offset (base + i*N) instead, nvcc 13.0 splits 16-byte
// stores into four 4-byte ones whenever base's alignment is not provable.

// dst = base[i*N .. i*N + N) in one access.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* base, int64_t i, T (&dst)[N]) {
    typedef typename Raw<N * static_cast<int>(sizeof(T))>::type R;
    const R raw = reinterpret_cast<const R*>(base)[i];
    memcpy(dst, &raw, sizeof(R));
}

// base[i*N .. i*N + N) = src in one access.
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t i, const T (&src)[N]) {
    typedef typename Raw<N * static_cast<int>(sizeof(T))>::type R;
    R raw;
    memcpy(&raw, src, sizeof(R));
    reinterpret_cast<R*>(base)[i] = raw;
}

// out = base[i*N .. i*N + N) widened to f32.
template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* base, int64_t i, float (&out)[N]) {
    T v[N];
    load_vec<N>(base, i, v);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(v[j]);
}

// base[i*N .. i*N + N) = in rounded to T.
template <int N, typename T>
__device__ __forceinline__ void store_f32(T* base, int64_t i, const float (&in)[N]) {
    T v[N];
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = from_f32<T>(in[j]);
    store_vec<N>(base, i, v);
}

// ------------------------------------------------------------- indexing

__device__ __forceinline__ int64_t global_thread_id() {
    return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t global_thread_count() {
    return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ------------------------------------------------------------ reductions

// Sum over the 32 lanes of a warp; every lane gets the result. All 32 lanes
// must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. All threads must call it. scratch: __shared__
// float[32]; back-to-back calls may reuse the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's reads of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. All threads must call it. scratch: __shared__
// float[32], may be shared with block_sum.
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

// ------------------------------------------------------------- row norms

// LayerNorm statistics of one row of `cols` elements (V per vector access,
// cols a multiple of V): mean, then rstd = rsqrt(var + eps) from an exact
// second pass over the (cache-resident) row. Whole block; block-uniform;
// every thread gets both values. scratch: __shared__ float[32].
template <typename T, int V>
__device__ __forceinline__ void row_mean_rstd(const T* __restrict__ x, int cols, float eps,
                                              float* scratch, float& mean, float& rstd) {
    const int nv = cols / V;
    const float inv_cols = 1.0f / static_cast<float>(cols);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) sum += v[j];
    }
    mean = block_sum(sum, scratch) * inv_cols;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float d = v[j] - mean;
            sq += d * d;
        }
    }
    rstd = rsqrtf(block_sum(sq, scratch) * inv_cols + eps);
}

// ------------------------------------- async copies, tensor-core operand loads

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; bytes [src_bytes, 16) of the destination are zero-filled
// (src_bytes = 0: nothing is read, the 16 bytes are zeroed).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait_pending() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory: lanes 8i .. 8i+7 give the row addresses
// of matrix i (16 bytes each), and lane l receives row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 of matrix i in r[i] (lower column in the low half). With .trans,
// r[i] holds column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1 instead. With int8
// data a row is 16 int8, which gives the m16n8k32 s8 fragments (mma_s8_16832)
// the same way as the bf16 ones.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

// 2^x (MUFU.EX2, ~2 ulp); 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats rounded to bf16 (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// ------------------------------------------------------------ tensor cores

// c += a (16x16, row-major) * b (16x8, col-major), bf16 in, f32 accumulate
// (mma.sync m16n8k16). Fragments, with g = lane / 4 and q = lane % 4, each
// register holding two consecutive-k bf16 (lower k in the low half):
// a[0] = A[g][2q..], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..],
// a[3] = A[g+8][2q+8..]; b0 = B[2q..][g], b1 = B[2q+8..][g];
// c[0..1] = C[g][2q, 2q+1], c[2..3] = C[g+8][2q, 2q+1].
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------- flash attention pieces
// Shared by attention.cu (bf16 Q K^T) and attention_int8.cu (int8 Q K^T): the
// PTX wrappers, the cp.async row loads, the online softmax, P V and the
// epilogue of one warp's 16 query rows (m16n8 accumulator layout: lane holds
// rows lane/4 (index hr = 0) and lane/4 + 8 (hr = 1), columns 2 (lane%4) + {0, 1}
// of every 8-column block).

// c += a (16x32, row) * b (32x8, col), s8 in, exact s32 accumulate (mma.sync m16n8k32).
// a[0] = A[g][4q..4q+3], a[1] = A[g+8][4q..], a[2] = A[g][4q+16..], a[3] = A[g+8][4q+16..];
// b0 = B[4q..4q+3][g], b1 = B[4q+16..][g]; c as for mma_bf16_16816 (g = lane/4, q = lane%4).
__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A sequence of bf16 rows in global memory: element d of item i (i < len) is at
// base + (row0 + i * rstride) * ld + d, base already offset to the head.
struct Seq {
    const bf16* base;
    int64_t ld;
    int64_t row0;
    int64_t rstride;
    int len;
};

// Issues cp.async for tile rows r < ROWS holding items start + r of seq into s
// (bf16 rows SROW apart), columns [0, head_dim) of the HDP padded ones only;
// items >= len are zero-filled. Thread tid of NTHREADS handles chunks
// tid, tid + NTHREADS, ...
template <int HDP, int ROWS, int SROW, int NTHREADS>
__device__ __forceinline__ void load_rows_async(bf16* s, const Seq& q, int start, int head_dim) {
    constexpr int CPR = HDP / 8;  // 16-byte chunks per padded row
#pragma unroll
    for (int k = 0; k < (ROWS * CPR + NTHREADS - 1) / NTHREADS; ++k) {
        const int idx = threadIdx.x + k * NTHREADS;
        const int r = idx / CPR;
        const int c = idx - r * CPR;
        if (idx < ROWS * CPR && c * 8 < head_dim) {
            const int i = start + r;
            const bool ok = i < q.len;
            // Out-of-range rows read nothing; item 0 (always valid) keeps the address legal.
            const bf16* src = q.base + (q.row0 + static_cast<int64_t>(ok ? i : 0) * q.rstride) * q.ld + c * 8;
            cp_async16(s + r * SROW + c * 8, src, ok ? 16 : 0);
        }
    }
}

// Online softmax over one key tile: s[n][e] are the tile's base-2 scores (keys past
// the sequence at -inf, at least one finite per row); they become the unnormalised
// probabilities exp2(s - m_new), the running max and this lane's part of the running
// sum are updated, and o (NO 8-column blocks) is rescaled.
template <int NB, int NO>
__device__ __forceinline__ void flash_softmax_update(float (&s)[NB][4], float (&m_run)[2], float (&l_run)[2],
                                                     float (&o)[NO][4]) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < NB; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hr], s[n][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[hr], mx);
        const float alpha = fast_exp2(m_run[hr] - m_new);  // 0 on the first tile
        m_run[hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < NB; ++n) {
            const float p0 = fast_exp2(s[n][2 * hr] - m_new);
            const float p1 = fast_exp2(s[n][2 * hr + 1] - m_new);
            s[n][2 * hr] = p0;
            s[n][2 * hr + 1] = p1;
            sum += p0 + p1;
        }
        l_run[hr] = l_run[hr] * alpha + sum;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            o[n][2 * hr] *= alpha;
            o[n][2 * hr + 1] *= alpha;
        }
    }
}

// O += P V for one key tile of NB 8-key blocks starting at key key0: P (bf16) from the
// probability accumulators as A fragments, V^T via ldmatrix.trans from v_s (bf16 rows
// SROW apart, KB 16-column blocks of the padded head dim).
template <int NB, int KB, int SROW>
__device__ __forceinline__ void flash_pv(const float (&s)[NB][4], float (&o)[2 * KB][4], const bf16* v_s, int key0,
                                         int kv_len, int hd) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < NB / 2; ++kk) {
        if (key0 + kk * 16 >= kv_len) continue;  // probabilities all 0
        uint32_t p[4];
        p[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        p[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        p[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int d2 = 0; d2 < KB; ++d2) {
            if (d2 * 16 >= hd) continue;  // all-padding output columns
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + d2 * 16 +
                                     (lane >> 4) * 8);
            mma_bf16_16816(o[2 * d2], p, b[0], b[1]);
            mma_bf16_16816(o[2 * d2 + 1], p, b[2], b[3]);
        }
    }
}

// Epilogue: O / l rounded to bf16, straight from the accumulators, for the warp's rows
// q0 + warp * 16 + [0, 16) below q_len: row i at out + (row0 + i * rstride) * ld (out
// already offset to the head), columns < hd.
template <int NO>
__device__ __forceinline__ void flash_store(const float (&o)[NO][4], const float (&l_run)[2], bf16* out, int64_t row0,
                                            int64_t rstride, int64_t ld, int q0, int q_len, int hd) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float l = l_run[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = 1.0f / l;
        const int i = q0 + warp * 16 + (lane >> 2) + hr * 8;
        if (i < q_len) {
            bf16* orow = out + (row0 + static_cast<int64_t>(i) * rstride) * ld + (lane & 3) * 2;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                if (n * 8 < hd) {
                    const uint32_t v = pack_bf16(o[n][2 * hr] * inv, o[n][2 * hr + 1] * inv);
                    *reinterpret_cast<uint32_t*>(orow + n * 8) = v;
                }
            }
        }
    }
}

__device__ __forceinline__ float silu_f32(float v) {
    return v / (1.0f + expf(-v));
}

}  // namespace qc
