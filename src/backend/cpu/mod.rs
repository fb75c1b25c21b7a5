//! The CPU reference backend: defines every op's semantics, multi-threaded with rayon.

mod attention;
mod attention_direct;
#[cfg(target_arch = "x86_64")]
mod attention_bf16;
pub mod attention_int8;
pub mod cache;
#[cfg(test)]
mod cache_tests;
mod conv;
mod embed;
pub mod gemm;
pub mod math;
mod norm;
pub(crate) mod simd;
#[cfg(test)]
mod tests;

use super::{Activation, AttnSpec, Backend, Linear, LinearWeight, ModRef, PatchGrid, Rope};
use crate::quant::fused::{self, Finish, RowSource};
use crate::quant::int8;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use gemm::{sgemm, MatRef};
use rayon::prelude::*;

/// Rows handed to one rayon task in elementwise ops: large enough to amortize scheduling.
const ROW_CHUNK_ELEMS: usize = 1 << 14;

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

fn rows_of(x: &Tensor) -> (usize, usize) {
    let c = *x.shape().last().unwrap_or(&1);
    (if c == 0 { 0 } else { x.numel() / c }, c)
}

/// Rows per parallel task for rows of `cols` elements.
fn chunk_rows(cols: usize) -> usize {
    (ROW_CHUNK_ELEMS / cols.max(1)).max(1)
}

/// The `[C]` slice of `m.chunk` for table entry `entry`.
fn mod_vec<'a>(m: &ModRef<'a>, table: &'a [f32], entry: usize, c: usize) -> &'a [f32] {
    let chunks = m.table.shape()[1];
    let off = (entry * chunks + m.chunk) * c;
    &table[off..off + c]
}

fn check_mod(m: &ModRef, rows: usize, c: usize, what: &str) -> Result<()> {
    let s = m.table.shape();
    ensure!(s.len() == 3 && s[2] == c && m.chunk < s[1], "{what}: modulation table {s:?} does not fit chunk {} of width {c}", m.chunk);
    ensure!(m.groups.rows() == rows, "{what}: row groups cover {} rows, tensor has {rows}", m.groups.rows());
    ensure!(m.groups.index.iter().all(|&e| e < s[0]), "{what}: row group entry out of range of table {s:?}");
    Ok(())
}

fn act_in_place(v: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if act == Activation::GeluTanh && simd::level() == simd::Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512.
        return unsafe { math::gelu_tanh_avx512(v) };
    }
    act_portable(v, act)
}

/// The activation after an integer linear: GELU there is the fast one
/// ([`math::gelu_tanh_fast_avx512`], about 1e-4 relative), whose error the
/// quantization of the next linear's input hides 100 times over.
fn act_after_integer(v: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if act == Activation::GeluTanh && simd::level() == simd::Level::Avx512 {
        // SAFETY: level() checked that the CPU has AVX-512 (with FMA).
        return unsafe { math::gelu_tanh_fast_avx512(v) };
    }
    act_in_place(v, act)
}

/// The activation pass for the outputs of `w`.
fn activation_of(w: &Linear) -> fn(&mut [f32], Activation) {
    match w.weight {
        LinearWeight::Int8(_) | LinearWeight::Int4(_) => act_after_integer,
        LinearWeight::F32(_) | LinearWeight::Half(_) => act_in_place,
    }
}

simd::multiversion! {
fn act_portable(v: &mut [f32], act: Activation) {
    match act {
        Activation::None => {}
        Activation::GeluTanh => v.iter_mut().for_each(|x| *x = math::gelu_tanh(*x)),
        Activation::Silu => v.iter_mut().for_each(|x| *x = math::silu(*x)),
    }
}
}

/// How an integer linear quantizes its input rows: the importance vector's
/// inverse and the activation range; `None` for float weights.
fn activation_quantization(w: &Linear) -> Option<(Option<&[f32]>, i32)> {
    match &w.weight {
        LinearWeight::Int8(q) => Some((q.inv_smooth.as_deref(), q.act_qmax)),
        LinearWeight::Int4(q) => Some((q.inv_smooth.as_deref(), q.act_qmax)),
        LinearWeight::F32(_) | LinearWeight::Half(_) => None,
    }
}

