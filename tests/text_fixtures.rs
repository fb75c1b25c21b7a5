//! Prompt cleaning and T5 tokenization against the official Open-Sora 1.2 / transformers outputs.

mod common;

use std::path::Path;

use qc::checkpoint::Checkpoint;
use qc::text::clean::{clean_caption_text, prepare_prompt};
use qc::text::T5Tokenizer;

#[test]
fn prompt_clean_fixture() {
    let text = std::fs::read_to_string(common::fixture("prompt-clean.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want = case["cleaned"].as_str().unwrap();
        let want_aes = case["with_aes_6.5_cleaned"].as_str().unwrap();
        let got = clean_caption_text(prompt);
        if got != want {
            failures.push(format!("cleaned {prompt:?}: got {got:?}, want {want:?}"));
        }
        let got_aes = prepare_prompt(prompt, Some(6.5));
        if got_aes != want_aes {
            failures.push(format!("with aes {prompt:?}: got {got_aes:?}, want {want_aes:?}"));
        }
        assert_eq!(prepare_prompt(prompt, None), got);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Further cases, with the outputs of the official `text_preprocessing` run under Python 3.11.7,
/// ftfy 6.3.1 and beautifulsoup4 4.15.0.
#[test]
fn prompt_clean_more_cases() {
    let cases: &[(&str, &str)] = &[
        (
            "A cinematic shot of a lighthouse at dusk, waves crashing against the rocks, 8K, HDR.",
            "a cinematic shot of a lighthouse at dusk, waves crashing against the rocks, 8k, hdr.",
        ),
        (
            "Close-up: a hummingbird's wings — frozen mid-flight (slow motion) [4K] {macro}",
            "close-up: a hummingbird's wings - frozen mid-flight slow motion 4k macro",
        ),
        (
            "Tokyo street at night, neon signs 東京 渋谷, rain-soaked pavement; shot on 35mm f/1.8",
            "tokyo street at night, neon signs , rain-soaked pavement; shot on 35mm f 1.8",
        ),
        (
            "Check out https://www.youtube.com/watch?v=abc123 & www.example.org/page for more",
            "check out ?v= for more",
        ),
        (
            "A+timelapse+of+clouds%2C+sunset%20colors",
            "a timelapse of clouds, sunset colors",
        ),
        (
            "<p>A <b>bold</b> fox &amp; a lazy&nbsp;dog</p> &lt;3",
            "a bold fox a lazy dog <3",
        ),
        (
            "a man walking his dog... in the park.... at noon",
            "a man walking his dog in the park at noon",
        ),
        ("photo_of_a_cat_sitting-on-a-mat", "photo of a cat sitting on a mat"),
        (
            "\"A quoted prompt with 'inner' quotes\"",
            "a quoted prompt with 'inner' quotes",
        ),
        (
            "IMG_1234.JPG drone footage of a volcano, 3840x2160, 60fps",
            "drone footage of a volcano, , 60fps",
        ),
        (
            "Call me at 555-123-4567 or visit 192.168.1.1 #1 #42 #12345 page 7",
            "call me at 555-123-4567 or visit",
        ),
        (
            "A ﬁne ＦＵＬＬＷＩＤＴＨ prompt with ligatures\u{a0}and nbsp",
            "a fine fullwidth prompt with ligatures and nbsp",
        ),
        ("- leading dash and trailing plus +", "leading dash and trailing plus"),
        (
            "Free shipping worldwide! click here for details, download free now",
            "worldwide! click here for details, now",
        ),
        (
            "ΣΟΦΙΑ walks through İstanbul's Grand Bazaar, straße",
            "σοφια walks through i\u{307}stanbul's grand bazaar, straße",
        ),
        (
            "Emoji 🎬🌅 sunrise over the mountains ☀\u{fe0f}",
            "emoji 🎬🌅 sunrise over the mountains ☀\u{fe0f}",
        ),
        ("a robot @openai dancing #AI #1 on stage", "a robot dancing ai on stage"),
        ("Line one\nLine two\\nLine three", "line one line two line three"),
        (
            "<script>alert(1)</script>a <!-- hidden --> visible <![CDATA[kept]]> &#8212; end",
            "a visible kept - end",
        ),
        ("½ cup of tea at 3:45 ", "cup of tea at 3:45"),
        ("   ", ""),
        ("", ""),
    ];
    for (prompt, want) in cases {
        assert_eq!(clean_caption_text(prompt), *want, "{prompt:?}");
    }
}

fn t5_io() -> (Vec<String>, usize, Vec<i64>, Vec<i64>) {
    let ck = Checkpoint::open_file(&common::fixture("t5-tiny-io.safetensors")).unwrap();
    let meta = ck.metadata();
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let max_length: usize = meta["max_length"].parse().unwrap();
    let ids = ck.load_any("input_ids").unwrap();
    let mask = ck.load_any("attention_mask").unwrap();
    assert_eq!(ids.shape(), &[prompts.len(), max_length]);
    (prompts, max_length, ids.to_i64().unwrap(), mask.to_i64().unwrap())
}

#[test]
fn tokenizer_matches_t5_tiny_io() {
    let tok = T5Tokenizer::from_dir(&common::fixture("t5-tokenizer")).unwrap();
    let (prompts, max_length, want_ids, want_mask) = t5_io();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let (ids, mask) = tok.encode_batch(&refs, max_length).unwrap();
    assert_eq!(ids, want_ids);
    assert_eq!(mask, want_mask);
}

/// transformers 4.44.2 `T5TokenizerFast` (from the fixture directory) with `max_length=12`.
const EDGE_CASES: &[(&str, [i64; 12], usize)] = &[
    ("", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1),
    ("   ", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1),
    (
        "a red ball bounces on the floor a red ball bounces on the floor a red ball bounces on the floor a red ball bounces on the floor a red ball bounces on the floor ",
        [4, 3, 68, 28, 15, 16, 38, 55, 22, 33, 17, 1],
        12,
    ),
    ("Ünïcödé café — 日本語 😀 ﬁ ＡＢＣ", [3, 2, 9, 2, 33, 2, 28, 2, 54, 25, 2, 1], 12),
    ("tab\there\nnewline  double   spaces ", [3, 63, 78, 3, 29, 68, 3, 9, 10, 77, 12, 1], 12),
    ("<extra_id_0> </s> <pad> <unk>", [3, 2, 10, 2, 7, 74, 2, 8, 28, 2, 1, 1], 12),
];

fn check_edge_cases(tok: &T5Tokenizer) {
    let prompts: Vec<&str> = EDGE_CASES.iter().map(|c| c.0).collect();
    let (ids, mask) = tok.encode_batch(&prompts, 12).unwrap();
    for (b, (prompt, want, len)) in EDGE_CASES.iter().enumerate() {
        assert_eq!(&ids[b * 12..(b + 1) * 12], want, "{prompt:?}");
        let want_mask: Vec<i64> = (0..12).map(|i| i64::from(i < *len)).collect();
        assert_eq!(&mask[b * 12..(b + 1) * 12], &want_mask[..], "{prompt:?}");
    }
    // max_length 1 leaves room for </s> only.
    let (ids, mask) = tok.encode_batch(&[EDGE_CASES[2].0], 1).unwrap();
    assert_eq!((ids, mask), (vec![1], vec![1]));
    assert!(tok.encode_batch(&["x"], 0).is_err());
}

#[test]
fn tokenizer_truncation_empty_unicode() {
    check_edge_cases(&T5Tokenizer::from_dir(&common::fixture("t5-tokenizer")).unwrap());
}

fn copy_spiece_only(dst: &Path) {
    std::fs::copy(common::fixture("t5-tokenizer/spiece.model"), dst.join("spiece.model")).unwrap();
}

/// Without tokenizer.json the directory's spiece.model is converted as transformers converts it.
#[test]
fn tokenizer_from_spiece_model_matches_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    copy_spiece_only(dir.path());
    std::fs::copy(
        common::fixture("t5-tokenizer/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let from_sp = T5Tokenizer::from_dir(dir.path()).unwrap();
    let from_json = T5Tokenizer::from_dir(&common::fixture("t5-tokenizer")).unwrap();
    assert_eq!(from_sp.vocab_size(), from_json.vocab_size());
    check_edge_cases(&from_sp);
    let (prompts, max_length, want_ids, want_mask) = t5_io();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    assert_eq!(from_sp.encode_batch(&refs, max_length).unwrap(), (want_ids, want_mask));
    // A spread of strings: both tokenizers agree piece for piece.
    let samples = [
        "clouds drift over snowy hills at sunset, timelapse!",
        "  leading and trailing  ",
        "UPPER lower MiXeD 12345 !?#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "naïve façade ½ ² ﬀ Ⅻ ①",
        "\u{3000}ideographic\u{a0}nbsp\u{2009}thin",
        "a  b   c    d",
    ];
    for s in samples {
        let a = from_sp.encode_batch(&[s], 40).unwrap();
        let b = from_json.encode_batch(&[s], 40).unwrap();
        assert_eq!(a, b, "{s:?}");
    }
}

/// The layout of the official `DeepFloyd/t5-v1_1-xxl` repository: spiece.model and an old-style
/// tokenizer_config.json with 100 sentinel tokens. Expected ids from transformers 4.44.2
/// converting the same directory (sentinels get ids 80..=179, `<extra_id_0>` the last).
#[test]
fn tokenizer_deepfloyd_layout_with_extra_ids() {
    let dir = tempfile::tempdir().unwrap();
    copy_spiece_only(dir.path());
    let extra: Vec<String> = (0..100).map(|i| format!("<extra_id_{i}>")).collect();
    let config = serde_json::json!({
        "additional_special_tokens": extra, "eos_token": "</s>", "extra_ids": 100, "model_max_length": 512,
        "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = T5Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 180);
    let cases: &[(&str, [i64; 16])] = &[
        (
            "a <extra_id_0> b <extra_id_99>c",
            [4, 179, 15, 80, 31, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            "Ünïcödé café — 日本語 😀 ﬁ ＡＢＣ",
            [3, 2, 9, 2, 33, 2, 28, 2, 54, 25, 2, 3, 2, 3, 2, 1],
        ),
        (
            "a red ball bounces on the floor",
            [4, 3, 68, 28, 15, 16, 38, 55, 22, 33, 17, 3, 26, 20, 29, 1],
        ),
    ];
    for (prompt, want) in cases {
        let (ids, _) = tok.encode_batch(&[prompt], 16).unwrap();
        assert_eq!(&ids[..], want, "{prompt:?}");
    }
    // Without any tokenizer_config.json, T5's defaults (100 sentinels) apply.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    assert_eq!(T5Tokenizer::from_dir(dir.path()).unwrap().vocab_size(), 180);
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = T5Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("neither tokenizer.json nor spiece.model"), "{err}");
    std::fs::write(dir.path().join("spiece.model"), b"not a model").unwrap();
    let err = format!("{:#}", T5Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("spiece.model"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), b"{").unwrap();
    let err = format!("{:#}", T5Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = format!("{:#}", T5Tokenizer::from_dir(&dir.path().join("missing")).unwrap_err());
    assert!(err.contains("does not exist"), "{err}");
}

/// Differential check against the official cleaning code on many random prompts:
/// `QC_CLEAN_ORACLE=file.json` made by tools/text-oracle/clean_oracle.py.
#[test]
#[ignore = "needs QC_CLEAN_ORACLE (tools/text-oracle/clean_oracle.py)"]
fn prompt_clean_oracle() {
    let path = std::env::var("QC_CLEAN_ORACLE").expect("set QC_CLEAN_ORACLE");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let Some(want) = case["cleaned"].as_str() else {
            clean_caption_text(prompt); // Python raised here; the port must not panic
            continue;
        };
        checked += 1;
        let got = clean_caption_text(prompt);
        if got != want {
            failures.push(format!("{prompt:?}\n   got  {got:?}\n   want {want:?}"));
        }
    }
    eprintln!("{checked} prompts checked, {} differ", failures.len());
    assert!(
        failures.is_empty(),
        "{}",
        failures.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Differential check against transformers' T5TokenizerFast on many random prompts:
/// `QC_T5_ORACLE=file.json` made by tools/text-oracle/tokenizer_oracle.py.
#[test]
#[ignore = "needs QC_T5_ORACLE (tools/text-oracle/tokenizer_oracle.py)"]
fn tokenizer_oracle() {
    let path = std::env::var("QC_T5_ORACLE").expect("set QC_T5_ORACLE");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = T5Tokenizer::from_dir(Path::new(doc["dir"].as_str().unwrap())).unwrap();
    let max_length = doc["max_length"].as_u64().unwrap() as usize;
    let cases = doc["cases"].as_array().unwrap();
    let prompts: Vec<&str> = cases.iter().map(|c| c["prompt"].as_str().unwrap()).collect();
    let (ids, mask) = tok.encode_batch(&prompts, max_length).unwrap();
    let mut failures = Vec::new();
    for (b, case) in cases.iter().enumerate() {
        let want: Vec<i64> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_mask: Vec<i64> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        let row = b * max_length..(b + 1) * max_length;
        if ids[row.clone()] != want[..] || mask[row.clone()] != want_mask[..] {
            failures.push(format!("{:?}\n   got  {:?}\n   want {want:?}", prompts[b], &ids[row]));
        }
    }
    eprintln!("{} prompts checked, {} differ", cases.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{}",
        failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}
