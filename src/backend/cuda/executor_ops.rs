//! The ops of [`CudaBackend`]: `Backend` (the DiT, the sampler, T5) on the
//! kernels (`ConvOps` is in `conv_ops.rs`). Each op checks
//! its shapes as the CPU backend does (same messages where they can be).

use super::abi::*;
use super::buffer::DeviceBuffer;
use super::executor::{float_dtype, host_slice, rows_of, CudaBackend};
use super::graph::StepValues;
use super::launch_cfg;
use crate::backend::{Activation, AttnSpec, Backend, Linear, LinearWeight, ModRef, PatchGrid, PendingSums, Rope, StepGraphSession};
use crate::tensor::{byte_len, DType, Storage, Tensor};
use anyhow::{anyhow, bail, ensure, Result};

/// Where a GEMM writes and what its epilogue reads (device addresses; 0 = none).
struct GemmDst {
    out: u64,
    ldo: usize,
    epilogue: u32,
    residual: u64,
    ldr: usize,
    gate: u64,
    gate_stride: usize,
    group_index: u64,
    group_size: usize,
}

impl GemmDst {
    fn plain(out: u64, ldo: usize, act: Activation) -> Self {
        let epilogue = if act == Activation::GeluTanh { QC_EPI_GELU_TANH } else { QC_EPI_NONE };
        GemmDst { out, ldo, epilogue, residual: 0, ldr: ldo, gate: 0, gate_stride: 0, group_index: 0, group_size: 1 }
    }
}

/// The activations of a GEMM: a float tensor (quantized in `gemm_into` for an
/// integer weight), or int8 rows and their f32 scales already quantized by their
/// producer (qc_layernorm_mod_q8_bf16), `[rows, kq]` as the weight's `kq`.
#[derive(Clone, Copy)]
enum GemmInput<'a> {
    Float(&'a Tensor),
    Quantized { q: u64, scale: u64 },
}

/// Device addresses of a modulation's rows (held alive by `_keep` until the
/// kernel reading them is launched): row `r` reads entry `r / rows_per`.
struct ModulationOperands {
    _keep: [DeviceBuffer; 2],
    shift: u64,
    shift_stride: i64,
    scale: u64,
    scale_stride: i64,
    rows_per: i64,
}

impl CudaBackend {
    /// The int8 rows and scales of an integer GEMM's activations, and the buffers
    /// holding them when quantized here (kept alive until the GEMM is launched).
    fn integer_activations(&self, input: GemmInput, rows: usize, k: usize, kq: usize, inv_smooth: u64, qmax: i32) -> Result<(u64, u64, Option<(DeviceBuffer, DeviceBuffer)>)> {
        match input {
            GemmInput::Float(x) => {
                let xb = self.dev_aligned(x, DType::BF16)?;
                let (qa, scale) = self.quantize_activations(xb.address(), rows, k, kq, inv_smooth, qmax)?;
                Ok((qa.address(), scale.address(), Some((qa, scale))))
            }
            GemmInput::Quantized { q, scale } => Ok((q, scale, None)),
        }
    }

    /// `act(input W^T + b)` as a bf16 tensor of `shape` with its last dim `w.out_features`.
    fn linear_rows(&self, input: GemmInput, rows: usize, shape: &[usize], w: &Linear, act: Activation) -> Result<Tensor> {
        let n = w.out_features;
        let mut shape = shape.to_vec();
        *shape.last_mut().unwrap() = n;
        let out = self.alloc(DType::BF16, rows * n)?;
        if rows > 0 && n > 0 {
            let np = n.next_multiple_of(8);
            if np == n {
                self.gemm_into(input, w, rows, &GemmDst::plain(out.address(), n, act))?;
            } else {
                let tmp = self.alloc(DType::BF16, rows * np)?;
                self.gemm_into(input, w, rows, &GemmDst::plain(tmp.address(), np, act))?;
                self.copy_rows(DType::BF16, tmp.address(), out.address(), rows, n, (np, n), (0, 0), 0, None)?;
            }
            if act == Activation::Silu {
                let m = rows * n;
                self.flat_kernel("qc_silu", DType::BF16, m, true, QcUnaryArgs { x: out.address(), y: out.address(), n: m as i64 })?;
            }
        }
        self.tensor(&shape, out)
    }