/// `out = a W^T + b` for an integer weight, the bias added by the dequantization
/// in the documented order.
fn integer_linear(a: &int8::QuantRows, w: &Linear, out: &mut [f32]) -> Result<()> {
    let bias = w.bias.as_ref().map(|b| b.f32()).transpose()?;
    match &w.weight {
        LinearWeight::Int8(q) => int8::linear_f32(a, q, bias, out),
        LinearWeight::Int4(q) => crate::quant::int4::linear_f32(a, q, bias, out),
        LinearWeight::F32(_) | LinearWeight::Half(_) => bail!("integer_linear on a float weight"),
    }
}

/// A linear layer's output rows after the activation, shaped as the input with
/// its last dim `w.out_features`.
fn linear_output(mut out: Vec<f32>, input_shape: &[usize], w: &Linear, act: Activation) -> Result<Tensor> {
    if act != Activation::None {
        let activate = activation_of(w);
        out.par_chunks_mut(ROW_CHUNK_ELEMS).for_each(|c| activate(c, act));
    }
    let mut shape = input_shape.to_vec();
    *shape.last_mut().unwrap() = w.out_features;
    Tensor::from_f32(&shape, out)
}

/// The shift and scale rows of each token row, checked once.
struct RowModulation<'a> {
    shift: (ModRef<'a>, &'a [f32]),
    scale: (ModRef<'a>, &'a [f32]),
    c: usize,
}

impl<'a> RowModulation<'a> {
    fn new(modulation: Option<(ModRef<'a>, ModRef<'a>)>, rows: usize, c: usize) -> Result<Option<Self>> {
        let Some((shift, scale)) = modulation else { return Ok(None) };
        check_mod(&shift, rows, c, "modulate shift")?;
        check_mod(&scale, rows, c, "modulate scale")?;
        ensure!(shift.groups == scale.groups, "shift and scale use different row groups");
        let (st, sc) = (shift.table.f32()?, scale.table.f32()?);
        Ok(Some(RowModulation { shift: (shift, st), scale: (scale, sc), c }))
    }

    fn row(&self, row: usize) -> (&'a [f32], &'a [f32]) {
        let e = self.shift.0.groups.index[row / self.shift.0.groups.group_size];
        (mod_vec(&self.shift.0, self.shift.1, e, self.c), mod_vec(&self.scale.0, self.scale.1, e, self.c))
    }
}

/// A zeroed buffer of `len` floats, zeroed by the pool's threads: calloc's
/// memset of a recycled block runs on the calling thread alone (5% of the
/// demo's w8a8 step on one thread, serial at two). Small buffers keep calloc.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < ROW_CHUNK_ELEMS {
        return vec![0f32; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(ROW_CHUNK_ELEMS).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements were all written just above.
    unsafe { v.set_len(len) };
    v
}

