//! The GGUF quantization mixes llama.cpp users know (`Q4_K_M`, `Q3_K_S`, …): a base
//! type plus per-tensor upgrades (output/embedding, `attn_v`, `ffn_down` and the
//! experts' `ffn_down_exps`, `attn_output`; `attn_k`/`attn_v`/`attn_output` of
//! 8-expert models) following `llama_tensor_get_type` for the llama architecture,
//! then a fallback for rows that do not fit the type's block size, and the user's
//! `REGEX=TYPE` overrides.

use anyhow::{bail, Result};
use kernels::GgmlType;
use model::arch::{Role, Slot};
use model::names;
use model::ModelConfig;
use regex::Regex;

/// A named quantization mix.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    NVFP4,
    Q1_0,
    Q2_0,
    TQ1_0,
    TQ2_0,
    MXFP4_MOE,
}

/// Every mix, in the order `--help` lists them.
pub const ALL_MIXES: [Mix; 25] = [
    Mix::TQ1_0,
    Mix::Q1_0,
    Mix::TQ2_0,
    Mix::Q2_0,
    Mix::Q2_K,
    Mix::Q3_K_S,
    Mix::Q3_K_M,
    Mix::Q3_K_L,
    Mix::Q4_0,
    Mix::Q4_1,
    Mix::Q4_K_S,
    Mix::Q4_K_M,
    Mix::Q5_0,
    Mix::Q5_1,
    Mix::Q5_K_S,
    Mix::Q5_K_M,
    Mix::Q6_K,
    Mix::Q8_0,
    Mix::IQ4_NL,
    Mix::IQ4_XS,
    Mix::NVFP4,
    Mix::MXFP4_MOE,
    Mix::F16,
    Mix::BF16,
    Mix::F32,
];

