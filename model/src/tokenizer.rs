//! The model's tokenizer, built from GGUF metadata or loaded from a Hugging Face
//! `tokenizer.json`, on top of the `tokenizers` crate.
//!
//! Two vocabulary kinds of GGUF (`tokenizer.ggml.model`) are supported:
//!
//! * `"gpt2"`: byte-level BPE over `tokenizer.ggml.tokens` and `.merges`. The
//!   pre-tokenizer is chosen by `tokenizer.ggml.pre`, following llama.cpp's
//!   `llm_tokenizer_bpe` table:
//!   - `smollm` (and `starcoder`, `refact`, `codeshell`, `command-r`, `exaone`,
//!     `minerva-7b`, which llama.cpp treats alike): every digit is its own piece,
//!     then the GPT-2 regex, byte-level mapping, no prefix space;
//!   - `gpt-2`/`gpt2` (and `phi-2`, `mpt`, `olmo`, `jais`): the GPT-2 regex alone;
//!   - `llama-bpe` (`llama3`, `llama-v3`, `falcon3`): Llama-3's split regex, then
//!     byte-level mapping without regex; whole pieces found in the vocabulary skip
//!     the merges (`ignore_merges`), BOS added by default;
//!   - `qwen2` (`deepseek-r1-qwen`, `stablelm2`): Qwen-2's split regex;
//!   - `default` or no `pre` at all: llama.cpp's fallback list (punctuation runs,
//!     the GPT-2 regex, number runs, then groups of three ASCII digits).
//!
//!   Any other `pre` is an error that names it and the supported values.
//! * `"llama"`: SentencePiece BPE, converted the way Hugging Face's
//!   `LlamaConverter` does: a BPE whose merges are derived from the vocabulary
//!   (every split of a piece into two pieces of the vocabulary is a merge, ranked by
//!   the score of the merged piece, highest first), spaces written as `▁`, a `▁`
//!   prepended (SentencePiece's `add_dummy_prefix`, llama.cpp's default
//!   `add_space_prefix`), unknown characters spelled with the byte
//!   tokens `<0xXX>`, and a decoder that undoes all of it.
//!
//! Control (token type 3) and unknown (2) tokens become special added tokens;
//! user-defined tokens (4) become ordinary added tokens. [`Tokenizer::encode`]
//! tokenizes the way llama.cpp's `llama-perplexity` does
//! (`common_tokenize(ctx, text, add_special = true, parse_special = false)`):
//! nothing is added around the text (BOS is the caller's business, see
//! [`Tokenizer::add_bos`]; llama.cpp's perplexity puts BOS in place of each chunk's
//! first token itself), special tokens written in the text are *not* recognised
//! but tokenized as plain text, while user-defined tokens are.
//!
//! [`Tokenizer::save`] writes `tokenizer.json` and a `tokenizer_config.json` the way
//! Hugging Face transformers reads them; [`Tokenizer::from_file`] reads them back.
//!
//! [`Tokenizer::to_gguf_vocab`] turns a tokenizer back into GGUF metadata (for
//! writing a GGUF from a safetensors checkpoint). A tokenizer built from GGUF
//! returns its vocabulary unchanged; `save` records what `tokenizer.json` cannot
//! hold (the GGUF `model` and `pre`, the special ids and flags as the GGUF had
//! them, and any tokens, merges, token types or scores that differ from what
//! `tokenizer.json` implies) in `tokenizer_config.json` under [`GGUF_CONFIG_KEY`],
//! so a saved tokenizer converts back exactly. Without that key (a foreign
//! `tokenizer.json`) the vocabulary is reconstructed from the `tokenizers` model
//! and `pre` is chosen by recognising the pre-tokenizer.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

/// GGUF token type of an ordinary token (`tokenizer.ggml.token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type of the unknown token.
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF token type of a control token (BOS, EOS, chat markers, ...).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of a user-defined token (always matched in text as a whole).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF token type of an unused token.
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// GGUF token type of a byte token `<0xXX>` (SentencePiece byte fallback).
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// The GPT-2 pre-tokenizer regex (what `ByteLevel` uses with `use_regex`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama-3's split regex, as in its `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen-2's split regex, as in its `tokenizer.json`.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's fallback (`default`) pre-tokenizer: these regexes applied in turn.
const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
/// The `tokenizer.ggml.pre` values accepted for `gpt2` vocabularies.
const SUPPORTED_PRE: &str = "smollm, starcoder, refact, codeshell, command-r, exaone, \
     minerva-7b, gpt2, gpt-2, phi-2, mpt, olmo, jais, llama-bpe, llama3, llama-v3, falcon3, \
     qwen2, deepseek-r1-qwen, stablelm2, default (or absent)";
/// SentencePiece's whitespace marker.
const SPM_SPACE: &str = "\u{2581}";
/// The key of `tokenizer_config.json` under which [`Tokenizer::save`] records the
/// GGUF tokenizer metadata that `tokenizer.json` cannot hold: an object with
/// `model`, `pre`, `bos_token_id`, `eos_token_id`, `unknown_token_id`,
/// `padding_token_id`, `add_bos_token`, `add_eos_token` (the GGUF's values, `null`
/// where it had none) and, only where they differ from what `tokenizer.json`
/// implies, `tokens`, `merges`, `token_type` and `scores` (`null` when the GGUF had
/// none; non-finite scores written as the strings `"NaN"`, `"inf"`, `"-inf"`).
/// Hugging Face transformers ignores it.
pub const GGUF_CONFIG_KEY: &str = "gguf";
/// The `pre` values [`Tokenizer::to_gguf_vocab`] recognises in a foreign
/// byte-level BPE `tokenizer.json`.
const RECOGNISED_PRE: &str = "smollm (Digits one by one, then ByteLevel with its regex), \
     gpt-2 (ByteLevel with the GPT-2 regex), llama-bpe (Llama-3's split regex, then \
     ByteLevel), qwen2 (Qwen-2's split regex, then ByteLevel), default (llama.cpp's \
     fallback regexes, then ByteLevel)";

/// The tokenizer as GGUF metadata holds it (filled by the GGUF reader).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `"smollm"`, `"llama-bpe"`, `"gpt-2"`, `"default"`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the token text of every id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte (see the `TOKEN_TYPE_*` constants).
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: BPE merges `"left right"`, highest priority first.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
}

/// A text tokenizer: a `tokenizers::Tokenizer` plus what llama.cpp and HF
/// transformers know about BOS/EOS.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    vocab_size: usize,
    /// The GGUF vocabulary this tokenizer was built from (by `from_gguf`) or that
    /// `tokenizer_config.json` recorded (see [`GGUF_CONFIG_KEY`]).
    gguf: Option<GgufVocab>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// Converts an error of the `tokenizers` crate.
fn tk(e: tokenizers::Error) -> anyhow::Error {
    anyhow!(e)
}

/// The pre-tokenizer families of byte-level BPE vocabularies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BpePre {
    /// Digits one by one, then GPT-2.
    SmolLm,
    /// GPT-2 alone.
    Gpt2,
    /// llama.cpp's fallback list.
    Default,
    /// Llama-3.
    Llama3,
    /// Qwen-2.
    Qwen2,
}

impl BpePre {
    fn parse(pre: Option<&str>) -> Result<Self> {
        Ok(match pre {
            None | Some("default") => Self::Default,
            Some(
                "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
                | "minerva-7b",
            ) => Self::SmolLm,
            Some("gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais") => Self::Gpt2,
            Some("llama-bpe" | "llama3" | "llama-v3" | "falcon3") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen" | "stablelm2") => Self::Qwen2,
            Some(other) => bail!(
                "unsupported tokenizer.ggml.pre {other:?} for a gpt2 (byte-level BPE) \
                 vocabulary; supported: {SUPPORTED_PRE}"
            ),
        })
    }

    fn split(regex: &str) -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tk)
        .with_context(|| format!("compiling pre-tokenizer regex {regex:?}"))?
        .into())
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper> {
        // Byte-level mapping after the splits, without its own regex.
        let bytes_only = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
        Ok(match self {
            Self::SmolLm => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])),
            Self::Gpt2 => ByteLevel::new(false, true, true).into(),
            Self::Default => {
                let mut parts = DEFAULT_REGEXES
                    .iter()
                    .map(|r| Self::split(r))
                    .collect::<Result<Vec<_>>>()?;
                parts.push(bytes_only());
                PreSequence::new(parts).into()
            }
            Self::Llama3 => PreSequence::new(vec![Self::split(LLAMA3_REGEX)?, bytes_only()]).into(),
            Self::Qwen2 => PreSequence::new(vec![Self::split(QWEN2_REGEX)?, bytes_only()]).into(),
        })
    }
}

