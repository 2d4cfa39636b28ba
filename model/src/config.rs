//! The hyperparameters of a decoder, read from GGUF metadata (`{arch}.*` keys as
//! llama.cpp's `convert_hf_to_gguf.py` writes them) or HF `config.json` (the
//! transformers 4 layout and the transformers 5 one, which moves the RoPE settings
//! into `rope_parameters`), and written back as an HF `config.json`. What differs
//! between architectures comes from their description ([`crate::arch`]).

use crate::arch::{Arch, Role};
use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// How RoPE frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x (`rope_type: "llama3"`): low frequencies divided by `factor`,
    /// high ones kept, a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// One divisor per frequency, as GGUF stores Llama 3 scaling
    /// (`rope_freqs.weight`; llama.cpp's converter keeps only these).
    FreqFactors(Vec<f64>),
    /// YaRN (`rope_type: "yarn"`: Qwen 2.5/3 long context, DeepSeek-V3, Kimi K2).
    Yarn(Yarn),
}

/// YaRN's settings (Peng et al. 2023, as transformers computes them): the
/// frequencies that turn fewer than `beta_slow` times over the original context
/// are interpolated (divided by `factor`), those that turn more than
/// `beta_fast` times are kept, a linear ramp over the dimensions between; cos
/// and sin are multiplied by [`Yarn::attention_factor`].
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: f64,
    /// Rotations above which a frequency is kept (default 32).
    pub beta_fast: f64,
    /// Rotations below which a frequency is fully interpolated (default 1).
    pub beta_slow: f64,
    /// Whether the ramp's ends are rounded outward to whole dimensions
    /// (transformers' `truncate`, default true, as llama.cpp always does).
    pub truncate: bool,
    /// `mscale` (DeepSeek), as given.
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (DeepSeek): also scales the attention scores by
    /// `mscale(factor, mscale_all_dim)²` in DeepSeek-V3's attention.
    pub mscale_all_dim: Option<f64>,
    /// An explicit `attention_factor`, as given.
    pub explicit_attention_factor: Option<f64>,
}

/// YaRN's magnitude correction `0.1·m·ln(s) + 1` (1 for `s ≤ 1`).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Yarn {
    /// What cos and sin are multiplied by: the explicit `attention_factor`,
    /// else `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both
    /// are given and non-zero, else `mscale(factor, 1)`.
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.explicit_attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_mscale(self.factor, m) / yarn_mscale(self.factor, all)
            }
            _ => yarn_mscale(self.factor, 1.0),
        }
    }

    /// DeepSeek-V3's extra factor on the attention scores:
    /// `mscale(factor, mscale_all_dim)²` (1 without `mscale_all_dim`).
    pub fn score_factor(&self) -> f64 {
        match self.mscale_all_dim {
            Some(all) if all != 0.0 => yarn_mscale(self.factor, all).powi(2),
            _ => 1.0,
        }
    }

    /// The divisor of each of the `head_dim / 2` frequencies.
    fn divisors(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let dim = head_dim as f64;
        let correction_dim = |rotations: f64| {
            dim * (self.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim - 1.0));
        let span = if low == high { 0.001 } else { high - low };
        (0..head_dim / 2)
            .map(|i| {
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                // The share of the original frequency: 1 − ramp (kept) below
                // `low`, 0 (interpolated) above `high`.
                let kept = 1.0 - ramp;
                1.0 / ((1.0 - kept) / self.factor + kept)
            })
            .collect()
    }
}

