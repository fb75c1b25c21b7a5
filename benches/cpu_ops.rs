//! CPU backend ops at the demonstration model's and Open-Sora 1.2's shapes,
//! each timed next to a baseline measured in the same run:
//! - attention (spatial, temporal, cross) against a straightforward scalar attention,
//!   and at the demo's shapes with bf16 operands against the f32 attention,
//!   and, where the CPU has AMX-BF16, its AMX tiles against its AVX-512 kernel;
//! - W8A8 and W4A8 linears against the f32 linear of the same layer;
//! - layer norm fused with the W8A8 linear's activation quantization against
//!   the two ops one after the other.
//!
//! `cargo bench --bench cpu_ops [-- FILTER]` times the cases whose name holds
//! FILTER (median of repeated runs); under
//! `cargo test --bench cpu_ops` every case runs once and its result is checked
//! against the baseline's, so the bench cannot rot.

use qc::backend::cpu::CpuBackend;
use qc::backend::{Activation, AttnSpec, Backend, Linear, LinearWeight};
use qc::rng::Rng;
use qc::tensor::{rel_l2, Tensor};
use std::time::{Duration, Instant};

/// Median wall time of `f`, repeated until about `budget` has passed (3 runs at least).
fn median_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f(); // warm caches and the pool
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 1000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Softmax attention with scalar loops, one query at a time: the baseline.
fn scalar_attention(q: &[f32], k: &[f32], v: &[f32], spec: &AttnSpec) -> Vec<f32> {
    let (h, d) = (spec.heads, spec.head_dim);
    let c = h * d;
    let mut out = vec![0f32; spec.groups * spec.q_len * c];
    let mut s = Vec::new();
    for (g, &(k0, k1)) in spec.kv_ranges.iter().enumerate() {
        for hi in 0..h {
            for i in 0..spec.q_len {
                let row = (g * spec.q_len + i) * c + hi * d;
                let qr = &q[row..][..d];
                s.clear();
                s.extend((k0..k1).map(|j| qr.iter().zip(&k[j * c + hi * d..][..d]).map(|(a, b)| a * b).sum::<f32>() * spec.scale));
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f32 = s.iter().sum();
                for dd in 0..d {
                    out[row + dd] = (k0..k1).zip(&s).map(|(j, w)| w * v[j * c + hi * d + dd]).sum::<f32>() / z;
                }
            }
        }
    }
    out
}

struct Case {
    name: &'static str,
    /// What the timed op is compared with.
    baseline: &'static str,
    base: Duration,
    op: Duration,
}

