//! Quant: weight quantization. GGUF type mixes as llama.cpp names them
//! ([`gguf_mix`]) and the streaming, importance-weighted quantization of a whole
//! model into a GGUF file ([`gguf_quantize`]).

pub mod bit_alloc;
pub mod calibrated;
pub mod gguf_mix;
pub mod gguf_quantize;
pub mod gptq;

pub use gguf_mix::{Mix, Override};
