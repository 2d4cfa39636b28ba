//! Pruning without model code: importance scores and masks for one weight matrix
//! at a time (magnitude, Wanda, SparseGPT; unstructured or N:M), and per-layer
//! sparsity schedules. The calibration runner that walks a model and hands each
//! linear layer its input statistics lives in `quant::calibrated`; the command
//! that glues the two is `compress prune`.
//!
//! Weights are row-major `rows × cols` (output features × input features), as
//! every linear layer is stored; N:M groups run along the input dimension, which
//! is the layout sparse tensor cores and compressed-tensors' 2:4 format expect.

pub mod pattern;
pub mod schedule;
pub mod score;
pub mod sparsegpt;
pub mod structured;

pub use pattern::Pattern;
