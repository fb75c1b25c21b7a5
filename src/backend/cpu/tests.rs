//! Every CPU op against a direct f64 transcription of its PyTorch definition,
//! on fresh random inputs at several shapes.

use super::CpuBackend;
use crate::backend::{Activation, Backend, Linear, ModRef, PatchGrid, Rope, RowGroups};
use crate::rng::Rng;
use crate::tensor::{rel_l2, Tensor};

pub(crate) fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor {
    Tensor::from_f32(shape, rng.normal_vec(shape.iter().product())).unwrap()
}

pub(crate) fn assert_close(got: &Tensor, want: &[f64], tol: f64, what: &str) {
    let w: Vec<f32> = want.iter().map(|&x| x as f32).collect();
    let e = rel_l2(got.f32().unwrap(), &w);
    assert!(e < tol, "{what}: relative L2 error {e:.3e}");
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn naive_linear(x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * n];
    for r in 0..rows {
        for j in 0..n {
            out[r * n + j] = b[j] as f64 + (0..k).map(|p| x[r * k + p] as f64 * w[j * k + p] as f64).sum::<f64>();
        }
    }
    out
}

/// Random groups pointing at random table entries (the x_mask layout).
fn random_groups(rng: &mut Rng, groups: usize, size: usize, entries: usize) -> RowGroups {
    RowGroups { group_size: size, index: (0..groups).map(|_| (rng.next_u64() as usize) % entries).collect() }
}

#[test]
fn linear_with_activations_and_gated_residual() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(1);
    for &(rows, k, n) in &[(1, 3, 5), (37, 64, 96), (200, 72, 130)] {
        let x = rand(&mut rng, &[rows, k]);
        let lin = Linear::new(rand(&mut rng, &[n, k]), Some(rand(&mut rng, &[n]))).unwrap();
        let (wv, bv) = match &lin.weight {
            crate::backend::LinearWeight::F32(w) => (w.f32().unwrap().to_vec(), lin.bias.as_ref().unwrap().f32().unwrap().to_vec()),
            _ => unreachable!("f32 weights"),
        };
        let want = naive_linear(x.f32().unwrap(), &wv, &bv, rows, k, n);
        for act in [Activation::None, Activation::GeluTanh, Activation::Silu] {
            let f = |v: f64| match act {
                Activation::None => v,
                Activation::GeluTanh => gelu(v),
                Activation::Silu => v / (1.0 + (-v).exp()),
            };
            let w2: Vec<f64> = want.iter().map(|&v| f(v)).collect();
            assert_close(&be.linear(&x, &lin, act).unwrap(), &w2, 1e-5, &format!("linear {act:?} {rows}x{k}x{n}"));
        }
        // residual += gate[group] * linear(x)
        let groups = random_groups(&mut rng, rows, 1, 3);
        let table = rand(&mut rng, &[3, 6, n]);
        let mut res = rand(&mut rng, &[rows, n]);
        let mut want_res: Vec<f64> = res.f32().unwrap().iter().map(|&v| v as f64).collect();
        for r in 0..rows {
            for j in 0..n {
                want_res[r * n + j] += table.f32().unwrap()[(groups.index[r] * 6 + 2) * n + j] as f64 * want[r * n + j];
            }
        }
        be.linear_residual(&x, &lin, &mut res, Some(ModRef { table: &table, chunk: 2, groups: &groups })).unwrap();
        assert_close(&res, &want_res, 1e-5, "gated residual");
    }
}

