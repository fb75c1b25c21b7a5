//! The T5 tokenizer of Open-Sora 1.2 (`DeepFloyd/t5-v1_1-xxl`), as transformers 4.44.2's
//! `T5TokenizerFast` runs it in Open-Sora's `T5Embedder.get_text_embeddings`:
//! `tokenizer(texts, max_length=N, padding="max_length", truncation=True,
//! add_special_tokens=True, return_attention_mask=True)`. Each prompt becomes its SentencePiece
//! unigram pieces, cut to `N - 1`, then `</s>` (id 1), then `<pad>` (id 0) up to `N`; the
//! attention mask is 1 on the pieces and the `</s>`.
//!
//! A tokenizer directory is read as transformers reads it:
//! * `tokenizer.json` (the `tokenizers` serialization) when present;
//! * otherwise `spiece.model` (what the official `DeepFloyd/t5-v1_1-xxl` repository ships),
//!   converted in memory exactly as transformers' `T5Converter` does (unigram model with the
//!   `extra_ids` sentinel pieces `<extra_id_99>`..`<extra_id_0>` appended, precompiled-charsmap
//!   normalizer + right strip + `" {2,}" -> "▁"`, Metaspace pre-tokenizer, `$A </s>` template),
//!   with `tokenizer_config.json` (optional) supplying `extra_ids` (default 100), `legacy`,
//!   `add_prefix_space`, the special tokens and `added_tokens_decoder`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// The T5 tokenizer with Open-Sora's encoding settings.
#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pad_token: String,
    dir: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// Loads `tokenizer.json`, or failing that converts `spiece.model`, from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("T5 tokenizer directory {} does not exist", dir.display());
        }
        let config = read_config(dir)?;
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| anyhow!("corrupt T5 tokenizer file {}: {e}", json.display()))?
        } else if spiece.is_file() {
            let bytes = std::fs::read(&spiece).with_context(|| format!("reading {}", spiece.display()))?;
            from_sentencepiece(&bytes, config.as_ref())
                .with_context(|| format!("corrupt SentencePiece model {}", spiece.display()))?
        } else {
            bail!(
                "T5 tokenizer directory {} has neither tokenizer.json nor spiece.model",
                dir.display()
            );
        };
        let pad_token = config
            .as_ref()
            .and_then(|c| token_content(c.get("pad_token")?))
            .unwrap_or_else(|| "<pad>".to_string());
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            anyhow!(
                "T5 tokenizer in {}: pad token {pad_token:?} is not in the vocabulary",
                dir.display()
            )
        })?;
        Ok(Self {
            inner,
            pad_id,
            pad_token,
            dir: dir.to_path_buf(),
        })
    }

    /// Vocabulary size including added tokens (32100 for `t5-v1_1-xxl`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (without truncation or padding set).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Encodes a batch as Open-Sora's T5Embedder does: `padding="max_length"`,
    /// `truncation=True`, `add_special_tokens=True`. Returns `(input_ids, attention_mask)`,
    /// each `[prompts.len() * max_length]`, row-major.
    pub fn encode_batch(&self, prompts: &[&str], max_length: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        if max_length == 0 {
            bail!("T5 tokenizer: max_length must be at least 1 (room for </s>)");
        }
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| anyhow!("T5 tokenizer truncation: {e}"))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let inputs: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
        let encodings = tok
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("T5 tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(prompts.len() * max_length);
        let mut mask = Vec::with_capacity(prompts.len() * max_length);
        for enc in &encodings {
            if enc.get_ids().len() != max_length {
                bail!(
                    "T5 tokenizer produced {} tokens instead of {max_length}",
                    enc.get_ids().len()
                );
            }
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            mask.extend(enc.get_attention_mask().iter().map(|&m| m as i64));
        }
        Ok((ids, mask))
    }
}

fn read_config(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("corrupt tokenizer config {}", path.display()))?;
    Ok(Some(v))
}

/// A special token in a transformers config: a string or `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// spiece.model (a `sentencepiece.ModelProto`) -> the tokenizer transformers converts it to.

struct Piece {
    piece: String,
    score: f32,
    /// 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    kind: u64,
}

struct SpModel {
    pieces: Vec<Piece>,
    unk_id: u64,
    model_type: u64,
    precompiled_charsmap: Vec<u8>,
}

struct ProtoReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| anyhow!("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint too long")
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| anyhow!("truncated field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next `(field number, value)`; `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Field<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes"))),
            2 => {
                let n = usize::try_from(self.varint()?)?;
                Field::Bytes(self.bytes(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes"))),
            t => bail!("unsupported protobuf wire type {t}"),
        };
        Ok(Some((key >> 3, value)))
    }
}

