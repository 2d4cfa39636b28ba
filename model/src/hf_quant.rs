//! Integer-quantized linear layers (GPTQ, AWQ, RTN results) in HF safetensors, both
//! ways: [`HfQuantWriter`] streams a folder that HF transformers, vLLM and GPTQModel
//! load (`config.json` with a `quantization_config`, `model.safetensors`, the
//! tokenizer), and [`HfQuantized`] reads such a folder back for `Model::open`,
//! handing out each quantized linear dequantized to f32.
//!
//! Two layouts, as their reference loaders read them:
//!
//! - GPTQ (`checkpoint_format: "gptq"`, v1): per linear `qweight` I32
//!   `[in·bits/32, out]`, each column of codes one LSB-first bit stream along the
//!   input dimension (3-bit values straddle 32-bit words: 32 values fill 3 words);
//!   `qzeros` I32 `[n_groups, out·bits/32]` holding zero − 1, packed the same way
//!   along the output dimension; `scales` F16 `[n_groups, out]`; `g_idx` I32 `[in]`.
//!   v1 cannot store a zero point of 0 (loaders add 1 back without masking), so the
//!   writer refuses one; the reader also takes `checkpoint_format: "gptq_v2"`
//!   (zero points stored as they are).
//! - compressed-tensors `pack-quantized`: `weight_packed` I32
//!   `[out, ceil(in·bits/32)]`, each row one LSB-first bit stream of the codes (the
//!   signed value `code − 2^(bits−1)` plus compressed-tensors' offset
//!   `2^(bits−1)`); `weight_scale` F16 `[out, n_groups]`; for asymmetric schemes
//!   `weight_zero_point` I32 `[ceil(out·bits/32), n_groups]` packed along the
//!   output dimension; `weight_shape` I64 `[2]` (`[out, in]`, as
//!   `torch.tensor(weight.shape)` saves it; I32 is read too); `weight_g_idx` I32
//!   `[in]` with `actorder: "group"`. 2-, 4- and 8-bit only: compressed-tensors
//!   changed its 3-bit packing in 0.18 (10 values per word before, 32 values in 3
//!   words after) with nothing in the checkpoint telling the two apart.

use crate::arch::{Arch, Role};
use crate::checkpoint::Model;
use crate::config::ModelConfig;
use crate::names;
use crate::safetensors_file::{Dtype, SafetensorsSet, SafetensorsWriter};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use half::f16;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tensor names in the order the block-streaming writers receive them: the
/// embedding, per block its norms, then its other float tensors (biases,
/// per-head norms), then its linears in the description's order (GPTQ's), the
/// final norm, the untied head and any other global tensor.
pub fn write_order(c: &crate::ModelConfig) -> Vec<String> {
    let all = names::all(c);
    let rank = |name: &str| match c.arch.role(name) {
        Some(Role::Norm) => 0,
        Some(Role::Linear) => 2,
        _ => 1,
    };
    // A stable sort inside each block keeps the description's order per rank.
    let mut order = Vec::with_capacity(all.len());
    let mut i = 0;
    while i < all.len() {
        match names::block_index(&all[i]) {
            None => {
                order.push(all[i].clone());
                i += 1;
            }
            Some(l) => {
                let end = all[i..]
                    .iter()
                    .position(|n| names::block_index(n) != Some(l))
                    .map_or(all.len(), |p| i + p);
                let mut block: Vec<&String> = all[i..end].iter().collect();
                block.sort_by_key(|n| rank(n));
                order.extend(block.into_iter().cloned());
                i = end;
            }
        }
    }
    order
}

/// Whether a canonical name is one of the block linears of architecture `arch`.
pub fn is_block_linear(arch: &Arch, canonical: &str) -> bool {
    names::block_index(canonical).is_some() && arch.role(canonical) == Some(Role::Linear)
}

/// One linear layer quantized to integers with per-group scales (GPTQ, AWQ, RTN).
/// Element (o, i) dequantizes to `scales[o·n_groups + g] · (codes[o·in + i] − zeros[o·n_groups + g])`
/// with `g = g_idx[i]`, computed in f32 from the f16 scale.
#[derive(Debug, Clone, PartialEq)]
pub struct IntLinear {
    /// Rows of the weight (outputs).
    pub out_features: usize,
    /// Columns of the weight (inputs).
    pub in_features: usize,
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns per group; `== in_features` for per-channel.
    pub group_size: usize,
    /// out × in, row-major, each < 2^bits.
    pub codes: Vec<u8>,
    /// out × n_groups.
    pub scales: Vec<f16>,
    /// out × n_groups, integer zero points < 2^bits (symmetric: 2^(bits−1)).
    pub zeros: Vec<u8>,
    /// in: group of each input column (i / group_size unless act-order without static groups).
    pub g_idx: Vec<u32>,
}

impl IntLinear {
    /// Number of groups per row: ⌈in_features / group_size⌉.
    pub fn n_groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size.max(1))
    }

    /// The weight in f32, out × in row-major: `f32(scale) · (code − zero)`, one f32
    /// multiplication per element (exact inputs, so any reader that does the same
    /// gets the same bits). Panics on a malformed layer; [`IntLinear::check`] first
    /// where the values come from outside.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols, ng) = (self.out_features, self.in_features, self.n_groups());
        let mut out = vec![0f32; rows * cols];
        let mut scale = vec![0f32; ng];
        let mut zero = vec![0i32; ng];
        for o in 0..rows {
            for g in 0..ng {
                scale[g] = self.scales[o * ng + g].to_f32();
                zero[g] = i32::from(self.zeros[o * ng + g]);
            }
            let codes = &self.codes[o * cols..(o + 1) * cols];
            let dst = &mut out[o * cols..(o + 1) * cols];
            for ((d, &c), &g) in dst.iter_mut().zip(codes).zip(&self.g_idx) {
                let g = g as usize;
                *d = scale[g] * (i32::from(c) - zero[g]) as f32;
            }
        }
        out
    }

    /// Checks the layer is well formed: bits 2, 3, 4 or 8, positive sizes, vector
    /// lengths, codes and zero points below 2^bits, g_idx inside the groups, finite
    /// scales. The error says what is wrong (callers add the tensor name).
    pub fn check(&self) -> Result<()> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            bail!("bits is {}, expected 2, 3, 4 or 8", self.bits);
        }
        if self.out_features == 0 || self.in_features == 0 || self.group_size == 0 {
            bail!(
                "out_features {}, in_features {} and group_size {} must be positive",
                self.out_features,
                self.in_features,
                self.group_size
            );
        }
        let ng = self.n_groups();
        let lens = [
            (
                "codes",
                self.codes.len(),
                self.out_features * self.in_features,
            ),
            ("scales", self.scales.len(), self.out_features * ng),
            ("zeros", self.zeros.len(), self.out_features * ng),
            ("g_idx", self.g_idx.len(), self.in_features),
        ];
        for (what, got, want) in lens {
            if got != want {
                bail!(
                    "{what} has {got} entries, expected {want} ({} × {}, {ng} groups of {})",
                    self.out_features,
                    self.in_features,
                    self.group_size
                );
            }
        }
        let limit = 1u32 << self.bits;
        if let Some(p) = self.codes.iter().position(|&c| u32::from(c) >= limit) {
            bail!(
                "code {} at ({}, {}) does not fit in {} bits",
                self.codes[p],
                p / self.in_features,
                p % self.in_features,
                self.bits
            );
        }
        if let Some(p) = self.zeros.iter().position(|&z| u32::from(z) >= limit) {
            bail!(
                "zero point {} of row {} group {} does not fit in {} bits",
                self.zeros[p],
                p / ng,
                p % ng,
                self.bits
            );
        }
        if let Some(i) = self.g_idx.iter().position(|&g| g as usize >= ng) {
            bail!(
                "g_idx[{i}] is {}, but there are only {ng} groups",
                self.g_idx[i]
            );
        }
        if let Some(p) = self.scales.iter().position(|s| !s.is_finite()) {
            bail!(
                "scale of row {} group {} is {}",
                p / ng,
                p % ng,
                self.scales[p]
            );
        }
        Ok(())
    }

    /// Whether every column is in group `i / group_size` (no act-order permutation).
    pub fn has_trivial_g_idx(&self) -> bool {
        self.g_idx
            .iter()
            .enumerate()
            .all(|(i, &g)| g as usize == i / self.group_size.max(1))
    }
}