#[test]
fn int8_linear_matches_the_integer_reference_and_approximates_f32() {
    use crate::quant::int8::{self, QMAX_A6, QMAX_A8};
    let be = CpuBackend::new();
    let mut rng = Rng::new(3);
    for &(rows, k, n) in &[(1, 4, 5), (37, 64, 96), (130, 256, 64)] {
        let x = rand(&mut rng, &[rows, k]);
        let lin = Linear::new(rand(&mut rng, &[n, k]), Some(rand(&mut rng, &[n]))).unwrap();
        let full = be.linear(&x, &lin, Activation::GeluTanh).unwrap();
        for (qmax, tol) in [(QMAX_A8, 3e-2), (QMAX_A6, 1.2e-1)] {
            let q = lin.to_int8(None, qmax).unwrap();
            let got = be.linear(&x, &q, Activation::GeluTanh).unwrap();
            // Exactly the integer pipeline: quantize, exact int32 product, dequantize, bias, (fast) GELU.
            let crate::backend::LinearWeight::Int8(w) = &q.weight else { unreachable!() };
            let a = int8::quantize_rows(x.f32().unwrap(), k, None, qmax).unwrap();
            let mut want = vec![0f32; rows * n];
            int8::dequantize(&int8::gemm_i32(&a, w).unwrap(), &a, w, Some(lin.bias.as_ref().unwrap().f32().unwrap()), &mut want);
            super::act_after_integer(&mut want, Activation::GeluTanh);
            assert_eq!(got.f32().unwrap(), &want[..], "int8 linear {rows}x{k}x{n} qmax {qmax}");
            let err = crate::tensor::rel_l2(got.f32().unwrap(), full.f32().unwrap());
            assert!(err < tol, "int8 linear vs f32: {err} (qmax {qmax}, {rows}x{k}x{n})");
        }
    }
}

/// The integer linears with their gated residual accumulated in their tasks
/// give the bits of the linear, then `add_gated`; the kept variant returns
/// that linear's output too (int8 and int4; A8, and A6 with an importance
/// vector; gate or none).
#[test]
fn integer_linear_residual_equals_linear_then_add_gated() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(4);
    for &(rows, k, n) in &[(1, 4, 5), (37, 64, 96), (512, 64, 192), (130, 256, 64)] {
        let x = rand(&mut rng, &[rows, k]);
        let float = Linear::new(rand(&mut rng, &[n, k]), Some(rand(&mut rng, &[n]))).unwrap();
        let smooth: Vec<f32> = rng.normal_vec(k).iter().map(|v| 0.5 + v.abs()).collect();
        let groups = random_groups(&mut rng, rows, 1, 3);
        let table = rand(&mut rng, &[3, 6, n]);
        for lin in [float.to_int8(None, 127).unwrap(), float.to_int8(Some(&smooth), 31).unwrap(), float.to_int4(None, 127).unwrap(), float.to_int4(Some(&smooth), 31).unwrap()] {
            for gate in [None, Some(ModRef { table: &table, chunk: 2, groups: &groups })] {
                let start = rand(&mut rng, &[rows, n]);
                let y = be.linear(&x, &lin, Activation::None).unwrap();
                let mut want = start.clone();
                be.add_gated(&mut want, &y, gate).unwrap();
                let mut got = start.clone();
                be.linear_residual(&x, &lin, &mut got, gate).unwrap();
                assert_eq!(got.f32().unwrap(), want.f32().unwrap(), "linear_residual {rows}x{k}x{n}");
                let mut kept_into = start.clone();
                let kept = be.linear_residual_kept(&x, &lin, &mut kept_into, gate).unwrap();
                assert_eq!(kept_into.f32().unwrap(), want.f32().unwrap(), "linear_residual_kept {rows}x{k}x{n}");
                assert_eq!((kept.shape(), kept.f32().unwrap()), (y.shape(), y.f32().unwrap()), "kept output {rows}x{k}x{n}");
            }
        }
    }
}

