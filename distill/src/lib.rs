//! Knowledge distillation on the CPU for every described decoder architecture
//! (Llama, Qwen 2/3, and the block shapes of Gemma 3, OLMo 2, SmolLM3 and
//! sliding-window Mistral: see [`transformer`] for the graph). The training
//! core: the model's forward pass with a hand-written backward pass
//! ([`transformer`], built from the op pairs in [`ops`]), the logit losses
//! ([`loss`]), the parameter and gradient containers ([`params`]) and reading a
//! checkpoint into them ([`Params::from_model`]); and the stage itself
//! ([`run`]: teacher cache, layer map, training loop, checkpoints, writing the
//! trained model), which `compress distill` configures with [`DistillOptions`].
//!
//! Everything is generic over [`Float`]: the gradient checks run the same code in
//! f64 against central finite differences, training runs it in f32.
//!
//! ```no_run
//! use distill::{backward, forward, loss, Params};
//! # fn main() -> anyhow::Result<()> {
//! let model = model::Model::open(std::path::Path::new("student.gguf"))?;
//! let params = Params::from_model(&model)?;
//! let tokens = model.tokenizer.encode("Some training text.")?;
//! let acts = forward(&params, &tokens)?;
//! let vocab = params.config.vocab_size;
//! let mut dlogits = vec![0f32; acts.logits.len()];
//! let ce = loss::next_token_cross_entropy(&acts.logits, vocab, &tokens, 1.0, &mut dlogits)?;
//! let mut grads = params.zeros_like();
//! backward(&params, &acts, &dlogits, &[], &mut grads);
//! # let _ = ce;
//! # Ok(())
//! # }
//! ```

pub mod float;
pub mod gemm;
mod load;
pub mod loss;
pub mod moe;
pub mod ops;
pub mod params;
pub mod run;
pub mod student;
pub mod train;
pub mod transformer;

#[cfg(test)]
mod gradcheck;
#[cfg(test)]
mod testutil;

pub use float::Float;
pub use params::{BlockParams, Grads, Params, TensorMut, TensorRef};
pub use run::{DistillOptions, Train};
pub use student::{Method, Student};
pub use transformer::{backward, forward, Activations, BlockActs};
