/*
 * qc_types.h: every struct shared between the CUDA kernels (kernels/*.cu)
 * and Rust (src/backend/cuda, through bindgen -> $OUT_DIR/qc_types.rs).
 *
 * Rules for this header:
 *   - plain C, #include <stdint.h> only: it is parsed by nvcc (C++) and by
 *     libclang (C) for bindgen;
 *   - fixed-width integer types only, fields ordered so that there is no
 *     implicit padding (explicit _pad fields instead), so the layout is the
 *     same everywhere (bindgen emits layout assertions);
 *   - device addresses are qc_dptr (a CUdeviceptr, 0 = null), never C
 *     pointers, so the Rust structs are plain Copy data;
 *   - element counts and strides are in elements of the kernel's dtype
 *     (T = float for *_f32 kernels, bf16 for *_bf16 kernels), not bytes.
 *
 * Every kernel takes exactly one of these structs by value. Unless a kernel
 * says otherwise: blockDim.x must be a multiple of 32 and at most 1024
 * (blockDim.y = blockDim.z = 1), any gridDim.x >= 1 works (kernels loop over
 * their work with a grid stride), and all arithmetic is done in f32. The
 * bf16 kernels round to bf16 wherever the PyTorch reference stores a bf16
 * intermediate, so that they reproduce PyTorch's bf16 results.
 * "Row kernels" process one row per block (grid-stride over rows); a good
 * launch is gridDim.x = min(rows, 65535 or a few blocks per SM) and
 * blockDim.x = 32 * ceil(cols / 32 / VEC) capped to [32, 1024], where VEC is
 * 4 (f32) or 8 (bf16) elements per 16-byte vector.
 */
#ifndef QC_TYPES_H
#define QC_TYPES_H

#include <stdint.h>

/* Bump when any struct below changes layout or meaning. */
#define QC_ABI_VERSION 1

/* A device address (CUdeviceptr). 0 means "absent" where a field allows it. */
typedef uint64_t qc_dptr;

/* ---------------------------------------------------------------- norm.cu */

/*
 * qc_layernorm_mod_{f32,bf16} (row kernel):
 *   for each row r in [0, rows), with b = r / rows_per_sample:
 *     n = (x[r,:] - mean) * rsqrt(var + eps)        (biased var, over cols)
 *     y[r,:] = n * (1 + scale[b,:]) + shift[b,:]
 *   x[r, c] is at x + r * x_row_stride + c (likewise y). shift[b, c] is at
 *   shift + b * shift_stride + c (likewise scale), so shift/scale may point
 *   into a [B, 6, C] modulation table (stride 6*C). shift == 0 skips the
 *   "+ shift" and scale == 0 skips the "* (1 + scale)": both 0 is a plain
 *   LayerNorm without affine. y must not overlap x.
 */
typedef struct QcLayerNormArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr shift;
    qc_dptr scale;
    int64_t rows;
    int64_t x_row_stride;
    int64_t y_row_stride;
    int64_t shift_stride;
    int64_t scale_stride;
    int64_t rows_per_sample; /* >= 1 */
    int32_t cols;
    float eps;
} QcLayerNormArgs;

/*
 * qc_rmsnorm_{f32,bf16} (one warp per row, grid-stride over rows; any
 * block size that is a multiple of 32):
 *   rows are indexed (o, i) for o < n_outer, i < n_inner; the row is
 *   x + o * x_outer_stride + i * x_inner_stride, dim contiguous elements
 *   (likewise y). For q of a [tokens, 3, heads, head_dim] qkv buffer:
 *   n_outer = tokens, n_inner = heads, outer stride 3*C, inner stride head_dim.
 *     y[j] = w[j] * (x[j] * rsqrt(mean(x^2) + eps))   (LlamaRMSNorm; for
 *     bf16 the normalised value is rounded to bf16 before the weight product)
 *   y may equal x (in place) but must not otherwise overlap it.
 */
typedef struct QcRmsNormArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr w; /* [dim] */
    int64_t n_outer;
    int64_t n_inner;
    int64_t x_outer_stride;
    int64_t x_inner_stride;
    int64_t y_outer_stride;
    int64_t y_inner_stride;
    int32_t dim;
    float eps;
} QcRmsNormArgs;

/* ---------------------------------------------------------- elementwise.cu */

/*
 * qc_silu_{f32,bf16}:      y[i] = x[i] / (1 + exp(-x[i]))
 * qc_gelu_tanh_{f32,bf16}: y[i] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *   for i < n (flat, grid-stride). y may equal x.
 */
typedef struct QcUnaryArgs {
    qc_dptr x;
    qc_dptr y;
    int64_t n;
} QcUnaryArgs;

/*
 * qc_add_{f32,bf16}: y[i] = a[i] + b[i] for i < n (flat, grid-stride).
 *   y may equal a and/or b.
 */
typedef struct QcBinaryArgs {
    qc_dptr a;
    qc_dptr b;
    qc_dptr y;
    int64_t n;
} QcBinaryArgs;

/*
 * qc_bias_add_{f32,bf16} (row kernel): y[r, c] = x[r, c] + bias[c],
 *   x and y contiguous [rows, cols], bias [cols]. y may equal x.
 */
typedef struct QcBiasAddArgs {
    qc_dptr x;
    qc_dptr bias;
    qc_dptr y;
    int64_t rows;
    int32_t cols;
    int32_t _pad;
} QcBiasAddArgs;

/*
 * qc_gated_residual_{f32,bf16} (row kernel; the cached-residual reuse op):
 *   x[r, c] += gate[e(r), c] * y[r, c]   (x, y of T; bf16 rounds the product
 *   before the add, as PyTorch's x + gate * y), or x[r, c] += y[r, c] when gate == 0;
 *   e(r) = group_index ? group_index[r / group_size] : r / group_size
 *   (group_index: int32 [ceil(rows / group_size)], the CPU backend's RowGroups);
 *   gate f32 (a modulation table's chunk), gate[e, c] at gate + e * gate_stride + c;
 *   x, y contiguous [rows, cols]. x must not overlap y or gate.
 */
typedef struct QcGatedResidualArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr gate;
    qc_dptr group_index;
    int64_t rows;
    int64_t group_size; /* >= 1 */
    int64_t gate_stride;
    int32_t cols;
    int32_t _pad;
} QcGatedResidualArgs;

/* ------------------------------------------------------------------ rope.cu */

/*
 * qc_rope_{f32,bf16} (row kernel over the batch * seq rows, threads over
 * heads * head_dim/2 pairs): rotary embedding in place, GPT-J interleaved
 * pairs as rotary_embedding_torch 0.5.3 applies it, position p = seq index:
 *   a = p * freqs[k]
 *   out[2k]   = x[2k]   cos a - x[2k+1] sin a
 *   out[2k+1] = x[2k+1] cos a + x[2k]   sin a
 *   element j of (batch n, position p, head h) is at
 *   x + n * batch_stride + p * seq_stride + h * head_stride + j.
 *   freqs: f32 [head_dim / 2]. head_dim must be even.
 */