/// The MLP chained per task gives exactly the unfused ops' values, in `x` and
/// in the kept output: fc1 and fc2 in int8 and int4 (mixed too; A8, and A6
/// with importance vectors), a gate or none, kept or not. Float weights, or
/// one float linear, take the unfused ops; mismatched widths are refused.
#[test]
fn chained_mlp_equals_the_unfused_ops() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(8);
    for &(groups, size, c) in &[(1, 1, 64), (2, 70, 64), (4, 128, 64), (3, 33, 128)] {
        let rows = groups * size;
        let hidden = 4 * c;
        let rg = random_groups(&mut rng, groups, size, 3);
        let table = rand(&mut rng, &[3, 6, c]);
        let m = |chunk| ModRef { table: &table, chunk, groups: &rg };
        let fc1 = Linear::new(rand(&mut rng, &[hidden, c]), Some(rand(&mut rng, &[hidden]))).unwrap();
        let fc2 = Linear::new(rand(&mut rng, &[c, hidden]), Some(rand(&mut rng, &[c]))).unwrap();
        let (s1, s2): (Vec<f32>, Vec<f32>) = (rng.normal_vec(c).iter().map(|v| 0.5 + v.abs()).collect(), rng.normal_vec(hidden).iter().map(|v| 0.5 + v.abs()).collect());
        let pairs = [
            (fc1.to_int8(None, 127).unwrap(), fc2.to_int8(None, 127).unwrap()),
            (fc1.to_int8(Some(&s1), 31).unwrap(), fc2.to_int8(Some(&s2), 31).unwrap()),
            (fc1.to_int4(None, 127).unwrap(), fc2.to_int4(Some(&s2), 127).unwrap()),
            (fc1.to_int8(Some(&s1), 127).unwrap(), fc2.to_int4(None, 31).unwrap()),
        ];
        for (q1, q2) in &pairs {
            for gate in [None, Some(m(5))] {
                for keep in [false, true] {
                    let start = rand(&mut rng, &[rows, c]);
                    let mut want = start.clone();
                    let want_out = crate::backend::mlp_residual_unfused(&be, &mut want, 1e-6, (m(3), m(4)), q1, q2, gate, keep).unwrap();
                    let mut fused = start.clone();
                    let out = be.fused_mlp(&mut fused, 1e-6, (m(3), m(4)), q1, q2, gate).unwrap().expect("integer weights chain");
                    assert_eq!(fused.f32().unwrap(), want.f32().unwrap(), "chained mlp {rows}x{c}, gate {}", gate.is_some());
                    let mut got = start.clone();
                    let got_out = be.mlp_residual(&mut got, 1e-6, (m(3), m(4)), q1, q2, gate, keep).unwrap();
                    assert_eq!(got.f32().unwrap(), want.f32().unwrap(), "mlp_residual {rows}x{c}");
                    match (got_out, want_out) {
                        (Some(g), Some(w)) => {
                            assert_eq!((g.shape(), g.f32().unwrap()), (w.shape(), w.f32().unwrap()), "kept output {rows}x{c}");
                            assert_eq!(&out[..], w.f32().unwrap());
                        }
                        (None, None) => assert!(!keep),
                        _ => panic!("kept output where not asked, or missing"),
                    }
                }
            }
        }
        let mut x = rand(&mut rng, &[rows, c]);
        assert!(be.fused_mlp(&mut x, 1e-6, (m(3), m(4)), &fc1, &fc2, None).unwrap().is_none(), "float weights");
        assert!(be.fused_mlp(&mut x, 1e-6, (m(3), m(4)), &pairs[0].0, &fc2, None).unwrap().is_none(), "a float fc2");
        let wide = fc2.to_int8(None, 127).unwrap();
        let err = be.fused_mlp(&mut x, 1e-6, (m(3), m(4)), &wide, &pairs[0].1, None).unwrap_err().to_string();
        assert!(err.contains("fc1 expects"), "{err}");
    }
}

