// conv.cu: the VAE decoders' ops: 2-D/3-D convolution as an implicit GEMM on
// tensor cores, group norm (+ SiLU), nearest 2x upsampling, depth-to-time
// and the per-channel affine map. Argument structs and exact semantics:
// qc_types.h (conv.cu section).
#include "common.cuh"

namespace qc {
namespace conv {

// GEMM view: M = output channels, N = output positions, K = c_in kt kh kw.
constexpr int THREADS = 128;  // 4 warps, 2 (M) x 2 (N), 32 x 32 each
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 32;
// Shared rows are K-contiguous with 8 bf16 of padding: the fragment loads
// (row g, word q) then hit 32 distinct banks.
constexpr int LDS = BK + 8;
// Each thread stages 16 consecutive k of one row of A and one column of B.
constexpr int KPT = 16;
static_assert(BM * BK == THREADS * KPT && BN * BK == THREADS * KPT, "one 16-k run per thread per tile");

// The (c, a, i, j) of a reduction index k and a step to k + 1, so that
// gathering consecutive k needs no division.
struct KPos {
    int c, a, i, j;
    __device__ __forceinline__ void set(int k, int kt, int kh, int kw) {
        const int khw = kh * kw;
        const int kvol = kt * khw;
        c = k / kvol;
        int r = k - c * kvol;
        a = r / khw;
        r -= a * khw;
        i = r / kw;
        j = r - i * kw;
    }
    __device__ __forceinline__ void next(int kt, int kh, int kw) {
        if (++j < kw) return;
        j = 0;
        if (++i < kh) return;
        i = 0;
        if (++a < kt) return;
        a = 0;
        ++c;
    }
};

// The 16 weights w[m, k0 .. k0 + 16) as bf16 (zeros past c_out or K).
__device__ __forceinline__ void load_a(const bf16* __restrict__ w, int m, int k0, int c_out, int k_total,
                                       bool vec, uint4 (&r)[2]) {
    if (m < c_out && vec && k0 + KPT <= k_total) {
        const uint4* p = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(m) * k_total + k0);
        r[0] = p[0];
        r[1] = p[1];
        return;
    }
    bf16 v[KPT];
#pragma unroll
    for (int e = 0; e < KPT; ++e) {
        const int k = k0 + e;
        v[e] = (m < c_out && k < k_total) ? w[static_cast<int64_t>(m) * k_total + k] : __float2bfloat16_rn(0.0f);
    }
    memcpy(r, v, sizeof(v));
}

// The output position a thread gathers for: its sample's input base and the
// input coordinates of the kernel window's first tap (or valid = false).
struct Pixel {
    const bf16* base;  // x + n c_in t_in h_in w_in
    int t0, r0, s0;
    bool valid;
};

// The 16 inputs of column `px` for k0 .. k0 + 16 (zeros in the padding, past K
// and for invalid positions).
__device__ __forceinline__ void load_b(const QcConvArgs& p, const Pixel& px, int k0, int k_total,
                                       uint4 (&r)[2]) {
    bf16 v[KPT];
    KPos kp;
    kp.set(k0, p.kt, p.kh, p.kw);
    const int64_t plane = static_cast<int64_t>(p.h_in) * p.w_in;
#pragma unroll
    for (int e = 0; e < KPT; ++e) {
        const int ti = px.t0 + kp.a;
        const int ri = px.r0 + kp.i;
        const int si = px.s0 + kp.j;
        const bool in = px.valid && k0 + e < k_total && ti >= 0 && ti < p.t_in && ri >= 0 && ri < p.h_in &&
                        si >= 0 && si < p.w_in;
        v[e] = in ? px.base[(static_cast<int64_t>(kp.c) * p.t_in + ti) * plane + static_cast<int64_t>(ri) * p.w_in + si]
                  : __float2bfloat16_rn(0.0f);
        kp.next(p.kt, p.kh, p.kw);
    }
    memcpy(r, v, sizeof(v));
}

__device__ __forceinline__ uint32_t lds32(const bf16* s) {
    return *reinterpret_cast<const uint32_t*>(s);
}

__device__ __forceinline__ void conv3d(const QcConvArgs& p) {
    if (blockDim.x != THREADS) __trap();
    __shared__ __align__(16) bf16 sa[BM * LDS];
    __shared__ __align__(16) bf16 sb[BN * LDS];

    const bf16* __restrict__ x = dev_ptr<const bf16>(p.x);
    const bf16* __restrict__ w = dev_ptr<const bf16>(p.w);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = (warp & 1) * 32;
    const int wn = (warp >> 1) * 32;
    const int g = lane >> 2;
    const int q = lane & 3;

    const int k_total = p.c_in * p.kt * p.kh * p.kw;
    const int64_t out_plane = static_cast<int64_t>(p.h_out) * p.w_out;
    const int64_t per_sample = out_plane * p.t_out;
    const int64_t positions = per_sample * p.n;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
    const int m0 = blockIdx.y * BM;
    // 16-byte weight loads need every row start aligned.
    const bool vec_a = (k_total % 8) == 0;

    // Staging roles: A row tid / 2, B column tid % 64, each 16 k from koff.
    const int a_row = tid >> 1;
    const int a_koff = (tid & 1) * KPT;
    const int b_col = tid % BN;
    const int b_koff = (tid / BN) * KPT;

    Pixel px;
    {
        const int64_t pos = n0 + b_col;
        px.valid = pos < positions;
        const int64_t pp = px.valid ? pos : 0;
        const int64_t b = pp / per_sample;
        int64_t rest = pp - b * per_sample;
        const int t = static_cast<int>(rest / out_plane);
        rest -= static_cast<int64_t>(t) * out_plane;
        const int r = static_cast<int>(rest / p.w_out);
        const int s = static_cast<int>(rest - static_cast<int64_t>(r) * p.w_out);
        px.base = x + b * static_cast<int64_t>(p.c_in) * p.t_in * p.h_in * p.w_in;
        px.t0 = t - p.pad_t;
        px.r0 = r - p.pad_h;
        px.s0 = s - p.pad_w;
    }

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    uint4 ra[2], rb[2];
    load_a(w, m0 + a_row, a_koff, p.c_out, k_total, vec_a, ra);
    load_b(p, px, b_koff, k_total, rb);

    for (int k0 = 0; k0 < k_total; k0 += BK) {
        __syncthreads();  // the previous tile's fragment reads are done
        {
            uint4* da = reinterpret_cast<uint4*>(sa + a_row * LDS + a_koff);
            da[0] = ra[0];
            da[1] = ra[1];
            uint4* db = reinterpret_cast<uint4*>(sb + b_col * LDS + b_koff);
            db[0] = rb[0];
            db[1] = rb[1];
        }
        __syncthreads();
        // Gather the next tile while the tensor cores work on this one.
        if (k0 + BK < k_total) {
            load_a(w, m0 + a_row, k0 + BK + a_koff, p.c_out, k_total, vec_a, ra);
            load_b(p, px, k0 + BK + b_koff, k_total, rb);
        }
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            uint32_t af[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const bf16* r0 = sa + (wm + mi * 16 + g) * LDS + ks + 2 * q;
                af[mi][0] = lds32(r0);
                af[mi][1] = lds32(r0 + 8 * LDS);
                af[mi][2] = lds32(r0 + 8);
                af[mi][3] = lds32(r0 + 8 * LDS + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const bf16* c0 = sb + (wn + ni * 8 + g) * LDS + ks + 2 * q;
                const uint32_t b0 = lds32(c0);
                const uint32_t b1 = lds32(c0 + 8);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) mma_bf16_16816(acc[mi][ni], af[mi], b0, b1);
            }
        }
    }

