// gemm_sm90.cu: qc_gemm_bf16_sm90, the bf16 GEMM of gemm.cu (same op, same
// epilogues, QcGemmArgs inside QcGemmSm90Args) on Hopper's warpgroup MMA.
// Layout and launch: qc_types.h (QC_GEMM_SM90_*); host side:
// KernelModule::launch_gemm_bf16 (src/backend/cuda/mod.rs).
//
// Design (sm_90a only; every other target gets a body that traps):
//   - block tile 128 x 128, 2 warpgroups of 4 warps, warpgroup g computing
//     rows 64 g .. 64 g + 63 of the tile with wgmma.m64n128k16 (64 f32
//     accumulators per thread), A and W both read from shared memory;
//   - k-tile = 64 bf16 = 128 bytes per row, brought in by TMA (2-D tiled
//     tensor maps, 128-byte swizzle, zero fill outside M, N and K) into
//     QC_GEMM_SM90_STAGES stages; per stage a "full" mbarrier (TMA bytes
//     landed) and an "empty" one (every warp's wgmmas on it retired);
//   - thread 0 issues the copies STAGES - 1 k-tiles ahead; each warpgroup
//     keeps one k-tile of wgmmas in flight (wait_group 1) and then releases
//     the stage of the previous k-tile for refilling;
//   - epilogue straight from the accumulators through gemm.cu's store_pair:
//     the accumulator layout of m64nNk16 is that of mma.m16n8 per warp.
//   - 96 KiB of shared memory and <= 128 registers: 2 blocks per SM, so one
//     block's epilogue overlaps the other's main loop.
#include "common.cuh"

