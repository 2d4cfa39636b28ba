//! The Hessian math that GPTQ (quant) and SparseGPT (prune) both need: the
//! damped inverse `H + λ·mean(diag H)·I` factored as `upper(H⁻¹)` by Cholesky
//! (faer), the dampening raised until it factors; and the output error a weight
//! change causes on the calibration inputs.

use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Mat, MatMut};
use kernels::matmul::{gemm, MatRef};
use rayon::prelude::*;
use std::borrow::Cow;

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
/// `damp` on the diagonal, in f32 (as the GPTQ reference computes it); `None`
/// if the factorisation fails.
///
/// `H⁻¹ = UᵀU` with `U = J·L⁻¹·J`, where `J` reverses the order of rows and
/// columns and `L` is the lower Cholesky factor of `J·H·J`: one Cholesky and one
/// triangular inverse, both in place in the one `n²` buffer that becomes `U`
/// (an 8B model's 14336-wide Hessian is 0.8 GB per copy; the textbook route
/// through `H⁻¹` needs three), then packed to its upper triangle.
fn inverse_cholesky_upper(
    h: &(dyn Fn(usize, usize) -> f32 + Sync),
    n: usize,
    damp: f64,
) -> Option<UpperFactor> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
    let par = faer::get_global_parallelism();
    let damp = damp as f32;
    // Column-major `J·H·J`: column j holds H's row n-1-j reversed.
    let mut w = vec![0f32; n * n];
    w.par_chunks_mut(n.max(1)).enumerate().for_each(|(j, col)| {
        for (i, v) in col.iter_mut().enumerate() {
            *v = h(n - 1 - i, n - 1 - j) + if i == j { damp } else { 0.0 };
        }
    });
    {
        let mut a = MatMut::from_column_major_slice_mut(&mut w, n, n);
        let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
        cholesky_in_place(
            a.rb_mut(),
            Default::default(),
            par,
            MemStack::new(&mut mem),
            Default::default(),
        )
        .ok()?;
        invert_lower_in_place(a, par);
    }
    // Row-major U: U(i, j) = L⁻¹(n-1-i, n-1-j), stored column-major at
    // (n-1-j)·n + (n-1-i); the map is its own inverse, so pairs are swapped.
    for i in 0..n {
        for j in 0..n {
            let (k, m) = (i * n + j, (n - 1 - j) * n + (n - 1 - i));
            if k < m {
                w.swap(k, m);
            }
        }
    }
    if w.chunks(n.max(1))
        .enumerate()
        .any(|(i, row)| row[i..].iter().any(|v| !v.is_finite()))
    {
        return None;
    }
    Some(UpperFactor::from_dense(w, n))
}

/// Rows per block of an [`UpperFactor`].
pub const FACTOR_BLOCK: usize = 128;

/// An upper triangular `n × n` matrix (GPTQ's and SparseGPT's `U`) stored by
/// blocks of [`FACTOR_BLOCK`] rows, each row of block `b` holding columns
/// `b·FACTOR_BLOCK..n` row-major: about half of `n²` (an 8B model's down
/// projection's is 0.4 GB rather than 0.8), and every block a plain strided
/// matrix for the lazy-batch GEMM.
pub struct UpperFactor {
    n: usize,
    data: Vec<f32>,
}

impl UpperFactor {
    /// Packs `dense` (`n × n`, row-major, upper triangular; what is below the
    /// diagonal is ignored) in place and gives the freed part back.
    pub fn from_dense(mut dense: Vec<f32>, n: usize) -> Self {
        assert_eq!(dense.len(), n * n, "UpperFactor: not n × n");
        // Each row moves to a lower offset than it had (packed offsets never
        // exceed dense ones), so rows are moved in order, in place.
        for t in 0..n {
            let start = Self::block_start(t);
            let dest = Self::offset(n, t / FACTOR_BLOCK) + (t - start) * (n - start);
            dense.copy_within(t * n + start..(t + 1) * n, dest);
            dense[dest..dest + t - start].fill(0.0);
        }
        // The last block: its rows times its columns (as many as its rows).
        let last = n.saturating_sub(1) / FACTOR_BLOCK;
        let tail = n - last * FACTOR_BLOCK;
        dense.truncate(Self::offset(n, last) + tail * tail);
        dense.shrink_to_fit();
        UpperFactor { n, data: dense }
    }

