//! Model: checkpoint readers and writers (GGUF v3, safetensors), the config, the
//! tokenizer, and the Llama-family forward pass, all behind one in-memory view
//! ([`Model`]) whatever file the weights came from.

pub mod arch;
pub mod calib;
pub mod checkpoint;
pub mod config;
pub mod dense;
pub mod gguf;
pub mod gguf_export;
pub mod hf_quant;
pub mod io;
pub mod llama;
pub mod names;
pub mod progress;
pub mod safetensors_file;
pub mod sparse_ct;
pub mod tokenizer;

pub use checkpoint::{Model, Tensor};
pub use config::ModelConfig;
