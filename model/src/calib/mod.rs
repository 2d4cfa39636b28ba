//! Calibration statistics: the importance matrix. The model runs on calibration
//! text chunk by chunk, and for the input of every linear layer of every block
//! the sum of squared activations per input column and the number of tokens are
//! accumulated (what `llama-imatrix` computes). A mixture of experts' stacked
//! expert tensors get one matrix per expert, from the tokens routed to it, with
//! its own token count. Stored as llama.cpp's imatrix GGUF (`<weight>.in_sum2`
//! `[matrices, columns]`, `<weight>.counts` `[matrices, 1]`), so files go both
//! ways.
//!
//! Also what the calibrated stages share below them: the calibration samples,
//! the input [`Hessian`] of a linear layer, its damped inverse factor
//! ([`factor`]) and the block-by-block walk ([`walk`]).

pub mod factor;
pub mod walk;

use crate::gguf::{GgufFile, GgufWriter, MetaValue, TensorDecl};
use crate::names;
use crate::Model;
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Statistics of one weight's input.
#[derive(Debug, Clone, PartialEq)]
pub struct ImatrixEntry {
    /// Σ x² over every token, per input column, one row of columns per matrix
    /// (per expert of a stacked experts' tensor; one for any other weight).
    pub sum_sq: Vec<f64>,
    /// Tokens accumulated, per matrix.
    pub counts: Vec<u64>,
}

impl ImatrixEntry {
    /// Mean squared activation per input column of each matrix: the importance
    /// the quantizers take. An expert that saw no token takes the mean over its
    /// tensor's experts pooled (every token routed to any of them), so that it
    /// is quantized with the statistics of its block's expert inputs rather than
    /// none; with no token at all, every column weighs 1.
    pub fn mean(&self) -> Vec<f32> {
        let cols = self.sum_sq.len() / self.counts.len().max(1);
        let total: u64 = self.counts.iter().sum();
        let pooled: Vec<f64> = (0..cols)
            .map(|j| match total {
                0 => 1.0,
                t => self.sum_sq.iter().skip(j).step_by(cols).sum::<f64>() / t as f64,
            })
            .collect();
        self.sum_sq
            .chunks(cols.max(1))
            .zip(&self.counts)
            .flat_map(|(row, &n)| match n {
                0 => pooled.iter().map(|&p| p as f32).collect::<Vec<_>>(),
                n => row.iter().map(|&s| (s / n as f64) as f32).collect(),
            })
            .collect()
    }

    /// The experts (matrices) that saw no calibration token.
    pub fn starved(&self) -> Vec<usize> {
        (0..self.counts.len())
            .filter(|&e| self.counts[e] == 0)
            .collect()
    }
}

/// An importance matrix: per weight (canonical name), its input statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    /// Entries by weight name.
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Chunks of calibration text run.
    pub chunks: u32,
    /// Tokens per chunk.
    pub chunk_size: u32,
    /// Where the calibration text came from.
    pub datasets: Vec<String>,
}

/// The rows of `x` (`cols` wide) that hold only finite values, and how many
/// were left out. Calibration statistics skip a token whose activations
/// overflowed (NaN or Inf) rather than let one poison every column of a
/// Hessian or importance sum; the count goes into the reports.
pub fn finite_rows(x: &[f32], cols: usize) -> (std::borrow::Cow<'_, [f32]>, u64) {
    if cols == 0 || x.iter().all(|v| v.is_finite()) {
        return (std::borrow::Cow::Borrowed(x), 0);
    }
    let mut kept = Vec::with_capacity(x.len());
    let mut skipped = 0;
    for row in x.chunks(cols) {
        if row.iter().all(|v| v.is_finite()) {
            kept.extend_from_slice(row);
        } else {
            skipped += 1;
        }
    }
    (std::borrow::Cow::Owned(kept), skipped)
}