    /// The first column a row stores: its block's first row.
    fn block_start(t: usize) -> usize {
        t / FACTOR_BLOCK * FACTOR_BLOCK
    }

    /// Where block `b` starts: the full blocks before it, `FACTOR_BLOCK` rows of
    /// `n − k·FACTOR_BLOCK` each.
    fn offset(n: usize, b: usize) -> usize {
        let k = FACTOR_BLOCK;
        b * k * n - k * k * b * b.saturating_sub(1) / 2
    }

    /// Its order.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Where `U[t, c]` is stored (`c` at least the first column of `t`'s block).
    fn index(&self, t: usize, c: usize) -> usize {
        let (n, start) = (self.n, Self::block_start(t));
        debug_assert!(c >= start && c <= n);
        Self::offset(n, t / FACTOR_BLOCK) + (t - start) * (n - start) + c - start
    }

    /// Row `t` from column `c` on (`c` at least the first column of `t`'s block).
    pub fn row_from(&self, t: usize, c: usize) -> &[f32] {
        &self.data[self.index(t, c)..self.index(t, self.n)]
    }

    /// `U[t, c]` (zero below the diagonal).
    pub fn get(&self, t: usize, c: usize) -> f32 {
        if c < t {
            0.0
        } else {
            self.row_from(t, c)[0]
        }
    }

    /// The lazy batch of GPTQ and SparseGPT: `W[i2.., :] −= U[i1..i2, i2..]ᵀ · E`
    /// with `E` the block's errors (`(i2 − i1) × m`, row-major) and `W`'s rows
    /// from `i2` on in `after` (`(n − i2) × m`, row-major); one GEMM per block of
    /// rows the range covers.
    pub fn subtract_lazy_batch(
        &self,
        i1: usize,
        i2: usize,
        err: &[f32],
        m: usize,
        after: &mut [f32],
    ) {
        use kernels::matmul::{gemm, MatRef};
        let n = self.n;
        let mut t = i1;
        while t < i2 {
            let end = (Self::block_start(t) + FACTOR_BLOCK).min(i2);
            let stride = n - Self::block_start(t);
            let neg: Vec<f32> = err[(t - i1) * m..(end - i1) * m]
                .iter()
                .map(|e| -e)
                .collect();
            gemm(
                MatRef::row_major(&self.data[self.index(t, i2)..], end - t, n - i2, stride).t(),
                MatRef::row_major(&neg, end - t, m, m),
                after,
                m,
                true,
            );
            t = end;
        }
    }
}

/// Replaces the lower triangle of `a` (lower triangular, non-singular) by that
/// of its inverse, block column by block column from the last (LAPACK's
/// `trtri`): with `a = [[D, 0], [B, T]]` and `T⁻¹` already in place,
/// `B ← −T⁻¹·B·D⁻¹`, then `D ← D⁻¹`. Needs one panel of scratch, not a
/// second matrix. The strict upper triangle is neither read nor written.
fn invert_lower_in_place(mut a: MatMut<'_, f32>, par: faer::Par) {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    use faer::linalg::triangular_inverse::invert_lower_triangular;
    use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
    use faer::Accum;
    const BLOCK: usize = 128;
    let n = a.nrows();
    for j in (0..n).step_by(BLOCK).rev() {
        let jb = BLOCK.min(n - j);
        let r = j + jb;
        let (top, bottom) = a.rb_mut().split_at_row_mut(r);
        if r < n {
            let (left, inverted) = bottom.split_at_col_mut(r);
            let mut panel = left.subcols_mut(j, jb);
            let mut product = Mat::<f32>::zeros(n - r, jb);
            matmul(
                product.as_mut(),
                BlockStructure::Rectangular,
                Accum::Replace,
                inverted.rb(),
                BlockStructure::TriangularLower,
                panel.rb(),
                BlockStructure::Rectangular,
                -1.0,
                par,
            );
            panel.copy_from(&product);
            // panel · D⁻¹: solve X·D = panel as Dᵀ·Xᵀ = panelᵀ.
            let d = top.rb().submatrix(j, j, jb, jb);
            solve_upper_triangular_in_place(d.transpose(), panel.transpose_mut(), par);
        }
        let mut d = top.submatrix_mut(j, j, jb, jb);
        let mut inverse = Mat::<f32>::zeros(jb, jb);
        invert_lower_triangular(inverse.as_mut(), d.rb(), par);
        for c in 0..jb {
            for i in c..jb {
                d[(i, c)] = inverse[(i, c)];
            }
        }
    }
}