impl RopeScaling {
    /// Reads an HF `rope_scaling` / `rope_parameters` object; `None` for the
    /// default (unscaled) RoPE. An unknown type is an error naming it.
    pub(crate) fn from_hf(v: &Value) -> Result<Option<Self>> {
        let ty = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("rope scaling '{ty}' needs a number '{k}' (got {v})"))
        };
        Ok(match ty {
            "default" => None,
            "llama3" => Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            "linear" => Some(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "yarn" => {
                let opt = |k: &str| -> Result<Option<f64>> {
                    match v.get(k) {
                        None | Some(Value::Null) => Ok(None),
                        Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                            anyhow!("rope scaling 'yarn': '{k}' is {x}, expected a number")
                        }),
                    }
                };
                let truncate = match v.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => bail!("rope scaling 'yarn': 'truncate' is {x}, expected true or false"),
                };
                // A missing original length (0 here) is the config's
                // max_position_embeddings: see `ModelConfig::from_hf`.
                Some(RopeScaling::Yarn(Yarn {
                    factor: opt("factor")?.unwrap_or(0.0),
                    original_max_position_embeddings: opt("original_max_position_embeddings")?
                        .unwrap_or(0.0),
                    beta_fast: opt("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: opt("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    truncate,
                    mscale: opt("mscale")?,
                    mscale_all_dim: opt("mscale_all_dim")?,
                    explicit_attention_factor: opt("attention_factor")?,
                }))
            }
            other => bail!(
                "rope scaling type '{other}' is not supported (supported: default, llama3, linear, yarn)"
            ),
        })
    }

    /// Fills what an HF YaRN object may leave to the config: the original
    /// context (`max_position_embeddings`), and the factor (their ratio, as
    /// transformers computes it); then checks the values.
    fn resolve(&mut self, max_position_embeddings: usize) -> Result<()> {
        if let RopeScaling::Yarn(y) = self {
            if y.original_max_position_embeddings == 0.0 {
                y.original_max_position_embeddings = max_position_embeddings as f64;
            }
            if y.factor == 0.0 {
                y.factor = max_position_embeddings as f64 / y.original_max_position_embeddings;
            }
            let ok = |x: f64| x.is_finite() && x > 0.0;
            if !(ok(y.factor)
                && ok(y.original_max_position_embeddings)
                && ok(y.beta_fast)
                && ok(y.beta_slow))
            {
                bail!(
                    "rope scaling 'yarn': factor {}, original_max_position_embeddings {}, beta_fast {} and beta_slow {} must be positive numbers",
                    y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow
                );
            }
        }
        Ok(())
    }

    /// What cos and sin are multiplied by (YaRN's attention factor; 1 for the
    /// other scalings).
    pub fn cos_sin_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn(y) => y.attention_factor(),
            _ => 1.0,
        }
    }

    /// The HF `rope_scaling` object (transformers 4 layout).
    pub(crate) fn to_hf(&self) -> Result<Value> {
        Ok(match self {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({"rope_type": "llama3", "factor": factor,
                        "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": *original_max_position_embeddings as u64}),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Yarn(y) => {
                let mut o = json!({"rope_type": "yarn", "factor": y.factor,
                    "original_max_position_embeddings": y.original_max_position_embeddings as u64,
                    "beta_fast": y.beta_fast, "beta_slow": y.beta_slow});
                for (k, v) in [
                    ("mscale", y.mscale),
                    ("mscale_all_dim", y.mscale_all_dim),
                    ("attention_factor", y.explicit_attention_factor),
                ] {
                    if let Some(v) = v {
                        o[k] = json!(v);
                    }
                }
                if !y.truncate {
                    o["truncate"] = json!(false);
                }
                o
            }
            RopeScaling::FreqFactors(_) => bail!(
                "this model's RoPE scaling came from a GGUF 'rope_freqs.weight' tensor, which \
                 HF's config cannot express (llama.cpp's converter keeps only the per-frequency \
                 factors); write a GGUF, or start from the HF checkpoint"
            ),
        })
    }

    /// Whether GGUF stores this scaling as per-frequency factors
    /// (`rope_freqs.weight`) rather than as `rope.scaling.*` keys.
    pub fn is_per_frequency(&self) -> bool {
        matches!(
            self,
            RopeScaling::Llama3 { .. } | RopeScaling::FreqFactors(_)
        )
    }

    /// The divisor of each of the `head_dim / 2` frequencies `θ^(−2i/d)`.
    pub fn divisors(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let half = head_dim / 2;
        match self {
            RopeScaling::Linear { factor } => vec![*factor; half],
            RopeScaling::FreqFactors(f) => f.clone(),
            RopeScaling::Yarn(y) => y.divisors(head_dim, theta),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => (0..half)
                .map(|i| {
                    let freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < old / high_freq_factor {
                        1.0
                    } else if wavelen > old / low_freq_factor {
                        *factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect(),
        }
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (SwiGLU): Llama, Qwen, Mistral, OLMo 2, SmolLM3.
    Silu,
    /// GELU in its tanh form, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`
    /// (GeGLU): Gemma.
    GeluTanh,
}

impl Activation {
    /// Reads an HF `hidden_act` / `hidden_activation` name.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => bail!(
                "the MLP activation '{other}' is not supported (supported: silu, gelu_pytorch_tanh)"
            ),
        })
    }

    /// The HF name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// How one decoder layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerType {
    /// Whether the layer sees only the last `sliding_window` positions.
    pub sliding: bool,
    /// Whether RoPE rotates its queries and keys (false: a NoPE layer).
    pub rope: bool,
}

impl LayerType {
    /// Full causal attention with RoPE: every layer of a Llama.
    pub const GLOBAL: LayerType = LayerType {
        sliding: false,
        rope: true,
    };
}

/// Hyperparameters of a decoder of any described architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture's description.
    pub arch: &'static Arch,
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Training context length.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
    /// Padding token. Written to `config.json` even when unknown (as `null`):
    /// left out, transformers falls back to its class default (SmolLM3's is
    /// 128004), which may lie outside a smaller vocabulary.
    pub pad_token_id: Option<u32>,
    /// The MLP's gate activation.
    pub hidden_act: Activation,
    /// Positions a sliding layer sees, itself included (query i sees keys
    /// `i − W < j ≤ i`, as transformers and llama.cpp count).
    pub sliding_window: Option<usize>,
    /// Per layer: sliding or global, RoPE or none (`num_hidden_layers` long).
    pub layer_types: Vec<LayerType>,
    /// RoPE base of the sliding layers when it differs from `rope_theta`
    /// (Gemma's `rope_local_base_freq`; unscaled).
    pub rope_local_theta: Option<f64>,
    /// Attention scores are scaled by `query_pre_attn_scalar^−½` (Gemma);
    /// `head_dim^−½` when unset.
    pub query_pre_attn_scalar: Option<f64>,
    /// The routed experts that replace the MLP of every block, or of every
    /// `interleave`-th (mixture-of-experts architectures); `None` for a dense MLP.
    pub moe: Option<MoeConfig>,
    /// RoPE rotates adjacent pairs `(2i, 2i + 1)` of each head (Llama 4's
    /// complex rotation, llama.cpp's "normal" mode on unpermuted rows) instead of
    /// HF's usual halves `(i, i + d/2)`.
    pub rope_interleaved: bool,
    /// Multi-head latent attention in place of q/k/v projections (DeepSeek);
    /// `head_dim` is then its RoPE part.
    pub mla: Option<MlaConfig>,
    /// Llama 4's attention: chunked with an L2 q/k norm on the RoPE layers,
    /// temperature-tuned on the NoPE ones; `None` elsewhere.
    pub chunked_attention: Option<ChunkedAttention>,
}