    /// `x` (bf16 `[rows, k]`) quantized per row for an integer GEMM (qc_quantize_rows_bf16):
    /// int8 `[rows, kq]` (columns past `k` zero) and the f32 row scales.
    fn quantize_activations(&self, x: u64, rows: usize, k: usize, kq: usize, inv_smooth: u64, qmax: i32) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let qa = if kq == k { self.alloc(DType::I8, rows * kq)? } else { self.zeros(DType::I8, rows * kq)? };
        let scale = self.alloc(DType::F32, rows)?;
        let args = QcQuantizeArgs {
            x,
            inv_smooth,
            q: qa.address(),
            scale: scale.address(),
            rows: rows as i64,
            ldx: k as i64,
            ldq: kq as i64,
            cols: k as i32,
            qmax,
        };
        self.run("qc_quantize_rows_bf16", launch_cfg::rows(rows as i64, k as i64, 2), args)?;
        Ok((qa, scale))
    }

    /// `dst = epilogue(x W^T + b)` for `x` viewed as `[rows, k]` (rows > 0): the bf16 GEMM
    /// ([`CudaBackend::gemm_kernel`]), or qc_quantize_rows_bf16 + qc_gemm_w8a8 / qc_gemm_w4a8 for
    /// an int8 / int4 weight. `k` not a multiple of 8 (16 for int8, 64 for int4) is zero-padded
    /// in temporaries (int4: in the uploaded weight too).
    fn gemm_into(&self, input: GemmInput, w: &Linear, rows: usize, d: &GemmDst) -> Result<()> {
        let (k, n) = (w.in_features, w.out_features);
        let bias = match &w.bias {
            None => None,
            Some(b) => {
                ensure!(b.numel() == n, "linear bias has {} entries for {n} outputs", b.numel());
                Some(self.dev(b, DType::F32)?)
            }
        };
        let bias_addr = bias.as_ref().map_or(0, |b| b.address());
        let gs = d.group_size.max(1) as i64;
        match &w.weight {
            LinearWeight::Int8(q) => {
                ensure!(q.n == n && q.k == k, "int8 weight [{}, {}] does not match the layer [{n}, {k}]", q.n, q.k);
                let dq = self.weight_int8(q)?;
                let kq = dq.kq;
                let (qa, scale, _keep) = self.integer_activations(input, rows, k, kq, dq.inv_smooth.as_ref().map_or(0, |s| s.address()), q.act_qmax)?;
                let args = QcGemmI8Args {
                    a: qa,
                    a_scale: scale,
                    w: dq.q.address(),
                    w_scale: dq.scale.address(),
                    bias: bias_addr,
                    out: d.out,
                    residual: d.residual,
                    gate: d.gate,
                    group_index: d.group_index,
                    acc_out: 0,
                    m: rows as i64,
                    n: n as i64,
                    k: kq as i64,
                    lda: kq as i64,
                    ldw: kq as i64,
                    ldo: d.ldo as i64,
                    ldr: d.ldr as i64,
                    gate_stride: d.gate_stride as i64,
                    group_size: gs,
                    epilogue: d.epilogue as i32,
                    _pad: 0,
                };
                self.run_ext("qc_gemm_w8a8", launch_cfg::gemm(rows as i64, n as i64), args)
            }
            LinearWeight::Int4(q) => {
                ensure!(q.n == n && q.k == k, "int4 weight [{}, {}] does not match the layer [{n}, {k}]", q.n, q.k);
                let dq = self.weight_int4(q)?;
                let kq = dq.kq;
                let (qa, scale, _keep) = self.integer_activations(input, rows, k, kq, dq.inv_smooth.as_ref().map_or(0, |s| s.address()), q.act_qmax)?;
                let args = QcGemmW4Args {
                    a: qa,
                    a_scale: scale,
                    w: dq.w.address(),
                    w_scale: dq.scale.address(),
                    bias: bias_addr,
                    out: d.out,
                    residual: d.residual,
                    gate: d.gate,
                    group_index: d.group_index,
                    acc_out: 0,
                    m: rows as i64,
                    n: n as i64,
                    k: kq as i64,
                    lda: kq as i64,
                    ldw: (kq / 2) as i64,
                    ldo: d.ldo as i64,
                    ldr: d.ldr as i64,
                    gate_stride: d.gate_stride as i64,
                    group_size: gs,
                    epilogue: d.epilogue as i32,
                    _pad: 0,
                };
                self.run_gemm_w4a8(args)
            }
            LinearWeight::F32(_) | LinearWeight::Half(_) => {
                let GemmInput::Float(x) = input else { bail!("a float weight's GEMM got quantized activations") };
                let xb = self.dev_aligned(x, DType::BF16)?;
                let wb = self.weight_bf16(w)?;
                let (a, wt, kk, _keep) = if k % 8 == 0 {
                    (xb.address(), wb.address(), k, None)
                } else {
                    let kp = k.next_multiple_of(8);
                    let ap = self.zeros(DType::BF16, rows * kp)?;
                    self.copy_rows(DType::BF16, xb.address(), ap.address(), rows, k, (k, kp), (0, 0), 0, None)?;
                    let wp = self.zeros(DType::BF16, n * kp)?;
                    self.copy_rows(DType::BF16, wb.address(), wp.address(), n, k, (k, kp), (0, 0), 0, None)?;
                    (ap.address(), wp.address(), kp, Some((ap, wp)))
                };
                let args = QcGemmArgs {
                    a,
                    w: wt,
                    bias: bias_addr,
                    out: d.out,
                    residual: d.residual,
                    gate: d.gate,
                    group_index: d.group_index,
                    m: rows as i64,
                    n: n as i64,
                    k: kk as i64,
                    lda: kk as i64,
                    ldw: kk as i64,
                    ldo: d.ldo as i64,
                    ldr: d.ldr as i64,
                    gate_stride: d.gate_stride as i64,
                    group_size: gs,
                    epilogue: d.epilogue as i32,
                    _pad: 0,
                };
                self.run_gemm_bf16(args)
            }
        }
    }

    /// A flat elementwise kernel `name_{suffix}` over `n` elements.
    fn flat_kernel<A: super::KernelArgs>(&self, name: &str, dtype: DType, n: usize, vectorized: bool, args: A) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let cfg = if vectorized { launch_cfg::flat(n as i64, byte_len(dtype, 1)) } else { launch_cfg::flat_scalar(n as i64) };
        self.run(&format!("{name}_{}", Self::suffix(dtype)?), cfg, args)
    }

    /// A modulation's shift and scale operands for the layer-norm kernels.
    fn modulation_operands(&self, modulation: Option<&(ModRef, ModRef)>, rows: usize, c: usize, dtype: DType) -> Result<Option<ModulationOperands>> {
        let Some((shift, scale)) = modulation else { return Ok(None) };
        ensure!(shift.groups == scale.groups, "shift and scale use different row groups");
        let (shift_buf, sa, ss, per) = self.mod_rows(shift, rows, c, dtype, "modulate shift")?;
        let (scale_buf, ca, cs, _) = self.mod_rows(scale, rows, c, dtype, "modulate scale")?;
        Ok(Some(ModulationOperands {
            _keep: [shift_buf, scale_buf],
            shift: sa,
            shift_stride: ss as i64,
            scale: ca,
            scale_stride: cs as i64,
            rows_per: per.max(1) as i64,
        }))
    }

    /// `shift`/`scale` of a modulation for the row kernels: `(keep-alive, address,
    /// row stride, rows per entry)` of `dtype` vectors, row `r` reading entry `r / rows_per`.
    /// Identity row groups point into the table; others gather one vector per group.
    fn mod_rows(&self, m: &ModRef, rows: usize, c: usize, dtype: DType, what: &str) -> Result<(DeviceBuffer, u64, usize, usize)> {
        let (table, chunks) = self.mod_table(m, rows, c, what)?;
        let entries = m.table.shape()[0];
        let t = if dtype == DType::F32 {
            table
        } else {
            let tt = Tensor::new(&[entries * chunks, c], Storage::Cuda(table))?;
            self.dev(&tt, dtype)?
        };
        let es = byte_len(dtype, 1) as u64;
        match self.group_index(m.groups)? {
            None => {
                let addr = t.address() + (m.chunk * c) as u64 * es;
                Ok((t, addr, chunks * c, m.groups.group_size))
            }
            Some(_) => {
                let g = m.groups.index.len();
                let idx: Vec<i32> = m.groups.index.iter().map(|&e| (e * chunks + m.chunk) as i32).collect();
                let idx = self.i32_array(b'm', &idx)?;
                let out = self.alloc(dtype, g * c)?;
                self.copy_rows(dtype, t.address(), out.address(), g, c, (c, c), (0, 0), idx.address(), None)?;
                let addr = out.address();
                Ok((out, addr, c, m.groups.group_size))
            }
        }
    }

    /// Attention on the host (f32), for what the kernels do not cover: a head dim
    /// outside them, or a score bias with scale 0.
    fn attention_on_host(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>, why: &'static str) -> Result<Tensor> {
        self.note_once(why, || format!("attention {why}: computed on the CPU (host fallback)"));
        let (qh, kh, vh) = (self.host_f32(q)?, self.host_f32(k)?, self.host_f32(v)?);
        let bh = bias.map(|b| self.host_f32(b)).transpose()?;
        let out = self.cpu.attention(&qh, &kh, &vh, spec, bh.as_deref())?;
        let b = self.dev(&out, DType::BF16)?;
        self.tensor(out.shape(), b)
    }

    /// Attention with int8 Q and K (`spec.qk_int8`, checked shapes, no bias): K's mean,
    /// Q and K quantized per block of 64 rows into arena temporaries, then
    /// qc_attention_i8_dNN. `acc_out`: int32 `[groups, heads, q_len, max kv length]`
    /// that also receives the integer products (tests).
    pub(crate) fn attention_i8(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, acc_out: Option<&DeviceBuffer>) -> Result<Tensor> {
        let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
        let c = h * d;
        let Some((name, dp)) = launch_cfg::attention_i8_kernel(d) else {
            return self.attention_on_host(q, k, v, spec, None, "with int8 Q and K and a head dim the kernels do not cover");
        };
        let max_end = spec.kv_ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        let fits = |v: usize| v <= i32::MAX as usize;
        ensure!(fits(g) && fits(lq) && fits(h) && fits(max_end), "attention of {g} groups of {lq} queries is too large for the kernel");
        let out = self.alloc(DType::BF16, g * lq * c)?;
        if g * lq == 0 {
            return self.tensor(&[g * lq, c], out);
        }
        let block = crate::backend::cpu::attention_int8::QK_BLOCK;
        let (q_pad, kv_pad) = (lq.div_ceil(block) * block, max_len.div_ceil(block) * block);
        let (qb, kb, vb) = (self.dev_aligned(q, DType::BF16)?, self.dev_aligned(k, DType::BF16)?, self.dev_aligned(v, DType::BF16)?);
        let self_layout = spec.kv_ranges.iter().enumerate().all(|(gi, &(a, b))| a == gi * lq && b == a + lq);
        let starts: Vec<i32> = spec.kv_ranges.iter().map(|r| r.0 as i32).collect();
        let ends: Vec<i32> = spec.kv_ranges.iter().map(|r| r.1 as i32).collect();
        let (starts, ends) = (self.i32_array(b's', &starts)?, self.i32_array(b'e', &ends)?);

        let mean = self.alloc(DType::F32, g * h * d)?;
        let mean_args = QcQkMeanArgs { k: kb.address(), mean: mean.address(), row_start: starts.address(), row_end: ends.address(), ldk: c as i64, groups: g as i32, heads: h as i32, head_dim: d as i32, _pad: 0 };
        self.run("qc_qk_mean_bf16", launch_cfg::qk_mean((g * h) as i64), mean_args)?;

        let (q8, q_scale) = (self.alloc(DType::I8, g * h * q_pad * dp)?, self.alloc(DType::F32, g * h * q_pad / block)?);
        let (k8, k_scale) = (self.alloc(DType::I8, g * h * kv_pad * dp)?, self.alloc(DType::F32, g * h * kv_pad / block)?);
        let quant = |x: &DeviceBuffer, mean: u64, ranges: Option<(&DeviceBuffer, &DeviceBuffer)>, rows_pad: usize, qo: &DeviceBuffer, so: &DeviceBuffer| {
            let args = QcQuantizeQkArgs {
                x: x.address(),
                mean,
                row_start: ranges.map_or(0, |r| r.0.address()),
                row_end: ranges.map_or(0, |r| r.1.address()),
                q: qo.address(),
                scale: so.address(),
                ldx: c as i64,
                rows_pad: rows_pad as i64,
                seq_len: lq as i32,
                groups: g as i32,
                heads: h as i32,
                head_dim: d as i32,
                dp: dp as i32,
                _pad: 0,
            };
            self.run("qc_quantize_qk_bf16", launch_cfg::quantize_qk((g * h * rows_pad / block) as i64), args)
        };
        quant(&qb, 0, None, q_pad, &q8, &q_scale)?;
        quant(&kb, mean.address(), Some((&starts, &ends)), kv_pad, &k8, &k_scale)?;

        let args = QcAttentionI8Args {
            q8: q8.address(),
            q_scale: q_scale.address(),
            k8: k8.address(),
            k_scale: k_scale.address(),
            v: vb.address(),
            out: out.address(),
            kv_start: if self_layout { 0 } else { starts.address() },
            kv_end: if self_layout { 0 } else { ends.address() },
            acc_out: acc_out.map_or(0, |b| b.address()),
            ldv: c as i64,
            ldo: c as i64,
            q_rows_pad: q_pad as i64,
            kv_rows_pad: kv_pad as i64,
            acc_ld: max_len as i64,
            groups: g as i32,
            q_len: lq as i32,
            heads: h as i32,
            head_dim: d as i32,
            dp: dp as i32,
            scale: spec.scale,
        };
        self.run(name, launch_cfg::attention(lq as i64, h as i64, g as i64), args)?;
        self.tensor(&[g * lq, c], out)
    }

    /// [`Backend::attention`] with `spec.qk_int8`, also returning the int32 products
    /// `S` as a host tensor `[groups * heads * q_len, max kv length]` (entries past a
    /// group's keys `i32::MIN`): what tests compare with the CPU's
    /// `attention_int8::scores_i32` exactly.
    pub fn attention_i8_with_scores(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor)> {
        ensure!(spec.qk_int8, "attention_i8_with_scores: spec.qk_int8 is not set");
        spec.check(q, k, v, None)?;
        ensure!(launch_cfg::attention_i8_kernel(spec.head_dim).is_some(), "attention_i8_with_scores: no int8 kernel for head dim {}", spec.head_dim);
        let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        let rows = spec.groups * spec.heads * spec.q_len;
        let acc = self.upload_slice(DType::I32, &vec![i32::MIN; rows * max_len])?;
        let out = self.attention_i8(q, k, v, spec, Some(&acc))?;
        let scores = self.tensor(&[rows, max_len], acc)?.to_cpu()?;
        Ok((out, scores))
    }

    /// The two sums per part of `l1_distance` / `abs_sum` (`kernel`: the first
    /// pass's name without its dtype suffix): the partials kernel, qc_sum_partials,
    /// then one download of `parts` pairs (which synchronizes the stream).
    fn divergence_sums(&self, kernel: &str, what: &str, a: &Tensor, b: Option<&Tensor>, part_len: usize, parts: usize) -> Result<Vec<(f32, f32)>> {
        self.refuse_in_capture(&format!("{what}'s device-to-host copy"))?;
        let out = self.zeros(DType::F32, 2 * parts)?;
        self.divergence_into(kernel, what, a, b, part_len, parts, out.address())?;
        let sums: Vec<f32> = bytemuck::pod_collect_to_vec(&out.download().map_err(|e| anyhow!("{what}: {e}"))?);
        Ok(sums.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }

    /// Launches the reduction of `a` (against `b`) writing its `2 * parts` sums at device
    /// address `out` (zeroed by the caller).
    #[allow(clippy::too_many_arguments)]
    fn divergence_into(&self, kernel: &str, what: &str, a: &Tensor, b: Option<&Tensor>, part_len: usize, parts: usize, out: u64) -> Result<()> {
        let inputs: Vec<&Tensor> = std::iter::once(a).chain(b).collect();
        for t in &inputs {
            ensure!(matches!(t.dtype(), DType::F32 | DType::BF16), "{what}: expected an f32 or bf16 tensor, got {}", t.dtype().name());
        }
        ensure!(parts <= i32::MAX as usize, "{what}: {parts} parts are too many for the kernel");
        // Empty parts: `out` holds zeros already (the callers allocate it zeroed).
        if part_len == 0 {
            return Ok(());
        }
        // Both inputs in one dtype: f32 when they differ (bf16 widens exactly).
        let dt = if inputs.iter().all(|t| t.dtype() == a.dtype()) { a.dtype() } else { DType::F32 };
        let ab = self.dev(a, dt)?;
        let bb = b.map(|b| self.dev(b, dt)).transpose()?;
        let (grid, block, per_part) = launch_cfg::divergence(part_len as i64, parts as i64, byte_len(dt, 1));
        let partials = self.alloc(DType::F32, 2 * grid as usize)?;
        let args = QcDivergenceArgs {
            a: ab.address(),
            b: bb.as_ref().map_or(0, |b| b.address()),
            partials: partials.address(),
            out,
            part_len: part_len as i64,
            parts: parts as i32,
            blocks_per_part: per_part as i32,
        };
        self.run(&format!("{kernel}_{}", Self::suffix(dt)?), (grid, block), args)?;
        self.run("qc_sum_partials", launch_cfg::sum_partials(), args)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda ({})", self.gpu().name)
    }

    fn prepare_linear(&self, w: &mut Linear) -> Result<()> {
        self.prepare_linear_impl(w)
    }

    fn prepare_tensor(&self, t: &mut Tensor) -> Result<()> {
        self.prepare_tensor_impl(t)
    }

    fn step_graphs(&self) -> Option<Box<dyn StepGraphSession + '_>> {
        self.step_graph_session()
    }

    fn linear(&self, x: &Tensor, w: &Linear, act: Activation) -> Result<Tensor> {
        let (rows, k) = rows_of(x);
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        self.linear_rows(GemmInput::Float(x), rows, x.shape(), w, act)
    }

    fn norm_modulate_linear(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>, w: &Linear, act: Activation) -> Result<Tensor> {
        let (rows, k) = rows_of(x);
        let integer = matches!(w.weight, LinearWeight::Int8(_) | LinearWeight::Int4(_));
        // Fused where it gives the two ops' values: bf16 rows, which the separate
        // layer norm stores in bf16 and the GEMM then quantizes.
        if !integer || float_dtype(&[x]) != DType::BF16 || rows == 0 || k == 0 {
            let h = self.layer_norm_modulate(x, eps, modulation)?;
            return self.linear(&h, w, act);
        }
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        // The device weight is held until the GEMM is launched.
        let (kq, inv_smooth, qmax, _weight): (usize, u64, i32, Box<dyn std::any::Any>) = match &w.weight {
            LinearWeight::Int8(q) => {
                ensure!(q.n == w.out_features && q.k == k, "int8 weight [{}, {}] does not match the layer [{}, {k}]", q.n, q.k, w.out_features);
                let dq = self.weight_int8(q)?;
                (dq.kq, dq.inv_smooth.as_ref().map_or(0, |s| s.address()), q.act_qmax, Box::new(dq))
            }
            LinearWeight::Int4(q) => {
                ensure!(q.n == w.out_features && q.k == k, "int4 weight [{}, {}] does not match the layer [{}, {k}]", q.n, q.k, w.out_features);
                let dq = self.weight_int4(q)?;
                (dq.kq, dq.inv_smooth.as_ref().map_or(0, |s| s.address()), q.act_qmax, Box::new(dq))
            }
            LinearWeight::F32(_) | LinearWeight::Half(_) => bail!("norm_modulate_linear: a float weight reached the integer path"),
        };
        let xb = self.dev(x, DType::BF16)?;
        let qa = if kq == k { self.alloc(DType::I8, rows * kq)? } else { self.zeros(DType::I8, rows * kq)? };
        let q_scale = self.alloc(DType::F32, rows)?;
        let mut args = QcLayerNormQ8Args {
            x: xb.address(),
            q: qa.address(),
            q_scale: q_scale.address(),
            shift: 0,
            scale: 0,
            group_index: 0,
            inv_smooth,
            rows: rows as i64,
            x_row_stride: k as i64,
            q_row_stride: kq as i64,
            shift_stride: 0,
            scale_stride: 0,
            group_size: 1,
            cols: k as i32,
            eps,
            qmax,
            _pad: 0,
        };
        let m = self.modulation_operands(modulation.as_ref(), rows, k, DType::BF16)?;
        if let Some(m) = &m {
            (args.shift, args.shift_stride, args.scale, args.scale_stride, args.group_size) = (m.shift, m.shift_stride, m.scale, m.scale_stride, m.rows_per);
        }
        self.run("qc_layernorm_mod_q8_bf16", launch_cfg::rows(rows as i64, k as i64, 2), args)?;
        drop(m);
        self.linear_rows(GemmInput::Quantized { q: qa.address(), scale: q_scale.address() }, rows, x.shape(), w, act)
    }

    fn linear_residual(&self, x: &Tensor, w: &Linear, residual: &mut Tensor, gate: Option<ModRef>) -> Result<()> {
        let (rows, k) = rows_of(x);
        ensure!(k == w.in_features, "linear expects {} input features, got shape {:?}", w.in_features, x.shape());
        let n = w.out_features;
        ensure!(residual.numel() == rows * n, "residual {:?} does not match linear output [{rows}, {n}]", residual.shape());
        let g = self.gate_operand(gate.as_ref(), rows, n, "gated residual")?;
        let r = self.own(residual, DType::BF16)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let np = n.next_multiple_of(8);
        let (target, ld, padded) = if np == n {
            (r.address(), n, None)
        } else {
            let p = self.alloc(DType::BF16, rows * np)?;
            self.copy_rows(DType::BF16, r.address(), p.address(), rows, n, (n, np), (0, 0), 0, None)?;
            (p.address(), np, Some(p))
        };
        let d = GemmDst { out: target, ldo: ld, epilogue: QC_EPI_GATED_RESIDUAL, residual: target, ldr: ld, gate: g.addr, gate_stride: g.stride, group_index: g.group_index, group_size: g.group_size };
        self.gemm_into(GemmInput::Float(x), w, rows, &d)?;
        if let Some(p) = padded {
            self.copy_rows(DType::BF16, p.address(), r.address(), rows, n, (np, n), (0, 0), 0, None)?;
        }
        Ok(())
    }

    fn add_gated(&self, x: &mut Tensor, y: &Tensor, gate: Option<ModRef>) -> Result<()> {
        ensure!(x.numel() == y.numel() && x.shape().last() == y.shape().last(), "add_gated: x {:?} and y {:?} do not hold the same rows", x.shape(), y.shape());
        let (rows, n) = rows_of(x);
        ensure!(n > 0 && n <= i32::MAX as usize, "add_gated: {n} columns");
        let g = self.gate_operand(gate.as_ref(), rows, n, "gated add")?;
        let xb = self.own(x, DType::BF16)?;
        let yb = self.dev(y, DType::BF16)?;
        let args = QcGatedResidualArgs { x: xb.address(), y: yb.address(), gate: g.addr, group_index: g.group_index, rows: rows as i64, group_size: g.group_size as i64, gate_stride: g.stride as i64, cols: n as i32, _pad: 0 };
        if rows > 0 {
            self.run("qc_gated_residual_bf16", launch_cfg::rows(rows as i64, n as i64, 2), args)?;
        }
        Ok(())
    }

    fn quantize_rows_i8(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = y.dtype();
        ensure!(matches!(dt, DType::F32 | DType::BF16), "quantize_rows_i8: expected an f32 or bf16 tensor, got {}", dt.name());
        let (rows, c) = rows_of(y);
        ensure!(c <= i32::MAX as usize, "quantize_rows_i8: rows of {c} elements are too long for the kernel");
        let q = self.alloc(DType::I8, rows * c)?;
        let scales = self.alloc(DType::F32, rows)?;
        if rows > 0 && c > 0 {
            // In the input's own dtype: the f32 and bf16 values are read exactly.
            let yb = self.dev(y, dt)?;
            let args = QcCacheQuantizeArgs { x: yb.address(), q: q.address(), scale: scales.address(), rows: rows as i64, cols: c as i32, _pad: 0 };
            self.run(&format!("qc_cache_quantize_{}", Self::suffix(dt)?), launch_cfg::rows(rows as i64, c as i64, byte_len(dt, 1)), args)?;
        }
        Ok((self.tensor(y.shape(), q)?, self.tensor(&[rows], scales)?))
    }

    fn add_gated_i8(&self, x: &mut Tensor, q: &Tensor, scales: &Tensor, gate: Option<ModRef>) -> Result<()> {
        let (rows, n) = crate::backend::cpu::cache::check_add_gated_i8(x, q, scales)?;
        ensure!(n <= i32::MAX as usize, "add_gated_i8: rows of {n} elements are too long for the kernel");
        let g = self.gate_operand(gate.as_ref(), rows, n, "add_gated_i8")?;
        let xb = self.own(x, DType::BF16)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (qb, sb) = (self.dev(q, DType::I8)?, self.dev(scales, DType::F32)?);
        let args = QcCacheAddGatedI8Args {
            x: xb.address(),
            q: qb.address(),
            scale: sb.address(),
            gate: g.addr,
            group_index: g.group_index,
            rows: rows as i64,
            group_size: g.group_size as i64,
            gate_stride: g.stride as i64,
            cols: n as i32,
            _pad: 0,
        };
        self.run("qc_cache_add_gated_i8_bf16", launch_cfg::rows(rows as i64, n as i64, 2), args)
    }

    fn l1_distance(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        ensure!(a.shape() == b.shape(), "l1_distance: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let len = crate::backend::cpu::cache::part_len(a, parts, "l1_distance")?;
        self.divergence_sums("qc_l1_partials", "l1_distance", a, Some(b), len, parts)
    }

    fn l1_distance_deferred(&self, a: &Tensor, b: &Tensor, parts: usize) -> Result<PendingSums> {
        ensure!(a.shape() == b.shape(), "l1_distance: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let len = crate::backend::cpu::cache::part_len(a, parts, "l1_distance")?;
        let out = self.zeros(DType::F32, 2 * parts)?;
        self.divergence_into("qc_l1_partials", "l1_distance", a, Some(b), len, parts, out.address())?;
        Ok(PendingSums(self.tensor(&[parts, 2], out)?))
    }

    fn read_sums(&self, pending: &[PendingSums]) -> Result<Vec<Vec<(f32, f32)>>> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        self.refuse_in_capture("read_sums' device-to-host copy")?;
        // Every pending result gathered on the device, then one download.
        let all = self.concat(&pending.iter().map(|p| &p.0).collect::<Vec<_>>())?.to_cpu()?.to_f32()?;
        let mut at = 0;
        pending
            .iter()
            .map(|p| {
                let n = p.0.shape()[0];
                let part = Tensor::from_f32(&[n, 2], all.f32()?[2 * at..2 * (at + n)].to_vec())?;
                at += n;
                p.to_pairs(&part)
            })
            .collect()
    }

    fn abs_sum(&self, a: &Tensor, parts: usize) -> Result<Vec<(f32, f32)>> {
        let len = crate::backend::cpu::cache::part_len(a, parts, "abs_sum")?;
        self.divergence_sums("qc_abs_sum_partials", "abs_sum", a, None, len, parts)
    }

    fn layer_norm_modulate(&self, x: &Tensor, eps: f32, modulation: Option<(ModRef, ModRef)>) -> Result<Tensor> {
        let (rows, c) = rows_of(x);
        let dt = float_dtype(&[x]);
        let xb = self.dev(x, dt)?;
        let y = self.alloc(dt, rows * c)?;
        let mut args = QcLayerNormArgs {
            x: xb.address(),
            y: y.address(),
            shift: 0,
            scale: 0,
            rows: rows as i64,
            x_row_stride: c as i64,
            y_row_stride: c as i64,
            shift_stride: 0,
            scale_stride: 0,
            rows_per_sample: 1,
            cols: c as i32,
            eps,
        };
        let m = self.modulation_operands(modulation.as_ref(), rows, c, dt)?;
        if let Some(m) = &m {
            (args.shift, args.shift_stride, args.scale, args.scale_stride, args.rows_per_sample) = (m.shift, m.shift_stride, m.scale, m.scale_stride, m.rows_per);
        }
        if rows > 0 && c > 0 {
            self.run(&format!("qc_layernorm_mod_{}", Self::suffix(dt)?), launch_cfg::rows(rows as i64, c as i64, byte_len(dt, 1)), args)?;
        }
        drop(m);
        self.tensor(x.shape(), y)
    }

    fn qk_norm_rope(&self, x: &mut Tensor, heads: usize, weight: &Tensor, eps: f32, rope: Option<Rope>) -> Result<()> {
        let (rows, c) = rows_of(x);
        ensure!(heads > 0 && c % heads == 0, "qk norm: {c} channels do not split into {heads} heads");
        let d = c / heads;
        ensure!(weight.numel() == d, "qk norm weight has {} entries, head dim is {d}", weight.numel());
        if let Some(r) = &rope {
            ensure!(r.freqs.len() * 2 == d, "rope has {} frequencies, head dim is {d}", r.freqs.len());
            ensure!(r.seq_len > 0, "rope sequence length is 0");
        }
        let dt = float_dtype(&[x]);
        let buf = self.own(x, dt)?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let w = self.dev(weight, dt)?;
        let sfx = Self::suffix(dt)?;
        let args = QcRmsNormArgs {
            x: buf.address(),
            y: buf.address(),
            w: w.address(),
            n_outer: rows as i64,
            n_inner: heads as i64,
            x_outer_stride: c as i64,
            x_inner_stride: d as i64,
            y_outer_stride: c as i64,
            y_inner_stride: d as i64,
            dim: d as i32,
            eps,
        };
        self.run(&format!("qc_rmsnorm_{sfx}"), launch_cfg::warp_rows((rows * heads) as i64), args)?;
        if let Some(r) = rope {
            let freqs = self.f32_array(b'r', r.freqs)?;
            let seq = r.seq_len;
            ensure!(seq <= i32::MAX as usize, "rope sequence of {seq} rows is too long");
            let es = byte_len(dt, 1) as u64;
            // Whole sequences, then the partial one at the end (positions row % seq_len, as on the CPU).
            let (full, rem) = (rows / seq, rows % seq);
            for (batch, len, first_row) in [(full, seq, 0usize), (if rem > 0 { 1 } else { 0 }, rem, full * seq)] {
                if batch == 0 || len == 0 {
                    continue;
                }
                let args = QcRopeArgs {
                    x: buf.address() + (first_row * c) as u64 * es,
                    freqs: freqs.address(),
                    batch: batch as i64,
                    batch_stride: (len * c) as i64,
                    seq_stride: c as i64,
                    head_stride: d as i64,
                    seq: len as i32,
                    heads: heads as i32,
                    head_dim: d as i32,
                    _pad: 0,
                };
                self.run(&format!("qc_rope_{sfx}"), launch_cfg::per_row_threads((batch * len) as i64, (heads * d / 2) as i64), args)?;
            }
        }
        Ok(())
    }

    fn split_last(&self, x: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
        let (rows, c) = rows_of(x);
        ensure!(parts > 0 && c % parts == 0, "cannot split {c} channels into {parts} parts");
        let p = c / parts;
        let xb = self.dev(x, x.dtype())?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = p;
        (0..parts)
            .map(|i| {
                let out = self.alloc(x.dtype(), rows * p)?;
                self.copy_rows(x.dtype(), xb.address(), out.address(), rows, p, (c, p), (i * p, 0), 0, None)?;
                self.tensor(&shape, out)
            })
            .collect()
    }

    fn swap_middle(&self, x: &Tensor, dims: [usize; 4]) -> Result<Tensor> {
        let [a, b, c, d] = dims;
        ensure!(x.numel() == a * b * c * d, "swap_middle: {:?} is not {dims:?}", x.shape());
        let xb = self.dev(x, x.dtype())?;
        let out = self.alloc(x.dtype(), x.numel())?;
        self.copy_rows(x.dtype(), xb.address(), out.address(), a * b * c, d, (d, d), (0, 0), 0, Some((b, c)))?;
        self.tensor(&[a, c, b, d], out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec, bias: Option<&Tensor>) -> Result<Tensor> {
        spec.check(q, k, v, bias)?;
        let (g, lq, h, d) = (spec.groups, spec.q_len, spec.heads, spec.head_dim);
        let c = h * d;
        let max_end = spec.kv_ranges.iter().map(|r| r.1).max().unwrap_or(0);
        if spec.qk_int8 {
            ensure!(bias.is_none(), "attention: qk_int8 takes no score bias (use the float attention)");
            return self.attention_i8(q, k, v, spec, None);
        }
        // Head dims up to 128 on the qc_attention kernels; wider ones (the VAE mid-block's 512)
        // without a bias on qc_attention_wide, whose launch takes dynamic shared memory.
        let kernel = match bias {
            Some(_) => launch_cfg::attention_bias_kernel(d).map(|(name, _)| (name, None)),
            None => launch_cfg::attention_kernel(d)
                .map(|(name, _)| (name, None))
                .or_else(|| launch_cfg::attention_wide_kernel(d).map(|(name, hdp)| (name, Some(hdp)))),
        };
        let Some((name, wide)) = kernel else {
            return self.attention_on_host(q, k, v, spec, bias, "with a head dim the kernels do not cover");
        };
        if bias.is_some() && spec.scale == 0.0 {
            // The biased kernels start the dot products at bias / scale (qc_types.h).
            return self.attention_on_host(q, k, v, spec, bias, "with a score bias and scale 0");
        }
        let fits = |v: usize| v <= i32::MAX as usize;
        ensure!(fits(g) && fits(lq) && fits(h) && fits(max_end), "attention of {g} groups of {lq} queries is too large for the kernel");
        let out = self.alloc(DType::BF16, g * lq * c)?;
        if g * lq == 0 {
            return self.tensor(&[g * lq, c], out);
        }
        let (qb, kb, vb) = (self.dev_aligned(q, DType::BF16)?, self.dev_aligned(k, DType::BF16)?, self.dev_aligned(v, DType::BF16)?);
        // Self-attention layout (keys of group g at the queries' rows) needs no range arrays.
        let self_layout = spec.kv_ranges.iter().enumerate().all(|(gi, &(a, b))| a == gi * lq && b == a + lq);
        let (starts, ends) = if self_layout {
            (None, None)
        } else {
            let s: Vec<i32> = spec.kv_ranges.iter().map(|r| r.0 as i32).collect();
            let e: Vec<i32> = spec.kv_ranges.iter().map(|r| r.1 as i32).collect();
            (Some(self.i32_array(b's', &s)?), Some(self.i32_array(b'e', &e)?))
        };
        let args = QcAttentionArgs {
            q: qb.address(),
            k: kb.address(),
            v: vb.address(),
            out: out.address(),
            kv_start: starts.as_ref().map_or(0, |b| b.address()),
            kv_end: ends.as_ref().map_or(0, |b| b.address()),
            rope_freqs: 0,
            ldq: c as i64,
            ldk: c as i64,
            ldv: c as i64,
            ldo: c as i64,
            outer_stride: lq as i64,
            inner_stride: 0,
            seq_stride: 1,
            groups: g as i32,
            groups_inner: 1,
            q_len: lq as i32,
            heads: h as i32,
            head_dim: d as i32,
            scale: spec.scale,
        };
        let grid = launch_cfg::attention(lq as i64, h as i64, g as i64);
        match bias {
            None => match wide {
                Some(hdp) => self.run_ext(name, launch_cfg::attention_wide(lq as i64, h as i64, g as i64, hdp), args)?,
                None => self.run(name, grid, args)?,
            },
            Some(b) => {
                // f32 as the model computes it (T5's table is prepared on the device once per encode).
                let bb = self.dev(b, DType::F32)?;
                let ld = b.shape()[2];
                let bias_args = QcAttentionBiasArgs { attn: args, bias: bb.address(), bias_ld: ld as i64, bias_head_stride: (lq * ld) as i64 };
                self.run(name, grid, bias_args)?;
            }
        }
        self.tensor(&[g * lq, c], out)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "mul: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let dt = float_dtype(&[a, b]);
        let (ab, bb) = (self.dev(a, dt)?, self.dev(b, dt)?);
        let n = a.numel();
        let out = self.alloc(dt, n)?;
        self.flat_kernel("qc_mul", dt, n, false, QcBinaryArgs { a: ab.address(), b: bb.address(), y: out.address(), n: n as i64 })?;
        self.tensor(a.shape(), out)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        let dt = float_dtype(&[x]);
        let xb = self.dev(x, dt)?;
        let n = x.numel();
        let out = self.alloc(dt, n)?;
        self.flat_kernel("qc_silu", dt, n, true, QcUnaryArgs { x: xb.address(), y: out.address(), n: n as i64 })?;
        self.tensor(x.shape(), out)
    }

    fn modulation_table(&self, table: &Tensor, emb: &Tensor) -> Result<Tensor> {
        ensure!(table.shape().len() == 2, "modulation table must be [K, C], got {:?}", table.shape());
        let (k, c) = (table.shape()[0], table.shape()[1]);
        let (e, width) = rows_of(emb);
        ensure!(width == k * c || width == c, "modulation embedding {:?} is neither [E, {}] nor [E, {c}]", emb.shape(), k * c);
        ensure!(k <= i32::MAX as usize && c <= i32::MAX as usize, "modulation table too large");
        let tb = self.dev(table, DType::F32)?;
        let edt = if emb.dtype() == DType::BF16 { DType::BF16 } else { DType::F32 };
        let eb = self.dev(emb, edt)?;
        let out = self.alloc(DType::F32, e * k * c)?;
        let args = QcModulationTableArgs { table: tb.address(), emb: eb.address(), out: out.address(), entries: e as i64, chunks: k as i32, c: c as i32, emb_width: width as i64 };
        self.flat_kernel("qc_modulation_table", edt, e * k * c, false, args)?;
        self.tensor(&[e, k, c], out)
    }

    fn concat(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| anyhow!("concat of nothing"))?;
        let mut shape = first.shape().to_vec();
        ensure!(!shape.is_empty(), "concat of scalars");
        for p in parts {
            ensure!(p.shape().len() == shape.len() && p.shape()[1..] == first.shape()[1..], "concat: shapes {:?} and {:?} differ beyond dim 0", p.shape(), first.shape());
        }
        let dt = if parts.iter().all(|p| p.dtype() == first.dtype()) { first.dtype() } else { float_dtype(parts) };
        shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
        let total: usize = parts.iter().map(|p| p.numel()).sum();
        let out = self.alloc(dt, total)?;
        let mut at = 0u64;
        for p in parts {
            let b = self.dev(p, dt)?;
            self.copy_d2d(out.address() + at, b.address(), b.len_bytes())?;
            at += b.len_bytes() as u64;
        }
        self.tensor(&shape, out)
    }

    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let s = x.shape();
        ensure!(dim < s.len() && start + len <= s[dim], "narrow: [{start}, {}) out of dim {dim} of {s:?}", start + len);
        let outer: usize = s[..dim].iter().product();
        let inner: usize = s[dim + 1..].iter().product();
        let mut shape = s.to_vec();
        shape[dim] = len;
        let dt = x.dtype();
        let xb = self.dev(x, dt)?;
        if outer == 1 && dt != DType::I4 {
            // One contiguous range: a view, no copy (shared like a clone; writers copy first).
            let es = byte_len(dt, 1);
            let view = xb.slice(start * inner * es, len * inner * es, dt).map_err(anyhow::Error::msg)?;
            return self.tensor(&shape, view);
        }
        let out = self.alloc(dt, outer * len * inner)?;
        self.copy_rows(dt, xb.address(), out.address(), outer, len * inner, (s[dim] * inner, len * inner), (start * inner, 0), 0, None)?;
        self.tensor(&shape, out)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let dt = float_dtype(&[a, b]);
        let (ab, bb) = (self.dev(a, dt)?, self.dev(b, dt)?);
        let n = a.numel();
        let out = self.alloc(dt, n)?;
        self.flat_kernel("qc_add", dt, n, true, QcBinaryArgs { a: ab.address(), b: bb.address(), y: out.address(), n: n as i64 })?;
        self.tensor(a.shape(), out)
    }

    fn add_rows_broadcast(&self, x: &mut Tensor, rows_table: &Tensor) -> Result<()> {
        let tl = rows_table.numel();
        ensure!(tl > 0 && x.numel().is_multiple_of(tl), "cannot broadcast {:?} over {:?}", rows_table.shape(), x.shape());
        let cols = *rows_table.shape().last().unwrap_or(&1);
        ensure!(cols > 0 && cols <= i32::MAX as usize, "cannot broadcast {:?} over {:?}", rows_table.shape(), x.shape());
        let dt = float_dtype(&[x]);
        let xb = self.own(x, dt)?;
        let tb = self.dev(rows_table, DType::F32)?;
        let rows = x.numel() / cols;
        let args = QcAddRowsBroadcastArgs { x: xb.address(), table: tb.address(), rows: rows as i64, table_rows: (tl / cols) as i64, cols: cols as i32, _pad: 0 };
        if rows > 0 {
            self.run(&format!("qc_add_rows_broadcast_{}", Self::suffix(dt)?), launch_cfg::rows(rows as i64, cols as i64, byte_len(dt, 1)), args)?;
        }
        Ok(())
    }

    fn select_rows(&self, pick_a: &[bool], group_size: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.shape() == b.shape(), "select_rows: shapes {:?} and {:?} differ", a.shape(), b.shape());
        let (rows, c) = rows_of(a);
        ensure!(pick_a.len() * group_size == rows, "select_rows: {} groups of {group_size} rows for {rows} rows", pick_a.len());
        let dt = if a.dtype() == b.dtype() && a.dtype() == DType::BF16 { DType::BF16 } else { float_dtype(&[a, b]) };
        let out = self.alloc(dt, rows * c)?;
        if rows > 0 && c > 0 {
            let (ab, bb) = (self.dev(a, dt)?, self.dev(b, dt)?);
            let mask: Vec<u8> = pick_a.iter().map(|&p| p as u8).collect();
            let mut key = vec![b'u', b'k'];
            key.extend_from_slice(&mask);
            let md = self.cached(key, || self.upload_slice(DType::U8, &mask))?;
            let args = QcMaskSelectArgs { a: ab.address(), b: bb.address(), out: out.address(), mask: md.address(), rows: rows as i64, rows_per_mask: group_size as i64, cols: c as i32, _pad: 0 };
            self.run(&format!("qc_mask_select_{}", Self::suffix(dt)?), launch_cfg::rows(rows as i64, c as i64, byte_len(dt, 1)), args)?;
        }
        self.tensor(a.shape(), out)
    }

    fn gather_rows(&self, x: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let (rows, c) = rows_of(x);
        if let Some(&bad) = indices.iter().find(|&&i| i >= rows) {
            bail!("gather_rows: index {bad} out of {rows} rows");
        }
        let dt = x.dtype();
        if let (Some(bytes), false) = (host_slice(x), dt == DType::I4) {
            // A host table (T5's token embedding, relative position buckets): gather the
            // rows' bytes on the host and upload only them, in the table's dtype.
            let row = byte_len(dt, c);
            let mut g = Vec::with_capacity(indices.len() * row);
            for &i in indices {
                g.extend_from_slice(&bytes[i * row..(i + 1) * row]);
            }
            let b = self.upload_slice(dt, &g)?;
            return self.tensor(&[indices.len(), c], b);
        }
        let out = self.alloc(dt, indices.len() * c)?;
        if !indices.is_empty() && c > 0 {
            ensure!(rows <= i32::MAX as usize, "gather_rows: {rows} rows are too many for int32 indices");
            let xb = self.dev(x, dt)?;
            let idx: Vec<i32> = indices.iter().map(|&i| i as i32).collect();
            let id = self.upload_slice(DType::I32, &idx)?;
            self.copy_rows(dt, xb.address(), out.address(), indices.len(), c, (c, c), (0, 0), id.address(), None)?;
        }
        self.tensor(&[indices.len(), c], out)
    }

    fn timestep_embedding(&self, t: &[f32], dim: usize) -> Result<Tensor> {
        ensure!(dim >= 2, "timestep embedding dim {dim} too small");
        ensure!(dim <= i32::MAX as usize, "timestep embedding dim {dim} too large");
        let out = self.alloc(DType::F32, t.len() * dim)?;
        if !t.is_empty() {
            let tb = self.step_values(StepValues::Timesteps, t)?;
            let args = QcTimestepEmbedArgs { t: tb.address(), out: out.address(), n: t.len() as i64, dim: dim as i32, max_period: 10000.0 };
            self.flat_kernel("qc_timestep_embed", DType::F32, t.len() * dim, false, args)?;
        }
        self.tensor(&[t.len(), dim], out)
    }

    fn pos_embed_2d(&self, h: usize, w: usize, dim: usize, scale: f32, base_size: f32) -> Result<Tensor> {
        let mut key = vec![b'p', b'e'];
        for v in [h as u64, w as u64, dim as u64, scale.to_bits() as u64, base_size.to_bits() as u64] {
            key.extend_from_slice(&v.to_le_bytes());
        }
        let b = self.cached(key, || {
            let t = self.cpu.pos_embed_2d(h, w, dim, scale, base_size)?;
            self.upload_slice(DType::F32, t.f32()?)
        })?;
        self.tensor(&[h * w, dim], b)
    }

    fn patchify(&self, x: &Tensor, grid: &PatchGrid) -> Result<Tensor> {
        let (b, c, t, h, w) = (grid.batch, grid.channels, grid.t, grid.h, grid.w);
        ensure!(x.shape() == [b, c, t, h, w], "patchify: input {:?} is not [{b}, {c}, {t}, {h}, {w}]", x.shape());
        let [pt, ph, pw] = grid.patch;
        ensure!(pt > 0 && ph > 0 && pw > 0, "patchify: patch {:?} has a zero size", grid.patch);
        let [nt, nh, nw] = grid.tokens();
        let plen = grid.patch_len();
        let i32s = [c, t, h, w, pt, ph, pw];
        ensure!(i32s.iter().all(|&v| v <= i32::MAX as usize), "patchify: sizes too large");
        let xb = self.dev(x, DType::F32)?;
        let n = b * nt * nh * nw * plen;
        let out = self.alloc(DType::BF16, n)?;
        let args = QcPatchArgs { x: xb.address(), y: out.address(), batch: b as i64, channels: c as i32, keep_channels: c as i32, t: t as i32, h: h as i32, w: w as i32, pt: pt as i32, ph: ph as i32, pw: pw as i32 };
        self.flat_kernel("qc_patchify", DType::BF16, n, false, args)?;
        self.tensor(&[b * nt * nh * nw, plen], out)
    }

    fn unpatchify(&self, x: &Tensor, grid: &PatchGrid, out_channels: usize) -> Result<Tensor> {
        let (b, t, h, w) = (grid.batch, grid.t, grid.h, grid.w);
        let [pt, ph, pw] = grid.patch;
        let [nt, nh, nw] = grid.tokens();
        let co = out_channels;
        let plen = pt * ph * pw * co;
        ensure!(x.numel() == b * nt * nh * nw * plen, "unpatchify: input {:?} is not [{}, {plen}]", x.shape(), b * nt * nh * nw);
        let i32s = [co, t, h, w, pt, ph, pw];
        ensure!(i32s.iter().all(|&v| v <= i32::MAX as usize), "unpatchify: sizes too large");
        let dt = float_dtype(&[x]);
        let xb = self.dev(x, dt)?;
        let n = b * co * t * h * w;
        let out = self.alloc(DType::F32, n)?;
        let args = QcPatchArgs { x: xb.address(), y: out.address(), batch: b as i64, channels: co as i32, keep_channels: co as i32, t: t as i32, h: h as i32, w: w as i32, pt: pt as i32, ph: ph as i32, pw: pw as i32 };
        self.flat_kernel("qc_unpatchify", dt, n, false, args)?;
        self.tensor(&[b, co, t, h, w], out)
    }

    fn guidance(&self, cond: &Tensor, uncond: &Tensor, scale: f32) -> Result<Tensor> {
        ensure!(cond.shape() == uncond.shape(), "guidance: shapes {:?} and {:?} differ", cond.shape(), uncond.shape());
        let dt = float_dtype(&[cond, uncond]);
        let (cb, ub) = (self.dev(cond, dt)?, self.dev(uncond, dt)?);
        let n = cond.numel();
        let out = self.alloc(dt, n)?;
        let args = QcGuidanceArgs { cond: cb.address(), uncond: ub.address(), y: out.address(), n: n as i64, scale, _pad: 0 };
        self.flat_kernel("qc_guidance", dt, n, false, args)?;
        self.tensor(cond.shape(), out)
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        ensure!(x.shape() == y.shape(), "axpby: shapes {:?} and {:?} differ", x.shape(), y.shape());
        let dt = float_dtype(&[x, y]);
        let (xb, yb) = (self.dev(x, dt)?, self.dev(y, dt)?);
        let n = x.numel();
        let out = self.alloc(dt, n)?;
        let args = QcAxpbyArgs { x: xb.address(), y: yb.address(), out: out.address(), n: n as i64, a, b };
        self.flat_kernel("qc_axpby", dt, n, false, args)?;
        self.tensor(x.shape(), out)
    }

    fn euler_step(&self, z: &mut Tensor, v: &Tensor, dt: &[f32]) -> Result<()> {
        ensure!(z.shape() == v.shape(), "euler step: shapes {:?} and {:?} differ", z.shape(), v.shape());
        let b = z.shape().first().copied().unwrap_or(0);
        ensure!(dt.len() == b, "euler step: {} step sizes for batch {b}", dt.len());
        let n = z.numel();
        let zb = self.own(z, DType::F32)?;
        if n == 0 {
            return Ok(());
        }
        let vb = self.dev(v, DType::F32)?;
        let db = self.step_values(StepValues::StepSizes, dt)?;
        let args = QcEulerArgs { z: zb.address(), v: vb.address(), dt: db.address(), n: n as i64, per_sample: (n / b) as i64 };
        self.flat_kernel("qc_euler", DType::F32, n, false, args)
    }
}
