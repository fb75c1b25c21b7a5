//! The bundled demonstration model (`models/demo`, trained by tools/train-demo) in the
//! engine against the PyTorch code that trained it (`tools/train-demo/parity.safetensors`,
//! written by tools/train-demo/export.py): tokenizer ids, T5 output, one DiT forward and a
//! short CFG sampling run.

use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::model::stdit3::{DitInput, NoHooks, Stdit3};
use qc::model::t5::T5Encoder;
use qc::sampler::rflow::{sample, RflowConfig, VideoGeometry};
use qc::tensor::rel_l2;
use qc::text::{prepare_prompt, T5Tokenizer};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo(part: &str) -> PathBuf {
    root().join("models/demo").join(part)
}

fn parity() -> Checkpoint {
    Checkpoint::open_file(&root().join("tools/train-demo/parity.safetensors")).unwrap()
}

fn ints(ck: &Checkpoint, name: &str) -> Vec<i64> {
    ck.load_any(name).unwrap_or_else(|e| panic!("{name}: {e}")).to_i64().unwrap()
}

fn captions(ck: &Checkpoint, key: &str) -> Vec<String> {
    serde_json::from_str(ck.metadata().get(key).unwrap_or_else(|| panic!("parity file lacks metadata {key}"))).unwrap()
}

#[test]
fn tokenizer_matches_training() {
    let ck = parity();
    let tok = T5Tokenizer::from_dir(&demo("tokenizer")).unwrap();
    let l: usize = ck.metadata()["max_length"].parse().unwrap();
    for (caps, ids_name, mask_name) in [("captions", "input_ids", "attention_mask"), ("heldout_captions", "heldout_ids", "heldout_mask")] {
        let caps = captions(&ck, caps);
        let refs: Vec<&str> = caps.iter().map(|s| s.as_str()).collect();
        let (ids, mask) = tok.encode_batch(&refs, l).unwrap();
        assert_eq!(ids, ints(&ck, ids_name), "{ids_name}: token ids differ from the training tokenizer");
        assert_eq!(mask, ints(&ck, mask_name), "{mask_name}: attention masks differ");
        assert!(!ids.contains(&2), "{ids_name}: a caption word fell back to <unk>");
    }
}

#[test]
fn prompt_preparation_matches_training_captions() {
    // The engine appends " aesthetic score: 6.5." and cleans the caption; the demo model was
    // trained on captions with and without that suffix, so it must come out exactly so.
    for p in ["a red circle moving right", "a blue square moving up on a white background"] {
        assert_eq!(prepare_prompt(p, Some(6.5)), format!("{p} aesthetic score: 6.5."));
        assert_eq!(prepare_prompt(p, None), p);
    }
}

#[test]
fn t5_matches_pytorch() {
    let ck = parity();
    let be = CpuBackend::new();
    let t5 = T5Encoder::load(&demo("t5")).unwrap();
    let (ids, mask) = (ints(&ck, "input_ids"), ints(&ck, "attention_mask"));
    let want = ck.load_f32("last_hidden_state").unwrap();
    let got = t5.encode(&be, &ids, &mask, want.shape()[0]).unwrap();
    assert_eq!(got.shape(), want.shape());
    let err = rel_l2(got.f32().unwrap(), want.f32().unwrap());
    eprintln!("T5 last_hidden_state relative L2 {err:.3e}");
    assert!(err < 1e-4, "T5 relative L2 error {err:.3e}");
}

#[test]
fn dit_forward_matches_pytorch() {
    let ck = parity();
    let be = CpuBackend::new();
    let model = Stdit3::load(&demo("stdit3")).unwrap();
    let x = ck.load_f32("x").unwrap();
    let y = ck.load_f32("y").unwrap();
    let mask = ints(&ck, "mask");
    let timestep = ck.load_f32("timestep").unwrap().into_f32().unwrap();
    let fps = ck.load_f32("fps").unwrap().into_f32().unwrap();
    let height = ck.load_f32("height").unwrap().into_f32().unwrap();
    let width = ck.load_f32("width").unwrap().into_f32().unwrap();
    let text = model.encode_text(&be, &y, Some(&mask), &mut NoHooks).unwrap();
    let inp = DitInput { x: &x, timestep: &timestep, fps: &fps, height: height[0], width: width[0], x_mask: None };
    let got = model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    let want = ck.load_f32("out").unwrap();
    assert_eq!(got.shape(), want.shape());
    let err = rel_l2(got.f32().unwrap(), want.f32().unwrap());
    eprintln!("DiT out relative L2 {err:.3e}");
    assert!(err < 1e-4, "DiT relative L2 error {err:.3e}");
}