#[test]
fn layer_norm_modulate_per_group() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(2);
    for &(groups, size, c) in &[(1, 1, 8), (3, 5, 64), (4, 7, 1152)] {
        let rows = groups * size;
        let x = rand(&mut rng, &[rows, c]);
        let rg = random_groups(&mut rng, groups, size, 2);
        let table = rand(&mut rng, &[2, 6, c]);
        let t = table.f32().unwrap();
        let mut want = vec![0f64; rows * c];
        let mut plain = vec![0f64; rows * c];
        for r in 0..rows {
            let row: Vec<f64> = x.f32().unwrap()[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let e = rg.index[r / size];
            for j in 0..c {
                let nrm = (row[j] - mean) / (var + 1e-6).sqrt();
                plain[r * c + j] = nrm;
                want[r * c + j] = nrm * (1.0 + t[(e * 6 + 4) * c + j] as f64) + t[(e * 6 + 3) * c + j] as f64;
            }
        }
        let m = |chunk| ModRef { table: &table, chunk, groups: &rg };
        assert_close(&be.layer_norm_modulate(&x, 1e-6, Some((m(3), m(4)))).unwrap(), &want, 1e-5, "modulated LN");
        assert_close(&be.layer_norm_modulate(&x, 1e-6, None).unwrap(), &plain, 1e-5, "plain LN");
    }
}

/// The fused op gives exactly the two ops' values: integer weights (int8 and
/// int4, with and without an importance vector, A8 and A6), per-group
/// modulation or none, with and without GELU; float weights take the two ops.
#[test]
fn norm_modulate_linear_equals_the_two_ops() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(21);
    for &(groups, size, k, n) in &[(1, 1, 64, 16), (3, 70, 64, 192), (2, 33, 128, 40)] {
        let rows = groups * size;
        let x = rand(&mut rng, &[rows, k]);
        let rg = random_groups(&mut rng, groups, size, 2);
        let table = rand(&mut rng, &[2, 6, k]);
        let m = |chunk| ModRef { table: &table, chunk, groups: &rg };
        let float = Linear::new(rand(&mut rng, &[n, k]), Some(rand(&mut rng, &[n]))).unwrap();
        let smooth: Vec<f32> = rng.normal_vec(k).iter().map(|v| 0.5 + v.abs()).collect();
        let layers = [
            float.clone(),
            float.to_int8(None, 127).unwrap(),
            float.to_int8(Some(&smooth), 31).unwrap(),
            float.to_int4(None, 127).unwrap(),
            float.to_int4(Some(&smooth), 31).unwrap(),
        ];
        for (li, w) in layers.iter().enumerate() {
            for modulation in [None, Some((m(0), m(1)))] {
                for act in [Activation::None, Activation::GeluTanh] {
                    let want = be.linear(&be.layer_norm_modulate(&x, 1e-6, modulation).unwrap(), w, act).unwrap();
                    let got = be.norm_modulate_linear(&x, 1e-6, modulation, w, act).unwrap();
                    assert_eq!(got.shape(), want.shape());
                    assert_eq!(got.f32().unwrap(), want.f32().unwrap(), "rows {rows} k {k} n {n}, layer {li}, modulated {}, {act:?}", modulation.is_some());
                }
            }
        }
        let wrong = Linear::new(rand(&mut rng, &[n, k + 1]), None).unwrap().to_int8(None, 127).unwrap();
        let err = be.norm_modulate_linear(&x, 1e-6, None, &wrong, Activation::None).unwrap_err().to_string();
        assert!(err.contains("input features"), "{err}");
    }
}

#[test]
fn qk_norm_and_rope() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(3);
    for &(rows, heads, d, seq) in &[(6, 1, 4, 3), (30, 4, 16, 5), (45, 16, 72, 15)] {
        let x = rand(&mut rng, &[rows, heads * d]);
        let w = rand(&mut rng, &[d]);
        let freqs: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
        for with_rope in [false, true] {
            let mut want = vec![0f64; rows * heads * d];
            for r in 0..rows {
                for h in 0..heads {
                    let v: Vec<f64> = x.f32().unwrap()[r * heads * d + h * d..][..d].iter().map(|&a| a as f64).collect();
                    let ms = v.iter().map(|a| a * a).sum::<f64>() / d as f64;
                    let n: Vec<f64> = v.iter().zip(w.f32().unwrap()).map(|(a, &ww)| ww as f64 * a / (ms + 1e-6).sqrt()).collect();
                    let o = &mut want[r * heads * d + h * d..][..d];
                    for k in 0..d / 2 {
                        let ang = if with_rope { (r % seq) as f64 * freqs[k] as f64 } else { 0.0 };
                        o[2 * k] = n[2 * k] * ang.cos() - n[2 * k + 1] * ang.sin();
                        o[2 * k + 1] = n[2 * k + 1] * ang.cos() + n[2 * k] * ang.sin();
                    }
                }
            }
            let mut got = x.clone();
            let rope = with_rope.then_some(Rope { freqs: &freqs, seq_len: seq });
            be.qk_norm_rope(&mut got, heads, &w, 1e-6, rope).unwrap();
            assert_close(&got, &want, 1e-5, &format!("qk norm rope={with_rope} d={d}"));
        }
    }
}

