// gemm.cu: tensor-core GEMMs with fused epilogues (bf16 x bf16 -> f32
// accumulation; int8 x int8 -> exact int32 accumulation), per-row activation
// quantization, and LayerNorm + modulate fused with that quantization.
// Argument structs, tiling constants and exact semantics: qc_types.h
// (QcGemmArgs, QcGemmI8Args, QcQuantizeArgs, QcLayerNormQ8Args, QC_GEMM_*).
//
// GEMM design (sm_80 and sm_90a, mma.sync):
//   - block tile QC_GEMM_BM x QC_GEMM_BN (128 x 128), 8 warps as 2 (M) x 4 (N),
//     each warp 64 x 32 outputs = 4 x 4 mma tiles;
//   - k-tile = 64 bytes per row (32 bf16 / 64 int8), QC_GEMM_STAGES (3) stages
//     of cp.async (16-byte, zero-filled outside M, N and K) global -> shared;
//   - shared tiles are [rows][4 chunks of 16 bytes], chunk c of row r stored at
//     chunk c ^ ((r >> 1) & 3): the 16-byte cp.async stores and the ldmatrix
//     reads (8 rows of one chunk per 8x8 matrix) are both free of bank conflicts;
//   - ldmatrix.x4 feeds mma.m16n8k16 (bf16) / mma.m16n8k32 (s8): in units of
//     16-byte chunks both instructions see the same fragment layout, so one
//     main loop serves both;
//   - epilogue straight from the accumulator registers (2 adjacent columns per
//     store), f32 throughout, one rounding to bf16.
// On sm_90a the host runs the bf16 GEMM as qc_gemm_bf16_sm90 instead
// (gemm_sm90.cu: TMA + wgmma, sharing Epi / store_pair / tile_coords below).
#include "common.cuh"

