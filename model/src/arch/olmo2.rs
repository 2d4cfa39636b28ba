//! `olmo2`: OLMo 2. The norms sit after each branch, inside the residual
//! (`x = x + rmsnorm(attn(x))·g`, `x = x + rmsnorm(mlp(x))·g`); attention and
//! the MLP read the residual stream itself, with no pre-norm. Queries and keys
//! are RMS-normalised over the whole projection (`q_norm` is `[heads·head_dim]`:
//! one rms couples all heads) before RoPE. Multi-head attention, SwiGLU, an
//! untied head; GGUF keeps HF's row order (NEOX RoPE).
//!
//! AWQ: q/k/v and gate/up read the raw stream, so their input scales have no
//! exact fold target; only up → down folds. llama.cpp needs `output.weight`: a
//! tied OLMo 2 would not load there.

use super::{
    block_spec, hf_sets_rope_theta, no_extra_keys, no_gguf_keys, Arch, Dim, Role, Slot, TensorSpec,
    LLAMA_GLOBALS, WHOLE_QK_NORMS,
};
use crate::config::ModelConfig;
use anyhow::Result;
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 11] = [
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
    WHOLE_QK_NORMS[0],
    WHOLE_QK_NORMS[1],
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

/// Only up's rows into down's columns: the other linears read the stream.
const FOLDS: &[(Slot, &[Slot])] = &[(Slot::Up, &[Slot::Down])];

/// transformers' `Olmo2Config.rms_norm_eps` default (real configs say 1e-6).
const DEFAULT_EPS: f64 = 1e-5;

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    if v.get("rms_norm_eps").is_none_or(Value::is_null) {
        c.rms_norm_eps = DEFAULT_EPS;
    }
    if !hf_sets_rope_theta(v) {
        c.rope_theta = 10000.0;
    }
    Ok(())
}

fn hf_extra(_: &ModelConfig) -> Map<String, Value> {
    let v = json!({"attention_bias": false});
    v.as_object().cloned().unwrap_or_default()
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    c.tie_word_embeddings.then(|| {
        "this OLMo 2 ties its head to the embedding; llama.cpp's olmo2 needs 'output.weight', so \
         it will not load this GGUF"
            .to_owned()
    })
}

/// The `olmo2` architecture.
pub static OLMO2: Arch = Arch {
    name: "olmo2",
    gguf_name: "olmo2",
    gguf_claims: None,
    hf_model_types: &["olmo2"],
    hf_class: "Olmo2ForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: false,
    hf_extra,
    scale_folds: FOLDS,
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

    #[test]
    fn defaults_are_transformers_and_the_qk_norms_span_the_projection() {
        let v = json!({"model_type": "olmo2", "vocab_size": 32, "hidden_size": 16,
                       "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(
            (c.arch, c.rms_norm_eps, c.num_key_value_heads),
            (&OLMO2, 1e-5, 2)
        );
        assert_eq!(OLMO2.slot(Slot::QNorm).unwrap().shape[0].size(&c), 16);
        assert!(OLMO2.slot(Slot::AttnNorm).is_none() && OLMO2.slot(Slot::FfnNorm).is_none());
        let back = ModelConfig::from_hf_json(&c.to_hf_json("float32").unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(gguf_caveat(&c), None);
    }
}
