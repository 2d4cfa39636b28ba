//! Shared pieces of the unit tests: tiny configurations that still have every
//! feature of the real ones (grouped-query attention, two blocks, tied or untied
//! head; q/k/v biases for qwen2, per-head q/k norms and a head width of its own
//! for qwen3; for the issue-17 families, test-only descriptions of their blocks:
//! a Gemma-3-like, an OLMo-2-like and a SmolLM3/Mistral-like model, see
//! [`tiny_gemma_config`], [`tiny_olmo_config`], [`tiny_nope_window_config`]) and
//! random parameters for them.

use crate::float::Float;
use crate::params::Params;
use model::arch::{Arch, Dim, Role, Slot, TensorSpec};
use model::config::{Activation, LayerType, ModelConfig};
use model::gguf::{GgufFile, MetaValue};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

/// Llama: vocabulary 11, hidden 8, two query heads of 4 sharing one kv head,
/// FFN 12, two blocks.
pub fn tiny_config(tied: bool) -> ModelConfig {
    tiny_arch_config(&model::arch::LLAMA, tied, 4)
}

/// A tiny qwen2 (q/k/v biases), otherwise [`tiny_config`].
pub fn tiny_qwen2_config(tied: bool) -> ModelConfig {
    tiny_arch_config(&model::arch::QWEN2, tied, 4)
}

/// A tiny qwen3 (per-head q/k norms) whose heads are 6 wide, so
/// `heads·head_dim = 12` differs from the hidden size 8.
pub fn tiny_qwen3_config(tied: bool) -> ModelConfig {
    tiny_arch_config(&model::arch::QWEN3, tied, 6)
}

/// Every tiny configuration: llama, qwen2, qwen3 and
/// [`issue17_tiny_configs`], each tied and untied.
pub fn all_tiny_configs() -> Vec<ModelConfig> {
    [tiny_config, tiny_qwen2_config, tiny_qwen3_config]
        .into_iter()
        .flat_map(|f| [f(true), f(false)])
        .chain(issue17_tiny_configs())
        .collect()
}

/// [`tiny_config`]'s sizes for architecture `arch` with heads of `head_dim`.
pub fn tiny_arch_config(arch: &'static Arch, tied: bool, head_dim: usize) -> ModelConfig {
    let c = ModelConfig {
        arch,
        rope_scaling: None,
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
        hidden_act: model::config::Activation::Silu,
        sliding_window: None,
        layer_types: vec![model::config::LayerType::GLOBAL; 2],
        rope_local_theta: None,
        query_pre_attn_scalar: None,
    };
    c.validate().expect("tiny config is consistent");
    c
}

/// Random parameters: matrices uniform in ±1.5/√(in features) (activations stay
/// of order one through the blocks), norm gains 1 ± 0.3, biases uniform ±0.5,
/// embedding uniform ±1.
/// Drawn in f64 and rounded, so `random_params::<f32>` is the cast of the f64 one.
pub fn random_params<T: Float>(config: &ModelConfig, seed: u64) -> Params<T> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut p = Params::<f64>::zeros(config);
    for t in p.tensors_mut() {
        let bound = if config.arch.role(&t.name) == Some(Role::Bias) {
            Some(0.5)
        } else if t.shape.len() == 1 {
            None
        } else if t.name == "token_embd.weight" {
            Some(1.0)
        } else {
            Some(1.5 / (t.shape[1] as f64).sqrt())
        };
        for x in t.data.iter_mut() {
            *x = match bound {
                None => 1.0 + rng.gen_range(-0.3..0.3),
                Some(b) => rng.gen_range(-b..b),
            };
        }
    }
    p.cast()
}

/// `n` uniform values in ±`spread`.
pub fn random_vec<T: Float>(n: usize, spread: f64, seed: u64) -> Vec<T> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| T::from_f64(rng.gen_range(-spread..spread)))
        .collect()
}

// ---------------------------------------------------------------------------
// Test-only descriptions of the issue-17 block shapes. They name their tensors
// as the real families do (GGUF names from llama.cpp's converter, HF names from
// transformers), but are not registered: only their blocks and flags matter here.

