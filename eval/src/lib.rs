//! Eval: quality measurements of a model against text, with llama.cpp's
//! protocol so the numbers compare with `llama-perplexity`.

pub mod perplexity;
pub mod text;

pub use perplexity::{perplexity, PerplexityOptions, PerplexityReport};