#[test]
fn layout_ops() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(4);
    for dims in [[1, 1, 1, 3], [2, 3, 5, 4], [2, 15, 27, 8]] {
        let [a, b, c, d] = dims;
        let x = rand(&mut rng, &[a * b * c, d]);
        let y = be.swap_middle(&x, dims).unwrap();
        let (xv, yv) = (x.f32().unwrap(), y.f32().unwrap());
        for ai in 0..a {
            for bi in 0..b {
                for ci in 0..c {
                    for di in 0..d {
                        assert_eq!(yv[((ai * c + ci) * b + bi) * d + di], xv[((ai * b + bi) * c + ci) * d + di]);
                    }
                }
            }
        }
        assert_eq!(be.swap_middle(&y, [a, c, b, d]).unwrap().f32().unwrap(), xv, "swap is an involution");
        let parts = be.split_last(&x, 1).unwrap();
        assert_eq!(parts[0].f32().unwrap(), xv);
    }
    let x = rand(&mut rng, &[5, 6]);
    let parts = be.split_last(&x, 3).unwrap();
    for (i, p) in parts.iter().enumerate() {
        for r in 0..5 {
            assert_eq!(&p.f32().unwrap()[r * 2..r * 2 + 2], &x.f32().unwrap()[r * 6 + i * 2..r * 6 + i * 2 + 2]);
        }
    }
    // gather, select, concat, narrow
    let g = be.gather_rows(&x, &[4, 0, 4]).unwrap();
    assert_eq!(&g.f32().unwrap()[..6], &x.f32().unwrap()[24..30]);
    assert_eq!(&g.f32().unwrap()[6..12], &x.f32().unwrap()[..6]);
    assert!(be.gather_rows(&x, &[5]).is_err());
    let z = rand(&mut rng, &[5, 6]);
    let sel = be.select_rows(&[true, false, true, false, false], 1, &x, &z).unwrap();
    for r in 0..5 {
        let src = if r % 2 == 0 && r != 4 { &x } else { &z };
        assert_eq!(&sel.f32().unwrap()[r * 6..][..6], &src.f32().unwrap()[r * 6..][..6]);
    }
    let cat = be.concat(&[&x, &z]).unwrap();
    assert_eq!(cat.shape(), [10, 6]);
    let n = be.narrow(&cat.clone().reshape(&[10, 2, 3]).unwrap(), 1, 1, 1).unwrap();
    assert_eq!(n.shape(), [10, 1, 3]);
    assert_eq!(&n.f32().unwrap()[..3], &x.f32().unwrap()[3..6]);
    assert_eq!(be.narrow(&cat, 0, 5, 5).unwrap().f32().unwrap(), z.f32().unwrap());
}

#[test]
fn modulation_table_both_forms() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(5);
    let (e, k, c) = (3, 6, 10);
    let table = rand(&mut rng, &[k, c]);
    let wide = rand(&mut rng, &[e, k * c]);
    let narrow = rand(&mut rng, &[e, c]);
    let (tv, wv, nv) = (table.f32().unwrap(), wide.f32().unwrap(), narrow.f32().unwrap());
    let got_w = be.modulation_table(&table, &wide).unwrap();
    let got_n = be.modulation_table(&table, &narrow).unwrap();
    for ei in 0..e {
        for j in 0..k {
            for ci in 0..c {
                assert_eq!(got_w.f32().unwrap()[(ei * k + j) * c + ci], tv[j * c + ci] + wv[ei * k * c + j * c + ci]);
                assert_eq!(got_n.f32().unwrap()[(ei * k + j) * c + ci], tv[j * c + ci] + nv[ei * c + ci]);
            }
        }
    }
}

