// attention_int8.cu: attention with int8 Q and K (AttnSpec::qk_int8). Semantics:
// qc_types.h (QcQkMeanArgs, QcQuantizeQkArgs, QcAttentionI8Args); the CPU twin is
// src/backend/cpu/attention_int8.rs (same int8 values, scales and int32 products).
//
// Steps: qc_qk_mean_bf16 (K's per-column mean, the smoothing), qc_quantize_qk_bf16
// (Q, then K minus its mean, per block of 64 rows into a padded int8 layout), then
// qc_attention_i8_dNN, the structure of attention.cu's kernel with Q K^T on int8
// tensor cores:
//   - one block of 4 warps per work item (64 query rows = one Q scale block);
//     each warp keeps its 16 rows' Q as m16n8k32 s8 A fragments in registers;
//   - K (int8, already padded to dp columns and whole blocks of rows by the
//     quantizer, so tiles are plain copies) and V (bf16, zero-filled past
//     kv_len as in attention.cu) go through shared memory with cp.async, two
//     stages; the Q tile has its own buffer (it is small in int8);
//   - S = Q K^T in exact int32 (ldmatrix gives the s8 fragments: one "b16 row"
//     is 16 int8), optionally copied to acc_out, then dequantized in registers
//     to base-2 scores with one factor per key tile (a tile never straddles a
//     64-key scale block); online softmax, P V in bf16 and the epilogue are
//     common.cuh's flash_* helpers, shared with attention.cu;
//   - int8 shared rows are HDP + 16 bytes apart and bf16 V rows HDP + 8
//     elements: both odd multiples of 16 bytes, so ldmatrix phases hit 8
//     distinct bank groups; padding columns (int8 >= dp, V >= head_dim) are
//     zeroed once per block.
#include "common.cuh"

