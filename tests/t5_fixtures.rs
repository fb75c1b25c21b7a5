//! T5 v1.1 encoder against transformers' output.

mod common;

use qc::backend::cpu::CpuBackend;
use qc::checkpoint::Checkpoint;
use qc::model::t5::T5Encoder;
use qc::tensor::rel_l2;

#[test]
fn encoder_matches_reference() {
    let be = CpuBackend::new();
    let t5 = T5Encoder::load(&common::fixture("t5-tiny")).unwrap();
    let io = Checkpoint::open_file(&common::fixture("t5-tiny-io.safetensors")).unwrap();
    let ids = io.load_any("input_ids").unwrap();
    let mask = io.load_any("attention_mask").unwrap().to_i64().unwrap();
    let b = ids.shape()[0];
    let out = t5.encode(&be, &ids.to_i64().unwrap(), &mask, b).unwrap();
    let want = io.load_f32("last_hidden_state").unwrap();
    assert_eq!(out.shape(), want.shape());
    let err = rel_l2(out.f32().unwrap(), want.f32().unwrap());
    eprintln!("t5 last_hidden_state relative L2 {err:.2e}");
    assert!(err < 1e-4, "relative L2 {err:.3e}");
}

#[test]
fn padded_prompts_ignore_padding_and_bad_ids_are_rejected() {
    let be = CpuBackend::new();
    let t5 = T5Encoder::load(&common::fixture("t5-tiny")).unwrap();
    // The same 5 tokens alone and padded to 9: the valid positions agree exactly in meaning.
    let ids = [4i64, 3, 68, 28, 1];
    let short = t5.encode(&be, &ids, &[1; 5], 1).unwrap();
    let mut padded_ids = ids.to_vec();
    padded_ids.extend([0; 4]);
    let padded = t5.encode(&be, &padded_ids, &[1, 1, 1, 1, 1, 0, 0, 0, 0], 1).unwrap();
    let d = t5.cfg.d_model;
    let err = rel_l2(&padded.f32().unwrap()[..5 * d], short.f32().unwrap());
    assert!(err < 1e-5, "padding changed valid outputs: {err}");
    assert!(t5.encode(&be, &[4, 999], &[1, 1], 1).unwrap_err().to_string().contains("999"));
    assert!(t5.encode(&be, &[4, 3], &[0, 1], 1).is_err());
}