/// Token type of id `i` (normal when the GGUF has no types).
fn token_type(v: &GgufVocab, i: usize) -> i32 {
    v.token_types
        .as_ref()
        .and_then(|t| t.get(i).copied())
        .unwrap_or(TOKEN_TYPE_NORMAL)
}

/// The vocabulary as a map, with llama.cpp's rules: empty tokens are renamed
/// `[EMPTY_i]`, a duplicate is an error.
fn vocab_map(v: &GgufVocab) -> Result<(Vec<String>, Vocab)> {
    let n = v.tokens.len();
    if n == 0 {
        bail!("tokenizer.ggml.tokens is empty");
    }
    if u32::try_from(n).is_err() {
        bail!("tokenizer.ggml.tokens has {n} entries, more than u32 ids can hold");
    }
    if let Some(t) = &v.token_types {
        if t.len() < n {
            bail!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                t.len()
            );
        }
    }
    if let Some(s) = &v.scores {
        if s.len() < n {
            bail!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                s.len()
            );
        }
    }
    let mut texts = Vec::with_capacity(n);
    let mut map = Vocab::with_capacity(n);
    for (i, t) in v.tokens.iter().enumerate() {
        let text = if t.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            t.clone()
        };
        if let Some(prev) = map.insert(text.clone(), i as u32) {
            bail!("duplicate token in vocabulary: {text:?} has ids {prev} and {i}");
        }
        texts.push(text);
    }
    Ok((texts, map))
}

/// Checks that an optional special id is inside the vocabulary.
fn check_id(name: &str, id: Option<u32>, n: usize) -> Result<Option<u32>> {
    match id {
        Some(i) if i as usize >= n => bail!("{name} id {i} is outside the vocabulary of {n}"),
        other => Ok(other),
    }
}

/// The merges of a GGUF `gpt2` vocabulary, parsed as llama.cpp does (split at the
/// first space after the first byte; the first occurrence of a pair keeps its rank).
fn gguf_merges(v: &GgufVocab, vocab: &Vocab) -> Result<Vec<(String, String)>> {
    let raw = v
        .merges
        .as_ref()
        .context("a gpt2 vocabulary needs tokenizer.ggml.merges")?;
    let mut seen = HashSet::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        // Byte offsets: a space byte is always a whole character in UTF-8.
        let pos = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&c| c == b' ')
            .map(|p| p + 1)
            .with_context(|| format!("merge #{i} {m:?} has no space separating its two parts"))?;
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        for part in [a, b] {
            if !vocab.contains_key(part) {
                bail!("merge #{i} {m:?}: {part:?} is not in the vocabulary");
            }
        }
        let joined = format!("{a}{b}");
        if !vocab.contains_key(&joined) {
            bail!("merge #{i} {m:?} makes {joined:?}, which is not in the vocabulary");
        }
        if seen.insert((a.to_string(), b.to_string())) {
            out.push((a.to_string(), b.to_string()));
        }
    }
    Ok(out)
}

/// Merges of a SentencePiece vocabulary, as HF's `SentencePieceExtractor` derives
/// them: for every piece, every split into two pieces of the vocabulary (ordered by
/// the ids of the two halves) is a merge; merges are then ordered by the score of the
/// merged piece, highest first, ties kept in vocabulary order (stable sort).
fn spm_merges(texts: &[String], scores: Option<&[f32]>, vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(usize, u32, u32, usize)> = Vec::new(); // (piece id, left id, right id, split byte)
    for (id, piece) in texts.iter().enumerate() {
        let mut local = Vec::new();
        for (k, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..k]), vocab.get(&piece[k..])) {
                local.push((id, l, r, k));
            }
        }
        local.sort_by_key(|&(_, l, r, _)| (l, r));
        merges.extend(local);
    }
    if let Some(s) = scores {
        // Highest score first; `sort_by` is stable, so equal scores keep vocab order.
        // (-0.0 counts as 0.0, NaN as lowest.) Without scores HF's extractor ranks
        // by id, lowest first, which is the order already.
        let key = |i: usize| {
            if s[i].is_nan() {
                f32::NEG_INFINITY
            } else {
                s[i] + 0.0
            }
        };
        merges.sort_by(|a, b| key(b.0).total_cmp(&key(a.0)));
    }
    merges
        .into_iter()
        .map(|(id, _, _, k)| (texts[id][..k].to_string(), texts[id][k..].to_string()))
        .collect()
}

/// A TemplateProcessing post-processor adding BOS/EOS the way HF's
/// `LlamaTokenizerFast.update_post_processor` does (used by HF transformers only;
/// [`Tokenizer::encode`] never adds them).
fn bos_eos_processor(
    texts: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<PostProcessorWrapper>> {
    let bos = bos
        .filter(|_| add_bos)
        .map(|i| (texts[i as usize].clone(), i));
    let eos = eos
        .filter(|_| add_eos)
        .map(|i| (texts[i as usize].clone(), i));
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let piece = |t: &Option<(String, u32)>, seq: u32| {
        t.as_ref()
            .map(|(s, _)| format!("{s}:{seq} "))
            .unwrap_or_default()
    };
    let tail = |t: &Option<(String, u32)>, seq: u32| {
        t.as_ref()
            .map(|(s, _)| format!(" {s}:{seq}"))
            .unwrap_or_default()
    };
    let single = format!("{}$A:0{}", piece(&bos, 0), tail(&eos, 0));
    let pair = format!("{single} {}$B:1{}", piece(&bos, 1), tail(&eos, 1));
    let mut specials: Vec<(String, u32)> = Vec::new();
    for t in [&bos, &eos].into_iter().flatten() {
        if !specials.contains(t) {
            specials.push(t.clone());
        }
    }
    let tp = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow!("post-processor template {single:?}: {e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow!("post-processor template {pair:?}: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow!("building the BOS/EOS post-processor: {e}"))?;
    Ok(Some(tp.into()))
}

/// Added tokens of a GGUF vocabulary: control and unknown tokens as special ones,
/// user-defined tokens as ordinary ones (matched on the raw text).
fn added_tokens(v: &GgufVocab, texts: &[String]) -> (Vec<AddedToken>, Vec<AddedToken>) {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        match token_type(v, i) {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(text.clone(), true).normalized(false))
            }
            TOKEN_TYPE_USER_DEFINED => {
                user.push(AddedToken::from(text.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    (special, user)
}

/// The content of a token entry of `tokenizer_config.json`: a string or an
/// `AddedToken` object with `content`.
fn config_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An id from `config.json` (`bos_token_id` may be a number or a list of numbers).
fn config_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        serde_json::Value::Array(a) => config_id(a.first()),
        _ => None,
    }
}

/// Reads a JSON file if it exists.
fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(v))
}

/// A GGUF vocabulary's tokens, merges, token types and scores as a
/// `tokenizer.json` implies them.
struct Implied {
    tokens: Vec<String>,
    merges: Option<Vec<String>>,
    token_types: Vec<i32>,
    scores: Option<Vec<f32>>,
}

/// The `tokenizers` model as JSON (the only public way to a BPE's ranked merges).
fn model_json(inner: &tokenizers::Tokenizer) -> Result<Value> {
    // The `tokenizers` crate serialises a vocabulary by walking every id up to
    // the largest (collecting the holes): a stray huge id would take hours and
    // gigabytes. Ids must run 0..N without gaps anyway.
    let vocab = inner.get_vocab(false);
    if let Some(max) = vocab.values().max() {
        if *max as usize >= vocab.len() {
            bail!(
                "tokenizer.json has token id {max} but only {} tokens: ids must run from 0 without gaps",
                vocab.len()
            );
        }
    }
    serde_json::to_value(inner.get_model()).context("serialising the tokenizer model")
}

/// The `type` of a serialised tokenizer component, `"none"` for `null`.
fn json_type(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("none")
}

/// A serialised component for an error message (compact, at most ~600 bytes).
fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 600 {
        return s;
    }
    let mut end = 600;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The GGUF model kind a `tokenizers` model converts to: a BPE with byte fallback
/// is a converted SentencePiece vocabulary (`"llama"`), any other BPE byte-level
/// (`"gpt2"`).
fn model_kind(model: &Value) -> Result<&'static str> {
    match json_type(model) {
        "BPE" if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) => Ok("llama"),
        "BPE" => Ok("gpt2"),
        other => bail!(
            "the tokenizer.json model is {other:?}; only BPE models (byte-level or \
             SentencePiece BPE) convert to a GGUF vocabulary"
        ),
    }
}

