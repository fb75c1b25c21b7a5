//! Kernel correctness tests against f64 host references. They run only when
//! [`super::probe`] finds a GPU; otherwise each prints why it skipped and passes.
//! Every check draws fresh random inputs, poisons outputs with NaN first, and
//! compares by ||out - ref|| / ||ref|| (f32: 1e-5, bf16: 1e-2).

use super::abi::*;
use super::{launch_cfg, open_device, probe, KernelArgs, KernelModule};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use std::sync::Arc;

/// A device element type: f32, or bf16 stored as its u16 bits.
pub(super) trait Elem: DeviceRepr + Copy + Unpin + 'static {
    const SUFFIX: &'static str;
    const BYTES: usize;
    const TOL: f64;
    fn enc(v: f32) -> Self;
    fn dec(self) -> f32;
    fn poison() -> Self {
        Self::enc(f32::NAN)
    }
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const BYTES: usize = 4;
    const TOL: f64 = 1e-5;
    fn enc(v: f32) -> Self {
        v
    }
    fn dec(self) -> f32 {
        self
    }
}

impl Elem for u16 {
    const SUFFIX: &'static str = "bf16";
    const BYTES: usize = 2;
    const TOL: f64 = 1e-2;
    fn enc(v: f32) -> Self {
        half::bf16::from_f32(v).to_bits()
    }
    fn dec(self) -> f32 {
        half::bf16::from_bits(self).to_f32()
    }
}

/// Rounds through the element type (what the device actually sees).
pub(super) fn q<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::enc(x).dec()).collect()
}

pub(super) struct Rng(u64);
impl Rng {
    pub(super) fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(seed | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub(super) fn unif(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unif() * scale).collect()
    }
}

pub(super) struct Gpu {
    pub(super) module: KernelModule,
    pub(super) stream: Arc<CudaStream>,
}

/// The GPU these (ignored by default) tests run on; they fail loudly without one,
/// since running them means a GPU was expected (tools/gpu-check).
pub(super) fn gpu() -> Option<Gpu> {
    if let Err(e) = probe() {
        panic!("no usable CUDA GPU: {e}");
    }
    let ctx = open_device(0).expect("probe succeeded");
    let module = KernelModule::load(&ctx).expect("probe succeeded");
    Some(Gpu {
        stream: ctx.default_stream(),
        module,
    })
}

impl Gpu {
    pub(super) fn up<T: Elem>(&self, v: &[f32]) -> CudaSlice<T> {
        let host: Vec<T> = v.iter().map(|&x| T::enc(x)).collect();
        self.stream.clone_htod(&host).unwrap()
    }
    pub(super) fn up_raw<T: DeviceRepr + Copy>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).unwrap()
    }
    pub(super) fn poisoned<T: Elem>(&self, n: usize) -> CudaSlice<T> {
        self.stream.clone_htod(&vec![T::poison(); n]).unwrap()
    }
    pub(super) fn down<T: Elem>(&self, s: &CudaSlice<T>) -> Vec<f32> {
        self.stream
            .clone_dtoh(s)
            .unwrap()
            .into_iter()
            .map(|x| x.dec())
            .collect()
    }
    /// Device address of element `offset` of `s`.
    pub(super) fn addr<T: DeviceRepr>(&self, s: &CudaSlice<T>, offset: usize) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p + (offset * std::mem::size_of::<T>()) as u64
    }
    pub(super) fn run<A: KernelArgs>(&self, name: &str, (grid, block): (u32, u32), args: A) {
        // SAFETY: every test sizes its buffers for the accesses its args describe.
        unsafe { self.module.launch(name, grid, block, &self.stream, &args) }.unwrap();
        self.stream.synchronize().unwrap();
    }
}

pub(super) fn check(what: &str, out: &[f32], reference: &[f64], tol: f64) {
    assert_eq!(out.len(), reference.len(), "{what}: length");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        assert!(
            o.is_finite(),
            "{what}: element {i} is {o} (unwritten or NaN), reference {r}"
        );
        num += (o as f64 - r) * (o as f64 - r);
        den += r * r;
    }
    let rel = num.sqrt() / den.sqrt().max(1e-30);
    eprintln!("{what}: rel err {rel:.2e}");
    assert!(rel <= tol, "{what}: rel err {rel:.3e} > {tol:.0e}");
}

// ------------------------------------------------------------------ norm

