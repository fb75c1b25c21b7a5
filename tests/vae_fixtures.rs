//! VAE decode against the official Open-Sora 1.2 `VideoAutoencoderPipeline`,
//! and the errors bad inputs and broken checkpoints must produce.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::model::vae::VideoVae;
use qc::tensor::{rel_l2, Tensor};
use std::path::Path;

fn reference() -> (Tensor, usize, Tensor) {
    let ck = Checkpoint::open_file(&common::fixture("vae-tiny-decode.safetensors")).unwrap();
    let z = ck.load_f32("z").unwrap();
    let n = ck.load_any("num_frames").unwrap().to_i64().unwrap()[0] as usize;
    (z, n, ck.load_f32("video").unwrap())
}

#[test]
fn decode_matches_reference() {
    let be = CpuBackend::new();
    let vae = VideoVae::load(&common::fixture("vae-tiny")).unwrap();
    let (z, n, want) = reference();
    assert_eq!(n, 26);
    let got = vae.decode(&be, &z, n).unwrap();
    assert_eq!(got.shape(), want.shape());
    let err = rel_l2(got.f32().unwrap(), want.f32().unwrap());
    eprintln!("vae-tiny-decode: relative L2 error {err:.3e}");
    assert!(err < 1e-4, "relative L2 error {err:.3e}");
}

#[test]
fn micro_batch_size_does_not_change_the_result() {
    let be = CpuBackend::new();
    let mut vae = VideoVae::load(&common::fixture("vae-tiny")).unwrap();
    let (z, n, _) = reference();
    let a = vae.decode(&be, &z, n).unwrap();
    vae.micro_batch = 3;
    let b = vae.decode(&be, &z, n).unwrap();
    assert!(rel_l2(a.f32().unwrap(), b.f32().unwrap()) < 1e-6);
}

#[test]
fn batch_decodes_each_sample_alone() {
    let be = CpuBackend::new();
    let vae = VideoVae::load(&common::fixture("vae-tiny")).unwrap();
    let (z, n, want) = reference();
    let zs = z.f32().unwrap();
    let z2 = Tensor::from_f32(&[2, 4, 8, 3, 4], zs.iter().chain(zs.iter().map(|x| x * 0.5).collect::<Vec<_>>().iter()).copied().collect()).unwrap();
    let got = vae.decode(&be, &z2, n).unwrap();
    assert_eq!(got.shape(), [2, 3, 26, 6, 8]);
    let per = want.numel();
    assert!(rel_l2(&got.f32().unwrap()[..per], want.f32().unwrap()) < 1e-4);
    let half = Tensor::from_f32(z.shape(), zs.iter().map(|x| x * 0.5).collect()).unwrap();
    let second = vae.decode(&be, &half, n).unwrap();
    assert!(rel_l2(&got.f32().unwrap()[per..], second.f32().unwrap()) < 1e-6);
}

#[test]
fn single_image_and_short_chunks_decode() {
    let be = CpuBackend::new();
    let vae = VideoVae::load(&common::fixture("vae-tiny")).unwrap();
    let (z, _, _) = reference();
    // 1 frame <- 1 latent frame; 17 + 1 frames <- 5 + 1.
    let one = qc::backend::Backend::narrow(&be, &z, 2, 0, 1).unwrap();
    assert_eq!(vae.decode(&be, &one, 1).unwrap().shape(), [1, 3, 1, 6, 8]);
    let six = qc::backend::Backend::narrow(&be, &z, 2, 0, 6).unwrap();
    assert_eq!(vae.decode(&be, &six, 18).unwrap().shape(), [1, 3, 18, 6, 8]);
}