#[test]
fn sampler_matches_pytorch() {
    let ck = parity();
    let be = CpuBackend::new();
    let model = Stdit3::load(&demo("stdit3")).unwrap();
    let meta = ck.metadata();
    let steps: usize = meta["sample_steps"].parse().unwrap();
    let cfg_scale: f32 = meta["sample_cfg"].parse().unwrap();
    let z0 = ck.load_f32("sample_z0").unwrap();
    let y = ck.load_f32("sample_y").unwrap();
    let mask = ints(&ck, "sample_mask");
    let s = z0.shape().to_vec();
    let b = s[0];
    let fps: f32 = meta["fps"].parse().unwrap();
    let geo = VideoGeometry { height: vec![s[3] as f32; b], width: vec![s[4] as f32; b], num_frames: vec![s[2] as f32; b], fps: vec![fps; b] };
    let rf = RflowConfig { num_steps: steps, cfg_scale, use_timestep_transform: false, ..RflowConfig::default() };
    let (z, _) = sample(&be, &model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {}).unwrap();
    let want = ck.load_f32("sample_out").unwrap();
    let err = rel_l2(z.f32().unwrap(), want.f32().unwrap());
    eprintln!("sampler ({steps} steps, cfg {cfg_scale}) relative L2 {err:.3e}");
    assert!(err < 1e-4, "sampler relative L2 error {err:.3e}");
}

#[test]
fn defaults_parse_and_disable_the_timestep_transform() {
    let d = qc::pipeline::ModelDefaults::from_dir(&root().join("models/demo")).unwrap();
    let o = d.options();
    let meta = parity().metadata();
    let x = parity().load_f32("x").unwrap();
    assert_eq!([o.frames, o.height, o.width], [x.shape()[2], x.shape()[3], x.shape()[4]], "defaults.json geometry is not the trained one");
    assert_eq!(o.fps, meta["fps"].parse::<f32>().unwrap());
    assert!(!o.timestep_transform, "the demo model was trained without the timestep transform");
}

/// One DiT forward and the whole CFG sampling run of the trained demo model with
/// `set(model, true)` applied, against the float engine: their relative L2.
fn against_float(set: impl Fn(&mut Stdit3, bool)) -> (f64, f64) {
    let ck = parity();
    let be = CpuBackend::new();
    let mut model = Stdit3::load(&demo("stdit3")).unwrap();
    let (x, y, mask) = (ck.load_f32("x").unwrap(), ck.load_f32("y").unwrap(), ints(&ck, "mask"));
    let timestep = ck.load_f32("timestep").unwrap().into_f32().unwrap();
    let fps = ck.load_f32("fps").unwrap().into_f32().unwrap();
    let (height, width) = (ck.load_f32("height").unwrap().into_f32().unwrap(), ck.load_f32("width").unwrap().into_f32().unwrap());
    let text = model.encode_text(&be, &y, Some(&mask), &mut NoHooks).unwrap();
    let inp = DitInput { x: &x, timestep: &timestep, fps: &fps, height: height[0], width: width[0], x_mask: None };
    let float = model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    set(&mut model, true);
    let other = model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    let forward = rel_l2(other.f32().unwrap(), float.f32().unwrap());

    let meta = ck.metadata();
    let z0 = ck.load_f32("sample_z0").unwrap();
    let (y, mask) = (ck.load_f32("sample_y").unwrap(), ints(&ck, "sample_mask"));
    let s = z0.shape().to_vec();
    let b = s[0];
    let fps: f32 = meta["fps"].parse().unwrap();
    let geo = VideoGeometry { height: vec![s[3] as f32; b], width: vec![s[4] as f32; b], num_frames: vec![s[2] as f32; b], fps: vec![fps; b] };
    let rf = RflowConfig { num_steps: meta["sample_steps"].parse().unwrap(), cfg_scale: meta["sample_cfg"].parse().unwrap(), use_timestep_transform: false, ..RflowConfig::default() };
    let (zo, _) = sample(&be, &model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {}).unwrap();
    set(&mut model, false);
    let (zf, _) = sample(&be, &model, &rf, &z0, &y, Some(&mask), &geo, &mut NoHooks, &mut |_, _| {}).unwrap();
    (forward, rel_l2(zo.f32().unwrap(), zf.f32().unwrap()))
}

