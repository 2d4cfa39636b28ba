//! GPTQ (Frantar et al., 2022): quantize a linear layer's weight `W` (rows ×
//! cols) column by column, each column's rounding error fed forward to the columns
//! not yet quantized through the inverse Hessian of the layer's input,
//! `H = 2XᵀX / n`, so that the layer's output `WX` moves as little as possible.
//!
//! ```text
//! U = chol(H⁻¹)ᵀ (upper), H damped by λ·mean(diag H) until it factors
//! for each block of B columns, for each column i in it:
//!     q_i = nearest grid value of w_i;  e_i = (w_i − q_i) / U_ii
//!     w_j −= e_i · U_ij   for the later columns j of the block
//! then all later columns at once:  W[:, after] −= E · U[block, after]   (lazy batch)
//! ```
//!
//! The grid is pluggable ([`Grid`]): integers with a scale and zero point per row
//! and group of columns (the GPTQ/compressed-tensors formats), or a GGUF block
//! type whose scales (and mins) are fixed by our importance-weighted encoder from
//! the weights as they stand when GPTQ reaches the block's first column, after
//! which GPTQ picks the codes on that grid (written back with
//! [`kernels::quants::grid::set_codes`], so llama.cpp reads the result).
//!
//! Rows are independent given `U`, so row chunks run in parallel. Columns are
//! processed in act-order (descending `diag H`) when asked; a group's grid is
//! fixed when its first column comes up, from the current (error-updated) values
//! of all its columns, so static groups (natural column groups, needed by GGUF
//! blocks) and dynamic groups (consecutive in act-order) share one code path.
//! RTN is the same loop without feedback (`U = I`).

use anyhow::{bail, Result};
use half::f16;
use kernels::quants::grid::{block_levels, grid_shape, set_codes};
use kernels::GgmlType;
#[cfg(test)]
use model::calib::factor::output_error;
pub use model::calib::factor::{
    rows_per_chunk, FactorOptions, Factored, UpperFactor, ROW_CHUNK_BYTES,
};
use model::calib::walk::ExpertCalibration;
use rayon::prelude::*;
use serde::Serialize;

/// What the quantized values of a matrix may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Grid {
    /// `scale · (q − zero)`, `q` in `0..2^bits`, one f16 scale and integer zero
    /// point per row and group of `group` columns (`group == cols`: per channel;
    /// the last group is partial when `group` does not divide the columns).
    Int {
        /// Bits per weight: 2, 3, 4 or 8.
        bits: u32,
        /// Columns per group.
        group: usize,
        /// Symmetric: the zero point is fixed at `2^(bits−1)`.
        sym: bool,
        /// Search a clipped range per group (AWQ's auto-clip): shrink the
        /// min/max range in 5% steps down to half while the importance-weighted
        /// error of the group falls.
        clip: bool,
    },
    /// A GGUF block type (its blocks are the groups).
    Gguf(GgmlType),
}

impl Grid {
    /// Columns sharing one set of grid parameters.
    fn group_len(&self) -> usize {
        match *self {
            Grid::Int { group, .. } => group,
            Grid::Gguf(ty) => ty.block_elems(),
        }
    }

    /// Checks the grid fits a matrix of `cols` columns.
    pub fn check(&self, cols: usize, name: &str) -> Result<()> {
        match *self {
            Grid::Int { bits, group, .. } => {
                if ![2, 3, 4, 8].contains(&bits) {
                    bail!("--bits {bits}: GPTQ formats take 2, 3, 4 or 8 bits");
                }
                // A last partial group is allowed, as in GPTQ's reference and
                // format (g_idx = i / group, ⌈cols / group⌉ scale rows).
                if group == 0 || group > cols {
                    bail!(
                        "group size {group} does not fit the {cols} input columns of '{name}' (use 1..={cols}, or per-channel)"
                    );
                }
            }
            Grid::Gguf(ty) => {
                if grid_shape(ty).is_none() {
                    bail!("{ty} is a float type: nothing for GPTQ to choose");
                }
                if !cols.is_multiple_of(ty.block_elems()) {
                    bail!(
                        "'{name}' has {cols} columns, not whole {ty} blocks of {}",
                        ty.block_elems()
                    );
                }
            }
        }
        Ok(())
    }
}

