//! Reading compressed-tensors' sparse layouts back to dense weights, so a
//! pruned folder written as `sparse-bitmask` or `sparse-24-bitmask` opens like
//! any other checkpoint: per block linear `PREFIX.compressed` holds the kept
//! values row by row, `PREFIX.bitmask` one bit per weight (least significant
//! bit first, rows padded to whole bytes) and `PREFIX.shape` the dense shape;
//! `sparse-bitmask` adds `PREFIX.row_offsets`, and `sparse-24-bitmask` keeps
//! exactly two values in every group of four (`compressed` is `rows × cols/2`).
//!
//! The writer ([`write`](fn@write)) makes the same layouts for a pruned model, as
//! llm-compressor writes them and vLLM / HF transformers read them: other tensors
//! stay dense; a 2:4 model stores the two largest magnitudes of every group of
//! four (a group with extra zeros stores a zero).

use crate::config::ModelConfig;
use crate::dense::{encode_floats, torch_dtype};
use crate::hf_quant::{is_block_linear, write_order};
use crate::names;
use crate::safetensors_file::{Dtype, SafetensorsSet, SafetensorsWriter};
use crate::Model;
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
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
            // Each side below 2²⁴ (as a config's dims): their product, which
            // sizes the dense tensor, cannot wrap.
            if rows <= 0 || cols <= 0 || rows > 1 << 24 || cols > 1 << 24 {
                bail!(
                    "{}: '{prefix}.shape' is [{rows}, {cols}], expected two sizes from 1 to 2^24",
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

/// Kept positions of one row: non-zeros, or for 2:4 the two largest of each group.
fn kept(row: &[f32], layout: SparseFormat) -> Vec<bool> {
    match layout {
        SparseFormat::Bitmask => row.iter().map(|&v| v != 0.0).collect(),
        SparseFormat::TwoFour => row
            .chunks(4)
            .flat_map(|g| {
                let mut idx = [0usize, 1, 2, 3];
                idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()).then(a.cmp(&b)));
                let mut k = [false; 4];
                k[idx[0]] = true;
                k[idx[1]] = true;
                k
            })
            .collect(),
    }
}

/// Packs one row's flags, least significant bit first, padded to whole bytes.
fn pack_bits(flags: &[bool]) -> Vec<u8> {
    flags
        .chunks(8)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, &f)| b | ((f as u8) << i))
        })
        .collect()
}

