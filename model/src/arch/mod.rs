//! One description per architecture: what a decoder-only model of that family
//! is made of, as data every stage reads instead of matching on names.
//!
//! A description ([`Arch`]) says how the architecture is called in GGUF
//! (`general.architecture`, the prefix of its `{arch}.*` keys) and in HF
//! (`model_type`, the `*ForCausalLM` class), which tensors a block holds
//! ([`TensorSpec`]: GGUF suffix, HF suffix, [`Role`], shape in terms of the
//! config, and the [`Slot`] it fills in the shared block graph of
//! [`crate::llama`]), which tensors sit outside the blocks, and whether GGUF
//! stores Q and K rows permuted for llama.cpp's interleaved RoPE.
//!
//! Adding an architecture is one file here with its `pub static` and one line in
//! [`ARCHES`]. Stages ask [`Arch::linears`] which tensors to quantize or prune,
//! [`Role::kept_float`] which to leave alone, and [`Arch::block_tensor`] what a
//! name means.

mod deepseek_v3;
mod gemma3;
mod llama;
mod llama4;
mod mistral;
mod mixtral;
mod moe;
mod olmo2;
mod olmoe;
mod qwen2;
mod qwen3;
mod qwen3_moe;
mod smollm3;

pub use deepseek_v3::DEEPSEEK_V3;
pub use gemma3::GEMMA3;
pub use llama::LLAMA;
pub use llama4::LLAMA4;
pub use mistral::MISTRAL;
pub use mixtral::MIXTRAL;
pub use olmo2::OLMO2;
pub use olmoe::OLMOE;
pub use qwen2::QWEN2;
pub use qwen3::QWEN3;
pub use qwen3_moe::QWEN3_MOE;
pub use smollm3::SMOLLM3;

use crate::config::ModelConfig;
use crate::gguf::{GgufFile, MetaValue};
use anyhow::Result;
use serde_json::Value;

/// Every supported architecture (the registration table).
pub static ARCHES: &[&Arch] = &[
    &LLAMA,
    &QWEN2,
    &QWEN3,
    &MISTRAL,
    &SMOLLM3,
    &OLMO2,
    &GEMMA3,
    &QWEN3_MOE,
    &MIXTRAL,
    &OLMOE,
    &LLAMA4,
    &DEEPSEEK_V3,
];

/// What a tensor is for: decides whether stages may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Token embedding table `[vocab, hidden]`.
    Embedding,
    /// An RMSNorm gain over the residual stream.
    Norm,
    /// A linear layer's weight `[out, in]`: quantized and pruned.
    Linear,
    /// A linear layer's bias `[out]`.
    Bias,
    /// An RMSNorm gain over each query or key head (`[head_dim]`).
    QkNorm,
    /// The output head `[vocab, hidden]` (absent when tied to the embedding).
    Head,
    /// RoPE frequency divisors (`rope_freqs.weight`, GGUF only: HF computes them
    /// from `rope_scaling`).
    RopeFreqs,
    /// A mixture-of-experts block's router `[experts, hidden]`: kept in float,
    /// as llama.cpp keeps `ffn_gate_inp` (a rounded router picks other experts).
    Router,
}

impl Role {
    /// Whether stages keep this tensor in float (never quantized or pruned), and
    /// why, for reports.
    pub fn kept_float(self) -> Option<&'static str> {
        match self {
            Role::Norm | Role::QkNorm => Some("norm gain"),
            Role::Bias => Some("bias"),
            Role::RopeFreqs => Some("RoPE frequency factors"),
            Role::Router => Some("expert router"),
            Role::Embedding | Role::Linear | Role::Head => None,
        }
    }
}

/// Where a block tensor goes in the shared decoder block graph
/// ([`crate::llama::BlockWeights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Pre-attention norm gain.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Pre-MLP norm gain.
    FfnNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// Per-head query norm gain.
    QNorm,
    /// Per-head key norm gain.
    KNorm,
    /// Norm gain on the attention branch's output, before the residual add
    /// (Gemma 3, OLMo 2).
    AttnPostNorm,
    /// Norm gain on the MLP branch's output, before the residual add.
    FfnPostNorm,
    /// The shared expert's gate projection (a mixture of experts' dense MLP
    /// that every token runs through beside its routed experts).
    SharedGate,
    /// The shared expert's up projection.
    SharedUp,
    /// The shared expert's down projection.
    SharedDown,
    /// The router's per-expert selection bias (DeepSeek).
    RouterBias,
    /// Latent attention: the query's down-projection.
    QA,
    /// Latent attention: the norm gain after `QA`.
    QANorm,
    /// Latent attention: the query's up-projection.
    QB,
    /// Latent attention: the latent and shared RoPE key projection.
    KvA,
    /// Latent attention: the norm gain of the latent.
    KvANorm,
    /// Latent attention: per head, latent → key (no-RoPE part).
    KB,
    /// Latent attention: per head, latent → value.
    VB,
}

