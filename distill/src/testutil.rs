//! Shared pieces of the unit tests: a tiny configuration that still has every
//! feature of the real one (grouped-query attention, two blocks, tied or untied
//! head) and random parameters for it.

use crate::float::Float;
use crate::params::Params;
use model::config::ModelConfig;
use rand::{Rng, SeedableRng};

/// Vocabulary 11, hidden 8, two query heads of 4 sharing one kv head, FFN 12,
/// two blocks.
pub fn tiny_config(tied: bool) -> ModelConfig {
    let c = ModelConfig {
        arch: &model::arch::LLAMA,
        rope_scaling: None,
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
    };
    c.validate().expect("tiny config is consistent");
    c
}

/// Random parameters: matrices uniform in ±1.5/√(in features) (activations stay
/// of order one through the blocks), norm gains 1 ± 0.3, embedding uniform ±1.
/// Drawn in f64 and rounded, so `random_params::<f32>` is the cast of the f64 one.
pub fn random_params<T: Float>(config: &ModelConfig, seed: u64) -> Params<T> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut p = Params::<f64>::zeros(config);
    for t in p.tensors_mut() {
        let bound = if t.shape.len() == 1 {
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
