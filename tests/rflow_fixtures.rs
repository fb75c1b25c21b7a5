//! RFLOW sampling with classifier-free guidance against the official outputs.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::model::stdit3::inputs::SampleInputs;
use qc::model::stdit3::{NoHooks, Stdit3};
use qc::sampler::rflow::{sample, RflowConfig};
use qc::tensor::rel_l2;

fn check_case(name: &str) {
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let path = common::fixture(name);
    let inp = SampleInputs::read(&path).unwrap();
    let meta = |k: &str| inp.metadata.get(k).unwrap_or_else(|| panic!("{name}: metadata {k}")).clone();
    let cfg = RflowConfig {
        num_steps: meta("num_sampling_steps").parse().unwrap(),
        num_timesteps: meta("num_timesteps").parse().unwrap(),
        cfg_scale: meta("cfg_scale").parse().unwrap(),
        use_timestep_transform: meta("use_timestep_transform") == "true",
    };
    let geo = inp.geometry();
    let mut steps_seen = 0;
    let (z, ts) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut NoHooks, &mut |i, _| steps_seen = i).unwrap();
    assert_eq!(steps_seen, cfg.num_steps);
    let reference = Checkpoint::open_file(&path).unwrap();
    let want_ts = reference.load_f32("timesteps").unwrap();
    let flat: Vec<f32> = ts.concat();
    assert_eq!(want_ts.numel(), flat.len(), "{name}: timestep count");
    for (g, w) in flat.iter().zip(want_ts.f32().unwrap()) {
        assert!(((g - w) / w.abs().max(1e-6)).abs() < 1e-5, "{name}: timestep {g} vs reference {w}");
    }
    let want = reference.load_f32("z").unwrap();
    let err = rel_l2(z.f32().unwrap(), want.f32().unwrap());
    eprintln!("{name}: z relative L2 {err:.2e}");
    assert!(err < 1e-3, "{name}: z relative L2 error {err:.3e}");
}

#[test]
fn video_sampling_matches_reference() {
    check_case("rflow-tiny-video.safetensors");
}

#[test]
fn image_sampling_matches_reference() {
    check_case("rflow-tiny-image.safetensors");
}