/// Adds Σ x² per column of the `cols`-wide rows of `input` into `sum_sq`
/// (rows already checked finite).
fn accumulate(sum_sq: &mut [f64], input: &[f32]) {
    let cols = sum_sq.len();
    let rows = input.len() / cols;
    // Columns in parallel strips; each strip walks every row.
    sum_sq
        .par_chunks_mut(64)
        .enumerate()
        .for_each(|(s, strip)| {
            let c0 = s * 64;
            for r in 0..rows {
                let row = &input[r * cols + c0..r * cols + c0 + strip.len()];
                for (acc, &v) in strip.iter_mut().zip(row) {
                    *acc += (v as f64) * (v as f64);
                }
            }
        });
}

impl Imatrix {
    /// Runs `model` over `chunks` chunks of `ctx` tokens of `tokens` (BOS as the
    /// model adds it) and accumulates the statistics of every block's linear inputs.
    pub fn collect(
        model: &Model,
        tokens: &[u32],
        ctx: usize,
        chunks: Option<usize>,
        dataset: &str,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if ctx < 2 {
            bail!("--ctx {ctx} is too small");
        }
        let available = tokens.len() / ctx;
        let chunks = match chunks {
            Some(0) => bail!("--chunks must be at least 1"),
            Some(n) if n > available => bail!(
                "--chunks {n} asks for more than the {available} whole chunks of {ctx} tokens in the calibration text ({} tokens)",
                tokens.len()
            ),
            Some(n) => n,
            None if available == 0 => bail!(
                "the calibration text has {} tokens, fewer than one chunk of {ctx}",
                tokens.len()
            ),
            None => available,
        };
        let bos = if model.tokenizer.add_bos() {
            model.tokenizer.bos()
        } else {
            None
        };
        let mut entries: BTreeMap<String, ImatrixEntry> = BTreeMap::new();
        let mut nonfinite: BTreeMap<String, u64> = BTreeMap::new();
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            let mut x = model.embed(&chunk)?;
            for layer in 0..model.config.num_hidden_layers {
                let w = model.block_weights(layer)?;
                model
                    .forward_block_observed(&w, &mut x, ctx, &mut |suffix, expert, input| {
                        let name = names::block(layer, suffix);
                        let shape = model.expected_shape(&name).unwrap_or_default();
                        let cols = shape.last().copied().unwrap_or(1);
                        let matrices = if shape.len() == 3 { shape[0] } else { 1 };
                        let e = entries.entry(name).or_insert_with(|| ImatrixEntry {
                            sum_sq: vec![0.0; cols * matrices],
                            counts: vec![0; matrices],
                        });
                        let m = expert.unwrap_or(0);
                        let (rows, skipped) = finite_rows(input, cols);
                        accumulate(&mut e.sum_sq[m * cols..(m + 1) * cols], &rows);
                        e.counts[m] += (rows.len() / cols) as u64;
                        if skipped > 0 {
                            *nonfinite.entry(names::block(layer, suffix)).or_default() += skipped;
                        }
                    })
                    .with_context(|| format!("block {layer}"))?;
            }
            progress(c + 1, chunks);
        }
        for (name, skipped) in &nonfinite {
            let kept = entries
                .get(name)
                .map_or(0, |e| e.counts.iter().sum::<u64>());
            if kept == 0 {
                bail!("every calibration token reaching '{name}' has NaN or Inf activations ({skipped} tokens): the model overflows on this text");
            }
            eprintln!("{name}: {skipped} tokens with NaN or Inf activations left out of its statistics ({kept} kept)");
        }
        Ok(Imatrix {
            entries,
            chunks: chunks as u32,
            chunk_size: ctx as u32,
            datasets: vec![dataset.to_owned()],
        })
    }

    /// The mean squared input of weight `name`, if collected.
    pub fn importance(&self, name: &str) -> Option<Vec<f32>> {
        self.entries.get(name).map(ImatrixEntry::mean)
    }

    /// Writes llama.cpp's imatrix GGUF.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = vec![
            (
                "general.type".to_owned(),
                MetaValue::String("imatrix".into()),
            ),
            (
                "imatrix.datasets".to_owned(),
                MetaValue::Array(
                    8,
                    self.datasets
                        .iter()
                        .map(|d| MetaValue::String(d.clone()))
                        .collect(),
                ),
            ),
            (
                "imatrix.chunk_count".to_owned(),
                MetaValue::U32(self.chunks),
            ),
            (
                "imatrix.chunk_size".to_owned(),
                MetaValue::U32(self.chunk_size),
            ),
        ];
        let mut decls = Vec::new();
        for (name, e) in &self.entries {
            let matrices = e.counts.len() as u64;
            decls.push(TensorDecl {
                name: format!("{name}.in_sum2"),
                dims: vec![e.sum_sq.len() as u64 / matrices, matrices],
                ty: GgmlType::F32,
            });
            decls.push(TensorDecl {
                name: format!("{name}.counts"),
                dims: vec![1, matrices],
                ty: GgmlType::F32,
            });
        }
        let mut w = GgufWriter::create(path, &metadata, &decls)?;
        for (name, e) in &self.entries {
            let sums: Vec<u8> = e
                .sum_sq
                .iter()
                .flat_map(|&s| (s as f32).to_le_bytes())
                .collect();
            w.write_tensor(&format!("{name}.in_sum2"), &sums)?;
            let counts: Vec<u8> = e
                .counts
                .iter()
                .flat_map(|&c| (c as f32).to_le_bytes())
                .collect();
            w.write_tensor(&format!("{name}.counts"), &counts)?;
        }
        w.finish()?;
        Ok(())
    }

    /// Reads an imatrix GGUF (ours or llama.cpp's; one matrix per weight, or
    /// one per expert of a stacked experts' tensor).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// [`Imatrix::load`] on a GGUF already parsed.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        if g.get("general.type").and_then(MetaValue::as_str) != Some("imatrix") {
            bail!(
                "{}: not an imatrix file (general.type is not \"imatrix\")",
                path.display()
            );
        }
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let t = g
                .tensor(name)
                .with_context(|| format!("{}: tensor '{name}' is missing", path.display()))?;
            if t.ty != GgmlType::F32 {
                bail!(
                    "{}: tensor '{name}' is {}, expected F32",
                    path.display(),
                    t.ty
                );
            }
            Ok(g.tensor_data(t)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut entries = BTreeMap::new();
        for t in &g.tensors {
            let Some(weight) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = f32s(&t.name)?;
            let counts = f32s(&format!("{weight}.counts"))?;
            if counts.is_empty() || sums.len() % counts.len() != 0 {
                bail!(
                    "{}: '{weight}' has {} sums for {} matrices (its '.counts'): expected a whole row of columns per matrix",
                    path.display(),
                    sums.len(),
                    counts.len()
                );
            }
            entries.insert(
                weight.to_owned(),
                ImatrixEntry {
                    sum_sq: sums.iter().map(|&s| s as f64).collect(),
                    counts: counts.iter().map(|&c| c as u64).collect(),
                },
            );
        }
        if entries.is_empty() {
            bail!(
                "{}: the imatrix holds no '*.in_sum2' tensors",
                path.display()
            );
        }
        let u32_of = |k: &str| g.get(k).and_then(MetaValue::as_u64).unwrap_or(0) as u32;
        Ok(Imatrix {
            entries,
            chunks: u32_of("imatrix.chunk_count"),
            chunk_size: u32_of("imatrix.chunk_size"),
            datasets: g.string_array("imatrix.datasets").unwrap_or_default(),
        })
    }
}

