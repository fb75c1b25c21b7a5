//! Checkpoint formats: f16/bf16 storage and sharded directories give the same model.

mod common;

use half::{bf16, f16};
use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::io::write_safetensors;
use qc::model::stdit3::inputs::ForwardInputs;
use qc::model::stdit3::{DitInput, NoHooks, Stdit3};
use qc::tensor::{rel_l2, Storage, Tensor};
use std::path::Path;

fn forward_out(model_dir: &Path) -> Vec<f32> {
    let be = CpuBackend::new();
    let model = Stdit3::load(model_dir).unwrap();
    let inp = ForwardInputs::read(&common::fixture("stdit3-tiny-forward.safetensors")).unwrap();
    let text = model.encode_text(&be, &inp.y, inp.mask.as_deref(), &mut NoHooks).unwrap();
    let d = DitInput { x: &inp.x, timestep: &inp.timestep, fps: &inp.fps, height: inp.height[0], width: inp.width[0], x_mask: None };
    model.forward(&be, &d, &text, &mut NoHooks).unwrap().into_f32().unwrap()
}

fn reference_out() -> Vec<f32> {
    Checkpoint::open_file(&common::fixture("stdit3-tiny-forward.safetensors")).unwrap().load_f32("out").unwrap().into_f32().unwrap()
}

fn tensors(convert: impl Fn(&Tensor) -> Tensor) -> Vec<(String, Tensor)> {
    let ck = Checkpoint::open_dir(&common::fixture("stdit3-tiny")).unwrap();
    let names: Vec<String> = ck.names().map(String::from).collect();
    names.into_iter().map(|n| { let t = convert(&ck.load_f32(&n).unwrap()); (n, t) }).collect()
}

fn model_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(common::fixture("stdit3-tiny").join("config.json"), d.join("config.json")).unwrap();
    d
}

#[test]
fn half_precision_checkpoints_load() {
    let root = tempfile::tempdir().unwrap();
    let reference = reference_out();
    let conv_bf16 = |t: &Tensor| Tensor::new(t.shape(), Storage::BF16(t.f32().unwrap().iter().map(|&x| bf16::from_f32(x)).collect())).unwrap();
    let conv_f16 = |t: &Tensor| Tensor::new(t.shape(), Storage::F16(t.f32().unwrap().iter().map(|&x| f16::from_f32(x)).collect())).unwrap();
    for (name, ts, tol) in [("bf16", tensors(conv_bf16), 3e-2), ("f16", tensors(conv_f16), 3e-3)] {
        let d = model_dir(root.path(), name);
        write_safetensors(&d.join("model.safetensors"), &ts, None).unwrap();
        // Linear weights stay in half precision in memory (widened per layer when used).
        let m = Stdit3::load(&d).unwrap();
        assert!(matches!(&m.w.spatial[0].fc1.weight, qc::backend::LinearWeight::Half(t) if t.dtype() != qc::tensor::DType::F32));
        let err = rel_l2(&forward_out(&d), &reference);
        // Rounding the weights is the only change: small but nonzero.
        assert!(err < tol && err > 1e-7, "{name}: relative error {err}");
    }
}

#[test]
fn sharded_checkpoints_load() {
    let root = tempfile::tempdir().unwrap();
    let d = model_dir(root.path(), "sharded");
    let all = tensors(|t| t.clone());
    let half = all.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&all[..half], &all[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        write_safetensors(&d.join(&file), part, None).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = rel_l2(&forward_out(&d), &reference_out());
    assert!(err < 1e-4, "sharded: relative error {err}");
}

#[test]
fn float32_weights_are_read_in_place() {
    let ck = Checkpoint::open_dir(&common::fixture("stdit3-tiny")).unwrap();
    let w = ck.load_f32("spatial_blocks.0.mlp.fc1.weight").unwrap();
    assert!(w.is_mapped(), "an aligned f32 tensor must not be copied out of the mapped file");
    // Writing to it copies (the file stays untouched).
    let mut w2 = w.clone();
    w2.f32_mut().unwrap()[0] += 1.0;
    assert!(!w2.is_mapped() && w.is_mapped());
    assert_eq!(w.f32().unwrap()[1..], w2.f32().unwrap()[1..]);
}