/// Which HF layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfQuantFormat {
    /// GPTQ v1 (`quant_method: "gptq"`, `checkpoint_format: "gptq"`).
    Gptq,
    /// compressed-tensors `pack-quantized`.
    CompressedTensors,
}

impl HfQuantFormat {
    fn name(self) -> &'static str {
        match self {
            HfQuantFormat::Gptq => "GPTQ",
            HfQuantFormat::CompressedTensors => "compressed-tensors pack-quantized",
        }
    }
}

/// The settings recorded in config.json's quantization_config.
#[derive(Debug, Clone, PartialEq)]
pub struct IntQuantConfig {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns per group as given by the user (ignored when `per_channel`;
    /// per-channel layers have `group_size == in_features`).
    pub group_size: usize,
    /// One scale per output row instead of per group.
    pub per_channel: bool,
    /// Symmetric: every zero point is 2^(bits−1).
    pub sym: bool,
    /// Act-order: columns were quantized in order of decreasing activation energy.
    pub desc_act: bool,
    /// With act-order, groups fixed before the permutation (so g_idx stays i / group_size).
    pub static_groups: bool,
    /// GPTQ's Hessian dampening, as a fraction of the mean diagonal.
    pub damp_percent: f64,
    /// GPTQ quantized the linears of a block one after another.
    pub true_sequential: bool,
    /// `"gptq"`, `"awq"` or `"rtn"`.
    pub method: String,
}

impl IntQuantConfig {
    /// Checks the settings can be written in `format`.
    pub fn check(&self, format: HfQuantFormat) -> Result<()> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            bail!("bits {} is not supported: 2, 3, 4 or 8", self.bits);
        }
        if !self.per_channel && self.group_size == 0 {
            bail!("group_size must be positive (or per-channel)");
        }
        if !matches!(self.method.as_str(), "gptq" | "awq" | "rtn") {
            bail!("method '{}' is not one of gptq, awq, rtn", self.method);
        }
        if !(self.damp_percent.is_finite() && self.damp_percent >= 0.0) {
            bail!(
                "damp_percent {} must be a non-negative number",
                self.damp_percent
            );
        }
        if format == HfQuantFormat::CompressedTensors {
            if self.bits == 3 {
                bail!(
                    "3-bit cannot be written as compressed-tensors pack-quantized: its 3-bit packing \
                     changed in compressed-tensors 0.18 (10 values per int32 before, 32 values in 3 \
                     int32 after) and the checkpoint cannot say which; vLLM's compressed-tensors \
                     loader takes 4 and 8 bits only. Use the GPTQ format for 3 bits"
                );
            }
            if self.per_channel && self.desc_act && !self.static_groups {
                bail!(
                    "act-order without static groups is compressed-tensors' actorder \"group\", \
                     which needs the group strategy, not per-channel"
                );
            }
        }
        Ok(())
    }

    /// Whether g_idx may differ from i / group_size.
    fn permuted_groups(&self) -> bool {
        self.desc_act && !self.static_groups && !self.per_channel
    }
}

/// How one format stores the quantized linears: what the writer and reader share.
#[derive(Debug, Clone, PartialEq)]
struct Scheme {
    format: HfQuantFormat,
    bits: u32,
    sym: bool,
    /// None: per-channel.
    group_size: Option<usize>,
    /// GPTQ v1: qzeros hold zero − 1.
    zeros_minus_one: bool,
    /// compressed-tensors actorder "group": `weight_g_idx` is stored.
    ct_g_idx: bool,
}

