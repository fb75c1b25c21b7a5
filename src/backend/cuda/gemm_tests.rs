//! GPU tests of `kernels/gemm.cu`: the bf16 and W8A8 GEMMs with every
//! epilogue, per-row quantization and LayerNorm + modulate + quantization.
//! Conventions as in `gpu_tests.rs`: ignored by default (run by
//! tools/gpu-check), fresh random inputs, poisoned outputs, f64 references.
//!
//! - GEMM outputs (bf16): rel-L2 <= 1e-2 against an f64 reference of the
//!   bf16-rounded inputs, on every row for small problems and on a sample of
//!   rows (first, last, tile edges, random) for the Open-Sora shapes; every
//!   output element must be written (no NaN poison left) and the padding
//!   columns between n and ldo must be untouched.
//! - W8A8: the int32 accumulators (`acc_out`) equal a host i64 reference.
//! - W4A8 / W4A6 (`qc_gemm_w4a8`, kernels/gemm_w4.cu): the per-group int32
//!   products (`acc_out`) equal the CPU's (`int4::gemm_groups_i32`) exactly;
//!   without an epilogue the bf16 output is the CPU's f32 result
//!   (`int4::dequantize`, the same f32 operations) rounded to bf16, bit for bit.
//! - Quantization: int8 values and scales bit-exact against the header's
//!   formulas evaluated on the host with the same f32 operations.
//!
//! Under a CUDA tool (compute-sanitizer sets `CUDA_INJECTION64_PATH`) or with
//! `QC_GPU_TESTS_SMALL` set, the Open-Sora shapes use M = 416 instead of 7200
//! (still 3 full tiles + a 32-row tail) so that memcheck/racecheck stay quick.

use super::abi::*;
use super::gpu_tests::{check, gpu, q, Elem, Gpu, Rng};
use super::{gemm_sm90_args, launch_cfg, w4_device_layout, GemmKernel, KernelArgs};
use crate::quant::int4::{self, Int4Weight, W4_GROUP};
use crate::quant::int8::{self as int8q, QuantRows};
use cudarc::driver::{CudaSlice, DeviceRepr};

const TOL_BF16: f64 = 1e-2;
const BF16_POISON: u16 = 0x7fc0;

/// Under a CUDA tool (compute-sanitizer) or with `QC_GPU_TESTS_SMALL` set.
fn small_run() -> bool {
    std::env::var_os("CUDA_INJECTION64_PATH").is_some()
        || std::env::var_os("QC_GPU_TESTS_SMALL").is_some()
}

/// Rows of the Open-Sora shapes (2 x 3600 tokens), smaller under a sanitizer.
fn open_sora_m() -> usize {
    if small_run() {
        3 * 128 + 32
    } else {
        7200
    }
}

fn down_raw<T: DeviceRepr + Default + Clone>(g: &Gpu, s: &CudaSlice<T>) -> Vec<T> {
    g.stream.clone_dtoh(s).unwrap()
}

/// Launches a GEMM with launch_cfg::gemm and waits for it.
fn run_gemm<A: KernelArgs>(g: &Gpu, name: &str, m: usize, n: usize, args: A) {
    let (grid, block, shared) = launch_cfg::gemm(m as i64, n as i64);
    // SAFETY: every test sizes its buffers for the accesses its args describe.
    unsafe {
        g.module
            .launch_ext(name, grid, block, shared, &g.stream, &args)
    }
    .unwrap();
    g.stream.synchronize().unwrap();
}