/// A zeroed buffer for a large output. On Linux it asks for transparent huge
/// pages before the first write: where THP is in `madvise` mode, a fresh 75 MB
/// output otherwise takes ~18,000 page faults as the GEMM first writes it, about
/// a third of a W8A8 linear's time on this project's VM (measured: 32 ms extra
/// at 4050x1152x4608, 11 ms with huge pages).
fn output_buffer(len: usize) -> Vec<f32> {
    let v = zeroed(len);
    #[cfg(target_os = "linux")]
    if len * 4 >= 8 << 20 {
        const HUGE: usize = 2 << 20;
        let (p, bytes) = (v.as_ptr() as usize, len * 4);
        let (start, end) = (p.next_multiple_of(HUGE), (p + bytes) / HUGE * HUGE);
        if end > start {
            // SAFETY: advice on whole pages inside our own allocation; it changes no
            // contents, and a failure only means no huge pages.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

impl CpuBackend {
    /// `x W^T + b` for `x` viewed as `[rows, k]`.
    fn matmul_bias(&self, x: &Tensor, w: &Linear) -> Result<(Vec<f32>, usize)> {
        let (rows, k) = rows_of(x);
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        let n = w.out_features;
        let xs = x.f32()?;
        let mut out = output_buffer(rows * n);
        // Below ~4M multiply-adds the GEMM's own threading costs more than it saves.
        let threads = if rows * n * k < (1 << 22) { 1 } else { rayon::current_num_threads() };
        match &w.weight {
            LinearWeight::F32(wt) => {
                let ws = wt.f32()?;
                sgemm(rows, n, k, MatRef { data: xs, rs: k, cs: 1 }, MatRef { data: ws, rs: 1, cs: k }, &mut out, n, false, threads);
            }
            LinearWeight::Half(wt) => {
                let wide = wt.to_f32()?;
                let ws = wide.f32()?;
                sgemm(rows, n, k, MatRef { data: xs, rs: k, cs: 1 }, MatRef { data: ws, rs: 1, cs: k }, &mut out, n, false, threads);
            }
            LinearWeight::Int8(_) | LinearWeight::Int4(_) => {
                let (inv_smooth, qmax) = activation_quantization(w).ok_or_else(|| anyhow::anyhow!("integer weight without activation quantization"))?;
                let a = int8::quantize_rows(xs, k, inv_smooth, qmax)?;
                integer_linear(&a, w, &mut out)?;
                return Ok((out, rows));
            }
        }
        if let Some(b) = &w.bias {
            let b = b.f32()?;
            out.par_chunks_mut(n * chunk_rows(n)).for_each(|blk| blk.chunks_mut(n).for_each(|r| r.iter_mut().zip(b).for_each(|(o, bb)| *o += bb)));
        }
        Ok((out, rows))
    }
}

/// `r += gate * y` row by row (`r += y` without a gate), `[rows, n]`: the
/// accumulation of `linear_residual` and `add_gated`.
fn gated_accumulate(r: &mut [f32], y: &[f32], rows: usize, n: usize, gate: Option<ModRef>) -> Result<()> {
    match gate {
        None => r.par_chunks_mut(ROW_CHUNK_ELEMS).zip(y.par_chunks(ROW_CHUNK_ELEMS)).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b)),
        Some(g) => {
            check_mod(&g, rows, n, "gated residual")?;
            let table = g.table.f32()?;
            let gs = g.groups.group_size;
            r.par_chunks_mut(n).zip(y.par_chunks(n)).enumerate().with_min_len(chunk_rows(n)).for_each(|(row, (a, b))| {
                gated_row(a, b, mod_vec(&g, table, g.groups.index[row / gs], n));
            });
        }
    }
    Ok(())
}

/// `a += g * b` over one row.
#[inline]
fn gated_row(a: &mut [f32], b: &[f32], g: &[f32]) {
    for ((a, b), gg) in a.iter_mut().zip(b).zip(g) {
        *a += gg * b;
    }
}

/// Rows of a tensor that the tasks of one parallel loop update, each its own rows.
struct SharedRows(*mut f32);
// SAFETY: the tasks that share it touch disjoint rows (see `fused_integer_residual`).
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

/// Adds a fused task's output rows `ys` (from row `r0`, `n` wide) to the rows
/// at `res`, times the gate where there is one: the same operations as
/// [`gated_accumulate`].
fn add_rows(res: &SharedRows, r0: usize, ys: &[f32], n: usize, gate: Option<(&ModRef, &[f32])>) {
    for (i, y) in ys.chunks(n).enumerate() {
        let row = r0 + i;
        // SAFETY: the tensor at `res` holds every row, and each task passes its own rows.
        let r = unsafe { std::slice::from_raw_parts_mut(res.0.add(row * n), n) };
        match gate {
            Some((g, t)) => gated_row(r, y, mod_vec(g, t, g.groups.index[row / g.groups.group_size], n)),
            None => r.iter_mut().zip(y).for_each(|(a, b)| *a += b),
        }
    }
}

/// `f` on the fused integer stage of `w` over `rows` rows; `None` for float
/// weights or where the fused path does not apply.
fn with_integer_stage<R>(w: &Linear, rows: usize, f: impl FnOnce(&fused::Stage) -> R) -> Result<Option<R>> {
    let bias = w.bias.as_ref().map(|b| b.f32()).transpose()?;
    match &w.weight {
        LinearWeight::Int8(q) => int8::with_stage(q, bias, rows, f).transpose(),
        LinearWeight::Int4(q) => crate::quant::int4::with_stage(q, bias, rows, f).transpose(),
        LinearWeight::F32(_) | LinearWeight::Half(_) => Ok(None),
    }
}

impl CpuBackend {
    /// The integer linear fused per task (`quant::fused`) on `x`'s rows, where it applies.
    fn fused_integer(&self, x: RowSource, rows: usize, w: &Linear, finish: Option<&Finish>) -> Result<Option<Vec<f32>>> {
        let bias = || w.bias.as_ref().map(|b| b.f32()).transpose();
        match &w.weight {
            LinearWeight::Int8(q) => int8::linear_rows_f32(x, rows, q, bias()?, finish).transpose(),
            LinearWeight::Int4(q) => crate::quant::int4::linear_rows_f32(x, rows, q, bias()?, finish).transpose(),
            LinearWeight::F32(_) | LinearWeight::Half(_) => Ok(None),
        }
    }

    /// `residual += gate * (x W^T + b)` with the accumulation in the fused
    /// integer linear's tasks (the same operations as [`gated_accumulate`]); returns the
    /// linear's output, or `None` where the fused linear does not apply.
    fn fused_integer_residual(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<Option<Vec<f32>>> {
        if !matches!(w.weight, LinearWeight::Int8(_) | LinearWeight::Int4(_)) {
            return Ok(None);
        }
        let (rows, k) = rows_of(x);
        let n = w.out_features;
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        ensure!(residual.numel() == rows * n, "residual {:?} does not match linear output [{rows}, {n}]", residual.shape());
        if let Some(g) = &gate {
            check_mod(g, rows, n, "gated residual")?;
        }
        let table = gate.as_ref().map(|g| g.table.f32()).transpose()?;
        let res = SharedRows(residual.f32_mut()?.as_mut_ptr());
        let accumulate = |r0: usize, ys: &mut [f32]| add_rows(&res, r0, ys, n, gate.as_ref().zip(table));
        self.fused_integer(RowSource::Rows(x.f32()?), rows, w, Some(&accumulate))
    }

    /// The MLP sub-module chained per task ([`fused::chain`]): each task
    /// normalizes, modulates and quantizes its rows of `x`, runs fc1, GELU (the
    /// integer linears' one) and fc2, and adds the gated result to the same
    /// rows; returns fc2's output, or `None` unless both linears take the fused
    /// integer path. The same values as
    /// [`mlp_residual_unfused`](crate::backend::mlp_residual_unfused).
    #[allow(clippy::too_many_arguments)]
    fn fused_mlp(&self, x: &mut Tensor, eps: f32, modulation: (ModRef, ModRef), fc1: &Linear, fc2: &Linear, gate: Option<ModRef>) -> Result<Option<Vec<f32>>> {
        let integer = |w: &Linear| matches!(w.weight, LinearWeight::Int8(_) | LinearWeight::Int4(_));
        if !integer(fc1) || !integer(fc2) {
            return Ok(None);
        }
        let (rows, c) = rows_of(x);
        ensure!(c == fc1.in_features, "mlp: fc1 expects {} input features, got shape {:?}", fc1.in_features, x.shape());
        ensure!(fc2.in_features == fc1.out_features, "mlp: fc1 gives {} features, fc2 takes {}", fc1.out_features, fc2.in_features);
        ensure!(fc2.out_features == c, "mlp: fc2 gives {} features for a residual of {c}", fc2.out_features);
        if let Some(g) = &gate {
            check_mod(g, rows, c, "gated residual")?;
        }
        let m = RowModulation::new(Some(modulation), rows, c)?;
        let table = gate.as_ref().map(|g| g.table.f32()).transpose()?;
        let xp = SharedRows(x.f32_mut()?.as_mut_ptr());
        let xp = &xp;
        // SAFETY: `x` holds rows * c values; a task reads its own rows here
        // before `add_rows` adds to them, and no other task touches them.
        let produce = |row: usize, buf: &mut [f32]| norm::layer_norm_row(unsafe { std::slice::from_raw_parts(xp.0.add(row * c), c) }, buf, eps, m.as_ref().map(|m| m.row(row)));
        let gelu = |_: usize, h: &mut [f32]| act_after_integer(h, Activation::GeluTanh);
        let accumulate = |r0: usize, ys: &mut [f32]| add_rows(xp, r0, ys, c, gate.as_ref().zip(table));
        let chained = with_integer_stage(fc1, rows, |first| with_integer_stage(fc2, rows, |second| fused::chain(RowSource::Produced(&produce), rows, first, &gelu, second, Some(&accumulate))))?;
        match chained {
            Some(inner) => inner?.transpose(),
            None => Ok(None),
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn linear(&self, x: &Tensor, w: &Linear, act: Activation) -> Result<Tensor> {
        let (rows, k) = rows_of(x);
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        let activate = |_: usize, out: &mut [f32]| act_after_integer(out, act);
        if let Some(out) = self.fused_integer(RowSource::Rows(x.f32()?), rows, w, (act != Activation::None).then_some(&activate as &Finish))? {
            return linear_output(out, x.shape(), w, Activation::None);
        }
        let (out, _) = self.matmul_bias(x, w)?;
        linear_output(out, x.shape(), w, act)
    }

    fn mlp_residual(&self, x: &mut Tensor, eps: f32, modulation: (ModRef, ModRef), fc1: &Linear, fc2: &Linear, gate: Option<ModRef>, keep: bool) -> Result<Option<Tensor>> {
        match self.fused_mlp(x, eps, modulation, fc1, fc2, gate)? {
            Some(out) => keep.then(|| linear_output(out, x.shape(), fc2, Activation::None)).transpose(),
            None => crate::backend::mlp_residual_unfused(self, x, eps, modulation, fc1, fc2, gate, keep),
        }
    }

    fn linear_residual_kept(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<Tensor> {
        match self.fused_integer_residual(x, w, residual, gate)? {
            Some(out) => linear_output(out, x.shape(), w, Activation::None),
            None => {
                let out = self.linear(x, w, Activation::None)?;
                self.add_gated(residual, &out, gate)?;
                Ok(out)
            }
        }
    }

    fn linear_residual(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<()> {
        if self.fused_integer_residual(x, w, residual, gate)?.is_some() {
            return Ok(());
        }
        let (y, rows) = self.matmul_bias(x, w)?;
        let n = w.out_features;
        ensure!(residual.numel() == rows * n, "residual {:?} does not match linear output [{rows}, {n}]", residual.shape());
        gated_accumulate(residual.f32_mut()?, &y, rows, n, gate)
    }

    fn add_gated(&self, x: &mut Tensor, y: &Tensor, gate: Option<ModRef>) -> Result<()> {
        ensure!(x.numel() == y.numel() && x.shape().last() == y.shape().last(), "add_gated: x {:?} and y {:?} do not hold the same rows", x.shape(), y.shape());
        let (rows, n) = rows_of(x);
        let y = y.f32()?;
        gated_accumulate(x.f32_mut()?, y, rows, n, gate)
    }

    fn quantize_rows_i8(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        cache::quantize_rows_i8(y)
    }

    fn add_gated_i8(&self, x: &mut Tensor, q: &Tensor, scales: &Tensor, gate: Option<ModRef>) -> Result<()> {
        cache::add_gated_i8(x, q, scales, gate)
    }

    fn l1_distance(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        cache::l1_distance(a, b, parts)
    }

    fn abs_sum(&self, a: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        cache::abs_sum(a, parts)
    }

    fn layer_norm_modulate(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>) -> Result<Tensor> {
        let (rows, c) = rows_of(x);
        let xs = x.f32()?;
        let m = RowModulation::new(modulation, rows, c)?;
        let mut out = zeroed(xs.len());
        out.par_chunks_mut(c).zip(xs.par_chunks(c)).enumerate().with_min_len(chunk_rows(c)).for_each(|(row, (o, i))| {
            norm::layer_norm_row(i, o, eps, m.as_ref().map(|m| m.row(row)));
        });
        Tensor::from_f32(x.shape(), out)
    }

    fn norm_modulate_linear(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>, w: &Linear, act: Activation) -> Result<Tensor> {
        let Some((inv_smooth, qmax)) = activation_quantization(w) else {
            let h = self.layer_norm_modulate(x, eps, modulation)?;
            return self.linear(&h, w, act);
        };
        let (rows, c) = rows_of(x);
        ensure!(c == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        let xs = x.f32()?;
        let m = RowModulation::new(modulation, rows, c)?;
        let produce = |row: usize, buf: &mut [f32]| norm::layer_norm_row(&xs[row * c..][..c], buf, eps, m.as_ref().map(|m| m.row(row)));
        let activate = |_: usize, out: &mut [f32]| act_after_integer(out, act);
        if let Some(out) = self.fused_integer(RowSource::Produced(&produce), rows, w, (act != Activation::None).then_some(&activate as &Finish))? {
            return linear_output(out, x.shape(), w, Activation::None);
        }
        let a = int8::quantize_produced_rows(rows, c, inv_smooth, qmax, produce)?;
        let mut out = output_buffer(rows * w.out_features);
        integer_linear(&a, w, &mut out)?;
        linear_output(out, x.shape(), w, act)
    }

    fn qk_norm_rope(&self, x: &mut Tensor, heads: usize, weight: &Tensor, eps: f32, rope: Option<Rope>) -> Result<()> {
        let (_, c) = rows_of(x);
        ensure!(heads > 0 && c % heads == 0, "qk norm: {c} channels do not split into {heads} heads");
        let d = c / heads;
        let w = weight.f32()?;
        ensure!(w.len() == d, "qk norm weight has {} entries, head dim is {d}", w.len());
        if let Some(r) = &rope {
            ensure!(r.freqs.len() * 2 == d, "rope has {} frequencies, head dim is {d}", r.freqs.len());
            ensure!(r.seq_len > 0, "rope sequence length is 0");
        }
        // Computed once rather than per head and row.
        let table = rope.map_or(Vec::new(), |r| norm::rope_table(r.freqs, r.seq_len));
        let per_chunk = chunk_rows(c);
        let rope = rope.map(|r| (&table[..], r.seq_len));
        x.f32_mut()?.par_chunks_mut(per_chunk * c).enumerate().for_each(|(i, rows)| norm::qk_norm_rope_rows(rows, c, i * per_chunk, w, eps, rope));
        Ok(())
    }

    fn split_last(&self, x: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
        let (rows, c) = rows_of(x);
        ensure!(parts > 0 && c % parts == 0, "cannot split {c} channels into {parts} parts");
        let p = c / parts;
        let xs = x.f32()?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = p;
        (0..parts)
            .map(|i| {
                let mut v = vec![0f32; rows * p];
                v.par_chunks_mut(p).zip(xs.par_chunks(c)).with_min_len(chunk_rows(c)).for_each(|(o, r)| o.copy_from_slice(&r[i * p..(i + 1) * p]));
                Tensor::from_f32(&shape, v)
            })
            .collect()
    }

    /// One pass: each output row gathers its q, k and v from its qkv row (through
    /// the swap), and q and k are normalized while those rows are in cache (the
    /// separate split, swaps and norms were 6 copies and 2 passes per temporal block).
    fn qkv_operands(&self, qkv: &Tensor, heads: usize, q_norm: &Tensor, k_norm: &Tensor, eps: f32, swap: Option<[usize; 4]>, rope: Option<Rope>) -> Result<[Tensor; 3]> {
        let (rows, c3) = rows_of(qkv);
        ensure!(c3 % 3 == 0, "qkv_operands: {c3} channels do not split into q, k and v");
        let c = c3 / 3;
        ensure!(heads > 0 && c % heads == 0, "qk norm: {c} channels do not split into {heads} heads");
        let d = c / heads;
        let (wq, wk) = (q_norm.f32()?, k_norm.f32()?);
        ensure!(wq.len() == d && wk.len() == d, "qk norm weights have {} and {} entries, head dim is {d}", wq.len(), wk.len());
        if let Some(r) = &rope {
            ensure!(r.freqs.len() * 2 == d && r.seq_len > 0, "rope has {} frequencies over {} positions, head dim is {d}", r.freqs.len(), r.seq_len);
        }
        if let Some([a, b, m, last]) = swap {
            ensure!(a * b * m == rows && last == c, "qkv_operands: swap {:?} does not cover [{rows}, {c}]", [a, b, m, last]);
        }
        // Output row (ai, ci, bi) <- input row (ai, bi, ci), as `swap_middle`.
        let source = |row: usize| match swap {
            None => row,
            Some([_, b, m, _]) => {
                let (ai, rest) = (row / (m * b), row % (m * b));
                (ai * b + rest % b) * m + rest / b
            }
        };
        let table = rope.map_or(Vec::new(), |r| norm::rope_table(r.freqs, r.seq_len));
        let rope = rope.map(|r| (&table[..], r.seq_len));
        let xs = qkv.f32()?;
        // Written straight into fresh buffers (no zeroing pass: each would be a
        // parallel loop of its own, about 1% of a small quantized step each).
        let (mut qo, mut ko, mut vo) = (Vec::with_capacity(rows * c), Vec::with_capacity(rows * c), Vec::with_capacity(rows * c));
        let per_chunk = chunk_rows(c);
        let (q_all, k_all, v_all) = (&mut qo.spare_capacity_mut()[..rows * c], &mut ko.spare_capacity_mut()[..rows * c], &mut vo.spare_capacity_mut()[..rows * c]);
        q_all.par_chunks_mut(per_chunk * c).zip(k_all.par_chunks_mut(per_chunk * c)).zip(v_all.par_chunks_mut(per_chunk * c)).enumerate().for_each(|(i, ((q, k), v))| {
            let r0 = i * per_chunk;
            let src = |j: usize| &xs[source(r0 + j) * c3..][..c3];
            for (j, vr) in v.chunks_mut(c).enumerate() {
                vr.write_copy_of_slice(&src(j)[2 * c..]);
            }
            // q and k are normalized from the qkv rows into their outputs (no copy first).
            norm::qk_norm_rope_gather(q, c, r0, |j| &src(j)[..c], wq, eps, rope);
            norm::qk_norm_rope_gather(k, c, r0, |j| &src(j)[c..2 * c], wk, eps, rope);
        });
        // SAFETY: the chunks cover all rows * c values of each, all written.
        unsafe {
            qo.set_len(rows * c);
            ko.set_len(rows * c);
            vo.set_len(rows * c);
        }
        let shape = match swap {
            None => {
                let mut s = qkv.shape().to_vec();
                *s.last_mut().unwrap() = c;
                s
            }
            Some([a, b, m, _]) => vec![a, m, b, c],
        };
        Ok([Tensor::from_f32(&shape, qo)?, Tensor::from_f32(&shape, ko)?, Tensor::from_f32(&shape, vo)?])
    }

    fn swap_middle(&self, x: &Tensor, dims: [usize; 4]) -> Result<Tensor> {
        let [a, b, c, d] = dims;
        ensure!(x.numel() == a * b * c * d, "swap_middle: {:?} is not {dims:?}", x.shape());
        let xs = x.f32()?;
        let mut out = zeroed(xs.len());
        // Output row (ai, ci, bi) <- input row (ai, bi, ci).
        out.par_chunks_mut(d).enumerate().with_min_len(chunk_rows(d)).for_each(|(row, o)| {
            let (ai, rest) = (row / (c * b), row % (c * b));
            let (ci, bi) = (rest / b, rest % b);
            let src = ((ai * b + bi) * c + ci) * d;
            o.copy_from_slice(&xs[src..src + d]);
        });
        Tensor::from_f32(&[a, c, b, d], out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor> {
        if spec.qk_int8 {
            return attention_int8::attention(q, k, v, spec, bias);
        }
        attention::attention(q, k, v, spec, bias)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "mul: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let v: Vec<f32> = a.f32()?.par_iter().zip(b.f32()?.par_iter()).with_min_len(ROW_CHUNK_ELEMS).map(|(x, y)| x * y).collect();
        Tensor::from_f32(a.shape(), v)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        let mut v = x.f32()?.to_vec();
        v.par_chunks_mut(ROW_CHUNK_ELEMS).for_each(|c| act_in_place(c, Activation::Silu));
        Tensor::from_f32(x.shape(), v)
    }

    fn modulation_table(&self, table: &Tensor, emb: &Tensor) -> Result<Tensor> {
        ensure!(table.shape().len() == 2, "modulation table must be [K, C], got {:?}", table.shape());
        let (k, c) = (table.shape()[0], table.shape()[1]);
        let (e, width) = rows_of(emb);
        ensure!(width == k * c || width == c, "modulation embedding {:?} is neither [E, {}] nor [E, {c}]", emb.shape(), k * c);
        let (tv, ev) = (table.f32()?, emb.f32()?);
        let mut out = vec![0f32; e * k * c];
        for (i, o) in out.chunks_mut(c).enumerate() {
            let (ei, j) = (i / k, i % k);
            let src = if width == c { &ev[ei * c..][..c] } else { &ev[ei * width + j * c..][..c] };
            for ((o, t), s) in o.iter_mut().zip(&tv[j * c..][..c]).zip(src) {
                *o = t + s;
            }
        }
        Tensor::from_f32(&[e, k, c], out)
    }

    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("concat of nothing"))?;
        let mut shape = first.shape().to_vec();
        ensure!(!shape.is_empty(), "concat of scalars");
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.numel()).sum());
        for p in parts {
            ensure!(p.shape()[1..] == first.shape()[1..], "concat: shapes {:?} and {:?} differ beyond dim 0", p.shape(), first.shape());
            data.extend_from_slice(p.f32()?);
        }
        shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
        Tensor::from_f32(&shape, data)
    }

    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let s = x.shape();
        ensure!(dim < s.len() && start + len <= s[dim], "narrow: [{start}, {}) out of dim {dim} of {s:?}", start + len);
        let outer: usize = s[..dim].iter().product();
        let inner: usize = s[dim + 1..].iter().product();
        let xs = x.f32()?;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&xs[(o * s[dim] + start) * inner..][..len * inner]);
        }
        let mut shape = s.to_vec();
        shape[dim] = len;
        Tensor::from_f32(&shape, out)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let v: Vec<f32> = a.f32()?.par_iter().zip(b.f32()?.par_iter()).with_min_len(ROW_CHUNK_ELEMS).map(|(x, y)| x + y).collect();
        Tensor::from_f32(a.shape(), v)
    }

    fn add_rows_broadcast(&self, x: &mut Tensor, rows_table: &Tensor) -> Result<()> {
        let t = rows_table.f32()?;
        ensure!(!t.is_empty() && x.numel().is_multiple_of(t.len()), "cannot broadcast {:?} over {:?}", rows_table.shape(), x.shape());
        x.f32_mut()?.par_chunks_mut(t.len()).for_each(|blk| blk.iter_mut().zip(t).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn select_rows(&self, pick_a: &[bool], group_size: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "select_rows: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let (rows, c) = rows_of(a);
        ensure!(pick_a.len() * group_size == rows, "select_rows: {} groups of {group_size} rows for {rows} rows", pick_a.len());
        let (av, bv) = (a.f32()?, b.f32()?);
        let mut out = vec![0f32; av.len()];
        out.par_chunks_mut(c).enumerate().with_min_len(chunk_rows(c)).for_each(|(r, o)| {
            let src = if pick_a[r / group_size] { av } else { bv };
            o.copy_from_slice(&src[r * c..(r + 1) * c]);
        });
        Tensor::from_f32(a.shape(), out)
    }

    fn gather_rows(&self, x: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let (rows, c) = rows_of(x);
        if let Some(&bad) = indices.iter().find(|&&i| i >= rows) {
            bail!("gather_rows: index {bad} out of {rows} rows");
        }
        let xs = x.f32()?;
        let mut out = vec![0f32; indices.len() * c];
        out.par_chunks_mut(c.max(1)).zip(indices.par_iter()).with_min_len(chunk_rows(c)).for_each(|(o, &i)| o.copy_from_slice(&xs[i * c..(i + 1) * c]));
        Tensor::from_f32(&[indices.len(), c], out)
    }

    fn timestep_embedding(&self, t: &[f32], dim: usize) -> Result<Tensor> {
        embed::timestep_embedding(t, dim)
    }

    fn pos_embed_2d(&self, h: usize, w: usize, dim: usize, scale: f32, base_size: f32) -> Result<Tensor> {
        embed::pos_embed_2d(h, w, dim, scale, base_size)
    }

    fn patchify(&self, x: &Tensor, grid: &PatchGrid) -> Result<Tensor> {
        embed::patchify(x, grid)
    }

    fn unpatchify(&self, x: &Tensor, grid: &PatchGrid, out_channels: usize) -> Result<Tensor> {
        embed::unpatchify(x, grid, out_channels)
    }

    fn guidance(&self, cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor> {
        ensure!(cond.shape() == uncond.shape(), "guidance: shapes {:?} and {:?} differ", cond.shape(), uncond.shape());
        let v: Vec<f32> = cond.f32()?.par_iter().zip(uncond.f32()?.par_iter()).with_min_len(ROW_CHUNK_ELEMS).map(|(c, u)| u + scale * (c - u)).collect();
        Tensor::from_f32(cond.shape(), v)
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        ensure!(x.shape() == y.shape(), "axpby: shapes {:?} and {:?} differ", x.shape(), y.shape());
        let v: Vec<f32> = x.f32()?.par_iter().zip(y.f32()?.par_iter()).with_min_len(ROW_CHUNK_ELEMS).map(|(x, y)| a * x + b * y).collect();
        Tensor::from_f32(x.shape(), v)
    }

    fn euler_step(&self, z: &mut Tensor, v: &Tensor, dt: &[f32]) -> Result<()> {
        ensure!(z.shape() == v.shape(), "euler step: shapes {:?} and {:?} differ", z.shape(), v.shape());
        let b = z.shape().first().copied().unwrap_or(0);
        ensure!(dt.len() == b, "euler step: {} step sizes for batch {b}", dt.len());
        let per = if b == 0 { 0 } else { z.numel() / b };
        let vs = v.f32()?;
        z.f32_mut()?.par_chunks_mut(per.max(1)).zip(vs.par_chunks(per.max(1))).zip(dt.par_iter()).for_each(|((zz, vv), &d)| {
            zz.iter_mut().zip(vv).for_each(|(a, b)| *a += b * d);
        });
        Ok(())
    }
}