/// GPTQ settings.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Dampening: this fraction of the mean of `diag H` is added to the diagonal
    /// (raised by 0.0025 at a time, up to 1, while the Cholesky factorisation fails).
    pub damp_percent: f64,
    /// Columns per lazy batch update.
    pub block_size: usize,
    /// Process columns in descending `diag H` (desc_act).
    pub act_order: bool,
    /// With act-order, keep groups as natural column ranges (static groups)
    /// rather than consecutive act-order positions. Always on for GGUF grids.
    pub static_groups: bool,
    /// Where a mixture of experts' routed experts take their statistics from.
    pub experts: ExpertCalibration,
}

impl GptqOptions {
    /// How the Hessian is factored for these settings.
    pub fn factor_options(&self) -> FactorOptions {
        FactorOptions {
            damp_percent: self.damp_percent,
            act_order: self.act_order,
        }
    }
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp_percent: 0.01,
            block_size: 128,
            act_order: false,
            static_groups: false,
            experts: ExpertCalibration::default(),
        }
    }
}

/// A quantized matrix in its stored form.
#[derive(Debug, Clone)]
pub enum Stored {
    /// Integer codes (`rows × cols`), f16 scales and integer zero points
    /// (`rows × groups`), and each column's group.
    Int {
        /// Codes, row-major.
        codes: Vec<u8>,
        /// Scales, row-major `rows × groups`.
        scales: Vec<f16>,
        /// Zero points, row-major `rows × groups`.
        zeros: Vec<u8>,
        /// Group of every column.
        g_idx: Vec<u32>,
    },
    /// GGUF blocks of the type, rows in the input's order.
    Gguf(GgmlType, Vec<u8>),
}

/// A quantized matrix: its exact dequantized values and stored form.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// What the stored form dequantizes to times `tensor_scale`, row-major.
    pub values: Vec<f32>,
    /// The stored form.
    pub stored: Stored,
    /// llama.cpp's per-tensor factor (`NAME.scale`) the stored form is
    /// multiplied by; 1 when the matrix has none.
    pub tensor_scale: f32,
}

/// How one matrix went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GptqStats {
    /// Dampening fraction that let the Hessian factor (0 for RTN).
    pub damp_percent: f64,
    /// Columns whose input was never non-zero (weights zeroed, as GPTQ does).
    pub dead_columns: usize,
    /// The Hessian stayed singular after dampening: rounded to nearest instead.
    pub fell_back_to_rtn: bool,
    /// Seconds spent factoring (Cholesky, inverse, Cholesky).
    pub factor_seconds: f64,
    /// Seconds spent in the column loop.
    pub loop_seconds: f64,
    /// Weights that were exactly zero in the input of a pruned layer (one with at
    /// least [`PRUNED_FRACTION`] zeros) and are kept at zero.
    pub kept_zeros: usize,
    /// Of those, how many the grid could not hold at exactly zero (block types
    /// whose levels in that block miss 0, e.g. those with a min offset): they got
    /// the level nearest to 0.
    pub zeros_lost: usize,
    /// Calibration tokens left out of the layer's statistics because their
    /// input row held NaN or Inf.
    #[serde(skip_serializing_if = "is_zero")]
    pub nonfinite_rows: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A layer with at least this fraction of exactly-zero weights counts as pruned:
/// GPTQ keeps its zeros at zero instead of letting error feedback fill them
/// (SparseGPT's joint mode). Dense checkpoints are nowhere near it.
pub const PRUNED_FRACTION: f64 = 0.1;

/// The parameters of one group of columns, fixed for one row.
enum Fixed {
    Int { scale: f16, zero: u8 },
    Gguf(Vec<u8>),
}

/// Which columns form each group and how the grid is laid out.
struct Layout {
    /// Group of every natural column.
    group_of: Vec<usize>,
    /// Natural columns of each group, ascending.
    members: Vec<Vec<usize>>,
    /// Elements per sub-block sharing one scale inside a group.
    sub: usize,
    /// Codes per element.
    n_codes: usize,
}

