// gemm_w4.cu: qc_gemm_w4a8, the W4A8 / W4A6 GEMM (int8 activations, packed
// int4 weights with one f32 scale per output channel and group of 64 inputs).
// Semantics, the device layout of the weights and the requirements:
// qc_types.h (QcGemmW4Args); host side: KernelModule::launch_gemm_w4a8 and
// w4_device_layout (src/backend/cuda/mod.rs).
//
// Design (sm_80 and sm_90a, mma.sync m16n8k32 s8), on gemm.cu's tiles, tile
// order, cp.async wrappers and epilogue:
//   - block tile 128 x 128, 8 warps as 2 (M) x 4 (N), each warp 64 x 32
//     outputs, as qc_gemm_w8a8;
//   - k-tile = one scale group: 64 bytes of every a row, 32 bytes of every w
//     row and the tile's 128 scales of the group, QC_GEMM_W4_STAGES k-tiles of
//     cp.async in flight (zero fill outside M and N; K is whole groups);
//   - a group's integer sum is exact in any order of k, so each lane takes the
//     k it reads in one access: lane (g = lane / 4, t = lane % 4) loads inputs
//     16t .. 16t + 15 of the group from a rows g and g + 8 (16 bytes each) and
//     from w row g (8 bytes), and the operands of both k32 mma steps are
//     4-byte slices of those; a and w see the same permutation of k, so every
//     product pairs the right a[m, k] with q[n, k];
//   - widening: in the device layout byte i of a word holds inputs i (high
//     nibble) and i + 4 (low nibble) of its 8, so (word & 0xF0F0F0F0) ^
//     0x80808080 is four int8 16 q (q + 8 -> q as two's complement in the
//     high half of each byte) and the same of word << 4 the other four: one or
//     two instructions per 4 weights. The mma then sums 16 a q, exactly;
//   - the first mma of a group starts from MAGIC (the f32 bits of 1.5 * 2^19)
//     instead of 0: int_as_float(MAGIC + 16 acc) = 786432 + acc exactly (same
//     binade while |16 acc| < 2^22; |acc| <= 64 * 128 * 8), so (float) acc is
//     one subtraction and the group's f32 step two instructions per output;
//   - registers: the 64 f32 sums per thread live across the k loop, the int32
//     accumulators only for one 16-row mma tile row (16); about 150 registers
//     in all, so one block of 8 warps per SM (__launch_bounds__(256, 1)): at
//     the 128 of two blocks ptxas spills;
//   - acc_out (tests) is [groups, M, N] so that a row's columns are immediate
//     offsets: with [M, N, groups] ptxas keeps 64 hoisted addresses and spills.
#include "common.cuh"

namespace qc {
namespace gemm_w4 {

using gemm::BM;
using gemm::BN;
using gemm::MT;
using gemm::NT;
using gemm::WARP_M;
using gemm::WARP_N;
using gemm::cp_async16;
using gemm::cp_async_commit;
using gemm::cp_async_wait;
constexpr int STAGES = QC_GEMM_W4_STAGES;
constexpr int GROUP = QC_W4_GROUP;  // inputs per k-tile
constexpr int A_ROW = GROUP;        // bytes of an a row per k-tile
constexpr int W_ROW = GROUP / 2;    // bytes of a w row per k-tile
constexpr int A_BYTES = BM * A_ROW;
constexpr int W_BYTES = BN * W_ROW;
constexpr int S_BYTES = BN * 4;
constexpr int STAGE_BYTES = A_BYTES + W_BYTES + S_BYTES;
static_assert(GROUP == 64, "a k-tile is one scale group: two k32 mma steps");
static_assert(STAGES * STAGE_BYTES == QC_GEMM_W4_SMEM_BYTES, "QC_GEMM_W4_SMEM_BYTES");
static_assert(STAGE_BYTES % 128 == 0, "stages 128-byte aligned");
static_assert(gemm::THREADS == 256 && BM * A_ROW == 2 * 16 * gemm::THREADS &&
                  BN * W_ROW == 16 * gemm::THREADS && BN <= gemm::THREADS,
              "per k-tile each thread copies 2 a chunks, 1 w chunk and at most 1 scale");

constexpr int MAGIC = 0x49400000;      // bits of 786432.0f = 1.5 * 2^19 (ulp 1/16)
constexpr float MAGIC_F = 786432.0f;

// 4 bytes global -> shared through L1 (the following groups' scales of the
// column share the sector); only src_bytes (0 or 4) are read, the rest zero-filled.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

// d = a (16x32, row) * b (32x8, col) + c in all four accumulators, s8 in, exact s32.
__device__ __forceinline__ void mma_from(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1, int c) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c), "r"(c), "r"(c),
          "r"(c));
}