/// Every row when there are few, else the first and last rows, the rows
/// around tile edges and the M tail, and 48 random rows.
fn sample_rows(rng: &mut Rng, m: usize) -> Vec<usize> {
    if m <= 512 {
        return (0..m).collect();
    }
    let last_tile = m / 128 * 128;
    let mut rows = vec![
        0,
        1,
        2,
        63,
        64,
        127,
        128,
        129,
        m - 1,
        m - 2,
        m - 33,
        last_tile,
        last_tile.saturating_sub(1),
    ];
    rows.extend((0..48).map(|_| (rng.next() % m as u64) as usize));
    rows.retain(|&r| r < m);
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// sum_k a[k] * w[k] in f64 (four partial sums).
fn dot(a: &[f32], w: &[f32]) -> f64 {
    let mut s = [0.0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cw = w.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cw) {
        for j in 0..4 {
            s[j] += x[j] as f64 * y[j] as f64;
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cw.remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

fn gelu_ref(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
}

// ------------------------------------------------------------- epilogues

#[derive(Clone, Copy, Debug, PartialEq)]
enum Epi {
    None,
    Gelu,
    /// out = residual + gate[e(m)] * y; `grouped`: through group_index;
    /// `in_place`: residual == out; `gate`: false passes gate = 0 (gate 1).
    Gated {
        grouped: bool,
        in_place: bool,
        gate: bool,
    },
}

/// Host side of an epilogue: residual, gate table and row groups.
struct EpiData {
    kind: Epi,
    ldo: usize,
    ldr: usize,
    /// [m, ldr] bf16 values (empty unless gated).
    residual: Vec<f32>,
    /// f32 [entries, 6, n + 3]: the gate is chunk 2 (an odd stride on purpose).
    table: Vec<f32>,
    gate_off: usize,
    gate_stride: usize,
    group_size: usize,
    index: Option<Vec<i32>>,
}

impl EpiData {
    fn new(rng: &mut Rng, kind: Epi, m: usize, n: usize, ldo: usize) -> Self {
        let mut d = EpiData {
            kind,
            ldo,
            ldr: ldo,
            residual: Vec::new(),
            table: Vec::new(),
            gate_off: 0,
            gate_stride: 0,
            group_size: 1,
            index: None,
        };
        if let Epi::Gated {
            grouped, in_place, ..
        } = kind
        {
            d.ldr = if in_place { ldo } else { ldo + 8 };
            d.residual = q::<u16>(&rng.vec(m * d.ldr, 0.5));
            d.group_size = 1 + (rng.next() % (m as u64).min(300)) as usize;
            let groups = m.div_ceil(d.group_size);
            let entries = if grouped { 5 } else { groups };
            if grouped {
                d.index = Some(
                    (0..groups)
                        .map(|_| (rng.next() % entries as u64) as i32)
                        .collect(),
                );
            }
            d.gate_stride = 6 * n + 3;
            d.gate_off = 2 * n;
            d.table = rng.vec(entries * d.gate_stride, 1.0);
        }
        d
    }

    fn code(&self) -> i32 {
        (match self.kind {
            Epi::None => QC_EPI_NONE,
            Epi::Gelu => QC_EPI_GELU_TANH,
            Epi::Gated { .. } => QC_EPI_GATED_RESIDUAL,
        }) as i32
    }

    /// Reference output for row r, column c given y = a w^T (+ bias) in f64.
    fn reference(&self, r: usize, c: usize, y: f64) -> f64 {
        match self.kind {
            Epi::None => y,
            Epi::Gelu => gelu_ref(y),
            Epi::Gated { gate, .. } => {
                let res = self.residual[r * self.ldr + c] as f64;
                if !gate {
                    return res + y;
                }
                let grp = r / self.group_size;
                let e = self.index.as_ref().map_or(grp, |ix| ix[grp] as usize);
                res + self.table[e * self.gate_stride + self.gate_off + c] as f64 * y
            }
        }
    }
}

/// Device side of an epilogue. `out` is the residual buffer when in place.
struct EpiDev {
    out: CudaSlice<u16>,
    residual: Option<CudaSlice<u16>>,
    table: Option<CudaSlice<f32>>,
    index: Option<CudaSlice<i32>>,
    /// The bits `out` held before the launch (to check the padding columns).
    before: Vec<u16>,
}

impl EpiDev {
    fn new(g: &Gpu, d: &EpiData, m: usize) -> Self {
        let in_place = matches!(d.kind, Epi::Gated { in_place: true, .. });
        let res_bits: Vec<u16> = d.residual.iter().map(|&v| u16::enc(v)).collect();
        let (out, residual, before) = if in_place {
            (g.up_raw(&res_bits), None, res_bits)
        } else {
            let before = vec![BF16_POISON; m * d.ldo];
            let residual = if d.residual.is_empty() {
                None
            } else {
                Some(g.up_raw(&res_bits))
            };
            (g.up_raw(&before), residual, before)
        };
        EpiDev {
            out,
            residual,
            table: (!d.table.is_empty()).then(|| g.up_raw(&d.table)),
            index: d.index.as_ref().map(|ix| g.up_raw(ix)),
            before,
        }
    }

    /// (out, residual, gate, group_index) addresses.
    fn addrs(&self, g: &Gpu, d: &EpiData) -> (u64, u64, u64, u64) {
        let out = g.addr(&self.out, 0);
        let residual = match (&d.kind, &self.residual) {
            (Epi::Gated { in_place: true, .. }, _) => out,
            (_, Some(r)) => g.addr(r, 0),
            _ => 0,
        };
        let gate = match (&d.kind, &self.table) {
            (Epi::Gated { gate: true, .. }, Some(t)) => g.addr(t, d.gate_off),
            _ => 0,
        };
        let index = self.index.as_ref().map_or(0, |ix| g.addr(ix, 0));
        (out, residual, gate, index)
    }

    /// Checks the output: every element written, padding untouched, and
    /// rel-L2 of the sampled rows against the epilogue of `y` (y[i * n + c]
    /// for rows[i]).
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        g: &Gpu,
        d: &EpiData,
        what: &str,
        m: usize,
        n: usize,
        rows: &[usize],
        y: &[f64],
    ) {
        let bits = down_raw(g, &self.out);
        for r in 0..m {
            for c in 0..d.ldo {
                let b = bits[r * d.ldo + c];
                if c < n {
                    assert!(
                        b.dec().is_finite(),
                        "{what}: out[{r}, {c}] = {} (unwritten?)",
                        b.dec()
                    );
                } else {
                    assert_eq!(
                        b,
                        self.before[r * d.ldo + c],
                        "{what}: padding out[{r}, {c}] was written"
                    );
                }
            }
        }
        let mut out = Vec::with_capacity(rows.len() * n);
        let mut reference = Vec::with_capacity(rows.len() * n);
        for (i, &r) in rows.iter().enumerate() {
            for c in 0..n {
                out.push(bits[r * d.ldo + c].dec());
                reference.push(d.reference(r, c, y[i * n + c]));
            }
        }
        check(what, &out, &reference, TOL_BF16);
    }
}

// ------------------------------------------------------------- bf16 GEMM

/// How a bf16 GEMM case is launched: the kernel, and for qc_gemm_bf16_sm90
/// optionally fewer blocks than output tiles (its grid-stride loop).
#[derive(Clone, Copy, Debug)]
struct Launch {
    kernel: GemmKernel,
    grid: Option<u32>,
}

const MMA: Launch = Launch {
    kernel: GemmKernel::Mma,
    grid: None,
};
const WGMMA: Launch = Launch {
    kernel: GemmKernel::Wgmma,
    grid: None,
};

/// Runs the bf16 GEMM `args` as `how` says and waits for it.
fn run_gemm_bf16(g: &Gpu, how: Launch, args: &QcGemmArgs) {
    match how.grid {
        None => {
            // SAFETY: every test sizes its buffers for the accesses its args describe.
            let ran = unsafe { g.module.launch_gemm_bf16(how.kernel, &g.stream, args) }.unwrap();
            assert_eq!(ran, how.kernel, "launch_gemm_bf16 fell back for {args:?}");
        }
        Some(grid) => {
            assert_eq!(how.kernel, GemmKernel::Wgmma, "a grid override is for qc_gemm_bf16_sm90");
            let sm90 = gemm_sm90_args(args).unwrap();
            // SAFETY: as above.
            unsafe {
                g.module.launch_ext(
                    "qc_gemm_bf16_sm90",
                    (grid, 1, 1),
                    launch_cfg::GEMM_SM90_THREADS,
                    launch_cfg::GEMM_SM90_SHARED_BYTES,
                    &g.stream,
                    &sm90,
                )
            }
            .unwrap();
        }
    }
    g.stream.synchronize().unwrap();
}

/// One qc_gemm_bf16 check. `pad` (a multiple of 8) widens lda, ldw and ldo;
/// the padding of a and w is NaN, so reading it would show.
#[allow(clippy::too_many_arguments)]
fn gemm_bf16_case(
    g: &Gpu,
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    kind: Epi,
    pad: usize,
) {
    gemm_bf16_case_with(g, rng, (m, n, k), bias, kind, pad, MMA);
}

/// One bf16 GEMM check launched as `how` says, against the f64 reference;
/// the wgmma kernel also against qc_gemm_bf16 on the same inputs (both
/// written into their own poisoned / residual-initialised outputs).
#[allow(clippy::too_many_arguments)]
fn gemm_bf16_case_with(
    g: &Gpu,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
    bias: bool,
    kind: Epi,
    pad: usize,
    how: Launch,
) {
    let (lda, ldw, ldo) = (k + pad, k + pad, n.next_multiple_of(8) + pad);
    let mut a = q::<u16>(&rng.vec(m * lda, 1.0));
    let mut w = q::<u16>(&rng.vec(n * ldw, 1.0 / (k as f32).sqrt()));
    for (buf, ld) in [(&mut a, lda), (&mut w, ldw)] {
        for row in buf.chunks_exact_mut(ld) {
            row[k..].fill(f32::NAN);
        }
    }
    let bias_v = rng.vec(n, 0.5);
    let epi = EpiData::new(rng, kind, m, n, ldo);
    let (da, dw, db) = (g.up::<u16>(&a), g.up::<u16>(&w), g.up_raw(&bias_v));
    let dev = EpiDev::new(g, &epi, m);
    let (out, residual, gate, group_index) = dev.addrs(g, &epi);
    let args = QcGemmArgs {
        a: g.addr(&da, 0),
        w: g.addr(&dw, 0),
        bias: if bias { g.addr(&db, 0) } else { 0 },
        out,
        residual,
        gate,
        group_index,
        m: m as i64,
        n: n as i64,
        k: k as i64,
        lda: lda as i64,
        ldw: ldw as i64,
        ldo: ldo as i64,
        ldr: epi.ldr as i64,
        gate_stride: epi.gate_stride as i64,
        group_size: epi.group_size as i64,
        epilogue: epi.code(),
        _pad: 0,
    };
    run_gemm_bf16(g, how, &args);
    let rows = sample_rows(rng, m);
    let mut y = Vec::with_capacity(rows.len() * n);
    for &r in &rows {
        let ar = &a[r * lda..r * lda + k];
        for c in 0..n {
            let b = if bias { bias_v[c] as f64 } else { 0.0 };
            y.push(dot(ar, &w[c * ldw..c * ldw + k]) + b);
        }
    }
    let what = format!(
        "{} m={m} n={n} k={k} bias={bias} {kind:?} pad={pad} grid={:?}",
        how.kernel.kernel_name(),
        how.grid
    );
    dev.check(g, &epi, &what, m, n, &rows, &y);

    if how.kernel == GemmKernel::Wgmma {
        let mma_dev = EpiDev::new(g, &epi, m);
        let (out, residual, gate, group_index) = mma_dev.addrs(g, &epi);
        run_gemm_bf16(g, MMA, &QcGemmArgs { out, residual, gate, group_index, ..args });
        let (ours, theirs) = (down_raw(g, &dev.out), down_raw(g, &mma_dev.out));
        let mut got = Vec::with_capacity(rows.len() * n);
        let mut want = Vec::with_capacity(rows.len() * n);
        for &r in &rows {
            for c in 0..n {
                got.push(ours[r * ldo + c].dec());
                want.push(theirs[r * ldo + c].dec() as f64);
            }
        }
        check(&format!("{what} vs qc_gemm_bf16"), &got, &want, TOL_BF16);
    }
}

const GATED: Epi = Epi::Gated {
    grouped: false,
    in_place: false,
    gate: true,
};
const GATED_GROUPED_IN_PLACE: Epi = Epi::Gated {
    grouped: true,
    in_place: true,
    gate: true,
};
const GATED_GROUPED: Epi = Epi::Gated {
    grouped: true,
    in_place: false,
    gate: true,
};
const GATED_IN_PLACE: Epi = Epi::Gated {
    grouped: false,
    in_place: true,
    gate: true,
};
const UNGATED: Epi = Epi::Gated {
    grouped: false,
    in_place: false,
    gate: false,
};

/// Small and odd shapes: M = 1 and 77, N = 24 and odd N, K = 8 / 40 / 72,
/// every epilogue with and without bias, grouped or not, in place or not.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_small_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let cases: &[(usize, usize, usize, bool, Epi, usize)] = &[
        (1, 24, 8, true, Epi::None, 0),
        (1, 24, 8, false, Epi::Gelu, 0),
        (77, 24, 40, true, Epi::None, 0),
        (77, 24, 40, false, GATED, 8),
        (77, 24, 72, true, Epi::Gelu, 8),
        (77, 130, 72, true, GATED_GROUPED_IN_PLACE, 0),
        (77, 5, 72, false, GATED_GROUPED, 0),
        (1, 200, 40, true, GATED_IN_PLACE, 16),
        (130, 131, 8, true, UNGATED, 0),
        (129, 257, 264, false, Epi::None, 8),
        (300, 77, 72, true, GATED_GROUPED, 0),
        (256, 128, 32, true, Epi::Gelu, 0),
        (33, 1, 16, true, Epi::None, 0),
    ];
    for &(m, n, k, bias, kind, pad) in cases {
        gemm_bf16_case(&g, &mut rng, m, n, k, bias, kind, pad);
    }
}

/// The tiny demo model's shapes (M = 1024 tokens).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_demo_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let cases: &[(usize, usize, usize, bool, Epi)] = &[
        (1024, 192, 64, true, Epi::None),
        (1024, 64, 64, true, GATED_GROUPED_IN_PLACE),
        (1024, 256, 64, true, Epi::Gelu),
        (1024, 64, 256, true, GATED_IN_PLACE),
        (1024, 192, 256, false, Epi::None),
        (1024, 256, 256, false, GATED_GROUPED),
    ];
    for &(m, n, k, bias, kind) in cases {
        gemm_bf16_case(&g, &mut rng, m, n, k, bias, kind, 0);
    }
}