#[test]
fn embeddings_match_their_formulas() {
    let be = CpuBackend::new();
    let t = [0.0f32, 1.5, 999.0, 217.25];
    let got = be.timestep_embedding(&t, 256).unwrap();
    let mut want = vec![0f64; 4 * 256];
    for (i, &tv) in t.iter().enumerate() {
        for j in 0..128 {
            let f = (-(10000f64.ln()) * j as f64 / 128.0).exp();
            want[i * 256 + j] = (tv as f64 * f).cos();
            want[i * 256 + 128 + j] = (tv as f64 * f).sin();
        }
    }
    assert_close(&got, &want, 1e-5, "timestep embedding");

    for &(h, w, dim, scale, base) in &[(3, 4, 16, 0.5f32, 3.0f32), (15, 27, 64, 0.47, 20.0)] {
        let got = be.pos_embed_2d(h, w, dim, scale, base).unwrap();
        let q = dim / 4;
        let mut want = vec![0f64; h * w * dim];
        for r in 0..h {
            for c in 0..w {
                let o = &mut want[(r * w + c) * dim..][..dim];
                let (pc, pr) = (c as f64 / scale as f64 * base as f64 / w as f64, r as f64 / scale as f64 * base as f64 / h as f64);
                for j in 0..q {
                    let f = 1.0 / 10000f64.powf((2 * j) as f64 / (dim / 2) as f64);
                    o[j] = (pc * f).sin();
                    o[q + j] = (pc * f).cos();
                    o[2 * q + j] = (pr * f).sin();
                    o[3 * q + j] = (pr * f).cos();
                }
            }
        }
        assert_close(&got, &want, 1e-5, "2D position embedding");
    }
}

#[test]
fn patchify_pads_and_unpatchify_crops() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(6);
    for &(b, c, t, h, w) in &[(1, 4, 1, 2, 2), (2, 4, 3, 5, 7), (1, 3, 2, 6, 9)] {
        let grid = PatchGrid { batch: b, channels: c, t, h, w, patch: [1, 2, 2] };
        let x = rand(&mut rng, &[b, c, t, h, w]);
        let p = be.patchify(&x, &grid).unwrap();
        let [nt, nh, nw] = grid.tokens();
        assert_eq!(p.shape(), [b * nt * nh * nw, c * 4]);
        let xv = x.f32().unwrap();
        for tok in 0..b * nt * nh * nw {
            let (bi, ti, hi, wi) = (tok / (nt * nh * nw), (tok / (nh * nw)) % nt, (tok / nw) % nh, tok % nw);
            for ci in 0..c {
                for i in 0..2 {
                    for j in 0..2 {
                        let (hh, ww) = (hi * 2 + i, wi * 2 + j);
                        let want = if hh < h && ww < w { xv[(((bi * c + ci) * t + ti) * h + hh) * w + ww] } else { 0.0 };
                        assert_eq!(p.f32().unwrap()[tok * c * 4 + ci * 4 + i * 2 + j], want);
                    }
                }
            }
        }
        // unpatchify's (pt, ph, pw, c) order: permute channels-first patches to channels-last, then invert.
        let mut last = vec![0f32; p.numel()];
        for tok in 0..b * nt * nh * nw {
            for ci in 0..c {
                for s in 0..4 {
                    last[tok * c * 4 + s * c + ci] = p.f32().unwrap()[tok * c * 4 + ci * 4 + s];
                }
            }
        }
        let back = be.unpatchify(&Tensor::from_f32(p.shape(), last).unwrap(), &grid, c).unwrap();
        assert_eq!(back.f32().unwrap(), xv, "unpatchify(patchify(x)) == x for {:?}", (b, c, t, h, w));
    }
}