impl Layout {
    fn new(grid: &Grid, cols: usize, perm: &[usize], dynamic: bool) -> Self {
        let g = grid.group_len();
        let n_groups = cols.div_ceil(g);
        let mut group_of = vec![0usize; cols];
        for (pos, &c) in perm.iter().enumerate() {
            group_of[c] = if dynamic { pos / g } else { c / g };
        }
        let mut members = vec![Vec::with_capacity(g); n_groups];
        for (c, &grp) in group_of.iter().enumerate() {
            members[grp].push(c);
        }
        let (sub, n_codes) = match *grid {
            Grid::Int { bits, group, .. } => (group, 1usize << bits),
            Grid::Gguf(ty) => grid_shape(ty).expect("checked"),
        };
        Layout {
            group_of,
            members,
            sub,
            n_codes,
        }
    }
}

/// GPTQ's find_params range of a group: always includes zero, mirrored when
/// symmetric, `[-1, 1]` for an all-zero group.
fn int_range(values: &[f32], sym: bool) -> (f32, f32) {
    let mut lo = values.iter().fold(0f32, |m, &v| m.min(v));
    let mut hi = values.iter().fold(0f32, |m, &v| m.max(v));
    if sym {
        hi = hi.max(-lo);
        if lo < 0.0 {
            lo = -hi;
        }
    }
    if lo == 0.0 && hi == 0.0 {
        (lo, hi) = (-1.0, 1.0);
    }
    (lo, hi)
}

/// The f16 scale, zero point and level table of an integer grid over `[lo, hi]`.
fn int_params(lo: f32, hi: f32, bits: u32, sym: bool) -> (f16, u8, Vec<f32>) {
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut scale = f16::from_f32((hi - lo) / maxq);
    // Asymmetric zero points stay in 1..=maxq: GPTQ's v1 format stores zero − 1,
    // and its readers add the 1 back without wrapping. A range that starts at
    // zero keeps its top by spreading over maxq − 1 steps.
    let zero = if sym {
        1u32 << (bits - 1)
    } else {
        let z = (-lo / scale.to_f32()).round();
        if z.is_finite() && z >= 1.0 {
            z.min(maxq) as u32
        } else {
            scale = f16::from_f32(hi / (maxq - 1.0));
            1
        }
    };
    let s = scale.to_f32();
    let levels = (0..=maxq as u32)
        .map(|c| s * (c as f32 - zero as f32))
        .collect();
    (scale, zero as u8, levels)
}

