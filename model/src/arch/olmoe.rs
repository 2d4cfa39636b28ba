//! `olmoe`: OLMoE. Pre-norm blocks whose queries and keys are RMS-normalised
//! over the whole projection (as OLMo 2's), multi-head attention, and routed
//! experts in every MLP: a softmax router whose chosen probabilities are used
//! as they are (`norm_topk_prob` false; llama.cpp never renormalises for
//! `olmoe`). The expert width is `intermediate_size` / `feed_forward_length`.

use super::{moe, Arch, TensorSpec, LLAMA_BLOCK, LLAMA_GLOBALS, WHOLE_QK_NORMS};
use crate::config::ModelConfig;
use crate::gguf::{GgufFile, MetaValue};
use anyhow::Result;
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 12] = [
    LLAMA_BLOCK[0],
    LLAMA_BLOCK[1],
    LLAMA_BLOCK[2],
    LLAMA_BLOCK[3],
    LLAMA_BLOCK[4],
    LLAMA_BLOCK[5],
    WHOLE_QK_NORMS[0],
    WHOLE_QK_NORMS[1],
    moe::router("mlp.gate.weight"),
    moe::MLP_EXPERTS[0],
    moe::MLP_EXPERTS[1],
    moe::MLP_EXPERTS[2],
];

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    moe::read_hf(v, c, false)
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    moe::read_gguf(g, c, false)
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    moe::gguf_keys(c, false)
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    moe::norm_caveat(c, false)
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let m = c.moe.as_ref();
    let v = json!({
        "num_experts": m.map(|m| m.experts),
        "num_experts_per_tok": m.map(|m| m.used),
        "norm_topk_prob": m.map(|m| m.norm_topk_prob),
        "attention_bias": false,
        "clip_qkv": null,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The `olmoe` architecture.
pub static OLMOE: Arch = Arch {
    name: "olmoe",
    gguf_name: "olmoe",
    gguf_claims: None,
    hf_model_types: &["olmoe"],
    hf_class: "OlmoeForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: false,
    hf_extra,
    scale_folds: moe::ATTENTION_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf,
    read_gguf,
    gguf_extra,
    gguf_caveat,
};
