//! `llama4`: the text part of Llama 4 (Scout, Maverick) as `Llama4ForCausalLM`
//! (`model_type` `llama4_text`). Every `interleave_moe_layer_step`-th block is
//! a mixture of experts: a router picks the `num_experts_per_tok` highest
//! scores, the sigmoid of each scales that expert's *input*, and a shared
//! expert runs on every token beside them; the other blocks keep a dense MLP
//! of `intermediate_size_mlp`. HF stores the experts fused and multiplied as
//! `x · W` (`gate_up_proj` `[experts, hidden, 2·ffn]`, `down_proj` `[experts,
//! ffn, hidden]`). Attention is GQA with the complex (adjacent-pair) RoPE on
//! most layers, chunked, with a weightless q/k RMS norm after the rotation;
//! every `no_rope_layer_interval`-th layer has no RoPE, attends to everything
//! and scales its queries by position. llama.cpp's GGUF has no key for any of
//! the attention settings: it hard-codes Scout's (chunks of 8192, NoPE every
//! 4th layer, q/k norm unless there are 128 experts, temperature 0.1 / 8192).

use super::{moe, Arch, Blocks, Dim, HfLayout, Role, Slot, TensorSpec, LLAMA_BLOCK, LLAMA_GLOBALS};
use crate::config::{ChunkedAttention, LayerType, ModelConfig, Routing};
use crate::gguf::{GgufFile, MetaValue};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// A dense block's MLP tensor under Llama 4's HF names.
const fn dense(
    gguf: &'static str,
    hf: &'static str,
    shape: &'static [Dim],
    slot: Slot,
) -> TensorSpec {
    super::block_spec(gguf, hf, Role::Linear, shape, slot).only_in(Blocks::Dense)
}

const SHARED: [TensorSpec; 3] = moe::shared_expert(
    "feed_forward.shared_expert.gate_proj.weight",
    "feed_forward.shared_expert.up_proj.weight",
    "feed_forward.shared_expert.down_proj.weight",
);

static BLOCK: [TensorSpec; 16] = [
    LLAMA_BLOCK[0],
    LLAMA_BLOCK[1],
    LLAMA_BLOCK[2],
    LLAMA_BLOCK[3],
    LLAMA_BLOCK[4],
    LLAMA_BLOCK[5],
    dense(
        "ffn_gate.weight",
        "feed_forward.gate_proj.weight",
        &[Dim::Ffn, Dim::Hidden],
        Slot::Gate,
    ),
    dense(
        "ffn_up.weight",
        "feed_forward.up_proj.weight",
        &[Dim::Ffn, Dim::Hidden],
        Slot::Up,
    ),
    dense(
        "ffn_down.weight",
        "feed_forward.down_proj.weight",
        &[Dim::Hidden, Dim::Ffn],
        Slot::Down,
    ),
    moe::router("feed_forward.router.weight"),
    moe::MLP_EXPERTS[0].stored_as("feed_forward.experts.gate_up_proj", HfLayout::FusedHalf(0)),
    moe::MLP_EXPERTS[1].stored_as("feed_forward.experts.gate_up_proj", HfLayout::FusedHalf(1)),
    moe::MLP_EXPERTS[2].stored_as("feed_forward.experts.down_proj", HfLayout::Transposed),
    SHARED[0],
    SHARED[1],
    SHARED[2],
];

/// llama.cpp's hard-coded Llama 4 attention (Scout's defaults).
const LLAMA_CPP_CHUNK: usize = 8192;
const LLAMA_CPP_NOPE_INTERVAL: usize = 4;
const LLAMA_CPP_FLOOR_SCALE: f64 = 8192.0;
const LLAMA_CPP_ATTN_SCALE: f64 = 0.1;

/// Scout's attention as llama.cpp computes it for a model of `experts` experts.
fn llama_cpp_attention(experts: usize) -> ChunkedAttention {
    ChunkedAttention {
        chunk: LLAMA_CPP_CHUNK,
        // Maverick (128 experts) has no q/k norm.
        qk_norm: experts != 128,
        temperature_tuning: true,
        floor_scale: LLAMA_CPP_FLOOR_SCALE,
        attn_scale: LLAMA_CPP_ATTN_SCALE,
    }
}

