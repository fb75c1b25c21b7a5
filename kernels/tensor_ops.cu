// tensor_ops.cu: layout moves (row copies, casts, patchify/unpatchify) and the
// small ops around the DiT (modulation table, position embedding add, the
// sampler's CFG + Euler update).
// Argument structs and exact semantics: qc_types.h (tensor_ops.cu section).
// The flat kernels with 64-bit index division are bounded to 256 threads per
// block (launch_cfg::flat's shape) so that the division never spills.
#include "common.cuh"

namespace qc {

// ------------------------------------------------------------- row copies

__device__ __forceinline__ int64_t copy_source_row(const QcCopyRowsArgs& a, int64_t r) {
    const int32_t* __restrict__ index = dev_ptr<const int32_t>(a.index);
    if (index) return index[r];
    if (a.swap_b > 0) {
        // Output row r = (ai, ci, bi) of [a, c, b]; its source is (ai, bi, ci) of [a, b, c].
        const int64_t bc = a.swap_b * a.swap_c;
        const int64_t ai = r / bc, rest = r - ai * bc;
        const int64_t ci = rest / a.swap_b, bi = rest - ci * a.swap_b;
        return (ai * a.swap_b + bi) * a.swap_c + ci;
    }
    return r;
}

// One block per output row (grid-stride), V elements per access.
template <typename T, int V>
__device__ __forceinline__ void copy_rows_v(const QcCopyRowsArgs& a) {
    const T* __restrict__ x = dev_ptr<const T>(a.x);
    T* __restrict__ y = dev_ptr<T>(a.y);
    const int nv = a.cols / V;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T* src = x + copy_source_row(a, r) * a.ldx + a.x_col;
        T* dst = y + r * a.ldy + a.y_col;
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            T v[V];
            load_vec<V>(src, i, v);
            store_vec<V>(dst, i, v);
        }
    }
}

template <typename T>
__device__ __forceinline__ void copy_rows(const QcCopyRowsArgs& a) {
    constexpr int V = Vec16<T>::N;
    // 16-byte accesses need every row start aligned: bases, strides and offsets.
    const bool vec = a.cols % V == 0 && a.ldx % V == 0 && a.ldy % V == 0 && a.x_col % V == 0 &&
                     a.y_col % V == 0 && aligned16(dev_ptr<const T>(a.x)) && aligned16(dev_ptr<const T>(a.y));
    if (vec)
        copy_rows_v<T, V>(a);
    else
        copy_rows_v<T, 1>(a);
}

// ------------------------------------------------------------------ casts

template <typename S, typename D>
__device__ __forceinline__ void cast(const QcUnaryArgs& a) {
    const S* __restrict__ x = dev_ptr<const S>(a.x);
    D* __restrict__ y = dev_ptr<D>(a.y);
    for (int64_t i = global_thread_id(); i < a.n; i += global_thread_count()) y[i] = from_f32<D>(to_f32(x[i]));
}

// ---------------------------------------------------- modulation, embedding

template <typename E>
__device__ __forceinline__ void modulation_table(const QcModulationTableArgs& a) {
    const float* __restrict__ table = dev_ptr<const float>(a.table);
    const E* __restrict__ emb = dev_ptr<const E>(a.emb);
    float* __restrict__ out = dev_ptr<float>(a.out);
    const int64_t per_entry = static_cast<int64_t>(a.chunks) * a.c;
    const int64_t total = a.entries * per_entry;
    for (int64_t o = global_thread_id(); o < total; o += global_thread_count()) {
        const int64_t e = o / per_entry;
        const int64_t ji = o - e * per_entry;  // j * c + i
        const int64_t i = ji % a.c;
        const float ev = to_f32(emb[e * a.emb_width + (a.emb_width == a.c ? i : ji)]);
        out[o] = table[ji] + ev;
    }
}

// One block per row (grid-stride): x[r, :] += table[r % table_rows, :].
template <typename T>
__device__ __forceinline__ void add_rows_broadcast(const QcAddRowsBroadcastArgs& a) {
    T* __restrict__ x = dev_ptr<T>(a.x);
    const float* __restrict__ table = dev_ptr<const float>(a.table);
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        T* row = x + r * a.cols;
        const float* trow = table + (r % a.table_rows) * a.cols;
        for (int j = threadIdx.x; j < a.cols; j += blockDim.x) row[j] = from_f32<T>(to_f32(row[j]) + trow[j]);
    }
}

// ---------------------------------------------------------------- sampler

__device__ __forceinline__ void cfg_euler(const QcCfgEulerArgs& a) {
    float* __restrict__ z = dev_ptr<float>(a.z);
    const float* __restrict__ pred = dev_ptr<const float>(a.pred);
    const float* __restrict__ dt = dev_ptr<const float>(a.dt);
    float* __restrict__ v_out = dev_ptr<float>(a.v_out);
    const int64_t total = a.batch * a.per_sample;
    for (int64_t o = global_thread_id(); o < total; o += global_thread_count()) {
        const int64_t b = o / a.per_sample;
        const float c = pred[o];
        const float u = pred[total + o];
        // The CPU's order: guidance u + s (c - u), then z += v * dt (no FMA contraction).
        const float v = __fadd_rn(u, __fmul_rn(a.scale, __fsub_rn(c, u)));
        z[o] = __fadd_rn(z[o], __fmul_rn(v, dt[b]));
        if (v_out) v_out[o] = v;
    }
}

// --------------------------------------------------------------- patches

