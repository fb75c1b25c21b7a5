// attention_wide.cu: flash attention (online softmax, no score matrix in memory) for
// wide heads on bf16 tensor cores: the VAE mid-block's single head of 512 channels
// over every latent position of a frame (14400 at 720p), and anything up to 512.
// Semantics and requirements: qc_types.h (QcAttentionArgs, qc_attention_wide_d*_bf16).
//
// Why not attention.cu's tiling: there a warp keeps its 16 query rows of Q (as MMA
// fragments) and of O (f32) in registers, HDP / 4 + HDP / 2 registers per lane: 384 at
// HDP 512, over the 255 limit. Here (mma.sync, so sm_80 and sm_90 alike):
//   - a block of 8 warps takes 64 query rows (one work item, as in attention.cu). O
//     (64 x HDP f32) is split over the warps by head-dim columns: warp w owns columns
//     [w HDP/8, (w+1) HDP/8) of all 64 rows, 4 x HDP/64 MMA tiles: 128 registers per
//     lane at HDP 512, 64 at 256;
//   - Q stays in shared memory for the whole key loop (64 KiB at 512) and is read as A
//     fragments per 16 columns;
//   - per tile of BN keys, phase 1 computes S = Q K^T split by rows and keys (warp w:
//     rows 16 (w % 4) .., keys (w / 4) BN/2 ..; the whole head dim per score, so nothing
//     is reduced across warps); the two warps of a row block exchange row maxima and
//     sums through shared memory and write P (bf16) to shared memory; phase 2 computes
//     O = O * alpha + P V, every warp reading all of P and its own columns of V;
//   - K and V have one buffer each: K is read only in phase 1 and V only in phase 2,
//     so V(t) loads (cp.async) during phase 1 of tile t and K(t+1) during phase 2;
//   - shared memory (dynamic): (64 + 2 BN) rows of HDP + 8 bf16, P (64 rows of BN + 8)
//     and the row statistics: 136.5 KiB at HDP 512 (BN 32), 109.5 KiB at 256 (BN 64),
//     within sm_80's 163 KiB. Rows an odd multiple of 16 bytes apart keep every 8-row
//     ldmatrix phase on 8 distinct 16-byte bank groups (P's rows too);
//   - the head dim is padded to HDP in shared memory only (columns [head_dim, HDP)
//     zeroed once per block, never written again), rows past q_len / kv_len are
//     zero-filled by cp.async and their scores masked to -inf, as in attention.cu.
// Numerics as attention.cu: scores scaled to base 2, running max and sum in f32, the
// unnormalised probabilities rounded to bf16 for P V, out = O / sum rounded to bf16.
// tools/attention-wide-layout.py emulates the fragment mappings, addresses and phases
// below lane by lane (numpy) against an f64 attention.
#include "common.cuh"