namespace qc {
namespace gemm {

constexpr int BM = QC_GEMM_BM;
constexpr int BN = QC_GEMM_BN;
constexpr int THREADS = QC_GEMM_THREADS;
constexpr int STAGES = QC_GEMM_STAGES;
constexpr int GROUP_M = QC_GEMM_GROUP_M;
constexpr int ROW_BYTES = 64;  // one k-tile of one row: 4 chunks of 16 bytes
constexpr int A_BYTES = BM * ROW_BYTES;
constexpr int B_BYTES = BN * ROW_BYTES;
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int WARP_M = 64;  // rows per warp (2 warps along M)
constexpr int WARP_N = 32;  // columns per warp (4 warps along N)
constexpr int MT = WARP_M / 16;  // mma tiles per warp along M
constexpr int NT = WARP_N / 8;   // mma tiles per warp along N
static_assert(STAGES * STAGE_BYTES == QC_GEMM_SMEM_BYTES, "QC_GEMM_SMEM_BYTES");
static_assert(THREADS == 256 && BM == 2 * WARP_M && BN == 4 * WARP_N, "8 warps, 2 x 4");
static_assert(BM * 4 == 2 * THREADS && BN * 4 == 2 * THREADS, "2 chunks per thread per tile");

// ------------------------------------------------------------ PTX wrappers

// 16 bytes global -> shared, bypassing L1; only src_bytes (0 or 16) are read,
// the rest of the 16 bytes is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still pending.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col), bf16 in, f32 accumulate.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a (16x32, row) * b (32x8, col), s8 in, exact s32 accumulate.
__device__ __forceinline__ void mma(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- tiling

// Output tile (tm, tn) of linear tile number t (see QC_GEMM_GROUP_M in
// qc_types.h; launch_cfg::gemm_tile is the host's copy).
__device__ __forceinline__ void tile_coords(int64_t t, int64_t tiles_m, int64_t tiles_n,
                                            int64_t& tm, int64_t& tn) {
    const int64_t per_group = GROUP_M * tiles_n;
    const int64_t group = t / per_group;
    const int64_t first_m = group * GROUP_M;
    const int64_t rows = min(tiles_m - first_m, static_cast<int64_t>(GROUP_M));
    const int64_t r = t - group * per_group;
    tm = first_m + r % rows;
    tn = r / rows;
}

// Byte offset of 16-byte chunk c (0..3) of tile row r inside a stage's A or B tile.
__device__ __forceinline__ uint32_t chunk_offset(int r, int c) {
    return static_cast<uint32_t>(r * ROW_BYTES + ((c ^ ((r >> 1) & 3)) << 4));
}

// The two element types: bf16 (8 per chunk) and int8 (16 per chunk).
struct Bf16Op {
    typedef bf16 In;
    typedef float Acc;
    static constexpr int CHUNK = 8;
};
struct I8Op {
    typedef int8_t In;
    typedef int Acc;
    static constexpr int CHUNK = 16;
};

// acc (zeroed here) = a[bm .. bm+BM, :] * w[bn .. bn+BN, :]^T for this warp's
// 64 x 32 part. Leaves no cp.async pending and shared memory free for reuse
// once every thread has passed the final barrier.
template <typename Op>
__device__ __forceinline__ void main_loop(typename Op::Acc (&acc)[MT][NT][4],
                                          const typename Op::In* __restrict__ a,
                                          const typename Op::In* __restrict__ w, int64_t m,
                                          int64_t n, int64_t k, int64_t lda, int64_t ldw,
                                          int64_t bm, int64_t bn, uint32_t smem) {
    typedef typename Op::In In;
    constexpr int BK = 4 * Op::CHUNK;  // elements per k-tile
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

    // Loads: thread tid copies chunk (tid & 3) of tile rows (tid >> 2) and
    // (tid >> 2) + 64, of A and of B. Rows outside M / N read nothing (zero fill).
    const int ld_row = tid >> 2;
    const int ld_chunk = tid & 3;
    const uint32_t ld_off = chunk_offset(ld_row, ld_chunk);  // row + 64: same swizzle
    const In* a_src[2];
    const In* w_src[2];
    bool a_ok[2], w_ok[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int64_t ra = bm + ld_row + 64 * j;
        const int64_t rw = bn + ld_row + 64 * j;
        a_ok[j] = ra < m;
        w_ok[j] = rw < n;
        a_src[j] = a + (a_ok[j] ? ra : 0) * lda + ld_chunk * Op::CHUNK;
        w_src[j] = w + (w_ok[j] ? rw : 0) * ldw + ld_chunk * Op::CHUNK;
    }
    const int ktiles = static_cast<int>((k + BK - 1) / BK);
    auto load_tile = [&](int stage, int kt) {
        const int64_t k0 = static_cast<int64_t>(kt) * BK;
        const bool k_ok = k0 + ld_chunk * Op::CHUNK < k;  // K % CHUNK == 0: whole chunks
        const uint32_t dst = smem + stage * STAGE_BYTES + ld_off;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const bool pa = k_ok && a_ok[j];
            const bool pw = k_ok && w_ok[j];
            // Out-of-range chunks read 0 bytes from a valid address (the matrix start).
            cp_async16(dst + j * 64 * ROW_BYTES, pa ? static_cast<const void*>(a_src[j] + k0) : a,
                       pa ? 16 : 0);
            cp_async16(dst + A_BYTES + j * 64 * ROW_BYTES,
                       pw ? static_cast<const void*>(w_src[j] + k0) : w, pw ? 16 : 0);
        }
    };

    // ldmatrix addressing. A (x4 = one 16 x 32-byte mma tile): lanes 0-15 give
    // rows 0-15 of chunk 0, lanes 16-31 rows 0-15 of chunk 1 -> a0..a3.
    // B (x4 = two 8-column mma tiles): lanes 0-7 rows 0-7 chunk 0, 8-15 rows
    // 0-7 chunk 1, 16-23 rows 8-15 chunk 0, 24-31 rows 8-15 chunk 1 ->
    // (b0, b1) of tile 0, (b0, b1) of tile 1. Every row index below is
    // (multiple of 16) + (lane & 7 or lane & 15 ...), so the swizzle key
    // ((row >> 1) & 3) is (lane >> 1) & 3 for all of them.
    const int key = (lane >> 1) & 3;
    const int a_chunk = lane >> 4;
    const int b_chunk = (lane >> 3) & 1;
    const uint32_t a_row_off = static_cast<uint32_t>(((warp >> 2) * WARP_M + (lane & 15)) * ROW_BYTES);
    const uint32_t b_row_off = static_cast<uint32_t>(
        A_BYTES + ((warp & 3) * WARP_N + (lane & 7) + ((lane >> 4) << 3)) * ROW_BYTES);

    // Prologue: k-tiles 0 .. STAGES-2 in flight (one commit group each, empty past the end).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_tile(s, s);
        cp_async_commit();
    }

