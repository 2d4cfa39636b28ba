//! The trainable weights of a decoder of any described architecture as plain
//! dense vectors, and their
//! gradients in the same container. Matrices are row-major `[out, in]` (a linear
//! layer is `y = W·x`), Q/K rows in HF order, tensors named the GGUF way
//! (`blk.N.attn_q.weight`) so an optimizer, a mask or a writer can walk them by
//! name without knowing the architecture.
//!
//! Which block tensors exist is the architecture's description
//! (`config.arch.block`, [`model::arch`]): every block has the q/k/v/o
//! projections and the gated MLP; Llama-family blocks add their two pre-norms,
//! qwen2 q/k/v biases, qwen3 per-head q/k norm gains; gemma3 has pre- and
//! post-norms and per-head q/k norms, olmo2 post-norms only and q/k norms over
//! the whole projection. A [`BlockParams`] has a field for each of them; those
//! the architecture lacks are empty vectors and are not listed by
//! [`Params::tensors`].
//!
//! In a mixture-of-experts block (Qwen3-MoE, Mixtral, OLMoE) the gate, up and
//! down fields hold the routed experts stacked as GGUF stores them
//! (`ffn_{gate,up,down}_exps`, `[experts, out, in]`: expert `e`'s matrix is
//! the `e`-th contiguous slice), and `router` holds `ffn_gate_inp`
//! (`[experts, hidden]`), which the forward reads but training never changes.

use crate::float::Float;
use model::arch::{Role, Slot};
use model::config::ModelConfig;
use model::names;

/// The weights of one decoder block. The optional tensors (the norms, `bq`,
/// `bk`, `bv`, `q_norm`, `k_norm`) are empty when the architecture has no such
/// tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockParams<T> {
    /// Pre-attention RMSNorm gain `[hidden]`; empty when the attention reads
    /// the residual stream itself (olmo2).
    pub attn_norm: Vec<T>,
    /// Query projection `[n_heads·head_dim, hidden]`.
    pub wq: Vec<T>,
    /// Key projection `[n_kv·head_dim, hidden]`.
    pub wk: Vec<T>,
    /// Value projection `[n_kv·head_dim, hidden]`.
    pub wv: Vec<T>,
    /// Attention output projection `[hidden, n_heads·head_dim]`.
    pub wo: Vec<T>,
    /// Pre-MLP RMSNorm gain `[hidden]`; empty when the MLP reads the stream
    /// itself (olmo2).
    pub ffn_norm: Vec<T>,
    /// Gate projection of the gated MLP (SwiGLU or GeGLU) `[ffn, hidden]`.
    pub w_gate: Vec<T>,
    /// Up projection of the gated MLP `[ffn, hidden]`.
    pub w_up: Vec<T>,
    /// MLP down projection `[hidden, ffn]`.
    pub w_down: Vec<T>,
    /// Query bias `[n_heads·head_dim]` (qwen2), added after the projection;
    /// empty when the architecture has none.
    pub bq: Vec<T>,
    /// Key bias `[n_kv·head_dim]` (qwen2); empty when none.
    pub bk: Vec<T>,
    /// Value bias `[n_kv·head_dim]` (qwen2); empty when none.
    pub bv: Vec<T>,
    /// Query RMSNorm gain, applied after the projection and before RoPE: per
    /// head `[head_dim]` (qwen3, gemma3) or over the whole projection
    /// `[n_heads·head_dim]` (olmo2); empty when none.
    pub q_norm: Vec<T>,
    /// Key RMSNorm gain, per head `[head_dim]` or over the whole projection
    /// `[n_kv·head_dim]`; empty when none.
    pub k_norm: Vec<T>,
    /// RMSNorm gain on the attention output before the residual add `[hidden]`
    /// (gemma3, olmo2); empty when none.
    pub attn_post_norm: Vec<T>,
    /// RMSNorm gain on the MLP output before the residual add `[hidden]`;
    /// empty when none.
    pub ffn_post_norm: Vec<T>,
    /// A mixture-of-experts block's router `[experts, hidden]`; empty in a
    /// dense block. Frozen: its gradient is computed, never applied.
    pub router: Vec<T>,
}

/// All weights of a model. The gradients of a model have the same layout and use
/// the same type, see [`Grads`].
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// The hyperparameters the shapes follow.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub token_embd: Vec<T>,
    /// Decoder blocks, in order.
    pub blocks: Vec<BlockParams<T>>,
    /// Final RMSNorm gain `[hidden]`.
    pub output_norm: Vec<T>,
    /// Output head `[vocab, hidden]`; `None` when the head is the embedding
    /// (`config.tie_word_embeddings`).
    pub output: Option<Vec<T>>,
}