typedef struct QcRopeArgs {
    qc_dptr x;
    qc_dptr freqs;
    int64_t batch;
    int64_t batch_stride;
    int64_t seq_stride;
    int64_t head_stride;
    int32_t seq;
    int32_t heads;
    int32_t head_dim;
    int32_t _pad;
} QcRopeArgs;

/* ----------------------------------------------------------------- embed.cu */

/*
 * qc_timestep_embed_{f32,bf16} (flat over n * dim, grid-stride):
 *   half = dim / 2, f_i = exp(-ln(max_period) * i / half),
 *   out[r, :] = [cos(t[r] f_0 .. t[r] f_{half-1}), sin(...), (0 if dim odd)]
 *   t: f32 [n]; out: [n, dim]. Open-Sora uses dim 256, max_period 10000.
 */
typedef struct QcTimestepEmbedArgs {
    qc_dptr t;
    qc_dptr out;
    int64_t n;
    int32_t dim;
    float max_period;
} QcTimestepEmbedArgs;

/*
 * qc_mask_select_{f32,bf16} (row kernel):
 *   out[r, :] = mask[r / rows_per_mask] ? a[r, :] : b[r, :]
 *   a, b, out contiguous [rows, cols]; mask: uint8 (nonzero = true).
 *   For x_mask [B, T] over [B, T, S, C]: rows = B*T*S, rows_per_mask = S.
 *   out may equal a or b.
 */
typedef struct QcMaskSelectArgs {
    qc_dptr a;
    qc_dptr b;
    qc_dptr out;
    qc_dptr mask;
    int64_t rows;
    int64_t rows_per_mask; /* >= 1 */
    int32_t cols;
    int32_t _pad;
} QcMaskSelectArgs;

/* ------------------------------------------------------------ tensor_ops.cu */

/*
 * qc_copy_rows_{f32,bf16} (row kernel): for r < rows,
 *   s = index ? index[r] : (swap_b ? swap(r) : r)
 *   y[r * ldy + y_col + j] = x[s * ldx + x_col + j]   for j < cols
 *   swap(r): the row map of [a, b, c, d] -> [a, c, b, d] (rows = a*b*c, output
 *   row r = (ai, ci, bi)): s = (ai * swap_b + bi) * swap_c + ci with
 *   swap_b = b, swap_c = c. index: int32 [rows].
 *   One kernel for split_last (x_col = i * part), narrow, concat (y_col or
 *   row offsets in y), gather_rows (index) and swap_middle. y must not overlap x.
 */
typedef struct QcCopyRowsArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr index;
    int64_t rows;
    int64_t ldx;
    int64_t ldy;
    int64_t x_col;
    int64_t y_col;
    int64_t swap_b;
    int64_t swap_c;
    int32_t cols;
    int32_t _pad;
} QcCopyRowsArgs;

/*
 * qc_cast_f32_bf16 / qc_cast_bf16_f32 (QcUnaryArgs, flat): y[i] = x[i]
 *   converted (to bf16: round to nearest even). y must not overlap x.
 */

/*
 * qc_modulation_table_{f32,bf16} (flat over entries * chunks * c; the suffix
 *   is emb's dtype, table and out are f32):
 *   out[e, j, i] = table[j, i] + (emb_width == c ? emb[e, i] : emb[e, j * c + i])
 *   table: [chunks, c] (scale_shift_table), emb: [entries, emb_width] with
 *   emb_width = chunks * c (t_block output) or c (the final layer's t).
 */
typedef struct QcModulationTableArgs {
    qc_dptr table;
    qc_dptr emb;
    qc_dptr out;
    int64_t entries;
    int32_t chunks;
    int32_t c;
    int64_t emb_width;
} QcModulationTableArgs;

/*
 * qc_add_rows_broadcast_{f32,bf16} (row kernel): x[r, :] += table[r % table_rows, :]
 *   for r < rows (the position embedding over every frame of every sample);
 *   x: [rows, cols] of the suffix dtype, table: f32 [table_rows, cols].
 */
typedef struct QcAddRowsBroadcastArgs {
    qc_dptr x;
    qc_dptr table;
    int64_t rows;
    int64_t table_rows;
    int32_t cols;
    int32_t _pad;
} QcAddRowsBroadcastArgs;

/*
 * qc_cfg_euler_f32 (flat over batch * per_sample): classifier-free guidance
 *   and the Euler update of the rectified-flow sampler, fused, all f32:
 *   c = pred[b * per_sample + i], u = pred[(batch + b) * per_sample + i]
 *   v = u + scale * (c - u);  z[b * per_sample + i] += v * dt[b]
 *   pred: [2 * batch, per_sample] (conditional half first), dt: [batch].
 *   v_out, when nonzero, receives v ([batch, per_sample]; step reuse needs it).
 */
typedef struct QcCfgEulerArgs {
    qc_dptr z;
    qc_dptr pred;
    qc_dptr dt;
    qc_dptr v_out;
    int64_t batch;
    int64_t per_sample;
    float scale;
    int32_t _pad;
} QcCfgEulerArgs;

/*
 * Patch geometry shared by qc_patchify_* and qc_unpatchify_*: a video
 * [batch, channels, t, h, w] cut into pt x ph x pw patches, zero-padded at
 * the end of each axis to nt = ceil(t / pt), nh, nw patches.
 *
 * qc_patchify_{f32,bf16} (flat over tokens * channels*pt*ph*pw; the suffix is
 *   the output dtype, x is f32): token (bi, ti, hi, wi) = ((bi * nt + ti) * nh
 *   + hi) * nw + wi, patch vector ordered (c, a, b, d) like a Conv3d weight:
 *   y[tok, ((c * pt + a) * ph + b) * pw + d] = x[bi, c, ti*pt + a, hi*ph + b, wi*pw + d]
 *   or 0 outside the video.
 * qc_unpatchify_{f32,bf16} (flat over batch * keep_channels * t * h * w; the
 *   suffix is the input dtype, y is f32): the inverse for token vectors of
 *   pt*ph*pw*channels laid out (a, b, d, c), cropped to t x h x w, writing
 *   only channels c < keep_channels (pred_sigma's velocity half):
 *   y[bi, c, tt, hh, ww] = x[tok, ((a * ph + b) * pw + d) * channels + c]
 */
typedef struct QcPatchArgs {
    qc_dptr x;
    qc_dptr y;
    int64_t batch;
    int32_t channels;
    int32_t keep_channels;
    int32_t t;
    int32_t h;
    int32_t w;
    int32_t pt;
    int32_t ph;
    int32_t pw;
} QcPatchArgs;

/* -------------------------------------------------------- executor_ops.cu */

/*
 * Small elementwise ops of the CUDA backend (src/backend/cuda/executor_ops.rs)
 * that the kernels above do not cover. Flat, grid-stride, one element per
 * thread-iteration (launch_cfg::flat_scalar), no alignment requirements;
 * every f32 operation is rounded on its own (no FMA contraction), in the CPU
 * backend's order, so the f32 variants match it bit for bit.
 *
 * qc_mul_{f32,bf16} (QcBinaryArgs): y[i] = a[i] * b[i] for i < n.
 *   y may equal a and/or b.
 *
 * qc_guidance_{f32,bf16}: classifier-free guidance,
 *   y[i] = uncond[i] + scale * (cond[i] - uncond[i])   for i < n.
 *   y may equal cond and/or uncond.
 */