    int stage = 0;             // stage holding k-tile kt
    int fill = STAGES - 1;     // stage that k-tile kt + STAGES - 1 goes to
    for (int kt = 0; kt < ktiles; ++kt) {
        // Groups 0 .. kt are complete once at most STAGES - 2 are pending; the
        // barrier publishes every thread's copies and guarantees that all warps
        // finished reading stage `fill` (k-tile kt - 1) before it is refilled.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < ktiles) load_tile(fill, kt + STAGES - 1);
        cp_async_commit();

        const uint32_t base = smem + stage * STAGE_BYTES;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {  // two mma k-steps of 2 chunks each
            uint32_t af[MT][4];
            uint32_t bfr[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                ldmatrix_x4(af[i], base + a_row_off + i * 16 * ROW_BYTES +
                                       (((2 * ks + a_chunk) ^ key) << 4));
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                uint32_t r[4];
                ldmatrix_x4(r, base + b_row_off + p * 16 * ROW_BYTES +
                                   (((2 * ks + b_chunk) ^ key) << 4));
                bfr[2 * p][0] = r[0];
                bfr[2 * p][1] = r[1];
                bfr[2 * p + 1][0] = r[2];
                bfr[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
        }
        stage = stage == STAGES - 1 ? 0 : stage + 1;
        fill = fill == STAGES - 1 ? 0 : fill + 1;
    }
    cp_async_wait<0>();  // only empty groups can be left; keeps the invariant simple
    __syncthreads();     // every warp is done with shared memory before the next tile
}

// ------------------------------------------------------------- epilogues

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as qc_gelu_tanh_*.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    const float kKappa = 0.044715f;
    const float inner = kBeta * (x + kKappa * (x * x * x));
    return 0.5f * x * (1.0f + tanhf(inner));
}

// What the epilogue needs besides y, shared by both GEMMs.
struct Epi {
    int epilogue;
    const float* __restrict__ gate;
    const int* __restrict__ group_index;
    int64_t gate_stride;
    int64_t group_size;
    const bf16* residual;  // may equal out: not __restrict__
    int64_t ldr;
    bf16* out;
    int64_t ldo;
    int64_t n;
};

// The gate row of output row m (nullptr: gate 1), only for QC_EPI_GATED_RESIDUAL.
__device__ __forceinline__ const float* gate_row(const Epi& e, int64_t m) {
    if (e.epilogue != QC_EPI_GATED_RESIDUAL || e.gate == nullptr) return nullptr;
    const int64_t g = m / e.group_size;
    const int64_t entry = e.group_index != nullptr ? static_cast<int64_t>(e.group_index[g]) : g;
    return e.gate + entry * e.gate_stride;
}

// out[m, col .. col + 2) = epilogue(y0, y1), only the columns < n (col even,
// col < n). One 4-byte access when both columns exist (col even, ldo and ldr
// multiples of 8, out and residual 16-byte aligned: aligned).
__device__ __forceinline__ void store_pair(const Epi& e, int64_t m, int64_t col, const float* grow,
                                           float y0, float y1) {
    const bool two = col + 1 < e.n;
    if (e.epilogue == QC_EPI_GELU_TANH) {
        y0 = gelu_tanh(y0);
        y1 = gelu_tanh(y1);
    } else if (e.epilogue == QC_EPI_GATED_RESIDUAL) {
        const bf16* rp = e.residual + m * e.ldr + col;
        float r0, r1 = 0.0f;
        if (two) {
            const __nv_bfloat162 rv = *reinterpret_cast<const __nv_bfloat162*>(rp);
            r0 = __low2float(rv);
            r1 = __high2float(rv);
        } else {
            r0 = __bfloat162float(rp[0]);
        }
        if (grow != nullptr) {
            y0 *= grow[col];
            if (two) y1 *= grow[col + 1];
        }
        y0 = r0 + y0;
        y1 = r1 + y1;
    }
    bf16* op = e.out + m * e.ldo + col;
    if (two)
        *reinterpret_cast<__nv_bfloat162*>(op) = __floats2bfloat162_rn(y0, y1);
    else
        op[0] = __float2bfloat16_rn(y0);
}

// ------------------------------------------------------------------ GEMMs

__device__ __forceinline__ void gemm_bf16(const QcGemmArgs& p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
    const bf16* __restrict__ a = dev_ptr<const bf16>(p.a);
    const bf16* __restrict__ w = dev_ptr<const bf16>(p.w);
    const float* __restrict__ bias = dev_ptr<const float>(p.bias);
    const Epi e{p.epilogue, dev_ptr<const float>(p.gate), dev_ptr<const int>(p.group_index),
                p.gate_stride, p.group_size, dev_ptr<const bf16>(p.residual), p.ldr,
                dev_ptr<bf16>(p.out), p.ldo, p.n};
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t tiles_m = (p.m + BM - 1) / BM;
    const int64_t tiles_n = (p.n + BN - 1) / BN;
    for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
        int64_t tm, tn;
        tile_coords(t, tiles_m, tiles_n, tm, tn);
        const int64_t bm = tm * BM, bn = tn * BN;
        float acc[MT][NT][4];
        main_loop<Bf16Op>(acc, a, w, p.m, p.n, p.k, p.lda, p.ldw, bm, bn, smem);

        // Accumulator (i, j, r): row bm + warp_m*64 + i*16 + lane/4 + 8*(r >= 2),
        // column bn + warp_n*32 + j*8 + 2*(lane%4) + (r & 1).
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = bm + (warp >> 2) * WARP_M + i * 16 + (lane >> 2) + 8 * h;
                if (row >= p.m) continue;
                const float* grow = gate_row(e, row);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int64_t col = bn + (warp & 3) * WARP_N + j * 8 + 2 * (lane & 3);
                    if (col >= p.n) continue;
                    float y0 = acc[i][j][2 * h], y1 = acc[i][j][2 * h + 1];
                    if (bias != nullptr) {
                        y0 += bias[col];
                        if (col + 1 < p.n) y1 += bias[col + 1];
                    }
                    store_pair(e, row, col, grow, y0, y1);
                }
            }
    }
}