    // Epilogue: acc[mi][ni][h * 2 + e] is channel m0 + wm + mi 16 + g + 8 h,
    // position n0 + wn + ni 8 + 2 q + e.
    const float* __restrict__ bias = dev_ptr<const float>(p.bias);
    bf16* __restrict__ y = dev_ptr<bf16>(p.y);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int64_t pos = n0 + wn + ni * 8 + 2 * q + e;
            if (pos >= positions) continue;
            const int64_t b = pos / per_sample;
            const int64_t within = pos - b * per_sample;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = m0 + wm + mi * 16 + g + 8 * h;
                    if (m >= p.c_out) continue;
                    float v = acc[mi][ni][h * 2 + e];
                    if (bias) v += bias[m];
                    y[(b * p.c_out + m) * per_sample + within] = from_f32<bf16>(v);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- group norm

// Mean and M2 of one chunk of one group (two exact passes over the chunk).
template <typename T>
__device__ __forceinline__ void group_norm_stats(const QcGroupNormArgs& p) {
    __shared__ float scratch[32];
    const int64_t gy = blockIdx.y;
    const int64_t start = static_cast<int64_t>(blockIdx.x) * p.chunk_elems;
    const int64_t len = min(static_cast<int64_t>(p.chunk_elems), p.group_elems - start);
    const T* __restrict__ x = dev_ptr<const T>(p.x) + gy * p.group_elems + start;
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) sum += to_f32(x[i]);
    const float mean = block_sum(sum, scratch) / static_cast<float>(len);
    float sq = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = to_f32(x[i]) - mean;
        sq += d * d;
    }
    const float m2 = block_sum(sq, scratch);
    if (threadIdx.x == 0) {
        float* stats = dev_ptr<float>(p.stats) + (gy * p.chunks + blockIdx.x) * 2;
        stats[0] = mean;
        stats[1] = m2;
    }
}