/// Llama 4's attention beyond RoPE per layer ([`LayerType::rope`]): each RoPE
/// layer attends only within chunks of `chunk` positions and normalises q and
/// k per head by their RMS (no gain, after the rotation) when `qk_norm`; each
/// NoPE layer attends to everything before it, its queries scaled by
/// `1 + attn_scale·ln(⌊(pos + 1) / floor_scale⌋ + 1)` when `temperature_tuning`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkedAttention {
    /// Positions per attention chunk of the RoPE layers.
    pub chunk: usize,
    /// The weightless q/k RMS norm after RoPE on the RoPE layers.
    pub qk_norm: bool,
    /// Whether the NoPE layers scale their queries by position.
    pub temperature_tuning: bool,
    /// The temperature's position scale.
    pub floor_scale: f64,
    /// The temperature's strength.
    pub attn_scale: f64,
}

/// Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): queries through a
/// low-rank projection and its norm; keys and values from one shared latent
/// vector per position (`kv_lora_rank` wide, normed) and one shared RoPE key;
/// each head splits its query and key into a part without RoPE
/// (`qk_nope_head_dim`) and a rotated part (`qk_rope_head_dim`, the config's
/// `head_dim`), and its value is `v_head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaConfig {
    /// Rank of the query's low-rank projection.
    pub q_lora_rank: usize,
    /// Width of the shared key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

/// DeepSeek-V3's group-limited selection (`noaux_tc`): experts in
/// `groups` consecutive groups, each group scored by the sum of its two best
/// selection scores, only the `groups_used` best groups eligible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupedRouting {
    /// Scores are sigmoids of the router's logits (else their softmax).
    pub sigmoid: bool,
    /// Expert groups (`n_group`); 1: no group limit.
    pub groups: usize,
    /// Groups a token may pick experts from (`topk_group`).
    pub groups_used: usize,
    /// The chosen experts' weights are multiplied by this (`routed_scaling_factor`).
    pub scale: f32,
}

/// How a router turns a token's scores into its experts and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// The `used` most probable experts under the softmax over all experts,
    /// weighted by those probabilities (renormalised when `norm_topk_prob`);
    /// each expert's output is weighted.
    Softmax,
    /// Llama 4: the `used` highest raw scores, each weighted by the sigmoid of
    /// its score; the weight scales the expert's *input*, not its output.
    SigmoidInput,
    /// DeepSeek: sigmoid (or softmax) scores, a per-expert correction bias
    /// added for the selection only, group-limited top-k, the chosen unbiased
    /// scores as weights (renormalised when `norm_topk_prob`) times a scale.
    Grouped(GroupedRouting),
}

/// A mixture-of-experts MLP: a router scores every token against `experts`
/// gated MLPs of width `expert_ffn`, and the `used` best of them run on it,
/// their outputs summed with the router's softmax probabilities as weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per block (HF `num_experts` / `num_local_experts`, GGUF
    /// `expert_count`).
    pub experts: usize,
    /// Experts each token runs through (`num_experts_per_tok`, `expert_used_count`).
    pub used: usize,
    /// One expert's intermediate size.
    pub expert_ffn: usize,
    /// Whether the chosen experts' probabilities are renormalised to sum to 1
    /// (`norm_topk_prob`; Mixtral's softmax over the chosen logits is the same).
    pub norm_topk_prob: bool,
    /// How the router's scores become experts and weights.
    pub routing: Routing,
    /// Width of the shared expert every token also runs through (0: none).
    pub shared_ffn: usize,
    /// Every `interleave`-th block is a mixture of experts (blocks `l` with
    /// `(l + 1) % interleave == 0`, as llama.cpp counts); the others keep a
    /// dense MLP of `intermediate_size`. 1: every block.
    pub interleave: usize,
    /// The first `first_dense` blocks keep a dense MLP (DeepSeek's
    /// `first_k_dense_replace`).
    pub first_dense: usize,
}

impl MoeConfig {
    /// A softmax-routed mixture of experts in every block, with no shared expert.
    pub fn softmax(experts: usize, used: usize, expert_ffn: usize, norm_topk_prob: bool) -> Self {
        MoeConfig {
            experts,
            used,
            expert_ffn,
            norm_topk_prob,
            routing: Routing::Softmax,
            shared_ffn: 0,
            interleave: 1,
            first_dense: 0,
        }
    }
}