__device__ __forceinline__ void gemm_w8a8(const QcGemmI8Args& p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
    const int8_t* __restrict__ a = dev_ptr<const int8_t>(p.a);
    const int8_t* __restrict__ w = dev_ptr<const int8_t>(p.w);
    const float* __restrict__ a_scale = dev_ptr<const float>(p.a_scale);
    const float* __restrict__ w_scale = dev_ptr<const float>(p.w_scale);
    const float* __restrict__ bias = dev_ptr<const float>(p.bias);
    int* __restrict__ acc_out = dev_ptr<int>(p.acc_out);
    // 8-byte stores of column pairs when every row start keeps them aligned.
    const bool acc_pairs = (p.n & 1) == 0 && (reinterpret_cast<uintptr_t>(acc_out) & 7) == 0;
    const Epi e{p.epilogue, dev_ptr<const float>(p.gate), dev_ptr<const int>(p.group_index),
                p.gate_stride, p.group_size, dev_ptr<const bf16>(p.residual), p.ldr,
                dev_ptr<bf16>(p.out), p.ldo, p.n};
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t tiles_m = (p.m + BM - 1) / BM;
    const int64_t tiles_n = (p.n + BN - 1) / BN;
    for (int64_t t = blockIdx.x; t < tiles_m * tiles_n; t += gridDim.x) {
        int64_t tm, tn;
        tile_coords(t, tiles_m, tiles_n, tm, tn);
        const int64_t bm = tm * BM, bn = tn * BN;
        int acc[MT][NT][4];
        main_loop<I8Op>(acc, a, w, p.m, p.n, p.k, p.lda, p.ldw, bm, bn, smem);

#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = bm + (warp >> 2) * WARP_M + i * 16 + (lane >> 2) + 8 * h;
                if (row >= p.m) continue;
                const float* grow = gate_row(e, row);
                const float as = a_scale[row];
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int64_t col = bn + (warp & 3) * WARP_N + j * 8 + 2 * (lane & 3);
                    if (col >= p.n) continue;
                    const bool two = col + 1 < p.n;
                    const int c0 = acc[i][j][2 * h], c1 = acc[i][j][2 * h + 1];
                    if (acc_out != nullptr) {
                        int* ap = acc_out + row * p.n + col;
                        if (two && acc_pairs) {
                            *reinterpret_cast<int2*>(ap) = make_int2(c0, c1);
                        } else {
                            ap[0] = c0;
                            if (two) ap[1] = c1;
                        }
                    }
                    // ((float) acc * a_scale[m]) * w_scale[n] (+ bias[n]), each op rounded
                    // on its own (no contraction into FMA).
                    float y0 = __fmul_rn(__fmul_rn(__int2float_rn(c0), as), w_scale[col]);
                    float y1 = 0.0f;
                    if (two) y1 = __fmul_rn(__fmul_rn(__int2float_rn(c1), as), w_scale[col + 1]);
                    if (bias != nullptr) {
                        y0 = __fadd_rn(y0, bias[col]);
                        if (two) y1 = __fadd_rn(y1, bias[col + 1]);
                    }
                    store_pair(e, row, col, grow, y0, y1);
                }
            }
    }
}

}  // namespace gemm

