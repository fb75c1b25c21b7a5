//! GPU tests of the VAE's ops (`kernels/conv.cu` through `conv_ops.rs`)
//! against the CPU backend on fresh random inputs (clock-seeded, the seed is
//! printed), with NaN-poisoned outputs, at small odd shapes, channel counts
//! that are not multiples of the 64-wide tiles, and real Open-Sora 1.2 VAE
//! layers; then the VAE decode fixture, a decode at the real mid-block
//! attention width (one head of 512) and prompt-to-video with the tiny
//! fixture models (VAE included) on the CUDA backend.
//!
//! Tolerances (relative L2 against the CPU in f32, inputs drawn already
//! rounded to bf16): convolutions 1e-2 (bf16 output rounding, ~2^-9 per
//! value, and f32 accumulation over up to 13824 products); group norm 1e-2 in
//! bf16 and 1e-5 in f32 (f32 statistics vs the CPU's f64); the layout ops and
//! the f32 channel affine map are exact; the whole decode 2e-2 (every
//! activation stored in bf16, as in Open-Sora's bf16 inference).

use super::executor_tests::{check, dev_bf16, dev_f32, fixture, gpu, rnd, rng, same, small};
use crate::backend::conv::{ConvOps, ConvWeight, Pad3};
use crate::backend::cpu::CpuBackend;
use crate::backend::Activation;
use crate::checkpoint::Checkpoint;
use crate::model::vae::{VaeConfig, VideoVae};
use crate::rng::Rng;
use crate::tensor::{rel_l2, Device, Tensor};