namespace qc {
namespace attn_wide {

constexpr int THREADS = QC_ATTENTION_WIDE_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int BM = 64;  // query rows per work item: 4 row blocks of 16
static_assert(WARPS == 8, "the warp roles below assume 8 warps: 4 row blocks x 2 key halves");

template <int HDP> struct Cfg {
    static_assert(HDP == 256 || HDP == 512, "wide attention: HDP 256 or 512");
    static constexpr int BN = HDP == 512 ? 32 : 64;  // keys per tile
    static constexpr int SROW = HDP + 8;             // elements between rows of Q, K, V
    static constexpr int PROW = BN + 8;              // elements between rows of P
    static constexpr int OW = HDP / WARPS;           // O columns per warp
    static constexpr int ON = OW / 8;                // their 8-wide MMA tiles
    static constexpr int SN = BN / 16;               // 8-key score tiles per warp (BN / 2 keys)
    // Byte offsets: Q, K and V rows are contiguous (BM + 2 BN rows), then P, then f32
    // row statistics: max[2][BM] and sum[2][BM] (per key half), alpha[BM], inv_l[BM].
    static constexpr int K_OFF = BM * SROW * 2;
    static constexpr int V_OFF = K_OFF + BN * SROW * 2;
    static constexpr int P_OFF = V_OFF + BN * SROW * 2;
    static constexpr int STAT_OFF = P_OFF + BM * PROW * 2;
    static constexpr int SMEM_BYTES = STAT_OFF + 6 * BM * 4;
    static_assert(SN % 2 == 0, "K is read 16 keys per ldmatrix");
    static_assert(P_OFF % 16 == 0 && STAT_OFF % 16 == 0, "16-byte aligned regions");
};
static_assert(Cfg<256>::SMEM_BYTES == QC_ATTENTION_WIDE_D256_SMEM_BYTES, "qc_types.h");
static_assert(Cfg<512>::SMEM_BYTES == QC_ATTENTION_WIDE_D512_SMEM_BYTES, "qc_types.h");

// A sequence of rows in global memory: element d of item i (i < len) is at
// base + (row0 + i * rstride) * ld + d, base already offset to the head.
struct Rows {
    const bf16* base;
    int64_t ld;
    int64_t row0;
    int64_t rstride;
    int len;
};

// cp.async of items start .. start + ROWS - 1 of r into s (rows SROW apart), columns
// [0, head_dim) only; items >= len are zero-filled. Consecutive threads take
// consecutive 16-byte chunks of a row (coalesced).
template <int HDP, int ROWS>
__device__ __forceinline__ void load_rows(bf16* s, const Rows& r, int start, int head_dim) {
    constexpr int CPR = HDP / 8;  // 16-byte chunks per row
    static_assert(ROWS * CPR % THREADS == 0, "whole passes");
#pragma unroll
    for (int k = 0; k < ROWS * CPR / THREADS; ++k) {
        const int idx = threadIdx.x + k * THREADS;
        const int row = idx / CPR;
        const int c = idx - row * CPR;
        if (c * 8 < head_dim) {
            const int i = start + row;
            const bool ok = i < r.len;
            // Out-of-range items read nothing; item 0 (always valid) keeps the address legal.
            const bf16* src = r.base + (r.row0 + static_cast<int64_t>(ok ? i : 0) * r.rstride) * r.ld + c * 8;
            cp_async16(s + row * Cfg<HDP>::SROW + c * 8, src, ok ? 16 : 0);
        }
    }
}

template <int HDP>
__device__ __forceinline__ void attention_wide(const QcAttentionArgs& a, unsigned char* smem) {
    using C = Cfg<HDP>;
    constexpr int BN = C::BN;
    constexpr int SROW = C::SROW;
    constexpr int PROW = C::PROW;
    constexpr int OW = C::OW;
    constexpr int ON = C::ON;
    constexpr int SN = C::SN;
    constexpr int KB = HDP / 16;  // 16-wide head-dim blocks (k of Q K^T)
    constexpr int CPR = HDP / 8;

    bf16* const q_s = reinterpret_cast<bf16*>(smem);
    bf16* const k_s = reinterpret_cast<bf16*>(smem + C::K_OFF);
    bf16* const v_s = reinterpret_cast<bf16*>(smem + C::V_OFF);
    bf16* const p_s = reinterpret_cast<bf16*>(smem + C::P_OFF);
    float* const max_s = reinterpret_cast<float*>(smem + C::STAT_OFF);  // [2][BM]
    float* const sum_s = max_s + 2 * BM;                                 // [2][BM]
    float* const alpha_s = sum_s + 2 * BM;                               // [BM]
    float* const inv_l_s = alpha_s + BM;                                 // [BM]

    const int hd = a.head_dim;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int quad = lane & 3;   // MMA fragments: column pair 2 quad, 2 quad + 1 ...
    const int grow = lane >> 2;  // ... of rows grow and grow + 8
    const int rb = warp & 3;     // phase 1: query rows 16 rb .. 16 rb + 15 of the tile
    const int kh = warp >> 2;    // phase 1: keys kh BN/2 .. of each key tile
    const int col0 = warp * OW;  // phase 2: O columns col0 .. col0 + OW - 1
    const bf16* qg = dev_ptr<const bf16>(a.q);
    const bf16* kg = dev_ptr<const bf16>(a.k);
    const bf16* vg = dev_ptr<const bf16>(a.v);
    bf16* og = dev_ptr<bf16>(a.out);
    const int* kv_start = dev_ptr<const int>(a.kv_start);
    const int* kv_end = dev_ptr<const int>(a.kv_end);
    const float scale_log2 = a.scale * 1.4426950408889634f;  // scores in base 2

    // Zero the padding columns [hd, HDP) of every Q, K and V row once: nothing writes them later.
    if (hd < HDP) {
        for (int idx = threadIdx.x; idx < (BM + 2 * BN) * CPR; idx += THREADS) {
            const int r = idx / CPR;
            const int c = idx - r * CPR;
            if (c * 8 >= hd) *reinterpret_cast<uint4*>(q_s + r * SROW + c * 8) = make_uint4(0, 0, 0, 0);
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
        const int rows_left = a.q_len - q0;  // >= 1
        const int64_t grp_row = static_cast<int64_t>(g / a.groups_inner) * a.outer_stride +
                                static_cast<int64_t>(g % a.groups_inner) * a.inner_stride;
        const int64_t hoff = static_cast<int64_t>(h) * hd;
        const Rows qs{qg + hoff, a.ldq, grp_row, a.seq_stride, a.q_len};
        Rows ks;
        if (kv_start != nullptr) {
            const int s0 = kv_start[g];
            const int s1 = kv_end[g];
            ks = Rows{kg + hoff, a.ldk, s0, 1, s1 > s0 ? s1 - s0 : 0};
        } else {
            ks = Rows{kg + hoff, a.ldk, grp_row, a.seq_stride, a.q_len};
        }
        const Rows vs{vg + hoff, a.ldv, ks.row0, ks.rstride, ks.len};
        const int kv_len = ks.len;

        // The previous work item is done with shared memory (and the padding is zeroed).
        __syncthreads();

        if (kv_len == 0) {  // block-uniform: zero output rows
            for (int idx = threadIdx.x; idx < BM * CPR; idx += THREADS) {
                const int r = idx / CPR;
                const int c = idx - r * CPR;
                if (r < rows_left && c * 8 < hd)
                    *reinterpret_cast<uint4*>(og + (grp_row + static_cast<int64_t>(q0 + r) * a.seq_stride) * a.ldo +
                                              hoff + c * 8) = make_uint4(0, 0, 0, 0);
            }
            continue;
        }

        load_rows<HDP, BM>(q_s, qs, q0, hd);
        load_rows<HDP, BN>(k_s, ks, 0, hd);
        cp_async_commit();

        // Phase-1 row blocks (and phase-2 row tiles) wholly past q_len skip their MMAs.
        const bool rows_active = rb * 16 < rows_left;
        float o[4][ON][4];
#pragma unroll
        for (int mb = 0; mb < 4; ++mb)
#pragma unroll
            for (int n = 0; n < ON; ++n) o[mb][n][0] = o[mb][n][1] = o[mb][n][2] = o[mb][n][3] = 0.0f;
        // Phase-1 rows 16 rb + grow (index 0) and + 8 (index 1): running max (base-2
        // scores) and running sum; the two warps of a row block hold the same values.
        float m_run[2] = {-INFINITY, -INFINITY};
        float l_run[2] = {0.0f, 0.0f};

        const int kv_tiles = (kv_len + BN - 1) / BN;
        for (int t = 0; t < kv_tiles; ++t) {
            const int key0 = t * BN;
            const bool more = t + 1 < kv_tiles;
            cp_async_wait_all();  // K(t) (and Q)
            // K(t) visible to all warps; all are done with V(t - 1), P and alpha.
            __syncthreads();
            load_rows<HDP, BN>(v_s, vs, key0, hd);
            cp_async_commit();

            // Phase 1: S = Q K^T for rows 16 rb .. and keys kh BN/2 .. (16-key blocks
            // wholly past kv_len are skipped: masked below).
            float s[SN][4];
#pragma unroll
            for (int n = 0; n < SN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            if (rows_active) {
#pragma unroll
                for (int kb = 0; kb < KB; ++kb) {
                    if (kb * 16 >= hd) break;  // all-padding head-dim blocks
                    uint32_t qf[4];
                    ldmatrix_x4(qf, q_s + (rb * 16 + (lane & 15)) * SROW + kb * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int n2 = 0; n2 < SN / 2; ++n2) {
                        const int kr = kh * (BN / 2) + n2 * 16;  // tile row of the block's first key
                        if (key0 + kr >= kv_len) continue;
                        uint32_t b[4];
                        ldmatrix_x4(b, k_s + (kr + (lane & 7) + ((lane >> 4) << 3)) * SROW + kb * 16 +
                                           ((lane >> 3) & 1) * 8);
                        mma_bf16_16816(s[2 * n2], qf, b[0], b[1]);
                        mma_bf16_16816(s[2 * n2 + 1], qf, b[2], b[3]);
                    }
                }
            }

            // Scale to base 2; keys past kv_len -> -inf. Row maxima over this warp's keys.
            const bool partial = key0 + BN > kv_len;
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < SN; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[n][e] * scale_log2;
                    if (partial && key0 + kh * (BN / 2) + n * 8 + quad * 2 + (e & 1) >= kv_len) x = -INFINITY;
                    s[n][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            }
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
                mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
                if (quad == 0) max_s[kh * BM + rb * 16 + grow + hr * 8] = mx[hr];
            }
            // Both key halves' maxima are visible; all warps are done with K(t).
            __syncthreads();
            if (more) {
                load_rows<HDP, BN>(k_s, ks, key0 + BN, hd);
                cp_async_commit();
            }

            // Online softmax. Every processed tile has a valid key (key0 < kv_len) in each
            // row, so the new max is finite and m_run - m_new is never -inf - -inf.
            float alpha[2];
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int row = rb * 16 + grow + hr * 8;
                const float m_new = fmaxf(m_run[hr], fmaxf(max_s[row], max_s[BM + row]));
                alpha[hr] = fast_exp2(m_run[hr] - m_new);  // 0 on the first tile
                m_run[hr] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < SN; ++n) {
                    s[n][2 * hr] = fast_exp2(s[n][2 * hr] - m_new);
                    s[n][2 * hr + 1] = fast_exp2(s[n][2 * hr + 1] - m_new);
                    sum += s[n][2 * hr] + s[n][2 * hr + 1];
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (quad == 0) {
                    sum_s[kh * BM + row] = sum;
                    if (kh == 0) alpha_s[row] = alpha[hr];
                }
            }
            // P (bf16) into shared memory, straight from the score fragments.
#pragma unroll
            for (int n = 0; n < SN; ++n) {
                bf16* pr = p_s + (rb * 16 + grow) * PROW + kh * (BN / 2) + n * 8 + quad * 2;
                *reinterpret_cast<uint32_t*>(pr) = pack_bf16(s[n][0], s[n][1]);
                *reinterpret_cast<uint32_t*>(pr + 8 * PROW) = pack_bf16(s[n][2], s[n][3]);
            }
            if (more)
                cp_async_wait_pending<1>();  // V(t); K(t + 1) may still be in flight
            else
                cp_async_wait_all();
            // P, the row sums, alpha and V(t) are visible to all warps.
            __syncthreads();
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int row = rb * 16 + grow + hr * 8;
                l_run[hr] = l_run[hr] * alpha[hr] + (sum_s[row] + sum_s[BM + row]);
            }

            // Phase 2: O = O * alpha + P V(t) on this warp's columns of all 64 rows; P as A
            // fragments (ldmatrix), V^T as B fragments (ldmatrix.trans).
            if (col0 < hd) {
#pragma unroll
                for (int mb = 0; mb < 4; ++mb) {
                    const float a0 = alpha_s[mb * 16 + grow];
                    const float a1 = alpha_s[mb * 16 + grow + 8];
#pragma unroll
                    for (int n = 0; n < ON; ++n) {
                        o[mb][n][0] *= a0;
                        o[mb][n][1] *= a0;
                        o[mb][n][2] *= a1;
                        o[mb][n][3] *= a1;
                    }
                }
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    if (key0 + kk * 16 >= kv_len) break;  // probabilities all 0
                    uint32_t pa[4][4];
#pragma unroll
                    for (int mb = 0; mb < 4; ++mb)
                        if (mb * 16 < rows_left)
                            ldmatrix_x4(pa[mb], p_s + (mb * 16 + (lane & 15)) * PROW + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int d2 = 0; d2 < OW / 16; ++d2) {
                        if (col0 + d2 * 16 >= hd) break;  // all-padding output columns
                        uint32_t b[4];
                        ldmatrix_x4_trans(b, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + col0 +
                                                 d2 * 16 + (lane >> 4) * 8);
#pragma unroll
                        for (int mb = 0; mb < 4; ++mb) {
                            if (mb * 16 < rows_left) {
                                mma_bf16_16816(o[mb][2 * d2], pa[mb], b[0], b[1]);
                                mma_bf16_16816(o[mb][2 * d2 + 1], pa[mb], b[2], b[3]);
                            }
                        }
                    }
                }
            }
        }

