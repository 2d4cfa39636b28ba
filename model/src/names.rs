//! One naming scheme for tensors: the GGUF names (`blk.N.attn_q.weight`) are the
//! canonical ones; HF names (`model.layers.N.self_attn.q_proj.weight`) map onto them.

/// The per-block tensors, as (GGUF suffix, HF suffix), in forward order.
pub const BLOCK_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The tensors outside the blocks, as (GGUF name, HF name).
pub const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The canonical name of block `layer`'s tensor with GGUF suffix `suffix`.
pub fn block(layer: usize, suffix: &str) -> String {
    format!("blk.{layer}.{suffix}")
}

/// The block number of a canonical block tensor name (`blk.N.…`).
pub fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// Canonical (GGUF) name of an HF tensor name, if it is a known Llama tensor.
pub fn canonical_from_hf(hf: &str) -> Option<String> {
    if let Some(&(g, _)) = GLOBAL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(g, _) = BLOCK_TENSORS.iter().find(|(_, h)| *h == suffix)?;
    Some(block(layer, g))
}

/// HF name of a canonical (GGUF) tensor name, if it is a known Llama tensor.
pub fn hf_from_canonical(name: &str) -> Option<String> {
    if let Some(&(_, h)) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == name) {
        return Some(h.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(_, h) = BLOCK_TENSORS.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// Every canonical tensor name of a model with `layers` blocks, in file order
/// (embedding, blocks, final norm, then the output head when untied).
pub fn all(layers: usize, tied: bool) -> Vec<String> {
    let mut names = vec![GLOBAL_TENSORS[0].0.to_owned()];
    for l in 0..layers {
        names.extend(BLOCK_TENSORS.iter().map(|(g, _)| block(l, g)));
    }
    names.push(GLOBAL_TENSORS[1].0.to_owned());
    if !tied {
        names.push(GLOBAL_TENSORS[2].0.to_owned());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for n in all(3, false) {
            let hf = hf_from_canonical(&n).unwrap();
            assert_eq!(canonical_from_hf(&hf).as_deref(), Some(n.as_str()));
        }
        assert_eq!(
            canonical_from_hf("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            canonical_from_hf("model.layers.x.mlp.down_proj.weight"),
            None
        );
        assert_eq!(canonical_from_hf("model.rotary_emb.inv_freq"), None);
    }
}
