//! Dense float artifacts: `compress convert` (any readable checkpoint to HF-layout
//! safetensors, streamed one tensor at a time, with `config.json` and
//! `tokenizer.json` beside it) and [`DenseWriter`], the writer every stage that
//! changes weights in float (pruning, structured cuts, distillation) streams its
//! tensors through, as safetensors or GGUF.

use crate::arch::HfLayout;
use crate::checkpoint::{permute_qk_rows, Checkpoint};
use crate::gguf::GgufWriter;
use crate::gguf_export;
use crate::progress::Progress;
use crate::safetensors_file::{Dtype, SafetensorsWriter};
use crate::{names, Model, ModelConfig, Tensor};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use kernels::GgmlType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The HF `torch_dtype` name of a float type.
pub fn torch_dtype(t: GgmlType) -> &'static str {
    match t {
        GgmlType::F16 => "float16",
        GgmlType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// f32 values to the little-endian bytes of `t` (F32, F16 or BF16; round to nearest even).
pub fn encode_floats(values: &[f32], t: GgmlType) -> Vec<u8> {
    // Sized up front: collecting a flat_map grows by doubling, which for an
    // 8B model's 235 MB matrix briefly holds twice that.
    let mut out = Vec::with_capacity(values.len() * if t == GgmlType::F32 { 4 } else { 2 });
    match t {
        GgmlType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
    }
    out
}

/// Where `-o` puts the safetensors file: the path itself when it ends in
/// `.safetensors`, else `model.safetensors` inside that folder.
pub fn output_file(output: &Path) -> Result<PathBuf> {
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

/// Whether two paths name the same existing file or folder.
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The folder of the safetensors file `out_file`, refused when it is the folder
/// of a safetensors input (writing would replace its config.json and tokenizer).
fn refuse_input_folder(model: &Model, out_file: &Path) -> Result<PathBuf> {
    let folder = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let out_dir = folder(out_file);
    if !matches!(model.checkpoint, Checkpoint::Gguf(_)) && same_file(&folder(&model.path), &out_dir)
    {
        bail!(
            "output folder {} is the input's folder: writing would replace the input's config.json and tokenizer.json",
            out_dir.display()
        );
    }
    Ok(out_dir)
}

/// Converts `input` to safetensors at `output` with weights of type `dtype`.
pub fn convert(input: &Path, output: &Path, dtype: GgmlType) -> Result<()> {
    let model = Model::open(input)?;
    // The config computes what HF stores no tensor for (RoPE factors); its
    // writer refuses what it cannot express, before the output folder exists.
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(torch_dtype(dtype))?)?;
    let out_file = output_file(output)?;
    if same_file(&model.path, &out_file) {
        bail!(
            "output {} is the input; inputs are never modified",
            out_file.display()
        );
    }
    let out_dir = refuse_input_folder(&model, &out_file)?;
    let st_dtype = Dtype::from_ggml(dtype).expect("convert writes float types");
    let c = &model.config;
    let mut names: Vec<(String, Vec<usize>)> = Vec::new();
    for n in model.tensor_names() {
        let shape = model.tensor_meta(&n)?.1;
        // HF has no tensor for what its config computes (RoPE factors); a
        // fused tensor's later halves declare nothing but are written.
        let fused = c.arch.hf_layout(&n).parts() > 1;
        if fused || !hf_tensors(c, &n, &shape).is_empty() {
            names.push((n, shape));
        }
    }
    let decl: Vec<_> = names
        .iter()
        .flat_map(|(n, shape)| hf_tensors(c, n, shape))
        .map(|(hf, shape)| (hf, st_dtype, shape))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    let mut writer = SafetensorsWriter::create(&out_file, &decl, &meta)?;
    let mut bar = Progress::new(names.len() as u64, "convert");
    let mut fusing = Fusing::new();
    for (i, (n, shape)) in names.iter().enumerate() {
        let values = model.tensor(n)?.to_f32()?;
        write_hf(&mut writer, &mut fusing, c, n, shape, &values, dtype)
            .with_context(|| format!("converting '{n}' of {}", model.path.display()))?;
        bar.set(i as u64 + 1, n);
    }
    writer.finish()?;
    bar.finish();
    crate::io::write_atomic(&out_dir.join("config.json"), config.as_bytes())?;
    model.tokenizer.save(&out_dir)?;
    eprintln!(
        "wrote {} ({} tensors, {}) with config.json and tokenizer.json",
        out_file.display(),
        names.len(),
        dtype
    );
    Ok(())
}

/// The HF tensors (name, shape) that hold canonical tensor `name` of shape
/// `shape`: itself under its HF name, one per expert for a stacked experts'
/// tensor, or none for what HF's config computes (RoPE factors).
fn hf_tensors(c: &ModelConfig, name: &str, shape: &[usize]) -> Vec<(String, Vec<usize>)> {
    let experts = c.moe.as_ref().map_or(0, |m| m.experts);
    let layout = c.arch.hf_layout(name);
    if layout != HfLayout::Plain {
        // A fused HF tensor is declared once, with its first part.
        return match layout {
            HfLayout::FusedHalf(p) if p > 0 => Vec::new(),
            HfLayout::LatentValues => Vec::new(),
            _ => c
                .arch
                .hf_from_canonical(name)
                .map(|hf| (hf, layout.hf_shape(shape, c)))
                .into_iter()
                .collect(),
        };
    }
    match c.arch.hf_expert_names(name, experts) {
        Some(parts) => parts
            .into_iter()
            .map(|hf| (hf, shape[1..].to_vec()))
            .collect(),
        None => c
            .arch
            .hf_from_canonical(name)
            .map(|hf| (hf, shape.to_vec()))
            .into_iter()
            .collect(),
    }
}

/// HF tensors that fuse several canonical ones (Llama 4's `gate_up_proj`),
/// gathered until their last part arrives: HF name → (values, parts still due).
type Fusing = BTreeMap<String, (Vec<f32>, usize)>;

/// Writes canonical tensor `name` (`values`, HF row order) as its HF tensors
/// ([`hf_tensors`]), norm gains as HF stores them; a fused tensor's halves are
/// gathered in `fusing` and written with the last.
fn write_hf(
    writer: &mut SafetensorsWriter,
    fusing: &mut Fusing,
    c: &ModelConfig,
    name: &str,
    shape: &[usize],
    values: &[f32],
    dtype: GgmlType,
) -> Result<()> {
    let layout = c.arch.hf_layout(name);
    if layout != HfLayout::Plain {
        let hf = c.arch.hf_name(name)?;
        let hf_shape = layout.hf_shape(shape, c);
        let (buffer, due) = fusing
            .entry(hf.clone())
            .or_insert_with(|| (vec![0f32; hf_shape.iter().product()], layout.parts()));
        layout.fill_hf(values, shape, &hf_shape, buffer);
        *due -= 1;
        if *due == 0 {
            let (buffer, _) = fusing.remove(&hf).expect("just filled");
            writer.write(&hf, &encode_floats(&buffer, dtype))?;
        }
        return Ok(());
    }
    let values = c.arch.hf_values(name, values);
    let parts = hf_tensors(c, name, shape);
    let per = values.len() / parts.len().max(1);
    for ((hf, _), part) in parts.iter().zip(values.chunks(per.max(1))) {
        writer.write(hf, &encode_floats(part, dtype))?;
    }
    Ok(())
}

/// Dense output: the tensors in a declared order, as safetensors or GGUF, for a
/// model with `config` (the input's, or a structured cut's smaller one).
pub struct DenseWriter {
    config: ModelConfig,
    dtype: GgmlType,
    out: DenseOut,
}

enum DenseOut {
    Safetensors {
        writer: SafetensorsWriter,
        dir: PathBuf,
        fusing: Fusing,
    },
    Gguf(GgufWriter),
}

impl DenseWriter {
    /// Declares `tensors` (canonical name, shape) of a model with `config`.
    pub fn create(
        model: &Model,
        config: &ModelConfig,
        tensors: &[(String, Vec<usize>)],
        output: &Path,
        dtype: GgmlType,
    ) -> Result<Self> {
        if output.extension().is_some_and(|e| e == "gguf") {
            let file_type = match dtype {
                GgmlType::F16 => 1,
                GgmlType::BF16 => 32,
                _ => 0,
            };
            let mut metadata = gguf_export::metadata(model, file_type)?;
            gguf_export::set_shape_keys(&mut metadata, config);
            let decls: Vec<_> = tensors
                .iter()
                .map(|(n, shape)| {
                    let ty = if shape.len() == 1 {
                        GgmlType::F32
                    } else {
                        dtype
                    };
                    gguf_export::tensor_decl(n, shape, ty)
                })
                .collect();
            return Ok(DenseWriter {
                config: config.clone(),
                dtype,
                out: DenseOut::Gguf(GgufWriter::create(output, &metadata, &decls)?),
            });
        }
        // Checked before anything is written: the config must be expressible.
        config.to_hf_json(torch_dtype(dtype))?;
        let file = output_file(output)?;
        let dir = refuse_input_folder(model, &file)?;
        let st = Dtype::from_ggml(dtype).expect("a float type");
        // HF stores no tensor for what its config computes (RoPE factors).
        let decl = tensors
            .iter()
            .flat_map(|(n, shape)| hf_tensors(config, n, shape))
            .map(|(hf, shape)| (hf, st, shape))
            .collect::<Vec<_>>();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        Ok(DenseWriter {
            config: config.clone(),
            dtype,
            out: DenseOut::Safetensors {
                writer: SafetensorsWriter::create(&file, &decl, &meta)?,
                dir,
                fusing: Fusing::new(),
            },
        })
    }

    /// Writes the next declared tensor (HF row order).
    pub fn write(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        match &mut self.out {
            DenseOut::Safetensors { writer, fusing, .. } => write_hf(
                writer,
                fusing,
                &self.config,
                name,
                shape,
                values,
                self.dtype,
            ),
            DenseOut::Gguf(writer) => {
                let ty = if shape.len() == 1 {
                    GgmlType::F32
                } else {
                    self.dtype
                };
                let bytes = encode_floats(values, ty);
                let c = &self.config;
                let bytes = match c.arch.gguf_permuted_heads(name, c) {
                    Some(heads) => permute_qk_rows(&bytes, shape[0], heads),
                    None => bytes,
                };
                writer.write_tensor(name, &bytes)
            }
        }
    }

    /// Writes the next declared tensor as a copy of `t` (HF row order): a
    /// large matrix outside the blocks (the embedding, the output head: 2 GB
    /// each in f32 for an 8B model) a slice of rows at a time, anything else
    /// whole through [`DenseWriter::write`].
    pub fn copy(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let slices = t.row_slices();
        let hf = match &self.out {
            DenseOut::Safetensors { .. } => {
                let mut parts = hf_tensors(&self.config, name, &t.shape);
                (parts.len() == 1).then(|| parts.remove(0).0)
            }
            DenseOut::Gguf(_) => Some(name.to_owned()),
        };
        let (true, Some(hf)) = (slices.len() > 1 && names::block_index(name).is_none(), hf) else {
            return self.write(name, &t.shape, &t.to_f32()?);
        };
        for (r0, r1) in slices {
            let bytes = encode_floats(&t.rows_f32(r0, r1)?, self.dtype);
            match &mut self.out {
                DenseOut::Safetensors { writer, .. } => writer.write_part(&hf, &bytes)?,
                DenseOut::Gguf(writer) => writer.write_tensor_part(name, &bytes)?,
            }
        }
        Ok(())
    }

    /// Checks every tensor was written and moves the files into place (with
    /// config.json and the tokenizer beside a safetensors file).
    pub fn finish(self, model: &Model) -> Result<()> {
        match self.out {
            DenseOut::Safetensors { writer, dir, .. } => {
                writer.finish()?;
                let config = serde_json::to_string_pretty(
                    &self.config.to_hf_json(torch_dtype(self.dtype))?,
                )?;
                crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
                model.tokenizer.save(&dir)
            }
            DenseOut::Gguf(writer) => writer.finish().map(drop),
        }
    }
}