/// The splitmix64 generator: no dependency, the same stream on every platform,
/// for seeded choices (sample order, initial values) that must be reproducible.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Calibration samples: `count` windows of `len` tokens of `tokens`, chosen
/// without overlap by a seeded shuffle of the text's whole windows (the same
/// seed gives the same samples). When the model adds a BOS token it replaces the
/// first token of each window, as in evaluation.
pub fn calibration_samples(
    tokens: &[u32],
    count: usize,
    len: usize,
    seed: u64,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    if count == 0 || len < 2 {
        bail!("calibration needs at least 1 sample of at least 2 tokens (asked {count} × {len})");
    }
    let windows = tokens.len() / len;
    if windows < count {
        bail!(
            "the calibration text has {} tokens: {count} samples × {len} tokens need at least {} ({:.1}× more text)",
            tokens.len(),
            count * len,
            (count * len) as f64 / tokens.len().max(1) as f64
        );
    }
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..windows).collect();
    for i in (1..windows).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    Ok(order[..count]
        .iter()
        .map(|&w| {
            let mut s = tokens[w * len..(w + 1) * len].to_vec();
            if let Some(b) = bos {
                s[0] = b;
            }
            s
        })
        .collect())
}

/// The input Hessian of a linear layer, `H = 2XᵀX / n` over every calibration
/// token, accumulated one sample at a time in f32 as the GPTQ reference does
/// (the upper triangle by single-threaded strips run in parallel, mirrored at
/// the end), or only its diagonal. f32 halves what the widest layer holds: an
/// 8B model's 14336-wide down projection's Hessian is 0.8 GB, not 1.6.
pub struct Hessian {
    cols: usize,
    diagonal_only: bool,
    /// `cols × cols` row-major (upper triangle until mirrored), or the `cols`
    /// diagonal entries when `diagonal_only`.
    sum: Vec<f32>,
    abs_sum: Vec<f64>,
    tokens: u64,
    nonfinite_rows: u64,
}

