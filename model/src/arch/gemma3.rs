//! `gemma3`: Gemma 3 text models (`Gemma3ForCausalLM`, `gemma3_text`: 270M,
//! 1B). Embeddings scaled by √hidden; RMSNorm as `(1 + w)` in HF (the GGUF and
//! our tensors hold the gain `1 + w`); norms before and after both attention
//! and the MLP; a GELU-tanh gated MLP; per-head q/k norms; scores scaled by
//! `query_pre_attn_scalar^−½`; sliding-window layers (five to one global by
//! default, `layer_types` / `sliding_window_pattern`) with their own unscaled
//! RoPE base (`rope_local_base_freq`), global layers with `rope_theta` and the
//! rope scaling. Tied head, a 262k vocabulary.
//!
//! GGUF as llama.cpp reads it: a window iff `gemma3.attention.sliding_window`,
//! the layer pattern from `gemma3.attention.sliding_window_pattern` (written
//! only when it is not the default; llama.cpp assumes period 6), the local
//! base from `gemma3.rope.freq_base_swa` (required here: llama.cpp's silent
//! default of 10000 is not assumed), and scores scaled by `1/√head_dim`
//! (`1/√(hidden/heads)` for the 62-layer 27B): llama.cpp never reads
//! `query_pre_attn_scalar`, which equals that for every released Gemma 3.
//!
//! The multimodal checkpoints (4B and up, `gemma3`, `language_model.` tensors)
//! are not read.

use super::{
    block_spec, hf_layer_types, hf_sets_rope_theta, hf_sliding_layers, hf_window, Arch, Dim, Role,
    Slot, TensorSpec, LLAMA_FOLDS, LLAMA_GLOBALS, PER_HEAD_QK_NORMS,
};
use crate::config::{Activation, LayerType, ModelConfig, RopeScaling};
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 13] = [
    block_spec(
        "attn_norm.weight",
        "input_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::AttnNorm,
    ),
    block_spec(
        "attn_q.weight",
        "self_attn.q_proj.weight",
        Role::Linear,
        &[Dim::QDim, Dim::Hidden],
        Slot::Q,
    ),
    block_spec(
        "attn_k.weight",
        "self_attn.k_proj.weight",
        Role::Linear,
        &[Dim::KvDim, Dim::Hidden],
        Slot::K,
    ),
    block_spec(
        "attn_v.weight",
        "self_attn.v_proj.weight",
        Role::Linear,
        &[Dim::KvDim, Dim::Hidden],
        Slot::V,
    ),
    PER_HEAD_QK_NORMS[0],
    PER_HEAD_QK_NORMS[1],
    block_spec(
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Role::Linear,
        &[Dim::Hidden, Dim::QDim],
        Slot::O,
    ),
    block_spec(
        "post_attention_norm.weight",
        "post_attention_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::AttnPostNorm,
    ),
    block_spec(
        "ffn_norm.weight",
        "pre_feedforward_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::FfnNorm,
    ),
    block_spec(
        "ffn_gate.weight",
        "mlp.gate_proj.weight",
        Role::Linear,
        &[Dim::Ffn, Dim::Hidden],
        Slot::Gate,
    ),
    block_spec(
        "ffn_up.weight",
        "mlp.up_proj.weight",
        Role::Linear,
        &[Dim::Ffn, Dim::Hidden],
        Slot::Up,
    ),
    block_spec(
        "ffn_down.weight",
        "mlp.down_proj.weight",
        Role::Linear,
        &[Dim::Hidden, Dim::Ffn],
        Slot::Down,
    ),
    block_spec(
        "post_ffw_norm.weight",
        "post_feedforward_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::FfnPostNorm,
    ),
];

/// transformers' `Gemma3TextConfig` defaults.
const DEFAULT_THETA: f64 = 1_000_000.0;
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;
const DEFAULT_WINDOW: usize = 4096;
const DEFAULT_PATTERN: usize = 6;
const DEFAULT_QUERY_SCALAR: f64 = 256.0;

