//! `qwen3_moe`: Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B). Qwen3's attention
//! (per-head q/k RMSNorm, a head width of its own) with every block's MLP
//! replaced by routed experts: a softmax router, the `num_experts_per_tok` best
//! experts, their probabilities renormalised (`norm_topk_prob`), no shared
//! expert. GGUF `qwen3moe` keeps the expert width in `expert_feed_forward_length`
//! and llama.cpp always renormalises.

use super::{moe, Arch, TensorSpec, LLAMA_BLOCK, LLAMA_GLOBALS, PER_HEAD_QK_NORMS};
use crate::config::ModelConfig;
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

static BLOCK: [TensorSpec; 12] = [
    LLAMA_BLOCK[0],
    LLAMA_BLOCK[1],
    LLAMA_BLOCK[2],
    LLAMA_BLOCK[3],
    LLAMA_BLOCK[4],
    LLAMA_BLOCK[5],
    PER_HEAD_QK_NORMS[0],
    PER_HEAD_QK_NORMS[1],
    moe::router("mlp.gate.weight"),
    moe::MLP_EXPERTS[0],
    moe::MLP_EXPERTS[1],
    moe::MLP_EXPERTS[2],
];

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    // transformers' Qwen3MoeConfig default is false; released models set true.
    moe::read_hf(v, c, false)?;
    if let Some(step) = v.get("decoder_sparse_step").and_then(Value::as_u64) {
        if step != 1 {
            bail!("field 'decoder_sparse_step' is {step}: only models whose every block is a mixture of experts (1) are supported");
        }
    }
    if let Some(dense) = v.get("mlp_only_layers").and_then(Value::as_array) {
        if !dense.is_empty() {
            bail!("field 'mlp_only_layers' lists dense blocks {dense:?}: only models whose every block is a mixture of experts are supported (llama.cpp's qwen3moe needs a router in every block too)");
        }
    }
    Ok(())
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    moe::read_gguf(g, c, true)
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    moe::gguf_keys(c, true)
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    moe::norm_caveat(c, true)
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let m = c.moe.as_ref();
    let v = json!({
        "attention_bias": false,
        "use_sliding_window": false,
        "sliding_window": null,
        "num_experts": m.map(|m| m.experts),
        "num_experts_per_tok": m.map(|m| m.used),
        "moe_intermediate_size": m.map(|m| m.expert_ffn),
        "norm_topk_prob": m.map(|m| m.norm_topk_prob),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The `qwen3_moe` architecture.
pub static QWEN3_MOE: Arch = Arch {
    name: "qwen3_moe",
    gguf_name: "qwen3moe",
    gguf_claims: None,
    hf_model_types: &["qwen3_moe"],
    hf_class: "Qwen3MoeForCausalLM",
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
