//! Sub-module actions (compute, compute-and-store, reuse, skip) in the STDiT3
//! forward: the executor support that caching policies (HLC, SRAP, PAB, ...) use.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::model::stdit3::inputs::{ForwardInputs, SampleInputs};
use qc::model::stdit3::{BlockId, DitInput, ForwardHooks, NoHooks, Stdit3, SubAction, SubModule};
use qc::sampler::rflow::{sample, RflowConfig};
use qc::tensor::{rel_l2, Tensor};
use std::collections::HashMap;

/// A scripted policy: one action for every sub-module, a store of kept outputs.
struct Scripted {
    action: Box<dyn FnMut(BlockId, SubModule) -> SubAction>,
    kept: HashMap<(bool, usize, SubModule), Tensor>,
    calls: usize,
}

impl Scripted {
    fn new(action: impl FnMut(BlockId, SubModule) -> SubAction + 'static) -> Self {
        Scripted { action: Box::new(action), kept: HashMap::new(), calls: 0 }
    }
}

fn key(id: BlockId, sub: SubModule) -> (bool, usize, SubModule) {
    (id.kind == qc::model::stdit3::BlockKind::Spatial, id.index, sub)
}

impl ForwardHooks for Scripted {
    fn sub_action(&mut self, id: BlockId, sub: SubModule) -> SubAction {
        self.calls += 1;
        (self.action)(id, sub)
    }
    fn store(&mut self, _be: &dyn qc::backend::Backend, id: BlockId, sub: SubModule, output: Tensor) {
        self.kept.insert(key(id, sub), output);
    }
    fn cached(&self, id: BlockId, sub: SubModule) -> Option<qc::backend::CachedRef<'_>> {
        self.kept.get(&key(id, sub)).map(Into::into)
    }
}

fn forward(model: &Stdit3, inp: &ForwardInputs, hooks: &mut dyn ForwardHooks) -> anyhow::Result<Tensor> {
    let be = CpuBackend::new();
    let text = model.encode_text(&be, &inp.y, inp.mask.as_deref(), &mut NoHooks)?;
    let d = DitInput { x: &inp.x, timestep: &inp.timestep, fps: &inp.fps, height: inp.height[0], width: inp.width[0], x_mask: inp.x_mask.as_deref() };
    model.forward(&be, &d, &text, hooks)
}

#[test]
fn stored_outputs_reproduce_the_forward_and_skips_remove_work() {
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    for case in ["stdit3-tiny-forward.safetensors", "stdit3-tiny-forward-xmask.safetensors"] {
        let inp = ForwardInputs::read(&common::fixture(case)).unwrap();
        let reference = forward(&model, &inp, &mut NoHooks).unwrap();
        // Computing through the unfused path (linear, then the gated add) and keeping
        // every output changes nothing, bit for bit.
        let mut keep = Scripted::new(|_, _| SubAction::ComputeAndStore);
        let kept = forward(&model, &inp, &mut keep).unwrap();
        assert_eq!(kept.f32().unwrap(), reference.f32().unwrap(), "{case}: compute-and-store");
        let subs = 3 * 2 * model.cfg.depth;
        assert_eq!((keep.calls, keep.kept.len()), (subs, subs));
        // Reusing those outputs on the same input (the gate of this step times the kept
        // output) is the forward again, bit for bit, without computing any sub-module.
        let mut reuse = Scripted { action: Box::new(|_, _| SubAction::Reuse), kept: keep.kept.clone(), calls: 0 };
        let reused = forward(&model, &inp, &mut reuse).unwrap();
        assert_eq!(reused.f32().unwrap(), reference.f32().unwrap(), "{case}: reuse");
        // Skipping a sub-module (identity) changes the output; reusing with nothing kept is an error.
        let mut skip = Scripted::new(|id, sub| if id.index == 0 && sub == SubModule::CrossAttention { SubAction::Skip } else { SubAction::Compute });
        let skipped = forward(&model, &inp, &mut skip).unwrap();
        let e = rel_l2(skipped.f32().unwrap(), reference.f32().unwrap());
        assert!(e > 1e-4, "{case}: skipping a cross-attention must change the output ({e})");
        let err = forward(&model, &inp, &mut Scripted::new(|_, _| SubAction::Reuse)).unwrap_err().to_string();
        assert!(err.contains("nothing is cached"), "{err}");
    }
}

/// Over a sampling run: compute and keep every sub-module on even steps, reuse
/// the kept outputs with the current gates on odd steps. Close to the full
/// computation, and not equal to it.
#[test]
fn reuse_across_steps_stays_close() {
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let inp = SampleInputs::read(&common::fixture("rflow-tiny-video.safetensors")).unwrap();
    let geo = inp.geometry();
    let cfg = RflowConfig { num_steps: 6, ..RflowConfig::default() };
    let (full, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut NoHooks, &mut |_, _| {}).unwrap();
    let subs = 3 * 2 * model.cfg.depth;
    let calls = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let c = calls.clone();
    let mut alternate = Scripted::new(move |_, _| {
        let n = c.get();
        c.set(n + 1);
        if (n / subs).is_multiple_of(2) { SubAction::ComputeAndStore } else { SubAction::Reuse }
    });
    let (approx, _) = sample(&be, &model, &cfg, &inp.z0, &inp.y, inp.mask.as_deref(), &geo, &mut alternate, &mut |_, _| {}).unwrap();
    assert_eq!(calls.get(), 6 * subs);
    let e = rel_l2(approx.f32().unwrap(), full.f32().unwrap());
    assert!(e > 1e-6 && e < 0.5, "reusing every other step: relative L2 {e}");
}