/// The int8-QK attention (`Stdit3::qk_int8`: spatial, temporal and cross-attention) on the
/// trained demo model: one forward and the whole CFG sampling run (4 steps) stay close to
/// the float engine (relative L2 printed; bounds with headroom over the measured values).
#[test]
fn int8_qk_attention_stays_close_to_float() {
    let (forward, sampling) = against_float(|m, on| m.qk_int8 = on);
    eprintln!("int8 QK vs float: DiT forward relative L2 {forward:.3e}, sampling {sampling:.3e}");
    assert!(forward < 1e-2, "int8-QK forward relative L2 {forward:.3e}");
    assert!(sampling < 3e-2, "int8-QK sampling relative L2 {sampling:.3e}");
}

/// The attention with bf16 operands (`Stdit3::attn_bf16`, what `--accel quantcache`
/// runs): within bf16's precision of the float engine.
#[test]
fn bf16_attention_stays_close_to_float() {
    let (forward, sampling) = against_float(|m, on| m.attn_bf16 = on);
    eprintln!("bf16 attention vs float: DiT forward relative L2 {forward:.3e}, sampling {sampling:.3e}");
    assert!(forward > 0.0 && forward < 5e-3, "bf16-attention forward relative L2 {forward:.3e}");
    assert!(sampling < 2e-2, "bf16-attention sampling relative L2 {sampling:.3e}");
}

/// `qc-bench quality --parts`: with timing on, each forward counts once, each
/// block part once per block (the demo has `depth` spatial and `depth`
/// temporal blocks), the parts fit inside the forward, the slots keep apart,
/// and nothing is summed once it is stopped.
#[test]
fn forward_parts_count_every_block_once() {
    use qc::model::stdit3::timing::{self, of, Part, PARTS};
    let ck = parity();
    let be = CpuBackend::new();
    let model = Stdit3::load(&demo("stdit3")).unwrap();
    let depth = model.cfg.depth as u64;
    let x = ck.load_f32("x").unwrap();
    let y = ck.load_f32("y").unwrap();
    let mask = ints(&ck, "mask");
    let timestep = ck.load_f32("timestep").unwrap().into_f32().unwrap();
    let fps = ck.load_f32("fps").unwrap().into_f32().unwrap();
    let text = model.encode_text(&be, &y, Some(&mask), &mut NoHooks).unwrap();
    let inp = DitInput { x: &x, timestep: &timestep, fps: &fps, height: 64.0, width: 64.0, x_mask: None };
    timing::start();
    model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    timing::select(1);
    for _ in 0..2 {
        model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    }
    let slots = timing::stop();
    model.forward(&be, &inp, &text, &mut NoHooks).unwrap();
    assert!(timing::stop().is_empty(), "a forward after stop was timed");
    assert_eq!(slots.len(), 2);
    for (slot, forwards) in [(0, 1u64), (1, 2)] {
        let t = &slots[slot];
        assert_eq!(of(t, Part::Forward).1, forwards);
        for (part, per_forward) in [
            (Part::Embedding, 1),
            (Part::FinalLayer, 1),
            (Part::Modulation, 2 * depth),
            (Part::NormQkv, 2 * depth),
            (Part::QkvOperands, 2 * depth),
            (Part::SpatialAttention, depth),
            (Part::TemporalAttention, depth),
            (Part::AttentionProjection, 2 * depth),
            (Part::CrossQuery, 2 * depth),
            (Part::CrossAttention, 2 * depth),
            (Part::CrossProjection, 2 * depth),
            (Part::Mlp, 2 * depth),
            (Part::CachedReuse, 0),
        ] {
            assert_eq!(of(t, part).1, per_forward * forwards, "slot {slot}: {part:?}");
        }
        let inside: f64 = PARTS.iter().filter(|(p, _)| *p != Part::Forward).map(|(p, _)| of(t, *p).0).sum();
        let whole = of(t, Part::Forward).0;
        assert!(inside > 0.0 && inside <= whole, "slot {slot}: parts {inside} s, forward {whole} s");
    }
}
