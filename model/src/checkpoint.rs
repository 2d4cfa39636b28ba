//! One in-memory view of a checkpoint, whichever file format it came from:
//! canonical tensor names, HF row layout for Q/K, shapes checked against the
//! config, and tensors read lazily (a tensor's bytes are touched only when asked for).

use crate::arch::{HfLayout, Role};
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::hf_quant::HfQuantized;
use crate::names;
use crate::safetensors_file::{Dtype, SafetensorsSet};
use crate::sparse_ct::SparseLinears;
use crate::tokenizer::{GgufVocab, Tokenizer};
use anyhow::{bail, Context, Result};
use kernels::matmul::WeightRef;
use kernels::GgmlType;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The file format a model was read from.
pub enum Checkpoint {
    /// A GGUF file.
    Gguf(GgufFile),
    /// One or more safetensors files with `config.json` beside them.
    Safetensors(SafetensorsSet),
}

/// Values decoded to f32 at a time when a large matrix is streamed (64 MB).
pub const SLICE_ELEMENTS: usize = 1 << 24;

/// A tensor in its stored format, HF layout, outermost dimension first.
pub struct Tensor<'a> {
    /// Canonical name.
    pub name: String,
    /// Storage type.
    pub ty: GgmlType,
    /// Shape, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// Stored bytes: borrowed from the memory map unless a layout change copied them.
    pub data: Cow<'a, [u8]>,
    /// llama.cpp's per-tensor factor (`NAME.scale` in a GGUF, as NVFP4
    /// checkpoints carry): one per matrix (per expert of a stacked experts'
    /// tensor), multiplied into every decoded value. `None` when absent.
    pub scale: Option<Vec<f32>>,
}