// ---------------------------------------------------------- quantization

namespace quant {

// V f32 values p[i*V .. i*V + V) in 16-byte (or, for V = 1, 4-byte) accesses.
template <int V> __device__ __forceinline__ void load_f32s(const float* p, int64_t i, float (&o)[V]) {
    if constexpr (V <= 4) {
        load_f32<V>(p, i, o);
    } else {
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
            float t[4];
            load_f32<4>(p, i * (V / 4) + h, t);
#pragma unroll
            for (int j = 0; j < 4; ++j) o[4 * h + j] = t[j];
        }
    }
}

// x'[j] = x[j] * inv_smooth[i*V + j] (one f32 multiply) when inv_smooth is given.
template <int V>
__device__ __forceinline__ void smooth(float (&v)[V], const float* __restrict__ inv_smooth, int64_t i) {
    if (inv_smooth == nullptr) return;
    float s[V];
    load_f32s<V>(inv_smooth, i, s);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = __fmul_rn(v[j], s[j]);
}

// q[i*V .. i*V + V) = o in one access.
template <int V> __device__ __forceinline__ void store_q(int8_t* q, int64_t i, const int8_t (&o)[V]) {
    if constexpr (V == 1)
        q[i] = o[0];
    else
        store_vec<V>(q, i, o);
}

// clamp(rint(x' * inv), -qmax, qmax), round half to even (NaN -> 0).
__device__ __forceinline__ int8_t quantize1(float v, float inv, int qmax) {
    const int q = __float2int_rn(__fmul_rn(v, inv));
    return static_cast<int8_t>(max(-qmax, min(qmax, q)));
}

// inv = amax > 0 ? qmax / amax : 0; thread 0 stores scale = amax / qmax.
__device__ __forceinline__ float finish_scale(float amax, int qmax, float* scale_out) {
    const float qm = static_cast<float>(qmax);
    if (threadIdx.x == 0) *scale_out = __fdiv_rn(amax, qm);
    return amax > 0.0f ? __fdiv_rn(qm, amax) : 0.0f;
}