/// YaRN as llama.cpp reads it from `{name}.rope.scaling.*`: the factor, the
/// original context, the ramp's betas (32 and 1 when absent), and for
/// `deepseek2` the `yarn_log_multiplier` that its converter writes as
/// `0.1·mscale_all_dim` (llama.cpp then takes `mscale = mscale_all_dim`); an
/// explicit `yarn_attn_factor` multiplies llama.cpp's default factor.
fn yarn_from_gguf(g: &GgufFile, name: &str) -> Result<Yarn> {
    let key = |k: &str| format!("{name}.rope.scaling.{k}");
    let opt = |k: &str| -> Result<Option<f64>> {
        match g.get(&key(k)) {
            Some(_) => Ok(Some(g.require_f64(&key(k))?)),
            None => Ok(None),
        }
    };
    let factor = g.require_f64(&key("factor"))?;
    let mscale_all_dim = match opt("yarn_log_multiplier")? {
        // Stored as f32: the quotient is only as exact as that (1, not 1.0000000149).
        Some(m) if name == "deepseek2" => Some((m / 0.1) as f32 as f64),
        Some(m) => Some(m),
        None => None,
    };
    let mscale = match (name, mscale_all_dim) {
        ("deepseek2", Some(all)) => Some(all),
        (_, Some(_)) => Some(1.0),
        (_, None) => None,
    };
    Ok(Yarn {
        factor,
        original_max_position_embeddings: g.require_f64(&key("original_context_length"))?,
        beta_fast: opt("yarn_beta_fast")?.unwrap_or(32.0),
        beta_slow: opt("yarn_beta_slow")?.unwrap_or(1.0),
        truncate: true,
        mscale,
        mscale_all_dim,
        explicit_attention_factor: opt("yarn_attn_factor")?
            .filter(|_| mscale_all_dim.is_none())
            .map(|a| a * yarn_mscale(factor, 1.0)),
    })
}

/// More blocks than any model has: a count above it is a corrupt file, refused
/// before the per-layer tables are sized by it.
const MAX_LAYERS: u64 = 1 << 16;

/// The largest size a config may give one dimension.
const MAX_DIM: usize = 1 << 24;

/// The largest tensor a config may describe, in elements (DeepSeek-V3's
/// stacked experts have 2³²; this is 256 times that).
const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// A block count read from a file, checked against [`MAX_LAYERS`].
fn layer_count(n: u64) -> Result<usize> {
    if n > MAX_LAYERS {
        bail!("{n} blocks is more than any model has (at most {MAX_LAYERS})");
    }
    Ok(n as usize)
}

