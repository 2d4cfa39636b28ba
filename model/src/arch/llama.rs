//! `llama`: Llama 1–3.x, SmolLM2, Mistral without a sliding window. Pre-norm
//! blocks, grouped-query attention, SwiGLU; GGUF stores Q and K permuted for
//! llama.cpp's interleaved RoPE; Llama 3.x rope scaling is a `rope_freqs.weight`
//! tensor in GGUF and `rope_scaling` / `rope_parameters` in HF.

use super::{
    global_spec, no_caveat, no_extra_keys, no_gguf_keys, no_hf_fields, Arch, Dim, Role, TensorSpec,
    LLAMA_BLOCK, LLAMA_FOLDS, LLAMA_GLOBALS,
};
use crate::config::ModelConfig;
use serde_json::{json, Map, Value};

static GLOBALS: [TensorSpec; 4] = [
    LLAMA_GLOBALS[0],
    LLAMA_GLOBALS[1],
    LLAMA_GLOBALS[2],
    global_spec(
        "rope_freqs.weight",
        "",
        Role::RopeFreqs,
        &[Dim::HalfHeadDim],
    ),
];

fn hf_extra(_: &ModelConfig) -> Map<String, Value> {
    let v = json!({"attention_bias": false, "mlp_bias": false, "pretraining_tp": 1});
    v.as_object().cloned().unwrap_or_default()
}

/// The `llama` architecture.
pub static LLAMA: Arch = Arch {
    name: "llama",
    gguf_name: "llama",
    gguf_claims: None,
    hf_model_types: &["llama"],
    hf_class: "LlamaForCausalLM",
    block: &LLAMA_BLOCK,
    globals: &GLOBALS,
    gguf_permutes_qk: true,
    hf_extra,
    scale_folds: LLAMA_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf: no_hf_fields,
    read_gguf: no_gguf_keys,
    gguf_extra: no_extra_keys,
    gguf_caveat: no_caveat,
};