/// One stored tensor of a quantized linear: suffix after the HF prefix, dtype, shape.
type Part = (&'static str, Dtype, Vec<usize>);

impl Scheme {
    fn from_config(format: HfQuantFormat, cfg: &IntQuantConfig) -> Self {
        Scheme {
            format,
            bits: cfg.bits,
            sym: cfg.sym,
            group_size: (!cfg.per_channel).then_some(cfg.group_size),
            zeros_minus_one: format == HfQuantFormat::Gptq,
            ct_g_idx: format == HfQuantFormat::CompressedTensors && cfg.permuted_groups(),
        }
    }

    fn group_size(&self, in_features: usize) -> usize {
        self.group_size.unwrap_or(in_features)
    }

    fn n_groups(&self, in_features: usize) -> usize {
        in_features.div_ceil(self.group_size(in_features).max(1))
    }

    /// Checks the format can hold an `out × in` linear at all.
    fn check_dims(&self, out: usize, inp: usize) -> Result<()> {
        let b = self.bits as usize;
        if self.format == HfQuantFormat::Gptq {
            if !(inp * b).is_multiple_of(32) {
                bail!(
                    "{inp} inputs do not fill whole int32 words at {b} bits, as GPTQ's qweight needs"
                );
            }
            if !(out * b).is_multiple_of(32) {
                bail!(
                    "{out} outputs do not fill whole int32 words at {b} bits, as GPTQ's qzeros needs"
                );
            }
        }
        Ok(())
    }

    /// The tensors of an `out × in` linear, in file order.
    fn parts(&self, out: usize, inp: usize) -> Vec<Part> {
        let b = self.bits as usize;
        let ng = self.n_groups(inp);
        match self.format {
            HfQuantFormat::Gptq => vec![
                ("qweight", Dtype::I32, vec![inp * b / 32, out]),
                ("qzeros", Dtype::I32, vec![ng, out * b / 32]),
                ("scales", Dtype::F16, vec![ng, out]),
                ("g_idx", Dtype::I32, vec![inp]),
            ],
            HfQuantFormat::CompressedTensors => {
                let mut v = vec![
                    (
                        "weight_packed",
                        Dtype::I32,
                        vec![out, (inp * b).div_ceil(32)],
                    ),
                    ("weight_scale", Dtype::F16, vec![out, ng]),
                ];
                if !self.sym {
                    v.push((
                        "weight_zero_point",
                        Dtype::I32,
                        vec![(out * b).div_ceil(32), ng],
                    ));
                }
                v.push(("weight_shape", Dtype::I64, vec![2]));
                if self.ct_g_idx {
                    v.push(("weight_g_idx", Dtype::I32, vec![inp]));
                }
                v
            }
        }
    }

    /// The bytes of each of [`Scheme::parts`] for `q` (already checked).
    fn encode(&self, q: &IntLinear) -> Vec<Vec<u8>> {
        let (out, inp, ng, b) = (q.out_features, q.in_features, q.n_groups(), q.bits);
        let scales_t = || -> Vec<u8> {
            (0..ng)
                .flat_map(|g| (0..out).map(move |o| (g, o)))
                .flat_map(|(g, o)| q.scales[o * ng + g].to_le_bytes())
                .collect()
        };
        let g_idx = || -> Vec<u8> { q.g_idx.iter().flat_map(|g| g.to_le_bytes()).collect() };
        match self.format {
            HfQuantFormat::Gptq => {
                // qweight: column o is the bit stream of row o of the codes.
                let rows = inp * b as usize / 32;
                let mut qweight = vec![0u32; rows * out];
                let mut words = Vec::with_capacity(rows);
                for o in 0..out {
                    words.clear();
                    let row = &q.codes[o * inp..(o + 1) * inp];
                    pack_stream(row.iter().map(|&c| u32::from(c)), b, &mut words);
                    for (r, &w) in words.iter().enumerate() {
                        qweight[r * out + o] = w;
                    }
                }
                let mask = (1u32 << b) - 1;
                let mut qzeros = Vec::with_capacity(ng * out * b as usize / 32);
                for g in 0..ng {
                    let zs =
                        (0..out).map(|o| (u32::from(q.zeros[o * ng + g]).wrapping_sub(1)) & mask);
                    pack_stream(zs, b, &mut qzeros);
                }
                vec![
                    words_bytes(&qweight),
                    words_bytes(&qzeros),
                    scales_t(),
                    g_idx(),
                ]
            }
            HfQuantFormat::CompressedTensors => {
                let mut packed = Vec::with_capacity(out * (inp * b as usize).div_ceil(32));
                for o in 0..out {
                    let row = &q.codes[o * inp..(o + 1) * inp];
                    pack_stream(row.iter().map(|&c| u32::from(c)), b, &mut packed);
                }
                let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                let mut v = vec![words_bytes(&packed), scales];
                if !self.sym {
                    // Packed along the output dimension: column g is the stream of zeros[·, g].
                    let rows = (out * b as usize).div_ceil(32);
                    let mut zp = vec![0u32; rows * ng];
                    let mut words = Vec::with_capacity(rows);
                    for g in 0..ng {
                        words.clear();
                        pack_stream(
                            (0..out).map(|o| u32::from(q.zeros[o * ng + g])),
                            b,
                            &mut words,
                        );
                        for (r, &w) in words.iter().enumerate() {
                            zp[r * ng + g] = w;
                        }
                    }
                    v.push(words_bytes(&zp));
                }
                v.push(
                    [out as i64, inp as i64]
                        .iter()
                        .flat_map(|d| d.to_le_bytes())
                        .collect(),
                );
                if self.ct_g_idx {
                    v.push(g_idx());
                }
                v
            }
        }
    }

    /// Checks `q` against the scheme beyond [`IntLinear::check`]: bits, group size,
    /// zero points the format can store, g_idx the format can express.
    fn check_linear(&self, q: &IntLinear, permuted_groups: bool) -> Result<()> {
        q.check()?;
        if q.bits != self.bits {
            bail!("is {}-bit, the file is {}-bit", q.bits, self.bits);
        }
        let gs = self.group_size(q.in_features);
        if q.group_size != gs {
            match self.group_size {
                None => bail!(
                    "has group_size {}, per-channel needs group_size == in_features ({})",
                    q.group_size,
                    q.in_features
                ),
                Some(g) => bail!("has group_size {}, the file's is {g}", q.group_size),
            }
        }
        let half = 1u8 << (self.bits - 1);
        if self.sym {
            if let Some(p) = q.zeros.iter().position(|&z| z != half) {
                bail!(
                    "is symmetric but the zero point of row {} group {} is {}, not {half}",
                    p / q.n_groups(),
                    p % q.n_groups(),
                    q.zeros[p]
                );
            }
        }
        if self.zeros_minus_one {
            if let Some(p) = q.zeros.iter().position(|&z| z == 0) {
                bail!(
                    "has zero point 0 (row {} group {}), which GPTQ v1 cannot store (it keeps zero − 1 \
                     and loaders add 1 back without wrapping); use zero points in 1..={}",
                    p / q.n_groups(),
                    p % q.n_groups(),
                    (1u32 << self.bits) - 1
                );
            }
        }
        if !permuted_groups && !q.has_trivial_g_idx() {
            bail!(
                "has a permuted g_idx, but the config says no act-order without static groups \
                 (desc_act false or static_groups true): g_idx must be i / group_size"
            );
        }
        Ok(())
    }

    /// Finds the tensors of the linear stored under `prefix` (e.g.
    /// `model.layers.0.self_attn.q_proj`), checks every dtype and shape and the
    /// g_idx range, and reads g_idx. Codes and zero points need no check: unpacking
    /// masks them to `bits`.
    fn locate<'a>(&self, set: &'a SafetensorsSet, prefix: &str) -> Result<Located<'a>> {
        let get = |suffix: &str| set.get(&format!("{prefix}.{suffix}"));
        let must = |suffix: &str| {
            get(suffix).with_context(|| format!("tensor '{prefix}.{suffix}' is missing"))
        };
        let b = self.bits as usize;
        // The linear's size, from the tensors that carry it.
        let (out, inp) = match self.format {
            HfQuantFormat::Gptq => {
                let (qw, _) = must("qweight")?;
                if qw.shape.len() != 2 {
                    bail!(
                        "tensor '{prefix}.qweight' has shape {:?}, expected 2 dimensions",
                        qw.shape
                    );
                }
                let inp = match get("g_idx") {
                    Some((g, _)) => g.shape.first().copied().unwrap_or(0),
                    None => qw.shape[0] * 32 / b,
                };
                (qw.shape[1], inp)
            }
            HfQuantFormat::CompressedTensors => {
                let (e, bytes) = must("weight_shape")?;
                let dims: Vec<i64> = match e.dtype {
                    Dtype::I64 => bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                    Dtype::I32 => bytes
                        .chunks_exact(4)
                        .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
                        .collect(),
                    d => bail!(
                        "tensor '{prefix}.weight_shape' is {}, expected I64 or I32",
                        d.name()
                    ),
                };
                // Each side below 2²⁴ (as a config's dims), so the sizes the
                // packed parts are checked against cannot wrap.
                let fits = |d: i64| (1..=1 << 24).contains(&d);
                match dims[..] {
                    [o, i] if fits(o) && fits(i) => (o as usize, i as usize),
                    _ => bail!(
                        "tensor '{prefix}.weight_shape' is {dims:?}, expected [out, in], each from 1 to 2^24"
                    ),
                }
            }
        };
        self.check_dims(out, inp)
            .with_context(|| format!("linear '{prefix}' ({out} × {inp})"))?;
        let mut bytes = HashMap::new();
        for (suffix, dtype, shape) in self.parts(out, inp) {
            let name = format!("{prefix}.{suffix}");
            let Some((e, data)) = set.get(&name) else {
                if suffix == "g_idx" {
                    continue; // optional in GPTQ: i / group_size
                }
                bail!("tensor '{name}' is missing");
            };
            let dtype_ok = e.dtype == dtype || (suffix == "weight_shape" && e.dtype == Dtype::I32);
            if !dtype_ok || e.shape != shape {
                bail!(
                    "tensor '{name}' is {} {:?}, expected {} {shape:?} for a {b}-bit {} linear with \
                     {out} outputs and {inp} inputs",
                    e.dtype.name(),
                    e.shape,
                    dtype.name(),
                    self.format.name()
                );
            }
            bytes.insert(suffix, data);
        }
        let ng = self.n_groups(inp);
        let gs = self.group_size(inp);
        let g_name = match self.format {
            HfQuantFormat::Gptq => "g_idx",
            HfQuantFormat::CompressedTensors => "weight_g_idx",
        };
        let g_idx: Vec<u32> = match bytes.get(g_name) {
            Some(data) => {
                let g: Vec<i32> = le_words(data).into_iter().map(|w| w as i32).collect();
                if let Some(i) = g.iter().position(|&v| v < 0 || v as usize >= ng) {
                    bail!(
                        "tensor '{prefix}.{g_name}' entry {i} is {}, outside the {ng} groups",
                        g[i]
                    );
                }
                g.into_iter().map(|v| v as u32).collect()
            }
            None => (0..inp).map(|i| (i / gs) as u32).collect(),
        };
        Ok(Located {
            out,
            inp,
            bytes,
            g_idx,
        })
    }

    /// Reads the linear stored under `prefix` (checked by [`Scheme::locate`]).
    fn decode(&self, set: &SafetensorsSet, prefix: &str) -> Result<IntLinear> {
        let Located {
            out,
            inp,
            bytes,
            g_idx,
        } = self.locate(set, prefix)?;
        let (b, ng, gs) = (self.bits as usize, self.n_groups(inp), self.group_size(inp));
        let words = |suffix: &str| le_words(bytes[suffix]);
        let f16s = |suffix: &str| -> Vec<f16> {
            bytes[suffix]
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let mut codes = vec![0u8; out * inp];
        let mut scales = vec![f16::ZERO; out * ng];
        let mut zeros = vec![1u8 << (b - 1); out * ng];
        let mut stream = Vec::new();
        let mut vals = Vec::new();
        match self.format {
            HfQuantFormat::Gptq => {
                let qweight = words("qweight");
                let rows = inp * b / 32;
                for o in 0..out {
                    stream.clear();
                    stream.extend((0..rows).map(|r| qweight[r * out + o]));
                    vals.clear();
                    unpack_stream(&stream, self.bits, inp, &mut vals);
                    codes[o * inp..(o + 1) * inp].copy_from_slice(&vals);
                }
                let qzeros = words("qzeros");
                let per_row = out * b / 32;
                let mask = (1u32 << b) - 1;
                let add = u32::from(self.zeros_minus_one);
                for g in 0..ng {
                    vals.clear();
                    unpack_stream(
                        &qzeros[g * per_row..(g + 1) * per_row],
                        self.bits,
                        out,
                        &mut vals,
                    );
                    for (o, &z) in vals.iter().enumerate() {
                        zeros[o * ng + g] = ((u32::from(z) + add) & mask) as u8;
                    }
                }
                let s = f16s("scales");
                for g in 0..ng {
                    for o in 0..out {
                        scales[o * ng + g] = s[g * out + o];
                    }
                }
            }
            HfQuantFormat::CompressedTensors => {
                let packed = words("weight_packed");
                let per_row = (inp * b).div_ceil(32);
                for o in 0..out {
                    vals.clear();
                    unpack_stream(
                        &packed[o * per_row..(o + 1) * per_row],
                        self.bits,
                        inp,
                        &mut vals,
                    );
                    codes[o * inp..(o + 1) * inp].copy_from_slice(&vals);
                }
                scales = f16s("weight_scale");
                if !self.sym {
                    let zp = words("weight_zero_point");
                    let rows = (out * b).div_ceil(32);
                    for g in 0..ng {
                        stream.clear();
                        stream.extend((0..rows).map(|r| zp[r * ng + g]));
                        vals.clear();
                        unpack_stream(&stream, self.bits, out, &mut vals);
                        for (o, &z) in vals.iter().enumerate() {
                            zeros[o * ng + g] = z;
                        }
                    }
                }
            }
        }
        let q = IntLinear {
            out_features: out,
            in_features: inp,
            bits: self.bits,
            group_size: gs,
            codes,
            scales,
            zeros,
            g_idx,
        };
        q.check().with_context(|| format!("linear '{prefix}'"))?;
        Ok(q)
    }
}