typedef struct QcGuidanceArgs {
    qc_dptr cond;
    qc_dptr uncond;
    qc_dptr y;
    int64_t n;
    float scale;
    int32_t _pad;
} QcGuidanceArgs;

/*
 * qc_axpby_{f32,bf16}: out[i] = a * x[i] + b * y[i] for i < n (the CPU's
 *   order: two products, then the sum, each rounded). out may equal x and/or y.
 */
typedef struct QcAxpbyArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr out;
    int64_t n;
    float a;
    float b;
} QcAxpbyArgs;

/*
 * qc_euler_f32: the sampler's Euler step, all f32:
 *   z[i] += v[i] * dt[i / per_sample]   for i < n (z, v: [n]; dt: [n / per_sample]).
 *   z must not overlap v or dt.
 */
typedef struct QcEulerArgs {
    qc_dptr z;
    qc_dptr v;
    qc_dptr dt;
    int64_t n;
    int64_t per_sample; /* >= 1 */
} QcEulerArgs;

/* ------------------------------------------------------------------ gemm.cu */

/* Epilogues fused into every GEMM (QcGemmArgs / QcGemmI8Args / QcGemmW4Args .epilogue). */
#define QC_EPI_NONE 0
#define QC_EPI_GELU_TANH 1      /* out = gelu_tanh(y) */
#define QC_EPI_GATED_RESIDUAL 2 /* out = residual + gate[e(m), :] * y */

/*
 * qc_gemm_bf16 (tensor cores, f32 accumulation), out = epilogue(y):
 *   y[m, n] = sum_k a[m, k] * w[n, k]  (+ bias[n] when bias != 0)
 *   a: bf16 [M, K], row m at a + m * lda; w: bf16 [N, K] (PyTorch's Linear
 *   weight, row-major), row n at w + n * ldw; bias: f32 [N];
 *   out: bf16, row m at out + m * ldo.
 *   QC_EPI_GATED_RESIDUAL: out[m, n] = residual[m, n] + gate[e(m), n] * y[m, n]
 *     with residual row m at residual + m * ldr (residual may equal out: the
 *     in-place residual update of a DiT block), gate f32 with entry e at
 *     gate + e * gate_stride (a chunk of the [E, 6, C] modulation table), and
 *     e(m) = group_index ? group_index[m / group_size] : m / group_size
 *     (group_index: int32 [ceil(M / group_size)]; the CPU backend's RowGroups).
 *   Requirements: M, N, K >= 1; K, lda, ldw, ldo, ldr multiples of 8; a, w,
 *   out, residual 16-byte aligned. Launch: see launch_cfg::gemm (1-D grid over
 *   output tiles, dynamic shared memory).
 *   gate == 0 with QC_EPI_GATED_RESIDUAL means a gate of 1 (out = residual + y).
 *   y is kept in f32 through the epilogue; out is rounded to bf16 once.
 */
/*
 * Tiling of qc_gemm_bf16 and qc_gemm_w8a8 (kernels/gemm.cu; the host's
 * launch_cfg::gemm reads the same numbers): QC_GEMM_BM x QC_GEMM_BN output
 * tiles, one per block of QC_GEMM_THREADS threads, numbered t = 0 ..
 * tiles_m * tiles_n - 1 in groups of QC_GEMM_GROUP_M tile rows (tile row
 * first_m + r % rows_in_group, tile column r / rows_in_group, r = t % (GROUP_M
 * * tiles_n)), blocks looping over tiles with a grid stride. Each k-tile is
 * 64 bytes of every row (32 bf16 or 64 int8), QC_GEMM_STAGES k-tiles in
 * flight: QC_GEMM_SMEM_BYTES = STAGES * (BM + BN) * 64 bytes of dynamic
 * shared memory.
 */
#define QC_GEMM_BM 128
#define QC_GEMM_BN 128
#define QC_GEMM_THREADS 256
#define QC_GEMM_GROUP_M 8
#define QC_GEMM_STAGES 3
#define QC_GEMM_SMEM_BYTES 49152

typedef struct QcGemmArgs {
    qc_dptr a;
    qc_dptr w;
    qc_dptr bias;
    qc_dptr out;
    qc_dptr residual;
    qc_dptr gate;
    qc_dptr group_index;
    int64_t m;
    int64_t n;
    int64_t k;
    int64_t lda;
    int64_t ldw;
    int64_t ldo;
    int64_t ldr;
    int64_t gate_stride;
    int64_t group_size; /* >= 1 */
    int32_t epilogue;   /* QC_EPI_* */
    int32_t _pad;
} QcGemmArgs;

/*
 * qc_gemm_bf16_sm90 (kernels/gemm_sm90.cu; sm_90a only, traps elsewhere): the
 * same op, requirements and epilogues as qc_gemm_bf16 on Hopper's wgmma, its
 * operands brought in by the tensor memory accelerator (TMA). a_map and w_map
 * are CUtensorMaps (cuTensorMapEncodeTiled) of a and w as given in gemm:
 * bf16, rank 2, dims {K, M} / {K, N}, row strides lda * 2 / ldw * 2 bytes,
 * box {QC_GEMM_SM90_BK, QC_GEMM_SM90_BM} / {QC_GEMM_SM90_BK, QC_GEMM_SM90_BN},
 * 128-byte swizzle, out-of-bounds elements filled with zeros (the M, N and K
 * edges). The host's encoder is KernelModule::launch_gemm_bf16 (src/backend/
 * cuda/mod.rs). Launch: launch_cfg::gemm_sm90 (one block of
 * QC_GEMM_SM90_THREADS per output tile, numbered as for qc_gemm_bf16 with
 * QC_GEMM_GROUP_M; QC_GEMM_SM90_SMEM_BYTES of dynamic shared memory:
 * QC_GEMM_SM90_STAGES k-tiles of A and W plus 1 KiB to align them to 1 KiB).
 */
#define QC_GEMM_SM90_BM 128
#define QC_GEMM_SM90_BN 128
#define QC_GEMM_SM90_BK 64
#define QC_GEMM_SM90_THREADS 256
#define QC_GEMM_SM90_STAGES 3
#define QC_GEMM_SM90_SMEM_BYTES 99328

/* A CUtensorMap: 128 opaque bytes, 64-byte aligned as the driver requires. */
typedef struct QcTensorMap {
    uint64_t opaque[16];
} __attribute__((aligned(64))) QcTensorMap;

typedef struct QcGemmSm90Args {
    QcTensorMap a_map;
    QcTensorMap w_map;
    QcGemmArgs gemm;
    uint8_t _pad[56]; /* sizeof a multiple of the 64-byte alignment */
} QcGemmSm90Args;