/// Rows of `XᵀX` per parallel strip.
const STRIP: usize = 64;

impl Hessian {
    /// An empty accumulator for `cols` input features.
    pub fn new(cols: usize) -> Self {
        Hessian {
            cols,
            diagonal_only: false,
            sum: vec![0.0; cols * cols],
            abs_sum: vec![0.0; cols],
            tokens: 0,
            nonfinite_rows: 0,
        }
    }

    /// An accumulator of `diag H` only: per-column sums of squares without the
    /// `XᵀX` GEMM, in `cols` values rather than `cols²`.
    pub fn diagonal(cols: usize) -> Self {
        Hessian {
            cols,
            diagonal_only: true,
            sum: vec![0.0; cols],
            abs_sum: vec![0.0; cols],
            tokens: 0,
            nonfinite_rows: 0,
        }
    }

    /// Adds the rows of `x` (`n × cols`, row-major); a row holding NaN or Inf
    /// is left out and counted ([`Hessian::nonfinite_rows`]).
    pub fn add(&mut self, x: &[f32]) {
        let cols = self.cols;
        let (x, skipped) = finite_rows(x, cols);
        self.nonfinite_rows += skipped;
        let x = &x[..];
        let n = x.len() / cols;
        if n == 0 {
            return;
        }
        if self.diagonal_only {
            // Summed per sample in f64, then added: the same precision as the
            // full matrix's per-sample GEMM.
            let mut squares = vec![0f64; cols];
            for row in x.chunks(cols) {
                for (s, &v) in squares.iter_mut().zip(row) {
                    *s += v as f64 * v as f64;
                }
            }
            for (o, s) in self.sum.iter_mut().zip(squares) {
                *o += s as f32;
            }
        } else {
            self.add_products(x);
        }
        for row in x.chunks(cols) {
            for (a, &v) in self.abs_sum.iter_mut().zip(row) {
                *a += v.abs() as f64;
            }
        }
        self.tokens += n as u64;
    }

    /// `sum += XᵀX` (upper triangle).
    fn add_products(&mut self, x: &[f32]) {
        use kernels::matmul::{gemm, MatRef};
        let cols = self.cols;
        let n = x.len() / cols;
        self.sum
            .par_chunks_mut(STRIP * cols)
            .enumerate()
            .for_each(|(s, out)| {
                let a = s * STRIP;
                let b = (a + STRIP).min(cols);
                // Rows a..b, columns a..cols: (X[:, a..b])ᵀ · X[:, a..].
                let mut part = vec![0f32; (b - a) * (cols - a)];
                gemm(
                    MatRef::row_major(&x[a..], n, b - a, cols).t(),
                    MatRef::row_major(&x[a..], n, cols - a, cols),
                    &mut part,
                    cols - a,
                    false,
                );
                for (r, row) in part.chunks(cols - a).enumerate() {
                    for (o, &v) in out[r * cols + a..(r + 1) * cols].iter_mut().zip(row) {
                        *o += v;
                    }
                }
            });
    }

