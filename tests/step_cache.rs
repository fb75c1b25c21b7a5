//! Step-level reuse changes the result only through the skipped steps, and
//! really skips the DiT.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::cache::{Counting, StaticK};
use qc::model::stdit3::inputs::SampleInputs;
use qc::model::stdit3::{NoHooks, Stdit3};
use qc::sampler::rflow::{sample, RflowConfig};
use qc::tensor::rel_l2;

#[test]
fn static_k_skips_forwards_and_stays_close() {
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let inp = SampleInputs::read(&common::fixture("rflow-tiny-video.safetensors")).unwrap();
    let geo = inp.geometry();
    let cfg = RflowConfig { num_steps: 6, ..RflowConfig::default() };
    let (full, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut NoHooks, &mut |_, _| {}).unwrap();
    let mut k1 = StaticK { k: 1 };
    let (same, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut k1, &mut |_, _| {}).unwrap();
    assert_eq!(same.f32().unwrap(), full.f32().unwrap(), "static:1 is the reference");
    let mut k2 = StaticK { k: 2 };
    let blocks = 2 * model.cfg.depth;
    let mut counting = Counting::new(&mut k2, blocks);
    let (fast, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut counting, &mut |_, _| {}).unwrap();
    counting.finish();
    // Steps 0, 2, 4, 5 computed: 4 of 6 forwards.
    assert_eq!(counting.steps_computed, 4);
    assert_eq!(counting.blocks_computed, 4 * blocks);
    assert_eq!(counting.blocks_total, 6 * blocks);
    let e = rel_l2(fast.f32().unwrap(), full.f32().unwrap());
    assert!(e > 1e-6, "skipping steps must change the result ({e})");
}

/// Served steps follow the policy's extrapolation slope: at slope 0 an
/// extrapolated step is the last computed step's velocity (`static:2` exactly),
/// at slope 1 it differs.
#[test]
fn extrapolation_follows_the_policy_slope() {
    use qc::model::stdit3::{ForwardHooks, StepAction};
    struct Extrapolating(f32);
    impl ForwardHooks for Extrapolating {
        fn step_action(&mut self, step: usize, steps: usize) -> StepAction {
            if step.is_multiple_of(2) || step + 1 == steps { StepAction::Compute } else { StepAction::Extrapolate }
        }
        fn extrapolation_slope(&self) -> f32 {
            self.0
        }
    }
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let inp = SampleInputs::read(&common::fixture("rflow-tiny-video.safetensors")).unwrap();
    let geo = inp.geometry();
    let cfg = RflowConfig { num_steps: 6, ..RflowConfig::default() };
    let run = |hooks: &mut dyn ForwardHooks| sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, hooks, &mut |_, _| {}).unwrap().0;
    let reused = run(&mut StaticK { k: 2 });
    let err = |a: &qc::tensor::Tensor, b: &qc::tensor::Tensor| rel_l2(a.f32().unwrap(), b.f32().unwrap());
    // Equal up to rounding: the line's point at slope 0 is `v0 + 1 * (v1 - v0)`.
    let flat = run(&mut Extrapolating(0.0));
    assert!(err(&flat, &reused) < 1e-6, "slope 0 against static:2: {}", err(&flat, &reused));
    let (linear, half) = (run(&mut Extrapolating(1.0)), run(&mut Extrapolating(0.5)));
    let (e1, e_half) = (err(&linear, &reused), err(&half, &reused));
    // Half the slope lands between reuse and the line.
    assert!(e1 > 1e-3 && e_half > 1e-4 && e_half < e1, "slope 1: {e1}, slope 0.5: {e_half}");
}

/// A schedule recorded by `Counting` and replayed (`cache::replay`) on the same
/// model reproduces the policy's run bit for bit: step extrapolation (hlc), the
/// block stack's residual (teacache), kept sub-module outputs.
#[test]
fn a_replayed_schedule_reproduces_the_policy() {
    use qc::cache::replay::Replay;
    use qc::model::stdit3::ForwardHooks;
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let inp = SampleInputs::read(&common::fixture("rflow-tiny-video.safetensors")).unwrap();
    let geo = inp.geometry();
    let cfg = RflowConfig { num_steps: 8, ..RflowConfig::default() };
    let mut hlc = qc::cache::hlc::Hlc::new(5.0);
    hlc.warmup = 2;
    let policies: Vec<Box<dyn ForwardHooks>> = vec![Box::new(hlc), Box::new(qc::cache::teacache::TeaCache::new(10.0, vec![1.0, 0.0]))];
    for mut policy in policies {
        let mut counting = Counting::new(policy.as_mut(), 2 * model.cfg.depth);
        counting.schedule = Some(Vec::new());
        let (cached, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut counting, &mut |_, _| {}).unwrap();
        counting.finish();
        assert!(counting.blocks_computed < counting.blocks_total, "the policy must skip work here");
        let schedule = counting.schedule.take().unwrap();
        let mut replay = Replay::new(schedule, model.cfg.depth, model.cfg.depth);
        let (replayed, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut replay, &mut |_, _| {}).unwrap();
        assert_eq!(replayed.f32().unwrap(), cached.f32().unwrap());
    }
}