/// A BPE model's merges in rank order (either serialisation: `"a b"` or `["a", "b"]`).
fn bpe_merges(model: &Value) -> Result<Vec<(String, String)>> {
    let Some(list) = model.get("merges").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(s) => {
                let pos = s
                    .as_bytes()
                    .iter()
                    .skip(1)
                    .position(|&c| c == b' ')
                    .map(|p| p + 1)
                    .with_context(|| format!("tokenizer.json merge #{i} {s:?} has no space"))?;
                Ok((s[..pos].to_string(), s[pos + 1..].to_string()))
            }
            Value::Array(p) => match p.as_slice() {
                [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                _ => bail!("tokenizer.json merge #{i} {m} is not a pair of strings"),
            },
            _ => bail!("tokenizer.json merge #{i} {m} is neither a string nor a pair"),
        })
        .collect()
}

/// Whether `t` is a SentencePiece byte token `<0xXX>`.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && b[3..5].iter().all(|c| c.is_ascii_hexdigit())
}

/// Tokens, merges, token types and scores of a GGUF vocabulary of kind `kind`
/// (`"gpt2"` or `"llama"`) as `inner` (whose model serialises to `model`) implies
/// them: tokens by id (added tokens included); for `gpt2` the merges in rank
/// order; special added tokens as control (3), other added tokens user-defined (4);
/// for `llama` the unknown token (2) and byte tokens `<0xXX>` (6) too, no merges,
/// and scores that rank each piece by its first merge (so deriving the merges back
/// from the vocabulary, as [`Tokenizer::from_gguf`] does, gives the same order).
fn implied_vocab(inner: &tokenizers::Tokenizer, model: &Value, kind: &str) -> Result<Implied> {
    if kind != "gpt2" && kind != "llama" {
        bail!("unsupported GGUF tokenizer model {kind:?}; supported: \"gpt2\", \"llama\"");
    }
    let vocab = inner.get_vocab(true);
    let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
    if n == 0 {
        bail!("the tokenizer.json vocabulary is empty");
    }
    // Ids run 0..N without gaps, so the largest bounds the table only when it
    // is below the count (a stray huge added token's id would otherwise size it).
    if n > vocab.len() {
        bail!(
            "tokenizer.json has token id {} but only {} tokens: ids must run from 0 without gaps",
            n - 1,
            vocab.len()
        );
    }
    let mut slots: Vec<Option<&String>> = vec![None; n];
    for (text, &id) in &vocab {
        if let Some(prev) = slots[id as usize].replace(text) {
            bail!("token id {id} has two texts in tokenizer.json: {prev:?} and {text:?}");
        }
    }
    let tokens = slots
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.cloned()
                .with_context(|| format!("token id {i} has no token in tokenizer.json"))
        })
        .collect::<Result<Vec<String>>>()?;
    let pairs = bpe_merges(model)?;
    let spm = kind == "llama";
    let unk = model.get("unk_token").and_then(Value::as_str);
    let added = inner.get_added_tokens_decoder();
    let token_types = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match added.get(&(i as u32)) {
            _ if spm && Some(t.as_str()) == unk => TOKEN_TYPE_UNKNOWN,
            Some(a) if a.special => TOKEN_TYPE_CONTROL,
            Some(_) => TOKEN_TYPE_USER_DEFINED,
            None if spm && is_byte_token(t) => TOKEN_TYPE_BYTE,
            None => TOKEN_TYPE_NORMAL,
        })
        .collect();
    let (merges, scores) = if spm {
        // Pieces no merge makes rank below all others.
        let mut scores = vec![-(pairs.len() as f32); n];
        for (rank, (a, b)) in pairs.iter().enumerate().rev() {
            if let Some(&id) = vocab.get(&format!("{a}{b}")) {
                scores[id as usize] = 0.0 - rank as f32;
            }
        }
        (None, Some(scores))
    } else {
        let merges = pairs.iter().map(|(a, b)| format!("{a} {b}")).collect();
        (Some(merges), None)
    };
    Ok(Implied {
        tokens,
        merges,
        token_types,
        scores,
    })
}

/// Chooses `tokenizer.ggml.pre` for a byte-level BPE by its (serialised)
/// pre-tokenizer; an unrecognised one is an error that shows it.
fn recognise_pre(pre_tokenizer: &Value) -> Result<&'static str> {
    let parts: Vec<&Value> = match pre_tokenizer {
        Value::Null => Vec::new(),
        v if json_type(v) == "Sequence" => v
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        v => vec![v],
    };
    let byte_level = |v: &Value, regex: bool| {
        json_type(v) == "ByteLevel"
            && v["add_prefix_space"] == false
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == regex
    };
    let split = |v: &Value, regex: &str| {
        json_type(v) == "Split"
            && v["pattern"]["Regex"] == regex
            && v["behavior"] == "Isolated"
            && v["invert"] == false
    };
    let found = match parts.as_slice() {
        [d, b]
            if json_type(d) == "Digits"
                && d["individual_digits"] == true
                && byte_level(b, true) =>
        {
            Some("smollm")
        }
        // llama.cpp's loader knows this scheme as "gpt-2" (and refuses "gpt2").
        [b] if byte_level(b, true) => Some("gpt-2"),
        [s, b] if byte_level(b, false) && split(s, GPT2_REGEX) => Some("gpt-2"),
        [s, b] if byte_level(b, false) && split(s, LLAMA3_REGEX) => Some("llama-bpe"),
        [s, b] if byte_level(b, false) && split(s, QWEN2_REGEX) => Some("qwen2"),
        [r0, r1, r2, r3, b]
            if byte_level(b, false)
                && DEFAULT_REGEXES
                    .iter()
                    .zip([r0, r1, r2, r3])
                    .all(|(r, v)| split(v, r)) =>
        {
            Some("default")
        }
        _ => None,
    };
    found.ok_or_else(|| {
        anyhow!(
            "unrecognised pre-tokenizer in tokenizer.json: {}; recognised for a byte-level \
             BPE: {RECOGNISED_PRE}",
            describe(pre_tokenizer)
        )
    })
}

/// Checks that a foreign byte-level BPE has nothing GGUF cannot express: no
/// subword prefix or word suffix, no normalizer but NFC (which llama.cpp's own
/// converter drops as well).
fn check_byte_level(inner: &tokenizers::Tokenizer, model: &Value) -> Result<()> {
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let Some(s) = model.get(key).and_then(Value::as_str) {
            bail!("the tokenizer.json BPE has {key} {s:?}, which a GGUF vocabulary cannot express");
        }
    }
    let norm = serde_json::to_value(inner.get_normalizer())?;
    match json_type(&norm) {
        "none" | "NFC" => Ok(()),
        _ => bail!(
            "the tokenizer.json normalizer {} has no GGUF equivalent for a byte-level BPE \
             (only none or NFC)",
            describe(&norm)
        ),
    }
}

/// Checks that a foreign byte-fallback BPE is a converted SentencePiece model:
/// spaces written as `▁` by the normalizer (`Replace`) or a `Metaspace`
/// pre-tokenizer.
fn check_sentencepiece(inner: &tokenizers::Tokenizer) -> Result<()> {
    let norm = serde_json::to_value(inner.get_normalizer())?;
    let pre = serde_json::to_value(inner.get_pre_tokenizer())?;
    let is_space = |v: &Value| {
        json_type(v) == "Replace" && v["pattern"]["String"] == " " && v["content"] == SPM_SPACE
    };
    let norm_ok = is_space(&norm)
        || norm
            .get("normalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(is_space));
    if norm_ok || json_type(&pre) == "Metaspace" {
        return Ok(());
    }
    bail!(
        "a byte-fallback BPE tokenizer.json is taken for SentencePiece, but nothing in it \
         writes spaces as {SPM_SPACE:?}: normalizer {}, pre-tokenizer {}",
        describe(&norm),
        describe(&pre)
    )
}

/// A score as JSON: a number, or `"NaN"`/`"inf"`/`"-inf"` (JSON has no such numbers).
fn score_json(x: f32) -> Value {
    if x.is_finite() {
        Value::from(f64::from(x))
    } else {
        Value::String(x.to_string())
    }
}

/// The record [`Tokenizer::save`] writes under [`GGUF_CONFIG_KEY`] for `v`.
fn gguf_record(inner: &tokenizers::Tokenizer, v: &GgufVocab) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("model".into(), json!(v.model));
    m.insert("pre".into(), json!(v.pre));
    m.insert("bos_token_id".into(), json!(v.bos));
    m.insert("eos_token_id".into(), json!(v.eos));
    m.insert("unknown_token_id".into(), json!(v.unk));
    m.insert("padding_token_id".into(), json!(v.pad));
    m.insert("add_bos_token".into(), json!(v.add_bos));
    m.insert("add_eos_token".into(), json!(v.add_eos));
    // Arrays only where tokenizer.json does not imply them.
    let implied = model_json(inner)
        .and_then(|j| implied_vocab(inner, &j, &v.model))
        .ok();
    let implied = implied.as_ref();
    if implied.map(|i| &i.tokens) != Some(&v.tokens) {
        m.insert("tokens".into(), json!(v.tokens));
    }
    if implied.map(|i| &i.merges) != Some(&v.merges) {
        m.insert("merges".into(), json!(v.merges));
    }
    if implied.map(|i| Some(&i.token_types)) != Some(v.token_types.as_ref()) {
        m.insert("token_type".into(), json!(v.token_types));
    }
    if implied.map(|i| &i.scores) != Some(&v.scores) {
        let scores = v
            .scores
            .as_ref()
            .map_or(Value::Null, |s| s.iter().map(|&x| score_json(x)).collect());
        m.insert("scores".into(), scores);
    }
    m
}