/// Open-Sora STDiT3 linear layers over 2 x 3600 tokens: qkv (3456 x 1152),
/// proj (1152 x 1152, gated residual per sample), fc1 (4608 x 1152, GELU),
/// fc2 (1152 x 4608, gated residual per frame through group_index, in place).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_open_sora_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let m = open_sora_m();
    gemm_bf16_case(&g, &mut rng, m, 3456, 1152, true, Epi::None, 0);
    gemm_bf16_case(&g, &mut rng, m, 1152, 1152, true, GATED_IN_PLACE, 0);
    gemm_bf16_case(&g, &mut rng, m, 4608, 1152, true, Epi::Gelu, 0);
    gemm_bf16_case(&g, &mut rng, m, 1152, 4608, true, GATED_GROUPED_IN_PLACE, 0);
}

// ------------------------------------------- bf16 GEMM on wgmma (sm_90a)

/// The GPU when it runs qc_gemm_bf16_sm90 (compute capability 9.0); None,
/// after saying so, elsewhere.
fn hopper() -> Option<Gpu> {
    let g = gpu()?;
    let cc = g.module.compute_capability();
    if GemmKernel::Wgmma.runs_on(cc) {
        Some(g)
    } else {
        eprintln!("skipped: qc_gemm_bf16_sm90 needs compute capability 9.0; this GPU is {}.{}", cc.0, cc.1);
        None
    }
}

/// qc_gemm_bf16_sm90 on small and ragged shapes: M, N and K edges inside a
/// tile (TMA zero fill), fewer k-tiles than pipeline stages (K = 8, 40, 72)
/// and many (K = 1000, 2056: the barriers' phases wrap), every epilogue.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_sm90_small_shapes() {
    let Some(g) = hopper() else { return };
    let mut rng = Rng::new();
    let cases: &[(usize, usize, usize, bool, Epi, usize)] = &[
        (1, 24, 8, true, Epi::None, 0),
        (1, 1, 8, false, Epi::None, 0),
        (1, 24, 8, false, Epi::Gelu, 0),
        (77, 24, 40, true, Epi::None, 0),
        (77, 24, 40, false, GATED, 8),
        (77, 24, 72, true, Epi::Gelu, 8),
        (77, 130, 72, true, GATED_GROUPED_IN_PLACE, 0),
        (77, 5, 72, false, GATED_GROUPED, 0),
        (1, 200, 40, true, GATED_IN_PLACE, 16),
        (130, 131, 8, true, UNGATED, 0),
        (129, 257, 264, false, Epi::None, 8),
        (300, 77, 72, true, GATED_GROUPED, 0),
        (256, 128, 32, true, Epi::Gelu, 0),
        (128, 128, 64, false, Epi::None, 0),
        (33, 1, 16, true, Epi::None, 0),
        (127, 129, 1000, true, GATED_IN_PLACE, 8),
        (513, 260, 2056, false, Epi::Gelu, 0),
        (200, 300, 192, true, UNGATED, 24),
    ];
    for &(m, n, k, bias, kind, pad) in cases {
        gemm_bf16_case_with(&g, &mut rng, (m, n, k), bias, kind, pad, WGMMA);
    }
}

