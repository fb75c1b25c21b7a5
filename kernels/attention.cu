// attention.cu: flash attention (online softmax) on bf16 tensor cores, with
// strided groups (spatial / temporal self-attention on slices of a fused qkv
// buffer), ragged key ranges (cross-attention) and RoPE fused on load.
// Semantics and requirements: qc_types.h (QcAttentionArgs).
//
// Design (FlashAttention-2 style, mma.sync so it runs on sm_80 and sm_90):
//   - one block of 4 warps per work item (64 query rows of one head of one
//     group); each warp owns 16 query rows, holds their Q as m16n8k16 A
//     fragments in registers, and keeps its O accumulator (16 x HDP f32), row
//     max and row sum in registers for the whole key loop;
//   - K and V tiles of BN keys go through shared memory with cp.async, two
//     stages (the next tile loads while this one is computed); S = Q K^T with
//     ldmatrix (K rows are the B operand's columns), P is rounded to bf16 in
//     registers and reused as the A operand of O += P V (V through
//     ldmatrix.trans);
//   - the head dim is padded to HDP (a multiple of 16, the MMA k-size) inside
//     shared memory only: columns [head_dim, HDP) of every tile row are zeroed
//     once per block and never written again, so they add nothing to Q K^T
//     and P V; rows past q_len / kv_len are zero-filled by cp.async and their
//     scores masked to -inf;
//   - shared rows are HDP + 8 elements apart (an odd multiple of 16 bytes),
//     so every 8-row ldmatrix phase hits 8 distinct 16-byte bank groups;
//   - the Q tile is staged in the second stage's buffers (it is copied to
//     registers before the first prefetch into them), so shared memory is
//     4 * BN * (HDP + 8) bf16: 44 KiB at HDP 80 (BN 64), static;
//   - RoPE (optional) is applied in shared memory by the thread that loaded
//     each 16-byte chunk, after its cp.async completes and before the barrier;
//   - one entry point per HDP (qc_attention_d{16,32,64,80,128}_bf16): see the
//     note above them. Blocks loop over work items with a grid stride;
//   - an additive score bias (T5's relative positions) is a template flag,
//     with its own entry points (qc_attention_bias_d*_bf16) taking
//     QcAttentionBiasArgs: the unbiased instantiations carry none of its work.
//     Each lane reads the f32 bias of its own score elements straight from
//     global memory into its Q K^T accumulators (as bias / scale, so the
//     scaling gives scale * q.k + bias): the bias is read once per block, so
//     staging it in shared memory would only add a barrier.
#include "common.cuh"

