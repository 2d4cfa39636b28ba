//! The trainable weights of a Llama-family model as plain dense vectors, and their
//! gradients in the same container. Matrices are row-major `[out, in]` (a linear
//! layer is `y = W·x`), Q/K rows in HF order, tensors named the GGUF way
//! (`blk.N.attn_q.weight`) so an optimizer, a mask or a writer can walk them by
//! name without knowing the architecture.

use crate::float::Float;
use model::config::ModelConfig;
use model::names;

/// The weights of one decoder block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockParams<T> {
    /// Pre-attention RMSNorm gain `[hidden]`.
    pub attn_norm: Vec<T>,
    /// Query projection `[n_heads·head_dim, hidden]`.
    pub wq: Vec<T>,
    /// Key projection `[n_kv·head_dim, hidden]`.
    pub wk: Vec<T>,
    /// Value projection `[n_kv·head_dim, hidden]`.
    pub wv: Vec<T>,
    /// Attention output projection `[hidden, n_heads·head_dim]`.
    pub wo: Vec<T>,
    /// Pre-MLP RMSNorm gain `[hidden]`.
    pub ffn_norm: Vec<T>,
    /// SwiGLU gate projection `[ffn, hidden]`.
    pub w_gate: Vec<T>,
    /// SwiGLU up projection `[ffn, hidden]`.
    pub w_up: Vec<T>,
    /// MLP down projection `[hidden, ffn]`.
    pub w_down: Vec<T>,
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

/// The per-block tensor slots in [`model::names::BLOCK_TENSORS`] order, with their
/// shapes for a config.
fn block_shapes(c: &ModelConfig) -> [(&'static str, Vec<usize>); 9] {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    [
        ("attn_norm.weight", vec![h]),
        ("attn_q.weight", vec![c.q_dim(), h]),
        ("attn_k.weight", vec![c.kv_dim(), h]),
        ("attn_v.weight", vec![c.kv_dim(), h]),
        ("attn_output.weight", vec![h, c.q_dim()]),
        ("ffn_norm.weight", vec![h]),
        ("ffn_gate.weight", vec![f, h]),
        ("ffn_up.weight", vec![f, h]),
        ("ffn_down.weight", vec![h, f]),
    ]
}

impl<T> BlockParams<T> {
    /// The nine tensors in [`model::names::BLOCK_TENSORS`] order.
    fn slots(&self) -> [&Vec<T>; 9] {
        [
            &self.attn_norm,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.ffn_norm,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    /// [`BlockParams::slots`], writable.
    fn slots_mut(&mut self) -> [&mut Vec<T>; 9] {
        [
            &mut self.attn_norm,
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.ffn_norm,
            &mut self.w_gate,
            &mut self.w_up,
            &mut self.w_down,
        ]
    }
}

impl<T: Float> Params<T> {
    /// All-zero parameters (or gradients) shaped by `config`; the output head
    /// exists only when the config does not tie it to the embedding.
    pub fn zeros(config: &ModelConfig) -> Self {
        let z = |shape: &[usize]| vec![T::ZERO; shape.iter().product()];
        let bs = block_shapes(config);
        let block = BlockParams {
            attn_norm: z(&bs[0].1),
            wq: z(&bs[1].1),
            wk: z(&bs[2].1),
            wv: z(&bs[3].1),
            wo: z(&bs[4].1),
            ffn_norm: z(&bs[5].1),
            w_gate: z(&bs[6].1),
            w_up: z(&bs[7].1),
            w_down: z(&bs[8].1),
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        Params {
            config: config.clone(),
            token_embd: z(&[v, h]),
            blocks: vec![block; config.num_hidden_layers],
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
    /// blocks, final norm, then the output head when it is not tied.
    pub fn tensors(&self) -> Vec<TensorRef<'_, T>> {
        let c = &self.config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let mut out = vec![TensorRef {
            name: "token_embd.weight".into(),
            shape: vec![v, h],
            data: &self.token_embd[..],
        }];
        for (l, b) in self.blocks.iter().enumerate() {
            for ((suffix, shape), data) in block_shapes(c).into_iter().zip(b.slots()) {
                out.push(TensorRef {
                    name: names::block(l, suffix),
                    shape,
                    data,
                });
            }
        }
        out.push(TensorRef {
            name: "output_norm.weight".into(),
            shape: vec![h],
            data: &self.output_norm,
        });
        if let Some(o) = &self.output {
            out.push(TensorRef {
                name: "output.weight".into(),
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
        let shapes = block_shapes(c);
        let mut out = vec![TensorMut {
            name: "token_embd.weight".into(),
            shape: vec![v, h],
            data: &mut self.token_embd[..],
        }];
        for (l, b) in self.blocks.iter_mut().enumerate() {
            for ((suffix, shape), data) in shapes.iter().zip(b.slots_mut()) {
                out.push(TensorMut {
                    name: names::block(l, suffix),
                    shape: shape.clone(),
                    data,
                });
            }
        }
        out.push(TensorMut {
            name: "output_norm.weight".into(),
            shape: vec![h],
            data: &mut self.output_norm,
        });
        if let Some(o) = &mut self.output {
            out.push(TensorMut {
                name: "output.weight".into(),
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
    use crate::testutil::tiny_config;

    #[test]
    fn names_and_shapes_follow_the_gguf_layout() {
        for tied in [true, false] {
            let c = tiny_config(tied);
            let p = Params::<f32>::zeros(&c);
            let names: Vec<String> = p.tensors().into_iter().map(|t| t.name).collect();
            assert_eq!(names, model::names::all(&c));
            for t in p.tensors() {
                assert_eq!(
                    t.data.len(),
                    t.shape.iter().product::<usize>(),
                    "{}",
                    t.name
                );
            }
            assert_eq!(p.get("blk.1.attn_k.weight").unwrap().len(), c.kv_dim() * 8);
            assert_eq!(p.get("output.weight").is_some(), !tied);
        }
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