// One row: q = quantize(x (* inv_smooth)), V elements per access. Whole block.
template <typename T, int V>
__device__ __forceinline__ void quantize_row(const T* __restrict__ x,
                                             const float* __restrict__ inv_smooth,
                                             int8_t* __restrict__ q, float* scale_out, int cols,
                                             int qmax, float* scratch) {
    const int nv = cols / V;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
        smooth<V>(v, inv_smooth, i);
#pragma unroll
        for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = block_max(amax, scratch);
    const float inv = finish_scale(amax, qmax, scale_out);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        load_f32<V>(x, i, v);
        smooth<V>(v, inv_smooth, i);
        int8_t o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = quantize1(v[j], inv, qmax);
        store_q<V>(q, i, o);
    }
}

template <typename T>
__device__ __forceinline__ void quantize_rows(const QcQuantizeArgs& a) {
    __shared__ float scratch[32];
    constexpr int V = Vec16<T>::N;
    const T* x = dev_ptr<const T>(a.x);
    const float* inv_smooth = dev_ptr<const float>(a.inv_smooth);
    int8_t* q = dev_ptr<int8_t>(a.q);
    float* scale = dev_ptr<float>(a.scale);
    const bool vec = a.cols % V == 0 && a.ldx % V == 0 && a.ldq % V == 0 && aligned16(x) &&
                     aligned16(inv_smooth) && (reinterpret_cast<uintptr_t>(q) % V) == 0;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        if (vec)
            quantize_row<T, V>(x + r * a.ldx, inv_smooth, q + r * a.ldq, scale + r, a.cols, a.qmax,
                               scratch);
        else
            quantize_row<T, 1>(x + r * a.ldx, inv_smooth, q + r * a.ldq, scale + r, a.cols, a.qmax,
                               scratch);
    }
}

