//! Importance-weighted quantization of a whole model into a GGUF file, streamed:
//! one tensor is dequantized to f32, checked, quantized row-parallel with its
//! imatrix column weights, permuted to GGUF row order and written before the next
//! is read, so peak memory is one tensor (in f32 and quantized) beyond the
//! memory-mapped input.

use crate::gguf_mix::{choose, Mix, Override};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::calib::Imatrix;
use model::gguf::{GgufWriter, TensorDecl};
use model::gguf_export::{self, GgufOutput};
use model::Model;
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// One tensor of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedTensor {
    /// Canonical (GGUF) name.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Chosen storage type.
    #[serde(serialize_with = "type_name")]
    pub ty: GgmlType,
    /// Why the type differs from the mix's base type, if it does.
    pub note: Option<String>,
}

fn type_name<S: serde::Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name())
}

/// Checks that every override matches a tensor of `model`.
fn check_overrides(model: &Model, names: &[String], overrides: &[Override]) -> Result<()> {
    for o in overrides {
        if !names.iter().any(|n| o.pattern.is_match(n)) {
            bail!(
                "--tensor-type '{}' matches no tensor of {}",
                o.text,
                model.path.display()
            );
        }
    }
    Ok(())
}

/// Chooses a type for every tensor of `model`. Every override must match a tensor.
pub fn plan(
    model: &Model,
    mix: Mix,
    has_imatrix: bool,
    overrides: &[Override],
) -> Result<Vec<PlannedTensor>> {
    let names = model.tensor_names();
    check_overrides(model, &names, overrides)?;
    names
        .into_iter()
        .map(|name| {
            let (_, shape) = model.tensor_meta(&name)?;
            let c = choose(mix, &name, &shape, &model.config, has_imatrix, overrides);
            Ok(PlannedTensor {
                name,
                shape,
                ty: c.ty,
                note: c.note,
            })
        })
        .collect()
}

/// Applies `overrides` (first match wins, with the row-length fallback) to the
/// matrices of an existing plan. Every override must match a tensor.
pub fn apply_overrides(
    plan: &mut [PlannedTensor],
    overrides: &[Override],
    model: &Model,
) -> Result<()> {
    let names: Vec<String> = plan.iter().map(|t| t.name.clone()).collect();
    check_overrides(model, &names, overrides)?;
    for t in plan.iter_mut().filter(|t| t.shape.len() > 1) {
        if let Some(o) = overrides.iter().find(|o| o.pattern.is_match(&t.name)) {
            let cols = *t.shape.last().unwrap_or(&1);
            t.ty = crate::gguf_mix::fallback(o.ty, cols);
            t.note = Some(if t.ty == o.ty {
                format!("override {}", o.text)
            } else {
                format!(
                    "override {}: {} needs rows in multiples of {}, falls back to {}",
                    o.text,
                    o.ty,
                    o.ty.block_elems(),
                    t.ty
                )
            });
        }
    }
    Ok(())
}

/// What was written, per tensor and in total.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// Per tensor: name, type, bytes, relative Frobenius error ‖W − Ŵ‖/‖W‖.
    pub tensors: Vec<TensorReport>,
    /// Size of the output, every file of a split together.
    pub file_bytes: u64,
    /// The files written: one, or each file of a split in order.
    pub files: Vec<PathBuf>,
    /// Weights quantized.
    pub n_params: u64,
    /// Bits per weight of the tensor data.
    pub bits_per_weight: f64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// One tensor of the report.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Canonical name.
    pub name: String,
    /// Storage type.
    #[serde(serialize_with = "type_name")]
    pub ty: GgmlType,
    /// Stored bytes.
    pub bytes: u64,
    /// ‖W − Ŵ‖_F / ‖W‖_F.
    pub rel_error: f64,
    /// Whether imatrix weights were used.
    pub imatrix: bool,
}