namespace qc {
namespace attn_i8 {

constexpr int THREADS = 128;  // 4 warps
constexpr int BM = 64;        // query rows per block, 16 per warp
static_assert(BM == QC_QK_BLOCK, "a work item's queries share one Q scale");

template <int HDP> struct Cfg {
    static_assert(HDP % 32 == 0 && HDP >= 32 && HDP <= 128, "HDP: multiple of 32 in [32, 128]");
    static constexpr int BN = HDP > 96 ? 32 : 64;  // keys per tile (divides QC_QK_BLOCK)
    static constexpr int KROW = HDP + 16;          // bytes between int8 shared rows
    static constexpr int VROW = HDP + 8;           // bf16 elements between V shared rows
    static constexpr int K_TILE = BN * KROW;       // bytes
    static constexpr int V_TILE = BN * VROW * 2;   // bytes
    static constexpr int Q_BYTES = BM * KROW;
    static constexpr int SMEM_BYTES = 2 * (K_TILE + V_TILE) + Q_BYTES;
    static_assert(QC_QK_BLOCK % BN == 0, "a key tile must not straddle two K scale blocks");
    static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
    static_assert(K_TILE % 16 == 0 && V_TILE % 16 == 0, "tiles must stay 16-byte aligned");
};

// cp.async of ROWS int8 rows of dp bytes (rows dp apart in global, KROW in shared).
template <int ROWS, int KROW>
__device__ __forceinline__ void load_i8_rows(uint8_t* s, const int8_t* g, int dp) {
    const int cpr = dp >> 4;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < ROWS * cpr; idx += THREADS) {
        const int r = idx / cpr;
        const int c = idx - r * cpr;
        cp_async16(s + r * KROW + c * 16, g + static_cast<int64_t>(r) * dp + c * 16, 16);
    }
}

template <int HDP>
__device__ __forceinline__ void attention(const QcAttentionI8Args& a, uint8_t* smem) {
    typedef Cfg<HDP> C;
    constexpr int BN = C::BN;
    constexpr int KROW = C::KROW;
    constexpr int VROW = C::VROW;
    constexpr int KK = HDP / 32;  // 32-wide k-steps of Q K^T
    constexpr int KB = HDP / 16;  // 16-wide head-dim blocks of P V
    constexpr int NB = BN / 8;    // 8-key score blocks per tile

    const int hd = a.head_dim;
    const int dp = a.dp;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int8_t* q8 = dev_ptr<const int8_t>(a.q8);
    const int8_t* k8 = dev_ptr<const int8_t>(a.k8);
    const float* q_scale = dev_ptr<const float>(a.q_scale);
    const float* k_scale = dev_ptr<const float>(a.k_scale);
    const bf16* vg = dev_ptr<const bf16>(a.v);
    bf16* og = dev_ptr<bf16>(a.out);
    const int* kv_start = dev_ptr<const int>(a.kv_start);
    const int* kv_end = dev_ptr<const int>(a.kv_end);
    int* acc_out = dev_ptr<int>(a.acc_out);
    uint8_t* const k_smem = smem;                            // 2 stages
    uint8_t* const v_smem = smem + 2 * C::K_TILE;            // 2 stages
    uint8_t* const q_s = smem + 2 * (C::K_TILE + C::V_TILE);

    // Zero the padding once: int8 columns [dp, HDP) of Q and both K stages, V columns [hd, HDP).
    for (int r = threadIdx.x; r < BM + 2 * BN; r += THREADS) {
        uint8_t* row = r < BM ? q_s + r * KROW : k_smem + (r - BM) * KROW;
        for (int c = dp; c < HDP; c += 16) *reinterpret_cast<uint4*>(row + c) = make_uint4(0, 0, 0, 0);
    }
    for (int idx = threadIdx.x; idx < 2 * BN * (HDP / 8); idx += THREADS) {
        const int r = idx / (HDP / 8);
        const int c = idx - r * (HDP / 8);
        if (c * 8 >= hd)
            *reinterpret_cast<uint4*>(v_smem + (r * VROW + c * 8) * 2) = make_uint4(0, 0, 0, 0);
    }

    const int q_tiles = (a.q_len + BM - 1) / BM;
    const int64_t q_blocks = a.q_rows_pad / QC_QK_BLOCK;
    const int64_t k_blocks = a.kv_rows_pad / QC_QK_BLOCK;
    const int64_t work = static_cast<int64_t>(q_tiles) * a.heads * a.groups;
    for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        const int tile = static_cast<int>(w % q_tiles);
        const int64_t rest = w / q_tiles;
        const int h = static_cast<int>(rest % a.heads);
        const int g = static_cast<int>(rest / a.heads);
        const int64_t gh = static_cast<int64_t>(g) * a.heads + h;
        const int q0 = tile * BM;
        const int64_t hoff = static_cast<int64_t>(h) * hd;
        int64_t kv_row0;
        int kv_len;
        if (kv_start != nullptr) {
            kv_row0 = kv_start[g];
            kv_len = max(0, kv_end[g] - kv_start[g]);
        } else {
            kv_row0 = static_cast<int64_t>(g) * a.q_len;
            kv_len = a.q_len;
        }
        const Seq vs{vg + hoff, a.ldv, kv_row0, 1, kv_len};
        const int8_t* k_head = k8 + gh * a.kv_rows_pad * dp;

        // The previous work item is done with shared memory (and the padding is zeroed).
        __syncthreads();

        if (kv_len == 0) {  // block-uniform: zero output rows
            for (int idx = threadIdx.x; idx < BM * (HDP / 8); idx += THREADS) {
                const int r = idx / (HDP / 8);
                const int c = idx - r * (HDP / 8);
                const int i = q0 + r;
                if (i < a.q_len && c * 8 < hd)
                    *reinterpret_cast<uint4*>(og + (static_cast<int64_t>(g) * a.q_len + i) * a.ldo + hoff + c * 8) =
                        make_uint4(0, 0, 0, 0);
            }
            continue;
        }

        // Prologue: Q tile and the first K/V tile.
        load_i8_rows<BM, KROW>(q_s, q8 + (gh * a.q_rows_pad + q0) * dp, dp);
        load_i8_rows<BN, KROW>(k_smem, k_head, dp);
        load_rows_async<HDP, BN, VROW, THREADS>(reinterpret_cast<bf16*>(v_smem), vs, 0, hd);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();

        // Warps whose 16 rows are all past q_len skip the arithmetic (not the loads and barriers).
        const bool active = q0 + warp * 16 < a.q_len;
        uint32_t qf[KK][4];
#pragma unroll
        for (int kk = 0; kk < KK; ++kk)
            ldmatrix_x4(qf[kk], q_s + (warp * 16 + (lane & 15)) * KROW + kk * 32 + (lane >> 4) * 16);
        // f = (q_scale * scale) * k_scale, in base 2: the first product once per item.
        const float qs = q_scale[gh * q_blocks + tile] * a.scale;
        const float* ks = k_scale + gh * k_blocks;

        float o[2 * KB][4];
#pragma unroll
        for (int n = 0; n < 2 * KB; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
        float m_run[2] = {-INFINITY, -INFINITY};
        float l_run[2] = {0.0f, 0.0f};

        const int kv_tiles = (kv_len + BN - 1) / BN;
        for (int t = 0; t < kv_tiles; ++t) {
            const uint8_t* k_s = k_smem + (t & 1) * C::K_TILE;
            const bf16* v_s = reinterpret_cast<const bf16*>(v_smem + (t & 1) * C::V_TILE);
            if (t > 0) cp_async_wait_all();
            // Tile t is visible to all warps, and all are done with tile t - 1 (and with Q).
            __syncthreads();
            if (t + 1 < kv_tiles) {
                load_i8_rows<BN, KROW>(k_smem + ((t + 1) & 1) * C::K_TILE,
                                       k_head + static_cast<int64_t>(t + 1) * BN * dp, dp);
                load_rows_async<HDP, BN, VROW, THREADS>(
                    reinterpret_cast<bf16*>(v_smem + ((t + 1) & 1) * C::V_TILE), vs, (t + 1) * BN, hd);
                cp_async_commit();
            }
            if (!active) continue;

            const int key0 = t * BN;
            int acc[NB][4];
#pragma unroll
            for (int n = 0; n < NB; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
                if (kk * 32 >= dp) continue;  // all-padding k-step
#pragma unroll
                for (int n2 = 0; n2 < NB / 2; ++n2) {
                    if (key0 + n2 * 16 >= kv_len) continue;  // keys all masked below
                    uint32_t b[4];
                    ldmatrix_x4(b, k_s + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * KROW + kk * 32 +
                                       ((lane >> 3) & 1) * 16);
                    mma_s8_16832(acc[2 * n2], qf[kk], b[0], b[1]);
                    mma_s8_16832(acc[2 * n2 + 1], qf[kk], b[2], b[3]);
                }
            }

            if (acc_out != nullptr) {
#pragma unroll
                for (int n = 0; n < NB; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = q0 + warp * 16 + (lane >> 2) + (e >> 1) * 8;
                        const int j = key0 + n * 8 + (lane & 3) * 2 + (e & 1);
                        if (i < a.q_len && j < kv_len) acc_out[(gh * a.q_len + i) * a.acc_ld + j] = acc[n][e];
                    }
                }
            }

            // Dequantize to base-2 scores; keys past kv_len -> -inf.
            const float f2 = (qs * ks[key0 / QC_QK_BLOCK]) * 1.4426950408889634f;
            const bool partial = key0 + BN > kv_len;
            float s[NB][4];
#pragma unroll
            for (int n = 0; n < NB; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = static_cast<float>(acc[n][e]) * f2;
                    if (partial && key0 + n * 8 + (lane & 3) * 2 + (e & 1) >= kv_len) x = -INFINITY;
                    s[n][e] = x;
                }
            }
            // Every processed tile has a valid key (key0 < kv_len): the new max is finite.
            flash_softmax_update(s, m_run, l_run, o);
            flash_pv<NB, KB, VROW>(s, o, v_s, key0, kv_len, hd);
        }