/// Appends `values` (each < 2^bits) to `out` as one little-endian bit stream, LSB
/// first: value k occupies stream bits k·bits … k·bits + bits − 1, and a value may
/// straddle two words (3 bits: 32 values fill 3 words). The last word is zero-padded.
fn pack_stream(values: impl IntoIterator<Item = u32>, bits: u32, out: &mut Vec<u32>) {
    let mut acc = 0u64;
    let mut have = 0u32;
    for v in values {
        acc |= u64::from(v) << have;
        have += bits;
        if have >= 32 {
            out.push(acc as u32);
            acc >>= 32;
            have -= 32;
        }
    }
    if have > 0 {
        out.push(acc as u32);
    }
}

/// Appends the first `n` values of the bit stream `words` (the inverse of
/// [`pack_stream`]); `words` must hold at least ⌈n·bits/32⌉ words.
fn unpack_stream(words: &[u32], bits: u32, n: usize, out: &mut Vec<u8>) {
    let mask = (1u64 << bits) - 1;
    let mut acc = 0u64;
    let mut have = 0u32;
    let mut next = words.iter();
    for _ in 0..n {
        if have < bits {
            acc |= u64::from(*next.next().expect("enough words for n values")) << have;
            have += 32;
        }
        out.push((acc & mask) as u8);
        acc >>= bits;
        have -= bits;
    }
}

/// The tensors of one stored linear, checked: its size, the bytes of each part by
/// suffix, and its g_idx.
struct Located<'a> {
    out: usize,
    inp: usize,
    bytes: HashMap<&'static str, &'a [u8]>,
    g_idx: Vec<u32>,
}

/// Little-endian 32-bit words.
fn le_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