/// Quantizes `values` (`rows × cols`) to `ty` with per-column `importance`,
/// row-parallel.
pub fn quantize_matrix(
    values: &[f32],
    cols: usize,
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let rows = values.len() / cols;
    let row_bytes = ty
        .bytes_for(cols)
        .with_context(|| format!("{cols} columns are not whole {ty} blocks"))?;
    let mut out = vec![0u8; rows * row_bytes];
    // Enough rows per task to amortise scheduling, few enough to balance.
    let per_task = (rows / (8 * rayon::current_num_threads())).clamp(1, 64);
    out.par_chunks_mut(per_task * row_bytes)
        .zip(values.par_chunks(per_task * cols))
        .try_for_each(|(dst, src)| kernels::quants::quantize(ty, src, cols, importance, dst))?;
    Ok(out)
}

/// The imatrix importance of tensor `name` of shape `shape`: one row of
/// columns per matrix (per expert of a stacked experts' tensor `[experts,
/// rows, cols]`). An entry of another size is an error naming the tensor.
pub fn importance_of(
    imatrix: Option<&Imatrix>,
    name: &str,
    shape: &[usize],
) -> Result<Option<Vec<f32>>> {
    let cols = *shape.last().unwrap_or(&1);
    let matrices = if shape.len() == 3 { shape[0] } else { 1 };
    match imatrix.and_then(|m| m.importance(name)) {
        Some(imp) if imp.len() == cols * matrices => Ok(Some(imp)),
        Some(imp) => bail!(
            "the imatrix entry for '{name}' has {} values, the tensor needs {cols} columns × {matrices} matrices: it was made for another model",
            imp.len()
        ),
        None => Ok(None),
    }
}

/// [`quantize_matrix`] for a tensor of shape `shape` whose `importance` has a
/// row per matrix ([`importance_of`]): a stacked experts' tensor is quantized
/// expert by expert, each with its own importance.
pub fn quantize_stacked(
    values: &[f32],
    shape: &[usize],
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let cols = *shape.last().unwrap_or(&1);
    match importance {
        Some(imp) if imp.len() > cols => {
            let per_matrix = values.len() / (imp.len() / cols);
            values
                .chunks(per_matrix)
                .zip(imp.chunks(cols))
                .map(|(v, i)| quantize_matrix(v, cols, ty, Some(i)))
                .collect::<Result<Vec<_>>>()
                .map(|parts| parts.concat())
        }
        _ => quantize_matrix(values, cols, ty, importance),
    }
}

/// Whether planned tensor `t` is written with llama.cpp's per-tensor
/// `NAME.scale` beside it: NVFP4 weights whose scale llama.cpp's graph applies
/// ([`gguf_export::llama_cpp_applies_scale`]).
pub fn has_tensor_scale(model: &Model, t: &PlannedTensor) -> bool {
    t.ty == GgmlType::NVFP4 && gguf_export::llama_cpp_applies_scale(&model.config, &t.name)
}

/// The GGUF tensors of planned tensor `t`: the weight, then its `NAME.scale`
/// (F32, one per matrix) when `scaled`.
pub fn tensor_decls(t: &PlannedTensor, scaled: bool) -> Vec<TensorDecl> {
    let mut decls = vec![gguf_export::tensor_decl(&t.name, &t.shape, t.ty)];
    if let (true, Some(scale)) = (scaled, model::names::scale_of(&t.name)) {
        decls.push(gguf_export::tensor_decl(
            &scale,
            &[matrices(&t.shape)],
            GgmlType::F32,
        ));
    }
    decls
}

/// Matrices in a tensor of `shape`: the experts of a stacked `[experts, rows,
/// cols]` tensor, else 1.
fn matrices(shape: &[usize]) -> usize {
    if shape.len() == 3 {
        shape[0]
    } else {
        1
    }
}

/// One tensor quantized: its GGUF-ordered bytes, its per-matrix `NAME.scale`
/// when it has one, and its report.
pub struct QuantizedTensor {
    /// The bytes to write, in GGUF row order.
    pub bytes: Vec<u8>,
    /// The values of `NAME.scale` (one per matrix), when written.
    pub scale: Option<Vec<f32>>,
    /// The tensor's report.
    pub report: TensorReport,
}