/// Gradients of every parameter, laid out like the parameters themselves: the
/// gradient of the tied head is accumulated into `token_embd`.
pub type Grads<T> = Params<T>;

/// A parameter tensor seen by name.
#[derive(Debug)]
pub struct TensorRef<'a, T> {
    /// GGUF name (`blk.3.ffn_up.weight`).
    pub name: String,
    /// Shape, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: &'a [T],
}

/// A parameter tensor seen by name, writable.
#[derive(Debug)]
pub struct TensorMut<'a, T> {
    /// GGUF name (`blk.3.ffn_up.weight`).
    pub name: String,
    /// Shape, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: &'a mut [T],
}

/// Which field of [`BlockParams`] holds a block tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// The tensor that fills a slot of the block graph.
    Slot(Slot),
    /// The router, which the description gives no slot (no stage rewrites it).
    Router,
}

/// The tensors of block `l` of a model with config `c`, in its description's
/// (file) order: field, GGUF suffix and shape (a dense block's MLP, or a
/// mixture-of-experts block's router and stacked experts).
fn block_specs(c: &ModelConfig, l: usize) -> Vec<(Field, &'static str, Vec<usize>)> {
    c.arch
        .block
        .iter()
        .filter(|s| c.block_has(l, s))
        .map(|s| {
            let field = match (s.slot, s.role) {
                (Some(slot), _) => Field::Slot(slot),
                (None, Role::Router) => Field::Router,
                (None, role) => unreachable!("block tensor '{}' ({role:?}) has no slot", s.gguf),
            };
            (field, s.gguf, s.shape.iter().map(|d| d.size(c)).collect())
        })
        .collect()
}

impl<T> BlockParams<T> {
    /// A block with every field empty.
    fn empty() -> Self {
        BlockParams {
            attn_norm: Vec::new(),
            wq: Vec::new(),
            wk: Vec::new(),
            wv: Vec::new(),
            wo: Vec::new(),
            ffn_norm: Vec::new(),
            w_gate: Vec::new(),
            w_up: Vec::new(),
            w_down: Vec::new(),
            bq: Vec::new(),
            bk: Vec::new(),
            bv: Vec::new(),
            q_norm: Vec::new(),
            k_norm: Vec::new(),
            attn_post_norm: Vec::new(),
            ffn_post_norm: Vec::new(),
            router: Vec::new(),
        }
    }

    /// Every field with the block tensor it holds.
    fn fields_mut(&mut self) -> [(Field, &mut Vec<T>); 17] {
        [
            (Field::Slot(Slot::AttnNorm), &mut self.attn_norm),
            (Field::Slot(Slot::Q), &mut self.wq),
            (Field::Slot(Slot::K), &mut self.wk),
            (Field::Slot(Slot::V), &mut self.wv),
            (Field::Slot(Slot::O), &mut self.wo),
            (Field::Slot(Slot::FfnNorm), &mut self.ffn_norm),
            (Field::Slot(Slot::Gate), &mut self.w_gate),
            (Field::Slot(Slot::Up), &mut self.w_up),
            (Field::Slot(Slot::Down), &mut self.w_down),
            (Field::Slot(Slot::QBias), &mut self.bq),
            (Field::Slot(Slot::KBias), &mut self.bk),
            (Field::Slot(Slot::VBias), &mut self.bv),
            (Field::Slot(Slot::QNorm), &mut self.q_norm),
            (Field::Slot(Slot::KNorm), &mut self.k_norm),
            (Field::Slot(Slot::AttnPostNorm), &mut self.attn_post_norm),
            (Field::Slot(Slot::FfnPostNorm), &mut self.ffn_post_norm),
            (Field::Router, &mut self.router),
        ]
    }