fn conv_weight(rng: &mut Rng, shape: &[usize], bias: bool) -> ConvWeight {
    let fan_in: usize = shape[1..].iter().product();
    let b = bias.then(|| rnd(rng, &[shape[0]], 0.5));
    ConvWeight::new(rnd(rng, shape, 1.0 / (fan_in as f32).sqrt()), b).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn conv2d_matches_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("conv2d"));
    // (n, c_in, c_out, h, w, k, pad, bias)
    let mut cases = vec![
        (1, 3, 5, 7, 9, 3, 1, true),
        (2, 20, 70, 6, 11, 3, 1, false),
        (3, 13, 9, 5, 5, 1, 0, true),
        (1, 8, 3, 4, 4, 3, 0, true),
        (1, 4, 130, 9, 7, 3, 2, true),
    ];
    if !small() {
        // The spatial VAE's mid-block convolution (512 -> 512 at 32 x 32, 4 frames)
        // and its last one (128 -> 3).
        cases.push((4, 512, 512, 32, 32, 3, 1, true));
        cases.push((2, 128, 3, 64, 48, 3, 1, true));
    }
    for (n, ci, co, h, w, k, pad, bias) in cases {
        let x = rnd(&mut rng, &[n, ci, h, w], 1.0);
        let mut cw = conv_weight(&mut rng, &[co, ci, k, k], bias);
        let want = cpu.conv2d(&x, &cw, [pad, pad]).unwrap();
        let what = format!("conv2d {:?} k{k} pad{pad} -> {co}", x.shape());
        // Unprepared (host) weights, then prepared ones; device bf16 and host f32 inputs.
        check(&format!("{what} (host weight)"), &be.conv2d(&dev_bf16(&be, &x), &cw, [pad, pad]).unwrap(), &want, 1e-2);
        be.prepare_conv(&mut cw).unwrap();
        assert_eq!(cw.weight.device(), Device::Cuda, "prepare_conv uploads the weight");
        check(&what, &be.conv2d(&dev_bf16(&be, &x), &cw, [pad, pad]).unwrap(), &want, 1e-2);
        check(&format!("{what} (host input)"), &be.conv2d(&x, &cw, [pad, pad]).unwrap(), &want, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn conv3d_matches_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("conv3d"));
    let causal = |k: [usize; 3]| -> Pad3 { [[k[0] - 1, 0], [k[1] / 2; 2], [k[2] / 2; 2]] };
    // (input shape, c_out, kernel, padding, bias)
    let mut cases: Vec<([usize; 5], usize, [usize; 3], Pad3, bool)> = vec![
        ([1, 4, 3, 6, 5], 8, [3, 3, 3], causal([3, 3, 3]), true),
        ([2, 5, 4, 3, 7], 67, [3, 3, 3], causal([3, 3, 3]), false),
        ([1, 12, 2, 5, 5], 6, [1, 1, 1], [[0, 0]; 3], true),
        ([1, 3, 5, 4, 6], 10, [3, 2, 3], [[0, 2], [0, 1], [2, 0]], true),
        ([1, 16, 1, 4, 4], 16, [3, 3, 3], causal([3, 3, 3]), true),
    ];
    if !small() {
        // A temporal-VAE residual-block convolution at Open-Sora 1.2's widest level
        // (512 channels) over 5 latent frames, and its 1x1x1 shortcut.
        cases.push(([1, 512, 5, 16, 20], 512, [3, 3, 3], causal([3, 3, 3]), false));
        cases.push(([1, 256, 5, 16, 20], 512, [1, 1, 1], [[0, 0]; 3], false));
    }
    for (xs, co, k, pad, bias) in cases {
        let x = rnd(&mut rng, &xs, 1.0);
        let mut cw = conv_weight(&mut rng, &[co, xs[1], k[0], k[1], k[2]], bias);
        be.prepare_conv(&mut cw).unwrap();
        let host_w = ConvWeight { weight: cw.weight.to_cpu().unwrap().to_f32().unwrap(), bias: cw.bias.as_ref().map(|b| b.to_cpu().unwrap()), ..cw.clone() };
        let want = cpu.conv3d(&x, &host_w, pad).unwrap();
        check(&format!("conv3d {xs:?} k{k:?} pad{pad:?} -> {co}"), &be.conv3d(&dev_bf16(&be, &x), &cw, pad).unwrap(), &want, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn conv_rejects_bad_shapes() {
    let (be, mut rng) = (gpu(), rng("conv errors"));
    let cw = conv_weight(&mut rng, &[4, 3, 3, 3], true);
    let err = |r: anyhow::Result<Tensor>| format!("{:#}", r.expect_err("must fail"));
    assert!(err(be.conv2d(&rnd(&mut rng, &[1, 5, 4, 4], 1.0), &cw, [1, 1])).contains("channels"));
    assert!(err(be.conv2d(&rnd(&mut rng, &[1, 3, 1, 4], 1.0), &cw, [0, 0])).contains("smaller than the kernel"));
    assert!(err(be.conv3d(&rnd(&mut rng, &[1, 3, 4, 4], 1.0), &cw, [[0, 0]; 3])).contains("[N, C, T, H, W]"));
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn group_norm_matches_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("group_norm"));
    // (shape, groups, offset): groups of 1..=several statistics chunks, the last one short.
    let mut cases: Vec<(Vec<usize>, usize, f32)> = vec![
        (vec![2, 6, 5, 7], 3, 0.0),
        (vec![1, 64, 3, 5, 7], 32, 2.0),
        (vec![3, 4, 9], 1, 0.0),
        (vec![1, 64, 5, 40, 40], 8, 3.0),
    ];
    if !small() {
        // The spatial VAE's last norm (128 channels, 32 groups) at 256 x 256, 2 frames.
        cases.push((vec![2, 128, 256, 256], 32, 0.5));
    }
    for (shape, groups, offset) in cases {
        let c = shape[1];
        let x = rnd(&mut rng, &shape, 1.5);
        // An offset mean tests the statistics' cancellation.
        let x = Tensor::from_f32(&shape, x.f32().unwrap().iter().map(|v| v + offset).collect()).unwrap();
        let x = Tensor::from_f32(&shape, x.f32().unwrap().iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()).unwrap();
        let (w, b) = (rnd(&mut rng, &[c], 1.0), rnd(&mut rng, &[c], 0.5));
        for act in [Activation::Silu, Activation::None] {
            let want = cpu.group_norm(&x, groups, &w, &b, 1e-6, act).unwrap();
            let what = format!("group_norm {shape:?} / {groups} {act:?}");
            check(&format!("{what} bf16"), &be.group_norm(&dev_bf16(&be, &x), groups, &w, &b, 1e-6, act).unwrap(), &want, 1e-2);
            check(&format!("{what} f32"), &be.group_norm(&dev_f32(&be, &x), groups, &w, &b, 1e-6, act).unwrap(), &want, 1e-5);
        }
    }
    let x = rnd(&mut rng, &[1, 6, 4], 1.0);
    let (w, b) = (rnd(&mut rng, &[6], 1.0), rnd(&mut rng, &[6], 1.0));
    assert!(format!("{:#}", be.group_norm(&x, 4, &w, &b, 1e-6, Activation::None).unwrap_err()).contains("groups"));
}

#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn resampling_ops_match_cpu() {
    let (be, cpu, mut rng) = (gpu(), CpuBackend::new(), rng("resampling"));
    for shape in [vec![2, 3, 5, 7], vec![1, 4, 2, 3, 1], vec![1, 1, 1, 1]] {
        let x = rnd(&mut rng, &shape, 1.0);
        let want = cpu.upsample_nearest2x(&x).unwrap();
        same(&format!("upsample {shape:?} bf16"), &be.upsample_nearest2x(&dev_bf16(&be, &x)).unwrap(), &want);
        same(&format!("upsample {shape:?} f32"), &be.upsample_nearest2x(&dev_f32(&be, &x)).unwrap(), &want);
    }
    for (shape, s) in [([1, 8, 3, 4, 5], 2), ([2, 6, 2, 3, 3], 3), ([1, 4, 1, 1, 1], 4)] {
        let x = rnd(&mut rng, &shape, 1.0);
        let want = cpu.depth_to_time(&x, s).unwrap();
        same(&format!("depth_to_time {shape:?} by {s} bf16"), &be.depth_to_time(&dev_bf16(&be, &x), s).unwrap(), &want);
        same(&format!("depth_to_time {shape:?} by {s} f32"), &be.depth_to_time(&dev_f32(&be, &x), s).unwrap(), &want);
    }
    for shape in [vec![1, 4, 3, 5, 6], vec![2, 3, 7]] {
        let x = rnd(&mut rng, &shape, 1.0);
        let (sc, sh) = (rnd(&mut rng, &[1, shape[1], 1], 1.0), rnd(&mut rng, &[shape[1]], 1.0));
        let want = cpu.channel_affine(&x, &sc, &sh).unwrap();
        same(&format!("channel_affine {shape:?} f32"), &be.channel_affine(&dev_f32(&be, &x), &sc, &sh).unwrap(), &want);
        check(&format!("channel_affine {shape:?} bf16"), &be.channel_affine(&dev_bf16(&be, &x), &sc, &sh).unwrap(), &want, 1e-2);
    }
}

/// The VAE decode fixture (two micro-chunks, 26 frames) on the CUDA backend:
/// against Open-Sora's output and against the CPU backend's decode.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn vae_decode_fixture_matches_reference() {
    let be = gpu();
    let ck = Checkpoint::open_file(&fixture("vae-tiny-decode.safetensors")).unwrap();
    let z = ck.load_f32("z").unwrap();
    let n = ck.load_any("num_frames").unwrap().to_i64().unwrap()[0] as usize;
    let want = ck.load_f32("video").unwrap();
    let mut vae = VideoVae::load(&fixture("vae-tiny")).unwrap();
    let cpu_video = vae.decode(&CpuBackend::new(), &z, n).unwrap();
    vae.prepare(&be).unwrap();
    let got = vae.decode(&be, &z, n).unwrap();
    let err = check("vae-tiny decode vs Open-Sora", &got, &want, 2e-2);
    let g = got.to_cpu().unwrap().to_f32().unwrap();
    let vs_cpu = rel_l2(g.f32().unwrap(), cpu_video.f32().unwrap());
    eprintln!("vae-tiny decode: GPU vs reference {err:.2e}, GPU vs CPU {vs_cpu:.2e}");
    assert!(vs_cpu < 2e-2, "GPU vs CPU decode: relative L2 error {vs_cpu:.3e}");
    eprintln!("GPU arena: {}", be.arena_stats());
}

