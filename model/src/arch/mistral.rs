//! `mistral`: Mistral and its fine-tunes. A Llama block whose every layer may
//! attend through a sliding window (`sliding_window`: Mistral 7B v0.1 sets
//! 4096; v0.2+, Nemo and Small set none). transformers gives a config without
//! the key a 4096 window (its default); an explicit `null` means none.
//!
//! llama.cpp's converter writes Mistral as a `llama` GGUF and drops the window,
//! and llama.cpp's `llama` graph has no window at all: a GGUF of a Mistral is
//! full causal attention, identical to the HF model for contexts up to the
//! window and different beyond. So this family is written to GGUF as `llama`
//! (with a note when the window is lost) and a `llama` GGUF is read as
//! [`super::LLAMA`], never as this.

use super::{
    hf_window, no_extra_keys, no_gguf_keys, Arch, LLAMA_BLOCK, LLAMA_FOLDS, LLAMA_GLOBALS,
};
use crate::config::{LayerType, ModelConfig};
use crate::gguf::GgufFile;
use anyhow::Result;
use serde_json::{json, Map, Value};

/// transformers' `MistralConfig.sliding_window` default.
const DEFAULT_WINDOW: usize = 4096;

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    let window = match v.get("sliding_window") {
        None => Some(DEFAULT_WINDOW),
        Some(_) => hf_window(v)?,
    };
    c.sliding_window = window;
    c.layer_types = vec![
        LayerType {
            sliding: window.is_some(),
            rope: true,
        };
        c.num_hidden_layers
    ];
    Ok(())
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let v = json!({"sliding_window": c.sliding_window, "attention_bias": false});
    v.as_object().cloned().unwrap_or_default()
}

fn never(_: &GgufFile) -> bool {
    false
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    c.sliding_window.map(|w| {
        format!(
            "this Mistral attends through a sliding window of {w} positions, which a GGUF cannot carry: \
             llama.cpp reads it as 'llama' with full attention (the same for contexts up to {w} tokens)"
        )
    })
}

/// The `mistral` architecture.
pub static MISTRAL: Arch = Arch {
    name: "mistral",
    gguf_name: "llama",
    gguf_claims: Some(never),
    hf_model_types: &["mistral"],
    hf_class: "MistralForCausalLM",
    block: &LLAMA_BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: true,
    hf_extra,
    scale_folds: LLAMA_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf,
    read_gguf: no_gguf_keys,
    gguf_extra: no_extra_keys,
    gguf_caveat,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: Option<Value>) -> Result<ModelConfig> {
        let mut v = json!({"model_type": "mistral", "vocab_size": 32, "hidden_size": 16,
                           "intermediate_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 1});
        if let Some(w) = window {
            v["sliding_window"] = w;
        }
        ModelConfig::from_hf_json(&v)
    }

    #[test]
    fn the_window_is_read_as_transformers_reads_it() {
        // No key: transformers' default window; null: none.
        let c = config(None).unwrap();
        assert_eq!(c.arch, &MISTRAL);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.layer_window(1), Some(4096));
        let c = config(Some(Value::Null)).unwrap();
        assert_eq!((c.sliding_window, c.layer_window(0)), (None, None));
        let c = config(Some(json!(8))).unwrap();
        assert!(c.layer_types.iter().all(|t| t.sliding && t.rope));
        let back = ModelConfig::from_hf_json(&c.to_hf_json("float32").unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            c.to_hf_json("float32").unwrap()["architectures"][0],
            "MistralForCausalLM"
        );
        assert!(gguf_caveat(&c).is_some_and(|s| s.contains("window of 8")));
        let err = format!("{:#}", config(Some(json!(0))).unwrap_err());
        assert!(err.contains("'sliding_window' is 0"), "{err}");
    }
}