namespace qc {
namespace attn {

constexpr int THREADS = 128;  // 4 warps
constexpr int BM = 64;        // query rows per block, 16 per warp

// Per padded head dim HDP: BN keys per K/V tile, SROW elements between shared rows.
template <int HDP> struct Cfg {
    static_assert(HDP % 16 == 0 && HDP >= 16 && HDP <= 128, "HDP: multiple of 16 in [16, 128]");
    static constexpr int BN = HDP > 80 ? 32 : 64;
    static constexpr int SROW = HDP + 8;
    static constexpr int TILE = BN * SROW;  // elements of one K or V tile
    static constexpr int SMEM_BYTES = 4 * TILE * 2;
    static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
    // The Q tile (BM rows) lives in the second stage's K and V tiles (contiguous).
    static_assert(BM * SROW <= 2 * TILE, "Q tile does not fit the second stage");
};


// ------------------------------------------------------------ tile loads

// Issues cp.async for tile rows r < ROWS holding items start + r of seq into
// s (rows SROW apart), columns [0, head_dim) only; items >= len are zero-filled.
// Thread tid handles chunks tid, tid + THREADS, ... (rope_tile walks the same ones).
template <int HDP, int ROWS>
__device__ __forceinline__ void load_tile(bf16* s, const Seq& q, int start, int head_dim) {
    load_rows_async<HDP, ROWS, Cfg<HDP>::SROW, THREADS>(s, q, start, head_dim);
}

// RoPE in place on the chunks this thread loaded with load_tile (after
// cp.async.wait_group, before the barrier): position = item index start + r.
// Same arithmetic as qc_rope (kernels/rope.cu), rounded to bf16.
template <int HDP, int ROWS>
__device__ __forceinline__ void rope_tile(bf16* s, const float* __restrict__ freqs, int start, int len,
                                          int head_dim) {
    constexpr int CPR = HDP / 8;
    constexpr int SROW = Cfg<HDP>::SROW;
#pragma unroll 1  // sincosf is large: one copy per call site
    for (int k = 0; k < (ROWS * CPR + THREADS - 1) / THREADS; ++k) {
        const int idx = threadIdx.x + k * THREADS;
        const int r = idx / CPR;
        const int c = idx - r * CPR;
        const int i = start + r;
        if (idx < ROWS * CPR && c * 8 < head_dim && i < len) {
            uint4* p = reinterpret_cast<uint4*>(s + r * SROW + c * 8);
            uint4 raw = *p;
            __nv_bfloat162 v[4];
            memcpy(v, &raw, 16);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float angle = __fmul_rn(static_cast<float>(i), __ldg(freqs + c * 4 + j));
                float sn, cs;
                sincosf(angle, &sn, &cs);
                const float x0 = __low2float(v[j]);
                const float x1 = __high2float(v[j]);
                const float o0 = __fadd_rn(__fmul_rn(x0, cs), __fmul_rn(-x1, sn));
                const float o1 = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
                v[j] = __floats2bfloat162_rn(o0, o1);
            }
            memcpy(&raw, v, 16);
            *p = raw;
        }
    }
}

// ------------------------------------------------------------ the kernel body

// The additive score bias of QcAttentionBiasArgs (p = nullptr in the unbiased kernels).
struct ScoreBias {
    const float* p;
    int64_t ld;
    int64_t head_stride;
};

template <int HDP, bool BIAS>
__device__ __forceinline__ void attention(const QcAttentionArgs& a, const ScoreBias& bias, bf16* smem) {
    constexpr int BN = Cfg<HDP>::BN;
    constexpr int SROW = Cfg<HDP>::SROW;
    constexpr int TILE = Cfg<HDP>::TILE;
    constexpr int KB = HDP / 16;  // 16-wide head-dim blocks (k of Q K^T, pairs of n of P V)
    constexpr int NB = BN / 8;    // 8-key score blocks per tile
    constexpr int CPR = HDP / 8;

    const int hd = a.head_dim;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const bf16* qg = dev_ptr<const bf16>(a.q);
    const bf16* kg = dev_ptr<const bf16>(a.k);
    const bf16* vg = dev_ptr<const bf16>(a.v);
    bf16* og = dev_ptr<bf16>(a.out);
    const int* kv_start = dev_ptr<const int>(a.kv_start);
    const int* kv_end = dev_ptr<const int>(a.kv_end);
    const float* freqs = dev_ptr<const float>(a.rope_freqs);
    const float scale_log2 = a.scale * 1.4426950408889634f;  // scores in base 2
    const float inv_scale = BIAS ? 1.0f / a.scale : 0.0f;    // bias / scale: see the key loop
    bf16* const q_s = smem + 2 * TILE;                       // second stage's K and V tiles

    // Zero the padding columns [hd, HDP) of every shared row once: nothing writes them later.
    if (hd < HDP) {
        for (int idx = threadIdx.x; idx < 4 * BN * CPR; idx += THREADS) {
            const int r = idx / CPR;
            const int c = idx - r * CPR;
            if (c * 8 >= hd) *reinterpret_cast<uint4*>(smem + r * SROW + c * 8) = make_uint4(0, 0, 0, 0);
        }
    }

    const int q_tiles = (a.q_len + BM - 1) / BM;
    const int64_t work = static_cast<int64_t>(q_tiles) * a.heads * a.groups;
    for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        const int tile = static_cast<int>(w % q_tiles);
        const int64_t rest = w / q_tiles;
        const int h = static_cast<int>(rest % a.heads);
        const int g = static_cast<int>(rest / a.heads);
        const int q0 = tile * BM;
        const int64_t grp_row = static_cast<int64_t>(g / a.groups_inner) * a.outer_stride +
                                static_cast<int64_t>(g % a.groups_inner) * a.inner_stride;
        const int64_t hoff = static_cast<int64_t>(h) * hd;
        const Seq qs{qg + hoff, a.ldq, grp_row, a.seq_stride, a.q_len};
        Seq ks, vs;
        if (kv_start != nullptr) {
            const int s0 = kv_start[g];
            const int s1 = kv_end[g];
            ks = Seq{kg + hoff, a.ldk, s0, 1, s1 > s0 ? s1 - s0 : 0};
        } else {
            ks = Seq{kg + hoff, a.ldk, grp_row, a.seq_stride, a.q_len};
        }
        vs = Seq{vg + hoff, a.ldv, ks.row0, ks.rstride, ks.len};
        const int kv_len = ks.len;
        // Bias rows of this lane's two query rows (lane/4 and lane/4 + 8 of the warp's 16);
        // row 0 stands in for rows past q_len, whose results are never stored.
        const float* bias_row[2] = {nullptr, nullptr};
        if constexpr (BIAS) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int i = q0 + warp * 16 + (lane >> 2) + hr * 8;
                bias_row[hr] = bias.p + h * bias.head_stride + static_cast<int64_t>(i < a.q_len ? i : 0) * bias.ld;
            }
        }

        // The previous work item is done with shared memory (and the padding is zeroed).
        __syncthreads();

        if (kv_len == 0) {  // block-uniform: zero output rows
            for (int idx = threadIdx.x; idx < BM * CPR; idx += THREADS) {
                const int r = idx / CPR;
                const int c = idx - r * CPR;
                const int i = q0 + r;
                if (i < a.q_len && c * 8 < hd)
                    *reinterpret_cast<uint4*>(og + (grp_row + static_cast<int64_t>(i) * a.seq_stride) * a.ldo +
                                              hoff + c * 8) = make_uint4(0, 0, 0, 0);
            }
            continue;
        }

        // Prologue: Q tile and the first K/V tile.
        load_tile<HDP, BM>(q_s, qs, q0, hd);
        load_tile<HDP, BN>(smem, ks, 0, hd);
        load_tile<HDP, BN>(smem + TILE, vs, 0, hd);
        cp_async_commit();
        cp_async_wait_all();
        if (freqs != nullptr) {
            rope_tile<HDP, BM>(q_s, freqs, q0, a.q_len, hd);
            rope_tile<HDP, BN>(smem, freqs, 0, kv_len, hd);
        }
        __syncthreads();

        // Warps whose 16 rows are all past q_len skip the arithmetic (not the loads and barriers).
        const bool active = q0 + warp * 16 < a.q_len;
        uint32_t qf[KB][4];