        if (active) flash_store(o, l_run, og + hoff, static_cast<int64_t>(g) * a.q_len, 1, a.ldo, q0, a.q_len, hd);
    }
}

template <int HDP>
__device__ __forceinline__ void entry(const QcAttentionI8Args& a) {
    __shared__ __align__(128) uint4 smem_raw[Cfg<HDP>::SMEM_BYTES / 16];
    const int hd = a.head_dim;
    const bool aligned = ((a.q8 | a.k8 | a.v | a.out) & 15) == 0 && ((a.ldv | a.ldo) & 7) == 0;
    if (blockDim.x != THREADS || hd < 8 || hd % 8 != 0 || a.dp != ((hd + 31) & ~31) || a.dp > HDP || !aligned ||
        a.q_rows_pad % QC_QK_BLOCK != 0 || a.kv_rows_pad % QC_QK_BLOCK != 0)
        __trap();
    attention<HDP>(a, reinterpret_cast<uint8_t*>(smem_raw));
}

// ------------------------------------------------------------ quantization

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// One thread per column: the per-block partial sums, then their sum, in order (qc_types.h).
__device__ __forceinline__ void qk_mean(const QcQkMeanArgs& a) {
    const bf16* k = dev_ptr<const bf16>(a.k);
    float* mean = dev_ptr<float>(a.mean);
    const int* row_start = dev_ptr<const int>(a.row_start);
    const int* row_end = dev_ptr<const int>(a.row_end);
    const int c = threadIdx.x;
    const int64_t items = static_cast<int64_t>(a.groups) * a.heads;
    for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
        if (c >= a.head_dim) continue;
        const int g = static_cast<int>(w / a.heads);
        const int h = static_cast<int>(w % a.heads);
        const int r0 = row_start[g];
        const int r1 = row_end[g];
        const bf16* col = k + static_cast<int64_t>(h) * a.head_dim + c;
        float total = 0.0f;
        for (int b0 = r0; b0 < r1; b0 += QC_QK_BLOCK) {
            const int b1 = min(b0 + QC_QK_BLOCK, r1);
            float part = 0.0f;
#pragma unroll 8
            for (int r = b0; r < b1; ++r) part = __fadd_rn(part, to_f32(col[static_cast<int64_t>(r) * a.ldk]));
            total = __fadd_rn(total, part);
        }
        mean[w * a.head_dim + c] = r1 > r0 ? __fdiv_rn(total, static_cast<float>(r1 - r0)) : 0.0f;
    }
}

