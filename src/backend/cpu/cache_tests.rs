//! The cache ops of the CPU backend (cache.rs) against scalar references:
//! quantization exactly, the int8 reuse op exactly against `add_gated` on the
//! dequantized cache, the reductions against f64 sums.

use super::tests::rand;
use super::CpuBackend;
use crate::backend::{Backend, ModRef, RowGroups};
use crate::rng::Rng;
use crate::tensor::{Storage, Tensor};
use half::bf16;

/// `(rows, C)`: C = 64, Open-Sora's 1152, odd widths, rows not a multiple of anything.
const SHAPES: [(usize, usize); 6] = [(1, 64), (37, 1152), (13, 7), (5, 1), (101, 33), (2, 1152)];

/// The definition written out element by element: `s = amax / 127` and
/// `q = round(y / s)` with ties away from zero, from the truncation.
fn reference_quantize(y: &[f32], c: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(y.len());
    let mut scales = Vec::new();
    for row in y.chunks(c) {
        let amax = row.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let s = amax / 127.0;
        scales.push(s);
        for &v in row {
            if s == 0.0 {
                q.push(0);
                continue;
            }
            let t = v / s;
            let whole = t.trunc();
            let r = if (t - whole).abs() >= 0.5 { whole + t.signum() } else { whole };
            q.push(r.clamp(-127.0, 127.0) as i8);
        }
    }
    (q, scales)
}

fn i8_data(t: &Tensor) -> &[i8] {
    match t.storage() {
        Storage::I8(v) => v,
        _ => panic!("expected an i8 tensor, got {}", t.dtype().name()),
    }
}

fn to_bf16(t: &Tensor) -> Tensor {
    Tensor::new(t.shape(), Storage::BF16(t.f32().unwrap().iter().map(|&x| bf16::from_f32(x)).collect())).unwrap()
}

/// Random values with some rows all zero and one row scaled far up.
fn cache_input(rng: &mut Rng, rows: usize, c: usize) -> Tensor {
    let mut t = rand(rng, &[rows, c]);
    let v = t.f32_mut().unwrap();
    for (r, row) in v.chunks_mut(c).enumerate() {
        match r % 5 {
            1 => row.fill(0.0),
            3 => row.iter_mut().for_each(|x| *x *= 1e4),
            _ => {}
        }
    }
    t
}

