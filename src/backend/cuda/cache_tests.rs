//! GPU tests of the cache ops (kernels/cache.cu through [`CudaBackend`]) against
//! the CPU backend on fresh random inputs (clock-seeded, printed), NaN-poisoned
//! outputs, at several shapes up to a real Open-Sora block output (2 x 8100
//! tokens x 1152; skipped under `QC_GPU_TESTS_SMALL=1`).
//!
//! Tolerances: quantization is exact (int8 values and scales bit for bit, the
//! CPU run on the same bf16 or f32 values); the int8 reuse op is exactly the
//! GPU's `add_gated` on the dequantized bf16 cache and within 1e-2 (relative
//! L2, the bf16 paths' tolerance) of the CPU's; the reductions within 1e-3
//! relative per sum of the CPU's f64 sums, and bit-identical from run to run.

use super::executor::CudaBackend;
use super::executor_tests::{dev_bf16, dev_f32, gpu, host, rng, rnd, small};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, ModRef, RowGroups};
use crate::rng::Rng;
use crate::tensor::{rel_l2, Device, Storage, Tensor};
use half::bf16;

/// `(rows, C)`: C = 64, 1152, odd; rows not a multiple of anything; and the real size.
fn shapes() -> Vec<(usize, usize)> {
    let mut v = vec![(1, 64), (37, 1152), (13, 7), (5, 1), (101, 33), (2, 1152)];
    if !small() {
        v.push((2 * 8100, 1152));
    }
    v
}

/// bf16-representable values, every fifth row zero and every fifth (other) row scaled by 1e3.
fn cache_input(rng: &mut Rng, rows: usize, c: usize) -> Tensor {
    let mut t = rnd(rng, &[rows, c], 1.0);
    for (r, row) in t.f32_mut().unwrap().chunks_mut(c).enumerate() {
        match r % 5 {
            1 => row.fill(0.0),
            3 => row.iter_mut().for_each(|x| *x = bf16::from_f32(*x * 1e3).to_f32()),
            _ => {}
        }
    }
    t
}

