//! Quant: weight quantization. GGUF type mixes as llama.cpp names them
//! ([`gguf_mix`]), the streaming, importance-weighted quantization of a whole
//! model into a GGUF file ([`gguf_quantize`]), per-tensor bit allocation
//! ([`bit_alloc`]), and calibrated quantization: GPTQ on integer and GGUF grids
//! ([`gptq`]), AWQ scales ([`awq`]) and the block-by-block runner that feeds
//! them ([`calibrated`]).

pub mod awq;
pub mod bit_alloc;
pub mod calibrated;
pub mod gguf_mix;
pub mod gguf_quantize;
pub mod gptq;

pub use gguf_mix::{Mix, Override};