#pragma unroll
        for (int kb = 0; kb < KB; ++kb)
            ldmatrix_x4(qf[kb], q_s + (warp * 16 + (lane & 15)) * SROW + kb * 16 + (lane >> 4) * 8);

        float o[2 * KB][4];
#pragma unroll
        for (int n = 0; n < 2 * KB; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
        // Rows lane/4 (index 0) and lane/4 + 8 (index 1) of the warp's 16: running max
        // (base-2 scaled scores) and this lane's part of the running sum.
        float m_run[2] = {-INFINITY, -INFINITY};
        float l_run[2] = {0.0f, 0.0f};

        const int kv_tiles = (kv_len + BN - 1) / BN;
        for (int t = 0; t < kv_tiles; ++t) {
            const bf16* k_s = smem + (t & 1) * 2 * TILE;
            const bf16* v_s = k_s + TILE;
            if (t > 0) {
                cp_async_wait_all();
                if (freqs != nullptr) rope_tile<HDP, BN>(smem + (t & 1) * 2 * TILE, freqs, t * BN, kv_len, hd);
            }
            // Tile t is visible to all warps, and all are done with tile t - 1 (and with Q).
            __syncthreads();
            if (t + 1 < kv_tiles) {
                bf16* nk = smem + ((t + 1) & 1) * 2 * TILE;
                load_tile<HDP, BN>(nk, ks, (t + 1) * BN, hd);
                load_tile<HDP, BN>(nk + TILE, vs, (t + 1) * BN, hd);
                cp_async_commit();
            }
            if (!active) continue;

            const int key0 = t * BN;
            // S = Q K^T (+ bias / scale) for the warp's 16 rows and the tile's BN keys. The
            // bias enters as the accumulators' initial value: no registers beyond S (keeping
            // it apart spilled), and the scaling below makes it bias. Keys past kv_len read nothing.
            float s[NB][4];
            if constexpr (BIAS) {
#pragma unroll
                for (int n = 0; n < NB; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = key0 + n * 8 + (lane & 3) * 2 + (e & 1);
                        s[n][e] = j < kv_len ? __ldg(bias_row[e >> 1] + j) * inv_scale : 0.0f;
                    }
                }
            } else {
#pragma unroll
                for (int n = 0; n < NB; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            }
#pragma unroll
            for (int kb = 0; kb < KB; ++kb) {
                if (kb * 16 >= hd) continue;  // all-padding head-dim block
#pragma unroll
                for (int n2 = 0; n2 < NB / 2; ++n2) {
                    if (key0 + n2 * 16 >= kv_len) continue;  // keys all masked below
                    uint32_t b[4];
                    ldmatrix_x4(b, k_s + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * SROW + kb * 16 +
                                       ((lane >> 3) & 1) * 8);
                    mma_bf16_16816(s[2 * n2], qf[kb], b[0], b[1]);
                    mma_bf16_16816(s[2 * n2 + 1], qf[kb], b[2], b[3]);
                }
            }

            // Scale to base 2; keys past kv_len -> -inf.
            const bool partial = key0 + BN > kv_len;
#pragma unroll
            for (int n = 0; n < NB; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[n][e] * scale_log2;
                    if (partial && key0 + n * 8 + (lane & 3) * 2 + (e & 1) >= kv_len) x = -INFINITY;
                    s[n][e] = x;
                }
            }

            // Online softmax. Every processed tile has a valid key (key0 < kv_len), so the
            // new max is finite and m_run - m_new is never -inf - -inf.
            flash_softmax_update(s, m_run, l_run, o);
            flash_pv<NB, KB, SROW>(s, o, v_s, key0, kv_len, hd);
        }

        if (active) flash_store(o, l_run, og + hoff, grp_row, a.seq_stride, a.ldo, q0, a.q_len, hd);
    }
}

}  // namespace attn
}  // namespace qc