/*
 * Symmetric per-token activation quantization (A8: qmax = 127; A6: qmax = 31,
 * values held in int8). The CPU backend (src/quant/int8.rs) implements the
 * same formulas with the same f32 operations, so both produce the same int8
 * values and scales from the same f32 inputs:
 *   x'[k]  = inv_smooth ? x[k] * inv_smooth[k] : x[k]       (one f32 multiply)
 *   amax   = max_k |x'[k]|
 *   scale  = amax / qmax                                     (f32 division)
 *   inv    = amax > 0 ? qmax / amax : 0                      (f32 division)
 *   q[k]   = clamp(rint(x'[k] * inv), -qmax, qmax)           (round half to even)
 * so x'[k] ~ q[k] * scale. inv_smooth is the inverse of the importance /
 * smoothing vector s that was folded into the weights (W'[n, k] = W[n, k] * s[k]).
 *
 * qc_quantize_rows_{f32,bf16} (row kernel): row r of x (x + r * ldx, cols
 *   elements) -> q (int8, q + r * ldq) and scale[r] (f32).
 */
typedef struct QcQuantizeArgs {
    qc_dptr x;
    qc_dptr inv_smooth; /* f32 [cols] or 0 */
    qc_dptr q;
    qc_dptr scale;
    int64_t rows;
    int64_t ldx;
    int64_t ldq;
    int32_t cols;
    int32_t qmax; /* 127 or 31 */
} QcQuantizeArgs;

/*
 * qc_gemm_w8a8 (int8 tensor cores, exact int32 accumulation):
 *   acc[m, n] = sum_k (int32) a[m, k] * (int32) w[n, k]      (exact: K < 2^17)
 *   y[m, n]   = ((float) acc * a_scale[m]) * w_scale[n]  (+ bias[n] when bias != 0)
 *   out = epilogue(y) as in qc_gemm_bf16, out and residual bf16.
 *   a: int8 [M, K] rows lda apart with a_scale f32 [M] (qc_quantize_rows or a
 *   quantizing producer); w: int8 [N, K] rows ldw apart with w_scale f32 [N]
 *   (per output channel, quantized offline). acc_out: when nonzero, int32
 *   [M, N] (row m at acc_out + m * n) also receives acc, so tests can compare
 *   the integer products with the CPU exactly.
 *   Requirements: K, lda, ldw multiples of 16; ldo, ldr multiples of 8; a, w,
 *   out, residual 16-byte aligned.
 */
typedef struct QcGemmI8Args {
    qc_dptr a;
    qc_dptr a_scale;
    qc_dptr w;
    qc_dptr w_scale;
    qc_dptr bias;
    qc_dptr out;
    qc_dptr residual;
    qc_dptr gate;
    qc_dptr group_index;
    qc_dptr acc_out;
    int64_t m;
    int64_t n;
    int64_t k;
    int64_t lda;
    int64_t ldw;
    int64_t ldo;
    int64_t ldr;
    int64_t gate_stride;
    int64_t group_size; /* >= 1 */
    int32_t epilogue;   /* QC_EPI_* */
    int32_t _pad;
} QcGemmI8Args;

/*
 * W4 weights (packed int4, the 4-bit AIGQ format; CPU kernels in
 * src/quant/int4.rs, which reads QC_W4_GROUP and QC_W4_QMAX from here):
 *   q[n, k] in [-7, 7] (-8 unused: symmetric), stored as q + 8 in one nibble,
 *   two per byte: byte j of row n (rows ceil(K / 2) bytes apart) holds
 *   k = 2j in bits 0-3 and k = 2j + 1 in bits 4-7; an odd K pads the last
 *   high nibble with 8 (zero).
 *   w_scale: f32 [N, ceil(K / QC_W4_GROUP)], one per output channel and group
 *   of QC_W4_GROUP consecutive inputs (one int8 k-tile of qc_gemm_w8a8):
 *     W'[n, k] ~ q[n, k] * w_scale[n, k / QC_W4_GROUP]
 *   (the engine's quantizer takes w_scale = clip * amax / 7 with the clip of
 *   {1, 0.95, ..., 0.7} of least squared error; the kernels take any scale)
 *   with W' = W * s when an importance / smoothing vector s is folded in; the
 *   activations are quantized with inv_smooth = 1 / s exactly as for W8A8
 *   (QcQuantizeArgs, A8 or A6).
 *   Product: exact int32 per group, then f32 across groups in group order:
 *     acc[m, n, g] = sum_{k in group g} (int32) a[m, k] * (int32) q[n, k]
 *     sum = 0; for g = 0, 1, ...: sum = fmaf((float) acc[m, n, g], w_scale[n, g], sum)
 *     y[m, n] = sum * a_scale[m]  (+ bias[n])
 */
#define QC_W4_GROUP 64
#define QC_W4_QMAX 7

/*
 * qc_gemm_w4a8 (kernels/gemm_w4.cu; int8 tensor cores, W4 weights widened to
 * int8 in registers; A8 and A6 alike: the activations' qmax only matters when
 * they are quantized): the W4 product above with qc_gemm_w8a8's epilogues,
 *   acc[m, n, g] = sum_{k in group g} (int32) a[m, k] * (int32) q[n, k]   (exact)
 *   s = 0; for g = 0 .. K/64 - 1: s = fmaf((float) acc[m, n, g], w_scale[n, g], s)
 *   y[m, n] = s * a_scale[m]  (+ bias[n] when bias != 0), each op rounded on its own
 *   out = epilogue(y) as in qc_gemm_bf16, out and residual bf16;
 * the same f32 operations in the same order as the CPU (src/quant/int4.rs), so
 * y matches it bit for bit (only the epilogue's GELU / gate and the bf16
 * rounding can differ).
 *   a: int8 [M, K] rows lda apart, a_scale f32 [M] (qc_quantize_rows or a
 *   quantizing producer). w: the W4 weight in the device layout below, row n
 *   at w + n * ldw (bytes); w_scale: f32 [N, K / 64] (row n at
 *   w_scale + n * K / 64). acc_out: when nonzero, int32 [K / 64, M, N]
 *   (acc[m, n, g] at acc_out + (g * M + m) * N + n) also receives the
 *   per-group integer products, so tests can compare them with the CPU exactly.
 *   Device layout of w (the packed format above with the nibbles of every
 *   4-byte word reordered, so that a mask gives four consecutive k; made on the
 *   host by backend::cuda::w4_device_layout): row n holds K / 2 bytes; word j
 *   (bytes 4j .. 4j + 3) holds k = 8j .. 8j + 7, byte 4j + i (i < 4) holding
 *   q[n, 8j + i] + 8 in its high nibble and q[n, 8j + 4 + i] + 8 in its low one.
 *   Requirements (KernelModule::launch_gemm_w4a8 checks them): M, N >= 1; K a
 *   multiple of 64 (zero-pad a and w, q = 0 i.e. nibble 8, to whole groups;
 *   w_scale keeps its ceil(K / 64) groups); lda, ldw multiples of 16 with
 *   lda >= K, ldw >= K / 2; ldo, ldr multiples of 8; a, w, out, residual
 *   16-byte aligned. Launch: launch_cfg::gemm_w4a8 (QC_GEMM_BM x QC_GEMM_BN
 *   tiles numbered as for qc_gemm_bf16, QC_GEMM_THREADS threads, one 64-input
 *   group per k-tile, QC_GEMM_W4_STAGES k-tiles in flight:
 *   QC_GEMM_W4_SMEM_BYTES = STAGES * (BM * 64 + BN * 32 + BN * 4) bytes of
 *   dynamic shared memory; about 150 registers a thread: one block per SM).
 *   The kernel traps unless blockDim = QC_GEMM_THREADS x 1 x 1 and K % 64 == 0.
 */