/// qc_gemm_bf16_sm90 with fewer blocks than tiles: the k-tile count and the
/// barrier phases carry over from one tile to the next in a block, and the
/// next tile's first loads overlap the epilogue.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_sm90_grid_stride() {
    let Some(g) = hopper() else { return };
    let mut rng = Rng::new();
    // 1000 x 700: 8 x 6 = 48 tiles.
    let cases: &[(usize, Epi, u32)] = &[
        (8, Epi::None, 1),
        (72, GATED_GROUPED_IN_PLACE, 5),
        (200, Epi::Gelu, 7),
        (1152, GATED, 47),
        (136, UNGATED, 2),
    ];
    for &(k, kind, grid) in cases {
        let how = Launch {
            kernel: GemmKernel::Wgmma,
            grid: Some(grid),
        };
        gemm_bf16_case_with(&g, &mut rng, (1000, 700, k), true, kind, 0, how);
    }
}

/// qc_gemm_bf16_sm90 at the tiny demo model's shapes (M = 1024 tokens).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_sm90_demo_shapes() {
    let Some(g) = hopper() else { return };
    let mut rng = Rng::new();
    let cases: &[(usize, usize, usize, bool, Epi)] = &[
        (1024, 192, 64, true, Epi::None),
        (1024, 64, 64, true, GATED_GROUPED_IN_PLACE),
        (1024, 256, 64, true, Epi::Gelu),
        (1024, 64, 256, true, GATED_IN_PLACE),
        (1024, 256, 256, false, GATED_GROUPED),
    ];
    for &(m, n, k, bias, kind) in cases {
        gemm_bf16_case_with(&g, &mut rng, (m, n, k), bias, kind, 0, WGMMA);
    }
}

/// qc_gemm_bf16_sm90 at the STDiT3 linear layers (K, N in {1152, 3456,
/// 4608}) over 2 x 3600 tokens and over 54,000 tokens (M = 416 for both
/// under a sanitizer or with QC_GPU_TESTS_SMALL): qkv, proj (gated residual
/// in place), fc1 (GELU), fc2 (gated per frame through group_index, in
/// place), and a K = 4608 -> N = 3456 layer.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_bf16_sm90_open_sora_shapes() {
    let Some(g) = hopper() else { return };
    let mut rng = Rng::new();
    let small = open_sora_m();
    let ms = if small < 7200 { vec![small] } else { vec![7200, 54_000] };
    for m in ms {
        gemm_bf16_case_with(&g, &mut rng, (m, 3456, 1152), true, Epi::None, 0, WGMMA);
        gemm_bf16_case_with(&g, &mut rng, (m, 1152, 1152), true, GATED_IN_PLACE, 0, WGMMA);
        gemm_bf16_case_with(&g, &mut rng, (m, 4608, 1152), true, Epi::Gelu, 0, WGMMA);
        gemm_bf16_case_with(&g, &mut rng, (m, 1152, 4608), true, GATED_GROUPED_IN_PLACE, 0, WGMMA);
        gemm_bf16_case_with(&g, &mut rng, (m, 3456, 4608), false, GATED_GROUPED, 0, WGMMA);
    }
}

// ------------------------------------------------------------- W8A8 GEMM

/// Int8 values: `full` in [-128, 127], else [-127, 127] (what quantization
/// produces); `extreme` only -128/-127 and 127 (largest accumulations).
fn i8_vec(rng: &mut Rng, len: usize, full: bool, extreme: bool) -> Vec<i8> {
    (0..len)
        .map(|_| {
            let r = rng.next();
            if extreme {
                if r & 1 == 0 {
                    127
                } else if full {
                    -128
                } else {
                    -127
                }
            } else if full {
                (r >> 56) as u8 as i8
            } else {
                (((r >> 32) % 255) as i32 - 127) as i8
            }
        })
        .collect()
}

/// One qc_gemm_w8a8 check: acc_out exactly (when `with_acc`), the bf16
/// output against the f64 dequantized reference. `pad` is a multiple of 16.
#[allow(clippy::too_many_arguments)]
fn gemm_w8a8_case(
    g: &Gpu,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
    bias: bool,
    kind: Epi,
    pad: usize,
    with_acc: bool,
    extreme: bool,
) {
    let (lda, ldw, ldo) = (k + pad, k + pad, n.next_multiple_of(8) + pad);
    let mut a = i8_vec(rng, m * lda, false, extreme);
    let mut w = i8_vec(rng, n * ldw, true, extreme);
    if extreme {
        // Row 0 of a and of w all -128 (a) / -128 (w): the largest product sum.
        a[..k].fill(-128);
        w[..k].fill(-128);
    }
    // Padding that would corrupt the sums if it were read.
    for (buf, ld) in [(&mut a, lda), (&mut w, ldw)] {
        for row in buf.chunks_exact_mut(ld) {
            row[k..].fill(99);
        }
    }
    let a_scale: Vec<f32> = (0..m).map(|_| (1.5 + rng.unif()) / 254.0).collect();
    let w_scale: Vec<f32> = (0..n)
        .map(|_| (1.5 + rng.unif()) / (254.0 * (k as f32).sqrt()))
        .collect();
    let bias_v = rng.vec(n, 0.5);
    let epi = EpiData::new(rng, kind, m, n, ldo);
    let (da, dw) = (g.up_raw(&a), g.up_raw(&w));
    let (das, dws, db) = (g.up_raw(&a_scale), g.up_raw(&w_scale), g.up_raw(&bias_v));
    let dacc = g.up_raw(&vec![i32::MIN; m * n]);
    let dev = EpiDev::new(g, &epi, m);
    let (out, residual, gate, group_index) = dev.addrs(g, &epi);
    let args = QcGemmI8Args {
        a: g.addr(&da, 0),
        a_scale: g.addr(&das, 0),
        w: g.addr(&dw, 0),
        w_scale: g.addr(&dws, 0),
        bias: if bias { g.addr(&db, 0) } else { 0 },
        out,
        residual,
        gate,
        group_index,
        acc_out: if with_acc { g.addr(&dacc, 0) } else { 0 },
        m: m as i64,
        n: n as i64,
        k: k as i64,
        lda: lda as i64,
        ldw: ldw as i64,
        ldo: ldo as i64,
        ldr: epi.ldr as i64,
        gate_stride: epi.gate_stride as i64,
        group_size: epi.group_size as i64,
        epilogue: epi.code(),
        _pad: 0,
    };
    run_gemm(g, "qc_gemm_w8a8", m, n, args);
    let what =
        format!("qc_gemm_w8a8 m={m} n={n} k={k} bias={bias} {kind:?} pad={pad} extreme={extreme}");
    let rows = sample_rows(rng, m);
    let acc_gpu = down_raw(g, &dacc);
    let mut y = Vec::with_capacity(rows.len() * n);
    for &r in &rows {
        let ar = &a[r * lda..r * lda + k];
        for c in 0..n {
            let wr = &w[c * ldw..c * ldw + k];
            let acc: i64 = ar.iter().zip(wr).map(|(&x, &v)| x as i64 * v as i64).sum();
            if with_acc {
                assert_eq!(
                    acc_gpu[r * n + c] as i64,
                    acc,
                    "{what}: acc[{r}, {c}] differs from the exact integer sum"
                );
            }
            let b = if bias { bias_v[c] as f64 } else { 0.0 };
            y.push(acc as f64 * a_scale[r] as f64 * w_scale[c] as f64 + b);
        }
    }
    if with_acc && rows.len() < m {
        // Unsampled rows: written at least (the sampled ones were compared).
        assert!(
            acc_gpu.iter().all(|&v| v != i32::MIN),
            "{what}: acc_out not fully written"
        );
    }
    if !with_acc {
        assert!(
            acc_gpu.iter().all(|&v| v == i32::MIN),
            "{what}: acc_out written though 0"
        );
    }
    dev.check(g, &epi, &what, m, n, &rows, &y);
}