template <typename T>
__device__ __forceinline__ void group_norm_apply(const QcGroupNormArgs& p) {
    __shared__ float scratch[32];
    const int64_t gy = blockIdx.y;
    const float* __restrict__ stats = dev_ptr<const float>(p.stats) + gy * p.chunks * 2;
    const float total = static_cast<float>(p.group_elems);
    // Chan's merge of the chunks (the last chunk may be shorter).
    auto count = [&](int c) {
        return static_cast<float>(min(static_cast<int64_t>(p.chunk_elems), p.group_elems - static_cast<int64_t>(c) * p.chunk_elems));
    };
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.chunks; c += blockDim.x) s += count(c) * stats[2 * c];
    const float mean = block_sum(s, scratch) / total;
    float m2 = 0.0f;
    for (int c = threadIdx.x; c < p.chunks; c += blockDim.x) {
        const float d = stats[2 * c] - mean;
        m2 += stats[2 * c + 1] + count(c) * d * d;
    }
    const float rstd = rsqrtf(block_sum(m2, scratch) / total + p.eps);

    const int64_t start = static_cast<int64_t>(blockIdx.x) * p.chunk_elems;
    const int64_t len = min(static_cast<int64_t>(p.chunk_elems), p.group_elems - start);
    const int64_t channels_per_group = p.group_elems / p.spatial;
    const T* __restrict__ x = dev_ptr<const T>(p.x) + gy * p.group_elems + start;
    T* __restrict__ y = dev_ptr<T>(p.y) + gy * p.group_elems + start;
    const float* __restrict__ weight = dev_ptr<const float>(p.weight);
    const float* __restrict__ bias = dev_ptr<const float>(p.bias);
    const int64_t c_first = (gy % p.groups) * channels_per_group;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        const int64_t c = c_first + (start + i) / p.spatial;
        float v = (to_f32(x[i]) - mean) * rstd * weight[c] + bias[c];
        if (p.silu) v = silu_f32(round_to<T>(v));
        y[i] = from_f32<T>(v);
    }
}

// ------------------------------------------------------------ resampling

template <typename T>
__device__ __forceinline__ void upsample_nearest2x(const QcResampleArgs& p) {
    const T* __restrict__ x = dev_ptr<const T>(p.x);
    T* __restrict__ y = dev_ptr<T>(p.y);
    const int64_t w2 = 2 * p.w;
    const int64_t plane2 = 2 * p.h * w2;
    const int64_t n = p.planes * plane2;
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
        const int64_t pl = i / plane2;
        const int64_t rest = i - pl * plane2;
        const int64_t r = rest / w2;
        const int64_t s = rest - r * w2;
        y[i] = x[(pl * p.h + r / 2) * p.w + s / 2];
    }
}