// y = LN(x) * (1 + scale) + shift for V elements, with the roundings of
// qc_layernorm_mod_* (bf16: normalised value, 1 + scale, the product and the
// stored result), then x' = y * inv_smooth. Explicitly rounded f32 operations:
// both passes over the row compute bit-identical values.
template <typename T, int V>
__device__ __forceinline__ void ln_mod_values(const T* __restrict__ x, const T* __restrict__ shift,
                                              const T* __restrict__ scale,
                                              const float* __restrict__ inv_smooth, int64_t i,
                                              float mean, float rstd, float (&v)[V]) {
    load_f32<V>(x, i, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = round_to<T>(__fmul_rn(__fsub_rn(v[j], mean), rstd));
    if (scale != nullptr) {
        float s[V];
        load_f32<V>(scale, i, s);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = round_to<T>(__fmul_rn(v[j], round_to<T>(__fadd_rn(1.0f, s[j]))));
    }
    if (shift != nullptr) {
        float s[V];
        load_f32<V>(shift, i, s);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = __fadd_rn(v[j], s[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = round_to<T>(v[j]);  // qc_layernorm_mod_* stores T
    smooth<V>(v, inv_smooth, i);
}

// One row of LayerNorm + modulate + quantize. Whole block; block-uniform.
template <typename T, int V>
__device__ __forceinline__ void layernorm_q8_row(const T* __restrict__ x, int8_t* __restrict__ q,
                                                 float* scale_out, const T* __restrict__ shift,
                                                 const T* __restrict__ scale,
                                                 const float* __restrict__ inv_smooth, int cols,
                                                 float eps, int qmax, float* scratch) {
    const int nv = cols / V;
    float mean, rstd;
    row_mean_rstd<T, V>(x, cols, eps, scratch, mean, rstd);

    float amax = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        ln_mod_values<T, V>(x, shift, scale, inv_smooth, i, mean, rstd, v);
#pragma unroll
        for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = block_max(amax, scratch);
    const float inv = finish_scale(amax, qmax, scale_out);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        ln_mod_values<T, V>(x, shift, scale, inv_smooth, i, mean, rstd, v);
        int8_t o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = quantize1(v[j], inv, qmax);
        store_q<V>(q, i, o);
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_q8(const QcLayerNormQ8Args& a) {
    __shared__ float scratch[32];
    constexpr int V = Vec16<T>::N;
    const T* x = dev_ptr<const T>(a.x);
    int8_t* q = dev_ptr<int8_t>(a.q);
    float* q_scale = dev_ptr<float>(a.q_scale);
    const T* shift = dev_ptr<const T>(a.shift);
    const T* scale = dev_ptr<const T>(a.scale);
    const int* group_index = dev_ptr<const int>(a.group_index);
    const float* inv_smooth = dev_ptr<const float>(a.inv_smooth);
    const bool vec = a.cols % V == 0 && a.x_row_stride % V == 0 && a.q_row_stride % V == 0 &&
                     a.shift_stride % V == 0 && a.scale_stride % V == 0 && aligned16(x) &&
                     aligned16(shift) && aligned16(scale) && aligned16(inv_smooth) &&
                     (reinterpret_cast<uintptr_t>(q) % V) == 0;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const int64_t g = r / a.group_size;
        const int64_t e = group_index != nullptr ? static_cast<int64_t>(group_index[g]) : g;
        const T* xr = x + r * a.x_row_stride;
        int8_t* qr = q + r * a.q_row_stride;
        const T* sh = shift != nullptr ? shift + e * a.shift_stride : nullptr;
        const T* sc = scale != nullptr ? scale + e * a.scale_stride : nullptr;
        if (vec)
            layernorm_q8_row<T, V>(xr, qr, q_scale + r, sh, sc, inv_smooth, a.cols, a.eps, a.qmax,
                                   scratch);
        else
            layernorm_q8_row<T, 1>(xr, qr, q_scale + r, sh, sc, inv_smooth, a.cols, a.eps, a.qmax,
                                   scratch);
    }
}

}  // namespace quant
}  // namespace qc

// out = epilogue(a w^T + bias): bf16 tensor cores, f32 accumulation (launch_cfg::gemm;
// traps unless blockDim = QC_GEMM_THREADS x 1 x 1).
extern "C" __global__ void __launch_bounds__(QC_GEMM_THREADS, 2) qc_gemm_bf16(const QcGemmArgs a) {
    if (blockDim.x != QC_GEMM_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    qc::gemm::gemm_bf16(a);
}
// out = epilogue(acc * a_scale * w_scale + bias), acc = exact int32 a w^T (launch_cfg::gemm;
// traps unless blockDim = QC_GEMM_THREADS x 1 x 1).
extern "C" __global__ void __launch_bounds__(QC_GEMM_THREADS, 2) qc_gemm_w8a8(const QcGemmI8Args a) {
    if (blockDim.x != QC_GEMM_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    qc::gemm::gemm_w8a8(a);
}
// Per-row symmetric int8 quantization of f32 rows (optional smoothing).
extern "C" __global__ void __launch_bounds__(1024) qc_quantize_rows_f32(const QcQuantizeArgs a) {
    qc::quant::quantize_rows<float>(a);
}
// Per-row symmetric int8 quantization of bf16 rows (optional smoothing).
extern "C" __global__ void __launch_bounds__(1024) qc_quantize_rows_bf16(const QcQuantizeArgs a) {
    qc::quant::quantize_rows<qc::bf16>(a);
}
// LayerNorm + modulate (row groups) quantized per row to int8 + scale, f32.
extern "C" __global__ void __launch_bounds__(1024, 1) qc_layernorm_mod_q8_f32(const QcLayerNormQ8Args a) {
    qc::quant::layernorm_q8<float>(a);
}
// LayerNorm + modulate (row groups) quantized per row to int8 + scale, bf16.
extern "C" __global__ void __launch_bounds__(1024, 1) qc_layernorm_mod_q8_bf16(const QcLayerNormQ8Args a) {
    qc::quant::layernorm_q8<qc::bf16>(a);
}