    /// The field that holds the tensor of `slot`.
    pub fn slot(&self, slot: Slot) -> &Vec<T> {
        match slot {
            Slot::AttnNorm => &self.attn_norm,
            Slot::Q => &self.wq,
            Slot::K => &self.wk,
            Slot::V => &self.wv,
            Slot::O => &self.wo,
            Slot::FfnNorm => &self.ffn_norm,
            Slot::Gate => &self.w_gate,
            Slot::Up => &self.w_up,
            Slot::Down => &self.w_down,
            Slot::QBias => &self.bq,
            Slot::KBias => &self.bk,
            Slot::VBias => &self.bv,
            Slot::QNorm => &self.q_norm,
            Slot::KNorm => &self.k_norm,
            Slot::AttnPostNorm => &self.attn_post_norm,
            Slot::FfnPostNorm => &self.ffn_post_norm,
            Slot::SharedGate
            | Slot::SharedUp
            | Slot::SharedDown
            | Slot::RouterBias
            | Slot::QA
            | Slot::QANorm
            | Slot::QB
            | Slot::KvA
            | Slot::KvANorm
            | Slot::KB
            | Slot::VB => {
                unreachable!("distillation refuses shared experts and latent attention when it loads a model")
            }
        }
    }

    /// [`BlockParams::slot`], writable.
    pub fn slot_mut(&mut self, slot: Slot) -> &mut Vec<T> {
        match slot {
            Slot::AttnNorm => &mut self.attn_norm,
            Slot::Q => &mut self.wq,
            Slot::K => &mut self.wk,
            Slot::V => &mut self.wv,
            Slot::O => &mut self.wo,
            Slot::FfnNorm => &mut self.ffn_norm,
            Slot::Gate => &mut self.w_gate,
            Slot::Up => &mut self.w_up,
            Slot::Down => &mut self.w_down,
            Slot::QBias => &mut self.bq,
            Slot::KBias => &mut self.bk,
            Slot::VBias => &mut self.bv,
            Slot::QNorm => &mut self.q_norm,
            Slot::KNorm => &mut self.k_norm,
            Slot::AttnPostNorm => &mut self.attn_post_norm,
            Slot::FfnPostNorm => &mut self.ffn_post_norm,
            Slot::SharedGate
            | Slot::SharedUp
            | Slot::SharedDown
            | Slot::RouterBias
            | Slot::QA
            | Slot::QANorm
            | Slot::QB
            | Slot::KvA
            | Slot::KvANorm
            | Slot::KB
            | Slot::VB => {
                unreachable!("distillation refuses shared experts and latent attention when it loads a model")
            }
        }
    }

    /// The fields of `slots`, writable, in that order (each at most once).
    fn slots_mut(&mut self, slots: impl Iterator<Item = Field>) -> Vec<&mut Vec<T>> {
        let mut fields: Vec<Option<(Field, &mut Vec<T>)>> =
            self.fields_mut().into_iter().map(Some).collect();
        slots
            .map(|slot| {
                let f = fields
                    .iter_mut()
                    .find(|f| f.as_ref().is_some_and(|(s, _)| *s == slot))
                    .and_then(Option::take)
                    .unwrap_or_else(|| panic!("block slot {slot:?} listed twice"));
                f.1
            })
            .collect()
    }
}

/// Refuses a model whose graph the training forward does not have: shared
/// experts, routing other than a softmax (DeepSeek's grouped sigmoid, Llama 4's
/// input-weighted top-1), multi-head latent attention and Llama 4's chunked
/// attention. Qwen3-MoE, Mixtral and OLMoE (softmax routing, every block or
/// interleaved with dense ones) train.
pub fn refuse_untrainable(c: &ModelConfig) -> anyhow::Result<()> {
    let arch = c.arch.name;
    let missing = if c.mla.is_some() {
        Some("multi-head latent attention")
    } else if c.chunked_attention.is_some() || c.rope_interleaved {
        Some("Llama 4's chunked attention and adjacent-pair RoPE")
    } else if let Some(m) = &c.moe {
        if m.routing != model::config::Routing::Softmax {
            Some("routing other than a softmax over the experts")
        } else if m.shared_ffn > 0 {
            Some("a shared expert")
        } else {
            None
        }
    } else {
        None
    };
    match missing {
        Some(what) => anyhow::bail!(
            "distillation of a '{arch}' model needs {what}, which the training forward does not have yet; \
             mixtures of experts with softmax routing and no shared expert (qwen3_moe, mixtral, olmoe) train"
        ),
        None => Ok(()),
    }
}