fn layernorm_case<T: Elem>(
    g: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    per: usize,
    modulate: bool,
) {
    let samples = rows.div_ceil(per);
    let x = q::<T>(&rng.vec(rows * cols, 3.0));
    let table = q::<T>(&rng.vec(samples * 6 * cols, 0.5)); // [B, 6, C]: shift = 0, scale = 1
    let (dx, dt, dy) = (
        g.up::<T>(&x),
        g.up::<T>(&table),
        g.poisoned::<T>(rows * cols),
    );
    let eps = 1e-6f32;
    let args = QcLayerNormArgs {
        x: g.addr(&dx, 0),
        y: g.addr(&dy, 0),
        shift: if modulate { g.addr(&dt, 0) } else { 0 },
        scale: if modulate { g.addr(&dt, cols) } else { 0 },
        rows: rows as i64,
        x_row_stride: cols as i64,
        y_row_stride: cols as i64,
        shift_stride: 6 * cols as i64,
        scale_stride: 6 * cols as i64,
        rows_per_sample: per as i64,
        cols: cols as i32,
        eps,
    };
    let name = format!("qc_layernorm_mod_{}", T::SUFFIX);
    g.run(
        &name,
        launch_cfg::rows(rows as i64, cols as i64, T::BYTES),
        args,
    );
    let mut reference = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let b = r / per;
        for c in 0..cols {
            let n = (row[c] as f64 - mean) / (var + eps as f64).sqrt();
            reference.push(if modulate {
                let shift = table[b * 6 * cols + c] as f64;
                let scale = table[b * 6 * cols + cols + c] as f64;
                n * (1.0 + scale) + shift
            } else {
                n
            });
        }
    }
    check(
        &format!("{name} rows={rows} cols={cols} mod={modulate}"),
        &g.down(&dy),
        &reference,
        T::TOL,
    );
}

fn layernorm<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    layernorm_case::<T>(&g, &mut rng, 7, 1152, 3, true); // vector path
    layernorm_case::<T>(&g, &mut rng, 5, 1152, 5, false); // plain LayerNorm
    layernorm_case::<T>(&g, &mut rng, 6, 37, 2, true); // scalar path
    layernorm_case::<T>(&g, &mut rng, 3000, 64, 1000, true); // many rows
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn layernorm_mod_f32() {
    layernorm::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn layernorm_mod_bf16() {
    layernorm::<u16>();
}

fn rmsnorm_case<T: Elem>(g: &Gpu, rng: &mut Rng, tokens: usize, heads: usize, dim: usize) {
    // q of a [tokens, 3, heads, dim] qkv buffer, normalised in place.
    let c = heads * dim;
    let qkv = q::<T>(&rng.vec(tokens * 3 * c, 2.0));
    let w = q::<T>(&rng.vec(dim, 1.0));
    let (dqkv, dw) = (g.up::<T>(&qkv), g.up::<T>(&w));
    let eps = 1e-6f32;
    let args = QcRmsNormArgs {
        x: g.addr(&dqkv, 0),
        y: g.addr(&dqkv, 0),
        w: g.addr(&dw, 0),
        n_outer: tokens as i64,
        n_inner: heads as i64,
        x_outer_stride: 3 * c as i64,
        x_inner_stride: dim as i64,
        y_outer_stride: 3 * c as i64,
        y_inner_stride: dim as i64,
        dim: dim as i32,
        eps,
    };
    let name = format!("qc_rmsnorm_{}", T::SUFFIX);
    g.run(&name, launch_cfg::warp_rows((tokens * heads) as i64), args);
    let mut reference: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
    for t in 0..tokens {
        for h in 0..heads {
            let base = t * 3 * c + h * dim;
            let row = &qkv[base..base + dim];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..dim {
                reference[base + j] = w[j] as f64 * row[j] as f64 * inv;
            }
        }
    }
    let out = g.down(&dqkv);
    // k and v parts are untouched, bit for bit.
    for t in 0..tokens {
        for j in c..3 * c {
            assert_eq!(
                out[t * 3 * c + j].to_bits(),
                qkv[t * 3 * c + j].to_bits(),
                "{name} wrote outside q"
            );
        }
    }
    check(
        &format!("{name} tokens={tokens} heads={heads} dim={dim}"),
        &out,
        &reference,
        T::TOL,
    );
}

fn rmsnorm<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    rmsnorm_case::<T>(&g, &mut rng, 9, 16, 72);
    rmsnorm_case::<T>(&g, &mut rng, 5, 3, 37);
    rmsnorm_case::<T>(&g, &mut rng, 2, 2, 129);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn rmsnorm_f32() {
    rmsnorm::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn rmsnorm_bf16() {
    rmsnorm::<u16>();
}

// ----------------------------------------------------------- elementwise

fn unary_case<T: Elem>(
    g: &Gpu,
    rng: &mut Rng,
    kind: &str,
    n: usize,
    offset: usize,
    in_place: bool,
) {
    let x = q::<T>(&rng.vec(n + offset, 6.0));
    let dx = g.up::<T>(&x);
    let dy = if in_place {
        None
    } else {
        Some(g.poisoned::<T>(n + offset))
    };
    let y_slice = dy.as_ref().unwrap_or(&dx);
    let args = QcUnaryArgs {
        x: g.addr(&dx, offset),
        y: g.addr(y_slice, offset),
        n: n as i64,
    };
    let name = format!("qc_{kind}_{}", T::SUFFIX);
    g.run(&name, launch_cfg::flat(n as i64, T::BYTES), args);
    let reference: Vec<f64> = x[offset..]
        .iter()
        .map(|&v| {
            let v = v as f64;
            match kind {
                "silu" => v / (1.0 + (-v).exp()),
                _ => {
                    0.5 * v
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v))
                                .tanh())
                }
            }
        })
        .collect();
    check(
        &format!("{name} n={n} off={offset} in_place={in_place}"),
        &g.down(y_slice)[offset..],
        &reference,
        T::TOL,
    );
}

