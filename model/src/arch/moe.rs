//! What the mixture-of-experts descriptions share: the router and the routed
//! experts' tensors (GGUF stacks each kind into one `[experts, …]` tensor,
//! `ffn_{gate,up,down}_exps`; HF stores one matrix per expert), and the expert
//! counts in HF configs and GGUF keys.

use super::{Blocks, Dim, HfLayout, Role, Slot, TensorSpec};
use crate::config::{ModelConfig, MoeConfig};
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The router `[experts, hidden]` (HF suffix `hf`).
pub(crate) const fn router(hf: &'static str) -> TensorSpec {
    TensorSpec {
        gguf: "ffn_gate_inp.weight",
        hf,
        role: Role::Router,
        shape: &[Dim::Experts, Dim::Hidden],
        slot: None,
        blocks: Blocks::Moe,
        hf_layout: HfLayout::Plain,
    }
}

/// The experts' gate, up and down matrices, stacked; `gate`, `up` and `down`
/// are their per-expert HF suffixes with `{e}` for the expert.
pub(crate) const fn experts(
    gate: &'static str,
    up: &'static str,
    down: &'static str,
) -> [TensorSpec; 3] {
    [
        super::block_spec(
            "ffn_gate_exps.weight",
            gate,
            Role::Linear,
            &[Dim::Experts, Dim::ExpertFfn, Dim::Hidden],
            Slot::Gate,
        )
        .only_in(Blocks::Moe),
        super::block_spec(
            "ffn_up_exps.weight",
            up,
            Role::Linear,
            &[Dim::Experts, Dim::ExpertFfn, Dim::Hidden],
            Slot::Up,
        )
        .only_in(Blocks::Moe),
        super::block_spec(
            "ffn_down_exps.weight",
            down,
            Role::Linear,
            &[Dim::Experts, Dim::Hidden, Dim::ExpertFfn],
            Slot::Down,
        )
        .only_in(Blocks::Moe),
    ]
}

/// A shared expert's gate, up and down matrices (`ffn_{gate,up,down}_shexp`,
/// in expert blocks only), under the HF names given.
pub(crate) const fn shared_expert(
    gate: &'static str,
    up: &'static str,
    down: &'static str,
) -> [TensorSpec; 3] {
    [
        super::block_spec(
            "ffn_gate_shexp.weight",
            gate,
            Role::Linear,
            &[Dim::SharedFfn, Dim::Hidden],
            Slot::SharedGate,
        )
        .only_in(Blocks::Moe),
        super::block_spec(
            "ffn_up_shexp.weight",
            up,
            Role::Linear,
            &[Dim::SharedFfn, Dim::Hidden],
            Slot::SharedUp,
        )
        .only_in(Blocks::Moe),
        super::block_spec(
            "ffn_down_shexp.weight",
            down,
            Role::Linear,
            &[Dim::Hidden, Dim::SharedFfn],
            Slot::SharedDown,
        )
        .only_in(Blocks::Moe),
    ]
}

/// An optional non-negative integer field of an HF config.
pub(crate) fn hf_uint(v: &Value, k: &str) -> Result<Option<usize>> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|u| Some(u as usize))
            .with_context(|| format!("field '{k}' is {x}, expected a non-negative integer")),
    }
}

/// AWQ's exact folds in a mixture-of-experts block: only the attention norm
/// into q/k/v. Each expert reads the MLP norm's output through its own
/// columns, which one gain cannot serve.
pub(crate) const ATTENTION_FOLDS: &[(Slot, &[Slot])] =
    &[(Slot::AttnNorm, &[Slot::Q, Slot::K, Slot::V])];

/// The experts as Qwen3-MoE, OLMoE and DeepSeek name them in HF
/// (`mlp.experts.{e}.{gate,up,down}_proj.weight`).
pub(crate) const MLP_EXPERTS: [TensorSpec; 3] = experts(
    "mlp.experts.{e}.gate_proj.weight",
    "mlp.experts.{e}.up_proj.weight",
    "mlp.experts.{e}.down_proj.weight",
);