/// ((m, n, k), bias, epilogue, pad, acc_out).
type W8a8Case = ((usize, usize, usize), bool, Epi, usize, bool);

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w8a8_small_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let cases: &[W8a8Case] = &[
        ((1, 24, 16), true, Epi::None, 0, true),
        ((77, 24, 48), false, Epi::Gelu, 16, true),
        ((77, 5, 80), true, GATED_GROUPED, 0, true),
        ((77, 130, 64), true, GATED_GROUPED_IN_PLACE, 0, true),
        ((130, 131, 16), false, UNGATED, 16, true),
        ((1, 200, 112), true, GATED_IN_PLACE, 0, false),
        ((129, 257, 272), true, Epi::None, 0, true),
        ((1024, 192, 64), true, Epi::None, 0, true),
        ((1024, 256, 256), true, GATED, 0, true),
    ];
    for &(shape, bias, kind, pad, with_acc) in cases {
        gemm_w8a8_case(&g, &mut rng, shape, bias, kind, pad, with_acc, false);
    }
}

/// K = 4608 (Open-Sora's fc2): large exact accumulations, every row compared,
/// including all-extreme inputs (|acc| up to 128 * 128 * 4608).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w8a8_large_k() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    gemm_w8a8_case(
        &g,
        &mut rng,
        (300, 1152, 4608),
        true,
        Epi::None,
        0,
        true,
        false,
    );
    gemm_w8a8_case(
        &g,
        &mut rng,
        (200, 136, 4608),
        false,
        GATED_GROUPED_IN_PLACE,
        0,
        true,
        true,
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w8a8_open_sora_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let m = open_sora_m();
    gemm_w8a8_case(
        &g,
        &mut rng,
        (m, 3456, 1152),
        true,
        Epi::None,
        0,
        true,
        false,
    );
    gemm_w8a8_case(
        &g,
        &mut rng,
        (m, 4608, 1152),
        true,
        Epi::Gelu,
        0,
        false,
        false,
    );
    gemm_w8a8_case(
        &g,
        &mut rng,
        (m, 1152, 4608),
        true,
        GATED_GROUPED_IN_PLACE,
        0,
        true,
        false,
    );
}

// ------------------------------------------------------------- W4A8 GEMM

/// How a W4A8 case draws its operands.
#[derive(Clone, Copy, Debug)]
enum W4Inputs {
    /// Random f32 activations and weights through the engine's quantizers
    /// (Int4Weight::quantize, int8::quantize_rows): activation qmax 127 (A8) or
    /// 31 (A6), with or without a smoothing vector folded into the weight.
    Quantized { qmax: i32, smooth: bool },
    /// Only a = +-127 and q = +-7, rows 0 all -127 / -7: the largest group sums.
    Extreme,
}

const A8: W4Inputs = W4Inputs::Quantized { qmax: 127, smooth: false };
const A8_SMOOTH: W4Inputs = W4Inputs::Quantized { qmax: 127, smooth: true };
const A6: W4Inputs = W4Inputs::Quantized { qmax: 31, smooth: false };
const A6_SMOOTH: W4Inputs = W4Inputs::Quantized { qmax: 31, smooth: true };

/// Quantized activations `[m, k]` and an int4 weight `[n, k]`.
fn w4_operands(rng: &mut Rng, m: usize, n: usize, k: usize, inputs: W4Inputs) -> (QuantRows, Int4Weight) {
    match inputs {
        W4Inputs::Quantized { qmax, smooth } => {
            // A few activation columns 8x larger (outliers that smoothing is for).
            let mut x = rng.vec(m * k, 1.0);
            for row in x.chunks_exact_mut(k) {
                for c in (3..k).step_by(37) {
                    row[c] *= 8.0;
                }
            }
            let w = rng.vec(n * k, 1.0 / (k as f32).sqrt());
            let s: Option<Vec<f32>> = smooth.then(|| (0..k).map(|i| if i % 37 == 3 { 4.0 } else { 0.5 + (i % 5) as f32 * 0.25 }).collect());
            let wq = Int4Weight::quantize(&w, n, k, s.as_deref(), qmax).unwrap();
            let a = int8q::quantize_rows(&x, k, wq.inv_smooth.as_deref(), qmax).unwrap();
            (a, wq)
        }
        W4Inputs::Extreme => {
            let mut qa: Vec<i8> = (0..m * k).map(|_| if rng.next() & 1 == 0 { 127 } else { -127 }).collect();
            let mut qw: Vec<i8> = (0..n * k).map(|_| if rng.next() & 1 == 0 { 7 } else { -7 }).collect();
            qa[..k].fill(-127);
            qw[..k].fill(-7);
            let groups = k.div_ceil(W4_GROUP);
            let w_scale: Vec<f32> = (0..n * groups).map(|_| (1.5 + rng.unif()) / (7.0 * (k as f32).sqrt())).collect();
            let wq = Int4Weight::from_parts(int4::pack(&qw, n, k), w_scale, n, k, None, 127).unwrap();
            let a_scale: Vec<f32> = (0..m).map(|_| (1.5 + rng.unif()) / 127.0).collect();
            (QuantRows { q: qa, scale: a_scale, rows: m, cols: k }, wq)
        }
    }
}

/// Launches qc_gemm_w4a8 through its host launcher and waits for it; `grid`
/// overrides the launch's block count (its grid-stride loop over tiles).
fn run_gemm_w4a8(g: &Gpu, args: &QcGemmW4Args, grid: Option<u32>) {
    // SAFETY: every test sizes its buffers for the accesses its args describe.
    unsafe {
        match grid {
            None => g.module.launch_gemm_w4a8(&g.stream, args),
            Some(blocks) => {
                super::gemm_w4a8_check(args).unwrap();
                let (_, block, shared) = launch_cfg::gemm_w4a8(args.m, args.n);
                g.module.launch_ext("qc_gemm_w4a8", (blocks, 1, 1), block, shared, &g.stream, args)
            }
        }
    }
    .unwrap();
    g.stream.synchronize().unwrap();
}