/// Reads the GGUF vocabulary back from a [`GGUF_CONFIG_KEY`] record, taking what
/// it does not hold from `inner`.
fn vocab_from_record(inner: &tokenizers::Tokenizer, rec: &Value) -> Result<GgufVocab> {
    let o = rec.as_object().context("it is not an object")?;
    let model = o
        .get("model")
        .and_then(Value::as_str)
        .context("it has no \"model\" string")?
        .to_string();
    // A key that is absent or null is None; anything else must have the right type.
    fn opt<T>(
        o: &Map<String, Value>,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .with_context(|| format!("{key:?} is not {what}: {}", describe(v))),
        }
    }
    let id = |key: &str| {
        opt(o, key, "a token id", |v| {
            v.as_u64().and_then(|x| u32::try_from(x).ok())
        })
    };
    let flag = |key: &str| opt(o, key, "a boolean", Value::as_bool);
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let ints = |v: &Value| -> Option<Vec<i32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok()))
            .collect()
    };
    let floats = |v: &Value| -> Option<Vec<f32>> {
        v.as_array()?
            .iter()
            .map(|x| match x {
                Value::String(s) => s.parse::<f32>().ok(),
                x => x.as_f64().map(|f| f as f32),
            })
            .collect()
    };
    let implied = model_json(inner).and_then(|j| implied_vocab(inner, &j, &model));
    let implied = || implied.as_ref().map_err(|e| anyhow!("{e:#}"));
    let tokens = match o.get("tokens") {
        Some(_) => opt(o, "tokens", "a list of strings", strings)?.context("\"tokens\" is null")?,
        None => implied()?.tokens.clone(),
    };
    let merges = match o.get("merges") {
        Some(_) => opt(o, "merges", "a list of strings", strings)?,
        None => implied()?.merges.clone(),
    };
    let token_types = match o.get("token_type") {
        Some(_) => opt(o, "token_type", "a list of integers", ints)?,
        None => Some(implied()?.token_types.clone()),
    };
    let scores = match o.get("scores") {
        Some(_) => opt(o, "scores", "a list of numbers", floats)?,
        None => implied()?.scores.clone(),
    };
    let v = GgufVocab {
        model,
        pre: opt(o, "pre", "a string", |v| v.as_str().map(str::to_string))?,
        tokens,
        scores,
        token_types,
        merges,
        bos: id("bos_token_id")?,
        eos: id("eos_token_id")?,
        unk: id("unknown_token_id")?,
        pad: id("padding_token_id")?,
        add_bos: flag("add_bos_token")?,
        add_eos: flag("add_eos_token")?,
    };
    // Array lengths and ids against the tokens (a stale record fails here).
    vocab_map(&v)?;
    let n = v.tokens.len();
    for (name, id) in [
        ("BOS", v.bos),
        ("EOS", v.eos),
        ("unknown token", v.unk),
        ("padding", v.pad),
    ] {
        check_id(name, id, n)?;
    }
    Ok(v)
}