impl Tensor<'_> {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor as a matrix for the matmul kernels (a vector is one row).
    pub fn as_weight(&self) -> Result<WeightRef<'_>> {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows = self.n_elements() / cols.max(1);
        let w = WeightRef::new(self.ty, rows, cols, &self.data)
            .with_context(|| format!("tensor '{}'", self.name))?;
        Ok(match self.scale.as_deref() {
            None => w,
            Some([s]) => w.with_scale(*s),
            Some(_) => bail!(
                "tensor '{}' has one scale per expert: take an expert first",
                self.name
            ),
        })
    }

    /// Multiplies `values`, rows `r0..` of this tensor in f32, by their
    /// matrix's scale, if any.
    fn apply_scale(&self, r0: usize, values: &mut [f32]) {
        let Some(scale) = &self.scale else { return };
        let cols = (*self.shape.last().unwrap_or(&1)).max(1);
        let rows = self.n_elements() / cols;
        let per_matrix = (rows / scale.len().max(1)).max(1);
        for (i, row) in values.chunks_mut(cols).enumerate() {
            let s = scale[((r0 + i) / per_matrix).min(scale.len() - 1)];
            row.iter_mut().for_each(|v| *v *= s);
        }
    }

    /// A view of this tensor borrowing its bytes (for swapping it into a block).
    pub fn borrowed(&self) -> Tensor<'_> {
        Tensor {
            name: self.name.clone(),
            ty: self.ty,
            shape: self.shape.clone(),
            data: Cow::Borrowed(&self.data),
            scale: self.scale.clone(),
        }
    }

    /// Expert `e` of a routed experts' tensor `[experts, rows, cols]`: a view of
    /// its `[rows, cols]` matrix.
    pub fn expert(&self, e: usize) -> Result<Tensor<'_>> {
        let &[experts, rows, cols] = self.shape.as_slice() else {
            bail!(
                "tensor '{}' has shape {:?}, expected [experts, rows, cols]",
                self.name,
                self.shape
            );
        };
        if e >= experts {
            bail!("expert {e} of tensor '{}', which has {experts}", self.name);
        }
        let per = self.ty.bytes_for(rows * cols).with_context(|| {
            format!(
                "tensor '{}': {rows} × {cols} is no whole number of {} blocks",
                self.name, self.ty
            )
        })?;
        let data = self.data.get(e * per..(e + 1) * per).with_context(|| {
            format!(
                "tensor '{}' holds too few bytes for {experts} experts",
                self.name
            )
        })?;
        Ok(Tensor {
            name: format!("{} (expert {e})", self.name),
            ty: self.ty,
            shape: vec![rows, cols],
            data: Cow::Borrowed(data),
            scale: self.scale.as_ref().map(|s| vec![s[e.min(s.len() - 1)]]),
        })
    }

    /// [`Tensor::from_f32`] taking the values: they are handed over a slice at
    /// a time from the end, the vector shrunk after each, into bytes whose
    /// pages appear as they are written, so a large matrix is not held twice
    /// (an 8B down projection is 235 MB in f32).
    pub fn from_f32_vec(name: &str, shape: Vec<usize>, mut values: Vec<f32>) -> Tensor<'static> {
        const SLICE: usize = 1 << 20;
        let mut data = vec![0u8; 4 * values.len()];
        while !values.is_empty() {
            let start = values.len().saturating_sub(SLICE);
            for (out, v) in data[4 * start..4 * values.len()]
                .chunks_exact_mut(4)
                .zip(&values[start..])
            {
                out.copy_from_slice(&v.to_le_bytes());
            }
            values.truncate(start);
            values.shrink_to_fit();
        }
        Self::owned_f32(name, shape, data)
    }

    /// An owned tensor holding `values` as F32.
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor<'static> {
        let data = crate::dense::encode_floats(values, GgmlType::F32);
        Self::owned_f32(name, shape, data)
    }

    /// An owned F32 tensor of these little-endian bytes.
    fn owned_f32(name: &str, shape: Vec<usize>, data: Vec<u8>) -> Tensor<'static> {
        Tensor {
            name: name.to_owned(),
            ty: GgmlType::F32,
            shape,
            data: Cow::Owned(data),
            scale: None,
        }
    }

    /// Row ranges `(r0, r1)` that cover a matrix in slices of at most
    /// [`SLICE_ELEMENTS`] values (at least one row each), for streaming a large
    /// tensor through f32 (an 8B model's embedding is 2 GB in f32); one range
    /// for any other shape.
    pub fn row_slices(&self) -> Vec<(usize, usize)> {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows = self.n_elements() / cols.max(1);
        let per = if self.shape.len() == 2 {
            (SLICE_ELEMENTS / cols.max(1)).max(1)
        } else {
            rows.max(1)
        };
        (0..rows)
            .step_by(per)
            .map(|r0| (r0, (r0 + per).min(rows)))
            .collect()
    }

    /// Rows `r0..r1` as f32 (a row: the innermost dimension), without
    /// decoding the rest.
    pub fn rows_f32(&self, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let cols = *self.shape.last().unwrap_or(&1);
        let row_bytes = self.ty.bytes_for(cols).with_context(|| {
            format!(
                "tensor '{}': rows of {cols} are no whole number of {} blocks",
                self.name, self.ty
            )
        })?;
        let data = self
            .data
            .get(r0 * row_bytes..r1 * row_bytes)
            .filter(|_| r0 <= r1)
            .with_context(|| format!("rows {r0}..{r1} of tensor '{}'", self.name))?;
        let mut out = vec![0f32; (r1 - r0) * cols];
        kernels::quants::dequantize(self.ty, data, &mut out)
            .with_context(|| format!("tensor '{}'", self.name))?;
        self.apply_scale(r0, &mut out);
        Ok(out)
    }

    /// All elements as f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.n_elements()];
        kernels::quants::dequantize(self.ty, &self.data, &mut out)
            .with_context(|| format!("tensor '{}'", self.name))?;
        self.apply_scale(0, &mut out);
        Ok(out)
    }
}

/// An open model: config, tokenizer and lazily read weights.
pub struct Model {
    /// Where it was read from (the GGUF file, or the safetensors file / index).
    pub path: PathBuf,
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// The underlying files.
    pub checkpoint: Checkpoint,
    /// The integer-quantized linears of an HF GPTQ / compressed-tensors checkpoint
    /// (read dequantized to f32); None for GGUF and unquantized safetensors.
    pub quantized: Option<HfQuantized>,
    /// The block linears of a compressed-tensors sparse folder (read back dense);
    /// None otherwise.
    pub sparse: Option<SparseLinears>,
    /// After [`Model::prune_layers`]: the blocks kept, by their number in the
    /// file (block `i` of this model is block `kept[i]` of the file), and the
    /// file's block count. None: every block, as numbered in the file.
    pub layer_map: Option<LayerMap>,
}

