//! `smollm3`: SmolLM3. A Llama block (grouped-query attention, SwiGLU, tied
//! head by default) where some layers use no positional encoding at all: layer
//! l rotates its queries and keys iff `no_rope_layers[l] == 1`, which defaults
//! to every fourth layer being NoPE (`no_rope_layer_interval`, 4). A sliding
//! window is possible in transformers (`use_sliding_window`, on the NoPE layers
//! by default) and unused by SmolLM3 itself.
//!
//! GGUF (`smollm3`): llama's tensor names with Q/K permuted for interleaved
//! RoPE, and nothing about NoPE: llama.cpp hard-codes every fourth layer as
//! NoPE and has no window, so that is what a GGUF means.

use super::{
    hf_layer_types, hf_sets_rope_theta, hf_sliding_layers, hf_window, no_extra_keys, Arch,
    LLAMA_BLOCK, LLAMA_FOLDS, LLAMA_GLOBALS,
};
use crate::config::{LayerType, ModelConfig};
use crate::gguf::GgufFile;
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

/// Every `NOPE_INTERVAL`-th layer has no RoPE: transformers' default interval and
/// llama.cpp's fixed one.
const NOPE_INTERVAL: usize = 4;

/// transformers' `SmolLM3Config` RoPE base default.
const DEFAULT_THETA: f64 = 2_000_000.0;