impl Mix {
    /// The name llama-quantize uses.
    pub fn name(self) -> &'static str {
        match self {
            Mix::F32 => "F32",
            Mix::F16 => "F16",
            Mix::BF16 => "BF16",
            Mix::Q8_0 => "Q8_0",
            Mix::Q4_0 => "Q4_0",
            Mix::Q4_1 => "Q4_1",
            Mix::Q5_0 => "Q5_0",
            Mix::Q5_1 => "Q5_1",
            Mix::Q2_K => "Q2_K",
            Mix::Q3_K_S => "Q3_K_S",
            Mix::Q3_K_M => "Q3_K_M",
            Mix::Q3_K_L => "Q3_K_L",
            Mix::Q4_K_S => "Q4_K_S",
            Mix::Q4_K_M => "Q4_K_M",
            Mix::Q5_K_S => "Q5_K_S",
            Mix::Q5_K_M => "Q5_K_M",
            Mix::Q6_K => "Q6_K",
            Mix::IQ4_NL => "IQ4_NL",
            Mix::IQ4_XS => "IQ4_XS",
            Mix::NVFP4 => "NVFP4",
            Mix::Q1_0 => "Q1_0",
            Mix::Q2_0 => "Q2_0",
            Mix::TQ1_0 => "TQ1_0",
            Mix::TQ2_0 => "TQ2_0",
            Mix::MXFP4_MOE => "MXFP4_MOE",
        }
    }

    /// The mix named `s` (case-insensitive), or an error listing the valid names.
    pub fn from_name(s: &str) -> Result<Self> {
        if let Some(m) = ALL_MIXES.iter().find(|m| m.name().eq_ignore_ascii_case(s)) {
            return Ok(*m);
        }
        let names: Vec<_> = ALL_MIXES.iter().map(|m| m.name()).collect();
        bail!(
            "unknown quantization type '{s}'; valid types: {}",
            names.join(", ")
        )
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Mix::F32 => 0,
            Mix::F16 => 1,
            Mix::Q4_0 => 2,
            Mix::Q4_1 => 3,
            Mix::Q8_0 => 7,
            Mix::Q5_0 => 8,
            Mix::Q5_1 => 9,
            Mix::Q2_K => 10,
            Mix::Q3_K_S => 11,
            Mix::Q3_K_M => 12,
            Mix::Q3_K_L => 13,
            Mix::Q4_K_S => 14,
            Mix::Q4_K_M => 15,
            Mix::Q5_K_S => 16,
            Mix::Q5_K_M => 17,
            Mix::Q6_K => 18,
            Mix::IQ4_NL => 25,
            Mix::IQ4_XS => 30,
            Mix::BF16 => 32,
            Mix::NVFP4 => 39,
            Mix::Q1_0 => 40,
            Mix::Q2_0 => 41,
            Mix::TQ1_0 => 36,
            Mix::TQ2_0 => 37,
            Mix::MXFP4_MOE => 38,
        }
    }

    /// The type most tensors get.
    pub fn base_type(self) -> GgmlType {
        match self {
            Mix::F32 => GgmlType::F32,
            Mix::F16 => GgmlType::F16,
            Mix::BF16 => GgmlType::BF16,
            Mix::Q8_0 => GgmlType::Q8_0,
            Mix::Q4_0 => GgmlType::Q4_0,
            Mix::Q4_1 => GgmlType::Q4_1,
            Mix::Q5_0 => GgmlType::Q5_0,
            Mix::Q5_1 => GgmlType::Q5_1,
            Mix::Q2_K => GgmlType::Q2_K,
            Mix::Q3_K_S | Mix::Q3_K_M | Mix::Q3_K_L => GgmlType::Q3_K,
            Mix::Q4_K_S | Mix::Q4_K_M => GgmlType::Q4_K,
            Mix::Q5_K_S | Mix::Q5_K_M => GgmlType::Q5_K,
            Mix::Q6_K => GgmlType::Q6_K,
            Mix::IQ4_NL => GgmlType::IQ4_NL,
            Mix::IQ4_XS => GgmlType::IQ4_XS,
            Mix::NVFP4 => GgmlType::NVFP4,
            Mix::Q1_0 => GgmlType::Q1_0,
            Mix::Q2_0 => GgmlType::Q2_0,
            Mix::TQ1_0 => GgmlType::TQ1_0,
            Mix::TQ2_0 => GgmlType::TQ2_0,
            Mix::MXFP4_MOE => GgmlType::MXFP4,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Mix::F32 | Mix::F16 | Mix::BF16)
    }
}

/// The type chosen for one tensor, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Storage type.
    pub ty: GgmlType,
    /// Human-readable reason when it differs from the mix's base type.
    pub note: Option<String>,
}

/// `llama.cpp`'s layers that get more bits in the `_M` mixes: the first and last
/// eighth, and every third layer in between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8
        || layer >= 7 * n_layers / 8
        || (layer as i64 - (n_layers / 8) as i64) % 3 == 2
}