fn words_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The HF prefix of a canonical linear name (`blk.0.attn_q.weight` →
/// `model.layers.0.self_attn.q_proj`).
fn hf_prefix(arch: &Arch, canonical: &str) -> Result<String> {
    let hf = arch.hf_name(canonical)?;
    Ok(hf.strip_suffix(".weight").unwrap_or(&hf).to_owned())
}

/// The HF prefixes of a canonical linear: its own, or one per expert of a
/// stacked experts' tensor (`model.layers.0.mlp.experts.3.gate_proj`).
fn hf_prefixes(arch: &Arch, experts: usize, canonical: &str) -> Result<Vec<String>> {
    match arch.hf_expert_names(canonical, experts) {
        Some(names) => Ok(names
            .into_iter()
            .map(|hf| hf.strip_suffix(".weight").unwrap_or(&hf).to_owned())
            .collect()),
        None => Ok(vec![hf_prefix(arch, canonical)?]),
    }
}

/// Streams an HF-style folder: config.json (model config + quantization_config), model.safetensors, tokenizer files.
pub struct HfQuantWriter {
    arch: &'static Arch,
    /// Routed experts per mixture-of-experts block (0: none).
    experts: usize,
    dir: PathBuf,
    scheme: Scheme,
    permuted_groups: bool,
    order: Vec<String>,
    shapes: Vec<Vec<usize>>,
    next: usize,
    out: SafetensorsWriter,
    config: Value,
    tokenizer: Tokenizer,
}

impl HfQuantWriter {
    /// Declares every tensor of `model` up front. Write order: token_embd, then per block i: attn_norm, ffn_norm, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; then output_norm, then output if the model has an untied head. (Canonical GGUF names, e.g. "blk.3.attn_q.weight", see model/src/names.rs.)
    ///
    /// Fails before writing anything when `cfg` cannot be expressed in `format`
    /// (see [`IntQuantConfig::check`]), when a linear's size cannot be packed (GPTQ
    /// needs in·bits and out·bits to be multiples of 32), or when `dir` is the folder
    /// `model` was read from.
    pub fn create(
        dir: &Path,
        model: &Model,
        format: HfQuantFormat,
        cfg: &IntQuantConfig,
    ) -> Result<Self> {
        cfg.check(format)
            .with_context(|| format!("cannot write {}", format.name()))?;
        let arch = model.config.arch;
        if let Some(fused) = write_order(&model.config)
            .iter()
            .find(|n| is_block_linear(arch, n) && arch.hf_layout(n) != crate::arch::HfLayout::Plain)
        {
            bail!(
                "cannot write {}: '{fused}' is stored by HF fused with other tensors ({}: across experts, or keys and values of every head), which has no per-layer packed form; \
                 write a GGUF instead (--type)",
                format.name(),
                arch.hf_name(fused)?
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let is_gguf = matches!(model.checkpoint, crate::checkpoint::Checkpoint::Gguf(_));
        if let (false, Some(src), Ok(dst)) = (
            is_gguf,
            model.path.parent().and_then(|p| p.canonicalize().ok()),
            dir.canonicalize(),
        ) {
            if src == dst {
                bail!(
                    "output folder {} is the input's folder: writing would replace the input; \
                     inputs are never modified",
                    dir.display()
                );
            }
        }
        let scheme = Scheme::from_config(format, cfg);
        let experts = model.config.moe.as_ref().map_or(0, |m| m.experts);
        // HF has no tensor for what its config computes (RoPE factors).
        let order: Vec<String> = write_order(&model.config)
            .into_iter()
            .filter(|n| {
                arch.hf_from_canonical(n).is_some() || arch.hf_expert_names(n, experts).is_some()
            })
            .collect();
        let mut shapes = Vec::with_capacity(order.len());
        let mut decl = Vec::new();
        for name in &order {
            let shape = model
                .expected_shape(name)
                .with_context(|| format!("no shape for tensor '{name}'"))?;
            if is_block_linear(arch, name) {
                let (out, inp) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                scheme.check_dims(out, inp).with_context(|| {
                    format!("cannot write '{name}' ({out} × {inp}) as {}", format.name())
                })?;
                for prefix in hf_prefixes(arch, experts, name)? {
                    for (suffix, dtype, s) in scheme.parts(out, inp) {
                        decl.push((format!("{prefix}.{suffix}"), dtype, s));
                    }
                }
            } else {
                decl.push((arch.hf_name(name)?, Dtype::F16, shape.clone()));
            }
            shapes.push(shape);
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        meta.insert(
            "quantizer".to_owned(),
            format!("compress {}", env!("CARGO_PKG_VERSION")),
        );
        meta.insert("quantization_method".to_owned(), cfg.method.clone());
        meta.insert("damp_percent".to_owned(), cfg.damp_percent.to_string());
        meta.insert(
            "true_sequential".to_owned(),
            cfg.true_sequential.to_string(),
        );
        let out = SafetensorsWriter::create(&dir.join("model.safetensors"), &decl, &meta)?;
        let mut config = model.config.to_hf_json("float16")?;
        config["quantization_config"] = quantization_config(format, cfg, arch);
        Ok(HfQuantWriter {
            dir: dir.to_path_buf(),
            scheme,
            permuted_groups: cfg.permuted_groups(),
            order,
            shapes,
            next: 0,
            out,
            config,
            tokenizer: model.tokenizer.clone(),
            arch,
            experts,
        })
    }

    /// The canonical names in write order.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// Checks `canonical` is the next tensor to write and returns its shape.
    fn expect_next(&self, canonical: &str) -> Result<&[usize]> {
        match self.order.get(self.next) {
            Some(n) if n == canonical => Ok(&self.shapes[self.next]),
            Some(n) => bail!("tensor '{canonical}' written where '{n}' is next"),
            None => bail!("tensor '{canonical}' written after every tensor was written"),
        }
    }

    /// Writes the next tensor, one of the 7 block linears, quantized; `q`'s rows are
    /// in HF layout (as `Model::tensor` gives them). The layer must match the file:
    /// shape, bits, group size (per-channel: `in_features`), zero points 2^(bits−1)
    /// when symmetric and ≥ 1 in GPTQ, g_idx `i / group_size` unless act-order
    /// without static groups.
    pub fn write_linear(&mut self, canonical: &str, q: &IntLinear) -> Result<()> {
        self.write_experts(canonical, std::slice::from_ref(q))
    }

    /// [`HfQuantWriter::write_linear`] for a linear that is one matrix per
    /// expert (a stacked experts' tensor, `[experts, out, in]`): `qs` in expert
    /// order, each written under its expert's HF name. A plain linear is the
    /// one-matrix case.
    pub fn write_experts(&mut self, canonical: &str, qs: &[IntLinear]) -> Result<()> {
        let shape = self.expect_next(canonical)?.to_vec();
        if !is_block_linear(self.arch, canonical) {
            bail!("tensor '{canonical}' is not a block linear: write it with write_dense");
        }
        let (matrices, dims) = match shape.as_slice() {
            [e, out, inp] => (*e, [*out, *inp]),
            _ => (1, [shape[0], shape[1]]),
        };
        if qs.len() != matrices {
            bail!(
                "tensor '{canonical}' holds {matrices} matrices, {} were given",
                qs.len()
            );
        }
        let prefixes = hf_prefixes(self.arch, self.experts, canonical)?;
        for (q, prefix) in qs.iter().zip(&prefixes) {
            if [q.out_features, q.in_features] != dims {
                bail!(
                    "tensor '{canonical}' is {} × {}, the model's is {shape:?}",
                    q.out_features,
                    q.in_features
                );
            }
            self.scheme
                .check_linear(q, self.permuted_groups)
                .with_context(|| format!("tensor '{prefix}'"))?;
            let parts = self.scheme.parts(q.out_features, q.in_features);
            for ((suffix, _, _), bytes) in parts.iter().zip(self.scheme.encode(q)) {
                self.out.write(&format!("{prefix}.{suffix}"), &bytes)?;
            }
        }
        self.next += 1;
        Ok(())
    }

    /// Writes the next tensor, anything but a block linear, as f16 (round to nearest even).
    pub fn write_dense(&mut self, canonical: &str, values: &[f32]) -> Result<()> {
        let shape = self.expect_next(canonical)?;
        if is_block_linear(self.arch, canonical) {
            bail!("tensor '{canonical}' is a quantized linear: write it with write_linear");
        }
        let n: usize = shape.iter().product();
        if values.len() != n {
            bail!(
                "tensor '{canonical}' has {} values, its shape {shape:?} holds {n}",
                values.len()
            );
        }
        let bytes: Vec<u8> = self
            .arch
            .hf_values(canonical, values)
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let hf = self.arch.hf_name(canonical)?;
        self.out.write(&hf, &bytes)?;
        self.next += 1;
        Ok(())
    }

    /// [`HfQuantWriter::write_dense`] from tensor `t` as stored: a matrix (the
    /// embedding, the output head) a slice of rows at a time, so an 8B model's
    /// 2 GB-in-f32 embedding never sits in memory whole.
    pub fn copy_dense(&mut self, canonical: &str, t: &crate::Tensor) -> Result<()> {
        if t.shape.len() != 2 {
            return self.write_dense(canonical, &t.to_f32()?);
        }
        let shape = self.expect_next(canonical)?;
        if is_block_linear(self.arch, canonical) {
            bail!("tensor '{canonical}' is a quantized linear: write it with write_linear");
        }
        if shape != t.shape {
            bail!(
                "tensor '{canonical}' has shape {:?}, the folder declares {shape:?}",
                t.shape
            );
        }
        let hf = self.arch.hf_name(canonical)?;
        for (r0, r1) in t.row_slices() {
            let bytes: Vec<u8> = t
                .rows_f32(r0, r1)?
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect();
            self.out.write_part(&hf, &bytes)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Writes model.safetensors atomically, then config.json and the tokenizer (model.tokenizer.save(dir)).
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.order.get(self.next) {
            bail!(
                "{}: only {} of {} tensors were written; '{missing}' is next",
                self.dir.join("model.safetensors").display(),
                self.next,
                self.order.len()
            );
        }
        self.out.finish()?;
        let config = serde_json::to_string_pretty(&self.config)?;
        crate::io::write_atomic(&self.dir.join("config.json"), config.as_bytes())?;
        self.tokenizer.save(&self.dir)
    }
}

/// config.json's `quantization_config` for `cfg` in `format`.
fn quantization_config(format: HfQuantFormat, cfg: &IntQuantConfig, arch: &Arch) -> Value {
    // The router stays in float (GPTQ writers and vLLM leave it so too).
    let mut ignore = vec![json!("lm_head")];
    if let Some(router) = arch.router() {
        let module = router.hf.strip_suffix(".weight").unwrap_or(router.hf);
        ignore.push(json!(format!("re:.*{}$", module.replace('.', "\\."))));
    }
    let tool = format!("compress:{}", env!("CARGO_PKG_VERSION"));
    match format {
        HfQuantFormat::Gptq => json!({
            "quant_method": "gptq",
            "bits": cfg.bits,
            "group_size": if cfg.per_channel { -1 } else { cfg.group_size as i64 },
            "desc_act": cfg.desc_act,
            "sym": cfg.sym,
            "damp_percent": cfg.damp_percent,
            "true_sequential": cfg.true_sequential,
            "static_groups": cfg.static_groups,
            "checkpoint_format": "gptq",
            "lm_head": false,
            "pack_dtype": "int32",
            "meta": {"quantizer": [tool], "method": cfg.method},
        }),
        HfQuantFormat::CompressedTensors => {
            let actorder = match (cfg.desc_act, cfg.static_groups) {
                (false, _) => Value::Null,
                (true, true) => json!("weight"),
                (true, false) => json!("group"),
            };
            let (strategy, group_size) = if cfg.per_channel {
                ("channel", Value::Null)
            } else {
                ("group", json!(cfg.group_size))
            };
            json!({
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": cfg.bits,
                            "type": "int",
                            "symmetric": cfg.sym,
                            "strategy": strategy,
                            "group_size": group_size,
                            "actorder": actorder,
                            "dynamic": false,
                            "block_structure": null,
                        },
                        "input_activations": null,
                        "output_activations": null,
                    }
                },
                "ignore": ignore,
                "kv_cache_scheme": null,
                "global_compression_ratio": null,
                "sparsity_config": null,
            })
        }
    }
}

/// The integer-quantized linears of an HF safetensors checkpoint whose config.json
/// has a `quantization_config` (GPTQ v1/v2 or compressed-tensors pack-quantized):
/// which canonical tensors are stored packed, checked when the model opens, and
/// dequantized to f32 on request.
#[derive(Debug)]
pub struct HfQuantized {
    scheme: Scheme,
    /// Canonical name → (HF prefix of each matrix: one, or one per expert of
    /// a stacked experts' tensor; the canonical shape).
    layers: HashMap<String, (Vec<String>, Vec<usize>)>,
}

impl HfQuantized {
    /// Reads `quantization_config` from `config_json` (the path of config.json) and
    /// checks every packed linear of `set` (dtypes, shapes, g_idx range); None when
    /// the config has no `quantization_config`, or has one this reader does not
    /// know while every tensor is stored dense (float) anyway.
    pub fn open(
        config_json: &Path,
        set: &SafetensorsSet,
        config: &ModelConfig,
    ) -> Result<Option<Self>> {
        let v: Value = crate::io::read_json(config_json)?;
        let Some(qc) = v.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let names = names::all(config);
        let scheme = match parse_scheme(qc) {
            Ok(s) => s,
            Err(_) if all_dense(config.arch, set, &names) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("{}: unsupported quantization_config", config_json.display())
                })
            }
        };
        let path = set.path().display();
        let marker = match scheme.format {
            HfQuantFormat::Gptq => "qweight",
            HfQuantFormat::CompressedTensors => "weight_packed",
        };
        let experts = config.moe.as_ref().map_or(0, |m| m.experts);
        let mut layers = HashMap::new();
        for name in names {
            if !is_block_linear(config.arch, &name) {
                continue;
            }
            let prefixes = hf_prefixes(config.arch, experts, &name)?;
            let packed = prefixes
                .iter()
                .filter(|p| set.get(&format!("{p}.{marker}")).is_some())
                .count();
            if packed == 0 {
                continue;
            }
            if packed < prefixes.len() {
                bail!(
                    "{path}: '{name}' has {packed} of its {} experts stored quantized \
                     (expected all or none)",
                    prefixes.len()
                );
            }
            let mut dims = None;
            for prefix in &prefixes {
                let l = scheme
                    .locate(set, prefix)
                    .with_context(|| format!("{path}: bad quantized linear '{prefix}'"))?;
                match dims {
                    None => dims = Some([l.out, l.inp]),
                    Some(d) if d != [l.out, l.inp] => bail!(
                        "{path}: quantized linear '{prefix}' is {} × {}, its other experts {} × {}",
                        l.out,
                        l.inp,
                        d[0],
                        d[1]
                    ),
                    Some(_) => {}
                }
            }
            let [out, inp] = dims.expect("at least one matrix");
            let shape = if config.arch.hf_expert_names(&name, experts).is_some() {
                vec![prefixes.len(), out, inp]
            } else {
                vec![out, inp]
            };
            layers.insert(name, (prefixes, shape));
        }
        Ok(Some(HfQuantized { scheme, layers }))
    }

    /// Which layout the file uses.
    pub fn format(&self) -> HfQuantFormat {
        self.scheme.format
    }

    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.scheme.bits
    }

    /// The shape of a canonical tensor stored quantized (`[out, in]`, or
    /// `[experts, out, in]` for a stacked experts' tensor); None for dense tensors.
    pub fn shape(&self, canonical: &str) -> Option<Vec<usize>> {
        self.layers.get(canonical).map(|(_, s)| s.to_vec())
    }

    /// The HF name prefixes of a canonical tensor stored quantized (its parts
    /// are `{prefix}.qweight`, …; one prefix per expert of a stacked experts'
    /// tensor); None for dense tensors.
    pub fn prefixes(&self, canonical: &str) -> Option<&[String]> {
        self.layers.get(canonical).map(|(p, _)| p.as_slice())
    }

    /// The quantized matrices of `canonical` as stored (one, or one per
    /// expert); None for dense tensors.
    pub fn linears(&self, set: &SafetensorsSet, canonical: &str) -> Result<Option<Vec<IntLinear>>> {
        let Some((prefixes, _)) = self.layers.get(canonical) else {
            return Ok(None);
        };
        prefixes
            .iter()
            .map(|prefix| {
                self.scheme.decode(set, prefix).with_context(|| {
                    format!("{}: bad quantized linear '{prefix}'", set.path().display())
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The quantized linear `canonical` as stored, when it is one matrix;
    /// None for dense tensors.
    pub fn linear(&self, set: &SafetensorsSet, canonical: &str) -> Result<Option<IntLinear>> {
        Ok(self
            .linears(set, canonical)?
            .and_then(|qs| (qs.len() == 1).then(|| qs.into_iter().next())?))
    }

    /// The f32 little-endian bytes of the dequantized linear `canonical` (HF layout,
    /// out × in, expert after expert); None for dense tensors.
    pub fn dequantized_bytes(
        &self,
        set: &SafetensorsSet,
        canonical: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self.linears(set, canonical)?.map(|qs| {
            qs.iter()
                .flat_map(IntLinear::dequantize)
                .flat_map(f32::to_le_bytes)
                .collect()
        }))
    }
}

/// Whether every tensor in `names` (canonical) is stored as a float tensor under its
/// HF name.
fn all_dense(arch: &Arch, set: &SafetensorsSet, names: &[String]) -> bool {
    names.iter().all(|n| {
        arch.hf_from_canonical(n)
            .and_then(|hf| set.get(&hf))
            .is_some_and(|(e, _)| e.dtype.as_ggml().is_some())
    })
}

/// The scheme a `quantization_config` describes.
fn parse_scheme(qc: &Value) -> Result<Scheme> {
    let method = qc
        .get("quant_method")
        .and_then(Value::as_str)
        .context("quant_method is missing")?;
    let bool_or = |v: Option<&Value>, key: &str, default: bool| -> Result<bool> {
        match v {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_bool()
                .with_context(|| format!("{key} is {x}, expected true or false")),
        }
    };
    match method {
        "gptq" => {
            let bits = qc
                .get("bits")
                .and_then(Value::as_u64)
                .context("bits is missing")?;
            if !matches!(bits, 2 | 3 | 4 | 8) {
                bail!("GPTQ bits {bits} is not 2, 3, 4 or 8");
            }
            let gs = qc
                .get("group_size")
                .and_then(Value::as_i64)
                .context("group_size is missing")?;
            let group_size = match gs {
                -1 => None,
                g if g > 0 => Some(g as usize),
                g => bail!("group_size {g} is neither -1 nor positive"),
            };
            let zeros_minus_one = match qc.get("checkpoint_format").and_then(Value::as_str) {
                None | Some("gptq") => true,
                Some("gptq_v2") => false,
                Some(f) => bail!("GPTQ checkpoint_format '{f}' is not supported (gptq, gptq_v2)"),
            };
            if let Some(p) = qc.get("pack_dtype").and_then(Value::as_str) {
                if p != "int32" {
                    bail!("GPTQ pack_dtype '{p}' is not supported (int32)");
                }
            }
            Ok(Scheme {
                format: HfQuantFormat::Gptq,
                bits: bits as u32,
                sym: bool_or(qc.get("sym"), "sym", true)?,
                group_size,
                zeros_minus_one,
                ct_g_idx: false,
            })
        }
        "compressed-tensors" => {
            let format = qc.get("format").and_then(Value::as_str).unwrap_or("");
            let groups = qc
                .get("config_groups")
                .and_then(Value::as_object)
                .context("config_groups is missing")?;
            if groups.len() != 1 {
                bail!("{} config_groups; only one is supported", groups.len());
            }
            let group = groups.values().next().expect("one group");
            let group_format = group.get("format").and_then(Value::as_str);
            if group_format.unwrap_or(format) != "pack-quantized" {
                bail!(
                    "compressed-tensors format '{}' is not supported (pack-quantized)",
                    group_format.unwrap_or(format)
                );
            }
            if let Some(status) = qc.get("quantization_status").and_then(Value::as_str) {
                if status != "compressed" {
                    bail!("quantization_status '{status}': only compressed checkpoints are read");
                }
            }
            for act in ["input_activations", "output_activations"] {
                if group.get(act).is_some_and(|v| !v.is_null()) {
                    bail!("{act} are quantized; only weight-only schemes are supported");
                }
            }
            let w = group.get("weights").context("weights are missing")?;
            if let Some(t) = w.get("type").and_then(Value::as_str) {
                if t != "int" {
                    bail!("weights type '{t}' is not int");
                }
            }
            let bits = w
                .get("num_bits")
                .and_then(Value::as_u64)
                .context("num_bits is missing")?;
            if !matches!(bits, 2 | 4 | 8) {
                bail!(
                    "pack-quantized num_bits {bits} is not supported (2, 4, 8; 3-bit packing differs \
                     between compressed-tensors versions)"
                );
            }
            let group_size = match w.get("strategy").and_then(Value::as_str) {
                Some("channel") => None,
                Some("group") => {
                    let g = w
                        .get("group_size")
                        .and_then(Value::as_u64)
                        .filter(|&g| g > 0)
                        .context("strategy group needs a positive group_size")?;
                    Some(g as usize)
                }
                s => bail!("weights strategy {s:?} is not supported (group, channel)"),
            };
            let ct_g_idx = match w.get("actorder") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(Value::String(s)) => match s.as_str() {
                    "group" | "dynamic" => true,
                    "weight" | "static" => false,
                    _ => bail!("actorder '{s}' is not known"),
                },
                Some(v) => bail!("actorder {v} is not known"),
            };
            Ok(Scheme {
                format: HfQuantFormat::CompressedTensors,
                bits: bits as u32,
                sym: bool_or(w.get("symmetric"), "symmetric", true)?,
                group_size,
                zeros_minus_one: false,
                ct_g_idx,
            })
        }
        m => bail!("quant_method '{m}' is not supported (gptq, compressed-tensors)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random layer; `act_order` gives a g_idx from a random column permutation.
    fn random_linear(
        rng: &mut rand::rngs::StdRng,
        out: usize,
        inp: usize,
        bits: u32,
        group_size: usize,
        sym: bool,
        act_order: bool,
    ) -> IntLinear {
        let ng = inp.div_ceil(group_size);
        let limit = 1u32 << bits;
        let mut g_idx: Vec<u32> = (0..inp).map(|i| (i / group_size) as u32).collect();
        if act_order {
            // Column perm[j] goes to group j / group_size.
            let mut perm: Vec<usize> = (0..inp).collect();
            for i in (1..inp).rev() {
                perm.swap(i, rng.gen_range(0..=i));
            }
            for (j, &col) in perm.iter().enumerate() {
                g_idx[col] = (j / group_size) as u32;
            }
        }
        IntLinear {
            out_features: out,
            in_features: inp,
            bits,
            group_size,
            codes: (0..out * inp)
                .map(|_| rng.gen_range(0..limit) as u8)
                .collect(),
            scales: (0..out * ng)
                .map(|_| f16::from_f32(rng.gen_range(-0.05f32..0.05)))
                .collect(),
            zeros: (0..out * ng)
                .map(|_| {
                    if sym {
                        (limit / 2) as u8
                    } else {
                        rng.gen_range(1..limit) as u8
                    }
                })
                .collect(),
            g_idx,
        }
    }

    /// Writes `q` under `prefix` with `scheme` into a safetensors file and opens it.
    fn store(dir: &Path, scheme: &Scheme, q: &IntLinear, prefix: &str) -> SafetensorsSet {
        let path = dir.join("x.safetensors");
        let parts = scheme.parts(q.out_features, q.in_features);
        let decl: Vec<_> = parts
            .iter()
            .map(|(s, d, sh)| (format!("{prefix}.{s}"), *d, sh.clone()))
            .collect();
        let mut w = SafetensorsWriter::create(&path, &decl, &BTreeMap::new()).unwrap();
        for ((name, _, _), bytes) in decl.iter().zip(scheme.encode(q)) {
            w.write(name, &bytes).unwrap();
        }
        w.finish().unwrap();
        SafetensorsSet::open(&path).unwrap()
    }

    fn scheme(format: HfQuantFormat, bits: u32, gs: Option<usize>, sym: bool, act: bool) -> Scheme {
        let cfg = IntQuantConfig {
            bits,
            group_size: gs.unwrap_or(0),
            per_channel: gs.is_none(),
            sym,
            desc_act: act,
            static_groups: false,
            damp_percent: 0.01,
            true_sequential: true,
            method: "rtn".into(),
        };
        cfg.check(format).unwrap();
        Scheme::from_config(format, &cfg)
    }

    #[test]
    fn bit_streams_round_trip_and_match_the_published_layouts() {
        // 4-bit: value k of a word at bits 4k (GPTQ / compressed-tensors for 2, 4, 8).
        let mut w = Vec::new();
        pack_stream((0..8).map(|v| v as u32), 4, &mut w);
        assert_eq!(w, vec![0x7654_3210]);
        // 3-bit, GPTQ: values 0..9 at bits 0, 3, …, 27; value 10 split as 2 low bits
        // at 30 and 1 bit at the next word's bit 0; value 21 as 1 bit at 31 and 2 bits
        // at the next word's 0..1; values 22..31 at bits 2, 5, …, 29 of word 2.
        let vals: Vec<u32> = (0..32).map(|k| (k * 5 + 3) % 8).collect();
        let mut w = Vec::new();
        pack_stream(vals.iter().copied(), 3, &mut w);
        assert_eq!(w.len(), 3);
        for (k, &v) in vals.iter().enumerate() {
            let got = match k {
                0..=9 => (w[0] >> (3 * k)) & 7,
                10 => (w[0] >> 30) | ((w[1] & 1) << 2),
                11..=20 => (w[1] >> (3 * (k - 11) + 1)) & 7,
                21 => (w[1] >> 31) | ((w[2] & 3) << 1),
                _ => (w[2] >> (3 * (k - 22) + 2)) & 7,
            };
            assert_eq!(got, v, "value {k}");
        }
        for bits in [2u32, 3, 4, 8] {
            for n in [1usize, 7, 32, 33, 100] {
                let v: Vec<u32> = (0..n as u32).map(|k| (k * 7 + 1) % (1 << bits)).collect();
                let mut w = Vec::new();
                pack_stream(v.iter().copied(), bits, &mut w);
                assert_eq!(w.len(), (n * bits as usize).div_ceil(32));
                let mut back = Vec::new();
                unpack_stream(&w, bits, n, &mut back);
                assert_eq!(back.iter().map(|&b| u32::from(b)).collect::<Vec<_>>(), v);
            }
        }
    }

    #[test]
    fn every_layout_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (out, inp) = (96, 320);
        let mut cases = 0;
        for format in [HfQuantFormat::Gptq, HfQuantFormat::CompressedTensors] {
            for bits in [2u32, 3, 4, 8] {
                if format == HfQuantFormat::CompressedTensors && bits == 3 {
                    continue;
                }
                for gs in [Some(32), Some(128), None] {
                    for sym in [true, false] {
                        for act in [false, true] {
                            if act && gs.is_none() {
                                continue;
                            }
                            let s = scheme(format, bits, gs, sym, act);
                            let q = random_linear(
                                &mut rng,
                                out,
                                inp,
                                bits,
                                gs.unwrap_or(inp),
                                sym,
                                act,
                            );
                            let cfg_permuted = act;
                            s.check_linear(&q, cfg_permuted).unwrap();
                            assert_eq!(q.has_trivial_g_idx(), !act);
                            let set = store(dir.path(), &s, &q, "m.l");
                            let back = s.decode(&set, "m.l").unwrap_or_else(|e| {
                                panic!("{format:?} {bits} {gs:?} {sym} {act}: {e:#}")
                            });
                            assert_eq!(back, q, "{format:?} {bits}-bit {gs:?} sym {sym} act {act}");
                            let (a, b) = (back.dequantize(), q.dequantize());
                            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * (4 + 3) * 5);
    }

    #[test]
    fn dequantize_follows_the_definition() {
        let q = IntLinear {
            out_features: 2,
            in_features: 3,
            bits: 2,
            group_size: 2,
            codes: vec![0, 1, 3, 2, 2, 0],
            scales: [0.5f32, 2.0, -1.0, 0.25].map(f16::from_f32).to_vec(),
            zeros: vec![1, 2, 0, 3],
            g_idx: vec![1, 0, 0],
        };
        q.check().unwrap();
        assert_eq!(q.n_groups(), 2);
        assert_eq!(q.dequantize(), vec![-4.0, 0.0, 1.0, -0.25, -2.0, 0.0]);
    }

    #[test]
    fn bad_layers_and_unsupported_settings_are_named() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let q = random_linear(&mut rng, 32, 64, 4, 32, false, false);
        let err = |q: &IntLinear, s: &Scheme, perm: bool| {
            format!("{:#}", s.check_linear(q, perm).unwrap_err())
        };
        let gptq = scheme(HfQuantFormat::Gptq, 4, Some(32), false, false);
        let mut bad = q.clone();
        bad.codes[70] = 16;
        assert!(err(&bad, &gptq, false).contains("code 16 at (1, 6)"));
        let mut bad = q.clone();
        bad.g_idx[5] = 2;
        assert!(err(&bad, &gptq, false).contains("g_idx[5] is 2"));
        let mut bad = q.clone();
        bad.g_idx.swap(0, 40);
        assert!(err(&bad, &gptq, false).contains("permuted g_idx"));
        let mut bad = q.clone();
        bad.zeros[3] = 0;
        assert!(err(&bad, &gptq, false).contains("zero point 0"));
        let mut bad = q.clone();
        bad.scales.pop();
        assert!(err(&bad, &gptq, false).contains("scales has 63 entries, expected 64"));
        let sym = scheme(HfQuantFormat::Gptq, 4, Some(32), true, false);
        assert!(err(&q, &sym, false).contains("is symmetric"));
        let three = scheme(HfQuantFormat::Gptq, 3, Some(32), false, false);
        assert!(err(&q, &three, false).contains("is 4-bit, the file is 3-bit"));
        // GPTQ needs whole words.
        assert!(gptq.check_dims(32, 68).is_err());
        assert!(gptq.check_dims(36, 64).is_err());
        let ct = scheme(HfQuantFormat::CompressedTensors, 4, Some(32), false, false);
        ct.check_dims(36, 68).unwrap();
        let mut cfg = IntQuantConfig {
            bits: 3,
            group_size: 128,
            per_channel: false,
            sym: true,
            desc_act: false,
            static_groups: false,
            damp_percent: 0.01,
            true_sequential: true,
            method: "gptq".into(),
        };
        cfg.check(HfQuantFormat::Gptq).unwrap();
        let e = format!(
            "{:#}",
            cfg.check(HfQuantFormat::CompressedTensors).unwrap_err()
        );
        assert!(e.contains("3-bit"), "{e}");
        cfg.bits = 5;
        assert!(cfg.check(HfQuantFormat::Gptq).is_err());
    }

    #[test]
    fn malformed_packed_tensors_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let s = scheme(HfQuantFormat::Gptq, 4, Some(32), false, true);
        let q = random_linear(&mut rng, 32, 64, 4, 32, false, true);
        // g_idx out of range.
        let mut bad = s.encode(&q);
        bad[3][4..8].copy_from_slice(&7i32.to_le_bytes());
        let path = dir.path().join("x.safetensors");
        let write = |tensors: &[(String, Dtype, Vec<usize>)], data: &[Vec<u8>]| {
            let mut w = SafetensorsWriter::create(&path, tensors, &BTreeMap::new()).unwrap();
            for ((n, _, _), b) in tensors.iter().zip(data) {
                w.write(n, b).unwrap();
            }
            w.finish().unwrap();
            SafetensorsSet::open(&path).unwrap()
        };
        let decl: Vec<_> = s
            .parts(32, 64)
            .into_iter()
            .map(|(n, d, sh)| (format!("p.{n}"), d, sh))
            .collect();
        let e = format!("{:#}", s.decode(&write(&decl, &bad), "p").unwrap_err());
        assert!(
            e.contains("'p.g_idx' entry 1 is 7, outside the 2 groups"),
            "{e}"
        );
        // scales with the wrong shape.
        let mut decl2 = decl.clone();
        decl2[2].2 = vec![1, 64];
        let e = format!(
            "{:#}",
            s.decode(&write(&decl2, &s.encode(&q)), "p").unwrap_err()
        );
        assert!(
            e.contains("'p.scales' is F16 [1, 64], expected F16 [2, 32]"),
            "{e}"
        );
        // qzeros missing.
        let (d3, b3): (Vec<_>, Vec<_>) = decl
            .iter()
            .cloned()
            .zip(s.encode(&q))
            .filter(|((n, _, _), _)| n != "p.qzeros")
            .unzip();
        let e = format!("{:#}", s.decode(&write(&d3, &b3), "p").unwrap_err());
        assert!(e.contains("'p.qzeros' is missing"), "{e}");
    }

    #[test]
    fn quantization_configs_parse_back_to_the_writer_scheme() {
        for format in [HfQuantFormat::Gptq, HfQuantFormat::CompressedTensors] {
            for (gs, act, static_groups) in [
                (Some(128), false, false),
                (Some(64), true, false),
                (Some(64), true, true),
                (None, false, false),
            ] {
                for sym in [true, false] {
                    let cfg = IntQuantConfig {
                        bits: 4,
                        group_size: gs.unwrap_or(0),
                        per_channel: gs.is_none(),
                        sym,
                        desc_act: act,
                        static_groups,
                        damp_percent: 0.01,
                        true_sequential: true,
                        method: "gptq".into(),
                    };
                    let written = Scheme::from_config(format, &cfg);
                    let parsed =
                        parse_scheme(&quantization_config(format, &cfg, &crate::arch::LLAMA))
                            .unwrap();
                    assert_eq!(parsed, written, "{format:?} {cfg:?}");
                }
            }
        }
        let e = format!(
            "{:#}",
            parse_scheme(&json!({"quant_method": "awq"})).unwrap_err()
        );
        assert!(e.contains("'awq' is not supported"), "{e}");
    }
}