        // Epilogue: 1 / l of every row (from the key-half-0 warps), then O / l rounded to
        // bf16 straight from the accumulators (4 bytes per lane and row).
        if (kh == 0 && quad == 0) {
            inv_l_s[rb * 16 + grow] = 1.0f / l_run[0];
            inv_l_s[rb * 16 + grow + 8] = 1.0f / l_run[1];
        }
        __syncthreads();
        if (col0 < hd) {
#pragma unroll
            for (int mb = 0; mb < 4; ++mb) {
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int r = mb * 16 + grow + hr * 8;
                    if (r < rows_left) {
                        const float inv = inv_l_s[r];
                        bf16* orow = og + (grp_row + static_cast<int64_t>(q0 + r) * a.seq_stride) * a.ldo + hoff +
                                     col0 + quad * 2;
#pragma unroll
                        for (int n = 0; n < ON; ++n) {
                            if (col0 + n * 8 < hd)
                                *reinterpret_cast<uint32_t*>(orow + n * 8) =
                                    pack_bf16(o[mb][n][2 * hr] * inv, o[mb][n][2 * hr + 1] * inv);
                        }
                    }
                }
            }
        }
    }
}

// Argument checks (a bad launch traps: a loud error, not stale output), then the HDP
// variant on the dynamic shared memory.
template <int HDP>
__device__ __forceinline__ void entry(const QcAttentionArgs& a) {
    extern __shared__ __align__(128) unsigned char attn_wide_smem[];
    uint32_t dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn_smem));
    const int hd = a.head_dim;
    const bool aligned = ((a.q | a.k | a.v | a.out) & 15) == 0 && ((a.ldq | a.ldk | a.ldv | a.ldo) & 7) == 0;
    if (blockDim.x != THREADS || dyn_smem < static_cast<uint32_t>(Cfg<HDP>::SMEM_BYTES) || hd < 8 || hd > HDP ||
        hd % 8 != 0 || a.groups_inner < 1 || a.rope_freqs != 0 || !aligned)
        __trap();
    attention_wide<HDP>(a, attn_wide_smem);
}

}  // namespace attn_wide
}  // namespace qc

// One entry point per padded head dim (see attention.cu on why not one kernel for all),
// one block of 8 warps per SM: d512 holds 128 O registers per lane (ptxas: 221 registers
// on sm_80, 231 on sm_90a); d256 would fit two blocks' shared memory on sm_90, but
// capped at 128 registers for that it spills.

// Flash attention (QcAttentionArgs), head_dim <= 256, no RoPE.
extern "C" __global__ void __launch_bounds__(256, 1) qc_attention_wide_d256_bf16(const QcAttentionArgs a) {
    qc::attn_wide::entry<256>(a);
}
// Flash attention (QcAttentionArgs), head_dim <= 512 (the VAE mid-block: 512), no RoPE.
extern "C" __global__ void __launch_bounds__(256, 1) qc_attention_wide_d512_bf16(const QcAttentionArgs a) {
    qc::attn_wide::entry<512>(a);
}
