//! `deepseek_v3`: DeepSeek-V3 / R1 and Kimi K2 (`DeepseekV3ForCausalLM`; GGUF
//! `deepseek2`). Multi-head latent attention ([`crate::config::MlaConfig`]):
//! the query through a low-rank projection and its norm, keys and values from
//! one normed latent per position plus one shared RoPE key (adjacent-pair
//! RoPE, `rope_interleave`). HF keeps the latent → key/value map as one
//! `kv_b_proj`; llama.cpp's converter splits it per head into `attn_k_b`
//! (transposed) and `attn_v_b`, which are the canonical tensors here. The first
//! `first_k_dense_replace` blocks have a dense MLP; the others route each token
//! to `num_experts_per_tok` of `n_routed_experts` by sigmoid scores plus a
//! correction bias (for the choice only), limited to the `topk_group` best of
//! `n_group` expert groups, weighted by the unbiased scores renormalised and
//! scaled by `routed_scaling_factor`, beside `n_shared_experts` shared experts
//! (one MLP of their summed width).

use super::{moe, Arch, Blocks, Dim, HfLayout, Role, Slot, TensorSpec, LLAMA_BLOCK, LLAMA_GLOBALS};
use crate::config::{GroupedRouting, MlaConfig, ModelConfig, Routing};
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

const SHARED: [TensorSpec; 3] = moe::shared_expert(
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
);

static BLOCK: [TensorSpec; 21] = [
    LLAMA_BLOCK[0],
    super::block_spec(
        "attn_q_a.weight",
        "self_attn.q_a_proj.weight",
        Role::Linear,
        &[Dim::QLora, Dim::Hidden],
        Slot::QA,
    ),
    super::block_spec(
        "attn_q_a_norm.weight",
        "self_attn.q_a_layernorm.weight",
        Role::QkNorm,
        &[Dim::QLora],
        Slot::QANorm,
    ),
    super::block_spec(
        "attn_q_b.weight",
        "self_attn.q_b_proj.weight",
        Role::Linear,
        &[Dim::MlaQ, Dim::QLora],
        Slot::QB,
    ),
    super::block_spec(
        "attn_kv_a_mqa.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        Role::Linear,
        &[Dim::KvLoraRope, Dim::Hidden],
        Slot::KvA,
    ),
    super::block_spec(
        "attn_kv_a_norm.weight",
        "self_attn.kv_a_layernorm.weight",
        Role::QkNorm,
        &[Dim::KvLora],
        Slot::KvANorm,
    ),
    super::block_spec(
        "attn_k_b.weight",
        "",
        Role::Linear,
        &[Dim::Heads, Dim::KvLora, Dim::Nope],
        Slot::KB,
    )
    .stored_as("self_attn.kv_b_proj.weight", HfLayout::LatentKeys),
    super::block_spec(
        "attn_v_b.weight",
        "",
        Role::Linear,
        &[Dim::Heads, Dim::VHead, Dim::KvLora],
        Slot::VB,
    )
    .stored_as("self_attn.kv_b_proj.weight", HfLayout::LatentValues),
    super::block_spec(
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Role::Linear,
        &[Dim::Hidden, Dim::MlaO],
        Slot::O,
    ),
    LLAMA_BLOCK[5],
    LLAMA_BLOCK[6].only_in(Blocks::Dense),
    LLAMA_BLOCK[7].only_in(Blocks::Dense),
    LLAMA_BLOCK[8].only_in(Blocks::Dense),
    moe::router("mlp.gate.weight"),
    super::block_spec(
        "exp_probs_b.bias",
        "mlp.gate.e_score_correction_bias",
        Role::Bias,
        &[Dim::Experts],
        Slot::RouterBias,
    )
    .only_in(Blocks::Moe),
    moe::MLP_EXPERTS[0],
    moe::MLP_EXPERTS[1],
    moe::MLP_EXPERTS[2],
    SHARED[0],
    SHARED[1],
    SHARED[2],
];

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    let uint = |k: &str| moe::hf_uint(v, k);
    let need = |k: &str| -> Result<usize> {
        uint(k)?.with_context(|| format!("field '{k}' is missing: latent attention needs it"))
    };
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    if let Some(f) = text("scoring_func").filter(|f| *f != "sigmoid") {
        bail!("field 'scoring_func' is \"{f}\": DeepSeek-V3 scores experts by sigmoid (DeepSeek-V2's softmax routing is not supported)");
    }
    if let Some(m) = text("topk_method").filter(|m| *m != "noaux_tc") {
        bail!("field 'topk_method' is \"{m}\": only DeepSeek-V3's noaux_tc selection is supported");
    }
    if uint("num_nextn_predict_layers")?.unwrap_or(0) > 0 {
        bail!("field 'num_nextn_predict_layers' is set: the multi-token-prediction layers are not supported (set it to 0 and drop their tensors)");
    }
    let q_lora_rank = uint("q_lora_rank")?.context(
        "field 'q_lora_rank' is null: latent attention without a query projection rank (DeepSeek-V2-Lite) is not supported",
    )?;
    let rope = need("qk_rope_head_dim")?;
    c.head_dim = rope;
    c.mla = Some(MlaConfig {
        q_lora_rank,
        kv_lora_rank: need("kv_lora_rank")?,
        qk_nope_head_dim: need("qk_nope_head_dim")?,
        v_head_dim: need("v_head_dim")?,
    });
    c.rope_interleaved = match v.get("rope_interleave") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(x) => bail!("field 'rope_interleave' is {x}, expected true or false"),
    };
    // transformers' DeepseekV3Config default is true.
    moe::read_hf(v, c, true)?;
    if uint("moe_layer_freq")?.unwrap_or(1) != 1 {
        bail!("field 'moe_layer_freq' is not 1: only models whose every block after the dense ones is a mixture of experts are supported");
    }
    let groups = uint("n_group")?.unwrap_or(1).max(1);
    let groups_used = uint("topk_group")?.unwrap_or(groups);
    let scale = match v.get("routed_scaling_factor") {
        None | Some(Value::Null) => 1.0,
        Some(x) => x
            .as_f64()
            .with_context(|| format!("field 'routed_scaling_factor' is {x}, expected a number"))?
            as f32,
    };
    let first_dense = uint("first_k_dense_replace")?.unwrap_or(0);
    let shared = uint("n_shared_experts")?.unwrap_or(0);
    let m = c.moe.as_mut().expect("read above");
    check_groups(m.experts, groups, groups_used, m.used)?;
    m.shared_ffn = shared * m.expert_ffn;
    m.first_dense = first_dense;
    m.routing = Routing::Grouped(GroupedRouting {
        sigmoid: true,
        groups,
        groups_used,
        scale,
    });
    Ok(())
}