impl QuantizedTensor {
    /// Writes the tensor and its scale (declared by [`tensor_decls`]).
    pub fn write(&self, writer: &mut GgufWriter) -> Result<()> {
        writer.write_tensor(&self.report.name, &self.bytes)?;
        if let (Some(scale), Some(name)) = (&self.scale, model::names::scale_of(&self.report.name))
        {
            let bytes: Vec<u8> = scale.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.write_tensor(&name, &bytes)?;
        }
        Ok(())
    }
}

/// Quantizes one planned tensor of `model` (with its imatrix weights, if any):
/// the GGUF-ordered bytes to write and the tensor's report.
///
/// With `scaled`, an NVFP4 tensor also gets llama.cpp's per-tensor scale: each
/// matrix is divided by the factor [`choose_tensor_scales`] finds before
/// encoding (1 where no factor lowers the error) and the factor is written
/// beside it.
pub fn quantize_tensor(
    model: &Model,
    t: &PlannedTensor,
    imatrix: Option<&Imatrix>,
    scaled: bool,
) -> Result<QuantizedTensor> {
    let tensor = model.tensor(&t.name)?;
    let cols = *t.shape.last().unwrap_or(&1);
    let importance = importance_of(imatrix, &t.name, &t.shape)?;
    let rows = tensor.n_elements() / cols.max(1);
    let rows_per_matrix = (rows / matrices(&t.shape)).max(1);
    // A matrix goes a slice of rows at a time (rows are encoded independently,
    // so the bytes are the same): an 8B model's embedding is 2 GB in f32, and
    // holding it with its dequantized copy would triple that.
    let slices = tensor.row_slices();
    let read = |r0: usize, r1: usize| -> Result<Vec<f32>> {
        let values = tensor.rows_f32(r0, r1)?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "tensor '{}' of {} holds {} at element {}: refusing to quantize",
                t.name,
                model.path.display(),
                values[bad],
                r0 * cols + bad
            );
        }
        Ok(values)
    };
    let scale = if scaled {
        choose_tensor_scales(
            &read,
            rows,
            rows_per_matrix,
            cols,
            t.ty,
            importance.as_deref(),
        )?
    } else {
        vec![1f32; matrices(&t.shape)]
    };
    let mut bytes = Vec::with_capacity(t.ty.bytes_for(tensor.n_elements()).unwrap_or(0));
    let (mut num, mut den) = (0f64, 0f64);
    for &(r0, r1) in &slices {
        let mut values = read(r0, r1)?;
        let shape = if slices.len() == 1 {
            t.shape.clone()
        } else {
            vec![r1 - r0, cols]
        };
        let row_scale = |i: usize| scale[(r0 + i) / rows_per_matrix];
        scale_rows(&mut values, cols, |i| 1.0 / row_scale(i));
        let part = quantize_stacked(&values, &shape, t.ty, importance.as_deref())
            .with_context(|| format!("quantizing '{}' to {}", t.name, t.ty))?;
        let mut restored = vec![0f32; values.len()];
        kernels::quants::dequantize(t.ty, &part, &mut restored)?;
        scale_rows(&mut restored, cols, row_scale);
        // The error against the values as read (dividing and multiplying back
        // by a power of two or near it is exact or within an ulp).
        let original = if scale.iter().all(|&s| s == 1.0) {
            values
        } else {
            read(r0, r1)?
        };
        let (n, d) = frobenius_parts(&original, &restored);
        num += n;
        den += d;
        bytes.extend_from_slice(&part);
    }
    let report = TensorReport {
        name: t.name.clone(),
        ty: t.ty,
        bytes: bytes.len() as u64,
        rel_error: (num / den.max(f64::MIN_POSITIVE)).sqrt(),
        imatrix: importance.is_some(),
    };
    Ok(QuantizedTensor {
        bytes: gguf_export::to_gguf_rows(model, &t.name, rows, bytes),
        scale: scaled.then_some(scale),
        report,
    })
}