/// The decode with the real model's mid-block attention width: the tiny fixture's
/// configuration with 512 channels at the spatial decoder's top (one attention
/// head of 512, as in the SDXL decoder), random weights, a 6 x 10 latent of 5
/// frames. Every op runs on the GPU (no host fallback is noted; the attention
/// takes qc_attention_wide_d512_bf16), and the video matches the CPU backend's.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn vae_decode_wide_mid_attention_matches_cpu() {
    let (be, mut rng) = (gpu(), rng("vae decode, 512-channel mid block"));
    let mut cfg = VaeConfig::from_dir(&fixture("vae-tiny")).unwrap();
    cfg.vae_2d.block_out_channels = vec![16, 512];
    let mut vae = VideoVae::random(cfg, 5).unwrap();
    assert!(vae.weights.spatial.mid_attention.is_some(), "the configuration has a mid-block attention");
    let frames = 5;
    let z = rnd(&mut rng, &[1, vae.latent_channels(), vae.latent_frames(frames), 6, 10], 1.0);
    let cpu_video = vae.decode(&CpuBackend::new(), &z, frames).unwrap();
    vae.prepare(&be).unwrap();
    let got = vae.decode(&be, &z, frames).unwrap();
    assert_eq!(be.notes(), Vec::<&str>::new(), "the decode used a host fallback or an unprepared weight");
    check("decode with a 512-wide mid-block attention: GPU vs CPU", &got, &cpu_video, 2e-2);
}