#[test]
fn guidance_and_euler() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(8);
    let c = rand(&mut rng, &[2, 3, 4]);
    let u = rand(&mut rng, &[2, 3, 4]);
    let g = be.guidance(&c, &u, 7.0).unwrap();
    let mut z = rand(&mut rng, &[2, 3, 4]);
    let z0 = z.clone();
    be.euler_step(&mut z, &g, &[0.5, 0.25]).unwrap();
    for i in 0..24 {
        let gv = u.f32().unwrap()[i] + 7.0 * (c.f32().unwrap()[i] - u.f32().unwrap()[i]);
        assert_eq!(g.f32().unwrap()[i], gv);
        let dt = if i < 12 { 0.5 } else { 0.25 };
        assert_eq!(z.f32().unwrap()[i], z0.f32().unwrap()[i] + gv * dt);
    }
    assert!(be.euler_step(&mut z, &g, &[0.5]).is_err());
    let m = be.mul(&c, &u).unwrap();
    for i in 0..24 {
        assert_eq!(m.f32().unwrap()[i], c.f32().unwrap()[i] * u.f32().unwrap()[i]);
    }
    // Several sizes, including ones past the parallel split.
    for n in [1usize, 777, 300_001] {
        let (x, y) = (rand(&mut rng, &[n]), rand(&mut rng, &[n]));
        let r = be.axpby(1.5, &x, -0.75, &y).unwrap();
        for (i, v) in r.f32().unwrap().iter().enumerate() {
            assert_eq!(*v, 1.5 * x.f32().unwrap()[i] + -0.75 * y.f32().unwrap()[i], "axpby {n} at {i}");
        }
    }
    assert!(be.axpby(1.0, &c, 1.0, &rand(&mut rng, &[24])).is_err());
}

/// The cache ops as a caching policy (src/cache/) uses them: a sub-module output kept
/// as int8 with per-row scales, its change at a later step measured per CFG half by
/// one small reduction, and the kept output added back with the later step's gate.
#[test]
fn int8_cache_is_kept_measured_and_reused_like_a_policy() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(17);
    let (per, c) = (45, 64);
    let rows = 2 * per;
    let kept = rand(&mut rng, &[rows, c]);
    // A later step's output: the conditional half moved by 1%, the unconditional one by 20%.
    let drift = rand(&mut rng, &[rows, c]);
    let later: Vec<f32> = kept.f32().unwrap().iter().zip(drift.f32().unwrap()).enumerate().map(|(i, (x, d))| x + if i < per * c { 0.01 } else { 0.2 } * d).collect();
    let later = Tensor::from_f32(&[rows, c], later).unwrap();

    let (q, s) = be.quantize_rows_i8(&kept).unwrap();
    assert_eq!((q.numel(), s.numel()), (rows * c, rows), "one byte per value and one scale per row");

    // Relative L1 per half from two floats each, as a policy's host-side mean |a - b| / mean |b|.
    let sums = be.l1_distance(&later, &kept, 2).unwrap();
    let (lv, kv) = (later.f32().unwrap(), kept.f32().unwrap());
    for (half, &(d, m)) in sums.iter().enumerate() {
        let r = half * per * c..(half + 1) * per * c;
        let num: f64 = lv[r.clone()].iter().zip(&kv[r.clone()]).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum();
        let den: f64 = kv[r].iter().map(|b| (*b as f64).abs()).sum();
        assert!(((d / m) as f64 - num / den).abs() <= 1e-5 * num / den, "half {half}: {} vs {}", d / m, num / den);
    }
    let rate: Vec<f32> = sums.iter().map(|(d, m)| d / m).collect();
    assert!(rate[0] < 0.02 && rate[1] > 0.1, "the halves' rates of change {rate:?}");

    // Reuse with a per-sample gate: within half a quantization step (times the gate) of the f32 cache.
    let table = rand(&mut rng, &[2, 6, c]);
    let groups = RowGroups::per_sample(2, per);
    let gate = ModRef { table: &table, chunk: 2, groups: &groups };
    let x = rand(&mut rng, &[rows, c]);
    let (mut from_i8, mut from_f32) = (x.clone(), x.clone());
    be.add_gated_i8(&mut from_i8, &q, &s, Some(gate)).unwrap();
    be.add_gated(&mut from_f32, &kept, Some(gate)).unwrap();
    let (gi8, gf32, tv, sv) = (from_i8.f32().unwrap(), from_f32.f32().unwrap(), table.f32().unwrap(), s.f32().unwrap());
    for (i, (a, b)) in gi8.iter().zip(gf32).enumerate() {
        let (row, col) = (i / c, i % c);
        let g = tv[((row / per) * 6 + 2) * c + col];
        assert!((a - b).abs() <= 0.5 * g.abs() * sv[row] + 1e-5 * (1.0 + b.abs()), "element {i}: {a} vs {b}");
    }
    // The kept output's statistics, cheaply: sum |y| and sum y^2 per half.
    let stats = be.abs_sum(&kept, 2).unwrap();
    let sq: f64 = kv[..per * c].iter().map(|v| (*v as f64) * (*v as f64)).sum();
    assert!((stats[0].1 as f64 - sq).abs() <= 1e-5 * sq);
}