// Shared-memory loads of 16 and 8 bytes at a shared-window address (volatile, like
// gemm.cu's ldmatrix: they stay between the barriers that guard the stage).
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

// Weights of the high nibbles of a device-layout word as four int8 16 q.
__device__ __forceinline__ uint32_t widen_high(uint32_t word) {
    return (word & 0xF0F0F0F0u) ^ 0x80808080u;
}
// The same for the low nibbles.
__device__ __forceinline__ uint32_t widen_low(uint32_t word) {
    return ((word << 4) & 0xF0F0F0F0u) ^ 0x80808080u;
}

// sum (zeroed here) = the per-group f32 sums of this warp's 64 x 32 outputs
// of tile (bm, bn), in group order; acc_out as in QcGemmW4Args. Leaves no
// cp.async pending and shared memory free once every thread passed the final barrier.
__device__ __forceinline__ void main_loop(float (&sum)[MT][NT][4], const QcGemmW4Args& p,
                                          int64_t bm, int64_t bn, uint32_t smem) {
    const int8_t* __restrict__ a = dev_ptr<const int8_t>(p.a);
    const uint8_t* __restrict__ w = dev_ptr<const uint8_t>(p.w);
    const float* __restrict__ w_scale = dev_ptr<const float>(p.w_scale);
    int* __restrict__ acc_out = dev_ptr<int>(p.acc_out);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int64_t groups = p.k / GROUP;
    const int ktiles = static_cast<int>(groups);

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) sum[i][j][r] = 0.0f;

    // Copies per k-tile: chunk (tid & 3) of a tile rows (tid >> 2) and
    // (tid >> 2) + 64, chunk (tid & 1) of w tile row (tid >> 1), and thread
    // tid < BN the scale of tile column tid. Rows outside M / N read 0 bytes
    // (from row 0, a valid address); the sources advance one k-tile per call.
    const int a_row = tid >> 2, a_chunk = tid & 3;
    const int w_row = tid >> 1, w_chunk = tid & 1;
    const int8_t* a_src[2];
    int a_bytes[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int64_t r = bm + a_row + 64 * j;
        a_bytes[j] = r < p.m ? 16 : 0;
        a_src[j] = a + (r < p.m ? r : 0) * p.lda + a_chunk * 16;
    }
    const int64_t rw = bn + w_row;
    const int w_bytes = rw < p.n ? 16 : 0;
    const uint8_t* w_src = w + (rw < p.n ? rw : 0) * p.ldw + w_chunk * 16;
    const bool s_copy = tid < BN;
    const int64_t rs = bn + tid;
    const int s_bytes = rs < p.n ? 4 : 0;
    const float* s_src = w_scale + (rs < p.n ? rs : 0) * groups;
    const uint32_t a_dst = (a_row * A_ROW) + a_chunk * 16;
    const uint32_t w_dst = A_BYTES + w_row * W_ROW + w_chunk * 16;
    const uint32_t s_dst = A_BYTES + W_BYTES + tid * 4;
    auto load_next = [&](int stage) {
        const uint32_t st = smem + stage * STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            cp_async16(st + a_dst + j * 64 * A_ROW, a_src[j], a_bytes[j]);
            a_src[j] += GROUP;
        }
        cp_async16(st + w_dst, w_src, w_bytes);
        w_src += W_ROW;
        if (s_copy) cp_async4(st + s_dst, s_src, s_bytes);
        ++s_src;
    };

    // Fragment reads (byte offsets in a stage). Lane (g, t): a rows g and g + 8
    // of mma tile row i, bytes 16t .. 16t + 15; w row g of mma tile column j,
    // bytes 8t .. 8t + 7 (inputs 16t .. 16t + 15); the scales of output
    // columns 2t, 2t + 1 of tile column j. Rows are 64 (a) and 32 (w) bytes
    // apart, so each quarter-warp's 16-byte loads (a) and each half-warp's
    // 8-byte loads (w) cover 128 contiguous bytes: no bank conflicts.
    const int g = lane >> 2, t = lane & 3;
    const int warp_m = warp >> 2, warp_n = warp & 3;
    const uint32_t a_off = ((warp_m * WARP_M + g) * A_ROW) + t * 16;
    const uint32_t w_off = A_BYTES + (warp_n * WARP_N + g) * W_ROW + t * 8;
    const uint32_t s_off = A_BYTES + W_BYTES + (warp_n * WARP_N + 2 * t) * 4;

    // Prologue: k-tiles 0 .. STAGES-2 in flight (one commit group each, empty past the end).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_next(s);
        cp_async_commit();
    }

    int stage = 0;          // stage holding k-tile kt
    int fill = STAGES - 1;  // stage that k-tile kt + STAGES - 1 goes to
    for (int kt = 0; kt < ktiles; ++kt) {
        // As in gemm.cu's main_loop: k-tile kt has landed for every thread, and
        // every warp is done with stage `fill` (k-tile kt - 1) before it is refilled.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < ktiles) load_next(fill);
        cp_async_commit();

        const uint32_t st = smem + stage * STAGE_BYTES;
        // b[j][0..1]: step 0 (inputs 16t + 0..3, 16t + 4..7), b[j][2..3]: step 1 (16t + 8..15).
        // ws[j]: the scales of this lane's output columns 2t, 2t + 1 of mma tile column j.
        uint32_t b[NT][4];
        float2 ws[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint2 v = lds64(st + w_off + j * 8 * W_ROW);
            b[j][0] = widen_high(v.x);
            b[j][1] = widen_low(v.x);
            b[j][2] = widen_high(v.y);
            b[j][3] = widen_low(v.y);
            const uint2 sb = lds64(st + s_off + j * 8 * 4);
            ws[j] = make_float2(__uint_as_float(sb.x), __uint_as_float(sb.y));
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const uint4 lo = lds128(st + a_off + i * 16 * A_ROW);
            const uint4 hi = lds128(st + a_off + (i * 16 + 8) * A_ROW);
            // a0 / a2 rows g, a1 / a3 rows g + 8; step 0: inputs 16t + 0..3 and
            // 16t + 4..7, step 1: 16t + 8..11 and 16t + 12..15 (as b above).
            const uint32_t a_step0[4] = {lo.x, hi.x, lo.y, hi.y};
            const uint32_t a_step1[4] = {lo.z, hi.z, lo.w, hi.w};
            int d[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_from(d[j], a_step0, b[j][0], b[j][1], MAGIC);
#pragma unroll
            for (int j = 0; j < NT; ++j) gemm::mma(d[j], a_step1, b[j][2], b[j][3]);
            // d = MAGIC + 16 acc: (float) acc exactly, then the group's fma.
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const float x = __fsub_rn(__int_as_float(d[j][r]), MAGIC_F);
                    sum[i][j][r] = __fmaf_rn(x, (r & 1) ? ws[j].y : ws[j].x, sum[i][j][r]);
                }
            if (acc_out != nullptr) {
                // [groups, M, N]: columns at immediate offsets from each row's start.
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int64_t row = bm + warp_m * WARP_M + i * 16 + g + 8 * h;
                    if (row >= p.m) continue;
                    int* out_row = acc_out + (static_cast<int64_t>(kt) * p.m + row) * p.n + bn +
                                   warp_n * WARP_N + 2 * t;
                    const int64_t cols_left = p.n - (bn + warp_n * WARP_N + 2 * t);
#pragma unroll
                    for (int j = 0; j < NT; ++j)
#pragma unroll
                        for (int c = 0; c < 2; ++c)
                            if (j * 8 + c < cols_left) out_row[j * 8 + c] = (d[j][2 * h + c] - MAGIC) >> 4;
                }
            }
        }
        stage = stage == STAGES - 1 ? 0 : stage + 1;
        fill = fill == STAGES - 1 ? 0 : fill + 1;
    }
    cp_async_wait<0>();  // only empty groups can be left
    __syncthreads();     // every warp is done with shared memory before the next tile
}