/// Fixes the grid of one row's group from its current `values` (natural column
/// order) and their `importance`: returns the stored parameters and the level
/// table (`sub-blocks × n_codes`).
fn fix_group(grid: &Grid, values: &[f32], importance: &[f32]) -> (Fixed, Vec<f32>) {
    match *grid {
        Grid::Int {
            bits, sym, clip, ..
        } => {
            let (lo, hi) = int_range(values, sym);
            let best = if clip {
                (0..10)
                    .map(|i| {
                        let r = 1.0 - 0.05 * i as f32;
                        let (scale, zero, levels) = int_params(lo * r, hi * r, bits, sym);
                        let err: f64 = values
                            .iter()
                            .zip(importance)
                            .map(|(&x, &w)| {
                                let d = (x - nearest(&levels, x).1) as f64;
                                w as f64 * d * d
                            })
                            .sum();
                        (err, scale, zero, levels)
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .expect("ten candidates")
            } else {
                let (scale, zero, levels) = int_params(lo, hi, bits, sym);
                (0.0, scale, zero, levels)
            };
            (
                Fixed::Int {
                    scale: best.1,
                    zero: best.2,
                },
                best.3,
            )
        }
        Grid::Gguf(ty) => {
            let block =
                kernels::quants::quantize_to_vec(ty, values, values.len(), Some(importance))
                    .expect("a whole block");
            let levels = block_levels(ty, &block);
            (Fixed::Gguf(block), levels)
        }
    }
}

/// Tables at most this long are searched level by level: NVFP4's codes (0…6
/// then -0…-6 in E2M1) are not in value order.
const SCAN_LEVELS: usize = 16;

/// The level of a code table nearest to `x`, and its code: the first of equally
/// near levels. Tables longer than [`SCAN_LEVELS`] must be monotone (every
/// integer grid is), and are binary-searched.
fn nearest(levels: &[f32], x: f32) -> (u8, f32) {
    let n = levels.len();
    if n <= SCAN_LEVELS {
        let mut best = 0;
        for (i, &v) in levels.iter().enumerate().skip(1) {
            if (v - x).abs() < (levels[best] - x).abs() {
                best = i;
            }
        }
        return (best as u8, levels[best]);
    }
    let ascending = levels[0] <= levels[n - 1];
    let i = if ascending {
        levels.partition_point(|&v| v < x)
    } else {
        levels.partition_point(|&v| v > x)
    };
    let best = match i {
        0 => 0,
        i if i >= n => n - 1,
        i => {
            if (levels[i] - x).abs() < (x - levels[i - 1]).abs() {
                i
            } else {
                i - 1
            }
        }
    };
    (best as u8, levels[best])
}

/// Quantizes `w` (`rows × cols`, row-major) on `grid` by GPTQ with the input
/// Hessian `h` (`cols × cols`, `2XᵀX/n`).
pub fn gptq(
    w: &[f32],
    cols: usize,
    h: &[f32],
    grid: &Grid,
    opts: &GptqOptions,
) -> Result<(QuantizedMatrix, GptqStats)> {
    gptq_factored(
        w.to_vec(),
        &Factored::new(h.to_vec(), cols, &opts.factor_options()),
        grid,
        opts,
    )
}

/// [`gptq`] with the Hessian already factored (its factoring time is reported
/// with every layer that uses it).
pub fn gptq_factored(
    mut w: Vec<f32>,
    f: &Factored,
    grid: &Grid,
    opts: &GptqOptions,
) -> Result<(QuantizedMatrix, GptqStats)> {
    let cols = f.cols();
    let rows = w.len() / cols;
    for &j in f.dead() {
        for r in 0..rows {
            w[r * cols + j] = 0.0;
        }
    }
    let dynamic = opts.act_order && !opts.static_groups && matches!(grid, Grid::Int { .. });
    let zeros = w.iter().filter(|&&v| v == 0.0).count();
    let keep_zeros = zeros as f64 >= PRUNED_FRACTION * w.len() as f64;
    let start = std::time::Instant::now();
    let (q, zeros_lost) = run(
        w,
        cols,
        grid,
        f.order(),
        f.upper(),
        f.diagonal(),
        opts.block_size,
        dynamic,
        keep_zeros,
    );
    let stats = GptqStats {
        damp_percent: f.damp_percent(),
        dead_columns: f.dead().len(),
        fell_back_to_rtn: f.upper().is_none(),
        factor_seconds: f.seconds(),
        loop_seconds: start.elapsed().as_secs_f64(),
        kept_zeros: if keep_zeros { zeros } else { 0 },
        zeros_lost,
        nonfinite_rows: 0,
    };
    Ok((q, stats))
}

/// Rounds `w` to the nearest values of `grid` (groups fixed from the weights,
/// weighted by `importance` for GGUF grids), with no error feedback.
pub fn rtn(w: &[f32], cols: usize, grid: &Grid, importance: Option<&[f32]>) -> QuantizedMatrix {
    let ones;
    let importance = match importance {
        Some(i) => i,
        None => {
            ones = vec![1f32; cols];
            &ones
        }
    };
    let perm: Vec<usize> = (0..cols).collect();
    run(
        w.to_vec(),
        cols,
        grid,
        &perm,
        None,
        importance,
        128,
        false,
        false,
    )
    .0
}

/// The column loop over all rows (row chunks in parallel). `u` is the upper
/// Cholesky factor of `H⁻¹` in `perm` order, or `None` for plain rounding. With
/// `keep_zeros`, weights that are exactly zero in `w` stay exactly zero where the
/// grid has a zero level; returns how many could not.
#[allow(clippy::too_many_arguments)]
fn run(
    w: Vec<f32>,
    cols: usize,
    grid: &Grid,
    perm: &[usize],
    u: Option<&UpperFactor>,
    importance: &[f32],
    block_size: usize,
    dynamic: bool,
    keep_zeros: bool,
) -> (QuantizedMatrix, usize) {
    let rows = w.len() / cols;
    let layout = Layout::new(grid, cols, perm, dynamic);
    // Two chunks per thread, each chunk's transposed working copy at most
    // ROW_CHUNK_BYTES (an 8B down projection's 4096 rows go 292 at a time).
    let per_task = rows
        .div_ceil(2 * rayon::current_num_threads())
        .min(rows_per_chunk(cols))
        .max(16);
    // Each chunk of rows is replaced by its quantized values in place (an 8B
    // layer is 235 MB) and writes its codes.
    let mut values = w;
    let mut codes = vec![0u8; rows * cols];
    let chunks: Vec<(Vec<Fixed>, usize)> = values
        .par_chunks_mut(per_task * cols)
        .zip(codes.par_chunks_mut(per_task * cols))
        .map(|(chunk, codes)| {
            run_rows(
                chunk, cols, grid, &layout, perm, u, importance, block_size, keep_zeros, codes,
            )
        })
        .collect();
    let mut fixed = Vec::with_capacity(rows * layout.members.len());
    let mut zeros_lost = 0;
    for (f, lost) in chunks {
        fixed.extend(f);
        zeros_lost += lost;
    }
    let n_groups = layout.members.len();
    let stored = match *grid {
        Grid::Int { .. } => {
            let (scales, zeros) = fixed
                .iter()
                .map(|f| match f {
                    Fixed::Int { scale, zero } => (*scale, *zero),
                    Fixed::Gguf(_) => unreachable!(),
                })
                .unzip();
            Stored::Int {
                codes,
                scales,
                zeros,
                g_idx: layout.group_of.iter().map(|&g| g as u32).collect(),
            }
        }
        Grid::Gguf(ty) => {
            let bb = ty.block_bytes();
            let mut bytes = vec![0u8; rows * n_groups * bb];
            bytes
                .par_chunks_mut(n_groups * bb)
                .zip(fixed.par_chunks(n_groups))
                .zip(codes.par_chunks(cols))
                .for_each(|((out, fixed), codes)| {
                    for (g, (out, f)) in out.chunks_mut(bb).zip(fixed).enumerate() {
                        let Fixed::Gguf(block) = f else {
                            unreachable!()
                        };
                        out.copy_from_slice(block);
                        let first = layout.members[g][0];
                        set_codes(ty, out, &codes[first..first + ty.block_elems()]);
                    }
                });
            Stored::Gguf(ty, bytes)
        }
    };
    (
        QuantizedMatrix {
            rows,
            cols,
            values,
            stored,
            tensor_scale: 1.0,
        },
        zeros_lost,
    )
}

/// GPTQ on one chunk of rows `w`, replaced by its quantized values (row-major,
/// natural column order; each weight is read, for the kept-zero rule, just
/// before it is overwritten): writes the codes and returns the fixed
/// parameters (`rows × groups`) and how many kept zeros the grid could not hold.
#[allow(clippy::too_many_arguments)]
fn run_rows(
    w: &mut [f32],
    cols: usize,
    grid: &Grid,
    layout: &Layout,
    perm: &[usize],
    u: Option<&UpperFactor>,
    importance: &[f32],
    block_size: usize,
    keep_zeros: bool,
    codes: &mut [u8],
) -> (Vec<Fixed>, usize) {
    let mut zeros_lost = 0;
    let m = w.len() / cols;
    let n_groups = layout.members.len();
    let mut pos_of = vec![0usize; cols];
    for (p, &c) in perm.iter().enumerate() {
        pos_of[c] = p;
    }
    // Columns as contiguous rows: wt[p·m + r] is row r's weight at position p.
    let mut wt = vec![0f32; cols * m];
    for r in 0..m {
        for (p, &c) in perm.iter().enumerate() {
            wt[p * m + r] = w[r * cols + c];
        }
    }
    let mut fixed: Vec<Option<Fixed>> = (0..m * n_groups).map(|_| None).collect();
    let mut levels: Vec<Vec<f32>> = vec![Vec::new(); m * n_groups];
    let mut group_done = vec![false; n_groups];
    let mut err = vec![0f32; block_size * m];
    let mut gathered = vec![0f32; 0];
    for i1 in (0..cols).step_by(block_size) {
        let i2 = (i1 + block_size).min(cols);
        for i in i1..i2 {
            let c = perm[i];
            let g = layout.group_of[c];
            if !group_done[g] {
                // The group's current values: positions inside this block are up
                // to date in `wt`; later ones still owe this block's updates so far.
                let members = &layout.members[g];
                gathered.resize(members.len() * m, 0.0);
                for (k, &mc) in members.iter().enumerate() {
                    let p = pos_of[mc];
                    for r in 0..m {
                        let mut v = wt[p * m + r];
                        if let (Some(u), true) = (u, p >= i2) {
                            for t in i1..i {
                                v -= u.get(t, p) * err[(t - i1) * m + r];
                            }
                        }
                        gathered[r * members.len() + k] = v;
                    }
                }
                let imp: Vec<f32> = members
                    .iter()
                    .map(|&mc| importance[mc].max(1e-12))
                    .collect();
                for r in 0..m {
                    let vals = &gathered[r * members.len()..(r + 1) * members.len()];
                    let (f, lv) = fix_group(grid, vals, &imp);
                    fixed[r * n_groups + g] = Some(f);
                    levels[r * n_groups + g] = lv;
                }
                group_done[g] = true;
            }
            let within = layout.members[g].partition_point(|&x| x < c);
            let s = within / layout.sub;
            let d = u.map_or(1.0, |u| u.get(i, i));
            for r in 0..m {
                let x = wt[i * m + r];
                let lv = &levels[r * n_groups + g][s * layout.n_codes..(s + 1) * layout.n_codes];
                let (code, q) = if keep_zeros && w[r * cols + c] == 0.0 {
                    match lv.iter().position(|&l| l == 0.0) {
                        Some(z) => (z as u8, 0.0),
                        None => {
                            zeros_lost += 1;
                            nearest(lv, 0.0)
                        }
                    }
                } else {
                    nearest(lv, x)
                };
                codes[r * cols + c] = code;
                w[r * cols + c] = q;
                err[(i - i1) * m + r] = (x - q) / d;
            }
            if let Some(u) = u {
                let (done, rest) = wt.split_at_mut((i + 1) * m);
                let _ = done;
                let e = &err[(i - i1) * m..(i - i1 + 1) * m];
                for j in i + 1..i2 {
                    let uij = u.get(i, j);
                    if uij != 0.0 {
                        for (x, &e) in rest[(j - i - 1) * m..(j - i) * m].iter_mut().zip(e) {
                            *x -= uij * e;
                        }
                    }
                }
            }
        }
        if let (Some(u), true) = (u, i2 < cols) {
            u.subtract_lazy_batch(i1, i2, &err[..(i2 - i1) * m], m, &mut wt[i2 * m..]);
        }
    }
    let fixed = fixed
        .into_iter()
        .map(|f| f.expect("every group is reached"))
        .collect();
    (fixed, zeros_lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible pseudo-random stream in [-0.5, 0.5).
    fn stream(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        }
    }

    /// Inputs with correlated columns (so feedback has something to exploit) and
    /// a weight matrix; returns (w, x, hessian).
    fn problem(rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rnd = stream(7);
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let base: Vec<f32> = (0..n * 4).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|k| {
                let (t, c) = (k / cols, k % cols);
                base[t * 4 + c % 4] * (1.0 + c as f32 * 0.05) + 0.3 * rnd()
            })
            .collect();
        let mut h = vec![0f64; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += 2.0 * (x[t * cols + i] * x[t * cols + j]) as f64 / n as f64;
                }
            }
        }
        (w, x, h.iter().map(|&v| v as f32).collect())
    }

    fn out_err(w: &[f32], q: &[f32], x: &[f32], cols: usize) -> f64 {
        let rows = w.len() / cols;
        let n = x.len() / cols;
        let mut s = 0f64;
        for r in 0..rows {
            for t in 0..n {
                let mut d = 0f64;
                for c in 0..cols {
                    d += ((w[r * cols + c] - q[r * cols + c]) * x[t * cols + c]) as f64;
                }
                s += d * d;
            }
        }
        s
    }

    #[test]
    fn gptq_beats_rtn_on_the_output_and_values_sit_on_the_grid() {
        let (rows, cols) = (24, 64);
        let (w, x, h) = problem(rows, cols, 256);
        for grid in [
            Grid::Int {
                bits: 4,
                group: 32,
                sym: true,
                clip: false,
            },
            Grid::Int {
                bits: 3,
                group: 64,
                sym: false,
                clip: false,
            },
            Grid::Int {
                bits: 4,
                group: 48,
                sym: true,
                clip: false,
            },
            Grid::Gguf(GgmlType::Q4_0),
            Grid::Gguf(GgmlType::IQ4_NL),
            Grid::Gguf(GgmlType::NVFP4),
            Grid::Gguf(GgmlType::MXFP4),
            Grid::Gguf(GgmlType::Q2_0),
        ] {
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    static_groups: act_order,
                    block_size: 16,
                    ..Default::default()
                };
                let (q, stats) = gptq(&w, cols, &h, &grid, &opts).unwrap();
                assert!(!stats.fell_back_to_rtn);
                let diag: Vec<f32> = (0..cols).map(|j| h[j * cols + j]).collect();
                let r = rtn(&w, cols, &grid, Some(&diag));
                let (eg, er) = (
                    out_err(&w, &q.values, &x, cols),
                    out_err(&w, &r.values, &x, cols),
                );
                assert!(
                    eg < 0.8 * er,
                    "{grid:?} act_order {act_order}: GPTQ {eg} vs RTN {er}"
                );
                // The stored form decodes to exactly the values GPTQ used.
                let decoded = match &q.stored {
                    Stored::Int {
                        codes,
                        scales,
                        zeros,
                        g_idx,
                    } => {
                        let ng = scales.len() / rows;
                        (0..rows * cols)
                            .map(|k| {
                                let (r, c) = (k / cols, k % cols);
                                let g = r * ng + g_idx[c] as usize;
                                scales[g].to_f32() * (codes[k] as f32 - zeros[g] as f32)
                            })
                            .collect::<Vec<f32>>()
                    }
                    Stored::Gguf(ty, bytes) => {
                        let mut v = vec![0f32; rows * cols];
                        kernels::quants::dequantize(*ty, bytes, &mut v).unwrap();
                        v
                    }
                };
                assert_eq!(decoded, q.values, "{grid:?}");
            }
        }
    }

    #[test]
    fn a_pruned_layers_zeros_stay_zero_where_the_grid_has_a_zero() {
        // 256 columns: every grid the README names fits (the K-quants' blocks
        // are 256 wide), so none is skipped.
        let (rows, cols) = (8, 256);
        let (mut w, _, h) = problem(rows, cols, 400);
        for (k, v) in w.iter_mut().enumerate() {
            if k % 4 < 2 {
                *v = 0.0;
            }
        }
        let opts = GptqOptions::default();
        for grid in [
            Grid::Int {
                bits: 4,
                group: 32,
                sym: true,
                clip: false,
            },
            Grid::Int {
                bits: 3,
                group: 64,
                sym: false,
                clip: true,
            },
            Grid::Gguf(GgmlType::Q4_0),
            Grid::Gguf(GgmlType::Q5_0),
            Grid::Gguf(GgmlType::Q8_0),
            Grid::Gguf(GgmlType::Q3_K),
            Grid::Gguf(GgmlType::Q6_K),
        ] {
            grid.check(cols, "w").unwrap();
            let (q, stats) = gptq(&w, cols, &h, &grid, &opts).unwrap();
            assert_eq!(stats.kept_zeros, rows * cols / 2, "{grid:?}");
            assert_eq!(stats.zeros_lost, 0, "{grid:?}");
            for (k, v) in q.values.iter().enumerate() {
                if k % 4 < 2 {
                    assert_eq!(*v, 0.0, "{grid:?} [{k}]");
                }
            }
        }
        // A dense layer is left to plain GPTQ.
        let (dense, _, h) = problem(rows, cols, 200);
        let (_, stats) = gptq(&dense, cols, &h, &Grid::Gguf(GgmlType::Q4_0), &opts).unwrap();
        assert_eq!(stats.kept_zeros, 0);
    }

    #[test]
    fn output_error_matches_the_direct_sum() {
        let (rows, cols) = (8, 32);
        let (w, x, h) = problem(rows, cols, 64);
        let q = rtn(
            &w,
            cols,
            &Grid::Int {
                bits: 2,
                group: 32,
                sym: true,
                clip: false,
            },
            None,
        );
        let via_h = output_error(&w, Some(&q.values), &h, cols) * 64.0 / 2.0;
        let direct = out_err(&w, &q.values, &x, cols);
        assert!(
            (via_h - direct).abs() < 1e-3 * direct,
            "{via_h} vs {direct}"
        );
    }

    #[test]
    fn dead_columns_are_zeroed_and_singular_hessians_are_damped() {
        let (rows, cols) = (4, 32);
        let (w, _, mut h) = problem(rows, cols, 64);
        for j in 0..cols {
            h[3 * cols + j] = 0.0;
            h[j * cols + 3] = 0.0;
        }
        let (q, stats) = gptq(
            &w,
            cols,
            &h,
            &Grid::Int {
                bits: 4,
                group: 32,
                sym: true,
                clip: false,
            },
            &GptqOptions::default(),
        )
        .unwrap();
        assert_eq!(stats.dead_columns, 1);
        assert!((0..rows).all(|r| q.values[r * cols + 3] == 0.0));
        // Rank one, asked for no dampening: factors only once dampening escalates.
        let v: Vec<f32> = (0..cols).map(|i| 1.0 + i as f32).collect();
        let h1: Vec<f32> = (0..cols * cols)
            .map(|k| v[k / cols] * v[k % cols])
            .collect();
        let opts = GptqOptions {
            damp_percent: 0.0,
            ..Default::default()
        };
        let (_, stats) = gptq(
            &w,
            cols,
            &h1,
            &Grid::Int {
                bits: 4,
                group: 32,
                sym: true,
                clip: false,
            },
            &opts,
        )
        .unwrap();
        assert!(
            !stats.fell_back_to_rtn && stats.damp_percent > 0.0,
            "{stats:?}"
        );
    }

    /// An all-zero weight, an all-zero Hessian (no token reached the layer)
    /// and a Hessian that never factors: on every grid the result is finite,
    /// zeros stay zeros, and nothing stored is NaN.
    #[test]
    fn all_zero_weights_and_hessians_give_finite_zeros() {
        let (rows, cols) = (4, 256);
        let zero_w = vec![0f32; rows * cols];
        let (w, _, h) = problem(rows, cols, 300);
        let zero_h = vec![0f32; cols * cols];
        let nan_h = vec![f32::NAN; cols * cols];
        let mut grids: Vec<Grid> = [
            (4, 128, true),
            (4, 128, false),
            (8, -1, true),
            (3, 64, false),
        ]
        .iter()
        .map(|&(bits, group, sym)| Grid::Int {
            bits,
            group: if group < 0 { cols } else { group as usize },
            sym,
            clip: true,
        })
        .collect();
        grids.extend(
            [
                GgmlType::Q4_0,
                GgmlType::Q4_K,
                GgmlType::Q2_K,
                GgmlType::Q6_K,
            ]
            .map(Grid::Gguf),
        );
        for grid in &grids {
            for (what, w, h) in [
                ("zero weights", &zero_w, &h),
                ("zero Hessian", &w, &zero_h),
                ("NaN Hessian", &w, &nan_h),
            ] {
                let (q, stats) = gptq(w, cols, h, grid, &GptqOptions::default()).unwrap();
                assert!(q.values.iter().all(|v| v.is_finite()), "{grid:?}, {what}");
                if let Stored::Int { scales, .. } = &q.stored {
                    assert!(scales.iter().all(|s| s.is_finite()), "{grid:?}, {what}");
                }
                if what == "zero weights" {
                    assert!(q.values.iter().all(|&v| v == 0.0), "{grid:?}");
                }
                if what == "zero Hessian" {
                    // Every input dead: GPTQ's rule zeroes the weights.
                    assert_eq!(stats.dead_columns, cols, "{grid:?}");
                }
                if what == "NaN Hessian" {
                    assert!(stats.fell_back_to_rtn, "{grid:?}: {stats:?}");
                }
            }
        }
    }

    #[test]
    fn nearest_handles_both_directions() {
        assert_eq!(nearest(&[0.0, 1.0, 2.0], 1.4), (1, 1.0));
        assert_eq!(nearest(&[0.0, 1.0, 2.0], 9.0), (2, 2.0));
        assert_eq!(nearest(&[2.0, 1.0, 0.0], 1.6), (0, 2.0));
        assert_eq!(nearest(&[2.0, 1.0, 0.0], -3.0), (2, 0.0));
        // NVFP4's table (doubled E2M1 times a scale of 0.5): not in value order.
        let fp4: Vec<f32> = kernels::quants::nvfp4::KVALUES_FP4
            .iter()
            .map(|&k| k as f32 * 0.5)
            .collect();
        assert_eq!(nearest(&fp4, -2.6), (13, -3.0));
        assert_eq!(nearest(&fp4, 0.1), (0, 0.0));
        assert_eq!(nearest(&fp4, 5.2), (7, 6.0));
        // A long monotone table (Q8_0's 256 codes) is binary-searched alike.
        let q8: Vec<f32> = (-128..128).map(|v| v as f32).collect();
        assert_eq!(nearest(&q8, 3.4), (131, 3.0));
    }
}