namespace qc {
namespace attn {
// The body of every entry point: argument checks (a bad launch traps: a loud error, not
// stale output), then the HDP variant on the kernel's static shared memory.
template <int HDP, bool BIAS>
__device__ __forceinline__ void entry(const QcAttentionArgs& a, const ScoreBias& bias) {
    __shared__ __align__(128) uint4 smem_raw[Cfg<HDP>::SMEM_BYTES / 16];
    const int hd = a.head_dim;
    const bool aligned = ((a.q | a.k | a.v | a.out) & 15) == 0 && ((a.ldq | a.ldk | a.ldv | a.ldo) & 7) == 0;
    if (blockDim.x != THREADS || hd < 8 || hd > HDP || hd % 8 != 0 || a.groups_inner < 1 || !aligned) __trap();
    if (BIAS && (bias.p == nullptr || (reinterpret_cast<uintptr_t>(bias.p) & 3) != 0 || a.scale == 0.0f)) __trap();
    attention<HDP, BIAS>(a, bias, reinterpret_cast<bf16*>(smem_raw));
}

template <int HDP>
__device__ __forceinline__ void entry(const QcAttentionArgs& a) {
    entry<HDP, false>(a, ScoreBias{nullptr, 0, 0});
}

template <int HDP>
__device__ __forceinline__ void entry(const QcAttentionBiasArgs& b) {
    entry<HDP, true>(b.attn, ScoreBias{dev_ptr<const float>(b.bias), b.bias_ld, b.bias_head_stride});
}
}  // namespace attn
}  // namespace qc

// One entry point per padded head dim NN, each taking any head_dim <= NN (multiple of 8):
// one kernel dispatching to several variants gets the registers of the largest or worse
// (ptxas gave 217-231 registers, or spills, to such combinations against 167 for d80
// alone). __launch_bounds__(128, B) caps registers at 65536 / (128 * B).

// Flash attention (QcAttentionArgs), head_dim <= 16 (the demo model).
extern "C" __global__ void __launch_bounds__(128, 4) qc_attention_d16_bf16(const QcAttentionArgs a) {
    qc::attn::entry<16>(a);
}
// Flash attention (QcAttentionArgs), head_dim <= 32.
extern "C" __global__ void __launch_bounds__(128, 4) qc_attention_d32_bf16(const QcAttentionArgs a) {
    qc::attn::entry<32>(a);
}
// Flash attention (QcAttentionArgs), head_dim <= 64.
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_d64_bf16(const QcAttentionArgs a) {
    qc::attn::entry<64>(a);
}
// Flash attention (QcAttentionArgs), head_dim <= 80 (Open-Sora 1.2: 72).
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_d80_bf16(const QcAttentionArgs a) {
    qc::attn::entry<80>(a);
}
// Flash attention (QcAttentionArgs), head_dim <= 128.
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_d128_bf16(const QcAttentionArgs a) {
    qc::attn::entry<128>(a);
}

// The same with an additive f32 score bias (QcAttentionBiasArgs; T5's relative
// positions): head_dim <= 16 (the tiny T5 fixture: 8), 32, 64 (T5: 64), 80, 128.
// The bias loads and their addresses take ~35 registers more than the unbiased
// kernels: d16 and d32 run 3 blocks per SM and d128 2 (ptxas spilled at 4 and 3),
// a small loss where they serve (T5's attention is ~1% of its encoder time).
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_bias_d16_bf16(const QcAttentionBiasArgs a) {
    qc::attn::entry<16>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_bias_d32_bf16(const QcAttentionBiasArgs a) {
    qc::attn::entry<32>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_bias_d64_bf16(const QcAttentionBiasArgs a) {
    qc::attn::entry<64>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_bias_d80_bf16(const QcAttentionBiasArgs a) {
    qc::attn::entry<80>(a);
}
extern "C" __global__ void __launch_bounds__(128, 2) qc_attention_bias_d128_bf16(const QcAttentionBiasArgs a) {
    qc::attn::entry<128>(a);
}
