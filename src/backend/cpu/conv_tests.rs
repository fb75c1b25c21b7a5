//! Every convolution-family CPU op against a direct f64 transcription of its
//! PyTorch definition, on random inputs at several shapes (odd sizes, padding
//! wider than the kernel reach, causal padding, tiles split inside rows).

use super::super::CpuBackend;
use crate::backend::conv::{ConvOps, ConvWeight, Pad3};
use crate::backend::Activation;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// (input shape, output channels, kernel, padding, with bias)
type Conv3dCase = ([usize; 5], usize, [usize; 3], Pad3, bool);
type Conv2dCase = ([usize; 4], usize, [usize; 2], [usize; 2], bool);

use crate::backend::cpu::tests::{assert_close, rand};

/// `F.pad` with zeros then `F.conv3d`, in f64.
fn naive_conv3d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, pad: Pad3) -> (Vec<f64>, [usize; 5]) {
    let s = x.shape();
    let (n, ci, t, h, wd) = (s[0], s[1], s[2], s[3], s[4]);
    let ws = w.shape();
    let (co, kt, kh, kw) = (ws[0], ws[2], ws[3], ws[4]);
    let (to, ho, wo) = (t + pad[0][0] + pad[0][1] + 1 - kt, h + pad[1][0] + pad[1][1] + 1 - kh, wd + pad[2][0] + pad[2][1] + 1 - kw);
    let (xv, wv) = (x.f32().unwrap(), w.f32().unwrap());
    let at = |nn: usize, c: usize, tt: isize, y: isize, xx: isize| -> f64 {
        if tt < 0 || y < 0 || xx < 0 || tt >= t as isize || y >= h as isize || xx >= wd as isize {
            return 0.0;
        }
        xv[(((nn * ci + c) * t + tt as usize) * h + y as usize) * wd + xx as usize] as f64
    };
    let mut out = vec![0f64; n * co * to * ho * wo];
    for nn in 0..n {
        for o in 0..co {
            for ot in 0..to {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b.map_or(0.0, |b| b.f32().unwrap()[o] as f64);
                        for c in 0..ci {
                            for a in 0..kt {
                                for i in 0..kh {
                                    for j in 0..kw {
                                        let v = at(
                                            nn,
                                            c,
                                            (ot + a) as isize - pad[0][0] as isize,
                                            (oy + i) as isize - pad[1][0] as isize,
                                            (ox + j) as isize - pad[2][0] as isize,
                                        );
                                        acc += v * wv[(((o * ci + c) * kt + a) * kh + i) * kw + j] as f64;
                                    }
                                }
                            }
                        }
                        out[(((nn * co + o) * to + ot) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
    }
    (out, [n, co, to, ho, wo])
}

#[test]
fn conv3d_matches_naive() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(21);
    let cases: &[Conv3dCase] = &[
        ([1, 3, 5, 4, 6], 5, [3, 3, 3], [[2, 0], [1, 1], [1, 1]], true), // CausalConv3d
        ([2, 4, 3, 7, 5], 3, [3, 3, 3], [[2, 0], [1, 1], [1, 1]], false),
        ([1, 2, 1, 3, 4], 4, [3, 3, 3], [[2, 0], [1, 1], [1, 1]], true), // a single frame: only the last tap
        ([1, 5, 4, 5, 3], 2, [1, 1, 1], [[0, 0], [0, 0], [0, 0]], true), // pointwise
        ([2, 3, 6, 3, 5], 4, [2, 3, 1], [[1, 2], [0, 2], [3, 1]], true), // uneven kernel and padding
        ([1, 7, 2, 9, 11], 6, [3, 3, 3], [[1, 1], [1, 1], [1, 1]], true),
        ([1, 16, 3, 19, 23], 8, [3, 3, 3], [[2, 0], [1, 1], [1, 1]], true), // several tiles per plane
    ];
    for &(xs, co, k, pad, with_bias) in cases {
        let x = rand(&mut rng, &xs);
        let w = rand(&mut rng, &[co, xs[1], k[0], k[1], k[2]]);
        let b = with_bias.then(|| rand(&mut rng, &[co]));
        let cw = ConvWeight::new(w.clone(), b.clone()).unwrap();
        let got = be.conv3d(&x, &cw, pad).unwrap();
        let (want, shape) = naive_conv3d(&x, &w, b.as_ref(), pad);
        assert_eq!(got.shape(), shape, "{xs:?} k {k:?} pad {pad:?}");
        assert_close(&got, &want, 1e-5, &format!("conv3d {xs:?} k {k:?} pad {pad:?}"));
    }
}

#[test]
fn conv3d_tiles_inside_rows_match_naive() {
    // A large kernel volume forces tiles that start and end inside output rows.
    let be = CpuBackend::new();
    let mut rng = Rng::new(22);
    let xs = [1, 64, 2, 37, 41];
    let x = rand(&mut rng, &xs);
    let w = rand(&mut rng, &[3, 64, 3, 3, 3]);
    let b = rand(&mut rng, &[3]);
    let pad = [[2, 0], [1, 1], [1, 1]];
    let got = be.conv3d(&x, &ConvWeight::new(w.clone(), Some(b.clone())).unwrap(), pad).unwrap();
    let (want, _) = naive_conv3d(&x, &w, Some(&b), pad);
    assert_close(&got, &want, 1e-5, "conv3d with in-row tiles");
}

#[test]
fn conv2d_matches_naive() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(23);
    let cases: &[Conv2dCase] = &[
        ([1, 4, 3, 4], 16, [3, 3], [1, 1], true),
        ([3, 5, 7, 9], 6, [3, 3], [1, 1], true),
        ([2, 6, 5, 5], 3, [1, 1], [0, 0], true),
        ([1, 3, 6, 7], 2, [3, 1], [2, 0], false),
        ([4, 8, 11, 13], 5, [3, 3], [1, 1], true),
    ];
    for &(xs, co, k, pad, with_bias) in cases {
        let x = rand(&mut rng, &xs);
        let w = rand(&mut rng, &[co, xs[1], k[0], k[1]]);
        let b = with_bias.then(|| rand(&mut rng, &[co]));
        let got = be.conv2d(&x, &ConvWeight::new(w.clone(), b.clone()).unwrap(), pad).unwrap();
        let x5 = x.clone().reshape(&[xs[0], xs[1], 1, xs[2], xs[3]]).unwrap();
        let w5 = w.clone().reshape(&[co, xs[1], 1, k[0], k[1]]).unwrap();
        let (want, s) = naive_conv3d(&x5, &w5, b.as_ref(), [[0, 0], [pad[0], pad[0]], [pad[1], pad[1]]]);
        assert_eq!(got.shape(), [s[0], s[1], s[3], s[4]]);
        assert_close(&got, &want, 1e-5, &format!("conv2d {xs:?} k {k:?}"));
    }
}

#[test]
fn conv_rejects_bad_shapes() {
    let be = CpuBackend::new();
    let w = ConvWeight::new(Tensor::zeros(&[2, 3, 3, 3]), None).unwrap();
    assert!(be.conv2d(&Tensor::zeros(&[1, 4, 5, 5]), &w, [1, 1]).is_err(), "channel mismatch");
    assert!(be.conv2d(&Tensor::zeros(&[1, 3, 1, 5]), &w, [0, 0]).is_err(), "input smaller than the kernel");
    assert!(be.conv2d(&Tensor::zeros(&[3, 5, 5]), &w, [1, 1]).is_err(), "rank");
    let w3 = ConvWeight::new(Tensor::zeros(&[2, 3, 3, 3, 3]), None).unwrap();
    assert!(be.conv2d(&Tensor::zeros(&[1, 3, 5, 5]), &w3, [1, 1]).is_err(), "3-D kernel in conv2d");
    assert!(be.conv3d(&Tensor::zeros(&[1, 3, 5, 5]), &w3, [[2, 0], [1, 1], [1, 1]]).is_err(), "rank");
    assert!(ConvWeight::new(Tensor::zeros(&[2, 3, 3]), None).is_err());
    assert!(ConvWeight::new(Tensor::zeros(&[2, 3, 3, 3]), Some(Tensor::zeros(&[3]))).is_err());
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn group_norm_matches_naive() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(24);
    let cases: &[(&[usize], usize, f32, Activation)] = &[
        (&[1, 16, 3, 4], 4, 1e-6, Activation::None),
        (&[2, 8, 5, 7, 3], 4, 1e-5, Activation::Silu),
        (&[3, 6, 11], 3, 1e-6, Activation::Silu),
        (&[1, 32, 2, 33, 65], 32, 1e-5, Activation::Silu), // one channel per group
        (&[2, 5, 1], 1, 1e-6, Activation::None),
    ];
    for &(shape, groups, eps, act) in cases {
        let mut x = rand(&mut rng, shape);
        // An offset and a spread per sample test the two-pass variance.
        for v in x.f32_mut().unwrap().iter_mut() {
            *v = *v * 3.0 + 5.0;
        }
        let c = shape[1];
        let w = rand(&mut rng, &[c]);
        let b = rand(&mut rng, &[c]);
        let got = be.group_norm(&x, groups, &w, &b, eps, act).unwrap();
        let (xv, wv, bv) = (x.f32().unwrap(), w.f32().unwrap(), b.f32().unwrap());
        let sp: usize = shape[2..].iter().product();
        let gs = (c / groups) * sp;
        let mut want = vec![0f64; xv.len()];
        for (gi, grp) in xv.chunks(gs).enumerate() {
            let mean = grp.iter().map(|&v| v as f64).sum::<f64>() / gs as f64;
            let var = grp.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / gs as f64;
            for (k, &v) in grp.iter().enumerate() {
                let ch = (gi % groups) * (c / groups) + k / sp;
                let y = (v as f64 - mean) / (var + eps as f64).sqrt() * wv[ch] as f64 + bv[ch] as f64;
                want[gi * gs + k] = if act == Activation::Silu { silu(y) } else { y };
            }
        }
        assert_close(&got, &want, 1e-5, &format!("group_norm {shape:?} groups {groups}"));
    }
    let x = Tensor::zeros(&[1, 6, 4]);
    assert!(be.group_norm(&x, 4, &Tensor::zeros(&[6]), &Tensor::zeros(&[6]), 1e-5, Activation::None).is_err(), "6 channels in 4 groups");
    assert!(be.group_norm(&x, 3, &Tensor::zeros(&[5]), &Tensor::zeros(&[6]), 1e-5, Activation::None).is_err(), "weight size");
}

#[test]
fn upsample_depth_to_time_and_affine_match_naive() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(25);
    for shape in [[1usize, 3, 2, 5], [2, 4, 7, 3], [1, 1, 1, 1]] {
        let x = rand(&mut rng, &shape);
        let got = be.upsample_nearest2x(&x).unwrap();
        let (h, w) = (shape[2], shape[3]);
        assert_eq!(got.shape(), [shape[0], shape[1], 2 * h, 2 * w]);
        let xv = x.f32().unwrap();
        let mut want = vec![0f64; xv.len() * 4];
        for p in 0..shape[0] * shape[1] {
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    want[(p * 2 * h + y) * 2 * w + xx] = xv[(p * h + y / 2) * w + xx / 2] as f64;
                }
            }
        }
        assert_close(&got, &want, 1e-7, &format!("upsample {shape:?}"));
    }
    for (shape, s) in [([1usize, 8, 3, 2, 5], 2), ([2, 6, 2, 3, 3], 3), ([1, 4, 5, 1, 7], 1)] {
        let x = rand(&mut rng, &shape);
        let got = be.depth_to_time(&x, s).unwrap();
        let (n, c, t, plane) = (shape[0], shape[1] / s, shape[2], shape[3] * shape[4]);
        assert_eq!(got.shape(), [n, c, t * s, shape[3], shape[4]]);
        let xv = x.f32().unwrap();
        let mut want = vec![0f64; xv.len()];
        for nn in 0..n {
            for cc in 0..c {
                for tt in 0..t {
                    for i in 0..s {
                        for p in 0..plane {
                            want[((nn * c + cc) * t * s + tt * s + i) * plane + p] = xv[((nn * c * s + cc * s + i) * t + tt) * plane + p] as f64;
                        }
                    }
                }
            }
        }
        assert_close(&got, &want, 1e-7, &format!("depth_to_time {shape:?} s {s}"));
    }
    assert!(be.depth_to_time(&Tensor::zeros(&[1, 5, 2, 2, 2]), 2).is_err());
    for shape in [vec![2usize, 4, 3, 5, 2], vec![1, 3, 7]] {
        let x = rand(&mut rng, &shape);
        let c = shape[1];
        let a = rand(&mut rng, &[1, c, 1]);
        let b = rand(&mut rng, &[c]);
        let got = be.channel_affine(&x, &a, &b).unwrap();
        let sp: usize = shape[2..].iter().product();
        let (xv, av, bv) = (x.f32().unwrap(), a.f32().unwrap(), b.f32().unwrap());
        let want: Vec<f64> = xv.iter().enumerate().map(|(i, &v)| v as f64 * av[(i / sp) % c] as f64 + bv[(i / sp) % c] as f64).collect();
        assert_close(&got, &want, 1e-7, &format!("channel_affine {shape:?}"));
    }
    assert!(be.channel_affine(&Tensor::zeros(&[1, 3, 2]), &Tensor::zeros(&[2]), &Tensor::zeros(&[3])).is_err());
}