/// Which blocks hold a block tensor, in a model whose blocks alternate between
/// a dense MLP and a mixture of experts ([`crate::config::MoeConfig::interleave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// Every block.
    All,
    /// The blocks with a dense MLP.
    Dense,
    /// The mixture-of-experts blocks.
    Moe,
}

/// How HF stores a canonical block tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfLayout {
    /// As the canonical tensor, under [`TensorSpec::hf`] (one per expert when
    /// the name holds `{e}`).
    Plain,
    /// Half `part` (0 or 1) of a fused `[experts, in, 2·out]` tensor that HF
    /// multiplies as `x · W` (Llama 4's `gate_up_proj`): the canonical
    /// `[experts, out, in]` is that half transposed.
    FusedHalf(usize),
    /// A `[experts, in, out]` tensor that HF multiplies as `x · W` (Llama 4's
    /// experts' `down_proj`): the canonical `[experts, out, in]` transposed.
    Transposed,
    /// The key half of latent attention's `kv_b_proj` `[heads·(nope + v),
    /// kv_lora]` (per head its `nope` rows, then `v` rows): canonical
    /// `[heads, kv_lora, nope]`, each head's key rows transposed (llama.cpp's
    /// `attn_k_b`).
    LatentKeys,
    /// The value half of `kv_b_proj`: canonical `[heads, v, kv_lora]`, each
    /// head's value rows (llama.cpp's `attn_v_b`).
    LatentValues,
}

/// One dimension of a tensor, in terms of the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// `hidden_size`.
    Hidden,
    /// `intermediate_size`.
    Ffn,
    /// `vocab_size`.
    Vocab,
    /// `num_attention_heads × head_dim`.
    QDim,
    /// `num_key_value_heads × head_dim`.
    KvDim,
    /// `head_dim`.
    HeadDim,
    /// `head_dim / 2` (one RoPE frequency per pair).
    HalfHeadDim,
    /// The routed experts of a mixture-of-experts block.
    Experts,
    /// One routed expert's intermediate size.
    ExpertFfn,
    /// The shared expert's intermediate size.
    SharedFfn,
    /// Query heads.
    Heads,
    /// Latent attention: the query's rank.
    QLora,
    /// Latent attention: the key/value latent's width.
    KvLora,
    /// Latent attention: latent plus the shared RoPE key.
    KvLoraRope,
    /// Latent attention: all heads' queries (`heads·(nope + rope)`).
    MlaQ,
    /// Latent attention: per-head query/key width without RoPE.
    Nope,
    /// Latent attention: per-head value width.
    VHead,
    /// Latent attention: all heads' values (`heads·v`).
    MlaO,
}

impl Dim {
    /// The size of this dimension for `c`.
    pub fn size(self, c: &ModelConfig) -> usize {
        match self {
            Dim::Hidden => c.hidden_size,
            Dim::Ffn => c.intermediate_size,
            Dim::Vocab => c.vocab_size,
            Dim::QDim => c.q_dim(),
            Dim::KvDim => c.kv_dim(),
            Dim::HeadDim => c.head_dim,
            Dim::HalfHeadDim => c.head_dim / 2,
            Dim::Experts => c.moe.as_ref().map_or(0, |m| m.experts),
            Dim::ExpertFfn => c.moe.as_ref().map_or(0, |m| m.expert_ffn),
            Dim::SharedFfn => c.moe.as_ref().map_or(0, |m| m.shared_ffn),
            Dim::Heads => c.num_attention_heads,
            Dim::QLora => c.mla.map_or(0, |m| m.q_lora_rank),
            Dim::KvLora => c.mla.map_or(0, |m| m.kv_lora_rank),
            Dim::KvLoraRope => c.mla.map_or(0, |m| m.kv_lora_rank + c.head_dim),
            Dim::MlaQ => c.mla.map_or(0, |m| {
                c.num_attention_heads * (m.qk_nope_head_dim + c.head_dim)
            }),
            Dim::Nope => c.mla.map_or(0, |m| m.qk_nope_head_dim),
            Dim::VHead => c.mla.map_or(0, |m| m.v_head_dim),
            Dim::MlaO => c.mla.map_or(0, |m| c.num_attention_heads * m.v_head_dim),
        }
    }
}

/// One tensor of the architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorSpec {
    /// GGUF name (block tensors: the suffix after `blk.N.`).
    pub gguf: &'static str,
    /// HF name (block tensors: the suffix after `model.layers.N.`); empty when HF
    /// has no such tensor. A routed experts' tensor, which GGUF stacks into one
    /// `[experts, …]` tensor and HF stores one per expert, names the expert `{e}`
    /// (`mlp.experts.{e}.gate_proj.weight`).
    pub hf: &'static str,
    /// What it is for.
    pub role: Role,
    /// Shape, outermost first.
    pub shape: &'static [Dim],
    /// Its place in the block graph (block tensors only).
    pub slot: Option<Slot>,
    /// Which blocks hold it.
    pub blocks: Blocks,
    /// How HF stores it.
    pub hf_layout: HfLayout,
}