/// The type llama.cpp would choose before checking the row length.
fn mix_type(mix: Mix, name: &str, cfg: &ModelConfig, has_imatrix: bool) -> GgmlType {
    let base = mix.base_type();
    if mix.is_float() {
        return base;
    }
    // The layers llama.cpp counts for ffn_down's rules: every tensor named
    // ffn_down* (one per block in a dense model).
    let n_down: usize = (0..cfg.num_hidden_layers)
        .map(|l| {
            cfg.arch
                .block
                .iter()
                .filter(|s| {
                    matches!(s.slot, Some(Slot::Down | Slot::SharedDown)) && cfg.block_has(l, s)
                })
                .count()
        })
        .sum();
    let n = cfg.num_hidden_layers;
    let gqa = cfg.num_attention_heads / cfg.num_key_value_heads.max(1);
    let arch = cfg.arch;
    let role = arch.role(name);
    let is_output =
        role == Some(Role::Head) || (cfg.tie_word_embeddings && role == Some(Role::Embedding));
    // MXFP4_MOE: the stacked experts (3-D tensors, `*_exps`) in MXFP4, every
    // other tensor, the output included, in Q8_0.
    if mix == Mix::MXFP4_MOE {
        return if name.contains("_exps") {
            GgmlType::MXFP4
        } else {
            GgmlType::Q8_0
        };
    }
    if is_output {
        // Rows that are not whole super-blocks of the base type get Q8_0 outright.
        if !cfg.hidden_size.is_multiple_of(base.block_elems()) {
            return GgmlType::Q8_0;
        }
        return if base == GgmlType::Q8_0 {
            base
        } else {
            GgmlType::Q6_K
        };
    }
    // An untied embedding of the ternary-like mixes gets Q4_K, as llama.cpp
    // gives TQ1_0, TQ2_0 and Q2_0.
    if role == Some(Role::Embedding) && matches!(mix, Mix::Q2_0 | Mix::TQ1_0 | Mix::TQ2_0) {
        return GgmlType::Q4_K;
    }
    let (Some(layer), Some(slot)) = (
        names::block_index(name),
        arch.spec(name).and_then(|s| s.slot),
    ) else {
        return base;
    };
    use GgmlType as T;
    // llama.cpp's rules for a model of exactly 8 experts (Mixtral): K and V
    // to Q8_0 ("trades just ~128MB"), the attention output to Q5_K in the low-bit mixes.
    let eight_experts = cfg.moe.as_ref().is_some_and(|m| m.experts == 8);
    match slot {
        Slot::V | Slot::K if eight_experts => T::Q8_0,
        Slot::O if eight_experts => match mix {
            Mix::Q2_K
            | Mix::Q3_K_S
            | Mix::Q3_K_M
            | Mix::IQ4_NL
            | Mix::Q4_K_S
            | Mix::Q4_K_M
            | Mix::IQ4_XS => T::Q5_K,
            _ => base,
        },
        Slot::V => match mix {
            Mix::Q2_K => {
                if gqa >= 4 {
                    T::Q4_K
                } else {
                    T::Q3_K
                }
            }
            Mix::Q3_K_M => {
                if layer < 2 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            Mix::Q3_K_L => T::Q5_K,
            Mix::IQ4_NL | Mix::IQ4_XS if gqa >= 4 => T::Q5_K,
            Mix::Q4_K_M | Mix::Q5_K_M if use_more_bits(layer, n) => T::Q6_K,
            Mix::Q4_K_S if layer < 4 => T::Q5_K,
            _ => base,
        },
        // ffn_down, the experts' ffn_down_exps and the shared ffn_down_shexp
        // alike (llama.cpp matches "ffn_down" in the name), by block index;
        // llama.cpp's layer count is then the number of such tensors.
        Slot::Down | Slot::SharedDown => match mix {
            Mix::Q2_K => T::Q3_K,
            Mix::Q3_K_M => {
                if layer < n_down / 16 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            Mix::Q3_K_L => T::Q5_K,
            Mix::Q4_K_M if use_more_bits(layer, n_down) => T::Q6_K,
            Mix::IQ4_NL | Mix::IQ4_XS if layer < n_down / 8 && !has_imatrix => T::Q5_K,
            Mix::Q5_K_M if use_more_bits(layer, n_down) => T::Q6_K,
            Mix::Q4_K_S if layer < n_down / 8 => T::Q5_K,
            Mix::Q4_0 if has_imatrix && layer < n_down / 8 => T::Q4_1,
            Mix::Q5_0 if has_imatrix && layer < n_down / 8 => T::Q5_1,
            _ => base,
        },
        Slot::O => match mix {
            Mix::Q2_K => T::Q3_K,
            Mix::Q3_K_M => T::Q4_K,
            Mix::Q3_K_L => T::Q5_K,
            _ => base,
        },
        _ => base,
    }
}

/// The replacement for a type whose block does not divide the row length.
///
/// llama-quantize has no fallback for NVFP4 and Q1_0 and stops ("no tensor type
/// fallback is defined"); here NVFP4 goes to Q4_0 (the same 4.5 bits per weight)
/// and Q1_0 to the next smallest type whose block fits, Q2_0 or Q4_0.
pub fn fallback(ty: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(ty.block_elems()) {
        return ty;
    }
    let fb = match ty {
        // The 2- and 3-bit k-quants go to IQ4_NL, as the llama.cpp that made the
        // reference table in DESIGN.md does (newer llama.cpp uses Q5_0: a bigger file).
        GgmlType::IQ4_XS | GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::IQ4_NL,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_0 | GgmlType::NVFP4 | GgmlType::TQ1_0 | GgmlType::TQ2_0 => GgmlType::Q4_0,
        GgmlType::Q1_0 if cols.is_multiple_of(GgmlType::Q2_0.block_elems()) => GgmlType::Q2_0,
        GgmlType::Q1_0 => GgmlType::Q4_0,
        other => other,
    };
    if cols.is_multiple_of(fb.block_elems()) {
        fb
    } else {
        GgmlType::F16
    }
}

/// `general.file_type` for a custom set of tensor types: the plain mix of the most
/// common quantized type (F32 when nothing is quantized).
pub fn file_type_of(types: &[GgmlType]) -> u32 {
    let mut counts = std::collections::BTreeMap::new();
    for t in types.iter().filter(|t| **t != GgmlType::F32) {
        *counts.entry(*t).or_insert(0usize) += 1;
    }
    let Some((&ty, _)) = counts
        .iter()
        .max_by_key(|(t, n)| (**n, std::cmp::Reverse(**t)))
    else {
        return Mix::F32.file_type();
    };
    let mix = match ty {
        GgmlType::F16 => Mix::F16,
        GgmlType::BF16 => Mix::BF16,
        GgmlType::Q8_0 => Mix::Q8_0,
        GgmlType::Q4_0 => Mix::Q4_0,
        GgmlType::Q4_1 => Mix::Q4_1,
        GgmlType::Q5_0 => Mix::Q5_0,
        GgmlType::Q5_1 => Mix::Q5_1,
        GgmlType::Q2_K => Mix::Q2_K,
        GgmlType::Q3_K => Mix::Q3_K_M,
        GgmlType::Q4_K => Mix::Q4_K_M,
        GgmlType::Q5_K => Mix::Q5_K_M,
        GgmlType::Q6_K => Mix::Q6_K,
        GgmlType::IQ4_NL => Mix::IQ4_NL,
        GgmlType::IQ4_XS => Mix::IQ4_XS,
        GgmlType::NVFP4 => Mix::NVFP4,
        GgmlType::Q1_0 => Mix::Q1_0,
        GgmlType::Q2_0 => Mix::Q2_0,
        GgmlType::MXFP4 => Mix::MXFP4_MOE,
        GgmlType::TQ1_0 => Mix::TQ1_0,
        GgmlType::TQ2_0 => Mix::TQ2_0,
        GgmlType::F32 => Mix::F32,
    };
    mix.file_type()
}

/// A `REGEX=TYPE` override from the command line.
#[derive(Debug, Clone)]
pub struct Override {
    /// Matches tensor names (unanchored, as llama-quantize's `--tensor-type`).
    pub pattern: Regex,
    /// The type for matching tensors.
    pub ty: GgmlType,
    /// The text given, for messages.
    pub text: String,
}

impl Override {
    /// Parses `REGEX=TYPE`.
    pub fn parse(s: &str) -> Result<Self> {
        let Some((re, ty)) = s.rsplit_once('=') else {
            bail!("--tensor-type '{s}' is not REGEX=TYPE");
        };
        let pattern =
            Regex::new(re).map_err(|e| anyhow::anyhow!("--tensor-type '{s}': bad regex: {e}"))?;
        let ty = GgmlType::from_name(ty).ok_or_else(|| {
            anyhow::anyhow!(
                "--tensor-type '{s}': unknown type '{ty}'; valid: {}",
                kernels::types::ALL_TYPES
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        Ok(Override {
            pattern,
            ty,
            text: s.to_owned(),
        })
    }
}

/// The type of tensor `name` (shape outermost first) under `mix`, after
/// overrides and the row-length fallback.
pub fn choose(
    mix: Mix,
    name: &str,
    shape: &[usize],
    cfg: &ModelConfig,
    has_imatrix: bool,
    overrides: &[Override],
) -> Choice {
    if let Some(why) = cfg.arch.role(name).and_then(Role::kept_float) {
        return Choice {
            ty: GgmlType::F32,
            note: Some(format!("kept in F32: {why}")),
        };
    }
    if shape.len() < 2 {
        return Choice {
            ty: GgmlType::F32,
            note: None,
        };
    }
    let cols = shape[shape.len() - 1];
    let (wanted, why) = match overrides.iter().find(|o| o.pattern.is_match(name)) {
        Some(o) => (o.ty, Some(format!("override {}", o.text))),
        None => {
            let t = mix_type(mix, name, cfg, has_imatrix);
            (
                t,
                (t != mix.base_type()).then(|| format!("{} mix rule", mix.name())),
            )
        }
    };
    let ty = fallback(wanted, cols);
    let note = if ty != wanted {
        Some(format!(
            "{wanted} needs rows in multiples of {}, {cols} is not: falls back to {ty}",
            wanted.block_elems()
        ))
    } else {
        why
    };
    Choice { ty, note }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> ModelConfig {
        ModelConfig {
            arch: &model::arch::LLAMA,
            rope_scaling: None,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 1e5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
            hidden_act: model::config::Activation::Silu,
            sliding_window: None,
            layer_types: vec![model::config::LayerType::GLOBAL; 30],
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            moe: None,
            chunked_attention: None,
            rope_interleaved: false,
            mla: None,
        }
    }

    #[test]
    fn q4_k_m_on_smollm2_matches_llama_cpp() {
        let c = smol();
        let ty = |name: &str, shape: &[usize]| choose(Mix::Q4_K_M, name, shape, &c, false, &[]).ty;
        // Tied embedding acts as the output: 576 columns are not Q6_K super-blocks.
        assert_eq!(ty("token_embd.weight", &[49152, 576]), GgmlType::Q8_0);
        // 576-column matrices fall back from Q4_K to Q5_0.
        assert_eq!(ty("blk.5.attn_q.weight", &[576, 576]), GgmlType::Q5_0);
        // attn_v gets Q6_K in the "more bits" layers, which falls back to Q8_0.
        assert_eq!(ty("blk.0.attn_v.weight", &[192, 576]), GgmlType::Q8_0);
        assert_eq!(ty("blk.4.attn_v.weight", &[192, 576]), GgmlType::Q5_0);
        // ffn_down has 1536 columns: K-quants fit.
        assert_eq!(ty("blk.0.ffn_down.weight", &[576, 1536]), GgmlType::Q6_K);
        assert_eq!(ty("blk.4.ffn_down.weight", &[576, 1536]), GgmlType::Q4_K);
        assert_eq!(ty("blk.0.attn_norm.weight", &[576]), GgmlType::F32);
        let layers: Vec<_> = (0..30).filter(|&l| use_more_bits(l, 30)).collect();
        assert_eq!(
            layers,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
    }

    #[test]
    fn eight_expert_models_get_llama_cpps_attention_bumps() {
        // Mixtral 8x7B's shape: 32 layers, 4096 wide, GQA 32/8, 8 experts.
        let mut c = smol();
        c.arch = &model::arch::MIXTRAL;
        c.hidden_size = 4096;
        c.num_hidden_layers = 32;
        c.num_attention_heads = 32;
        c.num_key_value_heads = 8;
        c.head_dim = 128;
        c.tie_word_embeddings = false;
        c.moe = Some(model::config::MoeConfig::softmax(8, 2, 14336, true));
        let ty = |mix, name: &str, shape: &[usize]| choose(mix, name, shape, &c, false, &[]).ty;
        for mix in [Mix::Q4_K_M, Mix::Q3_K_S, Mix::Q4_0] {
            assert_eq!(
                ty(mix, "blk.9.attn_k.weight", &[1024, 4096]),
                GgmlType::Q8_0
            );
            assert_eq!(
                ty(mix, "blk.9.attn_v.weight", &[1024, 4096]),
                GgmlType::Q8_0
            );
        }
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.9.attn_output.weight", &[4096, 4096]),
            GgmlType::Q5_K
        );
        assert_eq!(
            ty(Mix::Q4_0, "blk.9.attn_output.weight", &[4096, 4096]),
            GgmlType::Q4_0
        );
        // ffn_down_exps follows ffn_down's rule by block index: Q6_K in the "more bits" blocks.
        let down = [8, 4096, 14336];
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.0.ffn_down_exps.weight", &down),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.5.ffn_down_exps.weight", &down),
            GgmlType::Q4_K
        );
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.0.ffn_gate_exps.weight", &[8, 14336, 4096]),
            GgmlType::Q4_K
        );
        // llama.cpp counts every ffn_down* tensor as a layer for ffn_down's rule:
        // Llama 4 (48 blocks, experts in every other, a shared expert in each
        // of those) has 24 + 2·24 = 72, so block 7 (< 72/8) of a Q4_K_S gets Q5_K
        // in its ffn_down_shexp, and block 8's dense ffn_down too; block 11's not.
        let mut l4 = c.clone();
        l4.arch = &model::arch::LLAMA4;
        l4.num_hidden_layers = 48;
        let m = l4.moe.as_mut().unwrap();
        m.experts = 16;
        m.interleave = 2;
        m.shared_ffn = 8192;
        let ty = |mix, name: &str, shape: &[usize]| choose(mix, name, shape, &l4, false, &[]).ty;
        assert_eq!(
            ty(Mix::Q4_K_S, "blk.7.ffn_down_shexp.weight", &[4096, 8192]),
            GgmlType::Q5_K
        );
        assert_eq!(
            ty(Mix::Q4_K_S, "blk.8.ffn_down.weight", &[4096, 16384]),
            GgmlType::Q5_K
        );
        assert_eq!(
            ty(Mix::Q4_K_S, "blk.7.ffn_gate_shexp.weight", &[8192, 4096]),
            GgmlType::Q4_K
        );
        assert_eq!(
            ty(
                Mix::Q4_K_S,
                "blk.11.ffn_down_exps.weight",
                &[16, 4096, 8192]
            ),
            GgmlType::Q4_K
        );
        // With another expert count the dense rules hold.
        c.moe.as_mut().unwrap().experts = 128;
        let ty = |mix, name: &str, shape: &[usize]| choose(mix, name, shape, &c, false, &[]).ty;
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.9.attn_k.weight", &[1024, 4096]),
            GgmlType::Q4_K
        );
        assert_eq!(
            ty(Mix::Q4_K_M, "blk.0.attn_v.weight", &[1024, 4096]),
            GgmlType::Q6_K
        );
    }

    #[test]
    fn overrides_win_and_still_fall_back() {
        let c = smol();
        let o = vec![
            Override::parse("ffn_(up|gate)=Q8_0").unwrap(),
            Override::parse("attn_q=Q4_K").unwrap(),
        ];
        let ch = choose(
            Mix::Q4_0,
            "blk.3.ffn_up.weight",
            &[1536, 576],
            &c,
            false,
            &o,
        );
        assert_eq!(ch.ty, GgmlType::Q8_0);
        let ch = choose(Mix::Q4_0, "blk.3.attn_q.weight", &[576, 576], &c, false, &o);
        assert_eq!(ch.ty, GgmlType::Q5_0);
        assert!(ch.note.unwrap().contains("falls back"));
        assert!(Override::parse("x=Q9_9").is_err());
        assert!(Override::parse("no-equals").is_err());
        assert!(Mix::from_name("q4_k_m").is_ok());
        assert!(Mix::from_name("Q7_K")
            .unwrap_err()
            .to_string()
            .contains("valid types"));
    }
}