/// One qc_gemm_w4a8 check against the CPU's int4 GEMM: acc_out exactly (when
/// `with_acc`; every element written), the bf16 output against the f64
/// epilogue of the CPU's f32 result (rel-L2), and without an epilogue bit for
/// bit. `pad` (a multiple of 16) widens lda and ldw (bytes) and ldo; the
/// padding of a is 99 and that of w zero bytes (q = -8), so reading it shows.
#[allow(clippy::too_many_arguments)]
fn gemm_w4a8_case(
    g: &Gpu,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
    bias: bool,
    kind: Epi,
    pad: usize,
    with_acc: bool,
    inputs: W4Inputs,
    grid: Option<u32>,
) {
    assert_eq!(k % W4_GROUP, 0, "the kernel tests use whole groups (the executor pads)");
    let groups = k / W4_GROUP;
    let (lda, ldw, ldo) = (k + pad, k / 2 + pad, n.next_multiple_of(8) + pad);
    let (qa, wq) = w4_operands(rng, m, n, k, inputs);
    let mut a = vec![99i8; m * lda];
    for (dst, src) in a.chunks_exact_mut(lda).zip(qa.q.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    let (wdev, kp) = w4_device_layout(&wq.packed(), n, k).unwrap();
    assert_eq!(kp, k);
    let mut w = vec![0u8; n * ldw];
    for (dst, src) in w.chunks_exact_mut(ldw).zip(wdev.chunks_exact(k / 2)) {
        dst[..k / 2].copy_from_slice(src);
    }
    let bias_v = rng.vec(n, 0.5);
    let epi = EpiData::new(rng, kind, m, n, ldo);
    let (da, dw) = (g.up_raw(&a), g.up_raw(&w));
    let (das, dws, db) = (g.up_raw(&qa.scale), g.up_raw(&wq.scale), g.up_raw(&bias_v));
    let dacc = g.up_raw(&vec![i32::MIN; if with_acc { groups * m * n } else { 1 }]);
    let dev = EpiDev::new(g, &epi, m);
    let (out, residual, gate, group_index) = dev.addrs(g, &epi);
    let args = QcGemmW4Args {
        a: g.addr(&da, 0),
        a_scale: g.addr(&das, 0),
        w: g.addr(&dw, 0),
        w_scale: g.addr(&dws, 0),
        bias: if bias { g.addr(&db, 0) } else { 0 },
        out,
        residual,
        gate,
        group_index,
        acc_out: if with_acc { g.addr(&dacc, 0) } else { 0 },
        m: m as i64,
        n: n as i64,
        k: k as i64,
        lda: lda as i64,
        ldw: ldw as i64,
        ldo: ldo as i64,
        ldr: epi.ldr as i64,
        gate_stride: epi.gate_stride as i64,
        group_size: epi.group_size as i64,
        epilogue: epi.code(),
        _pad: 0,
    };
    run_gemm_w4a8(g, &args, grid);
    let what = format!("qc_gemm_w4a8 m={m} n={n} k={k} bias={bias} {kind:?} pad={pad} {inputs:?} grid={grid:?}");

    // The CPU reference on the sampled rows.
    let rows = sample_rows(rng, m);
    let mut sub = QuantRows { q: Vec::with_capacity(rows.len() * k), scale: Vec::with_capacity(rows.len()), rows: rows.len(), cols: k };
    for &r in &rows {
        sub.q.extend_from_slice(&qa.q[r * k..(r + 1) * k]);
        sub.scale.push(qa.scale[r]);
    }
    let acc_ref = int4::gemm_groups_i32(&sub, &wq).unwrap();
    let mut y_ref = vec![0f32; rows.len() * n];
    int4::dequantize(&acc_ref, &sub, &wq, bias.then_some(&bias_v[..]), &mut y_ref);

    let acc_gpu = down_raw(g, &dacc);
    if with_acc {
        for (i, &r) in rows.iter().enumerate() {
            for c in 0..n {
                for gi in 0..groups {
                    assert_eq!(
                        acc_gpu[(gi * m + r) * n + c],
                        acc_ref[(i * n + c) * groups + gi],
                        "{what}: acc[{r}, {c}, group {gi}] differs from the CPU's"
                    );
                }
            }
        }
        assert!(acc_gpu.iter().all(|&v| v != i32::MIN), "{what}: acc_out not fully written");
    } else {
        assert_eq!(acc_gpu, [i32::MIN], "{what}: acc_out written though 0");
    }
    if kind == Epi::None {
        let bits = down_raw(g, &dev.out);
        for (i, &r) in rows.iter().enumerate() {
            for c in 0..n {
                let want = half::bf16::from_f32(y_ref[i * n + c]).to_bits();
                assert_eq!(bits[r * ldo + c], want, "{what}: out[{r}, {c}] is not the CPU's {} in bf16", y_ref[i * n + c]);
            }
        }
    }
    let y: Vec<f64> = y_ref.iter().map(|&v| v as f64).collect();
    dev.check(g, &epi, &what, m, n, &rows, &y);
}

/// ((m, n, k), bias, epilogue, pad, acc_out, inputs).
type W4a8Case = ((usize, usize, usize), bool, Epi, usize, bool, W4Inputs);

/// Small and odd shapes (M = 1, 77, 129; N = 5, 24, 131, 257), every epilogue
/// with and without bias, A8 and A6 with and without smoothing, padded strides,
/// extreme operands, and K = 4608 (72 groups).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w4a8_small_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let cases: &[W4a8Case] = &[
        ((1, 24, 64), true, Epi::None, 0, true, A8),
        ((77, 24, 128), false, Epi::Gelu, 16, true, A6_SMOOTH),
        ((77, 5, 192), true, GATED_GROUPED, 0, true, A8_SMOOTH),
        ((77, 130, 64), true, GATED_GROUPED_IN_PLACE, 0, true, A6),
        ((130, 131, 320), false, UNGATED, 16, true, A8),
        ((1, 200, 128), true, GATED_IN_PLACE, 0, false, A8_SMOOTH),
        ((129, 257, 256), true, Epi::None, 32, true, W4Inputs::Extreme),
        ((1024, 192, 64), true, Epi::None, 0, true, A6_SMOOTH),
        ((1024, 256, 256), true, GATED, 0, false, A8),
        ((300, 136, 4608), false, GATED_GROUPED_IN_PLACE, 0, true, W4Inputs::Extreme),
        ((200, 1152, 4608), true, Epi::None, 0, true, A6),
    ];
    // Under a sanitizer the last (largest) case is left to gemm_w4a8_open_sora_shapes.
    let cases = if small_run() { &cases[..cases.len() - 1] } else { cases };
    for &(shape, bias, kind, pad, with_acc, inputs) in cases {
        gemm_w4a8_case(&g, &mut rng, shape, bias, kind, pad, with_acc, inputs, None);
    }
}

/// Fewer blocks than tiles: the grid-stride loop reuses shared memory and the
/// pipeline across tiles (tile edges in M and N).
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w4a8_grid_stride() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for (shape, blocks) in [((300usize, 300usize, 128usize), 1u32), ((300, 300, 128), 4), ((520, 900, 192), 7)] {
        gemm_w4a8_case(&g, &mut rng, shape, true, Epi::None, 0, true, A8, Some(blocks));
        gemm_w4a8_case(&g, &mut rng, shape, true, GATED_GROUPED_IN_PLACE, 0, false, A6_SMOOTH, Some(blocks));
    }
}