#[test]
fn quantize_rows_i8_is_exact() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(71);
    for (rows, c) in SHAPES {
        let y = cache_input(&mut rng, rows, c);
        let (q, s) = be.quantize_rows_i8(&y).unwrap();
        assert_eq!(q.shape(), [rows, c]);
        assert_eq!(s.shape(), [rows]);
        let (wq, ws) = reference_quantize(y.f32().unwrap(), c);
        assert_eq!(i8_data(&q), &wq[..], "q of {rows}x{c}");
        let got: Vec<u32> = s.f32().unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, ws.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "scales of {rows}x{c}");
        // bf16 input: the same as its values widened to f32.
        let yb = to_bf16(&y);
        let (qb, sb) = be.quantize_rows_i8(&yb).unwrap();
        let (wq, ws) = reference_quantize(yb.to_f32().unwrap().f32().unwrap(), c);
        assert_eq!(i8_data(&qb), &wq[..], "q of bf16 {rows}x{c}");
        assert_eq!(sb.f32().unwrap(), &ws[..], "scales of bf16 {rows}x{c}");
    }
    // Ties go away from zero (amax 127: s = 1 exactly), zero rows give s = 0 and q = 0.
    let y = Tensor::from_f32(&[2, 6], vec![127.0, 2.5, -2.5, 0.5, -0.5, 1.4999999, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
    let (q, s) = be.quantize_rows_i8(&y).unwrap();
    assert_eq!(i8_data(&q), &[127, 3, -3, 1, -1, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(s.f32().unwrap(), &[1.0, 0.0]);
    // Non-finite values: NaN is left out of the maximum and quantizes to 0; an infinite
    // maximum gives s = inf, every finite value 0 and inf / inf (NaN) 0 as well.
    let y = Tensor::from_f32(&[2, 4], vec![f32::NAN, 2.0, -1.0, 0.0, f32::INFINITY, 1.0, f32::NEG_INFINITY, f32::NAN]).unwrap();
    let (q, s) = be.quantize_rows_i8(&y).unwrap();
    assert_eq!(i8_data(&q), &[0, 127, -64, 0, 0, 0, 0, 0]);
    assert_eq!(s.f32().unwrap(), &[2.0 / 127.0, f32::INFINITY]);
    assert_eq!(reference_quantize(y.f32().unwrap(), 4).0, i8_data(&q));
    // Higher-rank input: rows are all but the last dimension.
    let (q, s) = be.quantize_rows_i8(&rand(&mut rng, &[2, 3, 8])).unwrap();
    assert_eq!((q.shape(), s.shape()), (&[2usize, 3, 8][..], &[6usize][..]));
    assert!(be.quantize_rows_i8(&Tensor::new(&[2], Storage::I8(vec![1, 2])).unwrap()).is_err());
}

#[test]
fn add_gated_i8_equals_add_gated_on_the_dequantized_cache() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(72);
    for (rows, c) in SHAPES {
        let y = cache_input(&mut rng, rows, c);
        let (q, s) = be.quantize_rows_i8(&y).unwrap();
        let deq: Vec<f32> = i8_data(&q).chunks(c).zip(s.f32().unwrap()).flat_map(|(r, &s)| r.iter().map(move |&v| v as f32 * s)).collect();
        let deq = Tensor::from_f32(&[rows, c], deq).unwrap();
        // Groups of 1 row (every row its own entry) and of several rows pointing at random entries.
        let table = rand(&mut rng, &[4, 6, c]);
        let per_row = RowGroups { group_size: 1, index: (0..rows).map(|r| r % 4).collect() };
        let sizes: Vec<usize> = (1..=rows).filter(|g| rows % g == 0).collect();
        let size = sizes[sizes.len() / 2];
        let grouped = RowGroups { group_size: size, index: (0..rows / size).map(|_| (rng.next_u64() % 4) as usize).collect() };
        for groups in [None, Some(&per_row), Some(&grouped)] {
            let gate = groups.map(|g| ModRef { table: &table, chunk: 2, groups: g });
            let x0 = rand(&mut rng, &[rows, c]);
            let (mut got, mut want) = (x0.clone(), x0.clone());
            be.add_gated_i8(&mut got, &q, &s, gate).unwrap();
            be.add_gated(&mut want, &deq, gate).unwrap();
            let same = got.f32().unwrap().iter().zip(want.f32().unwrap()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "add_gated_i8 {rows}x{c} (gate groups {:?}) differs from add_gated", groups.map(|g| g.group_size));
        }
    }
}

#[test]
fn add_gated_i8_checks_its_inputs() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(73);
    let y = rand(&mut rng, &[4, 8]);
    let (q, s) = be.quantize_rows_i8(&y).unwrap();
    let err = |x: &mut Tensor, q: &Tensor, s: &Tensor| be.add_gated_i8(x, q, s, None).unwrap_err().to_string();
    assert!(err(&mut rand(&mut rng, &[4, 8]), &y, &s).contains("must be i8"));
    assert!(err(&mut rand(&mut rng, &[4, 8]), &q, &Tensor::zeros(&[3])).contains("3 scales"));
    assert!(err(&mut rand(&mut rng, &[8, 4]), &q, &s).contains("do not hold the same rows"));
    let bad_groups = RowGroups::per_sample(3, 1);
    let table = rand(&mut rng, &[3, 6, 8]);
    let gate = ModRef { table: &table, chunk: 0, groups: &bad_groups };
    assert!(be.add_gated_i8(&mut rand(&mut rng, &[4, 8]), &q, &s, Some(gate)).is_err());
}

/// Per part, the f64 sums `(sum |a - b|, sum |b|)` (or `(sum |a|, sum a^2)` without `b`).
fn reference_sums(a: &[f32], b: Option<&[f32]>, parts: usize) -> Vec<(f64, f64)> {
    let len = a.len() / parts;
    (0..parts)
        .map(|p| {
            let r = p * len..(p + 1) * len;
            match b {
                Some(b) => a[r.clone()].iter().zip(&b[r]).fold((0.0, 0.0), |(d, m), (&x, &y)| (d + (x as f64 - y as f64).abs(), m + (y as f64).abs())),
                None => a[r].iter().fold((0.0, 0.0), |(s, q), &x| (s + (x as f64).abs(), q + x as f64 * x as f64)),
            }
        })
        .collect()
}

fn assert_sums(what: &str, got: &[(f32, f32)], want: &[(f64, f64)]) {
    assert_eq!(got.len(), want.len(), "{what}: parts");
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        for (g, w) in [(g.0 as f64, w.0), (g.1 as f64, w.1)] {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-30), "{what}, part {p}: {g} vs {w}");
        }
    }
}

