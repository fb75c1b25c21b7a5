//! GPU tests of kernels/tensor_ops.cu against the CPU backend, which defines
//! each op: layout moves, casts and the sampler update must match it exactly
//! (same f32 operations), the bf16 variants exactly after rounding the
//! reference to bf16. Fresh random inputs, NaN-poisoned outputs.

use super::abi::*;
use super::gpu_tests::{gpu, q, Elem, Gpu, Rng};
use super::launch_cfg;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, PatchGrid};
use crate::tensor::Tensor;

const GPU: &str = "needs a CUDA GPU: run tools/gpu-check";

/// Exact comparison (after the device round trip), with every element written.
fn same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} was not written ({g})");
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i} is {g}, expected {w}");
    }
}

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape, v).unwrap()
}

fn copy_case<T: Elem>(g: &Gpu, rng: &mut Rng) {
    let cpu = CpuBackend::new();
    for &(rows, c, parts) in &[(1, 8, 2), (37, 24, 3), (300, 3 * 1152, 3), (64, 6, 3)] {
        let x = q::<T>(&rng.vec(rows * c, 2.0));
        let xd = g.up::<T>(&x);
        let p = c / parts;
        // split_last: one copy per part, source column offset i * p.
        let want = cpu.split_last(&t(&[rows, c], x.clone()), parts).unwrap();
        for (i, w) in want.iter().enumerate() {
            let y = g.poisoned::<T>(rows * p);
            let args = QcCopyRowsArgs { x: g.addr(&xd, 0), y: g.addr(&y, 0), rows: rows as i64, ldx: c as i64, ldy: p as i64, x_col: (i * p) as i64, cols: p as i32, ..Default::default() };
            g.run(&format!("qc_copy_rows_{}", T::SUFFIX), launch_cfg::rows(rows as i64, p as i64, T::BYTES), args);
            same(&format!("split part {i} of {rows}x{c}"), &g.down(&y), w.f32().unwrap());
        }
        // swap_middle [a, b, rows/(a*b), c] -> [a, rows/(a*b), b, c].
        for &(a, b) in &[(1, 1), (1, rows), (rows, 1)] {
            let cc = rows / (a * b);
            let want = cpu.swap_middle(&t(&[rows, c], x.clone()), [a, b, cc, c]).unwrap();
            let y = g.poisoned::<T>(rows * c);
            let args = QcCopyRowsArgs { x: g.addr(&xd, 0), y: g.addr(&y, 0), rows: rows as i64, ldx: c as i64, ldy: c as i64, swap_b: b as i64, swap_c: cc as i64, cols: c as i32, ..Default::default() };
            g.run(&format!("qc_copy_rows_{}", T::SUFFIX), launch_cfg::rows(rows as i64, c as i64, T::BYTES), args);
            same(&format!("swap_middle {a}x{b}x{cc}x{c}"), &g.down(&y), want.f32().unwrap());
        }
        // gather_rows with repeats, into the right half of a wider output (column offset).
        let idx: Vec<usize> = (0..rows + 3).map(|i| (i * 7 + 3) % rows).collect();
        let want = cpu.gather_rows(&t(&[rows, c], x.clone()), &idx).unwrap();
        let idx32: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
        let idx_d = g.up_raw(&idx32);
        let y = g.poisoned::<T>(idx.len() * 2 * c);
        let args = QcCopyRowsArgs { x: g.addr(&xd, 0), y: g.addr(&y, 0), index: g.addr(&idx_d, 0), rows: idx.len() as i64, ldx: c as i64, ldy: 2 * c as i64, y_col: c as i64, cols: c as i32, ..Default::default() };
        g.run(&format!("qc_copy_rows_{}", T::SUFFIX), launch_cfg::rows(idx.len() as i64, c as i64, T::BYTES), args);
        let got = g.down(&y);
        let right: Vec<f32> = got.chunks(2 * c).flat_map(|r| r[c..].to_vec()).collect();
        same(&format!("gather {rows}x{c}"), &right, want.f32().unwrap());
        assert!(got.chunks(2 * c).all(|r| r[..c].iter().all(|v| v.is_nan())), "gather wrote outside its columns");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn copy_rows_f32() {
    let g = gpu().expect(GPU);
    copy_case::<f32>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn copy_rows_bf16() {
    let g = gpu().expect(GPU);
    copy_case::<u16>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn casts_round_to_nearest_even() {
    let g = gpu().expect(GPU);
    let mut rng = Rng::new();
    for n in [1usize, 1000, 1 << 20] {
        let mut x = rng.vec(n, 100.0);
        x[0] = 1.0 + 1.0 / 256.0; // a tie: rounds to even (1.0)
        let xd = g.up::<f32>(&x);
        let y = g.poisoned::<u16>(n);
        g.run("qc_cast_f32_bf16", launch_cfg::flat(n as i64, 4), QcUnaryArgs { x: g.addr(&xd, 0), y: g.addr(&y, 0), n: n as i64 });
        let got = g.down(&y);
        same("cast f32 -> bf16", &got, &q::<u16>(&x));
        let back = g.poisoned::<f32>(n);
        g.run("qc_cast_bf16_f32", launch_cfg::flat(n as i64, 2), QcUnaryArgs { x: g.addr(&y, 0), y: g.addr(&back, 0), n: n as i64 });
        same("cast bf16 -> f32", &g.down(&back), &got);
    }
}

fn modulation_case<T: Elem>(g: &Gpu, rng: &mut Rng) {
    let cpu = CpuBackend::new();
    for &(entries, chunks, c, full) in &[(2, 6, 1152, true), (3, 2, 64, false), (1, 6, 8, true)] {
        let table = rng.vec(chunks * c, 1.0);
        let width = if full { chunks * c } else { c };
        let emb = q::<T>(&rng.vec(entries * width, 1.0));
        let want = cpu.modulation_table(&t(&[chunks, c], table.clone()), &t(&[entries, width], emb.clone())).unwrap();
        let (td, ed) = (g.up::<f32>(&table), g.up::<T>(&emb));
        let out = g.poisoned::<f32>(entries * chunks * c);
        let args = QcModulationTableArgs { table: g.addr(&td, 0), emb: g.addr(&ed, 0), out: g.addr(&out, 0), entries: entries as i64, chunks: chunks as i32, c: c as i32, emb_width: width as i64 };
        g.run(&format!("qc_modulation_table_{}", T::SUFFIX), launch_cfg::flat_scalar((entries * chunks * c) as i64), args);
        same(&format!("modulation table {entries}x{chunks}x{c}"), &g.down(&out), want.f32().unwrap());
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn modulation_table_f32() {
    let g = gpu().expect(GPU);
    modulation_case::<f32>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn modulation_table_bf16() {
    let g = gpu().expect(GPU);
    modulation_case::<u16>(&g, &mut Rng::new());
}

fn broadcast_case<T: Elem>(g: &Gpu, rng: &mut Rng) {
    let cpu = CpuBackend::new();
    for &(groups, trows, c) in &[(1, 1, 8), (6, 64, 64), (4, 3600, 1152)] {
        let x = q::<T>(&rng.vec(groups * trows * c, 1.0));
        let table = rng.vec(trows * c, 1.0);
        let mut want = t(&[groups * trows, c], x.clone());
        cpu.add_rows_broadcast(&mut want, &t(&[trows, c], table.clone())).unwrap();
        let (xd, td) = (g.up::<T>(&x), g.up::<f32>(&table));
        let rows = (groups * trows) as i64;
        let args = QcAddRowsBroadcastArgs { x: g.addr(&xd, 0), table: g.addr(&td, 0), rows, table_rows: trows as i64, cols: c as i32, _pad: 0 };
        g.run(&format!("qc_add_rows_broadcast_{}", T::SUFFIX), launch_cfg::rows(rows, c as i64, 4), args);
        same(&format!("add rows broadcast {groups}x{trows}x{c}"), &g.down(&xd), &q::<T>(want.f32().unwrap()));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn add_rows_broadcast_f32() {
    let g = gpu().expect(GPU);
    broadcast_case::<f32>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn add_rows_broadcast_bf16() {
    let g = gpu().expect(GPU);
    broadcast_case::<u16>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn cfg_euler_matches_guidance_then_euler() {
    let g = gpu().expect(GPU);
    let mut rng = Rng::new();
    let cpu = CpuBackend::new();
    for &(b, per) in &[(1usize, 3 * 8 * 16 * 16), (2, 4 * 15 * 30 * 53), (3, 7)] {
        let z = rng.vec(b * per, 1.0);
        let pred = rng.vec(2 * b * per, 1.0);
        let dt: Vec<f32> = (0..b).map(|i| -0.033 * (i + 1) as f32).collect();
        let scale = 7.0f32;
        let pt = t(&[2 * b, per], pred.clone());
        let v = cpu.guidance(&cpu.narrow(&pt, 0, 0, b).unwrap(), &cpu.narrow(&pt, 0, b, b).unwrap(), scale).unwrap();
        let mut want = t(&[b, per], z.clone());
        cpu.euler_step(&mut want, &v, &dt).unwrap();
        let (zd, pd, dd) = (g.up::<f32>(&z), g.up::<f32>(&pred), g.up::<f32>(&dt));
        let vd = g.poisoned::<f32>(b * per);
        let args = QcCfgEulerArgs { z: g.addr(&zd, 0), pred: g.addr(&pd, 0), dt: g.addr(&dd, 0), v_out: g.addr(&vd, 0), batch: b as i64, per_sample: per as i64, scale, _pad: 0 };
        g.run("qc_cfg_euler_f32", launch_cfg::flat_scalar((b * per) as i64), args);
        same(&format!("cfg+euler z, {b}x{per}"), &g.down(&zd), want.f32().unwrap());
        same(&format!("cfg+euler v, {b}x{per}"), &g.down(&vd), v.f32().unwrap());
    }
}

fn patch_case<T: Elem>(g: &Gpu, rng: &mut Rng) {
    let cpu = CpuBackend::new();
    // (batch, channels, t, h, w, patch): exact fits, padding on every axis, Open-Sora's [1, 2, 2].
    for &(b, c, tt, h, w, patch) in &[(2, 4, 5, 30, 53, [1, 2, 2]), (1, 3, 8, 16, 16, [1, 2, 2]), (2, 2, 3, 5, 7, [2, 2, 3])] {
        let grid = PatchGrid { batch: b, channels: c, t: tt, h, w, patch };
        let x = rng.vec(b * c * tt * h * w, 1.0);
        let want = cpu.patchify(&t(&[b, c, tt, h, w], x.clone()), &grid).unwrap();
        let xd = g.up::<f32>(&x);
        let y = g.poisoned::<T>(want.numel());
        let args = QcPatchArgs { x: g.addr(&xd, 0), y: g.addr(&y, 0), batch: b as i64, channels: c as i32, keep_channels: c as i32, t: tt as i32, h: h as i32, w: w as i32, pt: patch[0] as i32, ph: patch[1] as i32, pw: patch[2] as i32 };
        g.run(&format!("qc_patchify_{}", T::SUFFIX), launch_cfg::flat_scalar(want.numel() as i64), args);
        same(&format!("patchify {b}x{c}x{tt}x{h}x{w} {patch:?}"), &g.down(&y), &q::<T>(want.f32().unwrap()));

        // Unpatchify tokens of 2c channels keeping the first c (pred_sigma's velocity half).
        let co = 2 * c;
        let [nt, nh, nw] = grid.tokens();
        let tokens = q::<T>(&rng.vec(b * nt * nh * nw * patch.iter().product::<usize>() * co, 1.0));
        let full = cpu.unpatchify(&t(&[b * nt * nh * nw, patch.iter().product::<usize>() * co], tokens.clone()), &grid, co).unwrap();
        let want = cpu.narrow(&full, 1, 0, c).unwrap();
        let td = g.up::<T>(&tokens);
        let out = g.poisoned::<f32>(want.numel());
        let args = QcPatchArgs { x: g.addr(&td, 0), y: g.addr(&out, 0), channels: co as i32, keep_channels: c as i32, ..args };
        g.run(&format!("qc_unpatchify_{}", T::SUFFIX), launch_cfg::flat_scalar(want.numel() as i64), args);
        same(&format!("unpatchify {b}x{co}->{c}x{tt}x{h}x{w} {patch:?}"), &g.down(&out), want.f32().unwrap());
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn patchify_unpatchify_f32() {
    let g = gpu().expect(GPU);
    patch_case::<f32>(&g, &mut Rng::new());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn patchify_unpatchify_bf16() {
    let g = gpu().expect(GPU);
    patch_case::<u16>(&g, &mut Rng::new());
}