/// The DiT's shapes at M = 4096 (416 under a sanitizer / QC_GPU_TESTS_SMALL):
/// qkv (1152 -> 3456), fc1 (1152 -> 4608) with GELU, fc2 (4608 -> 1152) and
/// proj (1152 -> 1152) with the gated residual.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_w4a8_open_sora_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    let m = if small_run() { open_sora_m() } else { 4096 };
    let cases: &[W4a8Case] = &[
        ((m, 3456, 1152), true, Epi::None, 0, true, A8),
        ((m, 4608, 1152), true, Epi::Gelu, 0, false, A6_SMOOTH),
        ((m, 1152, 4608), true, GATED_GROUPED_IN_PLACE, 0, true, A8_SMOOTH),
        ((m, 1152, 1152), true, GATED, 0, true, A6),
    ];
    for &(shape, bias, kind, pad, with_acc, inputs) in cases {
        gemm_w4a8_case(&g, &mut rng, shape, bias, kind, pad, with_acc, inputs, None);
    }
}

// ---------------------------------------------------------- quantization

/// The header's quantization formulas with the same f32 operations as the
/// kernels: (q, scale) of one row.
fn quantize_host(x: &[f32], inv_smooth: Option<&[f32]>, qmax: i32) -> (Vec<i8>, f32) {
    let xs: Vec<f32> = match inv_smooth {
        Some(s) => x.iter().zip(s).map(|(&v, &s)| v * s).collect(),
        None => x.to_vec(),
    };
    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let qm = qmax as f32;
    let scale = amax / qm;
    let inv = if amax > 0.0 { qm / amax } else { 0.0 };
    let q = xs
        .iter()
        .map(|&v| (v * inv).round_ties_even().clamp(-qm, qm) as i8)
        .collect();
    (q, scale)
}

/// Rows of varied magnitude plus the special ones: all zeros, huge values,
/// tiny values, one nonzero, and exact half-level ties (x * inv = j + 0.5).
fn quant_rows(rng: &mut Rng, rows: usize, cols: usize, qmax: i32) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|r| match r {
            0 => vec![0.0; cols],
            1 => rng.vec(cols, 1e30),
            2 => rng.vec(cols, 1e-30),
            3 => {
                let mut v = vec![0.0; cols];
                v[cols / 2] = -3.0;
                v
            }
            4 => (0..cols)
                .map(|c| {
                    if c == 0 {
                        qmax as f32 // amax = qmax: inv = 1
                    } else {
                        let j = (c as i32 % qmax) as f32;
                        if c % 2 == 0 {
                            j + 0.5 - qmax as f32 / 2.0
                        } else {
                            -(j + 0.5) / 2.0
                        }
                    }
                })
                .collect(),
            _ => {
                let scale = 10f32.powi((r % 7) as i32 - 3);
                rng.vec(cols, scale)
            }
        })
        .collect()
}

fn quantize_case<T: Elem>(
    g: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    pad: usize,
    qmax: i32,
    smooth: bool,
) {
    let (ldx, ldq) = (cols + pad, cols + pad);
    let data = quant_rows(rng, rows, cols, qmax);
    let mut x = vec![f32::NAN; rows * ldx];
    for (r, row) in data.iter().enumerate() {
        x[r * ldx..r * ldx + cols].copy_from_slice(&q::<T>(row));
    }
    let inv_smooth: Vec<f32> = (0..cols).map(|_| 1.25 + 0.75 * rng.unif()).collect();
    let dx = g.up::<T>(&x);
    let ds = g.up_raw(&inv_smooth);
    let dq = g.up_raw(&vec![i8::MIN; rows * ldq]);
    let dscale = g.up_raw(&vec![f32::NAN; rows]);
    let name = format!("qc_quantize_rows_{}", T::SUFFIX);
    let args = QcQuantizeArgs {
        x: g.addr(&dx, 0),
        inv_smooth: if smooth { g.addr(&ds, 0) } else { 0 },
        q: g.addr(&dq, 0),
        scale: g.addr(&dscale, 0),
        rows: rows as i64,
        ldx: ldx as i64,
        ldq: ldq as i64,
        cols: cols as i32,
        qmax,
    };
    g.run(
        &name,
        launch_cfg::rows(rows as i64, cols as i64, T::BYTES),
        args,
    );
    let (qg, sg) = (down_raw(g, &dq), down_raw(g, &dscale));
    let what = format!("{name} rows={rows} cols={cols} pad={pad} qmax={qmax} smooth={smooth}");
    for r in 0..rows {
        let (qh, sh) = quantize_host(
            &x[r * ldx..r * ldx + cols],
            smooth.then_some(&inv_smooth[..]),
            qmax,
        );
        // The CPU backend's quantizer agrees with this transcription of the header.
        let mut qc = vec![0i8; cols];
        let sc = crate::quant::int8::quantize_row(
            &x[r * ldx..r * ldx + cols],
            smooth.then_some(&inv_smooth[..]),
            qmax,
            &mut qc,
        );
        assert!(
            qc == qh && sc.to_bits() == sh.to_bits(),
            "{what}: CPU quantize_row differs from the header formulas"
        );
        assert_eq!(
            sg[r].to_bits(),
            sh.to_bits(),
            "{what}: scale[{r}] {} vs host {sh}",
            sg[r]
        );
        for c in 0..ldq {
            let v = qg[r * ldq + c];
            if c < cols {
                assert_eq!(
                    v,
                    qh[c],
                    "{what}: q[{r}, {c}] vs host (x = {})",
                    x[r * ldx + c]
                );
            } else {
                assert_eq!(v, i8::MIN, "{what}: padding q[{r}, {c}] was written");
            }
        }
    }
    eprintln!("{what}: exact");
}