#[test]
fn l1_distance_and_abs_sum_match_f64_sums() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(74);
    // Rows even (for two parts) and odd, widths as above, and a large one spanning many chunks.
    for (rows, c) in [(2, 64), (38, 1152), (14, 7), (6, 1), (102, 33), (1, 5), (2 * 450, 1152)] {
        let a = rand(&mut rng, &[rows, c]);
        let b = rand(&mut rng, &[rows, c]);
        for parts in [1, 2].into_iter().filter(|p| rows % p == 0) {
            let what = format!("{rows}x{c} in {parts}");
            let (av, bv) = (a.f32().unwrap(), b.f32().unwrap());
            assert_sums(&format!("l1 {what}"), &be.l1_distance(&a, &b, parts).unwrap(), &reference_sums(av, Some(bv), parts));
            assert_sums(&format!("abs_sum {what}"), &be.abs_sum(&a, parts).unwrap(), &reference_sums(av, None, parts));
            // bf16 inputs (one or both) against the sums of their widened values.
            let (ab, bb) = (to_bf16(&a), to_bf16(&b));
            let (aw, bw) = (ab.to_f32().unwrap(), bb.to_f32().unwrap());
            assert_sums(&format!("l1 bf16 {what}"), &be.l1_distance(&ab, &bb, parts).unwrap(), &reference_sums(aw.f32().unwrap(), Some(bw.f32().unwrap()), parts));
            assert_sums(&format!("l1 f32/bf16 {what}"), &be.l1_distance(&a, &bb, parts).unwrap(), &reference_sums(av, Some(bw.f32().unwrap()), parts));
            assert_sums(&format!("abs_sum bf16 {what}"), &be.abs_sum(&ab, parts).unwrap(), &reference_sums(aw.f32().unwrap(), None, parts));
        }
    }
    // Parts split the leading dimension, whatever the rank; identical tensors are 0 apart.
    let a = rand(&mut rng, &[2, 4, 3, 5]);
    let r = be.l1_distance(&a, &a, 2).unwrap();
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|&(d, m)| d == 0.0 && m > 0.0));
    assert_sums("abs_sum 4-D", &be.abs_sum(&a, 2).unwrap(), &reference_sums(a.f32().unwrap(), None, 2));
    assert_eq!(be.abs_sum(&Tensor::zeros(&[0, 8]), 2).unwrap(), vec![(0.0, 0.0); 2]);
    // Deferred, then read together: each as l1_distance gives it; a bad pair is an error.
    let (x, y) = (rand(&mut rng, &[6, 5]), rand(&mut rng, &[6, 5]));
    let pending = [be.l1_distance_deferred(&a, &a, 2).unwrap(), be.l1_distance_deferred(&x, &y, 2).unwrap()];
    assert_eq!(be.read_sums(&pending).unwrap(), vec![be.l1_distance(&a, &a, 2).unwrap(), be.l1_distance(&x, &y, 2).unwrap()]);
    assert!(be.l1_distance_deferred(&x, &a, 2).is_err());
}

#[test]
fn reductions_check_their_inputs() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(75);
    let a = rand(&mut rng, &[3, 8]);
    let msg = |r: anyhow::Result<Vec<(f32, f32)>>| r.unwrap_err().to_string();
    assert!(msg(be.l1_distance(&a, &a, 2)).contains("do not split into 2 equal parts"));
    assert!(msg(be.abs_sum(&a, 2)).contains("do not split into 2 equal parts"));
    assert!(msg(be.abs_sum(&a, 0)).contains("at least 1"));
    assert!(msg(be.l1_distance(&a, &rand(&mut rng, &[8, 3]), 1)).contains("differ"));
    assert!(msg(be.abs_sum(&Tensor::from_f32(&[], vec![1.0]).unwrap(), 1)).contains("no rows"));
    assert!(msg(be.abs_sum(&Tensor::new(&[2], Storage::I8(vec![1, 2])).unwrap(), 1)).contains("f32 or bf16"));
}