/// Whether layer `l` has RoPE under a NoPE interval.
fn rope_at(l: usize, interval: usize) -> bool {
    !(l + 1).is_multiple_of(interval)
}

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    let n = c.num_hidden_layers;
    let rope: Vec<bool> = match v.get("no_rope_layers") {
        None | Some(Value::Null) => {
            let interval = match v.get("no_rope_layer_interval") {
                None | Some(Value::Null) => NOPE_INTERVAL,
                Some(i) => match i.as_u64() {
                    Some(i) if i > 0 => i as usize,
                    _ => {
                        bail!("field 'no_rope_layer_interval' is {i}, expected a positive integer")
                    }
                },
            };
            (0..n).map(|l| rope_at(l, interval)).collect()
        }
        Some(Value::Array(a)) => {
            if a.len() != n {
                bail!(
                    "field 'no_rope_layers' lists {} layers but num_hidden_layers is {n}",
                    a.len()
                );
            }
            a.iter()
                .enumerate()
                .map(|(l, x)| match x.as_u64() {
                    Some(1) => Ok(true),
                    Some(0) => Ok(false),
                    _ => bail!(
                        "field 'no_rope_layers' entry {l} is {x}, expected 0 (NoPE) or 1 (RoPE)"
                    ),
                })
                .collect::<Result<_>>()?
        }
        Some(other) => bail!("field 'no_rope_layers' is {other}, expected a list"),
    };
    let window = hf_window(v)?;
    let use_window = v
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // transformers derives the window layers from NoPE when the config lists none.
    let sliding = match hf_sliding_layers(v, n)? {
        Some(s) => s,
        None => rope
            .iter()
            .map(|&r| use_window && window.is_some() && !r)
            .collect(),
    };
    if sliding.iter().any(|&s| s) {
        c.sliding_window = Some(window.ok_or_else(|| {
            anyhow::anyhow!(
                "field 'layer_types' has sliding layers but 'sliding_window' is not set"
            )
        })?);
    }
    c.layer_types = rope
        .iter()
        .zip(&sliding)
        .map(|(&rope, &sliding)| LayerType { sliding, rope })
        .collect();
    if !hf_sets_rope_theta(v) {
        c.rope_theta = DEFAULT_THETA;
    }
    if v.get("tie_word_embeddings").is_none() {
        c.tie_word_embeddings = true;
    }
    Ok(())
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let no_rope: Vec<u8> = c.layer_types.iter().map(|t| t.rope as u8).collect();
    let v = json!({
        "no_rope_layers": no_rope,
        "no_rope_layer_interval": NOPE_INTERVAL,
        "use_sliding_window": c.sliding_window.is_some(),
        "sliding_window": c.sliding_window,
        "layer_types": hf_layer_types(c),
        "attention_bias": false,
        "mlp_bias": false,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// llama.cpp's reading: NoPE on every fourth layer, no window.
fn read_gguf(_: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    c.layer_types = (0..c.num_hidden_layers)
        .map(|l| LayerType {
            sliding: false,
            rope: rope_at(l, NOPE_INTERVAL),
        })
        .collect();
    Ok(())
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    let fixed =
        (0..c.num_hidden_layers).all(|l| c.layer_types[l].rope == rope_at(l, NOPE_INTERVAL));
    let mut said = Vec::new();
    if !fixed {
        said.push(format!(
            "llama.cpp puts NoPE on every {NOPE_INTERVAL}th layer whatever the config says, and this \
             model's NoPE layers are elsewhere"
        ));
    }
    if let Some(w) = c.sliding_window {
        said.push(format!(
            "llama.cpp has no sliding window for smollm3, and this model slides over {w} positions"
        ));
    }
    (!said.is_empty()).then(|| said.join("; "))
}

/// The `smollm3` architecture.
pub static SMOLLM3: Arch = Arch {
    name: "smollm3",
    gguf_name: "smollm3",
    gguf_claims: None,
    hf_model_types: &["smollm3"],
    hf_class: "SmolLM3ForCausalLM",
    block: &LLAMA_BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: true,
    hf_extra,
    scale_folds: LLAMA_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf,
    read_gguf,
    gguf_extra: no_extra_keys,
    gguf_caveat,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Result<ModelConfig> {
        let mut v = json!({"model_type": "smollm3", "vocab_size": 32, "hidden_size": 16,
                           "intermediate_size": 32, "num_hidden_layers": 8,
                           "num_attention_heads": 2, "num_key_value_heads": 1});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_hf_json(&v)
    }

    #[test]
    fn nope_layers_come_from_the_list_or_the_interval() {
        let c = config(json!({})).unwrap();
        let rope: Vec<bool> = c.layer_types.iter().map(|t| t.rope).collect();
        assert_eq!(rope, [true, true, true, false, true, true, true, false]);
        assert_eq!(c.layer_rope_frequencies(3), None);
        assert!(c.layer_rope_frequencies(2).is_some());
        assert_eq!((c.rope_theta, c.tie_word_embeddings), (DEFAULT_THETA, true));
        assert_eq!(gguf_caveat(&c), None);
        let c = config(json!({"no_rope_layer_interval": 2})).unwrap();
        assert!(!c.layer_types[1].rope && c.layer_types[2].rope);
        assert!(gguf_caveat(&c).is_some_and(|s| s.contains("NoPE")));
        let c = config(json!({"no_rope_layers": [0, 1, 1, 1, 1, 1, 1, 1],
                              "use_sliding_window": true, "sliding_window": 16}))
        .unwrap();
        assert!(!c.layer_types[0].rope && c.layer_types[0].sliding);
        assert!(!c.layer_types[1].sliding);
        assert_eq!(c.layer_window(0), Some(16));
        let back = ModelConfig::from_hf_json(&c.to_hf_json("float32").unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_layer_lists_name_their_field() {
        let err = |x: Value| format!("{:#}", config(x).unwrap_err());
        let e = err(json!({"no_rope_layers": [1, 1, 0]}));
        assert!(
            e.contains("'no_rope_layers' lists 3 layers but num_hidden_layers is 8"),
            "{e}"
        );
        let e = err(json!({"layer_types": ["full_attention"]}));
        assert!(e.contains("'layer_types' lists 1 layers"), "{e}");
        let e = err(json!({"use_sliding_window": true, "sliding_window": 0}));
        assert!(e.contains("'sliding_window' is 0"), "{e}");
        let e = err(json!({"no_rope_layer_interval": 0}));
        assert!(e.contains("no_rope_layer_interval"), "{e}");
    }
}