/// Sliding iff `(l + 1) % period != 0`: transformers' `sliding_window_pattern`
/// and llama.cpp's period (layer l slides iff `l % period < period − 1`).
fn periodic(n_layers: usize, period: usize) -> Vec<bool> {
    (0..n_layers)
        .map(|l| !(l + 1).is_multiple_of(period))
        .collect()
}

/// The query scalar llama.cpp's gemma3 graph uses: `head_dim`, or
/// `hidden / heads` for the 62-layer 27B.
fn llama_cpp_query_scalar(c: &ModelConfig) -> f64 {
    if c.num_hidden_layers == 62 {
        (c.hidden_size / c.num_attention_heads) as f64
    } else {
        c.head_dim as f64
    }
}

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    let n = c.num_hidden_layers;
    if ["hidden_activation", "hidden_act"]
        .iter()
        .all(|k| v.get(k).is_none_or(Value::is_null))
    {
        c.hidden_act = Activation::GeluTanh;
    }
    if v.get("use_bidirectional_attention")
        .and_then(Value::as_bool)
        == Some(true)
    {
        bail!("use_bidirectional_attention is true (EmbeddingGemma): only causal Gemma 3 is supported");
    }
    // transformers 5: one RoPE setting per layer kind; 4: rope_theta and
    // rope_scaling for the global layers, rope_local_base_freq for the sliding.
    let per_kind = v
        .get("rope_parameters")
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let local_theta = match per_kind {
        Some(p) => {
            let theta_of = |kind: &str, default: f64| -> Result<f64> {
                match p.get(kind).and_then(|k| k.get("rope_theta")) {
                    None | Some(Value::Null) => Ok(default),
                    Some(t) => t.as_f64().with_context(|| {
                        format!(
                            "field 'rope_parameters.{kind}.rope_theta' is {t}, expected a number"
                        )
                    }),
                }
            };
            c.rope_theta = theta_of("full_attention", DEFAULT_THETA)?;
            c.rope_scaling = match p.get("full_attention") {
                Some(full) => {
                    RopeScaling::from_hf(full).context("field 'rope_parameters.full_attention'")?
                }
                None => None,
            };
            if let Some(s) = p.get("sliding_attention") {
                if RopeScaling::from_hf(s)
                    .context("field 'rope_parameters.sliding_attention'")?
                    .is_some()
                {
                    bail!(
                        "field 'rope_parameters.sliding_attention' scales the sliding layers' RoPE, which \
                         llama.cpp and transformers 4 cannot express: not supported"
                    );
                }
            }
            theta_of("sliding_attention", DEFAULT_LOCAL_THETA)?
        }
        None => {
            if !hf_sets_rope_theta(v) {
                c.rope_theta = DEFAULT_THETA;
            }
            match v.get("rope_local_base_freq") {
                None | Some(Value::Null) => DEFAULT_LOCAL_THETA,
                Some(t) => t.as_f64().with_context(|| {
                    format!("field 'rope_local_base_freq' is {t}, expected a number")
                })?,
            }
        }
    };
    let window = match v.get("sliding_window") {
        None => Some(DEFAULT_WINDOW),
        Some(_) => hf_window(v)?,
    };
    let sliding = match hf_sliding_layers(v, n)? {
        Some(s) => s,
        None => {
            let period = match v.get("sliding_window_pattern") {
                None | Some(Value::Null) => DEFAULT_PATTERN,
                Some(p) => match p.as_u64() {
                    Some(p) if p > 0 => p as usize,
                    _ => {
                        bail!("field 'sliding_window_pattern' is {p}, expected a positive integer")
                    }
                },
            };
            periodic(n, period)
        }
    };
    c.sliding_window = if sliding.iter().any(|&s| s) {
        Some(
            window
                .context("field 'layer_types' has sliding layers but 'sliding_window' is null")?,
        )
    } else {
        None
    };
    c.layer_types = sliding
        .into_iter()
        .map(|sliding| LayerType {
            sliding,
            rope: true,
        })
        .collect();
    c.rope_local_theta = Some(local_theta);
    c.query_pre_attn_scalar = Some(match v.get("query_pre_attn_scalar") {
        None | Some(Value::Null) => DEFAULT_QUERY_SCALAR,
        Some(s) => s
            .as_f64()
            .with_context(|| format!("field 'query_pre_attn_scalar' is {s}, expected a number"))?,
    });
    if v.get("tie_word_embeddings").is_none() {
        c.tie_word_embeddings = true;
    }
    Ok(())
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    // transformers 5 types the field as an integer and refuses `256.0`.
    let scalar = c.query_pre_attn_scalar.map(|s| {
        if s.fract() == 0.0 && s.abs() < 1e15 {
            json!(s as i64)
        } else {
            json!(s)
        }
    });
    let v = json!({
        "hidden_activation": c.hidden_act.hf_name(),
        "query_pre_attn_scalar": scalar,
        "rope_local_base_freq": c.rope_local_theta.unwrap_or(c.rope_theta),
        "sliding_window": c.sliding_window,
        "layer_types": hf_layer_types(c),
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "attention_bias": false,
        "use_bidirectional_attention": false,
    });
    v.as_object().cloned().unwrap_or_default()
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    let n = c.num_hidden_layers;
    let key = |k: &str| format!("gemma3.{k}");
    c.hidden_act = Activation::GeluTanh;
    c.query_pre_attn_scalar = Some(llama_cpp_query_scalar(c));
    let window = match g.get(&key("attention.sliding_window")) {
        None => 0,
        Some(_) => g.require_u64(&key("attention.sliding_window"))? as usize,
    };
    if window == 0 {
        return Ok(());
    }
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding = match g.get(&pattern_key) {
        None => periodic(n, DEFAULT_PATTERN),
        Some(MetaValue::Array(_, items)) => {
            if items.len() != n {
                bail!(
                    "metadata '{pattern_key}' lists {} layers but gemma3.block_count is {n}",
                    items.len()
                );
            }
            items
                .iter()
                .map(|b| {
                    b.as_bool().with_context(|| {
                        format!("metadata '{pattern_key}' holds {b}, expected true or false")
                    })
                })
                .collect::<Result<_>>()?
        }
        Some(p) => match p.as_u64() {
            // llama.cpp: period 0 makes every layer slide.
            Some(0) => vec![true; n],
            Some(p) => periodic(n, p as usize),
            None => {
                bail!("metadata '{pattern_key}' is {p}, expected a period or one flag per layer")
            }
        },
    };
    let base_key = key("rope.freq_base_swa");
    if g.get(&base_key).is_none() {
        bail!(
            "metadata '{base_key}' (the sliding layers' RoPE base) is missing; llama.cpp would assume \
             10000, which is right for released Gemma 3 only"
        );
    }
    c.rope_local_theta = Some(g.require_f64(&base_key)?);
    c.sliding_window = Some(window);
    c.layer_types = sliding
        .into_iter()
        .map(|sliding| LayerType {
            sliding,
            rope: true,
        })
        .collect();
    Ok(())
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    let mut kv = Vec::new();
    if let Some(w) = c.sliding_window {
        kv.push((
            "gemma3.attention.sliding_window".to_owned(),
            MetaValue::U32(w as u32),
        ));
        let sliding: Vec<bool> = c.layer_types.iter().map(|t| t.sliding).collect();
        if sliding != periodic(c.num_hidden_layers, DEFAULT_PATTERN) {
            kv.push((
                "gemma3.attention.sliding_window_pattern".to_owned(),
                MetaValue::Array(7, sliding.into_iter().map(MetaValue::Bool).collect()),
            ));
        }
    }
    kv.push((
        "gemma3.rope.freq_base_swa".to_owned(),
        MetaValue::F32(c.rope_local_theta.unwrap_or(c.rope_theta) as f32),
    ));
    kv
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    let ours = c.query_pre_attn_scalar.unwrap_or(c.head_dim as f64);
    let theirs = llama_cpp_query_scalar(c);
    (ours != theirs).then(|| {
        format!(
            "this Gemma 3 scales attention scores by 1/√{ours} (query_pre_attn_scalar); llama.cpp \
             scales a gemma3 GGUF's by 1/√{theirs}, so it computes a different model"
        )
    })
}