/// llama.cpp's layer pattern: every 4th layer NoPE.
fn llama_cpp_layer_types(n: usize) -> Vec<LayerType> {
    (0..n)
        .map(|l| LayerType {
            sliding: false,
            rope: !(l + 1).is_multiple_of(LLAMA_CPP_NOPE_INTERVAL),
        })
        .collect()
}

fn read_hf(v: &Value, c: &mut ModelConfig) -> Result<()> {
    let n = c.num_hidden_layers;
    let uint = |k: &str| moe::hf_uint(v, k);
    let float = |k: &str, default: f64| -> Result<f64> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .with_context(|| format!("field '{k}' is {x}, expected a number")),
        }
    };
    let flag = |k: &str, default: bool| -> Result<bool> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => bail!("field '{k}' is {x}, expected true or false"),
        }
    };
    // The experts' and the shared expert's width is `intermediate_size`; the
    // dense blocks' is `intermediate_size_mlp`.
    let expert_ffn = c.intermediate_size;
    c.intermediate_size = uint("intermediate_size_mlp")?
        .context("field 'intermediate_size_mlp' is missing: the dense blocks' MLP width")?;
    moe::read_hf(v, c, false)?;
    let interleave = uint("interleave_moe_layer_step")?.unwrap_or(1);
    if interleave == 0 {
        bail!("field 'interleave_moe_layer_step' is 0, expected at least 1");
    }
    let m = c.moe.as_mut().expect("read above");
    m.expert_ffn = expert_ffn;
    m.shared_ffn = expert_ffn;
    m.routing = Routing::SigmoidInput;
    m.interleave = interleave;
    if let Some(list) = v.get("moe_layers").filter(|l| !l.is_null()) {
        let expected: Vec<usize> = (0..n).filter(|l| (l + 1) % interleave == 0).collect();
        let given: Option<Vec<usize>> = list
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect());
        if given.as_ref() != Some(&expected) {
            bail!("field 'moe_layers' is {list}, but interleave_moe_layer_step {interleave} over {n} layers means {expected:?}: only that pattern is supported");
        }
    }
    // RoPE per layer: `no_rope_layers` (1 = RoPE), else every
    // `no_rope_layer_interval`-th layer without.
    let rope: Vec<bool> = match v.get("no_rope_layers").filter(|l| !l.is_null()) {
        Some(list) => {
            let flags: Option<Vec<bool>> = list.as_array().and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().filter(|&u| u <= 1).map(|u| u == 1))
                    .collect()
            });
            match flags {
                Some(f) if f.len() == n => f,
                _ => bail!("field 'no_rope_layers' is {list}, expected {n} entries of 0 or 1"),
            }
        }
        None => {
            let every = uint("no_rope_layer_interval")?.unwrap_or(LLAMA_CPP_NOPE_INTERVAL);
            (0..n)
                .map(|l| every == 0 || !(l + 1).is_multiple_of(every))
                .collect()
        }
    };
    c.layer_types = rope
        .iter()
        .map(|&rope| LayerType {
            sliding: false,
            rope,
        })
        .collect();
    if let Some(Value::Array(types)) = v.get("layer_types") {
        for (l, (t, &rope)) in types.iter().zip(&rope).enumerate() {
            let chunked = match t.as_str() {
                Some("chunked_attention") => true,
                Some("full_attention") => false,
                _ => bail!("field 'layer_types' entry {l} is {t}, expected \"chunked_attention\" or \"full_attention\""),
            };
            if chunked != rope {
                bail!("field 'layer_types' entry {l} is {t} but no_rope_layers says the layer {} RoPE: only chunked RoPE layers and full NoPE layers are supported (as in every published Llama 4)", if rope { "has" } else { "has no" });
            }
        }
    }
    c.chunked_attention = Some(ChunkedAttention {
        chunk: uint("attention_chunk_size")?.unwrap_or(LLAMA_CPP_CHUNK),
        qk_norm: flag("use_qk_norm", true)?,
        temperature_tuning: flag("attn_temperature_tuning", true)?,
        floor_scale: float("floor_scale", LLAMA_CPP_FLOOR_SCALE)?,
        attn_scale: float("attn_scale", LLAMA_CPP_ATTN_SCALE)?,
    });
    if c.chunked_attention.is_some_and(|a| a.chunk == 0) {
        bail!("field 'attention_chunk_size' is 0, expected a positive number of positions");
    }
    c.rope_interleaved = true;
    Ok(())
}