/// `config` as pretty JSON with `record` added under [`GGUF_CONFIG_KEY`], each of
/// its entries on one line (its arrays can be long).
fn config_text(config: &Map<String, Value>, record: Option<&Map<String, Value>>) -> Result<String> {
    let text = serde_json::to_string_pretty(&Value::Object(config.clone()))?;
    let Some(record) = record else {
        return Ok(text);
    };
    let body = record
        .iter()
        .map(|(k, v)| {
            Ok(format!(
                "    {}: {}",
                serde_json::to_string(k)?,
                serde_json::to_string(v)?
            ))
        })
        .collect::<Result<Vec<_>>>()?
        .join(",\n");
    let head = text
        .strip_suffix("\n}")
        .context("unexpected JSON layout of tokenizer_config.json")?;
    Ok(format!(
        "{head},\n  {}: {{\n{body}\n  }}\n}}",
        serde_json::to_string(GGUF_CONFIG_KEY)?
    ))
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF tokenizer metadata (see the module docs for the
    /// supported `model`/`pre` values). Defaults follow llama.cpp where the GGUF is
    /// silent: for `"llama"` BOS 1, EOS 2, UNK 0, `add_bos` and `add_space_prefix`
    /// true; for `"gpt2"` `add_bos` only for the Llama-3 family.
    ///
    /// # Errors
    /// An unsupported `model` or `pre`, an empty vocabulary, a duplicate token,
    /// arrays shorter than the vocabulary, a malformed merge or one whose parts or
    /// result are not tokens, a special id outside the vocabulary.
    pub fn from_gguf(v: &GgufVocab) -> Result<Self> {
        let (texts, vocab) = vocab_map(v)?;
        let n = texts.len();
        let (special, user) = added_tokens(v, &texts);

        let (mut inner, bos, eos, unk, add_bos): (tokenizers::Tokenizer, _, _, _, _) =
            match v.model.as_str() {
                "gpt2" => {
                    let pre = BpePre::parse(v.pre.as_deref())?;
                    let merges = gguf_merges(v, &vocab)?;
                    let bpe = BPE::builder()
                        .vocab_and_merges(vocab, merges)
                        .ignore_merges(pre == BpePre::Llama3)
                        .build()
                        .map_err(tk)
                        .context("building the BPE model")?;
                    let mut t = tokenizers::Tokenizer::new(bpe);
                    t.with_pre_tokenizer(Some(pre.pre_tokenizer()?));
                    t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
                    let add_bos = v.add_bos.unwrap_or(pre == BpePre::Llama3);
                    (t, v.bos, v.eos, v.unk, add_bos)
                }
                "llama" => {
                    let unk = check_id("unknown token", v.unk.or(Some(0)), n)?;
                    let merges = spm_merges(&texts, v.scores.as_deref(), &vocab);
                    let mut builder = BPE::builder()
                        .vocab_and_merges(vocab, merges)
                        .fuse_unk(true)
                        .byte_fallback(true);
                    if let Some(u) = unk {
                        builder = builder.unk_token(texts[u as usize].clone());
                    }
                    let bpe = builder
                        .build()
                        .map_err(tk)
                        .context("building the BPE model")?;
                    let mut t = tokenizers::Tokenizer::new(bpe);
                    let space = Replace::new(" ", SPM_SPACE).map_err(tk)?;
                    // llama.cpp's default for SentencePiece vocabularies
                    // (`tokenizer.ggml.add_space_prefix` is not read).
                    let prefix = true;
                    let normalizer: NormalizerWrapper = if prefix {
                        NormalizerSequence::new(vec![
                            Prepend::new(SPM_SPACE.to_string()).into(),
                            space.into(),
                        ])
                        .into()
                    } else {
                        space.into()
                    };
                    t.with_normalizer(Some(normalizer));
                    let mut decoders: Vec<DecoderWrapper> = vec![
                        Replace::new(SPM_SPACE, " ").map_err(tk)?.into(),
                        ByteFallback::new().into(),
                        Fuse::new().into(),
                    ];
                    if prefix {
                        decoders.push(Strip::new(' ', 1, 0).into());
                    }
                    t.with_decoder(Some(DecoderSequence::new(decoders)));
                    let bos = v.bos.or(Some(1)).filter(|&b| (b as usize) < n);
                    let eos = v.eos.or(Some(2)).filter(|&e| (e as usize) < n);
                    (t, bos, eos, unk, v.add_bos.unwrap_or(true))
                }
                other => bail!(
                "unsupported tokenizer.ggml.model {other:?}; supported: \"gpt2\" (byte-level BPE), \
                 \"llama\" (SentencePiece)"
            ),
            };
        let bos = check_id("BOS", bos, n)?;
        let eos = check_id("EOS", eos, n)?;
        let unk = check_id("unknown token", unk, n)?;
        let pad = check_id("padding", v.pad, n)?;
        let add_eos = v.add_eos.unwrap_or(false);
        if add_bos && bos.is_none() {
            bail!("tokenizer.ggml.add_bos_token is true, but there is no BOS token id");
        }
        if add_eos && eos.is_none() {
            bail!("tokenizer.ggml.add_eos_token is true, but there is no EOS token id");
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
        inner.with_post_processor(bos_eos_processor(&texts, bos, eos, add_bos, add_eos)?);
        Ok(Self::finish(
            inner,
            [bos, eos, unk, pad],
            add_bos,
            add_eos,
            Some(v.clone()),
        ))
    }

    /// Wraps a built or loaded `tokenizers::Tokenizer`.
    fn finish(
        mut inner: tokenizers::Tokenizer,
        [bos, eos, unk, pad]: [Option<u32>; 4],
        add_bos: bool,
        add_eos: bool,
        gguf: Option<GgufVocab>,
    ) -> Self {
        // llama.cpp's perplexity tokenizes with parse_special = false: special tokens
        // written in the text are ordinary text. (Not saved in tokenizer.json, so it
        // is set again on every load.)
        inner.set_encode_special_tokens(true);
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Self {
            inner,
            bos,
            eos,
            unk,
            pad,
            add_bos,
            add_eos,
            vocab_size,
            gguf,
        }
    }

    /// Loads a Hugging Face `tokenizer.json` (or, given a directory, the
    /// `tokenizer.json` inside it). BOS/EOS and `add_bos`/`add_eos` come from the
    /// `tokenizer_config.json` beside it when present (`bos_token`, `eos_token`,
    /// `add_bos_token`, `add_eos_token`), else from `config.json`
    /// (`bos_token_id`, `eos_token_id`); when neither says whether BOS is added, it is
    /// added if the file's post-processor puts BOS in front of an encoding. A
    /// [`GGUF_CONFIG_KEY`] record in `tokenizer_config.json` (written by
    /// [`Tokenizer::save`]) gives the GGUF vocabulary [`Tokenizer::to_gguf_vocab`]
    /// returns.
    ///
    /// # Errors
    /// Unreadable or malformed files, a `tokenizer_config.json` token that is
    /// not in the vocabulary, a malformed or stale [`GGUF_CONFIG_KEY`] record.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self> {
        let path: PathBuf = if tokenizer_json.is_dir() {
            tokenizer_json.join("tokenizer.json")
        } else {
            tokenizer_json.to_path_buf()
        };
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        // Checked as JSON first: some malformed files make the `tokenizers`
        // crate panic inside its deserializer instead of returning an error
        // (found by the fuzzing harness); a panic it still has is caught.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| anyhow::anyhow!("the tokenizers crate failed on it"))
            .and_then(|r| r.map_err(tk))
            .with_context(|| format!("loading {}", path.display()))?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json_if_exists(&dir.join("config.json"))?;

        let lookup = |key: &str| -> Result<Option<u32>> {
            if let Some(text) = config.as_ref().and_then(|c| config_token(c.get(key))) {
                let id = inner.token_to_id(&text).with_context(|| {
                    format!(
                        "tokenizer_config.json {key} {text:?} is not in {}",
                        path.display()
                    )
                })?;
                return Ok(Some(id));
            }
            let id_key = format!("{key}_id");
            Ok(model_config
                .as_ref()
                .and_then(|c| config_id(c.get(&id_key))))
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let unk = lookup("unk_token")?;
        let pad = lookup("pad_token")?;
        let flag = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_bool())
        };
        let add_bos = match flag("add_bos_token") {
            Some(b) => b,
            None => {
                let probe = inner.encode_fast("a", true).map_err(tk)?;
                bos.is_some() && probe.get_ids().first().copied() == bos
            }
        };
        let add_eos = match flag("add_eos_token") {
            Some(b) => b,
            None => {
                let probe = inner.encode_fast("a", true).map_err(tk)?;
                eos.is_some() && probe.get_ids().last().copied() == eos
            }
        };
        let gguf = match config.as_ref().and_then(|c| c.get(GGUF_CONFIG_KEY)) {
            None => None,
            Some(rec) => Some(vocab_from_record(&inner, rec).with_context(|| {
                format!(
                    "reading {GGUF_CONFIG_KEY:?} of {}",
                    dir.join("tokenizer_config.json").display()
                )
            })?),
        };
        Ok(Self::finish(
            inner,
            [bos, eos, unk, pad],
            add_bos,
            add_eos,
            gguf,
        ))
    }

    /// The tokenizer as GGUF metadata (`tokenizer.ggml.*`), for writing a GGUF.
    ///
    /// A tokenizer built by [`Tokenizer::from_gguf`], or loaded from a folder whose
    /// `tokenizer_config.json` has a [`GGUF_CONFIG_KEY`] record (one
    /// [`Tokenizer::save`] wrote), gives back exactly the GGUF vocabulary it came
    /// from. Otherwise the vocabulary is reconstructed from the `tokenizers` model:
    /// a BPE with byte fallback is a converted SentencePiece vocabulary (`"llama"`:
    /// tokens, unknown/control/user-defined/byte token types, scores that rank
    /// pieces in merge order, no `pre`), any other BPE is byte-level (`"gpt2"`:
    /// tokens, merges in rank order, control/user-defined types for the added
    /// tokens, no scores, and `pre` recognised from the pre-tokenizer: Digits one
    /// by one then ByteLevel is `smollm`, ByteLevel with the GPT-2 regex `gpt2`,
    /// Llama-3's split regex `llama-bpe`, Qwen-2's `qwen2`, llama.cpp's fallback
    /// list `default`); the special ids and `add_bos`/`add_eos` are this
    /// tokenizer's.
    ///
    /// # Errors
    /// Without a record: a model other than BPE, an unrecognised pre-tokenizer (the
    /// message shows it), a normalizer or subword affixes GGUF cannot express, a
    /// byte-fallback BPE that does not write spaces as `▁`, ids without a token.
    pub fn to_gguf_vocab(&self) -> Result<GgufVocab> {
        if let Some(v) = &self.gguf {
            return Ok(v.clone());
        }
        let model = model_json(&self.inner)?;
        let kind = model_kind(&model)?;
        let pre = if kind == "gpt2" {
            check_byte_level(&self.inner, &model)?;
            let pre = serde_json::to_value(self.inner.get_pre_tokenizer())?;
            Some(recognise_pre(&pre)?.to_string())
        } else {
            check_sentencepiece(&self.inner)?;
            None
        };
        let implied = implied_vocab(&self.inner, &model, kind)?;
        Ok(GgufVocab {
            model: kind.to_string(),
            pre,
            tokens: implied.tokens,
            scores: implied.scores,
            token_types: Some(implied.token_types),
            merges: implied.merges,
            bos: self.bos,
            eos: self.eos,
            unk: self.unk,
            pad: self.pad,
            add_bos: Some(self.add_bos),
            add_eos: Some(self.add_eos),
        })
    }

    /// Tokenizes `text` exactly as llama.cpp's perplexity does: no BOS/EOS added,
    /// special tokens in the text tokenized as plain text.
    ///
    /// # Errors
    /// Whatever the `tokenizers` pipeline reports (not expected for valid UTF-8).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tk)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Turns ids back into text (special tokens are written out, not skipped). An id
    /// outside the vocabulary is an error.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&i| self.inner.id_to_token(i).is_none()) {
            bail!(
                "token id {bad} is not in the vocabulary of {}",
                self.vocab_size
            );
        }
        self.inner.decode(ids, false).map_err(tk)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS/UNK/PAD tokens or null,
    /// `add_bos_token`, `add_eos_token`, `clean_up_tokenization_spaces: false`,
    /// `tokenizer_class: PreTrainedTokenizerFast`) into `dir`, creating it if needed;
    /// each file is written to a temporary name and renamed into place. A tokenizer
    /// with a GGUF vocabulary (built by [`Tokenizer::from_gguf`] or loaded with a
    /// record) also records it under [`GGUF_CONFIG_KEY`], so that
    /// [`Tokenizer::from_file`] and [`Tokenizer::to_gguf_vocab`] give it back
    /// exactly.
    ///
    /// # Errors
    /// The folder or a file cannot be created, written or renamed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = self.inner.to_string(true).map_err(tk)?;
        crate::io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;

        let text = |id: Option<u32>| -> serde_json::Value {
            id.and_then(|i| self.inner.id_to_token(i))
                .map_or(serde_json::Value::Null, serde_json::Value::String)
        };
        let mut config = serde_json::Map::new();
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_eos_token".into(), self.add_eos.into());
        config.insert("bos_token".into(), text(self.bos));
        config.insert("eos_token".into(), text(self.eos));
        config.insert("unk_token".into(), text(self.unk));
        config.insert("pad_token".into(), text(self.pad));
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        let record = self.gguf.as_ref().map(|v| gguf_record(&self.inner, v));
        let config = config_text(&config, record.as_ref())?;
        crate::io::write_atomic(&dir.join("tokenizer_config.json"), config.as_bytes())
    }

    /// Number of token ids (one past the largest id, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BOS token id, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token id, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS in front of a sequence (llama.cpp's
    /// `llama_vocab_get_add_bos`; its perplexity then puts BOS in place of each
    /// chunk's first token).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The underlying `tokenizers::Tokenizer` (special tokens in text are not split
    /// out: `encode_special_tokens` is on).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The fuzzing harness's finding: a `tokenizer.json` cut inside a string
    /// of its decoder (or with a key turned into a number) made the
    /// `tokenizers` crate panic in its deserializer; now it is an error
    /// naming the file.
    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/arch/qwen3/tokenizer.json");
        let text = std::fs::read_to_string(&src).unwrap();
        let decoder = text.find("\"decoder\"").unwrap();
        let at = decoder + text[decoder..].find("\"use_regex\"").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for bad in [
            text[..at + 1].to_owned(),
            format!("{}17{}", &text[..at], &text[at + "\"use_regex\"".len()..]),
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = format!("{:#}", Tokenizer::from_file(&path).unwrap_err());
            assert!(err.contains("tokenizer.json"), "{err}");
        }
    }

    /// GPT-2's byte → character table (index = byte).
    fn byte_chars() -> Vec<char> {
        let mut direct: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut table = vec!['\0'; 256];
        for &b in &direct {
            table[b as usize] = char::from_u32(b).unwrap();
        }
        let mut n = 0;
        for b in 0..256u32 {
            if !direct.contains(&b) {
                table[b as usize] = char::from_u32(256 + n).unwrap();
                n += 1;
                direct.push(b);
            }
        }
        table
    }

    /// A hand-built byte-level BPE vocabulary: the 256 byte characters (id = byte),
    /// the merge results in merge order, then two control tokens.
    fn toy_gpt2(pre: &str) -> GgufVocab {
        let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
        // "e l" ranks after "l l": in "hello" (h e l l o) the merges must go
        // h+e, l+l, he+ll, hell+o; preferring e+l would strand the second l.
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "e l", "2 0",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let n_types = tokens.len();
        tokens.push("<|endoftext|>".into());
        tokens.push("<|im_start|>".into());
        let mut types = vec![TOKEN_TYPE_NORMAL; n_types];
        types.extend([TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]);
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types: Some(types),
            merges: Some(merges.iter().map(|s| s.to_string()).collect()),
            bos: Some(n_types as u32 + 1),
            eos: Some(n_types as u32),
            add_bos: Some(false),
            ..Default::default()
        }
    }

    fn id_of(t: &Tokenizer, s: &str) -> u32 {
        t.inner()
            .token_to_id(s)
            .unwrap_or_else(|| panic!("{s:?} not in vocab"))
    }

    #[test]
    fn smollm_digits_no_prefix_space_and_merge_order() {
        let t = Tokenizer::from_gguf(&toy_gpt2("smollm")).unwrap();
        let b = |c: char| c as u32; // ASCII digits/letters are their own byte chars
                                    // Every digit its own piece: the "2 0" merge never applies.
        assert_eq!(
            t.encode("2024").unwrap(),
            vec![b('2'), b('0'), b('2'), b('4')]
        );
        // No prefix space; the merge sequence builds "hello" and "Ġworld".
        assert_eq!(
            t.encode("hello world").unwrap(),
            vec![id_of(&t, "hello"), id_of(&t, "Ġworld")]
        );
        assert_eq!(t.encode("hello").unwrap(), vec![id_of(&t, "hello")]);
        // " 2024": the space stays alone once the digit is split off.
        assert_eq!(
            t.encode(" 2024").unwrap(),
            vec![id_of(&t, "Ġ"), b('2'), b('0'), b('2'), b('4')]
        );
        // "e l" is ranked after "l l", so "hell" is h+e, l+l, he+ll.
        assert_eq!(t.encode("hell").unwrap(), vec![id_of(&t, "hell")]);
        // In "ell", l+l (rank 1) beats e+l (rank 9), and "e"+"ll" is no merge.
        assert_eq!(t.encode("ell").unwrap(), vec![b('e'), id_of(&t, "ll")]);
        assert_eq!(t.encode("el").unwrap(), vec![id_of(&t, "el")]);
        // Special tokens in the text are plain text (llama.cpp's parse_special = false).
        let s = "<|im_start|>hello";
        let ids = t.encode(s).unwrap();
        assert!(!ids.contains(&id_of(&t, "<|im_start|>")), "{ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), s);
        // ...but the ids decode to their text.
        assert_eq!(
            t.decode(&[t.bos().unwrap(), id_of(&t, "hello")]).unwrap(),
            "<|im_start|>hello"
        );
        assert!(t.decode(&[9999]).is_err());
        assert_eq!(t.vocab_size(), 256 + 11 + 2);
        assert!(!t.add_bos());

        // The GPT-2 pre-tokenizer alone keeps digit runs together: "2 0" applies.
        let g = Tokenizer::from_gguf(&toy_gpt2("gpt-2")).unwrap();
        assert_eq!(
            g.encode("2024").unwrap(),
            vec![id_of(&g, "20"), b('2'), b('4')]
        );
        assert_eq!(
            g.encode(" 2024").unwrap(),
            vec![id_of(&g, "Ġ"), id_of(&g, "20"), b('2'), b('4')]
        );
    }

    #[test]
    fn unknown_pre_and_model_are_clear_errors() {
        let e = Tokenizer::from_gguf(&toy_gpt2("wizard-bpe"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wizard-bpe") && e.contains("smollm") && e.contains("gpt2"),
            "{e}"
        );
        let mut v = toy_gpt2("smollm");
        v.model = "t5".into();
        let e = Tokenizer::from_gguf(&v).unwrap_err().to_string();
        assert!(e.contains("t5") && e.contains("llama"), "{e}");
        let mut v = toy_gpt2("smollm");
        v.merges.as_mut().unwrap().push("x yz".into());
        assert!(Tokenizer::from_gguf(&v).is_err());
    }

    #[test]
    fn other_bpe_pre_tokenizers_build() {
        for pre in ["default", "llama-bpe", "qwen2"] {
            let mut v = toy_gpt2(pre);
            v.add_bos = None;
            let t = Tokenizer::from_gguf(&v).unwrap();
            let s = "hello world 12345!!  \n\n x";
            assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s, "{pre}");
            assert_eq!(t.add_bos(), pre == "llama-bpe", "{pre}");
        }
        let mut v = toy_gpt2("default");
        v.pre = None;
        let t = Tokenizer::from_gguf(&v).unwrap();
        // llama.cpp's default: number runs, then groups of three digits.
        let ids = t.encode("12345").unwrap();
        assert_eq!(t.decode(&ids[..1]).unwrap(), "1");
        let pieces: Vec<String> = ids.iter().map(|&i| t.decode(&[i]).unwrap()).collect();
        assert_eq!(pieces.concat(), "12345");
        assert_eq!(pieces[..2], ["1", "2"]);
    }

    /// A hand-built SentencePiece vocabulary (see `spm_by_hand`).
    fn toy_spm() -> GgufVocab {
        let pieces: [(&str, f32, i32); 14] = [
            ("<unk>", 0.0, TOKEN_TYPE_UNKNOWN),
            ("<s>", 0.0, TOKEN_TYPE_CONTROL),
            ("</s>", 0.0, TOKEN_TYPE_CONTROL),
            ("<0x0A>", 0.0, TOKEN_TYPE_BYTE),
            ("<0xC3>", 0.0, TOKEN_TYPE_BYTE),
            ("<0xA9>", 0.0, TOKEN_TYPE_BYTE),
            ("▁", -1.0, TOKEN_TYPE_NORMAL),   // 6
            ("a", -2.0, TOKEN_TYPE_NORMAL),   // 7
            ("b", -3.0, TOKEN_TYPE_NORMAL),   // 8
            ("c", -4.0, TOKEN_TYPE_NORMAL),   // 9
            ("ab", -5.0, TOKEN_TYPE_NORMAL),  // 10
            ("bc", -1.5, TOKEN_TYPE_NORMAL),  // 11: outranks "ab" by score
            ("▁a", -6.0, TOKEN_TYPE_NORMAL),  // 12
            ("▁ab", -7.0, TOKEN_TYPE_NORMAL), // 13
        ];
        GgufVocab {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens: pieces.iter().map(|p| p.0.to_string()).collect(),
            scores: Some(pieces.iter().map(|p| p.1).collect()),
            token_types: Some(pieces.iter().map(|p| p.2).collect()),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn spm_by_hand() {
        let v = toy_spm();
        // Derived merges, best score first: bc (-1.5), ab (-5), ▁a (-6), then the two
        // splits of ▁ab (-7) ordered by the ids of their halves: (▁, ab), (▁a, b).
        let (texts, vocab) = vocab_map(&v).unwrap();
        let m = spm_merges(&texts, v.scores.as_deref(), &vocab);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            m,
            [("b", "c"), ("a", "b"), ("▁", "a"), ("▁", "ab"), ("▁a", "b")]
        );

        let t = Tokenizer::from_gguf(&v).unwrap();
        // "abc" → ▁ a b c: bc (best score) first, then ▁a; "abc" is no piece.
        assert_eq!(t.encode("abc").unwrap(), [12, 11]);
        // "ab c" → ▁ a b ▁ c: ab, then ▁ab; "▁c" is no piece.
        assert_eq!(t.encode("ab c").unwrap(), [13, 6, 9]);
        // Byte fallback for "é" and "\n"; a leading space gives two ▁.
        assert_eq!(t.encode("é").unwrap(), [6, 4, 5]);
        assert_eq!(t.encode("a\n").unwrap(), [12, 3]);
        assert_eq!(t.encode(" a").unwrap(), [6, 12]);
        // No byte token for "z": unknown, consecutive unknowns fused.
        assert_eq!(t.encode("zz").unwrap(), [6, 0]);
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
        for s in ["abc", "ab c", "é", "a\n", " a", "  ab  c é\n"] {
            assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
        }
        assert_eq!((t.bos(), t.eos(), t.add_bos()), (Some(1), Some(2), true));
        assert_eq!(t.vocab_size(), 14);
    }

    /// A few thousand characters of varied text: English, other scripts, emoji,
    /// digits and numerals, whitespace runs, newlines, contractions, punctuation
    /// runs, special-token text.
    fn varied_text(n: usize, seed: u64) -> String {
        let parts = [
            "The quick brown fox jumps over the lazy dog. ",
            "It's 3:45 p.m. on 2024-01-31; we'll pay $1,234.56 (about 7%). ",
            "café naïve façade — «quoted» “curly” ‘single’ ",
            "中文字符 日本語のテキスト 한국어 ",
            "Ελληνικά κείμενα, русский текст. ",
            "emoji 🎉🚀 👩‍👩‍👧 ",
            "²³ ½ Ⅻ ٣٤٥ ",
            "   ",
            "\t\t",
            "\n",
            "\n\n",
            "\r\n",
            " \n \n",
            "DON'T Won't I'M they'RE ",
            "!!!??? ... --- *** ",
            "<|im_start|>user\nHi<|im_end|>\n",
            "<|endoftext|>",
            "x1y22z333 ",
            "0123456789",
            "    indented code() { return 0; }\n",
        ];
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = String::new();
        while s.chars().count() < n {
            s.push_str(parts[rng.gen_range(0..parts.len())]);
        }
        s
    }

    #[test]
    fn save_and_reload_give_identical_ids() {
        let dir = tempfile::tempdir().unwrap();
        let text = varied_text(5000, 7);
        for (name, v) in [("smollm", toy_gpt2("smollm")), ("spm", toy_spm())] {
            let t = Tokenizer::from_gguf(&v).unwrap();
            let d = dir.path().join(name);
            t.save(&d).unwrap();
            let leftovers: Vec<_> = fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            let config: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(d.join("tokenizer_config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["add_bos_token"], t.add_bos());
            assert_eq!(
                config["bos_token"],
                t.inner().id_to_token(t.bos().unwrap()).unwrap()
            );
            let r = Tokenizer::from_file(&d.join("tokenizer.json")).unwrap();
            let r_dir = Tokenizer::from_file(&d).unwrap();
            assert_eq!(
                (r.bos(), r.eos(), r.add_bos(), r.vocab_size()),
                (t.bos(), t.eos(), t.add_bos(), t.vocab_size()),
                "{name}"
            );
            let ids = t.encode(&text).unwrap();
            assert_eq!(r.encode(&text).unwrap(), ids, "{name}");
            assert_eq!(r_dir.encode(&text).unwrap(), ids, "{name}");
            if name == "smollm" {
                // Byte-level BPE is lossless.
                assert_eq!(r.decode(&ids).unwrap(), text);
            }
        }
    }

    #[test]
    fn a_stray_huge_token_id_is_refused_without_a_huge_table() {
        // One id of four billion in tokenizer.json once sized a 32 GB table.
        let dir = tempfile::tempdir().unwrap();
        let t = Tokenizer::from_gguf(&toy_gpt2("smollm")).unwrap();
        t.save(dir.path()).unwrap();
        let path = dir.path().join("tokenizer.json");
        let mut j: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let vocab = j["model"]["vocab"].as_object_mut().unwrap();
        let last = vocab.keys().next_back().unwrap().clone();
        vocab.insert(last, serde_json::json!(4_000_000_000u32));
        fs::write(&path, j.to_string()).unwrap();
        // Without the saved GGUF record, the vocabulary is rebuilt from the ids.
        fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let r = Tokenizer::from_file(&path).unwrap();
        let e = r.to_gguf_vocab().unwrap_err().to_string();
        assert!(
            e.contains("token id 4000000000") && e.contains("without gaps"),
            "{e}"
        );
    }

    #[test]
    fn from_file_infers_add_bos_from_the_post_processor() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = toy_gpt2("llama-bpe");
        v.add_bos = None;
        let t = Tokenizer::from_gguf(&v).unwrap();
        assert!(t.add_bos());
        t.save(dir.path()).unwrap();
        // Without tokenizer_config.json: BOS from config.json, add_bos from the
        // post-processor that puts BOS first.
        fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let bos = t.bos().unwrap();
        fs::write(
            dir.path().join("config.json"),
            format!(
                "{{\"bos_token_id\": {bos}, \"eos_token_id\": [{}]}}",
                t.eos().unwrap()
            ),
        )
        .unwrap();
        let r = Tokenizer::from_file(dir.path()).unwrap();
        assert_eq!((r.bos(), r.eos(), r.add_bos()), (t.bos(), t.eos(), true));
        // encode never adds BOS itself.
        assert_eq!(r.encode("hello").unwrap(), [id_of(&r, "hello")]);
    }

    /// The real model's GGUF vocabulary; fails (never skips) without the file.
    fn real_vocab() -> GgufVocab {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let cache = env("COMPRESS_CACHE")
            .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("compress")))
            .or_else(|| env("HOME").map(|h| h.join(".cache").join("compress")))
            .expect("COMPRESS_CACHE or HOME is set");
        let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run `compress fetch` before the tests",
            path.display()
        );
        let g = crate::gguf::GgufFile::open(&path).unwrap();
        crate::checkpoint::gguf_vocab(&g).unwrap()
    }

    /// Reads `tokenizer_config.json` of `dir`.
    fn read_config(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap()
    }

    /// Drops the GGUF record from `tokenizer_config.json` of `dir`.
    fn drop_record(dir: &Path) {
        let mut c = read_config(dir);
        assert!(c.as_object_mut().unwrap().remove(GGUF_CONFIG_KEY).is_some());
        fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&c).unwrap(),
        )
        .unwrap();
    }

    /// Asserts two GGUF vocabularies are equal, naming the first field that differs.
    fn assert_same_vocab(got: &GgufVocab, want: &GgufVocab) {
        assert_eq!(got.model, want.model, "model");
        assert_eq!(got.pre, want.pre, "pre");
        assert_eq!(got.tokens.len(), want.tokens.len(), "number of tokens");
        assert!(got.tokens == want.tokens, "tokens differ");
        assert!(got.merges == want.merges, "merges differ");
        assert!(got.token_types == want.token_types, "token types differ");
        assert!(got.scores == want.scores, "scores differ");
        assert_eq!(
            (got.bos, got.eos, got.unk, got.pad),
            (want.bos, want.eos, want.unk, want.pad),
            "special ids"
        );
        assert_eq!(
            (got.add_bos, got.add_eos),
            (want.add_bos, want.add_eos),
            "add_bos/add_eos"
        );
        assert_eq!(got, want);
    }

    #[test]
    fn real_vocab_round_trips_through_tokenizer_json() {
        let v = real_vocab();
        assert_eq!(
            (v.model.as_str(), v.pre.as_deref()),
            ("gpt2", Some("smollm"))
        );
        let t = Tokenizer::from_gguf(&v).unwrap();
        assert_same_vocab(&t.to_gguf_vocab().unwrap(), &v);

        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        // tokenizer.json implies tokens, merges and types exactly: the record holds
        // only what it cannot.
        let config = read_config(dir.path());
        let record = config[GGUF_CONFIG_KEY].as_object().unwrap();
        let keys: Vec<&str> = record.keys().map(String::as_str).collect();
        for k in ["tokens", "merges", "token_type", "scores"] {
            assert!(!keys.contains(&k), "{k} recorded: {keys:?}");
        }
        assert_eq!(record["model"], "gpt2");
        assert_eq!(record["pre"], "smollm");

        let r = Tokenizer::from_file(dir.path()).unwrap();
        let exported = r.to_gguf_vocab().unwrap();
        assert_same_vocab(&exported, &v);

        let text = varied_text(6000, 11);
        let ids = t.encode(&text).unwrap();
        assert!(ids.len() > 1000, "{}", ids.len());
        let rebuilt = Tokenizer::from_gguf(&exported).unwrap();
        assert_eq!(rebuilt.encode(&text).unwrap(), ids);
        assert_eq!(r.encode(&text).unwrap(), ids);

        // Without the record: reconstructed from tokenizer.json and recognised.
        drop_record(dir.path());
        let r = Tokenizer::from_file(dir.path()).unwrap();
        let e = r.to_gguf_vocab().unwrap();
        assert_eq!(e.model, v.model);
        assert_eq!(e.pre, v.pre);
        assert!(e.tokens == v.tokens, "tokens differ");
        assert!(e.merges == v.merges, "merges differ");
        assert!(e.token_types == v.token_types, "token types differ");
        assert_eq!(e.scores, None);
        assert_eq!(
            (e.bos, e.eos, e.unk, e.pad, e.add_bos),
            (v.bos, v.eos, v.unk, v.pad, v.add_bos)
        );
        assert_eq!(e.add_eos, Some(false));
        assert_eq!(
            Tokenizer::from_gguf(&e).unwrap().encode(&text).unwrap(),
            ids
        );
    }

    #[test]
    fn spm_round_trips_through_tokenizer_json() {
        let v = toy_spm();
        let t = Tokenizer::from_gguf(&v).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let record = read_config(dir.path())[GGUF_CONFIG_KEY].clone();
        // Scores cannot be read from tokenizer.json; the token types can.
        assert!(record.get("scores").is_some(), "{record}");
        assert!(record.get("token_type").is_none(), "{record}");
        let r = Tokenizer::from_file(dir.path()).unwrap();
        let e = r.to_gguf_vocab().unwrap();
        assert_eq!(e.tokens, v.tokens);
        assert_eq!(e.scores, v.scores);
        assert_eq!(e.token_types, v.token_types);
        assert_same_vocab(&e, &v);

        // Reconstructed: same tokens and types, scores that give the same merges.
        let text = varied_text(3000, 5);
        let ids = t.encode(&text).unwrap();
        drop_record(dir.path());
        let e = Tokenizer::from_file(dir.path())
            .unwrap()
            .to_gguf_vocab()
            .unwrap();
        assert_eq!((e.model.as_str(), e.pre.as_deref()), ("llama", None));
        assert_eq!(e.tokens, v.tokens);
        assert_eq!(e.token_types, v.token_types);
        assert_eq!(e.merges, None);
        assert_eq!((e.bos, e.eos, e.unk), (v.bos, v.eos, v.unk));
        assert_eq!(
            Tokenizer::from_gguf(&e).unwrap().encode(&text).unwrap(),
            ids
        );
    }

    #[test]
    fn record_keeps_what_tokenizer_json_cannot() {
        // Duplicate merge, an empty token, a byte type, NaN/inf scores, absent ids.
        let mut v = toy_gpt2("gpt-2");
        v.merges.as_mut().unwrap().push("h e".into());
        let n = v.tokens.len();
        v.tokens.push(String::new());
        v.token_types.as_mut().unwrap().push(TOKEN_TYPE_UNUSED);
        v.token_types.as_mut().unwrap()[0] = TOKEN_TYPE_BYTE;
        let mut scores = vec![0.5f32; n + 1];
        scores[1] = f32::INFINITY;
        scores[2] = f32::NEG_INFINITY;
        scores[3] = 0.1;
        scores[4] = -0.0;
        v.scores = Some(scores);
        v.add_eos = None;
        let t = Tokenizer::from_gguf(&v).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let record = read_config(dir.path())[GGUF_CONFIG_KEY].clone();
        for k in ["tokens", "merges", "token_type", "scores"] {
            assert!(record.get(k).is_some(), "{k} not recorded: {record}");
        }
        let e = Tokenizer::from_file(dir.path())
            .unwrap()
            .to_gguf_vocab()
            .unwrap();
        assert_same_vocab(&e, &v);
        assert!(e.scores.as_ref().unwrap()[4].is_sign_negative());

        // A stale record (tokens removed from tokenizer.json's view) is an error.
        let mut c = read_config(dir.path());
        c[GGUF_CONFIG_KEY]["token_type"] = json!([1, 1]);
        fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&c).unwrap(),
        )
        .unwrap();
        let e = Tokenizer::from_file(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("token_type"), "{e:#}");
    }

    #[test]
    fn foreign_pre_tokenizers_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        for (pre, want) in [
            ("smollm", "smollm"),
            ("starcoder", "smollm"),
            ("gpt-2", "gpt-2"),
            ("llama-bpe", "llama-bpe"),
            ("llama3", "llama-bpe"),
            ("qwen2", "qwen2"),
            ("default", "default"),
        ] {
            let t = Tokenizer::from_gguf(&toy_gpt2(pre)).unwrap();
            let d = dir.path().join(pre);
            t.save(&d).unwrap();
            drop_record(&d);
            let e = Tokenizer::from_file(&d).unwrap().to_gguf_vocab().unwrap();
            assert_eq!(e.pre.as_deref(), Some(want), "{pre}");
            assert_eq!(e.tokens, toy_gpt2(pre).tokens, "{pre}");
        }

        // HF's own layout: merges as "a b" strings, a ByteLevel post-processor, no
        // tokenizer_config.json (ids from config.json).
        let d = dir.path().join("smollm");
        let path = d.join("tokenizer.json");
        let mut j: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let merges: Vec<String> = j["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()))
            .collect();
        j["model"]["merges"] = json!(merges);
        j["post_processor"] = json!({"type": "ByteLevel", "add_prefix_space": true,
            "trim_offsets": false, "use_regex": true});
        fs::write(&path, j.to_string()).unwrap();
        fs::remove_file(d.join("tokenizer_config.json")).unwrap();
        let v = toy_gpt2("smollm");
        fs::write(
            d.join("config.json"),
            format!(
                "{{\"bos_token_id\": {}, \"eos_token_id\": {}}}",
                v.bos.unwrap(),
                v.eos.unwrap()
            ),
        )
        .unwrap();
        let e = Tokenizer::from_file(&d).unwrap().to_gguf_vocab().unwrap();
        assert_eq!(e.pre.as_deref(), Some("smollm"));
        assert_eq!((&e.tokens, &e.merges), (&v.tokens, &v.merges));
        assert_eq!(e.token_types, v.token_types);
        assert_eq!((e.bos, e.eos, e.add_bos), (v.bos, v.eos, Some(false)));

        // Unrecognised pre-tokenizers are errors that show what was found.
        for (pt, shown) in [
            (json!({"type": "Whitespace"}), "Whitespace"),
            (
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                       "use_regex": true}),
                "\"add_prefix_space\":true",
            ),
        ] {
            j["pre_tokenizer"] = pt;
            fs::write(&path, j.to_string()).unwrap();
            let e = Tokenizer::from_file(&d)
                .unwrap()
                .to_gguf_vocab()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("unrecognised pre-tokenizer") && e.contains(shown),
                "{e}"
            );
        }
    }
}