/// A block tensor of a test description.
const fn spec(
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
    }
}

/// A global tensor of a test description.
const fn global(
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
    }
}

/// Embedding, final norm and (untied) head, as every family has them.
static GLOBALS: [TensorSpec; 3] = [
    global(
        "token_embd.weight",
        "model.embed_tokens.weight",
        Role::Embedding,
        &[Dim::Vocab, Dim::Hidden],
    ),
    global(
        "output_norm.weight",
        "model.norm.weight",
        Role::Norm,
        &[Dim::Hidden],
    ),
    global(
        "output.weight",
        "lm_head.weight",
        Role::Head,
        &[Dim::Vocab, Dim::Hidden],
    ),
];

const ATTN_NORM: TensorSpec = spec(
    "attn_norm.weight",
    "input_layernorm.weight",
    Role::Norm,
    &[Dim::Hidden],
    Slot::AttnNorm,
);
const Q: TensorSpec = spec(
    "attn_q.weight",
    "self_attn.q_proj.weight",
    Role::Linear,
    &[Dim::QDim, Dim::Hidden],
    Slot::Q,
);
const K: TensorSpec = spec(
    "attn_k.weight",
    "self_attn.k_proj.weight",
    Role::Linear,
    &[Dim::KvDim, Dim::Hidden],
    Slot::K,
);
const V: TensorSpec = spec(
    "attn_v.weight",
    "self_attn.v_proj.weight",
    Role::Linear,
    &[Dim::KvDim, Dim::Hidden],
    Slot::V,
);
const O: TensorSpec = spec(
    "attn_output.weight",
    "self_attn.o_proj.weight",
    Role::Linear,
    &[Dim::Hidden, Dim::QDim],
    Slot::O,
);
const ATTN_POST_NORM: TensorSpec = spec(
    "post_attention_norm.weight",
    "post_attention_layernorm.weight",
    Role::Norm,
    &[Dim::Hidden],
    Slot::AttnPostNorm,
);
const GATE: TensorSpec = spec(
    "ffn_gate.weight",
    "mlp.gate_proj.weight",
    Role::Linear,
    &[Dim::Ffn, Dim::Hidden],
    Slot::Gate,
);
const UP: TensorSpec = spec(
    "ffn_up.weight",
    "mlp.up_proj.weight",
    Role::Linear,
    &[Dim::Ffn, Dim::Hidden],
    Slot::Up,
);
const DOWN: TensorSpec = spec(
    "ffn_down.weight",
    "mlp.down_proj.weight",
    Role::Linear,
    &[Dim::Hidden, Dim::Ffn],
    Slot::Down,
);
const FFN_POST_NORM: TensorSpec = spec(
    "post_ffw_norm.weight",
    "post_feedforward_layernorm.weight",
    Role::Norm,
    &[Dim::Hidden],
    Slot::FfnPostNorm,
);

/// Gemma 3's block: pre- and post-norms on both branches, per-head q/k norms.
static GEMMA_BLOCK: [TensorSpec; 13] = [
    ATTN_NORM,
    Q,
    K,
    V,
    O,
    spec(
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
        Role::QkNorm,
        &[Dim::HeadDim],
        Slot::QNorm,
    ),
    spec(
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
        Role::QkNorm,
        &[Dim::HeadDim],
        Slot::KNorm,
    ),
    ATTN_POST_NORM,
    spec(
        "ffn_norm.weight",
        "pre_feedforward_layernorm.weight",
        Role::Norm,
        &[Dim::Hidden],
        Slot::FfnNorm,
    ),
    GATE,
    UP,
    DOWN,
    FFN_POST_NORM,
];

/// OLMo 2's block: no pre-norms, post-norms on both branches, q/k norms over
/// the whole projection.
static OLMO_BLOCK: [TensorSpec; 11] = [
    Q,
    K,
    V,
    O,
    spec(
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
        Role::QkNorm,
        &[Dim::QDim],
        Slot::QNorm,
    ),
    spec(
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
        Role::QkNorm,
        &[Dim::KvDim],
        Slot::KNorm,
    ),
    ATTN_POST_NORM,
    GATE,
    UP,
    DOWN,
    FFN_POST_NORM,
];