/// Prompt to video with the tiny fixture models (tokenizer, T5, STDiT3, the
/// VAE on the GPU), GPU against CPU.
#[test]
#[ignore = "needs a CUDA GPU: run tools/gpu-check"]
fn tiny_pipeline_with_vae_matches_cpu() {
    use crate::model::stdit3::NoHooks;
    use crate::pipeline::{plan, GenerateOptions, ModelPaths};
    let be = gpu();
    be.set_poison(false);
    let paths = ModelPaths { dit: fixture("stdit3-tiny"), t5: fixture("t5-tiny"), tokenizer: fixture("t5-tokenizer"), vae: Some(fixture("vae-tiny")) };
    let opts = GenerateOptions { frames: 17, height: 12, width: 16, steps: 6, cfg: 7.0, fps: 24.0, aes: None, raw_prompt: true, seed: 11, ..GenerateOptions::default() };
    let prompts = vec!["a red ball moving left".to_string(), "a blue square".to_string()];
    let (gv, _) = plan(&paths, &prompts, &opts).unwrap().run(&be, &opts, &mut NoHooks, &mut |_| {}).unwrap();
    let (cv, _) = plan(&paths, &prompts, &opts).unwrap().run(&CpuBackend::new(), &opts, &mut NoHooks, &mut |_| {}).unwrap();
    assert_eq!(gv.device(), Device::Cpu, "the pipeline returns the video on the host");
    assert_eq!(gv.shape(), cv.shape());
    let err = rel_l2(gv.f32().unwrap(), cv.f32().unwrap());
    eprintln!("tiny pipeline with VAE: GPU vs CPU rel err {err:.2e}");
    assert!(err < 5e-2, "tiny pipeline: relative L2 error {err:.3e}");
}