/// A Hessian made ready for GPTQ and SparseGPT: dead inputs marked, columns
/// ordered, and the upper Cholesky factor of the damped inverse. Layers sharing
/// an input share one.
pub struct Factored {
    cols: usize,
    dead: Vec<usize>,
    perm: Vec<usize>,
    diag: Vec<f32>,
    u: Option<UpperFactor>,
    damp: f64,
    seconds: f64,
}

impl Factored {
    /// Factors `h` (`cols × cols`, `2XᵀX/n`) for `opts`' column order and dampening.
    pub fn new(h: &[f32], cols: usize, opts: &FactorOptions) -> Self {
        assert_eq!(h.len(), cols * cols, "Hessian size");
        let start = std::time::Instant::now();
        // Dead inputs: no information, so their weights are zeroed and the
        // diagonal set to 1 (as the reference does) to keep H invertible.
        let dead: Vec<usize> = (0..cols).filter(|&j| h[j * cols + j] == 0.0).collect();
        let diag: Vec<f32> = (0..cols)
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
        // from `h` (no permuted copy).
        let hp = |a: usize, b: usize| {
            let (i, j) = (perm[a], perm[b]);
            if i == j {
                diag[i]
            } else {
                h[i * cols + j]
            }
        };
        let mean_diag = perm.iter().map(|&i| diag[i] as f64).sum::<f64>() / cols as f64;
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
            diag,
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
    /// in the processing order: natural unless act-order), or `None` when the
    /// Hessian stayed singular.
    pub fn upper(&self) -> Option<&UpperFactor> {
        self.u.as_ref()
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
    output_error_of_rows(
        &|r0, n| Ok(Cow::Borrowed(&a[r0 * cols..(r0 + n) * cols])),
        rows,
        b,
        h,
        cols,
    )
    .expect("rows of a slice")
}

/// [`output_error`] with `a`'s rows made on demand by `a_rows(first, count)`
/// (decoded from a stored tensor, say, rather than held whole beside `b`).
pub fn output_error_of_rows<'a>(
    a_rows: &(dyn Fn(usize, usize) -> anyhow::Result<Cow<'a, [f32]>> + Sync),
    rows: usize,
    b: Option<&[f32]>,
    h: &[f32],
    cols: usize,
) -> anyhow::Result<f64> {
    let per_task = rows.div_ceil(2 * rayon::current_num_threads()).max(8);
    let parts = (0..rows)
        .collect::<Vec<_>>()
        .par_chunks(per_task)
        .map(|rs| {
            let (r0, n) = (rs[0], rs.len());
            let a = a_rows(r0, n)?;
            let diff: Vec<f32> = match b {
                Some(b) => a
                    .iter()
                    .zip(&b[r0 * cols..(r0 + n) * cols])
                    .map(|(x, y)| x - y)
                    .collect(),
                None => a.into_owned(),
            };
            let mut dh = vec![0f32; n * cols];
            gemm(
                MatRef::row_major(&diff, n, cols, cols),
                MatRef::row_major(h, cols, cols, cols),
                &mut dh,
                cols,
                false,
            );
            Ok(diff
                .iter()
                .zip(&dh)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>())
        })
        // Collected, then summed in order: the same bits on every run.
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(parts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Hessian of correlated inputs (`2XᵀX/n`, f32) of `n` columns.
    fn hessian(n: usize, tokens: usize) -> Vec<f32> {
        let mut s = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        };
        let x: Vec<f64> = (0..tokens * n)
            .map(|k| {
                let j = k % n;
                (1.0 + j as f64 / n as f64) * next() + 0.5 * next()
            })
            .collect();
        let mut h = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..tokens).map(|t| x[t * n + i] * x[t * n + j]).sum();
                h[i * n + j] = (2.0 * v / tokens as f64) as f32;
            }
        }
        h
    }

    /// `max |UᵀU·A − I|` with `A` the damped Hessian in processing order.
    fn residual(f: &Factored, h: &[f32]) -> f64 {
        let n = f.cols();
        let u = f.upper().expect("factored");
        let (p, diag) = (f.order(), f.diagonal());
        let mean = diag.iter().map(|&d| d as f64).sum::<f64>() / n as f64;
        let a = |i: usize, j: usize| {
            let v = if i == j {
                diag[p[i]] as f64
            } else {
                h[p[i] * n + p[j]] as f64
            };
            v + if i == j { f.damp_percent() * mean } else { 0.0 }
        };
        // Hinv = UᵀU, then Hinv·A.
        let mut hinv = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                hinv[i * n + j] = (0..=i.min(j))
                    .map(|k| u.get(k, i) as f64 * u.get(k, j) as f64)
                    .sum();
            }
        }
        let mut worst = 0f64;
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|k| hinv[i * n + k] * a(k, j)).sum();
                worst = worst.max((v - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    #[test]
    fn upper_factor_of_the_damped_inverse_across_blocks() {
        // 300 columns: two full 128-column blocks of the in-place inverse and
        // a partial one; natural and act-order.
        let n = 300;
        let h = hessian(n, 500);
        for act_order in [false, true] {
            let f = Factored::new(
                &h,
                n,
                &FactorOptions {
                    act_order,
                    ..Default::default()
                },
            );
            let u = f.upper().unwrap();
            for i in 0..n {
                assert!(u.get(i, i) > 0.0);
                let start = i / FACTOR_BLOCK * FACTOR_BLOCK;
                assert!(u.row_from(i, start)[..i - start].iter().all(|&v| v == 0.0));
            }
            assert_eq!(f.damp_percent(), 0.01);
            let r = residual(&f, &h);
            assert!(r < 1e-3, "act_order {act_order}: |UᵀU·H − I| = {r}");
        }
    }

    #[test]
    fn packed_factor_reads_and_multiplies_like_the_dense_one() {
        let n = 300;
        let dense: Vec<f32> = (0..n * n)
            .map(|k| {
                if k % n >= k / n {
                    ((k * 7919) % 1000) as f32 / 500.0 - 1.0
                } else {
                    9.0
                }
            })
            .collect();
        let u = UpperFactor::from_dense(dense.clone(), n);
        assert_eq!(u.data.len(), 128 * 300 + 128 * 172 + 44 * 44);
        for t in 0..n {
            for c in 0..n {
                let want = if c >= t { dense[t * n + c] } else { 0.0 };
                assert_eq!(u.get(t, c), want, "({t}, {c})");
            }
        }
        // A lazy batch spanning two blocks of rows (100..200) against the dense product.
        let (i1, i2, m) = (100, 200, 3);
        let err: Vec<f32> = (0..(i2 - i1) * m).map(|k| (k % 13) as f32 - 6.0).collect();
        let mut after = vec![1f32; (n - i2) * m];
        u.subtract_lazy_batch(i1, i2, &err, m, &mut after);
        for j in i2..n {
            for r in 0..m {
                let want: f64 = 1.0
                    - (i1..i2)
                        .map(|t| dense[t * n + j] as f64 * err[(t - i1) * m + r] as f64)
                        .sum::<f64>();
                let got = after[(j - i2) * m + r] as f64;
                assert!((got - want).abs() < 1e-3, "({j}, {r}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn singular_hessians_escalate_dampening_and_nan_never_factors() {
        let n = 40;
        // Rank one: factors only once the dampening is raised.
        let v: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let rank_one: Vec<f32> = (0..n * n).map(|k| v[k / n] * v[k % n]).collect();
        let f = Factored::new(
            &rank_one,
            n,
            &FactorOptions {
                damp_percent: 0.0,
                ..Default::default()
            },
        );
        assert!(f.upper().is_some() && f.damp_percent() > 0.0);
        assert!(residual(&f, &rank_one) < 1e-2);
        let nan = vec![f32::NAN; n * n];
        let f = Factored::new(&nan, n, &FactorOptions::default());
        assert!(f.upper().is_none() && f.damp_percent() == 0.0);
        // A dead input (zero row and column) is marked and kept invertible.
        let mut dead = hessian(n, 80);
        for j in 0..n {
            dead[7 * n + j] = 0.0;
            dead[j * n + 7] = 0.0;
        }
        let f = Factored::new(&dead, n, &FactorOptions::default());
        assert_eq!(f.dead(), [7]);
        assert!(residual(&f, &dead) < 1e-3);
    }
}
