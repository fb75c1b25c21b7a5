//! GPU tests of `kernels/attention_int8.cu` through [`CudaBackend`] (`AttnSpec::qk_int8`):
//! against the CPU backend's int8-QK attention (`backend::cpu::attention_int8`) on
//! fresh random bf16-representable inputs, so both quantize the same values to the
//! same int8 Q, K and scales. Conventions of `executor_tests.rs`: clock seed printed,
//! NaN-poisoned outputs (every element must be written), `QC_GPU_TESTS_SMALL=1`
//! shrinks the Open-Sora shapes for the sanitizer runs.
//!
//! - The int32 products `S = Q K^T` are compared exactly (the kernel's `acc_out`
//!   against `attention_int8::scores_i32`; entries past a group's keys must stay
//!   untouched), which also proves the quantization identical on both sides.
//! - Outputs: relative L2 <= 1e-2 against the CPU's int8-QK attention (same scores;
//!   the GPU rounds P, V and the output to bf16, ~2^-9 each), and, as a sanity
//!   check of the whole path, <= 3e-2 against the float attention.

use super::executor_tests::{check, dev_bf16, gpu, rng, rnd, small};
use crate::backend::cpu::attention_int8::scores_i32;
use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnSpec, Backend};
use crate::rng::Rng;
use crate::tensor::Tensor;

fn int8(mut spec: AttnSpec) -> AttnSpec {
    spec.qk_int8 = true;
    spec
}

/// Keys as a DiT's: a large common offset per channel (what the smoothing removes) plus noise.
fn keys(rng: &mut Rng, rows: usize, c: usize) -> Tensor {
    let offset: Vec<f32> = rnd(rng, &[c], 3.0).f32().unwrap().to_vec();
    let noise = rnd(rng, &[rows, c], 1.0);
    let v: Vec<f32> = noise.f32().unwrap().iter().enumerate().map(|(i, x)| half::bf16::from_f32(x + offset[i % c]).to_f32()).collect();
    Tensor::from_f32(&[rows, c], v).unwrap()
}

fn inputs(rng: &mut Rng, spec: &AttnSpec) -> (Tensor, Tensor, Tensor) {
    let c = spec.heads * spec.head_dim;
    let nk = spec.kv_ranges.iter().map(|r| r.1).max().unwrap_or(0);
    (rnd(rng, &[spec.groups * spec.q_len, c], 1.0), keys(rng, nk, c), rnd(rng, &[nk, c], 1.0))
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn int8_scores_are_exact() {
    let (be, mut rng) = (gpu(), rng("int8 attention scores"));
    let cases = [
        AttnSpec::dense(3, 5, 5, 2, 8),                                                 // head dim 8 (d32 kernel)
        AttnSpec::dense(6, 16, 16, 4, 16),                                              // the demo model's spatial attention
        AttnSpec::dense(16, 8, 8, 4, 16),                                               // its temporal attention
        AttnSpec::dense(2, 130, 130, 2, 40),                                            // d64 kernel, partial tiles
        AttnSpec::dense(2, 70, 70, 2, 72),                                              // Open-Sora's head dim (d96)
        AttnSpec::ragged(67, 2, 72, AttnSpec::ranges_from_offsets(&[0, 5, 17, 17, 100])), // cross, an empty range
        AttnSpec::ragged(40, 2, 80, vec![(3, 90), (0, 30)]),                            // overlapping ranges, d96
        AttnSpec::dense(1, 100, 100, 2, 128),                                           // d128 (32-key tiles)
    ];
    for spec in cases.into_iter().map(int8) {
        let (q, k, v) = inputs(&mut rng, &spec);
        let what = format!("int8 scores g{} q{} h{} d{} ranges {:?}", spec.groups, spec.q_len, spec.heads, spec.head_dim, &spec.kv_ranges[..spec.kv_ranges.len().min(4)]);
        let want = scores_i32(&q, &k, &spec).unwrap();
        let (_, got) = be.attention_i8_with_scores(&dev_bf16(&be, &q), &dev_bf16(&be, &k), &dev_bf16(&be, &v), &spec).unwrap();
        let got = got.to_i64().unwrap();
        let max_len = spec.kv_ranges.iter().map(|r| r.1 - r.0).max().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: size");
        for (row, (g_row, w_row)) in got.chunks(max_len.max(1)).zip(want.chunks(max_len.max(1))).enumerate() {
            let grp = row / (spec.heads * spec.q_len);
            let lk = spec.kv_ranges[grp].1 - spec.kv_ranges[grp].0;
            for j in 0..max_len {
                let expect = if j < lk { w_row[j] as i64 } else { i32::MIN as i64 };
                assert_eq!(g_row[j], expect, "{what}: S row {row} key {j}");
            }
        }
        eprintln!("{what}: exact");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn int8_attention_matches_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("int8 attention"));
    let heads = if small() { 2 } else { 16 };
    let mut cases = vec![
        AttnSpec::dense(6, 16, 16, 4, 16),
        AttnSpec::dense(16, 8, 8, 4, 16),
        AttnSpec::ragged(128, 4, 16, AttnSpec::ranges_from_offsets(&[0, 9, 21])),
        AttnSpec::dense(2, 20, 150, 2, 32),
        AttnSpec::dense(3, 33, 33, 2, 64),
        AttnSpec::dense(4, 405, 405, heads, 72),                                      // spatial, 405 tokens
        AttnSpec::dense(405, 15, 15, heads, 72),                                      // temporal: 15 frames
        AttnSpec::ragged(2 * 405, heads, 72, AttnSpec::ranges_from_offsets(&[0, 120, 420])), // cross, ragged
        AttnSpec::ragged(50, 2, 72, AttnSpec::ranges_from_offsets(&[0, 0, 7])),      // a group without keys
        AttnSpec::dense(2, 100, 100, 2, 128),
    ];
    // Open-Sora 1.2 at 720p: 3600 tokens per frame, 16 heads of 72 (2 under the sanitizers).
    cases.push(AttnSpec::dense(1, 3600, 3600, heads, 72));
    for spec in cases.into_iter().map(int8) {
        let (q, k, v) = inputs(&mut rng, &spec);
        let what = format!("int8 attention g{} q{} h{} d{} ranges {:?}", spec.groups, spec.q_len, spec.heads, spec.head_dim, &spec.kv_ranges[..spec.kv_ranges.len().min(4)]);
        let want = cpu.attention(&q, &k, &v, &spec, None).unwrap();
        let got = be.attention(&dev_bf16(&be, &q), &dev_bf16(&be, &k), &dev_bf16(&be, &v), &spec, None).unwrap();
        check(&what, &got, &want, 1e-2);
        let float = cpu.attention(&q, &k, &v, &AttnSpec { qk_int8: false, ..spec.clone() }, None).unwrap();
        check(&format!("{what} vs float"), &got, &float, 3e-2);
    }
    // A score bias is refused (T5 keeps the float path).
    let spec = int8(AttnSpec::dense(1, 4, 4, 1, 16));
    let t = rnd(&mut rng, &[4, 16], 1.0);
    let bias = rnd(&mut rng, &[1, 4, 4], 1.0);
    assert!(be.attention(&t, &t, &t, &spec, Some(&bias)).is_err(), "a score bias must be refused");
}