#define QC_GEMM_W4_STAGES 4
#define QC_GEMM_W4_SMEM_BYTES 51200

typedef struct QcGemmW4Args {
    qc_dptr a;
    qc_dptr a_scale;
    qc_dptr w;
    qc_dptr w_scale;
    qc_dptr bias;
    qc_dptr out;
    qc_dptr residual;
    qc_dptr gate;
    qc_dptr group_index;
    qc_dptr acc_out;
    int64_t m;
    int64_t n;
    int64_t k;
    int64_t lda;
    int64_t ldw; /* bytes */
    int64_t ldo;
    int64_t ldr;
    int64_t gate_stride;
    int64_t group_size; /* >= 1 */
    int32_t epilogue;   /* QC_EPI_* */
    int32_t _pad;
} QcGemmW4Args;

/*
 * qc_layernorm_mod_q8_{f32,bf16} (row kernel): LayerNorm + modulate as
 * qc_layernorm_mod_{f32,bf16} computes it (same roundings for bf16, the row's
 * result rounded to T as that kernel stores it), quantized per row with the
 * formulas above (optional inv_smooth, qmax 127 or 31) instead of stored:
 *   y[r, :]  = LN(x[r, :]) * (1 + scale[e(r), :]) + shift[e(r), :]
 *   q[r, :], q_scale[r] = quantize(y[r, :])
 *   e(r) = group_index ? group_index[r / group_size] : r / group_size
 *   (group_index: int32 [ceil(rows / group_size)], the CPU backend's RowGroups).
 *   x[r, c] at x + r * x_row_stride + c (T); q[r, c] at q + r * q_row_stride + c
 *   (int8); q_scale f32 [rows]; shift[e, c] at shift + e * shift_stride + c
 *   (T, likewise scale; 0 skips the term as in QcLayerNormArgs); inv_smooth
 *   f32 [cols] or 0.
 */
typedef struct QcLayerNormQ8Args {
    qc_dptr x;
    qc_dptr q;
    qc_dptr q_scale;
    qc_dptr shift;
    qc_dptr scale;
    qc_dptr group_index;
    qc_dptr inv_smooth;
    int64_t rows;
    int64_t x_row_stride;
    int64_t q_row_stride;
    int64_t shift_stride;
    int64_t scale_stride;
    int64_t group_size; /* >= 1 */
    int32_t cols;
    float eps;
    int32_t qmax; /* 127 or 31 */
    int32_t _pad;
} QcLayerNormQ8Args;

/* ------------------------------------------------------------- attention.cu */

/*
 * qc_attention_d{16,32,64,80,128}_bf16 (flash attention on tensor cores:
 * bf16 q, k, v and out, f32 softmax state and accumulators, no score matrix
 * in memory; the dNN kernel takes any head_dim <= NN, zero-padded to NN in
 * shared memory only: launch the smallest that fits, launch_cfg::attention):
 *   for every group g < groups, head h < heads and query i < q_len:
 *     s_j = scale * q[g, i, h, :] . k[g, j, h, :]      for the keys j < kv_len(g)
 *     out[g, i, h, :] = sum_j softmax(s)_j v[g, j, h, :]
 *   computed as in flash attention: the unnormalised probabilities
 *   exp(s_j - running max) enter P V rounded to bf16, their sum in f32, and
 *   out is divided by that sum at the end; a group without keys
 *   (kv_len(g) = 0) gets zero output rows.
 *
 *   Rows: element d < head_dim of head h in row r of q is at
 *   q + r * ldq + h * head_dim + d (k: ldk, v: ldv, out: ldo), so q, k, v can
 *   be column slices of one [rows, 3 * heads * head_dim] qkv buffer. Query i
 *   of group g is row
 *     R(g, i) = (g / groups_inner) * outer_stride + (g % groups_inner) * inner_stride
 *               + i * seq_stride
 *   of q, and its result goes to row R(g, i) of out.
 *   Keys and values of group g:
 *     kv_start == 0 (self-attention): kv_len = q_len, key/value j is row R(g, j)
 *       of k / v (the same layout as the queries);
 *     kv_start != 0 (then kv_end too; int32 device arrays [groups]): key/value j
 *       is row kv_start[g] + j of k / v, kv_len(g) = max(0, kv_end[g] - kv_start[g]).
 *   RoPE (rope_freqs != 0, f32 [head_dim / 2]): q and k are rotated as they are
 *   loaded, exactly as qc_rope does in place (GPT-J interleaved pairs, products
 *   and sum rounded separately, result rounded to bf16), with position i for
 *   query i and j for key j (the index within the group's sequence).
 *   With C = heads * head_dim, B samples of T frames of S tokens (rows
 *   frame-major: row (b * T + t) * S + s) and a qkv buffer [B*T*S, 3C]
 *   (q = qkv, k = qkv + C, v = qkv + 2C, ldq = ldk = ldv = 3C):
 *     spatial:  groups = B*T, q_len = S, groups_inner = 1, outer_stride = S,
 *               inner_stride = 0, seq_stride = 1;
 *     temporal: groups = B*S, q_len = T, groups_inner = S, outer_stride = T*S,
 *               inner_stride = 1, seq_stride = S (RoPE over t);
 *     cross:    groups = B, q_len = T*S, groups_inner = 1, outer_stride = T*S,
 *               inner_stride = 0, seq_stride = 1, kv_start/kv_end = each
 *               sample's caption token rows of k, v [tokens, C].
 *   Requirements: head_dim a multiple of 8 in [8, 128]; groups_inner >= 1;
 *   ldq, ldk, ldv, ldo multiples of 8 and q, k, v, out 16-byte aligned; out
 *   must not overlap k or v, and may coincide with q only exactly (same
 *   addresses: each query row is read before its output row is written).
 *   A launch that breaks a requirement the kernel can see (head_dim, the
 *   alignments, groups_inner) traps.
 *   Launch: blockDim.x = 128 exactly (4 warps, 64 query rows per block;
 *   anything else traps), any gridDim.x >= 1: blocks loop over
 *   ceil(q_len / 64) * heads * groups work items, item w = (tile, head, group)
 *   with tile = w % tiles, head = (w / tiles) % heads, group = w / (tiles * heads).
 *   Static shared memory only (at most 44 KiB: d80).
 */