// One warp per block of QC_QK_BLOCK rows: amax over the block, then the int8 rows
// (4 bytes per store, padding included).
__device__ __forceinline__ void quantize_qk(const QcQuantizeQkArgs& a) {
    const bf16* x = dev_ptr<const bf16>(a.x);
    const float* mean_all = dev_ptr<const float>(a.mean);
    const int* row_start = dev_ptr<const int>(a.row_start);
    const int* row_end = dev_ptr<const int>(a.row_end);
    int8_t* q = dev_ptr<int8_t>(a.q);
    float* scale = dev_ptr<float>(a.scale);
    const int lane = threadIdx.x & 31;
    const int hd = a.head_dim;
    const int dp = a.dp;
    const int64_t nb = a.rows_pad / QC_QK_BLOCK;
    const int64_t items = static_cast<int64_t>(a.groups) * a.heads * nb;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (THREADS / 32);
    for (int64_t w = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + (threadIdx.x >> 5); w < items; w += warps) {
        const int64_t gh = w / nb;
        const int b = static_cast<int>(w % nb);
        const int g = static_cast<int>(gh / a.heads);
        const int h = static_cast<int>(gh % a.heads);
        int64_t r0, r1;
        if (row_start != nullptr) {
            r0 = row_start[g];
            r1 = row_end[g];
        } else {
            r0 = static_cast<int64_t>(g) * a.seq_len;
            r1 = r0 + a.seq_len;
        }
        const int64_t first = r0 + static_cast<int64_t>(b) * QC_QK_BLOCK;
        const int rows = static_cast<int>(max(static_cast<int64_t>(0), min(r1 - first, static_cast<int64_t>(QC_QK_BLOCK))));
        const float* mean = mean_all != nullptr ? mean_all + gh * hd : nullptr;
        const bf16* xb = x + first * a.ldx + static_cast<int64_t>(h) * hd;
        auto value = [&](int r, int c) {
            const float v = to_f32(xb[static_cast<int64_t>(r) * a.ldx + c]);
            return mean != nullptr ? __fsub_rn(v, mean[c]) : v;
        };
        float amax = 0.0f;
        for (int e = lane; e < rows * hd; e += 32) {
            const int r = e / hd;
            amax = fmaxf(amax, fabsf(value(r, e - r * hd)));
        }
        amax = warp_max(amax);
        const float inv = amax > 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
        if (lane == 0) scale[w] = __fdiv_rn(amax, 127.0f);
        uint32_t* qw = reinterpret_cast<uint32_t*>(q + w * QC_QK_BLOCK * dp);
        for (int e = lane; e < QC_QK_BLOCK * dp / 4; e += 32) {
            const int r = (e * 4) / dp;
            const int c0 = e * 4 - r * dp;
            uint32_t word = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = c0 + j;
                int v = 0;
                if (r < rows && c < hd) v = max(-127, min(127, __float2int_rn(__fmul_rn(value(r, c), inv))));
                word |= (static_cast<uint32_t>(v) & 0xffu) << (8 * j);
            }
            qw[e] = word;
        }
    }
}

}  // namespace attn_i8
}  // namespace qc