namespace qc {
namespace gemm_sm90 {

constexpr int BM = QC_GEMM_SM90_BM;
constexpr int BN = QC_GEMM_SM90_BN;
constexpr int BK = QC_GEMM_SM90_BK;
constexpr int THREADS = QC_GEMM_SM90_THREADS;
constexpr int STAGES = QC_GEMM_SM90_STAGES;
constexpr int ROW_BYTES = BK * 2;  // one 128-byte swizzle row per tile row
constexpr int A_BYTES = BM * ROW_BYTES;
constexpr int B_BYTES = BN * ROW_BYTES;
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int WG_ROWS = 64;  // rows of the tile per warpgroup (wgmma M)
static_assert(ROW_BYTES == 128, "the 128-byte swizzle spans exactly one k-tile row");
static_assert(THREADS == 256 && BM == 2 * WG_ROWS && BN == 128, "2 warpgroups of m64n128");
static_assert(STAGES * STAGE_BYTES + 1024 == QC_GEMM_SM90_SMEM_BYTES, "QC_GEMM_SM90_SMEM_BYTES");
static_assert(A_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzle atoms 1 KiB aligned");

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// ------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the TMA unit (the async proxy).
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` of TMA transactions on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase with the given parity (0 or 1) has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// The box at (element k, row) of the tensor map at generic address `map`
// -> shared memory at dst; completes `bar`'s transactions.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const QcTensorMap* map, uint32_t bar,
                                            int k, int row) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row)
        : "memory");
}

__device__ __forceinline__ void tma_prefetch_map(const QcTensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// wgmma shared-memory matrix descriptor of a K-major tile whose rows are 128
// bytes, 8-row groups 1024 bytes apart, 128-byte swizzled (the layout TMA
// writes with CU_TENSOR_MAP_SWIZZLE_128B into a 1 KiB aligned buffer):
// bits 0-13 start address >> 4, 16-29 leading byte offset >> 4 (unused by
// swizzled K-major layouts; 1 by convention), 32-45 stride byte offset >> 4
// (1024: between 8-row groups), 49-51 base offset (0: atoms 1 KiB aligned),
// 62-63 layout (1 = 128-byte swizzle).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
           (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across the
// asynchronous wgmma (issue .. wait) window.
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 128, f32) = a (64 x 16, K-major) * b (128 x 16, K-major)^T (+ d
// when accumulate != 0), bf16 operands from shared memory.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// ------------------------------------------------------------------ GEMM

__device__ __forceinline__ void run(const QcGemmSm90Args& p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t bars[2 * STAGES];  // full[STAGES], empty[STAGES]
    const QcGemmArgs& g = p.gemm;
    // The swizzle pattern repeats every 1 KiB of shared address: stages start there.
    const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars));
    const uint32_t empty0 = full0 + 8 * STAGES;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int wg = tid >> 7;            // warpgroup: rows 64 wg .. of the tile
    const int wg_warp = (tid >> 5) & 3;  // warp inside the warpgroup: 16 rows each

    const int64_t tiles_m = (g.m + BM - 1) / BM;
    const int64_t tiles_n = (g.n + BN - 1) / BN;
    const int64_t tiles = tiles_m * tiles_n;
    const int ktiles = static_cast<int>((g.k + BK - 1) / BK);

    if (tid == 0) {
        tma_prefetch_map(&p.a_map);
        tma_prefetch_map(&p.w_map);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);   // thread 0's arrive.expect_tx
            mbar_init(empty0 + 8 * s, 8);  // lane 0 of each of the 8 warps
        }
        mbar_init_fence();
    }
    __syncthreads();

    // k-tiles are counted across this block's output tiles (q): k-tile q uses
    // stage q % STAGES and completes phase q / STAGES of its full barrier;
    // every warp releases it once (empty barrier, same phase number) when its
    // wgmmas on it have retired. Only thread 0 loads.
    auto load = [&](uint32_t q, int kt, int bm, int bn) {
        const int stage = static_cast<int>(q % STAGES);
        // The stage's previous k-tile (q - STAGES) released by all 8 warps.
        if (q >= STAGES) mbar_wait(empty0 + 8 * stage, (q / STAGES - 1) & 1u);
        const uint32_t bar = full0 + 8 * stage;
        const uint32_t dst = smem + stage * STAGE_BYTES;
        mbar_arrive_expect_tx(bar, STAGE_BYTES);  // out-of-bounds fill counts too
        tma_load_2d(dst, &p.a_map, bar, kt * BK, bm);
        tma_load_2d(dst + A_BYTES, &p.w_map, bar, kt * BK, bn);
    };
    // The first STAGES - 1 k-tiles of tile t (its first k-tile is number q0).
    auto prologue = [&](int64_t t, uint32_t q0) {
        int64_t tm, tn;
        gemm::tile_coords(t, tiles_m, tiles_n, tm, tn);
        for (int s = 0; s < STAGES - 1 && s < ktiles; ++s)
            load(q0 + s, s, static_cast<int>(tm * BM), static_cast<int>(tn * BN));
    };

    const float* __restrict__ bias = dev_ptr<const float>(g.bias);
    const gemm::Epi e{g.epilogue, dev_ptr<const float>(g.gate), dev_ptr<const int>(g.group_index),
                      g.gate_stride, g.group_size, dev_ptr<const bf16>(g.residual), g.ldr,
                      dev_ptr<bf16>(g.out), g.ldo, g.n};
    uint32_t q0 = 0;  // number of this tile's first k-tile
    if (tid == 0 && blockIdx.x < tiles) prologue(blockIdx.x, 0);
    __syncwarp();  // warp 0 converged again for the .aligned wgmma instructions
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        int64_t tm, tn;
        gemm::tile_coords(t, tiles_m, tiles_n, tm, tn);
        const int bm = static_cast<int>(tm * BM), bn = static_cast<int>(tn * BN);

        float acc[64];
        for (int kt = 0; kt < ktiles; ++kt) {
            const uint32_t q = q0 + kt;
            const int stage = static_cast<int>(q % STAGES);
            mbar_wait(full0 + 8 * stage, (q / STAGES) & 1u);
            const uint32_t a_tile = smem + stage * STAGE_BYTES + wg * WG_ROWS * ROW_BYTES;
            const uint32_t b_tile = smem + stage * STAGE_BYTES + A_BYTES;
            fence_acc(acc);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BK / 16; ++ks)  // k16 step ks: 32 bytes into each swizzled row
                wgmma_m64n128k16(acc, smem_desc(a_tile + 32 * ks), smem_desc(b_tile + 32 * ks),
                                 kt > 0 || ks > 0);  // the tile's first step overwrites acc
            wgmma_commit();
            wgmma_wait<1>();  // k-tile q - 1's wgmmas have retired: release its stage
            fence_acc(acc);
            if (kt > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((q - 1) % STAGES));
            if (tid == 0 && kt + STAGES - 1 < ktiles) load(q + STAGES - 1, kt + STAGES - 1, bm, bn);
            __syncwarp();
        }
        wgmma_wait<0>();
        fence_acc(acc);
        const uint32_t q_last = q0 + ktiles - 1;
        if (lane == 0) mbar_arrive(empty0 + 8 * (q_last % STAGES));
        q0 += ktiles;
        // The next tile's first k-tiles load while this one's epilogue runs.
        if (tid == 0 && t + gridDim.x < tiles) prologue(t + gridDim.x, q0);
        __syncwarp();

        // Accumulator 4 j + r: row 16 wg_warp + lane / 4 + 8 (r >= 2) of the
        // warpgroup's 64, column 8 j + 2 (lane % 4) + (r & 1).
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t row = bm + wg * WG_ROWS + wg_warp * 16 + (lane >> 2) + 8 * h;
            if (row >= g.m) continue;
            const float* grow = gemm::gate_row(e, row);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int64_t col = bn + j * 8 + 2 * (lane & 3);
                if (col >= g.n) continue;
                float y0 = acc[4 * j + 2 * h], y1 = acc[4 * j + 2 * h + 1];
                if (bias != nullptr) {
                    y0 += bias[col];
                    if (col + 1 < g.n) y1 += bias[col + 1];
                }
                gemm::store_pair(e, row, col, grow, y0, y1);
            }
        }
    }
}

#endif  // sm_90a

}  // namespace gemm_sm90
}  // namespace qc

// out = epilogue(a w^T + bias) as qc_gemm_bf16, on wgmma + TMA (launch_cfg::gemm_sm90;
// traps unless blockDim = QC_GEMM_SM90_THREADS x 1 x 1, and on anything but sm_90a).
extern "C" __global__ void __launch_bounds__(QC_GEMM_SM90_THREADS, 2)
    qc_gemm_bf16_sm90(const __grid_constant__ QcGemmSm90Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (blockDim.x != QC_GEMM_SM90_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    qc::gemm_sm90::run(a);
#else
    __trap();
#endif
}