/// Which of a file's blocks a layer-pruned [`Model`] keeps.
#[derive(Debug, Clone)]
pub struct LayerMap {
    /// The file's block number of each kept block, in order.
    pub kept: Vec<usize>,
    /// Blocks in the file.
    pub source_layers: usize,
}

/// Rows of Q or K in GGUF are interleaved per head (llama.cpp's permutation for
/// its "normal" RoPE): GGUF row `h·d + 2i + s` holds HF row `h·d + s·d/2 + i`.
/// Yields every (HF row, GGUF row) pair of a `rows`-row matrix with `n_head` heads.
fn qk_row_pairs(rows: usize, n_head: usize) -> impl Iterator<Item = (usize, usize)> {
    let d = rows / n_head;
    let half = d / 2;
    (0..n_head).flat_map(move |h| {
        (0..2).flat_map(move |s| (0..half).map(move |i| (h * d + s * half + i, h * d + 2 * i + s)))
    })
}

/// Copies whole rows of `data` (a `rows`-row matrix of any storage type) so that
/// row `to_row` of the result is row `from_row` of the input for every pair.
fn move_rows(data: &[u8], rows: usize, pairs: impl Iterator<Item = (usize, usize)>) -> Vec<u8> {
    let rb = data.len() / rows;
    let mut out = vec![0u8; data.len()];
    for (to_row, from_row) in pairs {
        out[to_row * rb..(to_row + 1) * rb]
            .copy_from_slice(&data[from_row * rb..(from_row + 1) * rb]);
    }
    out
}

/// GGUF row order of Q or K to HF row order (bytes of whole rows, any type).
pub fn unpermute_qk_rows(data: &[u8], rows: usize, n_head: usize) -> Vec<u8> {
    move_rows(data, rows, qk_row_pairs(rows, n_head))
}

/// HF row order of Q or K to GGUF row order: the inverse of [`unpermute_qk_rows`].
pub fn permute_qk_rows(data: &[u8], rows: usize, n_head: usize) -> Vec<u8> {
    move_rows(
        data,
        rows,
        qk_row_pairs(rows, n_head).map(|(hf, gg)| (gg, hf)),
    )
}

