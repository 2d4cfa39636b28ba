//! The Hessian math that GPTQ (quant) and SparseGPT (prune) both need: the
//! damped inverse `H + λ·mean(diag H)·I` factored as `upper(H⁻¹)` by Cholesky
//! (faer), the dampening raised until it factors; and the output error a weight
//! change causes on the calibration inputs.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use kernels::matmul::{gemm, MatRef};
use rayon::prelude::*;

/// How a Hessian is factored.
#[derive(Debug, Clone, Copy)]
pub struct FactorOptions {
    /// Dampening: this fraction of the mean of `diag H` is added to the diagonal
    /// (raised by 0.0025 at a time, up to 1, while the Cholesky factorisation fails).
    pub damp_percent: f64,
    /// Order the columns by descending `diag H` (GPTQ's act-order).
    pub act_order: bool,
}

impl Default for FactorOptions {
    fn default() -> Self {
        FactorOptions {
            damp_percent: 0.01,
            act_order: false,
        }
    }
}

/// `upper(H⁻¹)`: the upper Cholesky factor of the inverse of `h` (n × n) plus
/// `damp` on the diagonal, in f32; `None` if either factorisation fails.
fn inverse_cholesky_upper(
    h: &dyn Fn(usize, usize) -> f64,
    n: usize,
    damp: f64,
) -> Option<Vec<f32>> {
    // Scoped so that each n² intermediate is freed as soon as the next exists
    // (an 8B model's 14336-wide Hessian is 1.6 GB per copy).
    let inv = {
        let m = Mat::<f64>::from_fn(n, n, |i, j| h(i, j) + if i == j { damp } else { 0.0 });
        let llt = m.llt(Side::Lower).ok()?;
        drop(m);
        llt.inverse()
    };
    let llt = inv.llt(Side::Lower).ok()?;
    drop(inv);
    let l = llt.L();
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l[(j, i)] as f32;
        }
    }
    if u.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(u)
}

/// A Hessian made ready for GPTQ and SparseGPT: dead inputs marked, columns
/// ordered, and the upper Cholesky factor of the damped inverse. Layers sharing
/// an input share one.
pub struct Factored {
    cols: usize,
    dead: Vec<usize>,
    perm: Vec<usize>,
    diag: Vec<f32>,
    u: Option<Vec<f32>>,
    damp: f64,
    seconds: f64,
}

impl Factored {
    /// Factors `h` (`cols × cols`, `2XᵀX/n`) for `opts`' column order and dampening.
    pub fn new(h: &[f64], cols: usize, opts: &FactorOptions) -> Self {
        assert_eq!(h.len(), cols * cols, "Hessian size");
        let start = std::time::Instant::now();
        // Dead inputs: no information, so their weights are zeroed and the
        // diagonal set to 1 (as the reference does) to keep H invertible.
        let dead: Vec<usize> = (0..cols).filter(|&j| h[j * cols + j] == 0.0).collect();
        let diag: Vec<f64> = (0..cols)
            .map(|j| match h[j * cols + j] {
                0.0 => 1.0,
                d => d,
            })
            .collect();
        let perm: Vec<usize> = if opts.act_order {
            let mut p: Vec<usize> = (0..cols).collect();
            p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
            p
        } else {
            (0..cols).collect()
        };
        // H in `perm` order with the dead inputs' diagonal set, read straight
        // from `h` (no permuted copy: an 8B model's down projection's is 1.6 GB).
        let hp = |a: usize, b: usize| {
            let (i, j) = (perm[a], perm[b]);
            if i == j {
                diag[i]
            } else {
                h[i * cols + j]
            }
        };
        // Summed in `perm` order, as before this read `h` in place: same bits.
        let mean_diag = perm.iter().map(|&i| diag[i]).sum::<f64>() / cols as f64;
        let mut damp = opts.damp_percent;
        let mut u = None;
        while damp <= 1.0 + 1e-9 {
            u = inverse_cholesky_upper(&hp, cols, damp * mean_diag);
            if u.is_some() {
                break;
            }
            damp += 0.0025;
        }
        Factored {
            cols,
            dead,
            perm,
            diag: diag.iter().map(|&d| d as f32).collect(),
            damp: if u.is_some() { damp } else { 0.0 },
            u,
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// Seconds the factorisation took.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// The upper Cholesky factor of the damped inverse Hessian (`cols × cols`,
    /// row-major, in the processing order: natural unless act-order), or `None`
    /// when the Hessian stayed singular.
    pub fn upper(&self) -> Option<&[f32]> {
        self.u.as_deref()
    }

    /// Input features that were never active.
    pub fn dead(&self) -> &[usize] {
        &self.dead
    }

    /// The dampening fraction that let it factor (0 when it did not).
    pub fn damp_percent(&self) -> f64 {
        self.damp
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The processing order of the columns (natural unless act-order).
    pub fn order(&self) -> &[usize] {
        &self.perm
    }

    /// `diag H` in natural column order, dead inputs set to 1.
    pub fn diagonal(&self) -> &[f32] {
        &self.diag
    }
}

/// `Σ_rows (a − b) H (a − b)ᵀ`: the summed squared output error of replacing
/// weights `a` by `b` on inputs with Hessian `h` (f32, `cols × cols`), up to the
/// factor `n / 2`. With `b = 0` it is the output energy.
pub fn output_error(a: &[f32], b: Option<&[f32]>, h: &[f32], cols: usize) -> f64 {
    let rows = a.len() / cols;
    let per_task = rows.div_ceil(2 * rayon::current_num_threads()).max(8);
    (0..rows)
        .collect::<Vec<_>>()
        .par_chunks(per_task)
        .map(|rs| {
            let (r0, n) = (rs[0], rs.len());
            let diff: Vec<f32> = match b {
                Some(b) => a[r0 * cols..(r0 + n) * cols]
                    .iter()
                    .zip(&b[r0 * cols..(r0 + n) * cols])
                    .map(|(x, y)| x - y)
                    .collect(),
                None => a[r0 * cols..(r0 + n) * cols].to_vec(),
            };
            let mut dh = vec![0f32; n * cols];
            gemm(
                MatRef::row_major(&diff, n, cols, cols),
                MatRef::row_major(h, cols, cols, cols),
                &mut dh,
                cols,
                false,
            );
            diff.iter()
                .zip(&dh)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>()
        })
        // Collected, then summed in order: the same bits on every run.
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}