impl HfLayout {
    /// How many canonical tensors share the HF tensor (a fused tensor is
    /// written once all of them are there).
    pub fn parts(self) -> usize {
        match self {
            HfLayout::Plain | HfLayout::Transposed => 1,
            HfLayout::FusedHalf(_) | HfLayout::LatentKeys | HfLayout::LatentValues => 2,
        }
    }

    /// The shape of the HF tensor that holds a canonical tensor of shape
    /// `canonical` in a model with config `c`.
    pub fn hf_shape(self, canonical: &[usize], c: &ModelConfig) -> Vec<usize> {
        match (self, canonical) {
            (HfLayout::FusedHalf(_), &[e, out, inp]) => vec![e, inp, 2 * out],
            (HfLayout::Transposed, &[e, out, inp]) => vec![e, inp, out],
            (HfLayout::LatentKeys | HfLayout::LatentValues, _) => {
                let m = c.mla.unwrap_or(crate::config::MlaConfig {
                    q_lora_rank: 0,
                    kv_lora_rank: 0,
                    qk_nope_head_dim: 0,
                    v_head_dim: 0,
                });
                vec![
                    c.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim),
                    m.kv_lora_rank,
                ]
            }
            _ => canonical.to_vec(),
        }
    }

    /// For each canonical element of `canonical`, in order, its index in the
    /// HF tensor of shape `hf`.
    fn hf_indices(self, canonical: &[usize], hf: &[usize]) -> Vec<usize> {
        let [a, b, d] = match *canonical {
            [a, b, d] => [a, b, d],
            _ => return Vec::new(),
        };
        let mut out = Vec::with_capacity(a * b * d);
        for x in 0..a {
            for r in 0..b {
                for col in 0..d {
                    out.push(match self {
                        // [e, out, in] ← [e, in, width] at (x, col, offset + r).
                        HfLayout::FusedHalf(part) => x * d * 2 * b + col * 2 * b + part * b + r,
                        HfLayout::Transposed => x * d * b + col * b + r,
                        // [h, lora, nope] ← row h·(nope + v) + col, column r.
                        HfLayout::LatentKeys => {
                            let per_head = hf[0] / a;
                            (x * per_head + col) * hf[1] + r
                        }
                        // [h, v, lora] ← row h·(nope + v) + nope + r, column col.
                        HfLayout::LatentValues => {
                            let per_head = hf[0] / a;
                            let nope = per_head - b;
                            (x * per_head + nope + r) * hf[1] + col
                        }
                        HfLayout::Plain => (x * b + r) * d + col,
                    });
                }
            }
        }
        out
    }

    /// The canonical bytes of an HF tensor's `bytes` (elements of `elem`
    /// bytes, HF shape `hf`), for a canonical tensor of shape `canonical`.
    pub fn to_canonical(
        self,
        bytes: &[u8],
        elem: usize,
        hf: &[usize],
        canonical: &[usize],
    ) -> Vec<u8> {
        if self == HfLayout::Plain {
            return bytes.to_vec();
        }
        self.hf_indices(canonical, hf)
            .into_iter()
            .flat_map(|i| &bytes[i * elem..(i + 1) * elem])
            .copied()
            .collect()
    }

    /// Puts canonical `values` of shape `canonical` into `hf` (the HF
    /// tensor's values, of shape `hf_shape`): only this part's elements.
    pub fn fill_hf(self, values: &[f32], canonical: &[usize], hf_shape: &[usize], hf: &mut [f32]) {
        if self == HfLayout::Plain {
            hf.copy_from_slice(values);
            return;
        }
        for (i, &v) in self.hf_indices(canonical, hf_shape).into_iter().zip(values) {
            hf[i] = v;
        }
    }
}

impl TensorSpec {
    /// This spec, held only by `blocks`.
    pub(crate) const fn only_in(mut self, blocks: Blocks) -> Self {
        self.blocks = blocks;
        self
    }

    /// This spec, stored by HF as `layout` under `hf`.
    pub(crate) const fn stored_as(mut self, hf: &'static str, layout: HfLayout) -> Self {
        self.hf = hf;
        self.hf_layout = layout;
        self
    }
}