/// The compressed parts of one matrix: (values, bitmask bytes, row offsets).
fn compress(values: &[f32], cols: usize, layout: SparseFormat) -> (Vec<f32>, Vec<u8>, Vec<i64>) {
    let mut kept_values = Vec::new();
    let mut bits = Vec::new();
    let mut offsets = Vec::new();
    for row in values.chunks(cols) {
        offsets.push(kept_values.len() as i64);
        let k = kept(row, layout);
        kept_values.extend(row.iter().zip(&k).filter(|(_, &k)| k).map(|(v, _)| *v));
        bits.extend(pack_bits(&k));
    }
    (kept_values, bits, offsets)
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `pruned` (a dense model whose block linears hold exact zeros) as a
/// compressed-tensors folder in `dir`: model.safetensors, config.json with the
/// sparsity config, tokenizer. `sparsity` is the fraction of zeros over the
/// block linears (the config's `global_sparsity`).
pub fn write(
    pruned: &Model,
    dir: &Path,
    layout: SparseFormat,
    dtype: GgmlType,
    sparsity: f64,
) -> Result<()> {
    let c = &pruned.config;
    c.refuse_moe("writing a compressed-tensors folder")?;
    let mut config = c.to_hf_json(torch_dtype(dtype))?;
    // HF stores no tensor for what its config computes (RoPE factors).
    let order: Vec<String> = write_order(c)
        .into_iter()
        .filter(|n| c.arch.hf_from_canonical(n).is_some())
        .collect();
    let st = Dtype::from_ggml(dtype).expect("a float type");
    // The compressed sizes depend on each matrix's non-zeros: a first pass counts them.
    let mut decl = Vec::new();
    for n in &order {
        let hf = c.arch.hf_from_canonical(n).expect("filtered");
        let shape = pruned.tensor_meta(n)?.1;
        if !is_block_linear(c.arch, n) {
            decl.push((hf, st, shape));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let prefix = hf.trim_end_matches(".weight").to_owned();
        let bytes_per_row = cols.div_ceil(8);
        match layout {
            SparseFormat::TwoFour => {
                decl.push((format!("{prefix}.shape"), Dtype::I64, vec![2, 1]));
                decl.push((format!("{prefix}.compressed"), st, vec![rows, cols / 2]));
                decl.push((
                    format!("{prefix}.bitmask"),
                    Dtype::U8,
                    vec![rows, bytes_per_row],
                ));
            }
            SparseFormat::Bitmask => {
                let nnz = pruned
                    .tensor(n)?
                    .to_f32()?
                    .iter()
                    .filter(|&&v| v != 0.0)
                    .count();
                decl.push((format!("{prefix}.shape"), Dtype::I64, vec![2]));
                decl.push((format!("{prefix}.compressed"), st, vec![nnz]));
                decl.push((
                    format!("{prefix}.bitmask"),
                    Dtype::U8,
                    vec![rows, bytes_per_row],
                ));
                decl.push((format!("{prefix}.row_offsets"), Dtype::I64, vec![rows]));
            }
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    let mut writer = SafetensorsWriter::create(&dir.join("model.safetensors"), &decl, &meta)?;
    for n in &order {
        let hf = c.arch.hf_from_canonical(n).expect("filtered");
        let t = pruned.tensor(n)?;
        let values = t.to_f32()?;
        if !is_block_linear(c.arch, n) {
            writer.write(&hf, &encode_floats(&c.arch.hf_values(n, &values), dtype))?;
            continue;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let prefix = hf.trim_end_matches(".weight");
        let (kept_values, bits, offsets) = compress(&values, cols, layout);
        writer.write(
            &format!("{prefix}.shape"),
            &i64_bytes(&[rows as i64, cols as i64]),
        )?;
        writer.write(
            &format!("{prefix}.compressed"),
            &encode_floats(&kept_values, dtype),
        )?;
        writer.write(&format!("{prefix}.bitmask"), &bits)?;
        if layout == SparseFormat::Bitmask {
            writer.write(&format!("{prefix}.row_offsets"), &i64_bytes(&offsets))?;
        }
    }
    writer.finish()?;
    let (format, structure) = match layout {
        SparseFormat::Bitmask => ("sparse-bitmask", "unstructured"),
        SparseFormat::TwoFour => ("sparse-24-bitmask", "2:4"),
    };
    config["quantization_config"] = json!({
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": ["lm_head"],
        "sparsity_config": {
            "format": format,
            "global_sparsity": sparsity,
            "sparsity_structure": structure,
            "targets": ["Linear"],
            "ignore": ["lm_head"],
            "registry_requires_subclass": false,
        },
        "version": "0.9.0",
    });
    crate::io::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    pruned.tokenizer.save(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmask_rows_pack_little_endian_and_offsets_count_non_zeros() {
        let w = [
            1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, /* row 2 */ 0.0, 4.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
        ];
        let (v, bits, offsets) = compress(&w, 9, SparseFormat::Bitmask);
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(bits, vec![0b0000_0101, 0b1, 0b0000_0010, 0]);
        assert_eq!(offsets, vec![0, 3]);
    }

    #[test]
    fn two_four_keeps_two_per_group_even_when_one_is_zero() {
        let w = [0.0, 5.0, 0.0, 0.0, 1.0, -3.0, 0.0, 0.0];
        let (v, bits, _) = compress(&w, 8, SparseFormat::TwoFour);
        assert_eq!(v, vec![0.0, 5.0, 1.0, -3.0]);
        assert_eq!(bits, vec![0b0011_0011]);
    }
}