fn i8_host(t: &Tensor) -> Vec<i8> {
    assert_eq!(t.device(), Device::Cuda, "the int8 cache should stay on the GPU");
    match t.to_cpu().unwrap().storage() {
        Storage::I8(v) => v.clone(),
        _ => panic!("expected an i8 tensor, got {}", t.dtype().name()),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The GPU's `(q, scales)` equal the CPU's exactly.
fn same_quantization(what: &str, got: &(Tensor, Tensor), want: &(Tensor, Tensor)) {
    assert_eq!(got.0.shape(), want.0.shape(), "{what}: q shape");
    assert_eq!(got.1.shape(), want.1.shape(), "{what}: scales shape");
    let wq = match want.0.storage() {
        Storage::I8(v) => v.clone(),
        _ => unreachable!("the CPU's q is i8"),
    };
    let gq = i8_host(&got.0);
    if let Some(i) = (0..gq.len()).find(|&i| gq[i] != wq[i]) {
        panic!("{what}: q[{i}] is {}, expected {}", gq[i], wq[i]);
    }
    let (gs, ws) = (host(&got.1), want.1.f32().unwrap().to_vec());
    assert_eq!(bits(&gs), bits(&ws), "{what}: scales differ");
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn quantize_rows_i8_matches_cpu_exactly() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("quantize_rows_i8"));
    for (rows, c) in shapes() {
        let y = cache_input(&mut rng, rows, c);
        let want = cpu.quantize_rows_i8(&y).unwrap();
        same_quantization(&format!("{rows}x{c} bf16"), &be.quantize_rows_i8(&dev_bf16(&be, &y)).unwrap(), &want);
        same_quantization(&format!("{rows}x{c} f32"), &be.quantize_rows_i8(&dev_f32(&be, &y)).unwrap(), &want);
        same_quantization(&format!("{rows}x{c} host f32"), &be.quantize_rows_i8(&y).unwrap(), &want);
        // f32 values that bf16 cannot hold go through the f32 kernel unrounded.
        let yf = Tensor::from_f32(&[rows, c], rng.normal_vec(rows * c)).unwrap();
        same_quantization(&format!("{rows}x{c} full f32"), &be.quantize_rows_i8(&dev_f32(&be, &yf)).unwrap(), &cpu.quantize_rows_i8(&yf).unwrap());
    }
    // Non-finite values (NaN left out of the maximum and quantized to 0; an infinite maximum).
    let y = Tensor::from_f32(&[3, 8], [f32::NAN, 2.0, -1.0, 0.0, 0.5, -0.25, 1.5, 3.0].into_iter().chain([f32::INFINITY, 1.0, f32::NEG_INFINITY, f32::NAN, 0.0, 2.0, -3.0, 7.0]).chain([0.0; 8]).collect()).unwrap();
    let want = cpu.quantize_rows_i8(&y).unwrap();
    same_quantization("non-finite f32", &be.quantize_rows_i8(&dev_f32(&be, &y)).unwrap(), &want);
    same_quantization("non-finite bf16", &be.quantize_rows_i8(&dev_bf16(&be, &y)).unwrap(), &want);
    // A view at an odd element offset (rows not 16-byte aligned): the scalar path.
    let y = cache_input(&mut rng, 9, 35);
    let yd = dev_bf16(&be, &y);
    let view = be.narrow(&yd, 0, 1, 8).unwrap();
    same_quantization("odd-offset view", &be.quantize_rows_i8(&view).unwrap(), &cpu.quantize_rows_i8(&cpu.narrow(&y, 0, 1, 8).unwrap()).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn add_gated_i8_matches_add_gated_and_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("add_gated_i8"));
    for (rows, c) in shapes() {
        let y = cache_input(&mut rng, rows, c);
        let (q, s) = be.quantize_rows_i8(&dev_bf16(&be, &y)).unwrap();
        let (qh, sh) = (q.to_cpu().unwrap(), s.to_cpu().unwrap());
        // The dequantized cache as bf16 (what the kernel adds), for the GPU's add_gated.
        let deq: Vec<bf16> = i8_host(&q).chunks(c).zip(sh.f32().unwrap()).flat_map(|(r, &s)| r.iter().map(move |&v| bf16::from_f32(v as f32 * s))).collect();
        let deq = be.upload(&Tensor::new(&[rows, c], Storage::BF16(deq)).unwrap()).unwrap();
        let table = rnd(&mut rng, &[4, 6, c], 0.5);
        let per_row = RowGroups { group_size: 1, index: (0..rows).map(|r| (r * 3) % 4).collect() };
        let sizes: Vec<usize> = (1..=rows).filter(|g| rows % g == 0).collect();
        let size = sizes[sizes.len() / 2];
        let grouped = RowGroups { group_size: size, index: (0..rows / size).map(|g| (g + 1) % 4).collect() };
        for (name, groups) in [("no gate", None), ("gate per row", Some(&per_row)), ("gate per group", Some(&grouped))] {
            let gate = groups.map(|g| ModRef { table: &table, chunk: 2, groups: g });
            let x0 = rnd(&mut rng, &[rows, c], 1.0);
            let what = format!("add_gated_i8 {rows}x{c} {name}");
            let mut want = x0.clone();
            cpu.add_gated_i8(&mut want, &qh, &sh, gate).unwrap();
            // A device x shared with a clone: the clone must not change (copy on write).
            let mut got = dev_bf16(&be, &x0);
            let keep = got.clone();
            be.add_gated_i8(&mut got, &q, &s, gate).unwrap();
            let mut reference = dev_bf16(&be, &x0);
            be.add_gated(&mut reference, &deq, gate).unwrap();
            assert_eq!(bits(&host(&got)), bits(&host(&reference)), "{what}: differs from add_gated on the dequantized cache");
            let err = rel_l2(&host(&got), want.f32().unwrap());
            eprintln!("{what}: rel err {err:.2e} against the CPU");
            assert!(err <= 1e-2, "{what}: relative L2 error {err:.3e} against the CPU");
            assert_eq!(bits(&host(&keep)), bits(&host(&dev_bf16(&be, &x0))), "{what}: the clone of x changed");
            // Host x, q and scales are uploaded (x becomes a device tensor).
            let mut hx = x0.clone();
            be.add_gated_i8(&mut hx, &qh, &sh, gate).unwrap();
            assert_eq!(hx.device(), Device::Cuda);
            assert_eq!(bits(&host(&hx)), bits(&host(&got)), "{what}: host inputs");
        }
    }
    // Rows of 33 int8 (not 8-byte aligned per row): the scalar path.
    let y = cache_input(&mut rng, 12, 33);
    let (q, s) = be.quantize_rows_i8(&dev_bf16(&be, &y)).unwrap();
    let x0 = rnd(&mut rng, &[12, 33], 1.0);
    let mut want = x0.clone();
    cpu.add_gated_i8(&mut want, &q.to_cpu().unwrap(), &s.to_cpu().unwrap(), None).unwrap();
    let mut got = dev_bf16(&be, &x0);
    be.add_gated_i8(&mut got, &q, &s, None).unwrap();
    assert!(rel_l2(&host(&got), want.f32().unwrap()) <= 1e-2, "add_gated_i8 12x33");
}

/// Each sum within `tol` (relative) of the CPU's.
fn close_sums(what: &str, got: &[(f32, f32)], want: &[(f32, f32)], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: parts");
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        for (g, w) in [(g.0 as f64, w.0 as f64), (g.1 as f64, w.1 as f64)] {
            assert!(g.is_finite() && (g - w).abs() <= tol * w.abs() + 1e-30, "{what}, part {p}: {g} vs {w} (CPU)");
        }
    }
}

