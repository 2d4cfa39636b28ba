//! The Llama-family hyperparameters, read from GGUF metadata or HF `config.json`
//! and written back as an HF `config.json`.

use crate::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Hyperparameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Training context length.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Reads the `llama.*` hyperparameters of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g
            .require("general.architecture")?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if arch != "llama" {
            bail!(
                "{}: general.architecture is '{arch}', only 'llama' is supported",
                g.path().display()
            );
        }
        let key = |k: &str| format!("llama.{k}");
        let n_heads = g.require_u64(&key("attention.head_count"))? as usize;
        let hidden = g.require_u64(&key("embedding_length"))? as usize;
        let n_kv = match g.get(&key("attention.head_count_kv")) {
            Some(_) => g.require_u64(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        };
        let head_dim = match g.get(&key("attention.key_length")) {
            Some(_) => g.require_u64(&key("attention.key_length"))? as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let vocab_size = match g.get(&key("vocab_size")) {
            Some(_) => g.require_u64(&key("vocab_size"))? as usize,
            None => g
                .tensor("token_embd.weight")
                .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                .unwrap_or(0),
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            Ok(match g.get(k) {
                Some(_) => Some(g.require_u64(k)? as u32),
                None => None,
            })
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: g.require_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: g.require_u64(&key("block_count"))? as usize,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: g.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: match g.get(&key("rope.freq_base")) {
                Some(_) => g.require_f64(&key("rope.freq_base"))?,
                None => 10000.0,
            },
            max_position_embeddings: g.require_u64(&key("context_length"))? as usize,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
        };
        cfg.validate().with_context(|| {
            format!("{}: inconsistent llama hyperparameters", g.path().display())
        })?;
        Ok(cfg)
    }

    /// Reads an HF `config.json` of a `LlamaForCausalLM` (or compatible) model.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let v: Value = crate::io::read_json(path)?;
        Self::from_hf_json(&v).with_context(|| format!("{}: bad model config", path.display()))
    }

    /// Reads the hyperparameters from a parsed HF config.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if !matches!(mt, "llama" | "mistral") {
                bail!("model_type is '{mt}', only 'llama' is supported");
            }
        }
        if let Some(rs) = v.get("rope_scaling") {
            if !rs.is_null() {
                bail!("rope_scaling {rs} is not supported");
            }
        }
        let req = |k: &str| -> Result<u64> {
            match v.get(k) {
                None => bail!("field '{k}' is missing"),
                Some(x) => x.as_u64().ok_or_else(|| {
                    anyhow::anyhow!("field '{k}' is {x}, expected a non-negative integer")
                }),
            }
        };
        let opt_u64 = |k: &str| -> Result<Option<u64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                    anyhow::anyhow!("field '{k}' is {x}, expected a non-negative integer")
                }),
            }
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow::anyhow!("field '{k}' is {x}, expected a number")),
            }
        };
        // eos_token_id may be a list in newer configs; the first entry is the one.
        let eos = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            _ => opt_u64("eos_token_id")?,
        };
        let hidden = req("hidden_size")? as usize;
        let n_heads = req("num_attention_heads")? as usize;
        let cfg = LlamaConfig {
            vocab_size: req("vocab_size")? as usize,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")? as usize,
            num_hidden_layers: req("num_hidden_layers")? as usize,
            num_attention_heads: n_heads,
            num_key_value_heads: opt_u64("num_key_value_heads")?.map_or(n_heads, |x| x as usize),
            head_dim: opt_u64("head_dim")?
                .map(|x| x as usize)
                .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10000.0),
            max_position_embeddings: opt_u64("max_position_embeddings")?.unwrap_or(2048) as usize,
            tie_word_embeddings: match v.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(x) => x.as_bool().ok_or_else(|| {
                    anyhow::anyhow!("field 'tie_word_embeddings' is {x}, expected true or false")
                })?,
            },
            bos_token_id: opt_u64("bos_token_id")?.map(|x| x as u32),
            eos_token_id: eos.map(|x| x as u32),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shapes implied by the hyperparameters are consistent.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.hidden_size > 0, "hidden_size must be positive"),
            (
                self.intermediate_size > 0,
                "intermediate_size must be positive",
            ),
            (
                self.num_hidden_layers > 0,
                "num_hidden_layers must be positive",
            ),
            (
                self.num_attention_heads > 0,
                "num_attention_heads must be positive",
            ),
            (
                self.num_key_value_heads > 0,
                "num_key_value_heads must be positive",
            ),
            (
                self.head_dim > 0 && self.head_dim.is_multiple_of(2),
                "head_dim must be positive and even",
            ),
            (
                self.num_key_value_heads <= self.num_attention_heads
                    && self
                        .num_attention_heads
                        .is_multiple_of(self.num_key_value_heads),
                "num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (self.rms_norm_eps > 0.0, "rms_norm_eps must be positive"),
            (self.rope_theta > 0.0, "rope_theta must be positive"),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{msg} ({self:?})");
            }
        }
        Ok(())
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key/value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The HF `config.json` of this model as a `LlamaForCausalLM`.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": torch_dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Value {
        json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
               "max_position_embeddings": 8192, "tie_word_embeddings": true,
               "bos_token_id": 1, "eos_token_id": 2})
    }

    #[test]
    fn hf_json_round_trips() {
        let c = LlamaConfig::from_hf_json(&smol()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.kv_dim(), 192);
        let back = LlamaConfig::from_hf_json(&c.to_hf_json("float32")).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = smol();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let err = format!("{:#}", LlamaConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("'intermediate_size' is missing"), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut v = smol();
        v["num_key_value_heads"] = json!(4);
        let err = format!("{:#}", LlamaConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
    }
}