    /// Mean `|x|` per input column (AWQ's activation statistic).
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.tokens.max(1) as f64;
        self.abs_sum.iter().map(|&a| (a / n) as f32).collect()
    }

    /// Tokens accumulated.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Tokens left out because their row held NaN or Inf.
    pub fn nonfinite_rows(&self) -> u64 {
        self.nonfinite_rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether only `diag H` is accumulated.
    pub fn is_diagonal_only(&self) -> bool {
        self.diagonal_only
    }

    fn scale(&self) -> f32 {
        (2.0 / self.tokens.max(1) as f64) as f32
    }

    /// `diag H`.
    pub fn diagonal_values(&self) -> Vec<f32> {
        let (c, scale) = (self.cols, self.scale());
        if self.diagonal_only {
            self.sum.iter().map(|&v| v * scale).collect()
        } else {
            (0..c).map(|j| self.sum[j * c + j] * scale).collect()
        }
    }

    /// [`Hessian::matrix`] made in place of the accumulator (no second
    /// `cols²` copy); empty for a diagonal-only accumulator.
    pub fn into_matrix(self) -> Vec<f32> {
        if self.diagonal_only {
            return Vec::new();
        }
        let (c, scale) = (self.cols, self.scale());
        let mut h = self.sum;
        for i in 0..c {
            for j in i..c {
                let v = h[i * c + j] * scale;
                h[i * c + j] = v;
                h[j * c + i] = v;
            }
        }
        h
    }

    /// `2XᵀX / n`, full and symmetric, row-major (zero off the diagonal for a
    /// diagonal-only accumulator).
    pub fn matrix(&self) -> Vec<f32> {
        let (c, scale) = (self.cols, self.scale());
        let mut h = vec![0f32; c * c];
        if self.diagonal_only {
            for (j, &v) in self.sum.iter().enumerate() {
                h[j * c + j] = v * scale;
            }
            return h;
        }
        for i in 0..c {
            for j in i..c {
                let v = self.sum[i * c + j] * scale;
                h[i * c + j] = v;
                h[j * c + i] = v;
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_sum_of_squares_per_column() {
        let mut sums = vec![0.0; 70];
        let input: Vec<f32> = (0..140)
            .map(|i| (i % 70) as f32 * if i < 70 { 1.0 } else { 2.0 })
            .collect();
        accumulate(&mut sums, &input);
        for (c, &s) in sums.iter().enumerate() {
            assert_eq!(s, (c * c) as f64 * 5.0);
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let mut m = Imatrix {
            chunks: 3,
            chunk_size: 512,
            datasets: vec!["calib.txt".into()],
            ..Default::default()
        };
        m.entries.insert(
            "blk.0.attn_q.weight".into(),
            ImatrixEntry {
                sum_sq: vec![1.0, 4.0, 9.0],
                counts: vec![2],
            },
        );
        // Three experts of two columns; the second saw no token and takes the
        // pooled mean (sums 1+3 and 2+4 over 2+2 tokens).
        m.entries.insert(
            "blk.0.ffn_up_exps.weight".into(),
            ImatrixEntry {
                sum_sq: vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0],
                counts: vec![2, 0, 2],
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imatrix.gguf");
        m.save(&p).unwrap();
        let back = Imatrix::load(&p).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.importance("blk.0.attn_q.weight").unwrap(),
            vec![0.5, 2.0, 4.5]
        );
        assert_eq!(
            back.importance("blk.0.ffn_up_exps.weight").unwrap(),
            vec![0.5, 1.0, 1.0, 1.5, 1.5, 2.0]
        );
        assert_eq!(back.entries["blk.0.ffn_up_exps.weight"].starved(), [1]);
        assert!(Imatrix::load(&dir.path().join("missing.gguf")).is_err());
    }

    #[test]
    fn rows_with_nan_or_inf_are_left_out_of_a_hessian_and_counted() {
        let cols = 70;
        let x: Vec<f32> = (0..4 * cols).map(|k| ((k * 13 % 7) as f32) - 3.0).collect();
        let mut poisoned = x.clone();
        poisoned[cols + 5] = f32::NAN;
        poisoned[3 * cols] = f32::NEG_INFINITY;
        let (mut clean, mut dirty) = (Hessian::new(cols), Hessian::new(cols));
        clean.add(&x[..cols]);
        clean.add(&x[2 * cols..3 * cols]);
        dirty.add(&poisoned);
        assert_eq!((dirty.tokens(), dirty.nonfinite_rows()), (2, 2));
        assert_eq!(dirty.matrix(), clean.matrix());
        assert_eq!(dirty.mean_abs(), clean.mean_abs());
        let m = clean.matrix();
        assert_eq!(clean.into_matrix(), m);
        assert_eq!(
            finite_rows(&x, cols),
            (std::borrow::Cow::Borrowed(&x[..]), 0)
        );
    }

    #[test]
    fn hessian_is_twice_the_mean_outer_product() {
        let cols = 70; // two strips, the second partial
        let x: Vec<f32> = (0..3 * cols)
            .map(|k| ((k * 37 % 11) as f32) - 5.0)
            .collect();
        let mut h = Hessian::new(cols);
        h.add(&x[..cols]);
        h.add(&x[cols..]);
        let m = h.matrix();
        let mean_abs = h.mean_abs();
        for i in 0..cols {
            let want: f32 = (0..3).map(|t| x[t * cols + i].abs()).sum::<f32>() / 3.0;
            assert!((mean_abs[i] - want).abs() < 1e-5);
            for j in 0..cols {
                let want: f64 = (0..3)
                    .map(|t| (x[t * cols + i] * x[t * cols + j]) as f64)
                    .sum::<f64>()
                    * 2.0
                    / 3.0;
                assert!((m[i * cols + j] as f64 - want).abs() < 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    fn diagonal_hessian_matches_the_full_one_on_the_diagonal() {
        let cols = 70;
        let x: Vec<f32> = (0..4 * cols).map(|k| ((k * 13 % 7) as f32) - 3.0).collect();
        let (mut full, mut diag) = (Hessian::new(cols), Hessian::diagonal(cols));
        full.add(&x);
        diag.add(&x);
        let (f, d) = (full.matrix(), diag.matrix());
        for i in 0..cols {
            for j in 0..cols {
                let want = if i == j { f[i * cols + j] } else { 0.0 };
                assert!((d[i * cols + j] - want).abs() < 1e-4, "({i},{j})");
            }
        }
        assert_eq!(full.mean_abs(), diag.mean_abs());
        assert_eq!(
            diag.diagonal_values(),
            (0..cols).map(|j| d[j * cols + j]).collect::<Vec<_>>()
        );
        assert!(diag.into_matrix().is_empty());
    }

    #[test]
    fn calibration_samples_are_seeded_disjoint_windows() {
        let tokens: Vec<u32> = (0..1000).collect();
        let a = calibration_samples(&tokens, 5, 100, 42, None).unwrap();
        assert_eq!(a, calibration_samples(&tokens, 5, 100, 42, None).unwrap());
        assert_ne!(a, calibration_samples(&tokens, 5, 100, 43, None).unwrap());
        let mut starts: Vec<u32> = a.iter().map(|s| s[0]).collect();
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), 5);
        assert!(a.iter().all(|s| s[0] % 100 == 0 && s.len() == 100));
        let with_bos = calibration_samples(&tokens, 5, 100, 42, Some(7)).unwrap();
        assert!(with_bos.iter().all(|s| s[0] == 7));
        let e = calibration_samples(&tokens, 11, 100, 0, None).unwrap_err();
        assert!(e.to_string().contains("need at least 1100"), "{e}");
    }
}