fn unary<T: Elem>(kind: &str) {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    unary_case::<T>(&g, &mut rng, kind, 4096 * 3 + 5, 0, false);
    unary_case::<T>(&g, &mut rng, kind, 1001, 1, false); // misaligned: scalar path
    unary_case::<T>(&g, &mut rng, kind, 777, 0, true);
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn silu_f32() {
    unary::<f32>("silu");
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn silu_bf16() {
    unary::<u16>("silu");
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gelu_tanh_f32() {
    unary::<f32>("gelu_tanh");
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gelu_tanh_bf16() {
    unary::<u16>("gelu_tanh");
}

fn add<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for (n, off) in [(10_000usize, 0usize), (1003, 1)] {
        let a = q::<T>(&rng.vec(n + off, 2.0));
        let b = q::<T>(&rng.vec(n + off, 2.0));
        let (da, db, dy) = (g.up::<T>(&a), g.up::<T>(&b), g.poisoned::<T>(n + off));
        let name = format!("qc_add_{}", T::SUFFIX);
        let args = QcBinaryArgs {
            a: g.addr(&da, off),
            b: g.addr(&db, off),
            y: g.addr(&dy, off),
            n: n as i64,
        };
        g.run(&name, launch_cfg::flat(n as i64, T::BYTES), args);
        let reference: Vec<f64> = (off..n + off).map(|i| a[i] as f64 + b[i] as f64).collect();
        check(
            &format!("{name} n={n}"),
            &g.down(&dy)[off..],
            &reference,
            T::TOL,
        );
        // In place: a += b.
        let args = QcBinaryArgs {
            y: g.addr(&da, off),
            ..args
        };
        g.run(&name, launch_cfg::flat(n as i64, T::BYTES), args);
        check(
            &format!("{name} n={n} in place"),
            &g.down(&da)[off..],
            &reference,
            T::TOL,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn add_f32() {
    add::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn add_bf16() {
    add::<u16>();
}

fn bias_add<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for (rows, cols) in [(33usize, 6 * 1152usize), (9, 19)] {
        let x = q::<T>(&rng.vec(rows * cols, 2.0));
        let bias = q::<T>(&rng.vec(cols, 2.0));
        let (dx, db, dy) = (
            g.up::<T>(&x),
            g.up::<T>(&bias),
            g.poisoned::<T>(rows * cols),
        );
        let name = format!("qc_bias_add_{}", T::SUFFIX);
        let args = QcBiasAddArgs {
            x: g.addr(&dx, 0),
            bias: g.addr(&db, 0),
            y: g.addr(&dy, 0),
            rows: rows as i64,
            cols: cols as i32,
            _pad: 0,
        };
        g.run(
            &name,
            launch_cfg::rows(rows as i64, cols as i64, T::BYTES),
            args,
        );
        let reference: Vec<f64> = (0..rows * cols)
            .map(|i| x[i] as f64 + bias[i % cols] as f64)
            .collect();
        check(
            &format!("{name} {rows}x{cols}"),
            &g.down(&dy),
            &reference,
            T::TOL,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn bias_add_f32() {
    bias_add::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn bias_add_bf16() {
    bias_add::<u16>();
}

fn gated_residual<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // (rows, cols, group size, group index given, gate given)
    for (rows, cols, per, indexed, gated) in [(10usize, 1152usize, 4usize, false, true), (7, 21, 2, false, true), (12, 72, 3, true, true), (5, 40, 1, false, false)] {
        let groups = rows.div_ceil(per);
        let x = q::<T>(&rng.vec(rows * cols, 2.0));
        let y = q::<T>(&rng.vec(rows * cols, 2.0));
        // A modulation table [entries, 6, C] in f32, the gate its chunk 2; with an index, group
        // g reads entry index[g] (reversed, as x_mask's t0 entries are out of order).
        let entries = groups + 1;
        let table: Vec<f32> = rng.vec(entries * 6 * cols, 1.0);
        let index: Vec<i32> = (0..groups).map(|g| (groups - g) as i32).collect();
        let (dx, dy, dt) = (g.up::<T>(&x), g.up::<T>(&y), g.up::<f32>(&table));
        let di = g.up_raw::<i32>(&index);
        let name = format!("qc_gated_residual_{}", T::SUFFIX);
        let args = QcGatedResidualArgs {
            x: g.addr(&dx, 0),
            y: g.addr(&dy, 0),
            gate: if gated { g.addr(&dt, 2 * cols) } else { 0 },
            group_index: if indexed { g.addr(&di, 0) } else { 0 },
            rows: rows as i64,
            group_size: per as i64,
            gate_stride: 6 * cols as i64,
            cols: cols as i32,
            _pad: 0,
        };
        g.run(&name, launch_cfg::rows(rows as i64, cols as i64, T::BYTES), args);
        let reference: Vec<f64> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let e = if indexed { index[r / per] as usize } else { r / per };
                let gate = if gated { table[e * 6 * cols + 2 * cols + c] as f64 } else { 1.0 };
                x[i] as f64 + gate * y[i] as f64
            })
            .collect();
        check(&format!("{name} {rows}x{cols} per {per} indexed {indexed} gated {gated}"), &g.down(&dx), &reference, T::TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gated_residual_f32() {
    gated_residual::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gated_residual_bf16() {
    gated_residual::<u16>();
}

// ------------------------------------------------------------------ rope

fn rope<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    // (batch, seq, heads, head_dim, token stride factor): 1 = contiguous
    // [batch, seq, heads, head_dim]; 3 = q inside a [batch, seq, 3, heads, head_dim] qkv buffer.
    for (batch, seq, heads, hd, k) in [
        (3usize, 6usize, 4usize, 72usize, 1usize),
        (2, 30, 16, 72, 3),
        (2, 5, 3, 6, 1),
    ] {
        let c = heads * hd;
        let x = q::<T>(&rng.vec(batch * seq * k * c, 2.0));
        let freqs: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let (dx, df) = (g.up::<T>(&x), g.up_raw(&freqs));
        let name = format!("qc_rope_{}", T::SUFFIX);
        let args = QcRopeArgs {
            x: g.addr(&dx, 0),
            freqs: g.addr(&df, 0),
            batch: batch as i64,
            batch_stride: (seq * k * c) as i64,
            seq_stride: (k * c) as i64,
            head_stride: hd as i64,
            seq: seq as i32,
            heads: heads as i32,
            head_dim: hd as i32,
            _pad: 0,
        };
        g.run(
            &name,
            launch_cfg::per_row_threads((batch * seq) as i64, (heads * hd / 2) as i64),
            args,
        );
        let mut reference: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for n in 0..batch {
            for p in 0..seq {
                for h in 0..heads {
                    let base = n * seq * k * c + p * k * c + h * hd;
                    for kk in 0..hd / 2 {
                        let a = (p as f32 * freqs[kk]) as f64;
                        let (s, co) = a.sin_cos();
                        let (x0, x1) = (x[base + 2 * kk] as f64, x[base + 2 * kk + 1] as f64);
                        reference[base + 2 * kk] = x0 * co - x1 * s;
                        reference[base + 2 * kk + 1] = x1 * co + x0 * s;
                    }
                }
            }
        }
        check(
            &format!("{name} {batch}x{seq}x{heads}x{hd} k={k}"),
            &g.down(&dx),
            &reference,
            T::TOL,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn rope_f32() {
    rope::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn rope_bf16() {
    rope::<u16>();
}

// ----------------------------------------------------------------- embed

fn timestep_embed<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for dim in [256usize, 7] {
        let mut t: Vec<f32> = (0..5).map(|_| (rng.unif() + 1.0) * 500.0).collect();
        t[0] = 0.0;
        let (dt, dout) = (g.up_raw(&t), g.poisoned::<T>(t.len() * dim));
        let name = format!("qc_timestep_embed_{}", T::SUFFIX);
        let args = QcTimestepEmbedArgs {
            t: g.addr(&dt, 0),
            out: g.addr(&dout, 0),
            n: t.len() as i64,
            dim: dim as i32,
            max_period: 10000.0,
        };
        g.run(&name, launch_cfg::flat_scalar((t.len() * dim) as i64), args);
        let half = dim / 2;
        let mut reference = Vec::new();
        for &tv in &t {
            // Frequencies and arguments in f32, as PyTorch computes them.
            let f: Vec<f32> = (0..half)
                .map(|i| ((-(10000f64.ln()) as f32) * i as f32 / half as f32).exp())
                .collect();
            let args: Vec<f64> = f.iter().map(|&fi| (tv * fi) as f64).collect();
            reference.extend(args.iter().map(|a| a.cos()));
            reference.extend(args.iter().map(|a| a.sin()));
            if dim % 2 == 1 {
                reference.push(0.0);
            }
        }
        // f32 arguments up to 1000 carry ~1e-4 absolute rounding (as in PyTorch), hence 1e-3.
        check(
            &format!("{name} dim={dim}"),
            &g.down(&dout),
            &reference,
            T::TOL.max(1e-3),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn timestep_embed_f32() {
    timestep_embed::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn timestep_embed_bf16() {
    timestep_embed::<u16>();
}

fn mask_select<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for (b, t, s, cols) in [(2usize, 3usize, 5usize, 1152usize), (1, 4, 3, 13)] {
        let rows = b * t * s;
        let a = q::<T>(&rng.vec(rows * cols, 1.0));
        let bb = q::<T>(&rng.vec(rows * cols, 1.0));
        let mut mask: Vec<u8> = (0..b * t).map(|_| (rng.next() & 1) as u8).collect();
        mask[0] = 1;
        mask[b * t - 1] = 0;
        let (da, db, dm, dout) = (
            g.up::<T>(&a),
            g.up::<T>(&bb),
            g.up_raw(&mask),
            g.poisoned::<T>(rows * cols),
        );
        let name = format!("qc_mask_select_{}", T::SUFFIX);
        let args = QcMaskSelectArgs {
            a: g.addr(&da, 0),
            b: g.addr(&db, 0),
            out: g.addr(&dout, 0),
            mask: g.addr(&dm, 0),
            rows: rows as i64,
            rows_per_mask: s as i64,
            cols: cols as i32,
            _pad: 0,
        };
        let shape = launch_cfg::rows(rows as i64, cols as i64, T::BYTES);
        g.run(&name, shape, args);
        let reference: Vec<f64> = (0..rows * cols)
            .map(|i| {
                if mask[i / cols / s] != 0 {
                    a[i] as f64
                } else {
                    bb[i] as f64
                }
            })
            .collect();
        check(
            &format!("{name} {b}x{t}x{s}x{cols}"),
            &g.down(&dout),
            &reference,
            0.0,
        );
        // In place into a.
        g.run(
            &name,
            shape,
            QcMaskSelectArgs {
                out: g.addr(&da, 0),
                ..args
            },
        );
        check(
            &format!("{name} {b}x{t}x{s}x{cols} in place"),
            &g.down(&da),
            &reference,
            0.0,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn mask_select_f32() {
    mask_select::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn mask_select_bf16() {
    mask_select::<u16>();
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn launch_rejects_wrong_args_and_shapes() {
    let Some(g) = gpu() else { return };
    let args = QcUnaryArgs::default();
    // SAFETY: every call below is rejected before reaching the driver.
    unsafe {
        assert!(g
            .module
            .launch("qc_add_f32", 1, 32, &g.stream, &args)
            .is_err());
        assert!(g
            .module
            .launch("qc_silu_f32", 1, 33, &g.stream, &args)
            .is_err());
        assert!(g
            .module
            .launch("qc_silu_f32", 0, 32, &g.stream, &args)
            .is_err());
        assert!(g
            .module
            .launch("qc_silu_f32", 1, 2048, &g.stream, &args)
            .is_err());
    }
}