/// Multiplies row `i` of `values` (`cols` wide) by `factor(i)`.
fn scale_rows(values: &mut [f32], cols: usize, factor: impl Fn(usize) -> f32) {
    for (i, row) in values.chunks_mut(cols).enumerate() {
        let f = factor(i);
        if f != 1.0 {
            row.iter_mut().for_each(|v| *v *= f);
        }
    }
}

/// Rows the per-tensor scale search reads at a time.
const SCALE_SEARCH_ROWS: usize = 4096;

/// Per-matrix `NAME.scale` for an NVFP4 tensor whose rows `read(r0, r1)` gives.
///
/// Scaling by a power of two only moves the sub-block scales along UE4M3's
/// exponent range, so what a factor decides is how many sub-blocks saturate at
/// the top (224) and how many fall into the coarse subnormals at the bottom.
/// The candidates are 1 (no scale) and `s₀ · 2⁻ᵏ` for k = 0…3, where `s₀` puts
/// the matrix's largest magnitude on the largest stored value; each is encoded
/// over the whole matrix and the one with the smallest (importance-weighted)
/// squared error kept.
pub(crate) fn choose_tensor_scales(
    read: &dyn Fn(usize, usize) -> Result<Vec<f32>>,
    rows: usize,
    rows_per_matrix: usize,
    cols: usize,
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let matrices = rows / rows_per_matrix;
    let mut chosen = Vec::with_capacity(matrices);
    for m in 0..matrices {
        let slices: Vec<(usize, usize)> = (m * rows_per_matrix..(m + 1) * rows_per_matrix)
            .step_by(SCALE_SEARCH_ROWS)
            .map(|r0| (r0, (r0 + SCALE_SEARCH_ROWS).min((m + 1) * rows_per_matrix)))
            .collect();
        let mut amax = 0f32;
        for &(r0, r1) in &slices {
            amax = read(r0, r1)?.iter().fold(amax, |a, v| a.max(v.abs()));
        }
        let s0 = kernels::quants::nvfp4_tensor_scale(amax);
        let qw = importance.map(|imp| &imp[(m * cols) % imp.len()..][..cols]);
        let candidates: Vec<f32> = std::iter::once(1f32)
            .chain((0..=3).map(|k| s0 / (1u32 << k) as f32))
            .collect();
        let mut err = vec![0f64; candidates.len()];
        for &(r0, r1) in &slices {
            let values = read(r0, r1)?;
            for (e, &s) in err.iter_mut().zip(&candidates) {
                let divided: Vec<f32> = values.iter().map(|v| v / s).collect();
                let bytes = quantize_matrix(&divided, cols, ty, qw)?;
                let mut back = vec![0f32; values.len()];
                kernels::quants::dequantize(ty, &bytes, &mut back)?;
                for (row, back) in values.chunks(cols).zip(back.chunks(cols)) {
                    for (j, (&x, &y)) in row.iter().zip(back).enumerate() {
                        let w = qw.map_or(1.0, |q| q[j] as f64);
                        *e += w * ((x - y * s) as f64).powi(2);
                    }
                }
            }
        }
        let best = (0..candidates.len())
            .min_by(|&a, &b| err[a].total_cmp(&err[b]))
            .unwrap_or(0);
        chosen.push(candidates[best]);
    }
    Ok(chosen)
}

