//! STDiT3 forward against the official Open-Sora 1.2 outputs.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::model::stdit3::inputs::ForwardInputs;
use qc::model::stdit3::{DitInput, Stdit3, Trace};
use qc::tensor::rel_l2;

fn check_case(name: &str) {
    let be = CpuBackend::new();
    let model = Stdit3::load(&common::fixture("stdit3-tiny")).unwrap();
    let path = common::fixture(name);
    let inp = ForwardInputs::read(&path).unwrap();
    let reference = Checkpoint::open_file(&path).unwrap();
    let mut trace = Trace::default();
    let text = model.encode_text(&be, &inp.y, inp.mask.as_deref(), &mut trace).unwrap();
    let d = DitInput { x: &inp.x, timestep: &inp.timestep, fps: &inp.fps, height: inp.height[0], width: inp.width[0], x_mask: inp.x_mask.as_deref() };
    let out = model.forward(&be, &d, &text, &mut trace).unwrap();
    let mut checked = vec![("out".to_string(), out)];
    checked.extend(trace.tensors);
    let mut report = Vec::new();
    for (tname, got) in &checked {
        let want = reference.load_f32(tname).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.shape(), want.shape(), "{name}: {tname} shape");
        let err = rel_l2(got.f32().unwrap(), want.f32().unwrap());
        report.push(format!("{tname}: {err:.2e}"));
        assert!(err < 1e-4, "{name}: {tname} relative L2 error {err:.3e} (all: {report:?})");
    }
    let expected_acts = reference.names().filter(|n| n.starts_with("act.")).count();
    assert_eq!(checked.len() - 1, expected_acts, "{name}: every act.* intermediate must be produced and compared");
    eprintln!("{name}: {}", report.join(", "));
}

#[test]
fn forward_matches_reference() {
    check_case("stdit3-tiny-forward.safetensors");
}

#[test]
fn forward_with_padding_matches_reference() {
    check_case("stdit3-tiny-forward-odd.safetensors");
}

#[test]
fn forward_with_x_mask_matches_reference() {
    check_case("stdit3-tiny-forward-xmask.safetensors");
}
