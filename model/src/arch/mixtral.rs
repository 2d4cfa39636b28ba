//! `mixtral`: Mixtral 8x7B / 8x22B. A Llama block (GGUF permutes Q and K rows)
//! whose MLP is routed experts: a softmax over the router's top-k logits, which
//! equals the softmax over all experts renormalised over the chosen ones. Its
//! GGUF is `llama` with `llama.expert_count` set, which is how this
//! description claims it; the expert width is `feed_forward_length`.

use super::{moe, Arch, TensorSpec, LLAMA_BLOCK, LLAMA_GLOBALS};
use crate::config::ModelConfig;
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

const EXPERTS: [TensorSpec; 3] = moe::experts(
    "block_sparse_moe.experts.{e}.w1.weight",
    "block_sparse_moe.experts.{e}.w3.weight",
    "block_sparse_moe.experts.{e}.w2.weight",
);

static BLOCK: [TensorSpec; 10] = [
    LLAMA_BLOCK[0],
    LLAMA_BLOCK[1],
    LLAMA_BLOCK[2],
    LLAMA_BLOCK[3],
    LLAMA_BLOCK[4],
    LLAMA_BLOCK[5],
    moe::router("block_sparse_moe.gate.weight"),
    EXPERTS[0],
    EXPERTS[1],
    EXPERTS[2],
];

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    moe::read_hf(v, c, true)?;
    if let Some(w) = v.get("sliding_window").filter(|w| !w.is_null()) {
        bail!("field 'sliding_window' is {w}: a windowed Mixtral is not supported (llama.cpp reads none from its GGUF either)");
    }
    Ok(())
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    moe::read_gguf(g, c, true)
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    moe::gguf_keys(c, false)
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    moe::norm_caveat(c, true)
}

fn claims(g: &GgufFile) -> bool {
    g.get("llama.expert_count").is_some()
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let m = c.moe.as_ref();
    let v = json!({
        "num_local_experts": m.map(|m| m.experts),
        "num_experts_per_tok": m.map(|m| m.used),
        "sliding_window": null,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The `mixtral` architecture.
pub static MIXTRAL: Arch = Arch {
    name: "mixtral",
    gguf_name: "llama",
    gguf_claims: Some(claims),
    hf_model_types: &["mixtral"],
    hf_class: "MixtralForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: true,
    hf_extra,
    scale_folds: moe::ATTENTION_FOLDS,
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf,
    read_gguf,
    gguf_extra,
    gguf_caveat,
};