/// The pre-attention norm, q/k/v/o, the pre-MLP norm and the SwiGLU MLP that
/// every Llama-family block has, in forward order.
pub(crate) const LLAMA_BLOCK: [TensorSpec; 9] = [
    block_spec(
        "attn_norm.weight",
        "input_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::AttnNorm,
    ),
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
    block_spec(
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Role::Linear,
        &[Dim::Hidden, Dim::QDim],
        Slot::O,
    ),
    block_spec(
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::FfnNorm,
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
];

/// RMSNorm gains over each query and key head (`[head_dim]`, shared by the
/// heads: Qwen3, Gemma 3), applied before RoPE.
pub(crate) const PER_HEAD_QK_NORMS: [TensorSpec; 2] = [
    block_spec(
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
        Role::QkNorm,
        &[Dim::HeadDim],
        Slot::QNorm,
    ),
    block_spec(
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
        Role::QkNorm,
        &[Dim::HeadDim],
        Slot::KNorm,
    ),
];

/// RMSNorm gains over the whole query and key projections (`[heads·head_dim]`:
/// one rms couples all heads; OLMo 2, OLMoE), applied before RoPE.
pub(crate) const WHOLE_QK_NORMS: [TensorSpec; 2] = [
    block_spec(
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
        Role::QkNorm,
        &[Dim::QDim],
        Slot::QNorm,
    ),
    block_spec(
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
        Role::QkNorm,
        &[Dim::KvDim],
        Slot::KNorm,
    ),
];

/// A Llama block table followed by an architecture's extra tensors.
macro_rules! llama_block_with {
    ($($extra:expr),* $(,)?) => {
        [
            $crate::arch::LLAMA_BLOCK[0],
            $crate::arch::LLAMA_BLOCK[1],
            $crate::arch::LLAMA_BLOCK[2],
            $crate::arch::LLAMA_BLOCK[3],
            $crate::arch::LLAMA_BLOCK[4],
            $crate::arch::LLAMA_BLOCK[5],
            $crate::arch::LLAMA_BLOCK[6],
            $crate::arch::LLAMA_BLOCK[7],
            $crate::arch::LLAMA_BLOCK[8],
            $($extra),*
        ]
    };
}
pub(crate) use llama_block_with;

/// The tensors outside the blocks of a Llama-family model.
pub(crate) const LLAMA_GLOBALS: [TensorSpec; 3] = [
    global_spec(
        "token_embd.weight",
        "model.embed_tokens.weight",
        Role::Embedding,
        &[Dim::Vocab, Dim::Hidden],
    ),
    global_spec(
        "output_norm.weight",
        "model.norm.weight",
        Role::Norm,
        &[Dim::Hidden],
    ),
    global_spec(
        "output.weight",
        "lm_head.weight",
        Role::Head,
        &[Dim::Vocab, Dim::Hidden],
    ),
];

/// A block tensor of the table.
pub(crate) const fn block_spec(
    gguf: &'static str,
    hf: &'static str,
    role: Role,
    shape: &'static [Dim],
    slot: Slot,
) -> TensorSpec {
    TensorSpec {
        gguf,
        hf,
        role,
        shape,
        slot: Some(slot),
        blocks: Blocks::All,
        hf_layout: HfLayout::Plain,
    }
}

/// A tensor outside the blocks.
pub(crate) const fn global_spec(
    gguf: &'static str,
    hf: &'static str,
    role: Role,
    shape: &'static [Dim],
) -> TensorSpec {
    TensorSpec {
        gguf,
        hf,
        role,
        shape,
        slot: None,
        blocks: Blocks::All,
        hf_layout: HfLayout::Plain,
    }
}

/// Everything the pipeline knows about one architecture.
#[derive(Debug)]
pub struct Arch {
    /// The architecture's own name (reports, errors).
    pub name: &'static str,
    /// `general.architecture` in GGUF and the prefix of its hyperparameter keys.
    pub gguf_name: &'static str,
    /// For an architecture that shares its GGUF name with another (Mistral
    /// with a window is written as `llama`): whether a GGUF of that name is
    /// this one. `None`: every GGUF of the name that no other claims.
    pub gguf_claims: Option<fn(&GgufFile) -> bool>,
    /// HF `model_type` values read as this architecture; the first is written.
    pub hf_model_types: &'static [&'static str],
    /// HF class written in `architectures`.
    pub hf_class: &'static str,
    /// Block tensors that every block must have, in forward order.
    pub block: &'static [TensorSpec],
    /// Tensors outside the blocks (the head is optional: absent when tied).
    pub globals: &'static [TensorSpec],
    /// Whether GGUF stores the Q and K rows (and their biases) permuted per head
    /// for llama.cpp's interleaved ("normal") RoPE; HF never does.
    pub gguf_permutes_qk: bool,
    /// What HF's config says about this family that ours does not carry, written
    /// into `config.json` (for example `"attention_bias": true`).
    pub hf_extra: fn(&ModelConfig) -> serde_json::Map<String, serde_json::Value>,
    /// Where a per-channel scale of some linears' input can be folded exactly:
    /// (producer of that input, the linears that read it). A norm gain or the
    /// rows of a linear divided by `s` and the readers' columns multiplied by `s`
    /// compute the same function. AWQ folds only what is listed (llm-compressor
    /// keeps the same mappings per architecture).
    pub scale_folds: &'static [(Slot, &'static [Slot])],
    /// What HF stores for a norm gain g: `g − hf_norm_offset` (Gemma's RMSNorm
    /// multiplies by `1 + w`; its GGUF and our tensors hold `1 + w`).
    pub hf_norm_offset: f32,
    /// Whether the embedding output is multiplied by `√hidden` (Gemma).
    pub scales_embedding: bool,
    /// Reads what this family's HF `config.json` says beyond the shared fields
    /// (windows, per-layer RoPE, attention scale) into the config.
    pub read_hf: fn(&Value, &mut ModelConfig) -> Result<()>,
    /// Reads this family's `{arch}.*` GGUF keys beyond the shared ones.
    pub read_gguf: fn(&GgufFile, &mut ModelConfig) -> Result<()>,
    /// This family's GGUF keys beyond the shared ones, as `read_gguf` reads them.
    pub gguf_extra: fn(&ModelConfig) -> Vec<(String, MetaValue)>,
    /// Where llama.cpp would compute something else from a GGUF of this config
    /// than the config says (a window it ignores, a fixed layer pattern), said
    /// when such a GGUF is written. A GGUF means what llama.cpp computes, and
    /// our reader reads it that way.
    pub gguf_caveat: fn(&ModelConfig) -> Option<String>,
}