template <typename T>
__device__ __forceinline__ void depth_to_time(const QcResampleArgs& p) {
    const T* __restrict__ x = dev_ptr<const T>(p.x);
    T* __restrict__ y = dev_ptr<T>(p.y);
    const int64_t f = p.factor;
    const int64_t frames = p.h * f;  // output frames per plane
    const int64_t n = p.planes * frames * p.w;
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
        const int64_t e = i % p.w;
        const int64_t rest = i / p.w;
        const int64_t tt = rest % frames;
        const int64_t pl = rest / frames;
        const int64_t u = tt / f;
        const int64_t k = tt - u * f;
        y[i] = x[((pl * f + k) * p.h + u) * p.w + e];
    }
}

template <typename T>
__device__ __forceinline__ void channel_affine(const QcResampleArgs& p) {
    const T* __restrict__ x = dev_ptr<const T>(p.x);
    T* __restrict__ y = dev_ptr<T>(p.y);
    const float* __restrict__ scale = dev_ptr<const float>(p.scale);
    const float* __restrict__ shift = dev_ptr<const float>(p.shift);
    const int64_t n = p.planes * p.h * p.w;
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
        const int64_t c = (i / p.w) % p.h;
        // The CPU's x * scale + shift, each operation rounded (no FMA).
        y[i] = from_f32<T>(__fadd_rn(__fmul_rn(to_f32(x[i]), scale[c]), shift[c]));
    }
}

}  // namespace conv
}  // namespace qc

// y = conv3d(x, w) + bias as an implicit GEMM, bf16 (Conv2d: t_in = kt = 1).
extern "C" __global__ void __launch_bounds__(128) qc_conv3d_bf16(const QcConvArgs a) {
    qc::conv::conv3d(a);
}
// Group norm pass 1: per-chunk mean and M2, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_group_norm_stats_f32(const QcGroupNormArgs a) {
    qc::conv::group_norm_stats<float>(a);
}
// Group norm pass 1: per-chunk mean and M2, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_group_norm_stats_bf16(const QcGroupNormArgs a) {
    qc::conv::group_norm_stats<qc::bf16>(a);
}
// Group norm pass 2: merge statistics, normalise, affine, optional SiLU, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_group_norm_apply_f32(const QcGroupNormArgs a) {
    qc::conv::group_norm_apply<float>(a);
}
// Group norm pass 2: merge statistics, normalise, affine, optional SiLU, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_group_norm_apply_bf16(const QcGroupNormArgs a) {
    qc::conv::group_norm_apply<qc::bf16>(a);
}
// Nearest 2x upsampling of the last two dims, f32.
extern "C" __global__ void __launch_bounds__(256) qc_upsample_nearest2x_f32(const QcResampleArgs a) {
    qc::conv::upsample_nearest2x<float>(a);
}
// Nearest 2x upsampling of the last two dims, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_upsample_nearest2x_bf16(const QcResampleArgs a) {
    qc::conv::upsample_nearest2x<qc::bf16>(a);
}
// Depth to time, f32.
extern "C" __global__ void __launch_bounds__(256) qc_depth_to_time_f32(const QcResampleArgs a) {
    qc::conv::depth_to_time<float>(a);
}
// Depth to time, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_depth_to_time_bf16(const QcResampleArgs a) {
    qc::conv::depth_to_time<qc::bf16>(a);
}
// Per-channel x * scale + shift, f32.
extern "C" __global__ void __launch_bounds__(256) qc_channel_affine_f32(const QcResampleArgs a) {
    qc::conv::channel_affine<float>(a);
}
// Per-channel x * scale + shift, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_channel_affine_bf16(const QcResampleArgs a) {
    qc::conv::channel_affine<qc::bf16>(a);
}