fn read_gguf(g: &GgufFile, c: &mut ModelConfig) -> Result<()> {
    moe::read_gguf(g, c, false)?;
    let key = |k: &str| format!("llama4.{k}");
    let interleave = match g.get(&key("interleave_moe_layer_step")) {
        Some(_) => g.require_u64(&key("interleave_moe_layer_step"))? as usize,
        None => 1,
    };
    if g.get(&key("attention.sliding_window")).is_some()
        && g.require_u64(&key("attention.sliding_window"))? == 0
    {
        bail!("llama4.attention.sliding_window is 0 (every layer full attention): llama.cpp then drops the chunking, NoPE layers and q/k norm, which is not supported");
    }
    let m = c.moe.as_mut().expect("read above");
    m.shared_ffn = m.expert_ffn;
    m.routing = Routing::SigmoidInput;
    m.interleave = interleave;
    let experts = m.experts;
    c.layer_types = llama_cpp_layer_types(c.num_hidden_layers);
    c.chunked_attention = Some(llama_cpp_attention(experts));
    c.rope_interleaved = true;
    Ok(())
}

fn gguf_extra(c: &ModelConfig) -> Vec<(String, MetaValue)> {
    let mut keys = moe::gguf_keys(c, true);
    if let Some(m) = &c.moe {
        keys.push((
            "llama4.interleave_moe_layer_step".to_owned(),
            MetaValue::U32(m.interleave as u32),
        ));
    }
    keys
}

fn gguf_caveat(c: &ModelConfig) -> Option<String> {
    let experts = c.moe.as_ref().map_or(0, |m| m.experts);
    let mut differs = Vec::new();
    if c.layer_types != llama_cpp_layer_types(c.num_hidden_layers) {
        differs.push("NoPE on every 4th layer");
    }
    if let Some(a) = &c.chunked_attention {
        let cpp = llama_cpp_attention(experts);
        if a.chunk != cpp.chunk {
            differs.push("chunks of 8192");
        }
        if a.qk_norm != cpp.qk_norm {
            differs.push("a q/k norm exactly when there are not 128 experts");
        }
        if a.temperature_tuning != cpp.temperature_tuning
            || a.floor_scale != cpp.floor_scale
            || a.attn_scale != cpp.attn_scale
        {
            differs.push("query temperature 0.1 / 8192");
        }
    }
    (!differs.is_empty()).then(|| {
        format!(
            "llama.cpp ignores this model's attention settings and computes Llama 4 Scout's for a 'llama4' GGUF ({}), so it computes a different model",
            differs.join(", ")
        )
    })
}

fn hf_extra(c: &ModelConfig) -> Map<String, Value> {
    let m = c.moe.as_ref();
    let n = c.num_hidden_layers;
    let a = c.chunked_attention.unwrap_or(llama_cpp_attention(0));
    let interleave = m.map_or(1, |m| m.interleave);
    let v = json!({
        "intermediate_size": m.map(|m| m.expert_ffn),
        "intermediate_size_mlp": c.intermediate_size,
        "num_local_experts": m.map(|m| m.experts),
        "num_experts_per_tok": m.map(|m| m.used),
        "interleave_moe_layer_step": interleave,
        "moe_layers": (0..n).filter(|l| (l + 1) % interleave == 0).collect::<Vec<_>>(),
        "no_rope_layers": c.layer_types.iter().map(|t| u32::from(t.rope)).collect::<Vec<_>>(),
        "layer_types": c.layer_types.iter().map(|t| if t.rope { "chunked_attention" } else { "full_attention" }).collect::<Vec<_>>(),
        "attention_chunk_size": a.chunk,
        "use_qk_norm": a.qk_norm,
        "attn_temperature_tuning": a.temperature_tuning,
        // transformers types it as an integer.
        "floor_scale": if a.floor_scale.fract() == 0.0 { json!(a.floor_scale as u64) } else { json!(a.floor_scale) },
        "attn_scale": a.attn_scale,
        "attention_bias": false,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The `llama4` architecture (text).
pub static LLAMA4: Arch = Arch {
    name: "llama4",
    gguf_name: "llama4",
    gguf_claims: None,
    hf_model_types: &["llama4_text"],
    hf_class: "Llama4ForCausalLM",
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