/// The groups must split the experts evenly and leave enough to choose from.
fn check_groups(experts: usize, groups: usize, used: usize, per_token: usize) -> Result<()> {
    if !experts.is_multiple_of(groups) || used == 0 || used > groups {
        bail!("{experts} experts in {groups} groups with {used} groups used per token: expected groups that divide the experts and between 1 and {groups} used");
    }
    if groups > 1 && experts / groups < 2 {
        bail!("{experts} experts in {groups} groups leave fewer than 2 per group: a group is scored by its two best experts");
    }
    if used * (experts / groups) < per_token {
        bail!(
            "{used} groups of {} experts cannot supply the {per_token} experts each token uses",
            experts / groups
        );
    }
    Ok(())
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    let key = |k: &str| format!("deepseek2.{k}");
    let uint = |k: &str| -> Result<Option<usize>> {
        Ok(match g.get(&key(k)) {
            Some(_) => Some(g.require_u64(&key(k))? as usize),
            None => None,
        })
    };
    let need = |k: &str| -> Result<usize> {
        uint(k)?.with_context(|| format!("deepseek2.{k} is missing"))
    };
    let q_lora_rank = uint("attention.q_lora_rank")?.context(
        "deepseek2.attention.q_lora_rank is missing: latent attention without a query projection rank (DeepSeek-V2-Lite) is not supported",
    )?;
    let kv_lora_rank = need("attention.kv_lora_rank")?;
    let rope = need("rope.dimension_count")?;
    let qk = need("attention.key_length_mla").context(
        "a GGUF without key_length_mla stores kv_b whole (llama.cpp before its MLA rework), which is not supported",
    )?;
    if qk <= rope {
        bail!("deepseek2.attention.key_length_mla {qk} leaves no room beside the {rope} RoPE dimensions");
    }
    c.head_dim = rope;
    c.num_key_value_heads = c.num_attention_heads;
    c.mla = Some(MlaConfig {
        q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim: qk - rope,
        v_head_dim: need("attention.value_length_mla")?,
    });
    c.rope_interleaved = true;
    // llama.cpp: expert_weights_norm absent means false.
    let norm = match g.get(&key("expert_weights_norm")) {
        Some(MetaValue::Bool(b)) => *b,
        Some(other) => bail!("deepseek2.expert_weights_norm is {other:?}, expected a bool"),
        None => false,
    };
    moe::read_gguf(g, c, norm)?;
    let sigmoid = match uint("expert_gating_func")? {
        Some(2) => true,
        // llama.cpp reads an absent key as softmax (DeepSeek-V2's gating).
        Some(1) | None => false,
        Some(other) => {
            bail!("deepseek2.expert_gating_func is {other}, expected 1 (softmax) or 2 (sigmoid)")
        }
    };
    let groups = uint("expert_group_count")?.unwrap_or(1).max(1);
    let groups_used = uint("expert_group_used_count")?.unwrap_or(groups);
    let scale = match g.get(&key("expert_weights_scale")) {
        Some(_) => g.require_f64(&key("expert_weights_scale"))? as f32,
        None => 1.0,
    };
    let shared = uint("expert_shared_count")?.unwrap_or(0);
    let m = c.moe.as_mut().expect("read above");
    check_groups(m.experts, groups, groups_used, m.used)?;
    m.shared_ffn = shared * m.expert_ffn;
    m.first_dense = uint("leading_dense_block_count")?.unwrap_or(0);
    m.routing = Routing::Grouped(GroupedRouting {
        sigmoid,
        groups,
        groups_used,
        // llama.cpp ignores a scale of 0 or 1.
        scale: if scale == 0.0 { 1.0 } else { scale },
    });
    Ok(())
}