fn attention_cases(bench: bool, filter: &str, rng: &mut Rng, out: &mut Vec<Case>) {
    // (name, groups, q_len, kv_len, heads, head_dim): demo (hidden 64, 4 heads, 8x16x16 px,
    // patch 2: 4 frames of 8x8 tokens, a CFG pair) and Open-Sora 1.2 at 240p, 17 frames
    // (5 latent frames of 15x27 tokens), one CFG pair.
    let shapes = [
        ("attention demo spatial", 2 * 4, 64, 64, 4, 16),
        ("attention demo temporal", 2 * 64, 4, 4, 4, 16),
        ("attention demo cross", 2, 256, 12, 4, 16),
        ("attention open-sora temporal", 2 * 405, 5, 5, 16, 72),
        ("attention open-sora cross", 2, 2025, 32, 16, 72),
    ];
    let budget = Duration::from_millis(if bench { 1500 } else { 0 });
    for (name, g, lq, lk, h, d) in shapes.into_iter().filter(|s| s.0.contains(filter)) {
        let spec = AttnSpec::dense(g, lq, lk, h, d);
        let q = Tensor::from_f32(&[g * lq, h * d], rng.normal_vec(g * lq * h * d)).unwrap();
        let k = Tensor::from_f32(&[g * lk, h * d], rng.normal_vec(g * lk * h * d)).unwrap();
        let v = Tensor::from_f32(&[g * lk, h * d], rng.normal_vec(g * lk * h * d)).unwrap();
        let (qs, ks, vs) = (q.f32().unwrap(), k.f32().unwrap(), v.f32().unwrap());
        let be = CpuBackend::new();
        let got = be.attention(&q, &k, &v, &spec, None).unwrap();
        let want = scalar_attention(qs, ks, vs, &spec);
        let err = rel_l2(got.f32().unwrap(), &want);
        assert!(err < 1e-5, "{name}: relative L2 {err} against the scalar attention");
        let base = median_time(budget, || drop(scalar_attention(qs, ks, vs, &spec)));
        let op = median_time(budget, || drop(be.attention(&q, &k, &v, &spec, None).unwrap()));
        out.push(Case { name, baseline: "scalar attention", base, op });
        if name.contains("demo") {
            // The bf16 attention (`--attn-bf16`) against the f32 one it stands in for.
            let bf16 = AttnSpec { bf16: true, ..spec.clone() };
            let got = be.attention(&q, &k, &v, &bf16, None).unwrap();
            let err = rel_l2(got.f32().unwrap(), &want);
            assert!(err < 1e-2, "{name} bf16: relative L2 {err} against the scalar attention");
            let base = median_time(budget, || drop(be.attention(&q, &k, &v, &spec, None).unwrap()));
            let op = median_time(budget, || drop(be.attention(&q, &k, &v, &bf16, None).unwrap()));
            let bf16_name: &'static str = Box::leak(format!("{name}, bf16 operands").into_boxed_str());
            out.push(Case { name: bf16_name, baseline: "f32 attention", base, op });
            if qc::quant::amx::bf16_available() && !name.contains("cross") {
                // Its AMX tiles against its AVX-512 kernel (AMX off for the baseline);
                // the 12-key cross-attention stays on the AVX-512 kernel (too few keys
                // to fill a tile).
                qc::quant::amx::set_enabled(false);
                let plain = be.attention(&q, &k, &v, &bf16, None).unwrap();
                let base = median_time(budget, || drop(be.attention(&q, &k, &v, &bf16, None).unwrap()));
                qc::quant::amx::set_enabled(true);
                let err = rel_l2(got.f32().unwrap(), plain.f32().unwrap());
                assert!(err < 1e-4, "{name} bf16: AMX {err} from the AVX-512 kernel");
                let op = median_time(budget, || drop(be.attention(&q, &k, &v, &bf16, None).unwrap()));
                let amx_name: &'static str = Box::leak(format!("{name}, bf16 operands on AMX").into_boxed_str());
                out.push(Case { name: amx_name, baseline: "AVX-512 bf16 attention", base, op });
            }
        }
    }
}

fn linear_cases(bench: bool, filter: &str, rng: &mut Rng, out: &mut Vec<Case>) {
    // (layer, rows, in, out): the demo's block linears on a CFG pair (512 tokens) and
    // Open-Sora's projection at 240p (2025 tokens per sample).
    let shapes = [
        ("demo qkv", 512, 64, 192),
        ("demo mlp.fc1", 512, 64, 256),
        ("demo mlp.fc2", 512, 256, 64),
        ("open-sora proj", 2 * 2025, 1152, 1152),
    ];
    let budget = Duration::from_millis(if bench { 1500 } else { 0 });
    let be = CpuBackend::new();
    for (layer, rows, k, n) in shapes {
        if !["W8A8", "W4A8"].iter().any(|p| format!("linear {layer} {rows}x{k}x{n} {p}").contains(filter)) {
            continue;
        }
        let w = Tensor::from_f32(&[n, k], rng.normal_vec(n * k).iter().map(|x| x / (k as f32).sqrt()).collect()).unwrap();
        let bias = Tensor::from_f32(&[n], rng.normal_vec(n)).unwrap();
        let f32_linear = Linear { weight: LinearWeight::F32(w), bias: Some(bias), in_features: k, out_features: n };
        let x = Tensor::from_f32(&[rows, k], rng.normal_vec(rows * k)).unwrap();
        let want = be.linear(&x, &f32_linear, Activation::None).unwrap();
        let base = median_time(budget, || drop(be.linear(&x, &f32_linear, Activation::None).unwrap()));
        let quantized = [("W8A8", f32_linear.to_int8(None, 127).unwrap()), ("W4A8", f32_linear.to_int4(None, 127).unwrap())];
        for (precision, ql) in quantized {
            let name: &'static str = Box::leak(format!("linear {layer} {rows}x{k}x{n} {precision}").into_boxed_str());
            if !name.contains(filter) {
                continue;
            }
            let got = be.linear(&x, &ql, Activation::None).unwrap();
            let err = rel_l2(got.f32().unwrap(), want.f32().unwrap());
            assert!(err < 0.15, "{layer} {precision}: relative L2 {err} against f32");
            let op = median_time(budget, || drop(be.linear(&x, &ql, Activation::None).unwrap()));
            out.push(Case { name, baseline: "f32 linear", base, op });
        }
    }
}