fn quantize_rows<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for qmax in [127, 31] {
        for smooth in [false, true] {
            quantize_case::<T>(&g, &mut rng, 12, 1152, 0, qmax, smooth); // vector path
            quantize_case::<T>(&g, &mut rng, 9, 37, 3, qmax, smooth); // scalar path
            quantize_case::<T>(&g, &mut rng, 300, 4608, 8, qmax, smooth); // many rows, long rows
            quantize_case::<T>(&g, &mut rng, 7, 8200, 0, qmax, smooth); // more than 1024 vectors per row
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn quantize_rows_f32() {
    quantize_rows::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn quantize_rows_bf16() {
    quantize_rows::<u16>();
}

// ------------------------------------------------ LayerNorm + quantization

/// Host LN + modulate of one row with the kernel's roundings for T (bf16:
/// normalised value, 1 + scale, product and result rounded to bf16), from
/// the given statistics, in f32 operations.
fn ln_mod_emulated<T: Elem>(
    x: &[f32],
    mean: f64,
    rstd: f64,
    shift: Option<&[f32]>,
    scale: Option<&[f32]>,
) -> Vec<f32> {
    let rt = |v: f32| T::enc(v).dec();
    (0..x.len())
        .map(|c| {
            let mut v = rt(((x[c] as f64 - mean) * rstd) as f32);
            if let Some(s) = scale {
                v = rt(v * rt(1.0 + s[c]));
            }
            if let Some(s) = shift {
                v += s[c];
            }
            rt(v)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn layernorm_q8_case<T: Elem>(
    g: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    group_size: usize,
    grouped: bool,
    modulate: bool,
    qmax: i32,
    smooth: bool,
) {
    let groups = rows.div_ceil(group_size);
    let entries = if grouped { 4 } else { groups };
    let index: Vec<i32> = (0..groups)
        .map(|_| (rng.next() % entries as u64) as i32)
        .collect();
    let x = q::<T>(&rng.vec(rows * cols, 3.0));
    let table = q::<T>(&rng.vec(entries * 6 * cols, 0.5)); // [E, 6, C]: shift = 0, scale = 1
    let inv_smooth: Vec<f32> = (0..cols).map(|_| 1.25 + 0.75 * rng.unif()).collect();
    let (dx, dt, di, ds) = (
        g.up::<T>(&x),
        g.up::<T>(&table),
        g.up_raw(&index),
        g.up_raw(&inv_smooth),
    );
    let dq = g.up_raw(&vec![i8::MIN; rows * cols]);
    let dscale = g.up_raw(&vec![f32::NAN; rows]);
    let eps = 1e-6f32;
    let args = QcLayerNormQ8Args {
        x: g.addr(&dx, 0),
        q: g.addr(&dq, 0),
        q_scale: g.addr(&dscale, 0),
        shift: if modulate { g.addr(&dt, 0) } else { 0 },
        scale: if modulate { g.addr(&dt, cols) } else { 0 },
        group_index: if grouped { g.addr(&di, 0) } else { 0 },
        inv_smooth: if smooth { g.addr(&ds, 0) } else { 0 },
        rows: rows as i64,
        x_row_stride: cols as i64,
        q_row_stride: cols as i64,
        shift_stride: 6 * cols as i64,
        scale_stride: 6 * cols as i64,
        group_size: group_size as i64,
        cols: cols as i32,
        eps,
        qmax,
        _pad: 0,
    };
    let name = format!("qc_layernorm_mod_q8_{}", T::SUFFIX);
    g.run(
        &name,
        launch_cfg::rows(rows as i64, cols as i64, T::BYTES),
        args,
    );
    let (qg, sg) = (down_raw(g, &dq), down_raw(g, &dscale));
    let what = format!(
        "{name} rows={rows} cols={cols} group={group_size} grouped={grouped} mod={modulate} qmax={qmax} smooth={smooth}"
    );
    let mut deq = Vec::with_capacity(rows * cols);
    let mut reference = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let grp = r / group_size;
        let e = if grouped { index[grp] as usize } else { grp };
        let shift = modulate.then(|| &table[e * 6 * cols..e * 6 * cols + cols]);
        let scale = modulate.then(|| &table[e * 6 * cols + cols..e * 6 * cols + 2 * cols]);
        let s_of = |c: usize| if smooth { inv_smooth[c] as f64 } else { 1.0 };
        assert!(sg[r].is_finite(), "{what}: scale[{r}] unwritten");
        for c in 0..cols {
            let n = (row[c] as f64 - mean) * rstd;
            let y = match (shift, scale) {
                (Some(sh), Some(sc)) => n * (1.0 + sc[c] as f64) + sh[c] as f64,
                _ => n,
            };
            let qv = qg[r * cols + c];
            assert!(qv != i8::MIN, "{what}: q[{r}, {c}] unwritten");
            deq.push(qv as f32 * sg[r]);
            reference.push(y * s_of(c));
        }
        // Integer levels: within 1 of the host quantization of the reference
        // computed with T's roundings. The GPU's f32 statistics differ from the
        // f64 ones in the last bits; for bf16 that can move a value across a
        // bf16 rounding boundary, so the reference is evaluated at the corners
        // of a small box around (mean, rstd) (the rounded results are monotone
        // in both) and the GPU may be within 1 level of any of them.
        let sd = var.sqrt().max(1e-30);
        let mut corners = vec![(mean, rstd)];
        if T::BYTES == 2 {
            for dm in [-1.0, 1.0] {
                for dr in [-1.0, 1.0] {
                    corners.push((mean + dm * 4e-6 * sd, rstd * (1.0 + dr * 4e-6)));
                }
            }
        }
        let hosts: Vec<(Vec<i8>, f32)> = corners
            .iter()
            .map(|&(mu, rs)| {
                let y = ln_mod_emulated::<T>(row, mu, rs, shift, scale);
                quantize_host(&y, smooth.then_some(&inv_smooth[..]), qmax)
            })
            .collect();
        let scale_tol = if T::BYTES == 2 { 1e-2 } else { 1e-5 };
        let (_, s0) = &hosts[0];
        assert!(
            ((sg[r] - s0) / s0.max(1e-30)).abs() <= scale_tol,
            "{what}: scale[{r}] = {} vs host {s0}",
            sg[r]
        );
        for c in 0..cols {
            let qv = qg[r * cols + c] as i32;
            assert!(
                hosts.iter().any(|(qh, _)| (qv - qh[c] as i32).abs() <= 1),
                "{what}: q[{r}, {c}] = {qv}, host {:?}",
                hosts.iter().map(|(qh, _)| qh[c]).collect::<Vec<_>>()
            );
        }
    }
    // Dequantized vs the f64 LN + modulate: quantization noise (about 0.3
    // levels rms against values of qmax/5 .. qmax/3 rms) plus T's own rounding.
    let tol = 2.0 / qmax as f64 + if T::BYTES == 2 { T::TOL } else { 0.0 };
    check(&what, &deq, &reference, tol);
}

fn layernorm_q8<T: Elem>() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new();
    for qmax in [127, 31] {
        layernorm_q8_case::<T>(&g, &mut rng, 40, 1152, 9, true, true, qmax, true); // vector path, grouped
        layernorm_q8_case::<T>(&g, &mut rng, 40, 1152, 10, false, true, qmax, false);
        layernorm_q8_case::<T>(&g, &mut rng, 13, 1152, 13, false, false, qmax, true); // plain LN
        layernorm_q8_case::<T>(&g, &mut rng, 12, 37, 5, true, true, qmax, true); // scalar path
        layernorm_q8_case::<T>(&g, &mut rng, 600, 64, 225, true, true, qmax, false);
        // many rows
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn layernorm_mod_q8_f32() {
    layernorm_q8::<f32>();
}
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn layernorm_mod_q8_bf16() {
    layernorm_q8::<u16>();
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn gemm_launch_ext_rejects_bad_shapes() {
    let Some(g) = gpu() else { return };
    let args = QcGemmArgs::default();
    let ((gx, _, _), block, shared) = launch_cfg::gemm(1, 1);
    // SAFETY: every call below is rejected before reaching the driver.
    unsafe {
        let m = &g.module;
        assert!(m
            .launch_ext("qc_gemm_w8a8", (gx, 1, 1), block, shared, &g.stream, &args)
            .is_err());
        assert!(m
            .launch_ext("qc_gemm_bf16", (0, 1, 1), block, shared, &g.stream, &args)
            .is_err());
        assert!(m
            .launch_ext("qc_gemm_bf16", (1, 0, 1), block, shared, &g.stream, &args)
            .is_err());
        assert!(m
            .launch_ext("qc_gemm_bf16", (1, 1, 1), 100, shared, &g.stream, &args)
            .is_err());
        assert!(m
            .launch_ext("qc_gemm_bf16", (1, 1, 1), 2048, shared, &g.stream, &args)
            .is_err());
    }
}