__device__ __forceinline__ void gemm_w4a8(const QcGemmW4Args& p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
    const float* __restrict__ a_scale = dev_ptr<const float>(p.a_scale);
    const float* __restrict__ bias = dev_ptr<const float>(p.bias);
    const gemm::Epi e{p.epilogue, dev_ptr<const float>(p.gate), dev_ptr<const int>(p.group_index),
                      p.gate_stride, p.group_size, dev_ptr<const bf16>(p.residual), p.ldr,
                      dev_ptr<bf16>(p.out), p.ldo, p.n};
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t tiles_m = (p.m + BM - 1) / BM;
    const int64_t tiles_n = (p.n + BN - 1) / BN;
    for (int64_t tile = blockIdx.x; tile < tiles_m * tiles_n; tile += gridDim.x) {
        int64_t tm, tn;
        gemm::tile_coords(tile, tiles_m, tiles_n, tm, tn);
        const int64_t bm = tm * BM, bn = tn * BN;
        float sum[MT][NT][4];
        main_loop(sum, p, bm, bn, smem);

        // sum (i, j, r): row bm + warp_m*64 + i*16 + lane/4 + 8*(r >= 2),
        // column bn + warp_n*32 + j*8 + 2*(lane%4) + (r & 1).
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = bm + (warp >> 2) * WARP_M + i * 16 + (lane >> 2) + 8 * h;
                if (row >= p.m) continue;
                const float* grow = gemm::gate_row(e, row);
                const float as = a_scale[row];
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int64_t col = bn + (warp & 3) * WARP_N + j * 8 + 2 * (lane & 3);
                    if (col >= p.n) continue;
                    const bool two = col + 1 < p.n;
                    // s * a_scale[m] (+ bias[n]), each op rounded on its own.
                    float y0 = __fmul_rn(sum[i][j][2 * h], as);
                    float y1 = two ? __fmul_rn(sum[i][j][2 * h + 1], as) : 0.0f;
                    if (bias != nullptr) {
                        y0 = __fadd_rn(y0, bias[col]);
                        if (two) y1 = __fadd_rn(y1, bias[col + 1]);
                    }
                    gemm::store_pair(e, row, col, grow, y0, y1);
                }
            }
    }
}

}  // namespace gemm_w4
}  // namespace qc

// out = epilogue(y), y = (per-group fma of int32 group products * w_scale) * a_scale + bias
// (launch_cfg::gemm_w4a8; traps unless blockDim = QC_GEMM_THREADS x 1 x 1 and K is whole groups).
extern "C" __global__ void __launch_bounds__(QC_GEMM_THREADS, 1) qc_gemm_w4a8(const QcGemmW4Args a) {
    if (blockDim.x != QC_GEMM_THREADS || blockDim.y != 1 || blockDim.z != 1 || a.k % QC_W4_GROUP != 0)
        __trap();
    qc::gemm_w4::gemm_w4a8(a);
}