fn fused_norm_cases(bench: bool, filter: &str, rng: &mut Rng, out: &mut Vec<Case>) {
    let shapes = [("fused norm + W8A8 linear, demo qkv", 512, 64, 192), ("fused norm + W8A8 linear, demo mlp.fc1", 512, 64, 256)];
    let budget = Duration::from_millis(if bench { 1500 } else { 0 });
    let be = CpuBackend::new();
    for (name, rows, k, n) in shapes.into_iter().filter(|s| s.0.contains(filter)) {
        let w = Tensor::from_f32(&[n, k], rng.normal_vec(n * k)).unwrap();
        let f32_linear = Linear { weight: LinearWeight::F32(w), bias: None, in_features: k, out_features: n };
        let smooth: Vec<f32> = rng.normal_vec(k).iter().map(|v| 1.0 + 0.5 * v.abs()).collect();
        let ql = f32_linear.to_int8(Some(&smooth), 127).unwrap();
        let x = Tensor::from_f32(&[rows, k], rng.normal_vec(rows * k)).unwrap();
        let two_ops = || be.linear(&be.layer_norm_modulate(&x, 1e-6, None).unwrap(), &ql, Activation::None).unwrap();
        let fused = || be.norm_modulate_linear(&x, 1e-6, None, &ql, Activation::None).unwrap();
        assert_eq!(two_ops().f32().unwrap(), fused().f32().unwrap(), "{name}: fused and separate ops differ");
        let base = median_time(budget, || drop(two_ops()));
        let op = median_time(budget, || drop(fused()));
        out.push(Case { name, baseline: "layer norm, then linear", base, op });
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --bench cpu_ops` does not.
    let bench = std::env::args().any(|a| a == "--bench");
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_default();
    // As the binaries run: allocator tuning, and the ops called from a pool worker
    // (from outside the pool every op pays a wake-up round trip).
    qc::run_main(None, || {
        let mut rng = Rng::new(2026);
        let mut cases = Vec::new();
        attention_cases(bench, &filter, &mut rng, &mut cases);
        linear_cases(bench, &filter, &mut rng, &mut cases);
        fused_norm_cases(bench, &filter, &mut rng, &mut cases);
        if !bench {
            println!("cpu_ops: {} cases checked against their baselines (run `cargo bench --bench cpu_ops` to time them)", cases.len());
            return Ok(());
        }
        println!("| op | baseline | baseline (us) | op (us) | speed-up |");
        println!("| --- | --- | ---: | ---: | ---: |");
        for c in &cases {
            let (b, o) = (c.base.as_secs_f64() * 1e6, c.op.as_secs_f64() * 1e6);
            println!("| {} | {} | {b:.1} | {o:.1} | {:.2}x |", c.name, c.baseline, b / o);
        }
        Ok(())
    });
}