typedef struct QcAttentionArgs {
    qc_dptr q;
    qc_dptr k;
    qc_dptr v;
    qc_dptr out;
    qc_dptr kv_start;   /* int32 [groups], or 0 for self-attention */
    qc_dptr kv_end;     /* int32 [groups], used when kv_start != 0 */
    qc_dptr rope_freqs; /* f32 [head_dim / 2], or 0 for no RoPE */
    int64_t ldq;
    int64_t ldk;
    int64_t ldv;
    int64_t ldo;
    int64_t outer_stride;
    int64_t inner_stride;
    int64_t seq_stride;
    int32_t groups;
    int32_t groups_inner; /* >= 1 */
    int32_t q_len;
    int32_t heads;
    int32_t head_dim;
    float scale;
} QcAttentionArgs;

/*
 * qc_attention_bias_d{16,32,64,80,128}_bf16: qc_attention_dNN_bf16 (same
 * kernel body, every QcAttentionArgs rule above holds for `attn`) with an
 * additive score bias, T5's relative position bias:
 *     s_j = scale * q[g, i, h, :] . k[g, j, h, :] + bias[h * bias_head_stride + i * bias_ld + j]
 *   for query i < q_len and key j < kv_len(g) (j counts the group's keys from 0,
 *   whatever rows of k they are), shared by all groups (broadcast over the
 *   batch). T5 passes scale 1 (its scores are unscaled) and a [heads, L, L]
 *   table (bias_ld = L, bias_head_stride = L * L); keys past a prompt's length
 *   are left out through kv_start / kv_end, as without a bias.
 *   bias: f32 (the model adds it in f32; bf16 would round T5's biases of
 *   magnitude ~10 by up to 0.03, a few percent of a probability, while the
 *   table is small: 23 MB at 64 heads x 300 x 300, read once per block),
 *   4-byte aligned, finite; any bias_ld >= max kv_len(g) and bias_head_stride.
 *   Only entries with i < q_len and j < kv_len(g) are read. The kernel
 *   starts the q.k accumulation at bias / scale (exact for scale 1, two f32
 *   roundings otherwise), so scale must be nonzero. A null or misaligned bias,
 *   or scale 0, traps.
 */
typedef struct QcAttentionBiasArgs {
    QcAttentionArgs attn;
    qc_dptr bias;              /* f32, see above */
    int64_t bias_ld;           /* elements between query rows */
    int64_t bias_head_stride;  /* elements between heads */
} QcAttentionBiasArgs;

/* ------------------------------------------------------- attention_wide.cu */

/*
 * qc_attention_wide_d{256,512}_bf16: the op of qc_attention_dNN_bf16 for wide
 * heads (the VAE mid-block's single head of 512 channels), QcAttentionArgs
 * with every rule above (groups, key ranges, rows and strides, alignments,
 * aliasing, the flash-attention roundings; results differ from the dNN
 * kernels' only through summation order and where key tiles end, which moves
 * the running max that the bf16 probabilities are taken against), except:
 *   - head_dim: a multiple of 8 in [8, NN] (launch the smallest that fits;
 *     launch_cfg::attention_wide_kernel picks it);
 *   - no RoPE: rope_freqs must be 0;
 *   - Launch: blockDim.x = QC_ATTENTION_WIDE_THREADS exactly (8 warps; the
 *     same work items of 64 query rows and their order as above), any
 *     gridDim.x >= 1, and at least QC_ATTENTION_WIDE_D{256,512}_SMEM_BYTES of
 *     dynamic shared memory (above 48 KiB: the launch raises the kernel's
 *     limit first). A launch that breaks a rule the kernel can see (head_dim,
 *     alignments, groups_inner, rope_freqs, block size, shared memory) traps.
 */
#define QC_ATTENTION_WIDE_THREADS 256
#define QC_ATTENTION_WIDE_D256_SMEM_BYTES 112128
#define QC_ATTENTION_WIDE_D512_SMEM_BYTES 139776

/* -------------------------------------------------------- attention_int8.cu */

/*
 * Attention with int8 Q and K (AttnSpec::qk_int8; the CPU backend has the
 * same op with the same int8 values, scales and int32 products:
 * src/backend/cpu/attention_int8.rs). Two steps: quantize Q and K per block
 * of QC_QK_BLOCK rows of one (group, head), then flash attention whose Q K^T
 * runs on int8 tensor cores (mma.sync m16n8k32, exact int32) and is
 * dequantized in registers; softmax and P V as in qc_attention_dNN_bf16.
 *
 * Layout of a quantized operand (Q or K) of `groups` groups, `heads` heads:
 *   int8 [groups, heads, rows_pad, dp]: row i of (g, h) at
 *   ((g * heads + h) * rows_pad + i) * dp, with dp = head_dim rounded up to a
 *   multiple of 32 (the MMA k-size) and rows_pad a multiple of QC_QK_BLOCK
 *   covering the longest group; columns >= head_dim and rows >= the group's
 *   length are 0. Scales f32 [groups, heads, rows_pad / QC_QK_BLOCK], one per
 *   block b of rows [b * QC_QK_BLOCK, (b + 1) * QC_QK_BLOCK); a block without
 *   rows has scale 0.
 *
 * Smoothing (K only, SageAttention's): K is quantized after subtracting its
 * mean over the group's keys, per (group, head, column). q . (k_j - m) =
 * q . k_j - q . m changes every score of a query row by the same amount, so
 * the softmax is unchanged, while a large common offset of the keys (keys of
 * a DiT share one) no longer uses up the int8 range.
 *   For group g with keys j < n (n = its length, > 0), column c, f32:
 *     part_b = 0; part_b += x[j, c] for the keys j of block b in order;
 *     total = 0; total += part_b for the blocks b in order;
 *     mean[c] = total / n
 * Quantization of one block (f32; x'[i, c] = x[i, c] - mean[c] for K, x for Q):
 *   amax = max |x'[i, c]| over the block's rows i and columns c < head_dim
 *   scale = amax / 127,  inv = amax > 0 ? 127 / amax : 0
 *   q[i, c] = clamp(rint(x'[i, c] * inv), -127, 127)    (round half to even)
 * (the per-row formulas of QcQuantizeArgs applied to the whole block).
 *
 * qc_qk_mean_bf16 (QcQkMeanArgs): mean f32 [groups, heads, head_dim] of k
 *   (bf16; element c of head h of row r at k + r * ldk + h * head_dim + c)
 *   over the rows row_start[g] .. row_end[g] (int32 [groups]) of group g, by
 *   the order above; a group without rows gets 0.
 *   Launch: blockDim.x = 128, gridDim.x any (grid stride over groups * heads).
 */
#define QC_QK_BLOCK 64
typedef struct QcQkMeanArgs {
    qc_dptr k;
    qc_dptr mean;
    qc_dptr row_start; /* int32 [groups] */
    qc_dptr row_end;   /* int32 [groups] */
    int64_t ldk;
    int32_t groups;
    int32_t heads;
    int32_t head_dim;
    int32_t _pad;
} QcQkMeanArgs;