fn no_hf_extra(_: &ModelConfig) -> Map<String, Value> {
    Map::new()
}

fn no_hf_fields(_: &Value, _: &mut ModelConfig) -> anyhow::Result<()> {
    Ok(())
}

fn no_gguf_keys(_: &GgufFile, _: &mut ModelConfig) -> anyhow::Result<()> {
    Ok(())
}

fn no_extra_keys(_: &ModelConfig) -> Vec<(String, MetaValue)> {
    Vec::new()
}

/// A Gemma-3-like description: [`GEMMA_BLOCK`], the embedding scaled by
/// `√hidden`, HF norm gains stored as `g − 1`.
pub static TEST_GEMMA: Arch = Arch {
    name: "test-gemma",
    gguf_name: "test-gemma",
    gguf_claims: None,
    hf_model_types: &["test-gemma"],
    hf_class: "TestGemmaForCausalLM",
    block: &GEMMA_BLOCK,
    globals: &GLOBALS,
    gguf_permutes_qk: false,
    hf_extra: no_hf_extra,
    scale_folds: &[],
    hf_norm_offset: 1.0,
    scales_embedding: true,
    read_hf: no_hf_fields,
    read_gguf: no_gguf_keys,
    gguf_extra: no_extra_keys,
};

/// An OLMo-2-like description: [`OLMO_BLOCK`].
pub static TEST_OLMO: Arch = Arch {
    name: "test-olmo",
    gguf_name: "test-olmo",
    gguf_claims: None,
    hf_model_types: &["test-olmo"],
    hf_class: "TestOlmoForCausalLM",
    block: &OLMO_BLOCK,
    globals: &GLOBALS,
    gguf_permutes_qk: false,
    hf_extra: no_hf_extra,
    scale_folds: &[],
    hf_norm_offset: 0.0,
    scales_embedding: false,
    read_hf: no_hf_fields,
    read_gguf: no_gguf_keys,
    gguf_extra: no_extra_keys,
};

/// A tiny Gemma 3: [`TEST_GEMMA`]'s block with heads 6 wide, GELU-tanh,
/// scores scaled by `1/√10` (`query_pre_attn_scalar` 10, not `head_dim`),
/// layer 0 sliding with a window of 2 and a RoPE base of its own (10), layer 1
/// global (base 10000).
pub fn tiny_gemma_config(tied: bool) -> ModelConfig {
    let mut c = tiny_arch_config(&TEST_GEMMA, tied, 6);
    c.hidden_act = Activation::GeluTanh;
    c.query_pre_attn_scalar = Some(10.0);
    c.sliding_window = Some(2);
    c.layer_types = vec![
        LayerType {
            sliding: true,
            rope: true,
        },
        LayerType::GLOBAL,
    ];
    c.rope_local_theta = Some(10.0);
    c.validate().expect("tiny gemma config is consistent");
    c
}

/// A tiny OLMo 2: [`TEST_OLMO`]'s block (no pre-norms, post-norms, q/k norms
/// over the whole projection), full causal attention.
pub fn tiny_olmo_config(tied: bool) -> ModelConfig {
    tiny_arch_config(&TEST_OLMO, tied, 4)
}

/// A tiny SmolLM3 / sliding-window Mistral: the llama block, layer 0 with RoPE
/// and layer 1 without (NoPE), both sliding with a window of 3.
pub fn tiny_nope_window_config(tied: bool) -> ModelConfig {
    let mut c = tiny_arch_config(&model::arch::LLAMA, tied, 4);
    c.sliding_window = Some(3);
    c.layer_types = vec![
        LayerType {
            sliding: true,
            rope: true,
        },
        LayerType {
            sliding: true,
            rope: false,
        },
    ];
    c.validate().expect("tiny NoPE config is consistent");
    c
}

/// The issue-17 configurations: gemma-, olmo- and SmolLM3/Mistral-like, each
/// tied and untied.
pub fn issue17_tiny_configs() -> Vec<ModelConfig> {
    [tiny_gemma_config, tiny_olmo_config, tiny_nope_window_config]
        .into_iter()
        .flat_map(|f| [f(true), f(false)])
        .collect()
}