/// The one-pass `qkv_operands` gives exactly the split, swaps and q/k norms done
/// one after the other (the default every other backend runs), with and without
/// the temporal swap and rope, on row counts past one parallel chunk.
#[test]
fn qkv_operands_equal_the_separate_ops() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(31);
    let freqs: Vec<f32> = (0..8).map(|i| 1.0 / 10000f32.powf(i as f32 / 8.0)).collect();
    for (dims, heads, with_rope) in [([1, 1, 5, 64], 4, false), ([2, 4, 64, 64], 4, true), ([2, 3, 70, 32], 2, false), ([1, 7, 300, 48], 3, true)] {
        let [a, b, m, c] = dims;
        let rows = a * b * m;
        let d = c / heads;
        let qkv = rand(&mut rng, &[a, b * m, 3 * c]);
        let (wq, wk) = (rand(&mut rng, &[d]), rand(&mut rng, &[d]));
        let fr: Vec<f32> = freqs.iter().cycle().take(d / 2).copied().collect();
        let rope = with_rope.then_some(Rope { freqs: &fr, seq_len: b });
        let swap = (b > 1).then_some(dims);
        let got = be.qkv_operands(&qkv, heads, &wq, &wk, 1e-6, swap, rope).unwrap();
        let mut want = be.split_last(&qkv, 3).unwrap();
        if let Some(s) = swap {
            for p in want.iter_mut() {
                *p = be.swap_middle(p, s).unwrap();
            }
        }
        be.qk_norm_rope(&mut want[0], heads, &wq, 1e-6, rope).unwrap();
        be.qk_norm_rope(&mut want[1], heads, &wk, 1e-6, rope).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape(), w.shape(), "{dims:?}");
            assert_eq!(g.f32().unwrap(), w.f32().unwrap(), "{dims:?} ({rows} rows)");
        }
    }
    let qkv = rand(&mut rng, &[4, 30]);
    let (w, short) = (rand(&mut rng, &[5]), rand(&mut rng, &[4]));
    assert!(be.qkv_operands(&qkv, 2, &w, &w, 1e-6, None, None).is_ok());
    assert!(be.qkv_operands(&qkv, 2, &w, &short, 1e-6, None, None).is_err(), "a k norm weight of 4 for heads of 5");
    assert!(be.qkv_operands(&qkv, 3, &w, &w, 1e-6, None, None).is_err(), "10 channels in 3 heads");
    assert!(be.qkv_operands(&qkv, 2, &w, &w, 1e-6, Some([1, 2, 3, 10]), None).is_err(), "a swap that does not cover the rows");
}