impl ModelConfig {
    /// Reads the `{arch}.*` hyperparameters of a GGUF file (and, for Llama 3 rope
    /// scaling, its `rope_freqs.weight` tensor).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path().display();
        let name = g
            .require("general.architecture")?
            .as_str()
            .with_context(|| format!("{path}: general.architecture is not a string"))?
            .to_owned();
        let arch = Arch::from_gguf(&name, g).with_context(|| {
            format!(
                "{path}: general.architecture is '{name}', which is not supported (supported: {})",
                Arch::supported()
            )
        })?;
        let key = |k: &str| format!("{name}.{k}");
        let opt_u64 = |k: &str| -> Result<Option<u64>> {
            Ok(match g.get(&key(k)) {
                Some(_) => Some(g.require_u64(&key(k))?),
                None => None,
            })
        };
        let n_heads = g.require_u64(&key("attention.head_count"))? as usize;
        let hidden = g.require_u64(&key("embedding_length"))? as usize;
        let n_kv = opt_u64("attention.head_count_kv")?.map_or(n_heads, |v| v as usize);
        // Latent attention's key/value lengths are its latent's (the absorbed
        // form llama.cpp computes); its description reads its own widths.
        let latent = g.get(&key("attention.kv_lora_rank")).is_some();
        let head_dim = match opt_u64("attention.key_length")? {
            Some(_) if latent => opt_u64("rope.dimension_count")?.unwrap_or(0) as usize,
            Some(v) => v as usize,
            None => hidden.checked_div(n_heads).unwrap_or(0),
        };
        if let Some(v) = opt_u64("attention.value_length")?.filter(|_| !latent) {
            if v as usize != head_dim {
                bail!("{path}: {name}.attention.value_length is {v}, but key_length (head width) is {head_dim}; heads of two widths are not supported");
            }
        }
        if let Some(rot) = opt_u64("rope.dimension_count")? {
            if rot as usize != head_dim {
                bail!("{path}: {name}.rope.dimension_count is {rot} but the head width is {head_dim}; partial rotary embeddings are not supported");
            }
        }
        let vocab_size = match opt_u64("vocab_size")? {
            Some(v) => v as usize,
            None => g
                .tensor(arch.global_name(Role::Embedding))
                .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                .unwrap_or(0),
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            Ok(match g.get(k) {
                Some(_) => Some(g.require_u64(k)? as u32),
                None => None,
            })
        };
        let rope_theta = match g.get(&key("rope.freq_base")) {
            Some(_) => g.require_f64(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let scaling_type = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str());
        let mut rope_scaling = match scaling_type {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: g.require_f64(&key("rope.scaling.factor"))?,
            }),
            Some("yarn") => Some(RopeScaling::Yarn(yarn_from_gguf(g, &name)?)),
            Some(other) => bail!(
                "{path}: {name}.rope.scaling.type is '{other}', which is not supported (supported: none, linear, yarn, and llama3 as rope_freqs.weight)"
            ),
        };
        if let Some(info) = g.tensor("rope_freqs.weight") {
            if arch.global("rope_freqs.weight").is_none() {
                bail!("{path}: tensor 'rope_freqs.weight' is not part of a '{name}' model");
            }
            if rope_scaling.is_some() {
                bail!("{path}: both {name}.rope.scaling.type and rope_freqs.weight are set");
            }
            if info.ty != kernels::GgmlType::F32 || info.shape() != [head_dim / 2] {
                bail!(
                    "{path}: tensor 'rope_freqs.weight' is {} {:?}, expected F32 [{}] (one factor per RoPE frequency)",
                    info.ty,
                    info.shape(),
                    head_dim / 2
                );
            }
            let factors: Vec<f64> = g
                .tensor_data(info)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                bail!("{path}: tensor 'rope_freqs.weight' holds a factor that is not a positive number");
            }
            rope_scaling = Some(RopeScaling::FreqFactors(factors));
        }
        if g.get(&key("final_logit_softcapping")).is_some() {
            bail!("{path}: {name}.final_logit_softcapping is set: soft-capped logits are not supported");
        }
        let n_layers = layer_count(g.require_u64(&key("block_count"))?)
            .with_context(|| format!("{path}: {name}.block_count"))?;
        let mut cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: g.require_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: n_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: g.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: g.require_u64(&key("context_length"))? as usize,
            tie_word_embeddings: g.tensor(arch.global_name(Role::Head)).is_none(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: token_id("tokenizer.ggml.padding_token_id")?,
            hidden_act: Activation::Silu,
            sliding_window: None,
            layer_types: vec![LayerType::GLOBAL; n_layers],
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            moe: None,
            chunked_attention: None,
            rope_interleaved: false,
            mla: None,
        };
        (arch.read_gguf)(g, &mut cfg).with_context(|| format!("{path}: {name} hyperparameters"))?;
        cfg.validate()
            .with_context(|| format!("{path}: inconsistent {name} hyperparameters"))?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let v: Value = crate::io::read_json(path)?;
        Self::from_hf_json(&v).with_context(|| format!("{}: bad model config", path.display()))
    }

    /// Reads the hyperparameters from a parsed HF config (transformers 4 or 5
    /// layout).
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let arch = match v.get("model_type") {
            None | Some(Value::Null) => &crate::arch::LLAMA,
            Some(mt) => {
                let mt = mt
                    .as_str()
                    .with_context(|| format!("field 'model_type' is {mt}, expected a string"))?;
                Arch::from_hf_model_type(mt).with_context(|| {
                    format!(
                        "model_type is '{mt}', which is not supported (supported: {})",
                        Arch::supported()
                    )
                })?
            }
        };
        let req = |k: &str| -> Result<u64> {
            match v.get(k) {
                None => bail!("field '{k}' is missing"),
                Some(x) => x
                    .as_u64()
                    .ok_or_else(|| anyhow!("field '{k}' is {x}, expected a non-negative integer")),
            }
        };
        let opt_u64 = |k: &str| -> Result<Option<u64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("field '{k}' is {x}, expected a non-negative integer")),
            }
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("field '{k}' is {x}, expected a number")),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| anyhow!("field '{k}' is {x}, expected true or false")),
            }
        };
        // What these descriptions cannot compute is refused, never ignored.
        // Gemma names its activation `hidden_activation`.
        let act_key = ["hidden_activation", "hidden_act"]
            .into_iter()
            .find(|k| v.get(k).is_some_and(|a| !a.is_null()));
        let hidden_act = match act_key {
            None => Activation::Silu,
            Some(k) => {
                let a = &v[k];
                let name = a
                    .as_str()
                    .with_context(|| format!("field '{k}' is {a}, expected a string"))?;
                Activation::from_hf(name).with_context(|| format!("field '{k}'"))?
            }
        };
        if let Some(c) = opt_f64("final_logit_softcapping")? {
            bail!("final_logit_softcapping is {c}: soft-capped logits are not supported");
        }
        if arch.slot(crate::arch::Slot::QBias).is_none() && flag("attention_bias")? {
            bail!(
                "attention_bias is true, but a '{}' model has no attention biases",
                arch.gguf_name
            );
        }
        if flag("mlp_bias")? {
            bail!("mlp_bias is true: MLP biases are not supported");
        }
        if let Some(f) = opt_f64("partial_rotary_factor")? {
            if f != 1.0 {
                bail!("partial_rotary_factor is {f}: partial rotary embeddings are not supported");
            }
        }
        let window = opt_u64("sliding_window")?;
        let use_window = match v.get("use_sliding_window") {
            None | Some(Value::Null) => window.is_some(),
            Some(_) => flag("use_sliding_window")?,
        };
        // transformers 5 keeps theta and scaling in `rope_parameters`; 4 keeps
        // `rope_theta` at the top and the scaling in `rope_scaling`.
        let (rope_theta, rope_scaling) = match v.get("rope_parameters") {
            Some(p) if !p.is_null() => {
                if !p.is_object() {
                    bail!("field 'rope_parameters' is {p}, expected an object");
                }
                let theta = match p.get("rope_theta") {
                    None | Some(Value::Null) => opt_f64("rope_theta")?,
                    Some(t) => Some(t.as_f64().ok_or_else(|| {
                        anyhow!("field 'rope_parameters.rope_theta' is {t}, expected a number")
                    })?),
                };
                (
                    theta,
                    RopeScaling::from_hf(p).context("field 'rope_parameters'")?,
                )
            }
            _ => (
                opt_f64("rope_theta")?,
                match v.get("rope_scaling") {
                    None | Some(Value::Null) => None,
                    Some(s) => RopeScaling::from_hf(s).context("field 'rope_scaling'")?,
                },
            ),
        };
        // eos_token_id may be a list in newer configs; the first entry is the one.
        let eos = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            _ => opt_u64("eos_token_id")?,
        };
        let hidden = req("hidden_size")? as usize;
        let n_heads = req("num_attention_heads")? as usize;
        let n_layers =
            layer_count(req("num_hidden_layers")?).context("field 'num_hidden_layers'")?;
        let mut cfg = ModelConfig {
            arch,
            vocab_size: req("vocab_size")? as usize,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")? as usize,
            num_hidden_layers: n_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: opt_u64("num_key_value_heads")?.map_or(n_heads, |x| x as usize),
            head_dim: opt_u64("head_dim")?
                .map(|x| x as usize)
                .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: opt_u64("max_position_embeddings")?.unwrap_or(2048) as usize,
            tie_word_embeddings: flag("tie_word_embeddings")?,
            bos_token_id: opt_u64("bos_token_id")?.map(|x| x as u32),
            eos_token_id: eos.map(|x| x as u32),
            pad_token_id: opt_u64("pad_token_id")?.map(|x| x as u32),
            hidden_act,
            sliding_window: None,
            layer_types: vec![LayerType::GLOBAL; n_layers],
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            moe: None,
            chunked_attention: None,
            rope_interleaved: false,
            mla: None,
        };
        (arch.read_hf)(v, &mut cfg)?;
        if let Some(s) = &mut cfg.rope_scaling {
            s.resolve(cfg.max_position_embeddings)
                .context("field 'rope_scaling'")?;
        }
        // A window the description did not take up would be silently dropped.
        if use_window && cfg.sliding_window.is_none() {
            bail!(
                "sliding_window is {}: sliding-window attention is not supported for '{}'",
                window.map_or("set".to_owned(), |w| w.to_string()),
                arch.name
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shapes implied by the hyperparameters are consistent.
    pub fn validate(&self) -> Result<()> {
        // Each size below 2²⁴, so the products the descriptions form from two
        // of them cannot wrap.
        let mut sizes = vec![
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some(m) = &self.moe {
            sizes.extend([
                ("experts", m.experts),
                ("expert intermediate size", m.expert_ffn),
                ("shared expert intermediate size", m.shared_ffn),
            ]);
        }
        if let Some(m) = &self.mla {
            sizes.extend([
                ("q_lora_rank", m.q_lora_rank),
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_nope_head_dim", m.qk_nope_head_dim),
                ("v_head_dim", m.v_head_dim),
            ]);
        }
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v > MAX_DIM) {
            bail!("{name} is {v}, more than any model has (at most {MAX_DIM}): a corrupt config");
        }
        let checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.hidden_size > 0, "hidden_size must be positive"),
            (
                self.intermediate_size > 0,
                "intermediate_size must be positive",
            ),
            (
                self.num_hidden_layers > 0,
                "num_hidden_layers must be positive",
            ),
            (
                self.num_attention_heads > 0,
                "num_attention_heads must be positive",
            ),
            (
                self.num_key_value_heads > 0,
                "num_key_value_heads must be positive",
            ),
            (
                self.head_dim > 0 && self.head_dim.is_multiple_of(2),
                "head_dim must be positive and even",
            ),
            (
                self.num_key_value_heads <= self.num_attention_heads
                    && self
                        .num_attention_heads
                        .is_multiple_of(self.num_key_value_heads),
                "num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (self.rms_norm_eps > 0.0, "rms_norm_eps must be positive"),
            (self.rope_theta > 0.0, "rope_theta must be positive"),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{msg} ({self:?})");
            }
        }
        // Every tensor the description implies must have a size that a
        // multiplication of its dims can hold (no silent wrap in release).
        for spec in self.arch.block.iter().chain(self.arch.globals) {
            let dims: Vec<usize> = spec.shape.iter().map(|d| d.size(self)).collect();
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .filter(|&n| n <= MAX_TENSOR_ELEMENTS);
            if n.is_none() {
                bail!(
                    "the config gives tensor '{}' the shape {dims:?}, more than {MAX_TENSOR_ELEMENTS} elements: a corrupt config",
                    spec.gguf
                );
            }
        }
        if self.layer_types.len() != self.num_hidden_layers {
            bail!(
                "{} layer types for {} layers (num_hidden_layers)",
                self.layer_types.len(),
                self.num_hidden_layers
            );
        }
        if self.sliding_window == Some(0) {
            bail!("sliding_window is 0: a sliding layer must see at least its own position");
        }
        if self.sliding_window.is_none() && self.layer_types.iter().any(|t| t.sliding) {
            bail!("some layers are sliding-window layers but no sliding_window is set");
        }
        if let Some(s) = self.query_pre_attn_scalar {
            if !(s > 0.0 && s.is_finite()) {
                bail!("query_pre_attn_scalar is {s}, expected a positive number");
            }
        }
        if let Some(t) = self.rope_local_theta {
            if t.is_nan() || t <= 0.0 {
                bail!("the sliding layers' RoPE base is {t}, expected a positive number");
            }
        }
        if let Some(m) = &self.moe {
            if m.interleave == 0 {
                bail!("the mixture of experts is in every 0th block: expected an interleave of at least 1");
            }
            if m.experts == 0 || m.expert_ffn == 0 || m.used == 0 || m.used > m.experts {
                bail!(
                    "the mixture of experts routes each token to {} of {} experts of width {}: \
                     expected at least one expert used, no more than there are, and a positive width",
                    m.used,
                    m.experts,
                    m.expert_ffn
                );
            }
        }
        if let Some(RopeScaling::FreqFactors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                bail!(
                    "rope_freqs.weight has {} factors, head_dim {} needs {}",
                    f.len(),
                    self.head_dim,
                    self.head_dim / 2
                );
            }
        }
        Ok(())
    }

    /// Whether block `l` is a mixture of experts (else it has a dense MLP).
    pub fn is_moe_block(&self, l: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| l >= m.first_dense && (l + 1).is_multiple_of(m.interleave))
    }

    /// Whether block `l` holds the block tensor `spec` (dense MLP tensors only
    /// in dense blocks, routed-expert tensors only in mixture-of-experts ones).
    pub fn block_has(&self, l: usize, spec: &crate::arch::TensorSpec) -> bool {
        use crate::arch::Blocks;
        match spec.blocks {
            Blocks::All => true,
            Blocks::Dense => !self.is_moe_block(l),
            Blocks::Moe => self.is_moe_block(l),
        }
    }

    /// Refuses a mixture-of-experts model in a stage that does not yet handle
    /// routed experts (per-expert statistics, per-expert HF tensors), rather than
    /// treating the stacked experts as one matrix.
    pub fn refuse_moe(&self, stage: &str) -> Result<()> {
        match &self.moe {
            None => Ok(()),
            Some(m) => bail!(
                "{stage} does not handle mixture-of-experts models yet (this '{}' model routes each token to {} of {} experts); \
                 `eval` (with `--calib`), `imatrix`, `convert`, `sensitivity`, `quantize` (GGUF types, GPTQ, AWQ, RTN) and `prune` (magnitude, Wanda, SparseGPT, `--experts`) do",
                self.arch.name,
                m.used,
                m.experts
            ),
        }
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key/value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The angular frequency of each of the `head_dim / 2` RoPE pairs:
    /// `θ^(−2i/d)`, divided by the rope scaling's divisor.
    pub fn rope_frequencies(&self) -> Vec<f64> {
        let d = self.head_dim;
        let divisors = self
            .rope_scaling
            .as_ref()
            .map(|s| s.divisors(d, self.rope_theta));
        (0..d / 2)
            .map(|i| {
                let f = self.rope_theta.powf(-2.0 * i as f64 / d as f64);
                divisors.as_ref().map_or(f, |dv| f / dv[i])
            })
            .collect()
    }

    /// The RoPE frequencies of layer `l` ([`ModelConfig::rope_frequencies`],
    /// or the unscaled local base on a sliding layer that has its own); `None`
    /// for a NoPE layer.
    pub fn layer_rope_frequencies(&self, l: usize) -> Option<Vec<f64>> {
        let t = self.layer_types[l];
        if !t.rope {
            return None;
        }
        match self.rope_local_theta {
            Some(theta) if t.sliding => {
                let d = self.head_dim;
                Some(
                    (0..d / 2)
                        .map(|i| theta.powf(-2.0 * i as f64 / d as f64))
                        .collect(),
                )
            }
            _ => Some(self.rope_frequencies()),
        }
    }

    /// What layer `l`'s RoPE multiplies cos and sin by: YaRN's attention factor
    /// where the layer uses the scaled frequencies, else 1.
    pub fn layer_rope_factor(&self, l: usize) -> f64 {
        let t = self.layer_types[l];
        if t.sliding && self.rope_local_theta.is_some() {
            return 1.0;
        }
        self.rope_scaling
            .as_ref()
            .map_or(1.0, RopeScaling::cos_sin_factor)
    }

    /// The window of layer `l`: `Some(W)` on a sliding layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.layer_types[l]
            .sliding
            .then_some(self.sliding_window)
            .flatten()
    }

    /// The factor attention scores are multiplied by before the softmax.
    pub fn attention_scale(&self) -> f32 {
        let s = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        (1.0 / s.sqrt()) as f32
    }

    /// The factor the embedding output is multiplied by (Gemma's `√hidden`, in
    /// f32 as transformers and llama.cpp compute it), if any.
    pub fn embedding_scale(&self) -> Option<f32> {
        self.arch
            .scales_embedding
            .then(|| (self.hidden_size as f32).sqrt())
    }

    /// Makes this the config of the model made of layers `kept` of this one.
    pub fn keep_layers(&mut self, kept: &[usize]) {
        self.layer_types = kept.iter().map(|&l| self.layer_types[l]).collect();
        self.num_hidden_layers = kept.len();
    }

    /// The HF `config.json` of this model (transformers 4 layout, which
    /// transformers 5 and vLLM read too); refused when the RoPE scaling cannot be
    /// expressed there.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Result<Value> {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(s) => s.to_hf()?,
        };
        let mut v = json!({
            "architectures": [self.arch.hf_class],
            "model_type": self.arch.hf_model_type(),
            "attention_dropout": 0.0,
            "hidden_act": self.hidden_act.hf_name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": torch_dtype,
        });
        if let Some(obj) = v.as_object_mut() {
            obj.extend((self.arch.hf_extra)(self));
        }
        Ok(v)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Value {
        json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
               "max_position_embeddings": 8192, "tie_word_embeddings": true,
               "bos_token_id": 1, "eos_token_id": 2})
    }

    #[test]
    fn hf_json_round_trips() {
        let c = ModelConfig::from_hf_json(&smol()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.kv_dim(), 192);
        let back = ModelConfig::from_hf_json(&c.to_hf_json("float32").unwrap()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = smol();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("'intermediate_size' is missing"), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut v = smol();
        v["num_key_value_heads"] = json!(4);
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
    }

    #[test]
    fn llama3_rope_is_read_from_both_layouts() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let mut v4 = smol();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = scaling.clone();
        let mut v5 = smol();
        v5.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling.clone();
        params["rope_theta"] = json!(500000.0);
        v5["rope_parameters"] = params;
        let a = ModelConfig::from_hf_json(&v4).unwrap();
        let b = ModelConfig::from_hf_json(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        let f = a.rope_frequencies();
        // The highest frequency is kept, the lowest divided by the factor.
        assert_eq!(f[0], 1.0);
        let plain = 500000f64.powf(-2.0 * 31.0 / 64.0);
        assert!((f[31] - plain / 8.0).abs() < 1e-15 * plain);
        let back = ModelConfig::from_hf_json(&a.to_hf_json("float32").unwrap()).unwrap();
        assert_eq!(a, back);
    }

    #[test]
    fn yarn_divisors_and_factors_match_transformers() {
        // transformers 5.23's `_compute_yarn_parameters` for head_dim 16, θ 10⁴,
        // factor 8 over an original context of 64: base / inv_freq, and the
        // attention factor it returns.
        let mut v = smol();
        v["max_position_embeddings"] = json!(512);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 8.0,
            "original_max_position_embeddings": 64});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let s = c.rope_scaling.as_ref().unwrap();
        let got = s.divisors(16, 10000.0);
        let want = [1.0, 1.411765, 2.4, 8.0, 8.0, 8.0, 8.0, 8.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        assert!((s.cos_sin_factor() - 1.2079441541679836).abs() < 1e-12);
        let RopeScaling::Yarn(y) = s else {
            panic!("{s:?}")
        };
        assert_eq!(y.score_factor(), 1.0);
        // DeepSeek-V3's mscale = mscale_all_dim: cos and sin unscaled, the
        // scores by mscale²; a missing original length is max_position_embeddings.
        v["rope_scaling"] = json!({"type": "yarn", "factor": 40.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let Some(RopeScaling::Yarn(y)) = &c.rope_scaling else {
            panic!()
        };
        assert_eq!(y.original_max_position_embeddings, 512.0);
        assert_eq!(y.attention_factor(), 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((y.score_factor() - m * m).abs() < 1e-12);
        // Written back as HF reads it.
        let back = RopeScaling::from_hf(&RopeScaling::Yarn(y.clone()).to_hf().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(back, RopeScaling::Yarn(y.clone()));
    }

    #[test]
    fn sizes_no_model_has_are_refused_before_anything_is_sized_by_them() {
        // Once: a layer count sized a table (a 2⁵⁰-entry allocation), and dims
        // were multiplied without a check (a silent wrap in release builds).
        let mut v = smol();
        v["num_hidden_layers"] = json!(1u64 << 50);
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(
            err.contains("num_hidden_layers") && err.contains("blocks"),
            "{err}"
        );
        for (key, value) in [("hidden_size", 1u64 << 40), ("vocab_size", 1u64 << 33)] {
            let mut v = smol();
            v[key] = json!(value);
            let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
            assert!(
                err.contains(key) && err.contains("corrupt config"),
                "{key}: {err}"
            );
        }
        // Each dim allowed, the product not: a router of 2²³ × 2²³.
        let mut v = smol();
        v["model_type"] = json!("qwen3_moe");
        v["num_experts"] = json!(1 << 23);
        v["num_experts_per_tok"] = json!(1);
        v["moe_intermediate_size"] = json!(1 << 23);
        v["hidden_size"] = json!(1 << 23);
        v["head_dim"] = json!(64);
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(
            err.contains("ffn_gate_inp") && err.contains("elements"),
            "{err}"
        );
    }

    #[test]
    fn unknown_rope_scaling_and_architectures_are_refused() {
        let mut v = smol();
        v["rope_scaling"] = json!({"rope_type": "longrope", "factor": 4.0});
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(err.contains("'longrope' is not supported"), "{err}");
        let mut v = smol();
        v["model_type"] = json!("gemma3");
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(
            err.contains("'gemma3'") && err.contains("llama, qwen2, qwen3"),
            "{err}"
        );
        let mut v = smol();
        v["model_type"] = json!("qwen2");
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(4096);
        let err = format!("{:#}", ModelConfig::from_hf_json(&v).unwrap_err());
        assert!(
            err.contains("sliding-window attention is not supported for 'qwen2'"),
            "{err}"
        );
    }

    #[test]
    fn qwen_configs_name_their_architecture() {
        let mut v = smol();
        v["model_type"] = json!("qwen2");
        v["use_sliding_window"] = json!(false);
        v["sliding_window"] = json!(32768);
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.arch.gguf_name, "qwen2");
        let out = c.to_hf_json("bfloat16").unwrap();
        assert_eq!(out["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(ModelConfig::from_hf_json(&out).unwrap(), c);
    }

    #[test]
    fn pad_token_is_carried_and_written_as_null_when_unknown() {
        let mut v = smol();
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.pad_token_id, None);
        let out = c.to_hf_json("float32").unwrap();
        assert!(out.get("pad_token_id").is_some_and(Value::is_null), "{out}");
        v["pad_token_id"] = json!(7);
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.to_hf_json("float32").unwrap()["pad_token_id"], 7);
    }
}
