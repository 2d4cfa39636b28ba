//! `qwen3`: Qwen3 dense models. A Llama block with an RMSNorm over each query and
//! key head before RoPE (`q_norm`, `k_norm`, one gain of `head_dim` shared by all
//! heads), no biases, a head width set on its own (`head_dim`, GGUF
//! `attention.key_length`); GGUF keeps HF's row order.

use super::{
    llama_block_with, no_caveat, no_extra_keys, no_gguf_keys, no_hf_fields, Arch, TensorSpec,
    LLAMA_FOLDS, LLAMA_GLOBALS, PER_HEAD_QK_NORMS,
};
use crate::config::ModelConfig;
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 11] = llama_block_with![PER_HEAD_QK_NORMS[0], PER_HEAD_QK_NORMS[1],];

fn hf_extra(_: &ModelConfig) -> Map<String, Value> {
    let v = json!({"attention_bias": false, "use_sliding_window": false, "sliding_window": null});
    v.as_object().cloned().unwrap_or_default()
}

/// The `qwen3` architecture.
pub static QWEN3: Arch = Arch {
    name: "qwen3",
    gguf_name: "qwen3",
    gguf_claims: None,
    hf_model_types: &["qwen3"],
    hf_class: "Qwen3ForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: false,
    hf_extra,
    scale_folds: LLAMA_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf: no_hf_fields,
    read_gguf: no_gguf_keys,
    gguf_extra: no_extra_keys,
    gguf_caveat: no_caveat,
};