/// `gguf_caveat` of a family whose GGUF always means what its config says.
pub(crate) fn no_caveat(_: &ModelConfig) -> Option<String> {
    None
}

/// `read_hf` of a family whose config has nothing beyond the shared fields.
pub(crate) fn no_hf_fields(_: &Value, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

/// HF `layer_types` when the config has it: per layer, whether it is a
/// sliding-window layer (`"sliding_attention"`) or not (`"full_attention"`).
/// A list of another length than `num_hidden_layers` is an error naming both.
pub(crate) fn hf_sliding_layers(v: &Value, n_layers: usize) -> Result<Option<Vec<bool>>> {
    let list = match v.get("layer_types") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => anyhow::bail!("field 'layer_types' is {other}, expected a list"),
    };
    if list.len() != n_layers {
        anyhow::bail!(
            "field 'layer_types' lists {} layers but num_hidden_layers is {n_layers}",
            list.len()
        );
    }
    list.iter()
        .enumerate()
        .map(|(l, t)| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => anyhow::bail!(
                "field 'layer_types' entry {l} is {t}, expected \"sliding_attention\" or \"full_attention\""
            ),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// HF `layer_types` written from per-layer sliding flags.
pub(crate) fn hf_layer_types(c: &ModelConfig) -> Value {
    c.layer_types
        .iter()
        .map(|t| {
            if t.sliding {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect::<Vec<_>>()
        .into()
}

/// HF `sliding_window`: `None` when absent or null; 0 is an error naming it.
pub(crate) fn hf_window(v: &Value) -> Result<Option<usize>> {
    match v.get("sliding_window") {
        None | Some(Value::Null) => Ok(None),
        Some(w) => match w.as_u64() {
            Some(0) => anyhow::bail!(
                "field 'sliding_window' is 0: a window must hold at least the query's own position"
            ),
            Some(w) => Ok(Some(w as usize)),
            None => {
                anyhow::bail!("field 'sliding_window' is {w}, expected a positive integer or null")
            }
        },
    }
}

/// Whether the HF config sets a RoPE base itself (transformers 4's
/// `rope_theta` or 5's `rope_parameters.rope_theta`); where it does not, a
/// family's own default applies.
pub(crate) fn hf_sets_rope_theta(v: &Value) -> bool {
    let set = |x: Option<&Value>| x.is_some_and(|t| !t.is_null());
    set(v.get("rope_theta")) || set(v.get("rope_parameters").and_then(|p| p.get("rope_theta")))
}

/// `read_gguf` of a family with no GGUF keys beyond the shared ones.
pub(crate) fn no_gguf_keys(_: &GgufFile, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

/// `gguf_extra` of a family with no GGUF keys beyond the shared ones.
pub(crate) fn no_extra_keys(_: &ModelConfig) -> Vec<(String, MetaValue)> {
    Vec::new()
}

/// The exact folds of a pre-norm Llama block: the attention norm into q/k/v
/// (biases and per-head norms act after the projections, so they stay exact),
/// the MLP norm into gate/up, and up's rows into down's columns.
pub(crate) const LLAMA_FOLDS: &[(Slot, &[Slot])] = &[
    (Slot::AttnNorm, &[Slot::Q, Slot::K, Slot::V]),
    (Slot::FfnNorm, &[Slot::Gate, Slot::Up]),
    (Slot::Up, &[Slot::Down]),
];

/// The placeholder for the expert number in a per-expert HF name.
const EXPERT: &str = "{e}";

/// The expert number in HF suffix `suffix` if it is `pattern` with its `{e}`
/// filled in.
fn expert_of(pattern: &str, suffix: &str) -> Option<usize> {
    let (before, after) = pattern.split_once(EXPERT)?;
    let e = suffix.strip_prefix(before)?.strip_suffix(after)?;
    (!e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
        .then(|| e.parse().ok())
        .flatten()
}

/// Architectures are registered statics, one per name.
impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Arch {
    /// The architecture of GGUF file `g` whose `general.architecture` is `name`:
    /// one that claims the file, else the plain one of that name.
    pub fn from_gguf(name: &str, g: &GgufFile) -> Option<&'static Arch> {
        let named = || ARCHES.iter().copied().filter(|a| a.gguf_name == name);
        named()
            .find(|a| a.gguf_claims.is_some_and(|claims| claims(g)))
            .or_else(|| named().find(|a| a.gguf_claims.is_none()))
    }

    /// The architecture whose HF `model_type` is `model_type`.
    pub fn from_hf_model_type(model_type: &str) -> Option<&'static Arch> {
        ARCHES
            .iter()
            .copied()
            .find(|a| a.hf_model_types.contains(&model_type))
    }

    /// The supported names, for error messages.
    pub fn supported() -> String {
        ARCHES.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
    }

    /// The HF `model_type` this architecture writes.
    pub fn hf_model_type(&self) -> &'static str {
        self.hf_model_types[0]
    }

    /// GGUF suffixes of the block linears, in forward order (GPTQ's order).
    pub fn linears(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.block
            .iter()
            .filter(|s| s.role == Role::Linear)
            .map(|s| s.gguf)
    }

    /// The spec of block tensor `suffix` (GGUF suffix after `blk.N.`).
    pub fn block_tensor(&self, suffix: &str) -> Option<&'static TensorSpec> {
        self.block.iter().find(|s| s.gguf == suffix)
    }

    /// The spec of the block tensor that fills `slot`, if this architecture has
    /// one (in a model of dense and mixture-of-experts blocks, the first listed:
    /// see [`Arch::layer_slot`]).
    pub fn slot(&self, slot: Slot) -> Option<&'static TensorSpec> {
        self.block.iter().find(|s| s.slot == Some(slot))
    }

    /// The spec of the tensor that fills `slot` in block `l` of a model with
    /// config `c` (a dense block's `ffn_gate` or an expert block's
    /// `ffn_gate_exps`), if that block has one.
    pub fn layer_slot(&self, c: &ModelConfig, l: usize, slot: Slot) -> Option<&'static TensorSpec> {
        self.block
            .iter()
            .find(|s| s.slot == Some(slot) && c.block_has(l, s))
    }

    /// The GGUF suffixes of block `l`'s linears, in forward order.
    pub fn layer_linears<'c>(
        &'c self,
        c: &'c ModelConfig,
        l: usize,
    ) -> impl Iterator<Item = &'static str> + 'c {
        self.block
            .iter()
            .filter(move |s| s.role == Role::Linear && c.block_has(l, s))
            .map(|s| s.gguf)
    }

    /// The spec of a global tensor by GGUF name.
    pub fn global(&self, name: &str) -> Option<&'static TensorSpec> {
        self.globals.iter().find(|s| s.gguf == name)
    }

    /// The GGUF name of the global tensor with `role`: the embedding, the final
    /// norm ([`Role::Norm`] outside the blocks) or the output head.
    pub fn global_name(&self, role: Role) -> &'static str {
        self.globals
            .iter()
            .find(|s| s.role == role)
            .map_or("", |s| s.gguf)
    }

    /// The spec of any canonical (GGUF) tensor name, block or global.
    pub fn spec(&self, canonical: &str) -> Option<&'static TensorSpec> {
        match split_block(canonical) {
            Some((_, suffix)) => self.block_tensor(suffix),
            None => self.global(canonical),
        }
    }

    /// The role of a canonical tensor name, if this architecture knows it.
    pub fn role(&self, canonical: &str) -> Option<Role> {
        self.spec(canonical).map(|s| s.role)
    }

    /// Canonical (GGUF) name of an HF tensor name, if this architecture knows it.
    pub fn canonical_from_hf(&self, hf: &str) -> Option<String> {
        if let Some(g) = self.globals.iter().find(|s| !s.hf.is_empty() && s.hf == hf) {
            return Some(g.gguf.to_owned());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let spec = self
            .block
            .iter()
            .find(|s| s.hf == suffix || expert_of(s.hf, suffix).is_some())?;
        Some(crate::names::block(layer, spec.gguf))
    }

    /// How HF stores canonical block tensor `name` (plain for globals).
    pub fn hf_layout(&self, name: &str) -> HfLayout {
        split_block(name)
            .and_then(|(_, suffix)| self.block_tensor(suffix))
            .map_or(HfLayout::Plain, |s| s.hf_layout)
    }

    /// The HF names of a canonical routed-experts tensor, one per expert, or
    /// `None` when the tensor is not stored per expert in HF.
    pub fn hf_expert_names(&self, canonical: &str, experts: usize) -> Option<Vec<String>> {
        let (layer, suffix) = split_block(canonical)?;
        let spec = self.block_tensor(suffix)?;
        spec.hf.contains(EXPERT).then(|| {
            (0..experts)
                .map(|e| {
                    format!(
                        "model.layers.{layer}.{}",
                        spec.hf.replace(EXPERT, &e.to_string())
                    )
                })
                .collect()
        })
    }

    /// The expert number of a per-expert HF tensor name.
    pub fn hf_expert_index(&self, hf: &str) -> Option<usize> {
        let rest = hf.strip_prefix("model.layers.")?;
        let (_, suffix) = rest.split_once('.')?;
        self.block.iter().find_map(|s| expert_of(s.hf, suffix))
    }

    /// The router's spec, for a mixture-of-experts architecture.
    pub fn router(&self) -> Option<&'static TensorSpec> {
        self.block.iter().find(|s| s.role == Role::Router)
    }

    /// HF name of a canonical (GGUF) tensor name, if HF has such a tensor.
    pub fn hf_from_canonical(&self, name: &str) -> Option<String> {
        match split_block(name) {
            Some((layer, suffix)) => {
                let spec = self.block_tensor(suffix)?;
                // Stored one per expert: see `hf_expert_names`. Fused halves
                // name the HF tensor they share.
                (!spec.hf.contains(EXPERT)).then(|| format!("model.layers.{layer}.{}", spec.hf))
            }
            None => {
                let spec = self.global(name)?;
                (!spec.hf.is_empty()).then(|| spec.hf.to_owned())
            }
        }
    }

    /// [`Arch::hf_from_canonical`], or an error naming the tensor.
    pub fn hf_name(&self, canonical: &str) -> anyhow::Result<String> {
        self.hf_from_canonical(canonical).ok_or_else(|| {
            anyhow::anyhow!(
                "no HF name for tensor '{canonical}' of a '{}' model",
                self.name
            )
        })
    }

    /// The values HF stores for canonical tensor `name` holding `values`: a
    /// norm gain less [`Arch::hf_norm_offset`] (Gemma's `1 + w`).
    pub fn hf_values<'v>(&self, name: &str, values: &'v [f32]) -> std::borrow::Cow<'v, [f32]> {
        let off = self.hf_norm_offset;
        match self.role(name) {
            Some(Role::Norm | Role::QkNorm) if off != 0.0 => {
                values.iter().map(|v| v - off).collect::<Vec<_>>().into()
            }
            _ => values.into(),
        }
    }

    /// Whether GGUF stores the rows of this canonical tensor permuted per head
    /// (llama's Q and K weights and biases), and with how many heads.
    pub fn gguf_permuted_heads(&self, canonical: &str, c: &ModelConfig) -> Option<usize> {
        if !self.gguf_permutes_qk {
            return None;
        }
        let (_, suffix) = split_block(canonical)?;
        match self.block_tensor(suffix)?.slot? {
            Slot::Q | Slot::QBias => Some(c.num_attention_heads),
            Slot::K | Slot::KBias => Some(c.num_key_value_heads),
            _ => None,
        }
    }
}

