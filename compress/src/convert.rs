//! `compress convert`: any readable checkpoint to HF-layout safetensors, streamed
//! one tensor at a time, with `config.json` and `tokenizer.json` beside it.

use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use kernels::GgmlType;
use model::safetensors_file::{Dtype, SafetensorsWriter};
use model::Model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The HF `torch_dtype` name of a float type.
pub(crate) fn torch_dtype(t: GgmlType) -> &'static str {
    match t {
        GgmlType::F16 => "float16",
        GgmlType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// f32 values to the little-endian bytes of `t` (F32, F16 or BF16; round to nearest even).
pub(crate) fn encode_floats(values: &[f32], t: GgmlType) -> Vec<u8> {
    match t {
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// Where `-o` puts the safetensors file: the path itself when it ends in
/// `.safetensors`, else `model.safetensors` inside that folder.
pub(crate) fn output_file(output: &Path) -> Result<PathBuf> {
    if output.extension().is_some_and(|e| e == "safetensors") {
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(output.to_path_buf())
    } else {
        std::fs::create_dir_all(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        Ok(output.join("model.safetensors"))
    }
}

/// Converts `input` to safetensors at `output` with weights of type `dtype`.
pub fn convert(input: &Path, output: &Path, dtype: GgmlType) -> Result<()> {
    let model = Model::open(input)?;
    let out_file = output_file(output)?;
    let out_dir = out_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let in_dir = model
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&model.path, &out_file) {
        bail!(
            "output {} is the input; inputs are never modified",
            out_file.display()
        );
    }
    if !matches!(model.checkpoint, model::checkpoint::Checkpoint::Gguf(_))
        && same(&in_dir, &out_dir)
    {
        bail!(
            "output folder {} is the input's folder: writing would replace the input's config.json and tokenizer.json",
            out_dir.display()
        );
    }
    let st_dtype = Dtype::from_ggml(dtype).expect("convert writes float types");
    // The config computes what HF stores no tensor for (RoPE factors); its
    // writer refuses what it cannot express.
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(torch_dtype(dtype))?)?;
    let arch = model.config.arch;
    let names: Vec<String> = model
        .tensor_names()
        .into_iter()
        .filter(|n| arch.hf_from_canonical(n).is_some())
        .collect();
    let mut decl = Vec::with_capacity(names.len());
    for n in &names {
        let hf = arch.hf_from_canonical(n).expect("filtered");
        decl.push((hf, st_dtype, model.tensor_meta(n)?.1));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    let mut writer = SafetensorsWriter::create(&out_file, &decl, &meta)?;
    let mut bar = Progress::new(names.len() as u64, "convert");
    for (i, (n, (hf, _, _))) in names.iter().zip(&decl).enumerate() {
        let values = model.tensor(n)?.to_f32()?;
        writer.write(hf, &encode_floats(&values, dtype))?;
        bar.set(i as u64 + 1, n);
    }
    writer.finish()?;
    bar.finish();
    model::io::write_atomic(&out_dir.join("config.json"), config.as_bytes())?;
    model.tokenizer.save(&out_dir)?;
    eprintln!(
        "wrote {} ({} tensors, {}) with config.json and tokenizer.json",
        out_file.display(),
        names.len(),
        dtype
    );
    Ok(())
}
