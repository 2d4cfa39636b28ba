//! Eval: quality measurements of a model against text, with llama.cpp's
//! protocol so the numbers compare with `llama-perplexity`: perplexity, and KL
//! divergence and top-1 agreement against a base model.

pub mod fidelity;
pub mod gate;
pub mod kld;
pub mod perplexity;
pub mod report;
pub mod sensitivity;
pub mod text;

pub use kld::{compare, compare_many, CompareReport, KldStats};
pub use perplexity::{perplexity, PerplexityOptions, PerplexityReport};
