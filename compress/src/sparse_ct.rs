//! compressed-tensors' sparse layouts for a pruned model, as llm-compressor
//! writes them and vLLM / HF transformers read them: every block linear becomes
//! `PREFIX.shape`, `PREFIX.compressed` (its non-zero values, row-major),
//! `PREFIX.bitmask` (one bit per weight, little-endian bit order within each
//! byte, rows padded to whole bytes) and, for `sparse-bitmask`,
//! `PREFIX.row_offsets` (where each row starts in `compressed`). 2:4 models use
//! `sparse-24-bitmask`: exactly two stored values per group of four (the two
//! largest magnitudes, so a group with extra zeros stores a zero), `compressed`
//! shaped `rows × cols/2`, and no row offsets. Other tensors stay dense.

use crate::convert::{encode_floats, torch_dtype};
use anyhow::Result;
use kernels::GgmlType;
use model::hf_quant::{is_block_linear, write_order};
use model::safetensors_file::{Dtype, SafetensorsWriter};
use model::Model;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Which layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `sparse-bitmask`: any pattern.
    Bitmask,
    /// `sparse-24-bitmask`: 2:4 only.
    TwoFour,
}

/// Kept positions of one row: non-zeros, or for 2:4 the two largest of each group.
fn kept(row: &[f32], layout: Layout) -> Vec<bool> {
    match layout {
        Layout::Bitmask => row.iter().map(|&v| v != 0.0).collect(),
        Layout::TwoFour => row
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
fn compress(values: &[f32], cols: usize, layout: Layout) -> (Vec<f32>, Vec<u8>, Vec<i64>) {
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
    layout: Layout,
    dtype: GgmlType,
    sparsity: f64,
) -> Result<()> {
    let c = &pruned.config;
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
            Layout::TwoFour => {
                decl.push((format!("{prefix}.shape"), Dtype::I64, vec![2, 1]));
                decl.push((format!("{prefix}.compressed"), st, vec![rows, cols / 2]));
                decl.push((
                    format!("{prefix}.bitmask"),
                    Dtype::U8,
                    vec![rows, bytes_per_row],
                ));
            }
            Layout::Bitmask => {
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
            writer.write(&hf, &encode_floats(&values, dtype))?;
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
        if layout == Layout::Bitmask {
            writer.write(&format!("{prefix}.row_offsets"), &i64_bytes(&offsets))?;
        }
    }
    writer.finish()?;
    let (format, structure) = match layout {
        Layout::Bitmask => ("sparse-bitmask", "unstructured"),
        Layout::TwoFour => ("sparse-24-bitmask", "2:4"),
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
    model::io::write_atomic(
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
        let (v, bits, offsets) = compress(&w, 9, Layout::Bitmask);
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(bits, vec![0b0000_0101, 0b1, 0b0000_0010, 0]);
        assert_eq!(offsets, vec![0, 3]);
    }

    #[test]
    fn two_four_keeps_two_per_group_even_when_one_is_zero() {
        let w = [0.0, 5.0, 0.0, 0.0, 1.0, -3.0, 0.0, 0.0];
        let (v, bits, _) = compress(&w, 8, Layout::TwoFour);
        assert_eq!(v, vec![0.0, 5.0, 1.0, -3.0]);
        assert_eq!(bits, vec![0b0011_0011]);
    }
}
