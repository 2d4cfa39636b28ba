//! `qwen2`: Qwen2 and Qwen2.5. A Llama block with biases on the q, k and v
//! projections; GGUF keeps HF's row order (NEOX RoPE, no permutation).

use super::{
    block_spec, llama_block_with, no_caveat, no_extra_keys, no_gguf_keys, no_hf_fields, Arch, Dim,
    Role, Slot, TensorSpec, LLAMA_FOLDS, LLAMA_GLOBALS,
};
use crate::config::ModelConfig;
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 12] = llama_block_with![
    block_spec(
        "attn_q.bias",
        "self_attn.q_proj.bias",
        Role::Bias,
        &[Dim::QDim],
        Slot::QBias,
    ),
    block_spec(
        "attn_k.bias",
        "self_attn.k_proj.bias",
        Role::Bias,
        &[Dim::KvDim],
        Slot::KBias,
    ),
    block_spec(
        "attn_v.bias",
        "self_attn.v_proj.bias",
        Role::Bias,
        &[Dim::KvDim],
        Slot::VBias,
    ),
];

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let v = json!({"use_sliding_window": false, "sliding_window": null,
                   "max_window_layers": c.num_hidden_layers});
    v.as_object().cloned().unwrap_or_default()
}

/// The `qwen2` architecture.
pub static QWEN2: Arch = Arch {
    name: "qwen2",
    gguf_name: "qwen2",
    gguf_claims: None,
    hf_model_types: &["qwen2"],
    hf_class: "Qwen2ForCausalLM",
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