impl Model {
    /// Opens a model: a `.gguf` file, a `.safetensors` file or
    /// `model.safetensors.index.json` (with `config.json` and `tokenizer.json` in
    /// the same folder), or a folder holding those.
    pub fn open(path: &Path) -> Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file = if meta.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.exists() {
                single
            } else if index.exists() {
                index
            } else {
                bail!(
                    "{}: folder holds neither model.safetensors nor model.safetensors.index.json",
                    path.display()
                );
            }
        } else {
            path.to_path_buf()
        };
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            let _ = f.read(&mut magic);
        }
        if &magic == crate::gguf::GGUF_MAGIC {
            Self::open_gguf(&file)
        } else {
            let model = Self::open_safetensors(&file)?;
            model.check_shapes()?;
            Ok(model)
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    /// A model from a GGUF already parsed (its hyperparameters, tokenizer and
    /// tensor shapes checked as [`Model::open`] does).
    pub fn from_gguf(g: GgufFile) -> Result<Self> {
        let path = g.path().to_path_buf();
        let path = path.as_path();
        let config = ModelConfig::from_gguf(&g)?;
        let vocab = gguf_vocab(&g)?;
        let tokenizer = Tokenizer::from_gguf(&vocab)
            .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
        Ok(Model {
            path: path.to_path_buf(),
            config,
            tokenizer,
            checkpoint: Checkpoint::Gguf(g),
            quantized: None,
            sparse: None,
            layer_map: None,
        })
        .and_then(|m| {
            m.check_shapes()?;
            Ok(m)
        })
    }

    fn open_safetensors(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_hf_file(&config_path)?;
        let set = SafetensorsSet::open(path)?;
        let sparse = SparseLinears::open(&config_path, &set, &config)?;
        let quantized = match sparse {
            Some(_) => None,
            None => HfQuantized::open(&config_path, &set, &config)?,
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .with_context(|| format!("{}: cannot load the tokenizer", tok_path.display()))?;
        Ok(Model {
            path: path.to_path_buf(),
            config,
            tokenizer,
            checkpoint: Checkpoint::Safetensors(set),
            quantized,
            sparse,
            layer_map: None,
        })
    }

    /// Canonical names of the tensors the forward pass uses, in order.
    pub fn tensor_names(&self) -> Vec<String> {
        names::all(&self.config)
    }

    /// The shape the config implies for a canonical tensor name.
    pub fn expected_shape(&self, name: &str) -> Option<Vec<usize>> {
        let spec = self.config.arch.spec(name)?;
        Some(spec.shape.iter().map(|d| d.size(&self.config)).collect())
    }

    /// The role the architecture gives a canonical tensor name.
    pub fn role(&self, name: &str) -> Option<Role> {
        self.config.arch.role(name)
    }

    fn check_shapes(&self) -> Result<()> {
        for name in self.tensor_names() {
            let (ty, shape) = self.tensor_meta(&name)?;
            let want = self.expected_shape(&name).expect("known name");
            if shape != want {
                bail!(
                    "{}: tensor '{name}' has shape {shape:?}, the config implies {want:?}",
                    self.path.display()
                );
            }
            if shape.len() == 1 && !ty.is_float() {
                bail!(
                    "{}: 1-D tensor '{name}' is {ty}, expected a float type",
                    self.path.display()
                );
            }
        }
        self.check_no_unknown_tensors()
    }

    /// Refuses a checkpoint holding a tensor its architecture's description does
    /// not know: computing without it would silently give another model.
    fn check_no_unknown_tensors(&self) -> Result<()> {
        let mut known: std::collections::HashSet<String> =
            self.tensor_names().into_iter().collect();
        // A tied model's file may still hold the head; the embedding serves it.
        if self.config.tie_word_embeddings {
            known.extend(
                self.config
                    .arch
                    .globals
                    .iter()
                    .filter(|s| s.role == Role::Head)
                    .map(|s| s.gguf.to_owned()),
            );
        }
        // llama.cpp's per-tensor `NAME.scale` of a known weight (NVFP4
        // checkpoints): read with its weight, its shape checked there.
        let scales: Vec<String> = known.iter().filter_map(|n| names::scale_of(n)).collect();
        known.extend(scales);
        let arch = self.config.arch;
        let unknown = match &self.checkpoint {
            Checkpoint::Gguf(g) => g
                .tensors
                .iter()
                .map(|t| t.name.clone())
                .filter(|n| !known.contains(n))
                .collect::<Vec<_>>(),
            // Packed folders hold their own part names; their readers check them.
            Checkpoint::Safetensors(_) if self.quantized.is_some() || self.sparse.is_some() => {
                Vec::new()
            }
            Checkpoint::Safetensors(s) => {
                let experts = self.config.moe.as_ref().map_or(0, |m| m.experts);
                if let Some((hf, e)) = s.names().find_map(|hf| {
                    arch.hf_expert_index(hf)
                        .filter(|&e| e >= experts)
                        .map(|e| (hf, e))
                }) {
                    bail!(
                        "{}: tensor '{hf}' belongs to expert {e}, but the config has {experts} experts (0…{})",
                        self.path.display(),
                        experts.saturating_sub(1)
                    );
                }
                s.names()
                    .filter(|hf| !names::ignorable_hf(hf))
                    .filter(|hf| {
                        arch.canonical_from_hf(hf)
                            .is_none_or(|c| !known.contains(&c))
                    })
                    .map(str::to_owned)
                    .collect()
            }
        };
        if let Some(first) = unknown.first() {
            bail!(
                "{}: tensor '{first}' is not part of a '{}' model as described ({} unknown tensor{} in all); refusing rather than ignoring it",
                self.path.display(),
                arch.gguf_name,
                unknown.len(),
                if unknown.len() == 1 { "" } else { "s" }
            );
        }
        Ok(())
    }

    /// RoPE frequency factors an HF checkpoint implies (GGUF stores them as
    /// `rope_freqs.weight`), when `name` is that tensor.
    fn implied_rope_freqs(&self, name: &str) -> Option<Vec<f32>> {
        if self.config.arch.role(name) != Some(Role::RopeFreqs) {
            return None;
        }
        let s = self.config.rope_scaling.as_ref()?;
        Some(
            s.divisors(self.config.head_dim, self.config.rope_theta)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        )
    }

    /// The offset HF leaves out of norm gain `name` (Gemma stores `w` for a gain
    /// of `1 + w`), when there is one: tensors hold the gain itself.
    fn hf_offset(&self, name: &str) -> Option<f32> {
        let off = self.config.arch.hf_norm_offset;
        let norm = matches!(self.config.arch.role(name), Some(Role::Norm | Role::QkNorm));
        (norm && off != 0.0).then_some(off)
    }

    /// The HF tensors, one per expert, that canonical tensor `name` stacks, when
    /// it is a routed experts' tensor of an HF checkpoint.
    fn hf_expert_parts(&self, name: &str) -> Option<Vec<String>> {
        let m = self.config.moe.as_ref()?;
        self.config.arch.hf_expert_names(name, m.experts)
    }

    /// The float type of HF tensor `hf` stored as `dtype`, or an error naming it.
    fn float_dtype(&self, hf: &str, dtype: Dtype) -> Result<GgmlType> {
        dtype.as_ggml().with_context(|| {
            format!(
                "{}: tensor '{hf}' has dtype {}, expected F32, F16 or BF16",
                self.path.display(),
                dtype.name()
            )
        })
    }

    /// Type and shape `[experts, …]` of the HF per-expert tensors `parts`, which
    /// must all be there with one type and one shape.
    fn stacked_meta(&self, s: &SafetensorsSet, parts: &[String]) -> Result<(GgmlType, Vec<usize>)> {
        let path = self.path.display();
        let mut first: Option<(&String, Dtype, Vec<usize>)> = None;
        for hf in parts {
            let (e, _) = s
                .get(hf)
                .with_context(|| format!("{path}: tensor '{hf}' is missing"))?;
            match &first {
                None => first = Some((hf, e.dtype, e.shape.clone())),
                Some((f, dtype, shape)) if *dtype != e.dtype || *shape != e.shape => bail!(
                    "{path}: tensor '{hf}' is {} {:?} but '{f}' is {} {shape:?}: one expert's tensors must match another's",
                    e.dtype.name(),
                    e.shape,
                    dtype.name()
                ),
                Some(_) => {}
            }
        }
        let (hf, dtype, shape) = first.context("a mixture of experts with no experts")?;
        Ok((
            self.float_dtype(hf, dtype)?,
            [vec![parts.len()], shape].concat(),
        ))
    }

    /// Drops blocks `drop` (numbers as in the file) as llama-quantize's
    /// `--prune-layers` does: the other blocks keep their order and are numbered
    /// from 0, and the config says the new block count (per-layer attention types
    /// and the GGUF metadata arrays with one entry per block re-indexed by
    /// [`crate::gguf_export::metadata`]). Refuses a block that is not there,
    /// every block, and models whose blocks differ by their number (a mixture of
    /// experts with dense leading or interleaved blocks, chunked attention,
    /// sliding-window and global layers mixed).
    pub fn prune_layers(mut self, drop: &[usize]) -> Result<Self> {
        let n = self.config.num_hidden_layers;
        if let Some(&bad) = drop.iter().find(|&&l| l >= n) {
            bail!(
                "--prune-layers {bad}: {} has blocks 0…{}",
                self.path.display(),
                n.saturating_sub(1)
            );
        }
        let kept: Vec<usize> = (0..n).filter(|l| !drop.contains(l)).collect();
        if kept.is_empty() {
            bail!(
                "--prune-layers would remove all {n} blocks of {}",
                self.path.display()
            );
        }
        if self.layer_map.is_some() {
            bail!("{}: blocks were pruned already", self.path.display());
        }
        let c = &mut self.config;
        if c.moe
            .as_ref()
            .is_some_and(|m| m.interleave > 1 || m.first_dense > 0)
            || c.chunked_attention.is_some()
        {
            bail!(
                "--prune-layers: {} ({}) has blocks that differ by their number (dense and expert blocks, or chunked-attention layers); pruning it is not supported",
                self.path.display(),
                c.arch.name
            );
        }
        // llama.cpp derives some families' sliding layers from the block number
        // (Gemma 3: every sixth is global), so blocks of mixed kinds cannot be
        // renumbered without changing what the file computes.
        if c.layer_types.windows(2).any(|w| w[0] != w[1]) {
            bail!(
                "--prune-layers: {} ({}) mixes sliding-window and global attention layers, which llama.cpp tells apart by block number; pruning it is not supported",
                self.path.display(),
                c.arch.name
            );
        }
        c.layer_types.truncate(kept.len());
        c.num_hidden_layers = kept.len();
        self.layer_map = Some(LayerMap {
            kept,
            source_layers: n,
        });
        Ok(self)
    }

    /// The file's name of tensor `name` (block numbers as this model counts
    /// them): the same unless blocks were pruned.
    pub fn source_name<'n>(&self, name: &'n str) -> Cow<'n, str> {
        let Some(map) = &self.layer_map else {
            return Cow::Borrowed(name);
        };
        match crate::arch::split_block(name) {
            Some((l, suffix)) if l < map.kept.len() => {
                Cow::Owned(names::block(map.kept[l], suffix))
            }
            _ => Cow::Borrowed(name),
        }
    }

    /// Storage type and HF-order shape of a tensor, without touching its data.
    pub fn tensor_meta(&self, name: &str) -> Result<(GgmlType, Vec<usize>)> {
        let name = &*self.source_name(name);
        match &self.checkpoint {
            Checkpoint::Gguf(g) => {
                let info = g.tensor(name).with_context(|| {
                    format!("{}: tensor '{name}' is missing", self.path.display())
                })?;
                Ok((info.ty, info.shape()))
            }
            Checkpoint::Safetensors(s) => {
                let stored_packed = match (&self.quantized, &self.sparse) {
                    (Some(q), _) => q.shape(name),
                    (_, Some(sp)) => sp.shape(name),
                    _ => None,
                };
                if let Some(shape) = stored_packed {
                    return Ok((GgmlType::F32, shape));
                }
                if let Some(f) = self.implied_rope_freqs(name) {
                    return Ok((GgmlType::F32, vec![f.len()]));
                }
                if let Some(parts) = self.hf_expert_parts(name) {
                    return self.stacked_meta(s, &parts);
                }
                let hf = self.config.arch.hf_name(name)?;
                let (e, _) = s.get(&hf).with_context(|| {
                    format!("{}: tensor '{hf}' is missing", self.path.display())
                })?;
                let layout = self.config.arch.hf_layout(name);
                if layout != HfLayout::Plain {
                    // The canonical shape is the config's; HF's tensor must hold it.
                    let shape = self
                        .expected_shape(name)
                        .with_context(|| format!("no shape for tensor '{name}'"))?;
                    let want = layout.hf_shape(&shape, &self.config);
                    if e.shape != want {
                        bail!(
                            "{}: tensor '{hf}' has shape {:?}, the config implies {want:?}",
                            self.path.display(),
                            e.shape
                        );
                    }
                    return Ok((self.float_dtype(&hf, e.dtype)?, shape));
                }
                if self.hf_offset(name).is_some() {
                    // Read as f32 with the offset added (see `tensor`).
                    return Ok((GgmlType::F32, e.shape.clone()));
                }
                Ok((self.float_dtype(&hf, e.dtype)?, e.shape.clone()))
            }
        }
    }

    /// A tensor by canonical name, in HF layout (Q/K rows un-permuted for GGUF).
    pub fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        let (ty, shape) = self.tensor_meta(name)?;
        let own_name = name;
        let name = &*self.source_name(name);
        let data: Cow<'_, [u8]> = match &self.checkpoint {
            Checkpoint::Gguf(g) => {
                let bytes = g.tensor_data(g.tensor(name).expect("checked by tensor_meta"));
                match self.config.arch.gguf_permuted_heads(name, &self.config) {
                    Some(n) => Cow::Owned(unpermute_qk_rows(bytes, shape[0], n)),
                    None => Cow::Borrowed(bytes),
                }
            }
            Checkpoint::Safetensors(s) => match (&self.quantized, &self.sparse) {
                (Some(q), _) if q.shape(name).is_some() => {
                    Cow::Owned(q.dequantized_bytes(s, name)?.expect("a quantized linear"))
                }
                (_, Some(sp)) if sp.shape(name).is_some() => {
                    Cow::Owned(sp.dense_bytes(s, name)?.expect("a sparse linear"))
                }
                _ => match self.implied_rope_freqs(name) {
                    Some(f) => Cow::Owned(crate::dense::encode_floats(&f, GgmlType::F32)),
                    None if let Some(parts) = self.hf_expert_parts(name) => Cow::Owned(
                        parts
                            .iter()
                            .flat_map(|hf| s.get(hf).expect("checked by tensor_meta").1)
                            .copied()
                            .collect(),
                    ),
                    None => {
                        let hf = self.config.arch.hf_name(name)?;
                        let (e, bytes) = s.get(&hf).expect("checked by tensor_meta");
                        let layout = self.config.arch.hf_layout(name);
                        match self.hf_offset(name) {
                            None if layout != HfLayout::Plain => {
                                let elem = ty.bytes_for(1).unwrap_or(4);
                                Cow::Owned(layout.to_canonical(bytes, elem, &e.shape, &shape))
                            }
                            None => Cow::Borrowed(bytes),
                            Some(off) => {
                                let ty = e.dtype.as_ggml().expect("checked by tensor_meta");
                                let mut v = vec![0f32; shape.iter().product()];
                                kernels::quants::dequantize(ty, bytes, &mut v)
                                    .with_context(|| format!("tensor '{hf}'"))?;
                                Cow::Owned(v.iter().flat_map(|x| (x + off).to_le_bytes()).collect())
                            }
                        }
                    }
                },
            },
        };
        let scale = match &self.checkpoint {
            Checkpoint::Gguf(g) => self.gguf_scale(g, name, &shape)?,
            Checkpoint::Safetensors(_) => None,
        };
        Ok(Tensor {
            name: own_name.to_owned(),
            ty,
            shape,
            data,
            scale,
        })
    }

    /// The values of `NAME.scale` for weight `NAME.weight` of shape `shape`, if
    /// the GGUF has one: F32 of shape {1} (one per expert, {experts}, for a
    /// stacked experts' tensor), every value finite.
    fn gguf_scale(&self, g: &GgufFile, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        let Some(scale_name) = names::scale_of(name) else {
            return Ok(None);
        };
        let Some(info) = g.tensor(&scale_name) else {
            return Ok(None);
        };
        let matrices = if shape.len() == 3 { shape[0] } else { 1 };
        if info.ty != GgmlType::F32 || info.shape() != [matrices] {
            bail!(
                "{}: tensor '{scale_name}' is {} of shape {:?}; llama.cpp's per-tensor scale of '{name}' must be F32 of shape {{{matrices}}}",
                self.path.display(),
                info.ty,
                info.shape()
            );
        }
        let values: Vec<f32> = g
            .tensor_data(info)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            bail!(
                "{}: tensor '{scale_name}' holds {bad}: the scale of '{name}' must be finite",
                self.path.display()
            );
        }
        Ok(Some(values))
    }

    /// The output head: `output.weight`, or the embedding when tied.
    pub fn output_head(&self) -> Result<Tensor<'_>> {
        let arch = self.config.arch;
        if self.config.tie_word_embeddings {
            self.tensor(arch.global_name(Role::Embedding))
        } else {
            self.tensor(arch.global_name(Role::Head))
        }
    }

    /// Bytes tensor `name` occupies in the file; for a packed linear of a GPTQ or
    /// compressed-tensors checkpoint, all its parts (codes, scales, zeros, g_idx).
    pub fn stored_bytes(&self, name: &str) -> Result<u64> {
        let name = &*self.source_name(name);
        match &self.checkpoint {
            Checkpoint::Gguf(g) => {
                let info = g.tensor(name).with_context(|| {
                    format!("{}: tensor '{name}' is missing", self.path.display())
                })?;
                Ok(g.tensor_data(info).len() as u64)
            }
            Checkpoint::Safetensors(s) => {
                if let Some(prefixes) = self.quantized.as_ref().and_then(|q| q.prefixes(name)) {
                    return Ok(prefixes
                        .iter()
                        .map(|p| s.bytes_under(&format!("{p}.")))
                        .sum());
                }
                if let Some(prefix) = self.sparse.as_ref().and_then(|sp| sp.prefix(name)) {
                    return Ok(s.bytes_under(&format!("{prefix}.")));
                }
                if self.implied_rope_freqs(name).is_some() {
                    return Ok(0);
                }
                let parts = match self.hf_expert_parts(name) {
                    Some(parts) => parts,
                    None => vec![self.config.arch.hf_name(name)?],
                };
                let mut bytes = 0;
                for hf in parts {
                    let (e, _) = s.get(&hf).with_context(|| {
                        format!("{}: tensor '{hf}' is missing", self.path.display())
                    })?;
                    bytes += (e.end - e.start) as u64;
                }
                Ok(bytes)
            }
        }
    }

    /// The files holding the weights (the GGUF file, or every safetensors shard).
    pub fn weight_files(&self) -> Vec<PathBuf> {
        match &self.checkpoint {
            Checkpoint::Gguf(g) => g.paths().into_iter().map(Path::to_path_buf).collect(),
            Checkpoint::Safetensors(s) => s.paths().into_iter().map(Path::to_path_buf).collect(),
        }
    }

    /// Size of the checkpoint's weight files in bytes.
    pub fn file_size(&self) -> u64 {
        match &self.checkpoint {
            Checkpoint::Gguf(g) => g.file_size(),
            Checkpoint::Safetensors(s) => s.file_size(),
        }
    }

    /// Number of parameters (elements of every tensor the forward pass uses).
    pub fn n_params(&self) -> Result<u64> {
        self.tensor_names()
            .iter()
            .map(|n| Ok(self.tensor_meta(n)?.1.iter().product::<usize>() as u64))
            .sum()
    }
}

