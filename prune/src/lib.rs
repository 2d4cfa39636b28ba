//! Pruning: importance scores and masks for one weight matrix at a time
//! (magnitude, Wanda, SparseGPT; unstructured or N:M) and per-layer sparsity
//! schedules, which know no model; and the two stages over a whole model that
//! `compress prune` runs: [`stage`] (unstructured and N:M, over the shared
//! calibration walk in `model::calib::walk`) and [`cut`] (structured cuts that
//! make the model smaller).
//!
//! Weights are row-major `rows × cols` (output features × input features), as
//! every linear layer is stored; N:M groups run along the input dimension, which
//! is the layout sparse tensor cores and compressed-tensors' 2:4 format expect.

pub mod cut;
pub mod pattern;
pub mod schedule;
pub mod score;
pub mod sparsegpt;
pub mod stage;
pub mod structured;

pub use pattern::Pattern;