/// `blk.N.suffix` as (N, suffix).
pub fn split_block(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    Some((layer.parse().ok()?, suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_every_architecture() {
        for arch in ARCHES {
            for spec in arch.block {
                let name = crate::names::block(3, spec.gguf);
                // Routed experts: one HF tensor per expert, all back to the stack.
                let hfs = match arch.hf_expert_names(&name, 4) {
                    Some(per_expert) => {
                        assert_eq!(arch.hf_from_canonical(&name), None);
                        assert_eq!(arch.hf_expert_index(&per_expert[2]), Some(2));
                        per_expert
                    }
                    None => vec![arch.hf_from_canonical(&name).unwrap()],
                };
                // A fused HF tensor reads back as the first canonical it holds.
                let first_holder = arch
                    .block
                    .iter()
                    .find(|s| s.hf == spec.hf)
                    .map(|s| crate::names::block(3, s.gguf));
                assert!(
                    spec.hf_layout != HfLayout::FusedHalf(0)
                        || first_holder.as_ref() == Some(&name)
                );
                for hf in hfs {
                    assert_eq!(arch.canonical_from_hf(&hf), first_holder, "{}", arch.name);
                }
            }
            for spec in arch.globals.iter().filter(|s| !s.hf.is_empty()) {
                let hf = arch.hf_from_canonical(spec.gguf).unwrap();
                assert_eq!(arch.canonical_from_hf(&hf).as_deref(), Some(spec.gguf));
            }
            assert_eq!(arch.canonical_from_hf("model.rotary_emb.inv_freq"), None);
            assert_eq!(Arch::from_hf_model_type(arch.hf_model_type()), Some(*arch));
            if arch.block.iter().any(|s| s.blocks != Blocks::All) {
                // Dense and expert blocks interleaved: checked by its own test.
                continue;
            }
            let mlp = if arch.router().is_some() {
                [
                    "ffn_gate_exps.weight",
                    "ffn_up_exps.weight",
                    "ffn_down_exps.weight",
                ]
            } else {
                ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
            };
            assert_eq!(
                arch.linears().collect::<Vec<_>>(),
                [
                    [
                        "attn_q.weight",
                        "attn_k.weight",
                        "attn_v.weight",
                        "attn_output.weight"
                    ]
                    .as_slice(),
                    &mlp
                ]
                .concat()
            );
        }
        assert_eq!(
            QWEN2.canonical_from_hf("model.layers.12.self_attn.k_proj.bias"),
            Some("blk.12.attn_k.bias".to_owned())
        );
        assert_eq!(
            LLAMA.canonical_from_hf("model.layers.12.self_attn.k_proj.bias"),
            None
        );
        assert_eq!(
            QWEN3
                .hf_from_canonical("blk.0.attn_q_norm.weight")
                .as_deref(),
            Some("model.layers.0.self_attn.q_norm.weight")
        );
    }

    #[test]
    fn llama4_blocks_alternate_dense_and_expert_mlps() {
        let v = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/moe/llama4/config.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let linears = |l| LLAMA4.layer_linears(&c, l).collect::<Vec<_>>();
        let attention = [
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
        ];
        let dense = ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"];
        let experts = [
            "ffn_gate_exps.weight",
            "ffn_up_exps.weight",
            "ffn_down_exps.weight",
            "ffn_gate_shexp.weight",
            "ffn_up_shexp.weight",
            "ffn_down_shexp.weight",
        ];
        assert_eq!(linears(0), [attention.as_slice(), &dense].concat());
        assert_eq!(linears(1), [attention.as_slice(), &experts].concat());
        assert_eq!(linears(2), linears(0));
        assert_eq!(linears(3), linears(1));
        assert_eq!(
            LLAMA4.layer_slot(&c, 1, Slot::Gate).unwrap().gguf,
            "ffn_gate_exps.weight"
        );
        assert_eq!(
            LLAMA4.layer_slot(&c, 2, Slot::Gate).unwrap().gguf,
            "ffn_gate.weight"
        );
        assert!(LLAMA4.layer_slot(&c, 2, Slot::SharedGate).is_none());
        let names = crate::names::all(&c);
        assert!(names.contains(&"blk.1.ffn_gate_inp.weight".to_owned()));
        assert!(!names.contains(&"blk.0.ffn_gate_inp.weight".to_owned()));
        assert!(!names.contains(&"blk.1.ffn_gate.weight".to_owned()));
    }

    #[test]
    fn fused_layouts_round_trip() {
        let c = crate::config::ModelConfig::from_hf_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}))
        .unwrap();
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        // [experts 2, in 3, 2·out 4] multiplied as x·W: gate = columns 0..2, up = 2..4.
        let hf: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let bytes: Vec<u8> = hf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (gate, up) = (HfLayout::FusedHalf(0), HfLayout::FusedHalf(1));
        assert_eq!(gate.hf_shape(&[2, 2, 3], &c), vec![2, 3, 4]);
        let canon = f32s(gate.to_canonical(&bytes, 4, &[2, 3, 4], &[2, 2, 3]));
        // Expert 0, gate row 1 = column 1 of W: elements 1, 5, 9.
        assert_eq!(&canon[3..6], &[1.0, 5.0, 9.0]);
        assert_eq!(&canon[6..9], &[12.0, 16.0, 20.0]);
        let mut back = vec![0f32; 24];
        gate.fill_hf(&canon, &[2, 2, 3], &[2, 3, 4], &mut back);
        let up_canon = f32s(up.to_canonical(&bytes, 4, &[2, 3, 4], &[2, 2, 3]));
        up.fill_hf(&up_canon, &[2, 2, 3], &[2, 3, 4], &mut back);
        assert_eq!(back, hf);
        let t = HfLayout::Transposed;
        assert_eq!(t.hf_shape(&[2, 4, 3], &c), vec![2, 3, 4]);
        let canon = f32s(t.to_canonical(&bytes, 4, &[2, 3, 4], &[2, 4, 3]));
        // Expert 1, row 2 = column 2 of W[1]: 14, 18, 22.
        assert_eq!(&canon[18..21], &[14.0, 18.0, 22.0]);
        // kv_b [heads 2 × (nope 2 + v 1), lora 3]: head 1's key rows are 3 and 4.
        let kvb: Vec<f32> = (0..18).map(|i| i as f32).collect();
        let bytes: Vec<u8> = kvb.iter().flat_map(|v| v.to_le_bytes()).collect();
        let keys = f32s(HfLayout::LatentKeys.to_canonical(&bytes, 4, &[6, 3], &[2, 3, 2]));
        // k_b[1] is [lora 3, nope 2] = rows 3, 4 transposed.
        assert_eq!(&keys[6..], &[9.0, 12.0, 10.0, 13.0, 11.0, 14.0]);
        let values = f32s(HfLayout::LatentValues.to_canonical(&bytes, 4, &[6, 3], &[2, 1, 3]));
        // v_b[h] is row h·3 + 2.
        assert_eq!(values, [6.0, 7.0, 8.0, 15.0, 16.0, 17.0]);
        let mut back = vec![0f32; 18];
        HfLayout::LatentKeys.fill_hf(&keys, &[2, 3, 2], &[6, 3], &mut back);
        HfLayout::LatentValues.fill_hf(&values, &[2, 1, 3], &[6, 3], &mut back);
        assert_eq!(back, kvb);
    }

    #[test]
    fn every_block_has_the_shared_graph() {
        for arch in ARCHES {
            // Latent attention replaces q/k/v with its own projections.
            let attention: &[Slot] = if arch.slot(Slot::KvA).is_some() {
                &[
                    Slot::QA,
                    Slot::QANorm,
                    Slot::QB,
                    Slot::KvA,
                    Slot::KvANorm,
                    Slot::KB,
                    Slot::VB,
                    Slot::O,
                ]
            } else {
                &[Slot::Q, Slot::K, Slot::V, Slot::O]
            };
            for &slot in attention.iter().chain(&[Slot::Gate, Slot::Up, Slot::Down]) {
                assert!(arch.slot(slot).is_some(), "{} lacks {slot:?}", arch.name);
            }
        }
    }
}