/*
 * qc_quantize_qk_bf16 (QcQuantizeQkArgs): quantizes x (bf16, element c of
 *   head h of row r at x + r * ldx + h * head_dim + c) into the layout above
 *   (q: int8, scale: f32), minus mean (f32 [groups, heads, head_dim], the
 *   output of qc_qk_mean_bf16) when mean != 0. Group g's rows:
 *   row_start[g] .. row_end[g] when row_start != 0 (int32 [groups], then
 *   row_end too), else g * seq_len .. (g + 1) * seq_len. Every element of q
 *   [groups, heads, rows_pad, dp] and scale is written (padding 0).
 *   Requirements: head_dim in [1, 128]; dp = head_dim rounded up to 32;
 *   rows_pad a multiple of QC_QK_BLOCK >= every group's length; q 16-byte aligned.
 *   Launch: blockDim.x = 128 (traps otherwise), gridDim.x any: grid stride over
 *   groups * heads * (rows_pad / QC_QK_BLOCK) blocks, item w = (g * heads + h) *
 *   (rows_pad / QC_QK_BLOCK) + b.
 */
typedef struct QcQuantizeQkArgs {
    qc_dptr x;
    qc_dptr mean;      /* f32 [groups, heads, head_dim] or 0 */
    qc_dptr row_start; /* int32 [groups] or 0 */
    qc_dptr row_end;   /* int32 [groups], used when row_start != 0 */
    qc_dptr q;
    qc_dptr scale;
    int64_t ldx;
    int64_t rows_pad;
    int32_t seq_len; /* used when row_start == 0 */
    int32_t groups;
    int32_t heads;
    int32_t head_dim;
    int32_t dp;
    int32_t _pad;
} QcQuantizeQkArgs;

/*
 * qc_attention_i8_d{32,64,96,128} (QcAttentionI8Args): for group g < groups,
 * head h < heads, query i < q_len (row g * q_len + i of out) and key j <
 * kv_len(g) (row kv_start[g] + j of v when kv_start != 0, then
 * kv_len(g) = max(0, kv_end[g] - kv_start[g]); else row g * q_len + j and
 * kv_len = q_len), with q8, k8 and their scales from qc_quantize_qk_bf16:
 *   S[i, j] = sum_c (int32) q8[g, h, i, c] * (int32) k8[g, h, j, c]    (exact)
 *   f       = (q_scale[g, h, i / 64] * scale) * k_scale[g, h, j / 64]   (f32)
 *   s_j     = (float) S[i, j] * f
 *   out[g * q_len + i, h, :] = sum_j softmax(s)_j v[j, h, :]
 * with the softmax and P V of qc_attention_dNN_bf16 (online, base 2:
 * the kernel multiplies f by log2(e) once per key tile; P rounded to bf16,
 * f32 accumulators; out bf16; zero rows for a group without keys).
 *   v, out: bf16, element c of head h of row r at v + r * ldv + h * head_dim + c
 *   (ldo for out). acc_out: when nonzero, int32, S[i, j] of (g, h) at
 *   acc_out + ((g * heads + h) * q_len + i) * acc_ld + j for j < kv_len(g)
 *   (the rest untouched), so tests compare the integer products exactly.
 *   q_rows_pad, kv_rows_pad: rows_pad of q8 and k8. The dNN kernel takes
 *   head_dim <= NN with dp <= NN (launch_cfg::attention_i8_kernel).
 *   Requirements: head_dim a multiple of 8; ldv, ldo multiples of 8; q8, k8,
 *   v, out 16-byte aligned; out must not overlap v. A launch that breaks one
 *   traps.
 *   Launch: blockDim.x = 128, any gridDim.x: grid stride over items
 *   w = (tile, head, group) as for qc_attention_dNN_bf16 (64 queries each).
 */
typedef struct QcAttentionI8Args {
    qc_dptr q8;
    qc_dptr q_scale;
    qc_dptr k8;
    qc_dptr k_scale;
    qc_dptr v;
    qc_dptr out;
    qc_dptr kv_start; /* int32 [groups], or 0 for self-attention */
    qc_dptr kv_end;   /* int32 [groups], used when kv_start != 0 */
    qc_dptr acc_out;  /* int32 debug output, or 0 */
    int64_t ldv;
    int64_t ldo;
    int64_t q_rows_pad;
    int64_t kv_rows_pad;
    int64_t acc_ld;
    int32_t groups;
    int32_t q_len;
    int32_t heads;
    int32_t head_dim;
    int32_t dp;
    float scale;
} QcAttentionI8Args;

/* ------------------------------------------------------------ baseline.cu */

/*
 * The straightforward attention that qc-bench times the attention kernels
 * against: S = scale * Q K^T and O = P V as cuBLASLt batched GEMMs (not part
 * of the engine), with this row softmax in between.
 *
 * qc_softmax_rows_bf16 (QcSoftmaxArgs): for r < rows, j < cols,
 *   y[r * ld + j] = exp(x[r * ld + j] - max_r) / sum_r,
 *   max_r and sum_r = sum_j exp(x[r * ld + j] - max_r) over the row's cols
 *   elements, in f32; bf16 in and out. Elements at j >= cols are not touched.
 *   y may equal x (in place). cols >= 1, ld >= cols.
 *   Launch: one block per row, grid-stride over rows (any gridDim.x >= 1),
 *   blockDim.x a multiple of 32 in [32, 1024] (launch_cfg::per_row_threads).
 */
typedef struct QcSoftmaxArgs {
    qc_dptr x;
    qc_dptr y;
    int64_t rows;
    int64_t ld;
    int32_t cols;
    int32_t _pad;
} QcSoftmaxArgs;

/* ---------------------------------------------------------------- conv.cu */

/*
 * qc_conv3d_bf16: a zero-padded, stride-1, dilation-1, one-group 3-D
 * cross-correlation (PyTorch Conv3d after F.pad; a Conv2d is t_in = kt = 1)
 * as an implicit GEMM on tensor cores (bf16 in, f32 accumulate):
 *   y[n, o, t, r, s] = bias[o] + sum_{c, a, i, j} w[o, k] *
 *                      x[n, c, t + a - pad_t, r + i - pad_h, s + j - pad_w]
 *   with k = ((c * kt + a) * kh + i) * kw + j (PyTorch's weight layout
 *   [c_out, c_in, kt, kh, kw] read as a [c_out, K] matrix, K = c_in kt kh kw)
 *   and x read as 0 outside [0, t_in) x [0, h_in) x [0, w_in). The "after"
 *   padding is implied by the output size: t_out = t_in + pad_t + pad_t_after
 *   - kt + 1 (likewise h, w); the kernel only needs t_out, h_out, w_out.
 *   x: bf16 [n, c_in, t_in, h_in, w_in]; w: bf16 [c_out, K], 16-byte aligned;
 *   bias: f32 [c_out] or 0; y: bf16 [n, c_out, t_out, h_out, w_out], must
 *   not overlap x. Each output is rounded to bf16 once, after the bias.
 *   Launch: blockDim.x = 128 exactly (traps otherwise); the GEMM is tiled
 *   64 output channels x 64 output positions (n, t, r, s flattened):
 *   gridDim.x = ceil(n t_out h_out w_out / 64), gridDim.y = ceil(c_out / 64).
 */