impl<T: Float> Params<T> {
    /// All-zero parameters (or gradients) shaped by `config`: the block tensors
    /// its architecture describes (the others stay empty); the output head
    /// exists only when the config does not tie it to the embedding.
    pub fn zeros(config: &ModelConfig) -> Self {
        let z = |shape: &[usize]| vec![T::ZERO; shape.iter().product()];
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let mut block = BlockParams::empty();
                let specs = block_specs(config, l);
                let fields = block.slots_mut(specs.iter().map(|s| s.0));
                for (field, (_, _, shape)) in fields.into_iter().zip(&specs) {
                    *field = z(shape);
                }
                block
            })
            .collect();
        let (v, h) = (config.vocab_size, config.hidden_size);
        Params {
            config: config.clone(),
            token_embd: z(&[v, h]),
            blocks,
            output_norm: z(&[h]),
            output: (!config.tie_word_embeddings).then(|| z(&[v, h])),
        }
    }

    /// Zeros with the same shapes as `self` (the gradient buffer of these weights).
    pub fn zeros_like(&self) -> Self {
        Self::zeros(&self.config)
    }

    /// Sets every element to zero (clearing accumulated gradients).
    pub fn zero(&mut self) {
        for t in self.tensors_mut() {
            t.data.fill(T::ZERO);
        }
    }

    /// The output head matrix `[vocab, hidden]`: `output`, or the embedding when tied.
    pub fn head(&self) -> &[T] {
        self.output.as_deref().unwrap_or(&self.token_embd)
    }

    /// Every tensor with its GGUF name and shape, in file order: embedding, the
    /// blocks (each in its architecture's description order), final norm, then
    /// the output head when it is not tied. This is [`model::names::all`] less
    /// `rope_freqs.weight`, which is not a parameter (Llama 3 rope scaling, read
    /// from the config).
    pub fn tensors(&self) -> Vec<TensorRef<'_, T>> {
        let c = &self.config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let mut out = vec![TensorRef {
            name: c.arch.global_name(Role::Embedding).into(),
            shape: vec![v, h],
            data: &self.token_embd[..],
        }];
        for (l, b) in self.blocks.iter().enumerate() {
            for (field, suffix, shape) in block_specs(c, l) {
                let data = match field {
                    Field::Slot(slot) => b.slot(slot),
                    Field::Router => &b.router,
                };
                out.push(TensorRef {
                    name: names::block(l, suffix),
                    shape,
                    data,
                });
            }
        }
        out.push(TensorRef {
            name: c.arch.global_name(Role::Norm).into(),
            shape: vec![h],
            data: &self.output_norm,
        });
        if let Some(o) = &self.output {
            out.push(TensorRef {
                name: c.arch.global_name(Role::Head).into(),
                shape: vec![v, h],
                data: o,
            });
        }
        out
    }

    /// [`Params::tensors`], writable.
    pub fn tensors_mut(&mut self) -> Vec<TensorMut<'_, T>> {
        let c = &self.config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let mut out = vec![TensorMut {
            name: c.arch.global_name(Role::Embedding).into(),
            shape: vec![v, h],
            data: &mut self.token_embd[..],
        }];
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let specs = block_specs(c, l);
            let fields = b.slots_mut(specs.iter().map(|s| s.0));
            for ((_, suffix, shape), data) in specs.iter().zip(fields) {
                out.push(TensorMut {
                    name: names::block(l, suffix),
                    shape: shape.clone(),
                    data,
                });
            }
        }
        out.push(TensorMut {
            name: c.arch.global_name(Role::Norm).into(),
            shape: vec![h],
            data: &mut self.output_norm,
        });
        if let Some(o) = &mut self.output {
            out.push(TensorMut {
                name: c.arch.global_name(Role::Head).into(),
                shape: vec![v, h],
                data: o,
            });
        }
        out
    }

    /// The tensor called `name`, if the model has it.
    pub fn get(&self, name: &str) -> Option<&[T]> {
        self.tensors()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.data)
    }

    /// The tensor called `name`, writable, if the model has it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [T]> {
        self.tensors_mut()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.data)
    }

    /// Number of scalar parameters (the tied head counted once).
    pub fn n_params(&self) -> usize {
        self.tensors().iter().map(|t| t.data.len()).sum()
    }

    /// The same parameters in another precision (f64 → f32 rounds to nearest).
    pub fn cast<U: Float>(&self) -> Params<U> {
        let mut out = Params::<U>::zeros(&self.config);
        for (dst, src) in out.tensors_mut().into_iter().zip(self.tensors()) {
            for (d, &s) in dst.data.iter_mut().zip(src.data) {
                *d = U::from_f64(s.to_f64());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{all_tiny_configs, tiny_arch_config, tiny_config};

    #[test]
    fn names_and_shapes_follow_the_gguf_layout() {
        for c in all_tiny_configs() {
            let tied = c.tie_word_embeddings;
            let p = Params::<f32>::zeros(&c);
            let names: Vec<String> = p.tensors().into_iter().map(|t| t.name).collect();
            assert_eq!(names, model::names::all(&c), "{}", c.arch.gguf_name);
            for t in p.tensors() {
                assert_eq!(
                    t.data.len(),
                    t.shape.iter().product::<usize>(),
                    "{}",
                    t.name
                );
                let spec = c.arch.spec(&t.name).expect("a described tensor");
                let want: Vec<usize> = spec.shape.iter().map(|d| d.size(&c)).collect();
                assert_eq!(t.shape, want, "{}", t.name);
            }
            assert_eq!(p.get("blk.1.attn_k.weight").unwrap().len(), c.kv_dim() * 8);
            assert_eq!(p.get("output.weight").is_some(), !tied);
            let qwen2 = c.arch == &model::arch::QWEN2;
            let qwen3 = c.arch == &model::arch::QWEN3;
            for b in &p.blocks {
                if qwen2 || qwen3 || c.arch == &model::arch::LLAMA {
                    assert_eq!(b.bq.len(), if qwen2 { c.q_dim() } else { 0 });
                    assert_eq!(b.bv.len(), if qwen2 { c.kv_dim() } else { 0 });
                    assert_eq!(b.k_norm.len(), if qwen3 { c.head_dim } else { 0 });
                }
                // Every field is as long as its slot's shape, empty without one
                // (absent pre-norms of olmo2 included).
                for spec_slot in [
                    Slot::AttnNorm,
                    Slot::FfnNorm,
                    Slot::AttnPostNorm,
                    Slot::FfnPostNorm,
                    Slot::QBias,
                    Slot::KBias,
                    Slot::VBias,
                    Slot::QNorm,
                    Slot::KNorm,
                ] {
                    let want = c
                        .arch
                        .slot(spec_slot)
                        .map_or(0, |s| s.shape.iter().map(|d| d.size(&c)).product());
                    assert_eq!(b.slot(spec_slot).len(), want, "{spec_slot:?}");
                }
            }
        }
        // Llama 3 rope scaling stored as `rope_freqs.weight` is named by the file
        // layout but is no parameter.
        let mut c = tiny_config(true);
        c.rope_scaling = Some(model::config::RopeScaling::FreqFactors(vec![1.0, 4.0]));
        c.validate().unwrap();
        let names: Vec<String> = Params::<f32>::zeros(&c)
            .tensors()
            .into_iter()
            .map(|t| t.name)
            .collect();
        let mut want = model::names::all(&c);
        assert_eq!(want.pop().as_deref(), Some("rope_freqs.weight"));
        assert_eq!(names, want);
    }

    #[test]
    fn optional_tensors_are_reached_by_name() {
        let mut p = Params::<f64>::zeros(&tiny_arch_config(&model::arch::QWEN2, true, 4));
        p.get_mut("blk.1.attn_v.bias").unwrap()[2] = 1.5;
        assert_eq!(p.blocks[1].bv[2], 1.5);
        assert!(p.get("blk.1.attn_q_norm.weight").is_none());
        let mut p = Params::<f64>::zeros(&tiny_arch_config(&model::arch::QWEN3, false, 6));
        p.get_mut("blk.0.attn_k_norm.weight").unwrap()[5] = -2.0;
        assert_eq!(p.blocks[0].k_norm[5], -2.0);
        assert!(p.get("blk.0.attn_q.bias").is_none() && p.blocks[0].bq.is_empty());
        assert_eq!(p.cast::<f32>().blocks[0].k_norm[5], -2.0f32);
    }

    #[test]
    fn mutable_view_reaches_the_fields() {
        let mut p = Params::<f64>::zeros(&tiny_config(false));
        p.get_mut("blk.1.ffn_down.weight").unwrap()[3] = 2.5;
        p.get_mut("output.weight").unwrap()[0] = 1.0;
        assert_eq!(p.blocks[1].w_down[3], 2.5);
        assert_eq!(p.output.as_ref().unwrap()[0], 1.0);
        let q = p.cast::<f32>();
        assert_eq!(q.blocks[1].w_down[3], 2.5f32);
        p.zero();
        assert!(p.tensors().iter().all(|t| t.data.iter().all(|&x| x == 0.0)));
    }
}
