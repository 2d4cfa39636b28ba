//! One naming scheme for tensors: the GGUF names (`blk.N.attn_q.weight`) are the
//! canonical ones; each architecture's description ([`crate::arch`]) maps them to
//! HF names and says what they are.

use crate::arch::Role;
use crate::config::ModelConfig;

/// The canonical name of block `layer`'s tensor with GGUF suffix `suffix`.
pub fn block(layer: usize, suffix: &str) -> String {
    format!("blk.{layer}.{suffix}")
}

/// The name of llama.cpp's per-tensor scale of weight `name` (`X.weight` →
/// `X.scale`); `None` for a name that is not a weight.
pub fn scale_of(name: &str) -> Option<String> {
    name.strip_suffix(".weight")
        .map(|base| format!("{base}.scale"))
}

/// The name of block `layer` as a whole (`blk.N`), as block-level reports use.
pub fn block_unit(layer: usize) -> String {
    format!("blk.{layer}")
}

/// The block number of a canonical block tensor name (`blk.N.…`) or of a block
/// unit (`blk.N`).
pub fn block_index(name: &str) -> Option<usize> {
    crate::arch::split_block(name)
        .map(|(l, _)| l)
        .or_else(|| name.strip_prefix("blk.")?.parse().ok())
}

/// Every canonical tensor name of a model with config `c`, in file order (the
/// embedding, each block's tensors in its description's order, the final norm,
/// the output head when untied, and the RoPE frequency factors when the
/// architecture stores its rope scaling as a tensor).
pub fn all(c: &ModelConfig) -> Vec<String> {
    let arch = c.arch;
    let mut names = Vec::new();
    for spec in arch.globals.iter().filter(|s| s.role == Role::Embedding) {
        names.push(spec.gguf.to_owned());
    }
    for l in 0..c.num_hidden_layers {
        names.extend(
            arch.block
                .iter()
                .filter(|s| c.block_has(l, s))
                .map(|s| block(l, s.gguf)),
        );
    }
    for spec in arch.globals {
        let present = match spec.role {
            Role::Embedding => false,
            Role::Head => !c.tie_word_embeddings,
            Role::RopeFreqs => c
                .rope_scaling
                .as_ref()
                .is_some_and(|s| s.is_per_frequency()),
            _ => true,
        };
        if present {
            names.push(spec.gguf.to_owned());
        }
    }
    names
}

/// Whether HF checkpoints may hold `hf` beside the described tensors without it
/// meaning anything (buffers older transformers saved).
pub fn ignorable_hf(hf: &str) -> bool {
    hf.ends_with("rotary_emb.inv_freq")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn all_names_follow_the_description() {
        let v = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
                       "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "tie_word_embeddings": true});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let names = all(&c);
        assert_eq!(names.len(), 1 + 2 * 12 + 1);
        assert_eq!(names[0], "token_embd.weight");
        assert!(names.contains(&"blk.1.attn_v.bias".to_owned()));
        assert_eq!(names.last().unwrap(), "output_norm.weight");
        assert_eq!(block_index("blk.12.ffn_down.weight"), Some(12));
        assert_eq!(block_index("blk.x.ffn_down.weight"), None);
        assert_eq!(block_index(&block_unit(7)), Some(7));
    }
}