/// The tokenizer fields of a GGUF file's metadata.
pub fn gguf_vocab(g: &GgufFile) -> Result<GgufVocab> {
    let get_str = |k: &str| g.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let get_id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let get_bool = |k: &str| g.get(k).and_then(|v| v.as_bool());
    let model = get_str("tokenizer.ggml.model").with_context(|| {
        format!(
            "{}: metadata 'tokenizer.ggml.model' is missing",
            g.path().display()
        )
    })?;
    Ok(GgufVocab {
        model,
        pre: get_str("tokenizer.ggml.pre"),
        tokens: g.string_array("tokenizer.ggml.tokens")?,
        scores: g
            .number_array("tokenizer.ggml.scores")?
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        token_types: g
            .number_array("tokenizer.ggml.token_type")?
            .map(|v| v.into_iter().map(|x| x as i32).collect()),
        merges: match g.get("tokenizer.ggml.merges") {
            Some(_) => Some(g.string_array("tokenizer.ggml.merges")?),
            None => None,
        },
        bos: get_id("tokenizer.ggml.bos_token_id"),
        eos: get_id("tokenizer.ggml.eos_token_id"),
        unk: get_id("tokenizer.ggml.unknown_token_id"),
        pad: get_id("tokenizer.ggml.padding_token_id"),
        add_bos: get_bool("tokenizer.ggml.add_bos_token"),
        add_eos: get_bool("tokenizer.ggml.add_eos_token"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_round_trips_and_interleaves() {
        // 2 heads of dim 4, one byte per row: HF rows 0..8.
        let hf: Vec<u8> = (0..8).collect();
        let gg = permute_qk_rows(&hf, 8, 2);
        // Head 0: HF rows [0,1 | 2,3] (halves) interleave to 0,2,1,3.
        assert_eq!(gg, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_qk_rows(&gg, 8, 2), hf);
    }

    #[test]
    fn values_handed_over_by_slices_give_the_copied_tensor() {
        // Two full slices and a partial one, and the empty matrix.
        for n in [(1 << 21) + 12345, 0] {
            let values: Vec<f32> = (0..n).map(|k| (k as f32).sin() * 1e3).collect();
            let copied = Tensor::from_f32("w", vec![1, n], &values);
            let moved = Tensor::from_f32_vec("w", vec![1, n], values);
            assert_eq!(moved.data, copied.data);
            assert_eq!((moved.ty, moved.shape), (copied.ty, copied.shape));
        }
    }
}