/// The `gemma3` architecture.
pub static GEMMA3: Arch = Arch {
    name: "gemma3",
    gguf_name: "gemma3",
    gguf_claims: None,
    hf_model_types: &["gemma3_text"],
    hf_class: "Gemma3ForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: false,
    hf_extra,
    scale_folds: LLAMA_FOLDS,
    hf_norm_offset: 1.0,
    scales_embedding: true,
    read_hf,
    read_gguf,
    gguf_extra,
    gguf_caveat,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Result<ModelConfig> {
        let mut v = json!({"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16,
                           "intermediate_size": 32, "num_hidden_layers": 7,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_hf_json(&v)
    }

    #[test]
    fn transformers_defaults_and_both_layouts() {
        let c = config(json!({})).unwrap();
        let sliding: Vec<bool> = c.layer_types.iter().map(|t| t.sliding).collect();
        assert_eq!(sliding, [true, true, true, true, true, false, true]);
        assert_eq!(c.sliding_window, Some(DEFAULT_WINDOW));
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(c.attention_scale(), 1.0 / 16.0);
        assert_eq!(c.embedding_scale(), Some(4.0));
        assert!(c.tie_word_embeddings);
        // Sliding layers take the local base, unscaled; global ones the scaled global base.
        let v5 = config(json!({"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}))
        .unwrap();
        let v4 = config(json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}}))
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(
            v5.layer_rope_frequencies(0).unwrap()[1],
            1e4f64.powf(-2.0 / 8.0)
        );
        assert_eq!(
            v5.layer_rope_frequencies(5).unwrap()[1],
            1e6f64.powf(-2.0 / 8.0) / 8.0
        );
        let written = v5.to_hf_json("float32").unwrap();
        assert!(written["query_pre_attn_scalar"].is_u64(), "{written}");
        let back = ModelConfig::from_hf_json(&written).unwrap();
        assert_eq!(back, v5);
        // Another pattern is written to GGUF; llama.cpp's default is not.
        assert_eq!(gguf_extra(&v5).len(), 2);
        let odd = config(json!({"sliding_window_pattern": 2})).unwrap();
        assert_eq!(gguf_extra(&odd).len(), 3);
        assert!(gguf_caveat(&odd).is_some_and(|s| s.contains("1/√256")));
    }

    #[test]
    fn bad_configs_name_their_field() {
        let err = |x: Value| format!("{:#}", config(x).unwrap_err());
        let e = err(json!({"layer_types": ["sliding_attention", "full_attention"]}));
        assert!(
            e.contains("'layer_types' lists 2 layers but num_hidden_layers is 7"),
            "{e}"
        );
        let e = err(json!({"sliding_window": 0}));
        assert!(e.contains("'sliding_window' is 0"), "{e}");
        let e = err(json!({"final_logit_softcapping": 30.0}));
        assert!(e.contains("final_logit_softcapping"), "{e}");
        let e = err(json!({"rope_parameters": {
            "full_attention": {"rope_type": "default"},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}));
        assert!(e.contains("rope_parameters.sliding_attention"), "{e}");
        let e = err(json!({"use_bidirectional_attention": true}));
        assert!(e.contains("use_bidirectional_attention"), "{e}");
    }
}