// K's mean per (group, head, column) over each group's rows (QcQkMeanArgs).
extern "C" __global__ void __launch_bounds__(128) qc_qk_mean_bf16(const QcQkMeanArgs a) {
    if (blockDim.x != qc::attn_i8::THREADS || a.head_dim > qc::attn_i8::THREADS) __trap();
    qc::attn_i8::qk_mean(a);
}

// Q or K (minus its mean) to int8 per block of QC_QK_BLOCK rows (QcQuantizeQkArgs).
extern "C" __global__ void __launch_bounds__(128) qc_quantize_qk_bf16(const QcQuantizeQkArgs a) {
    if (blockDim.x != qc::attn_i8::THREADS || a.head_dim < 1 || a.head_dim > 128 ||
        a.dp != ((a.head_dim + 31) & ~31) || a.rows_pad % QC_QK_BLOCK != 0 || (a.q & 15) != 0)
        __trap();
    qc::attn_i8::quantize_qk(a);
}

// Attention with int8 Q K^T (QcAttentionI8Args), one entry point per padded head dim
// as in attention.cu: head_dim <= 32 (the demo model's 16), 64, 96 (Open-Sora's 72), 128.
extern "C" __global__ void __launch_bounds__(128, 4) qc_attention_i8_d32(const QcAttentionI8Args a) {
    qc::attn_i8::entry<32>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_i8_d64(const QcAttentionI8Args a) {
    qc::attn_i8::entry<64>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_i8_d96(const QcAttentionI8Args a) {
    qc::attn_i8::entry<96>(a);
}
extern "C" __global__ void __launch_bounds__(128, 3) qc_attention_i8_d128(const QcAttentionI8Args a) {
    qc::attn_i8::entry<128>(a);
}