template <typename T>
__device__ __forceinline__ void patchify(const QcPatchArgs& a) {
    const float* __restrict__ x = dev_ptr<const float>(a.x);
    T* __restrict__ y = dev_ptr<T>(a.y);
    const int nt = (a.t + a.pt - 1) / a.pt, nh = (a.h + a.ph - 1) / a.ph, nw = (a.w + a.pw - 1) / a.pw;
    const int plen = a.channels * a.pt * a.ph * a.pw;
    const int64_t total = a.batch * nt * nh * nw * plen;
    for (int64_t o = global_thread_id(); o < total; o += global_thread_count()) {
        const int64_t tok = o / plen;
        int e = static_cast<int>(o - tok * plen);
        const int d = e % a.pw;
        e /= a.pw;
        const int bb = e % a.ph;
        e /= a.ph;
        const int aa = e % a.pt;
        const int c = e / a.pt;
        int64_t q = tok;
        const int wi = static_cast<int>(q % nw);
        q /= nw;
        const int hi = static_cast<int>(q % nh);
        q /= nh;
        const int ti = static_cast<int>(q % nt);
        const int64_t bi = q / nt;
        const int tt = ti * a.pt + aa, hh = hi * a.ph + bb, ww = wi * a.pw + d;
        float v = 0.0f;
        if (tt < a.t && hh < a.h && ww < a.w) v = x[(((bi * a.channels + c) * a.t + tt) * a.h + hh) * a.w + ww];
        y[o] = from_f32<T>(v);
    }
}

template <typename T>
__device__ __forceinline__ void unpatchify(const QcPatchArgs& a) {
    const T* __restrict__ x = dev_ptr<const T>(a.x);
    float* __restrict__ y = dev_ptr<float>(a.y);
    const int nt = (a.t + a.pt - 1) / a.pt, nh = (a.h + a.ph - 1) / a.ph, nw = (a.w + a.pw - 1) / a.pw;
    const int plen = a.pt * a.ph * a.pw * a.channels;
    const int64_t total = a.batch * a.keep_channels * a.t * a.h * a.w;
    for (int64_t o = global_thread_id(); o < total; o += global_thread_count()) {
        int64_t q = o;
        const int ww = static_cast<int>(q % a.w);
        q /= a.w;
        const int hh = static_cast<int>(q % a.h);
        q /= a.h;
        const int tt = static_cast<int>(q % a.t);
        q /= a.t;
        const int c = static_cast<int>(q % a.keep_channels);
        const int64_t bi = q / a.keep_channels;
        const int64_t tok = ((bi * nt + tt / a.pt) * nh + hh / a.ph) * nw + ww / a.pw;
        const int inner = ((tt % a.pt) * a.ph + hh % a.ph) * a.pw + ww % a.pw;
        y[o] = to_f32(x[tok * plen + static_cast<int64_t>(inner) * a.channels + c]);
    }
}

}  // namespace qc

// y[r, y_col..] = x[src(r), x_col..] (split, narrow, concat, gather, swap_middle), f32.
extern "C" __global__ void __launch_bounds__(1024) qc_copy_rows_f32(const QcCopyRowsArgs a) {
    qc::copy_rows<float>(a);
}
// y[r, y_col..] = x[src(r), x_col..] (split, narrow, concat, gather, swap_middle), bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_copy_rows_bf16(const QcCopyRowsArgs a) {
    qc::copy_rows<qc::bf16>(a);
}
// y = bf16(x), round to nearest even.
extern "C" __global__ void __launch_bounds__(1024) qc_cast_f32_bf16(const QcUnaryArgs a) {
    qc::cast<float, qc::bf16>(a);
}
// y = f32(x), exact.
extern "C" __global__ void __launch_bounds__(1024) qc_cast_bf16_f32(const QcUnaryArgs a) {
    qc::cast<qc::bf16, float>(a);
}
// out[e, j, :] = table[j, :] + emb[e, (j,) :], emb f32.
extern "C" __global__ void __launch_bounds__(256) qc_modulation_table_f32(const QcModulationTableArgs a) {
    qc::modulation_table<float>(a);
}
// out[e, j, :] = table[j, :] + emb[e, (j,) :], emb bf16.
extern "C" __global__ void __launch_bounds__(256) qc_modulation_table_bf16(const QcModulationTableArgs a) {
    qc::modulation_table<qc::bf16>(a);
}
// x[r, :] += table[r % table_rows, :], x f32.
extern "C" __global__ void __launch_bounds__(1024) qc_add_rows_broadcast_f32(const QcAddRowsBroadcastArgs a) {
    qc::add_rows_broadcast<float>(a);
}
// x[r, :] += table[r % table_rows, :], x bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_add_rows_broadcast_bf16(const QcAddRowsBroadcastArgs a) {
    qc::add_rows_broadcast<qc::bf16>(a);
}
// z += dt[b] * (u + scale (c - u)) over the CFG pair's prediction, f32.
extern "C" __global__ void __launch_bounds__(256) qc_cfg_euler_f32(const QcCfgEulerArgs a) {
    qc::cfg_euler(a);
}
// [B, C, T, H, W] f32 -> patch tokens, f32.
extern "C" __global__ void __launch_bounds__(256) qc_patchify_f32(const QcPatchArgs a) {
    qc::patchify<float>(a);
}
// [B, C, T, H, W] f32 -> patch tokens, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_patchify_bf16(const QcPatchArgs a) {
    qc::patchify<qc::bf16>(a);
}
// patch tokens f32 -> [B, keep_channels, T, H, W] f32.
extern "C" __global__ void __launch_bounds__(256) qc_unpatchify_f32(const QcPatchArgs a) {
    qc::unpatchify<float>(a);
}
// patch tokens bf16 -> [B, keep_channels, T, H, W] f32.
extern "C" __global__ void __launch_bounds__(256) qc_unpatchify_bf16(const QcPatchArgs a) {
    qc::unpatchify<qc::bf16>(a);
}