fn divergence_case(be: &CudaBackend, cpu: &CpuBackend, what: &str, a: &Tensor, b: &Tensor, ad: &Tensor, bd: &Tensor, parts: usize) {
    let want = cpu.l1_distance(a, b, parts).unwrap();
    let got = be.l1_distance(ad, bd, parts).unwrap();
    close_sums(&format!("l1 {what}"), &got, &want, 1e-3);
    assert_eq!(got, be.l1_distance(ad, bd, parts).unwrap(), "l1 {what}: not reproducible");
    let want = cpu.abs_sum(a, parts).unwrap();
    let got = be.abs_sum(ad, parts).unwrap();
    close_sums(&format!("abs_sum {what}"), &got, &want, 1e-3);
    assert_eq!(got, be.abs_sum(ad, parts).unwrap(), "abs_sum {what}: not reproducible");
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn divergence_sums_match_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("divergence"));
    let mut cases = vec![(2usize, 64usize), (38, 1152), (14, 7), (6, 1), (102, 33), (1, 5)];
    if !small() {
        cases.push((2 * 8100, 1152));
    }
    for (rows, c) in cases {
        let a = rnd(&mut rng, &[rows, c], 1.0);
        // b near a (a cache one step old) with an offset, so the two sums differ in size.
        let b = Tensor::from_f32(&[rows, c], a.f32().unwrap().iter().map(|&x| bf16::from_f32(0.9 * x + 0.05).to_f32()).collect()).unwrap();
        for parts in [1, 2].into_iter().filter(|p| rows % p == 0) {
            let what = format!("{rows}x{c} in {parts}");
            divergence_case(&be, &cpu, &format!("{what} bf16"), &a, &b, &dev_bf16(&be, &a), &dev_bf16(&be, &b), parts);
            divergence_case(&be, &cpu, &format!("{what} f32"), &a, &b, &dev_f32(&be, &a), &dev_f32(&be, &b), parts);
            divergence_case(&be, &cpu, &format!("{what} bf16/f32"), &a, &b, &dev_bf16(&be, &a), &dev_f32(&be, &b), parts);
            divergence_case(&be, &cpu, &format!("{what} host"), &a, &b, &a, &b, parts);
        }
        let ad = dev_bf16(&be, &a);
        assert!(be.l1_distance(&ad, &ad, 1).unwrap()[0].0 == 0.0, "l1 of a tensor with itself");
    }
    // Deferred reductions read back at once: each pair's sums as l1_distance gives them, bit
    // for bit (the same kernels; gathered on the device, one download), including an empty pair.
    let shapes = [(38usize, 1152usize), (14, 7), (0, 64), (2 * 6, 33)];
    let tensors: Vec<(Tensor, Tensor)> = shapes.iter().map(|&(r, c)| (dev_bf16(&be, &rnd(&mut rng, &[r, c], 1.0)), dev_bf16(&be, &rnd(&mut rng, &[r, c], 1.0)))).collect();
    let pairs: Vec<(&Tensor, &Tensor)> = tensors.iter().map(|(a, b)| (a, b)).collect();
    let pending: Vec<_> = pairs.iter().map(|(a, b)| be.l1_distance_deferred(a, b, 2).unwrap()).collect();
    let batched = be.read_sums(&pending).unwrap();
    for (i, (a, b)) in pairs.iter().enumerate() {
        assert_eq!(batched[i], be.l1_distance(a, b, 2).unwrap(), "deferred pair {i}");
    }
    // Views at odd offsets (parts not 16-byte aligned): the scalar path.
    let (a, b) = (rnd(&mut rng, &[11, 7], 1.0), rnd(&mut rng, &[11, 7], 1.0));
    let (ad, bd) = (dev_bf16(&be, &a), dev_bf16(&be, &b));
    let (av, bv) = (be.narrow(&ad, 0, 1, 10).unwrap(), be.narrow(&bd, 0, 1, 10).unwrap());
    divergence_case(&be, &cpu, "odd-offset views", &cpu.narrow(&a, 0, 1, 10).unwrap(), &cpu.narrow(&b, 0, 1, 10).unwrap(), &av, &bv, 2);
    // A download cannot be part of a CUDA graph: refused while a capture is under way.
    be.set_capturing(true);
    let refused = be.l1_distance(&ad, &bd, 1);
    be.set_capturing(false);
    assert!(refused.is_err(), "l1_distance inside a capture");
    // Empty parts; the errors of the CPU backend.
    assert_eq!(be.abs_sum(&dev_f32(&be, &Tensor::zeros(&[0, 4])), 2).unwrap(), vec![(0.0, 0.0); 2]);
    assert!(be.l1_distance(&ad, &ad, 2).is_err(), "11 rows in 2 parts");
    assert!(be.l1_distance(&ad, &dev_bf16(&be, &rnd(&mut rng, &[7, 11], 1.0)), 1).is_err(), "shape mismatch");
}