/// The grouped routing of `c` (DeepSeek's, or none).
fn grouped(c: &ModelConfig) -> Option<GroupedRouting> {
    match c.moe.as_ref()?.routing {
        Routing::Grouped(g) => Some(g),
        _ => None,
    }
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    let key = |k: &str| format!("deepseek2.{k}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut keys = moe::gguf_keys(c, true);
    if let (Some(m), Some(g)) = (&c.moe, grouped(c)) {
        keys.push((
            key("expert_shared_count"),
            u(m.shared_ffn / m.expert_ffn.max(1)),
        ));
        keys.push((key("leading_dense_block_count"), u(m.first_dense)));
        keys.push((key("expert_group_count"), u(g.groups)));
        keys.push((key("expert_group_used_count"), u(g.groups_used)));
        keys.push((key("expert_gating_func"), u(if g.sigmoid { 2 } else { 1 })));
        keys.push((key("expert_weights_scale"), MetaValue::F32(g.scale)));
        // The converter writes the key only when true; llama.cpp reads none as false.
        if m.norm_topk_prob {
            keys.push((key("expert_weights_norm"), MetaValue::Bool(true)));
        }
    }
    if let Some(mla) = &c.mla {
        let rope = c.head_dim;
        keys.extend([
            (key("attention.head_count_kv"), u(1)),
            (key("attention.q_lora_rank"), u(mla.q_lora_rank)),
            (key("attention.kv_lora_rank"), u(mla.kv_lora_rank)),
            // The absorbed form llama.cpp computes: one latent "head".
            (key("attention.key_length"), u(mla.kv_lora_rank + rope)),
            (key("attention.value_length"), u(mla.kv_lora_rank)),
            (
                key("attention.key_length_mla"),
                u(mla.qk_nope_head_dim + rope),
            ),
            (key("attention.value_length_mla"), u(mla.v_head_dim)),
            (key("rope.dimension_count"), u(rope)),
        ]);
    }
    keys
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    (!c.rope_interleaved).then(|| {
        "this model rotates halves of each RoPE head (rope_interleave false); llama.cpp rotates adjacent pairs for a 'deepseek2' GGUF, so it computes a different model".to_owned()
    })
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let m = c.moe.as_ref();
    let g = grouped(c);
    let mla = c.mla.as_ref();
    let v = json!({
        "n_routed_experts": m.map(|m| m.experts),
        "num_experts_per_tok": m.map(|m| m.used),
        "moe_intermediate_size": m.map(|m| m.expert_ffn),
        "n_shared_experts": m.map(|m| m.shared_ffn / m.expert_ffn.max(1)),
        "first_k_dense_replace": m.map(|m| m.first_dense),
        "moe_layer_freq": 1,
        "norm_topk_prob": m.map(|m| m.norm_topk_prob),
        "n_group": g.map(|g| g.groups),
        "topk_group": g.map(|g| g.groups_used),
        "routed_scaling_factor": g.map(|g| g.scale),
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "q_lora_rank": mla.map(|m| m.q_lora_rank),
        "kv_lora_rank": mla.map(|m| m.kv_lora_rank),
        "qk_nope_head_dim": mla.map(|m| m.qk_nope_head_dim),
        "qk_rope_head_dim": c.head_dim,
        "qk_head_dim": mla.map(|m| m.qk_nope_head_dim + c.head_dim),
        "v_head_dim": mla.map(|m| m.v_head_dim),
        "rope_interleave": c.rope_interleaved,
        "num_nextn_predict_layers": 0,
        "attention_bias": false,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The `deepseek_v3` architecture (also Kimi K2).
pub static DEEPSEEK_V3: Arch = Arch {
    name: "deepseek_v3",
    gguf_name: "deepseek2",
    gguf_claims: None,
    hf_model_types: &["deepseek_v3", "kimi_k2"],
    hf_class: "DeepseekV3ForCausalLM",
    block: &BLOCK,
    globals: &LLAMA_GLOBALS,
    gguf_permutes_qk: false,
    hf_extra,
    scale_folds: &[],
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf,
    read_gguf,
    gguf_extra,
    gguf_caveat,
};