typedef struct QcConvArgs {
    qc_dptr x;
    qc_dptr w;
    qc_dptr bias;
    qc_dptr y;
    int32_t n;
    int32_t c_in;
    int32_t t_in;
    int32_t h_in;
    int32_t w_in;
    int32_t c_out;
    int32_t t_out;
    int32_t h_out;
    int32_t w_out;
    int32_t kt;
    int32_t kh;
    int32_t kw;
    int32_t pad_t; /* zeros before, along t (likewise pad_h, pad_w) */
    int32_t pad_h;
    int32_t pad_w;
    int32_t _pad;
} QcConvArgs;

/*
 * qc_group_norm_stats_{f32,bf16} then qc_group_norm_apply_{f32,bf16}
 * (nn.GroupNorm with affine weight and bias, optional SiLU), in two launches
 * with the same args and grid (gridDim.x = chunks, gridDim.y = n * groups,
 * any blockDim.x that is a multiple of 32):
 *   x: [n, channels, spatial] (channels = groups * (group_elems / spatial));
 *   group g of sample b (row gy = b * groups + g) is the contiguous range of
 *   group_elems = (channels / groups) * spatial elements starting at
 *   (b * groups + g) * group_elems, split into `chunks` chunks of
 *   chunk_elems elements (the last one may be shorter).
 *   stats: every block (chunk q of group row gy = blockIdx.y) writes its
 *   chunk's f32 mean and M2 (sum of squared deviations from that mean, from a
 *   second exact pass) to stats[(gy * chunks + q) * 2 + {0, 1}]
 *   (stats holds n * groups * chunks * 2 floats).
 *   apply: every block merges its group's chunk statistics (Chan's formula:
 *   mean = sum n_q mean_q / N, M2 = sum M2_q + n_q (mean_q - mean)^2, biased
 *   var = M2 / N) and writes its chunk of
 *     y = (x - mean) * rsqrt(var + eps) * weight[c] + bias[c]
 *   then, when silu != 0, y = y / (1 + exp(-y)) (for bf16 the normalised
 *   value is rounded to bf16 before the SiLU, as PyTorch's separate ops do).
 *   weight, bias: f32 [channels]. y may equal x (in place) but must not
 *   otherwise overlap it.
 */
typedef struct QcGroupNormArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr weight;
    qc_dptr bias;
    qc_dptr stats;
    int64_t group_elems;
    int64_t spatial;
    int32_t chunk_elems;
    int32_t chunks;
    float eps;
    int32_t silu;
    int32_t groups; /* per sample */
    int32_t _pad;
} QcGroupNormArgs;

/*
 * qc_upsample_nearest2x_{f32,bf16} (flat grid-stride; launch_cfg::flat_scalar):
 *   x [planes, h, w] -> y [planes, 2h, 2w], y[p, r, s] = x[p, r / 2, s / 2].
 * qc_depth_to_time_{f32,bf16} (flat grid-stride): x [planes * s, t, hw] ->
 *   y [planes, t * s, hw] with y[p, u * s + i, e] = x[p * s + i, u, e]
 *   (einops "N (C s) T H W -> N C (T s) H W", planes = N C; here h = t and
 *   w = hw, s = factor).
 * qc_channel_affine_{f32,bf16} (flat grid-stride): x, y [n, channels, spatial],
 *   y[b, c, e] = x[b, c, e] * scale[c] + shift[c], scale and shift f32
 *   [channels] (h = channels, w = spatial). y may equal x.
 */
typedef struct QcResampleArgs {
    qc_dptr x;
    qc_dptr y;
    qc_dptr scale;
    qc_dptr shift;
    int64_t planes;
    int64_t h;
    int64_t w;
    int32_t factor;
    int32_t _pad;
} QcResampleArgs;

/* ----------------------------------------------------------------- cache.cu */

/*
 * Caches of sub-module outputs kept across denoising steps and the divergence
 * measures of caching policies (Backend::quantize_rows_i8, add_gated_i8,
 * l1_distance, abs_sum; the CPU backend, src/backend/cpu/cache.rs, defines them).
 *
 * qc_cache_quantize_{f32,bf16} (row kernel): row r of x (T, x + r * cols) ->
 *   amax     = max_c |x[r, c]|
 *   scale[r] = amax / 127                                   (f32 division)
 *   q[r, c]  = amax > 0 ? clamp(roundf(x[r, c] / scale[r]), -127, 127) : 0
 *   with x / scale a correctly rounded f32 division, roundf's ties away from
 *   zero and a NaN quotient giving 0: the CPU's int8 values and scales bit for
 *   bit from the same f32 values. q int8 contiguous [rows, cols], scale f32 [rows].
 */
typedef struct QcCacheQuantizeArgs {
    qc_dptr x;
    qc_dptr q;
    qc_dptr scale;
    int64_t rows;
    int32_t cols;
    int32_t _pad;
} QcCacheQuantizeArgs;

/*
 * qc_cache_add_gated_i8_bf16 (row kernel; the cached-residual reuse op reading
 *   an int8 cache):
 *     v = bf16((float) q[r, c] * scale[r])       (the dequantized cache as bf16)
 *     x[r, c] += bf16(gate[e(r), c] * v)         (or x[r, c] += v when gate == 0)
 *   i.e. qc_gated_residual_bf16 on the dequantized bf16 cache, bit for bit;
 *   e(r), gate, group_index, gate_stride as in QcGatedResidualArgs. x bf16 and
 *   q int8 contiguous [rows, cols], scale f32 [rows]. x must not overlap the others.
 */
typedef struct QcCacheAddGatedI8Args {
    qc_dptr x;
    qc_dptr q;
    qc_dptr scale;
    qc_dptr gate;
    qc_dptr group_index;
    int64_t rows;
    int64_t group_size; /* >= 1 */
    int64_t gate_stride;
    int32_t cols;
    int32_t _pad;
} QcCacheAddGatedI8Args;

/*
 * Divergence sums in two deterministic passes (a fixed grid, no atomics): the
 * parts * part_len elements of a (and b, T) form `parts` contiguous parts.
 * qc_l1_partials_{f32,bf16} / qc_abs_sum_partials_{f32,bf16} (blockDim.x at
 *   most 256; launch_cfg::divergence): gridDim.x must be parts * blocks_per_part; block k sums part p = k / blocks_per_part over its
 *   grid-stride share of the part (blocks_per_part blocks per part), in f32 per
 *   thread and then a block tree, and writes
 *     l1:      partials[2 k] = sum |a - b|,  partials[2 k + 1] = sum |b|
 *     abs_sum: partials[2 k] = sum |a|,      partials[2 k + 1] = sum a^2  (b unused)
 *   partials f32 [parts * blocks_per_part, 2].
 * qc_sum_partials (any grid, loops over parts by block): for each part p and
 *   j < 2, out[2 p + j] = (float) the sum of the part's blocks_per_part
 *   partials[.., j] in f64 (per-thread strided sums, then a block tree).
 *   out f32 [parts, 2]; a, b, part_len unused.
 */
typedef struct QcDivergenceArgs {
    qc_dptr a;
    qc_dptr b;
    qc_dptr partials;
    qc_dptr out;
    int64_t part_len;
    int32_t parts;
    int32_t blocks_per_part;
} QcDivergenceArgs;

#endif /* QC_TYPES_H */
