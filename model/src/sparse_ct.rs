//! Reading compressed-tensors' sparse layouts back to dense weights, so a
//! pruned folder written as `sparse-bitmask` or `sparse-24-bitmask` opens like
//! any other checkpoint: per block linear `PREFIX.compressed` holds the kept
//! values row by row, `PREFIX.bitmask` one bit per weight (least significant
//! bit first, rows padded to whole bytes) and `PREFIX.shape` the dense shape;
//! `sparse-bitmask` adds `PREFIX.row_offsets`, and `sparse-24-bitmask` keeps
//! exactly two values in every group of four (`compressed` is `rows × cols/2`).

use crate::config::ModelConfig;
use crate::names;
use crate::safetensors_file::{Dtype, SafetensorsSet};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Which layout the folder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseFormat {
    /// `sparse-bitmask`: any pattern, with row offsets.
    Bitmask,
    /// `sparse-24-bitmask`: two of every four kept.
    TwoFour,
}

/// The sparse linears of a compressed-tensors folder.
pub struct SparseLinears {
    format: SparseFormat,
    /// Canonical name → (HF prefix, [rows, cols]).
    layers: HashMap<String, (String, [usize; 2])>,
}

impl SparseLinears {
    /// Reads `sparsity_config` from the `quantization_config` of `config_json`;
    /// None when the folder has no sparse layout (dense, or quantized).
    pub fn open(
        config_json: &Path,
        set: &SafetensorsSet,
        config: &ModelConfig,
    ) -> Result<Option<Self>> {
        let v: Value = crate::io::read_json(config_json)?;
        let Some(sc) = v
            .get("quantization_config")
            .and_then(|q| q.get("sparsity_config"))
            .filter(|s| !s.is_null())
        else {
            return Ok(None);
        };
        let format = match sc.get("format").and_then(Value::as_str) {
            Some("sparse-bitmask") => SparseFormat::Bitmask,
            Some("sparse-24-bitmask") => SparseFormat::TwoFour,
            // Dense storage with a sparsity note: the weights read as they are.
            Some("dense") | None => return Ok(None),
            Some(f) => bail!(
                "{}: sparsity format '{f}' is not supported (sparse-bitmask, sparse-24-bitmask, dense)",
                config_json.display()
            ),
        };
        let mut layers = HashMap::new();
        for name in names::all(config) {
            let Some(hf) = config.arch.hf_from_canonical(&name) else {
                continue;
            };
            let prefix = hf.strip_suffix(".weight").unwrap_or(&hf).to_owned();
            if set.get(&format!("{prefix}.bitmask")).is_none() {
                continue;
            }
            let (e, bytes) = set.get(&format!("{prefix}.shape")).with_context(|| {
                format!("{}: '{prefix}.shape' is missing", set.path().display())
            })?;
            if e.dtype != Dtype::I64 || bytes.len() != 16 {
                bail!(
                    "{}: '{prefix}.shape' is {} {:?}, expected two int64",
                    set.path().display(),
                    e.dtype.name(),
                    e.shape
                );
            }
            let dim = |i: usize| i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
            let (rows, cols) = (dim(0), dim(1));
            if rows <= 0 || cols <= 0 {
                bail!(
                    "{}: '{prefix}.shape' is [{rows}, {cols}]",
                    set.path().display()
                );
            }
            layers.insert(name, (prefix, [rows as usize, cols as usize]));
        }
        if layers.is_empty() {
            bail!(
                "{}: the config says {} but no tensor has a '.bitmask' part",
                config_json.display(),
                sc["format"]
            );
        }
        Ok(Some(SparseLinears { format, layers }))
    }

    /// The layout.
    pub fn format(&self) -> SparseFormat {
        self.format
    }

    /// `[rows, cols]` of a canonical tensor stored sparse; None for dense tensors.
    pub fn shape(&self, canonical: &str) -> Option<Vec<usize>> {
        self.layers.get(canonical).map(|(_, s)| s.to_vec())
    }

    /// The HF prefix of a sparse tensor's parts.
    pub fn prefix(&self, canonical: &str) -> Option<&str> {
        self.layers.get(canonical).map(|(p, _)| p.as_str())
    }

    /// The dense weights of `canonical` as f32 little-endian bytes (rows × cols);
    /// None for dense tensors. Every count is checked against the bitmask.
    pub fn dense_bytes(&self, set: &SafetensorsSet, canonical: &str) -> Result<Option<Vec<u8>>> {
        let Some((prefix, [rows, cols])) = self.layers.get(canonical) else {
            return Ok(None);
        };
        let (rows, cols) = (*rows, *cols);
        let file = set.path().display();
        let part = |suffix: &str| {
            set.get(&format!("{prefix}.{suffix}"))
                .with_context(|| format!("{file}: '{prefix}.{suffix}' is missing"))
        };
        let (ve, vbytes) = part("compressed")?;
        let vty = ve.dtype.as_ggml().with_context(|| {
            format!(
                "{file}: '{prefix}.compressed' is {}, expected F32, F16 or BF16",
                ve.dtype.name()
            )
        })?;
        let n_values = ve.shape.iter().product::<usize>();
        let mut values = vec![0f32; n_values];
        kernels::quants::dequantize(vty, vbytes, &mut values)
            .with_context(|| format!("{file}: '{prefix}.compressed'"))?;
        let (be, bits) = part("bitmask")?;
        let row_bytes = cols.div_ceil(8);
        if be.dtype != Dtype::U8 || bits.len() != rows * row_bytes {
            bail!(
                "{file}: '{prefix}.bitmask' is {} {:?}, expected uint8 [{rows}, {row_bytes}]",
                be.dtype.name(),
                be.shape
            );
        }
        let mut dense = vec![0f32; rows * cols];
        let mut next = 0usize;
        for (r, (row, mask)) in dense
            .chunks_mut(cols)
            .zip(bits.chunks(row_bytes))
            .enumerate()
        {
            let start = next;
            for (c, w) in row.iter_mut().enumerate() {
                if mask[c / 8] >> (c % 8) & 1 == 1 {
                    *w = *values.get(next).with_context(|| {
                        format!("{file}: '{prefix}.bitmask' marks more weights than '{prefix}.compressed' holds")
                    })?;
                    next += 1;
                }
            }
            if self.format == SparseFormat::TwoFour && next - start != cols / 2 {
                bail!(
                    "{file}: row {r} of '{prefix}' keeps {} weights, sparse-24-bitmask keeps {}",
                    next - start,
                    cols / 2
                );
            }
        }
        if next != n_values {
            bail!(
                "{file}: '{prefix}.bitmask' marks {next} weights but '{prefix}.compressed' holds {n_values}"
            );
        }
        Ok(Some(dense.iter().flat_map(|v| v.to_le_bytes()).collect()))
    }
}