enum Field<'a> {
    Varint(u64),
    #[allow(dead_code)]
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn parse_spiece(buf: &[u8]) -> Result<SpModel> {
    let mut model = SpModel {
        pieces: Vec::new(),
        unk_id: 0,
        model_type: 1,
        precompiled_charsmap: Vec::new(),
    };
    let mut r = ProtoReader::new(buf);
    while let Some((num, f)) = r.field()? {
        match (num, f) {
            (1, Field::Bytes(b)) => {
                let mut p = Piece {
                    piece: String::new(),
                    score: 0.0,
                    kind: 1,
                };
                let mut pr = ProtoReader::new(b);
                while let Some((n, f)) = pr.field()? {
                    match (n, f) {
                        (1, Field::Bytes(s)) => {
                            p.piece = String::from_utf8(s.to_vec()).context("piece is not UTF-8")?
                        }
                        (2, Field::Fixed32(x)) => p.score = f32::from_bits(x),
                        (3, Field::Varint(x)) => p.kind = x,
                        _ => {}
                    }
                }
                model.pieces.push(p);
            }
            (2, Field::Bytes(b)) => {
                let mut tr = ProtoReader::new(b);
                while let Some((n, f)) = tr.field()? {
                    match (n, f) {
                        (3, Field::Varint(x)) => model.model_type = x,
                        (40, Field::Varint(x)) => model.unk_id = x,
                        _ => {}
                    }
                }
            }
            (3, Field::Bytes(b)) => {
                let mut nr = ProtoReader::new(b);
                while let Some((n, f)) = nr.field()? {
                    if let (2, Field::Bytes(c)) = (n, f) {
                        model.precompiled_charsmap = c.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        bail!("no pieces (not a SentencePiece model)");
    }
    if model.model_type != 1 {
        bail!("SentencePiece model type {} is not unigram", model.model_type);
    }
    Ok(model)
}

fn from_sentencepiece(buf: &[u8], config: Option<&Value>) -> Result<Tokenizer> {
    let sp = parse_spiece(buf)?;
    let cfg = |k: &str| config.and_then(|c| c.get(k));
    let extra_ids = cfg("extra_ids").and_then(Value::as_u64).unwrap_or(100) as usize;
    let legacy = cfg("legacy").and_then(Value::as_bool).unwrap_or(true);
    let add_prefix_space = cfg("add_prefix_space").and_then(Value::as_bool).unwrap_or(true);

    // T5Converter.vocab: the pieces, then <extra_id_{n-1}> .. <extra_id_0> with score 0.
    let mut vocab: Vec<(String, f64)> = sp
        .pieces
        .iter()
        .map(|p| (p.piece.clone(), f64::from(p.score)))
        .collect();
    vocab.extend((0..extra_ids).rev().map(|i| (format!("<extra_id_{i}>"), 0.0)));
    let unk_id = usize::try_from(sp.unk_id)?;
    let model = Unigram::from(vocab, Some(unk_id), false).map_err(|e| anyhow!("unigram model: {e}"))?;
    let mut tok = Tokenizer::new(model);

    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if !sp.precompiled_charsmap.is_empty() {
        let pre = Precompiled::from(&sp.precompiled_charsmap).map_err(|e| anyhow!("precompiled charsmap: {e}"))?;
        normalizers.push(pre.into());
    }
    normalizers.push(Strip::new(false, true).into());
    let replace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
        "▁",
    )
    .map_err(|e| anyhow!("normalizer: {e}"))?;
    normalizers.push(replace.into());
    tok.with_normalizer(Some(Sequence::new(normalizers)));

    let scheme = match (add_prefix_space, legacy) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, true)));
    tok.with_decoder(Some(MetaspaceDecoder::new('▁', scheme, true)));

    // Added tokens, in the order transformers adds them: SentencePiece control (special) and
    // user-defined pieces, then the config's `added_tokens_decoder`, then the special tokens
    // and `additional_special_tokens` not added yet (special, not normalized).
    let mut added: Vec<AddedToken> = sp
        .pieces
        .iter()
        .filter(|p| p.kind == 3 || p.kind == 4)
        .map(|p| AddedToken::from(p.piece.clone(), p.kind == 3).normalized(false))
        .collect();
    if let Some(Value::Object(dec)) = cfg("added_tokens_decoder") {
        let mut entries: Vec<(u64, &Value)> = dec
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v)))
            .collect();
        entries.sort_by_key(|(id, _)| *id);
        for (_, v) in entries {
            let Some(content) = token_content(v) else { continue };
            let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
            let special = flag("special", false);
            added.push(
                AddedToken::from(content, special)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", !special)),
            );
        }
    }
    let mut specials: Vec<String> = Vec::new();
    for (key, default) in [("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")] {
        specials.push(cfg(key).and_then(token_content).unwrap_or_else(|| default.to_string()));
    }
    match cfg("additional_special_tokens").and_then(Value::as_array) {
        Some(list)
            if list
                .iter()
                .any(|t| token_content(t).is_some_and(|c| c.contains("<extra_id_"))) =>
        {
            specials.extend(list.iter().filter_map(token_content));
        }
        other => {
            specials.extend(other.into_iter().flatten().filter_map(token_content));
            specials.extend((0..extra_ids).map(|i| format!("<extra_id_{i}>")));
        }
    }
    for s in specials {
        added.push(AddedToken::from(s, true).normalized(false));
    }
    let mut seen = std::collections::HashSet::new();
    added.retain(|t| seen.insert(t.content.clone()));
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = added.into_iter().partition(|t| t.special);
    tok.add_tokens(&plain);
    tok.add_special_tokens(&special);

    let eos_id = tok.token_to_id("</s>").ok_or_else(|| anyhow!("no </s> piece"))?;
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .map_err(|e| anyhow!("template: {e}"))?
        .try_pair("$A </s> $B </s>")
        .map_err(|e| anyhow!("template: {e}"))?
        .special_tokens(vec![("</s>", eos_id)])
        .build()
        .map_err(|e| anyhow!("template: {e}"))?;
    tok.with_post_processor(Some(template));
    Ok(tok)
}