/// Reads the experts of an HF config: `num_experts` (or `num_local_experts`,
/// as Mixtral and transformers 5 call it), `num_experts_per_tok`, the expert
/// width `moe_intermediate_size` (or `intermediate_size` where the experts are
/// the only MLP), and `norm_topk_prob` (`norm_default` when absent: the
/// family's transformers default).
pub(crate) fn read_hf(v: &Value, c: &mut ModelConfig, norm_default: bool) -> Result<()> {
    let count = |keys: &[&str]| -> Result<Option<usize>> {
        for k in keys {
            if let Some(n) = hf_uint(v, k)? {
                return Ok(Some(n));
            }
        }
        Ok(None)
    };
    let experts = count(&["num_experts", "num_local_experts", "n_routed_experts"])?
        .context("field 'num_experts' (or 'num_local_experts') is missing: a mixture of experts needs its expert count")?;
    let used =
        count(&["num_experts_per_tok"])?.context("field 'num_experts_per_tok' is missing")?;
    let expert_ffn = count(&["moe_intermediate_size"])?.unwrap_or(c.intermediate_size);
    let norm_topk_prob = match v.get("norm_topk_prob") {
        None | Some(Value::Null) => norm_default,
        Some(Value::Bool(b)) => *b,
        Some(x) => bail!("field 'norm_topk_prob' is {x}, expected true or false"),
    };
    c.moe = Some(MoeConfig::softmax(
        experts,
        used,
        expert_ffn,
        norm_topk_prob,
    ));
    Ok(())
}

/// Reads `{arch}.expert_count`, `expert_used_count` and
/// `expert_feed_forward_length` (`feed_forward_length` when absent: llama and
/// olmoe GGUFs keep the expert width there). `norm_topk_prob` is what llama.cpp
/// does for the architecture: GGUF has no key for it.
pub(crate) fn read_gguf(g: &GgufFile, c: &mut ModelConfig, norm_topk_prob: bool) -> Result<()> {
    let key = |k: &str| format!("{}.{k}", c.arch.gguf_name);
    let experts = g.require_u64(&key("expert_count"))? as usize;
    let used = g.require_u64(&key("expert_used_count"))? as usize;
    let expert_ffn = match g.get(&key("expert_feed_forward_length")) {
        Some(_) => g.require_u64(&key("expert_feed_forward_length"))? as usize,
        None => c.intermediate_size,
    };
    c.moe = Some(MoeConfig::softmax(
        experts,
        used,
        expert_ffn,
        norm_topk_prob,
    ));
    Ok(())
}

/// The expert keys `read_gguf` reads, for a GGUF of `c` (with the expert width
/// under its own key when `own_width`).
pub(crate) fn gguf_keys(c: &ModelConfig, own_width: bool) -> Vec<(String, MetaValue)> {
    let Some(m) = &c.moe else {
        return Vec::new();
    };
    let key = |k: &str| format!("{}.{k}", c.arch.gguf_name);
    let mut keys = vec![
        (key("expert_count"), MetaValue::U32(m.experts as u32)),
        (key("expert_used_count"), MetaValue::U32(m.used as u32)),
    ];
    if own_width {
        keys.push((
            key("expert_feed_forward_length"),
            MetaValue::U32(m.expert_ffn as u32),
        ));
    }
    keys
}

/// The note for a GGUF whose routing llama.cpp fixes: it renormalises the chosen
/// experts' weights for some architectures and never for others, whatever the
/// config's `norm_topk_prob` says.
pub(crate) fn norm_caveat(c: &ModelConfig, llama_cpp_norm: bool) -> Option<String> {
    let m = c.moe.as_ref()?;
    (m.norm_topk_prob != llama_cpp_norm).then(|| {
        format!(
            "this model {} the chosen experts' weights (norm_topk_prob {}); llama.cpp {} them for a '{}' GGUF, so it computes a different model",
            if m.norm_topk_prob { "renormalises" } else { "does not renormalise" },
            m.norm_topk_prob,
            if llama_cpp_norm { "always renormalises" } else { "never renormalises" },
            c.arch.gguf_name
        )
    })
}