fn expect_err(r: anyhow::Result<Tensor>, needles: &[&str]) {
    let msg = format!("{:#}", r.expect_err("must fail"));
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

#[test]
fn bad_latents_are_rejected() {
    let be = CpuBackend::new();
    let vae = VideoVae::load(&common::fixture("vae-tiny")).unwrap();
    let (z, n, _) = reference();
    expect_err(vae.decode(&be, &Tensor::zeros(&[4, 8, 3, 4]), n), &["z", "[4, 8, 3, 4]"]);
    expect_err(vae.decode(&be, &Tensor::zeros(&[1, 3, 8, 3, 4]), n), &["z", "channels"]);
    expect_err(vae.decode(&be, &z, 17), &["latent frames", "17"]);
    expect_err(vae.decode(&be, &z, 0), &["num_frames"]);
    let mut bad = z.clone();
    bad.f32_mut().unwrap()[37] = f32::NAN;
    expect_err(vae.decode(&be, &bad, n), &["z", "non-finite", "37"]);
}

/// Copies the fixture model into `dir` without the tensors in `drop`.
fn broken_copy(dir: &Path, drop: &[&str]) {
    let src = common::fixture("vae-tiny");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let ck = Checkpoint::open_dir(&src).unwrap();
    let tensors: Vec<(String, Tensor)> =
        ck.names().filter(|n| !drop.contains(n)).map(|n| (n.to_string(), ck.load_f32(n).unwrap())).collect();
    qc::io::write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
}

#[test]
fn missing_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = ["temporal_vae.decoder.conv_blocks.1.conv.weight", "spatial_vae.module.decoder.mid_block.attentions.0.to_k.bias"];
    broken_copy(tmp.path(), &gone);
    let msg = format!("{:#}", VideoVae::load(tmp.path()).err().expect("must fail"));
    for g in gone {
        assert!(msg.contains(g), "error {msg:?} does not name {g}");
    }
    // Encoder weights are not needed to decode.
    let tmp2 = tempfile::tempdir().unwrap();
    broken_copy(tmp2.path(), &["temporal_vae.encoder.conv_in.conv.weight", "spatial_vae.module.encoder.conv_in.weight"]);
    VideoVae::load(tmp2.path()).unwrap();
}

#[test]
fn unsupported_configs_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    broken_copy(tmp.path(), &[]);
    let cfg_path = tmp.path().join("config.json");
    let orig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 3] = [
        ("/vae_2d/up_block_types", serde_json::json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "up_block_types"),
        ("/vae_temporal/num_groups", serde_json::json!(3), "num_groups"),
        ("/vae_2d/act_fn", serde_json::json!("gelu"), "act_fn"),
    ];
    for (ptr, val, field) in cases {
        let mut c = orig.clone();
        *c.pointer_mut(ptr).unwrap() = val;
        std::fs::write(&cfg_path, serde_json::to_string(&c).unwrap()).unwrap();
        let msg = format!("{:#}", VideoVae::load(tmp.path()).err().expect("must fail"));
        assert!(msg.contains(field), "error {msg:?} does not name {field}");
    }
}

/// Timing at 240p with the real widths and random weights:
/// `cargo test --release --test vae_fixtures bench_240p -- --ignored --nocapture`.
/// Times one temporal micro-chunk (5 latent frames -> 17 frames) and one
/// 4-frame spatial micro-batch; `QC_VAE_BENCH_FULL=1` also runs the whole decode.
#[test]
#[ignore]
fn bench_240p_real_width() {
    use qc::model::vae::VaeConfig;
    use std::time::Instant;
    let be = CpuBackend::new();
    let vae = VideoVae::random(VaeConfig::opensora_v1_2(), 1).unwrap();
    let mut rng = qc::rng::Rng::new(2);
    let z = Tensor::from_f32(&[1, 4, 5, 30, 53], rng.normal_vec(4 * 5 * 30 * 53)).unwrap();
    let t0 = Instant::now();
    let x = vae.temporal_decode(&be, &z, 17).unwrap();
    let t_temporal = t0.elapsed().as_secs_f64();
    assert_eq!(x.shape(), [1, 4, 17, 30, 53]);
    let imgs = Tensor::from_f32(&[4, 4, 30, 53], rng.normal_vec(4 * 4 * 30 * 53)).unwrap();
    let t1 = Instant::now();
    let y = vae.spatial_decode(&be, &imgs).unwrap();
    let t_spatial = t1.elapsed().as_secs_f64();
    assert_eq!(y.shape(), [4, 3, 240, 424]);
    eprintln!(
        "{}: temporal chunk (17 frames) {t_temporal:.1} s, spatial 4 frames {t_spatial:.1} s; 17 frames at 240p ~ {:.1} s",
        qc::backend::Backend::name(&be),
        t_temporal + t_spatial * 17.0 / 4.0
    );
    if std::env::var_os("QC_VAE_BENCH_FULL").is_some() {
        let t2 = Instant::now();
        let v = vae.decode(&be, &z, 17).unwrap();
        assert_eq!(v.shape(), [1, 3, 17, 240, 424]);
        eprintln!("full decode of 17 frames at 240p: {:.1} s", t2.elapsed().as_secs_f64());
    }
}