/// `‖a − b‖_F / ‖a‖_F`.
pub fn rel_frobenius_error(a: &[f32], b: &[f32]) -> f64 {
    let (num, den) = frobenius_parts(a, b);
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// `(‖a − b‖²_F, ‖a‖²_F)`.
fn frobenius_parts(a: &[f32], b: &[f32]) -> (f64, f64) {
    // Fixed chunks summed in order: the same bits on every run (a work-stealing
    // reduction adds in whatever order the threads finish).
    let parts: Vec<(f64, f64)> = a
        .par_chunks(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .map(|(a, b)| {
            a.iter().zip(b).fold((0.0, 0.0), |(n, d), (&a, &b)| {
                (n + ((a - b) as f64).powi(2), d + (a as f64).powi(2))
            })
        })
        .collect();
    parts
        .iter()
        .fold((0.0, 0.0), |(n, d), p| (n + p.0, d + p.1))
}

/// Bytes of `files` together (a file that cannot be read counts 0).
pub fn files_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum()
}

/// The GGUF tensors [`quantize_to_gguf`] writes for `plan`, in order: each
/// weight, and after it its `NAME.scale` where [`has_tensor_scale`].
pub fn plan_decls(model: &Model, plan: &[PlannedTensor]) -> Vec<TensorDecl> {
    plan.iter()
        .flat_map(|t| tensor_decls(t, has_tensor_scale(model, t)))
        .collect()
}

/// Writes `model` quantized per `plan` to `out` (a GGUF file, or files as its
/// split divides it), reporting progress as (tensors done, total, name).
pub fn quantize_to_gguf(
    model: &Model,
    plan: &[PlannedTensor],
    imatrix: Option<&Imatrix>,
    file_type: u32,
    out: &GgufOutput,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let decls = plan_decls(model, plan);
    let mut writer = out.create(model, file_type, &decls)?;
    let mut reports = Vec::with_capacity(plan.len());
    let (mut n_params, mut data_bytes) = (0u64, 0u64);
    for (i, t) in plan.iter().enumerate() {
        let q = quantize_tensor(model, t, imatrix, has_tensor_scale(model, t))?;
        q.write(&mut writer)?;
        n_params += t.shape.iter().product::<usize>() as u64;
        data_bytes += q.report.bytes;
        reports.push(q.report);
        progress(i + 1, plan.len(), &t.name);
    }
    let files = writer.finish()?;
    Ok(QuantizeReport {
        tensors: reports,
        file_bytes: files_bytes(&files),
        files,
        n_params,
        bits_per_weight: data_bytes as f64 * 8.0 / n_params.max(1) as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Squared error of NVFP4 with tensor factor `s` on `values` (`cols` wide).
    fn nvfp4_error(values: &[f32], cols: usize, s: f32) -> f64 {
        let divided: Vec<f32> = values.iter().map(|v| v / s).collect();
        let bytes = quantize_matrix(&divided, cols, GgmlType::NVFP4, None).unwrap();
        let mut back = vec![0f32; values.len()];
        kernels::quants::dequantize(GgmlType::NVFP4, &bytes, &mut back).unwrap();
        values
            .iter()
            .zip(&back)
            .map(|(&x, &y)| ((x - y * s) as f64).powi(2))
            .sum()
    }

    /// Small weights (|x| < 0.004: sub-block scales below UE4M3's smallest
    /// subnormal) need a factor, and get one no larger than the range-filling
    /// one; with large weights whatever is chosen is no worse than 1.
    #[test]
    fn nvfp4_tensor_scale_is_chosen_by_the_error() {
        let (rows, cols) = (64, 256);
        let mut seed = 7u64;
        let small: Vec<f32> = (0..rows * cols)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.008
            })
            .collect();
        let choose = |v: &[f32]| {
            let read = |r0: usize, r1: usize| Ok(v[r0 * cols..r1 * cols].to_vec());
            choose_tensor_scales(&read, rows, rows, cols, GgmlType::NVFP4, None).unwrap()[0]
        };
        let s = choose(&small);
        let amax = small.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(
            s < 1.0 && s <= kernels::quants::nvfp4_tensor_scale(amax),
            "{s}"
        );
        assert!(nvfp4_error(&small, cols, s) < nvfp4_error(&small, cols, 1.0));
        let large: Vec<f32> = small.iter().map(|v| v * 20_000.0).collect();
        let s = choose(&large);
        assert!(nvfp4_error(&large, cols, s) <= nvfp4_error(&large, cols, 1.0));
    }
}
