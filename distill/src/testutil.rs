//! Shared pieces of the unit tests: tiny configurations that still have every
//! feature of the real ones (grouped-query attention, two blocks, tied or untied
//! head; q/k/v biases for qwen2, per-head q/k norms and a head width of its own
//! for qwen3; for the newer families, the real Gemma 3, OLMo 2 and SmolLM3
//! descriptions at toy widths, see [`tiny_gemma_config`], [`tiny_olmo_config`],
//! [`tiny_nope_window_config`]) and random parameters for them.

use crate::float::Float;
use crate::params::Params;
use model::arch::{Arch, Role};
use model::config::{Activation, LayerType, ModelConfig};
use rand::{Rng, SeedableRng};

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

/// Every tiny configuration: llama, qwen2, qwen3, [`newer_family_configs`]
/// and [`moe_configs`], each tied and untied.
pub fn all_tiny_configs() -> Vec<ModelConfig> {
    [tiny_config, tiny_qwen2_config, tiny_qwen3_config]
        .into_iter()
        .flat_map(|f| [f(true), f(false)])
        .chain(newer_family_configs())
        .chain(moe_configs())
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
        pad_token_id: None,
        hidden_act: model::config::Activation::Silu,
        sliding_window: None,
        layer_types: vec![model::config::LayerType::GLOBAL; 2],
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        moe: None,
        chunked_attention: None,
        rope_interleaved: false,
        mla: None,
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
            // In features: the last dimension (of each expert's matrix too).
            Some(1.5 / (t.shape[t.shape.len() - 1] as f64).sqrt())
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

/// A tiny Gemma 3 ([`model::arch::GEMMA3`]'s block) with heads 6 wide, GELU-tanh,
/// scores scaled by `1/√10` (`query_pre_attn_scalar` 10, not `head_dim`),
/// layer 0 sliding with a window of 2 and a RoPE base of its own (10), layer 1
/// global (base 10000).
pub fn tiny_gemma_config(tied: bool) -> ModelConfig {
    let mut c = tiny_arch_config(&model::arch::GEMMA3, tied, 6);
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

/// A tiny OLMo 2 ([`model::arch::OLMO2`]'s block: no pre-norms, post-norms, q/k norms
/// over the whole projection), full causal attention.
pub fn tiny_olmo_config(tied: bool) -> ModelConfig {
    tiny_arch_config(&model::arch::OLMO2, tied, 4)
}

/// A tiny SmolLM3 with a window (the llama block): layer 0 with RoPE
/// and layer 1 without (NoPE), both sliding with a window of 3.
pub fn tiny_nope_window_config(tied: bool) -> ModelConfig {
    let mut c = tiny_arch_config(&model::arch::SMOLLM3, tied, 4);
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

/// The Gemma 3, OLMo 2 and SmolLM3 (windowed) configurations, each
/// tied and untied.
pub fn newer_family_configs() -> Vec<ModelConfig> {
    [tiny_gemma_config, tiny_olmo_config, tiny_nope_window_config]
        .into_iter()
        .flat_map(|f| [f(true), f(false)])
        .collect()
}

/// A tiny mixture of experts of architecture `arch` with heads of `head_dim`:
/// four experts 6 wide, two per token, renormalised or not.
pub fn tiny_moe_config(
    arch: &'static Arch,
    tied: bool,
    head_dim: usize,
    norm_topk_prob: bool,
) -> ModelConfig {
    let mut c = tiny_arch_config(arch, tied, head_dim);
    c.moe = Some(model::config::MoeConfig::softmax(4, 2, 6, norm_topk_prob));
    c.validate()
        .expect("tiny mixture-of-experts config is consistent");
    c
}

/// The trainable mixtures of experts: Qwen3-MoE (per-head q/k norms, heads 6
/// wide, renormalised top-2), Mixtral (the llama block, renormalised) and
/// OLMoE (q/k norms over the whole projection, top-2 probabilities as they
/// are), each tied and untied.
pub fn moe_configs() -> Vec<ModelConfig> {
    [
        (&model::arch::QWEN3_MOE, 6, true),
        (&model::arch::MIXTRAL, 4, true),
        (&model::arch::OLMOE, 4, false),
    ]
    .into_iter()
    .flat_map(|(arch, hd, norm)| [true, false].map(|tied| tiny_moe_config(arch, tied, hd, norm)))
    .collect()
}
