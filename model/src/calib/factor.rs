//! The Hessian math that GPTQ (quant) and SparseGPT (prune) both need: the
//! damped inverse `H + λ·mean(diag H)·I` factored as `upper(H⁻¹)` by Cholesky
//! (faer), the dampening raised until it factors; and the output error a weight
//! change causes on the calibration inputs.
//!
//! Memory: a layer's Hessian and its factor share one `n²` f32 buffer (the
//! Hessian's own): the factor is built in the lower triangle while the strict
//! upper triangle keeps the Hessian, which the output errors of the report
//! read. For an 8B model's 14336-wide down projection that is 0.8 GB in all,
//! where a separate factor would add 0.4 GB (and 0.8 GB while it is computed).

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

/// Rows and columns of the diagonal tiles whose strict upper triangle faer's
/// in-place Cholesky may write (its SIMD leaves, 4 vectors wide: 32 columns
/// with AVX2, 64 with AVX-512, inside recursion blocks of at most 128 aligned
/// to their size); a test holds it to this.
const CHOLESKY_TILE: usize = 128;

/// Replaces the lower triangle of `w` (column-major `n × n`, holding `J·H·J`
/// below and on the diagonal, `J` the order reversal) by `L⁻¹`, `L` the lower
/// Cholesky factor of `J·H·J + diag`: one Cholesky and one triangular
/// inverse, both in place. `diag` is the diagonal to use (the damped one), in
/// `J`'s order. Returns false when the factorisation fails or gives a
/// non-finite value; the lower triangle is then garbage. The strict upper
/// triangle outside the diagonal tiles is neither read nor written; inside
/// them the caller saves and restores it ([`save_tiles`]).
fn inverse_cholesky_lower_in_place(w: &mut [f32], n: usize, diag: &[f32]) -> bool {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
    let par = faer::get_global_parallelism();
    for (i, &d) in diag.iter().enumerate() {
        w[i * n + i] = d;
    }
    let mut a = MatMut::from_column_major_slice_mut(w, n, n);
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
    if cholesky_in_place(
        a.rb_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .is_err()
    {
        return false;
    }
    invert_lower_in_place(a, par);
    w.par_chunks(n.max(1))
        .enumerate()
        .all(|(j, col)| col[j..].iter().all(|v| v.is_finite()))
}

/// The strict upper triangles of the diagonal [`CHOLESKY_TILE`] tiles of the
/// column-major `w`, column by column.
fn save_tiles(w: &[f32], n: usize) -> Vec<f32> {
    let mut saved = Vec::with_capacity(n * CHOLESKY_TILE / 2);
    for j in 0..n {
        let start = j / CHOLESKY_TILE * CHOLESKY_TILE;
        saved.extend_from_slice(&w[j * n + start..j * n + j]);
    }
    saved
}

/// Puts back what [`save_tiles`] saved.
fn restore_tiles(w: &mut [f32], n: usize, saved: &[f32]) {
    let mut at = 0;
    for j in 0..n {
        let start = j / CHOLESKY_TILE * CHOLESKY_TILE;
        w[j * n + start..j * n + j].copy_from_slice(&saved[at..at + j - start]);
        at += j - start;
    }
}

/// Copies the strict upper triangle of the square `w` onto its strict lower
/// triangle (the symmetric matrix again, after a failed factorisation).
fn mirror_upper_to_lower(w: &mut [f32], n: usize) {
    for j in 0..n {
        for i in j + 1..n {
            w[j * n + i] = w[i * n + j];
        }
    }
}

/// Permutes the rows and columns of the symmetric row-major `h` (`n × n`) in
/// place: afterwards `h[p][q]` is the former `h[perm[p]][perm[q]]`.
fn permute_symmetric(h: &mut [f32], n: usize, perm: &[usize]) {
    // Rows, cycle by cycle through one spare row.
    let mut done = vec![false; n];
    let mut spare = vec![0f32; n];
    for s in 0..n {
        if done[s] || perm[s] == s {
            continue;
        }
        spare.copy_from_slice(&h[s * n..(s + 1) * n]);
        let mut p = s;
        loop {
            done[p] = true;
            let q = perm[p];
            if q == s {
                h[p * n..(p + 1) * n].copy_from_slice(&spare);
                break;
            }
            h.copy_within(q * n..(q + 1) * n, p * n);
            p = q;
        }
    }
    // Then the columns of every row.
    h.par_chunks_mut(n.max(1)).for_each_init(
        || vec![0f32; n],
        |spare, row| {
            spare.copy_from_slice(row);
            for (v, &q) in row.iter_mut().zip(perm) {
                *v = spare[q];
            }
        },
    );
}

/// An upper triangular `n × n` matrix (GPTQ's and SparseGPT's `U`, the upper
/// Cholesky factor of the damped inverse Hessian) held transposed in the lower
/// triangle (diagonal included) of a row-major `n × n` buffer: `U[t, c]` is at
/// `c·n + t`. The strict upper triangle holds the Hessian it came from (see
/// [`Factored`]). The rows of `Uᵀ` below a lazy batch are a plain strided
/// matrix for its GEMM.
pub struct UpperFactor {
    n: usize,
    data: Vec<f32>,
}

impl UpperFactor {
    /// Takes `dense` (`n × n`, row-major, upper triangular; what is below the
    /// diagonal is ignored) and transposes it in place.
    pub fn from_dense(mut dense: Vec<f32>, n: usize) -> Self {
        assert_eq!(dense.len(), n * n, "UpperFactor: not n × n");
        for i in 0..n {
            for j in i + 1..n {
                dense.swap(i * n + j, j * n + i);
            }
        }
        UpperFactor { n, data: dense }
    }

    /// Its order.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `U[t, c]` (zero below the diagonal).
    pub fn get(&self, t: usize, c: usize) -> f32 {
        if c < t {
            0.0
        } else {
            self.data[c * self.n + t]
        }
    }

    /// The lazy batch of GPTQ and SparseGPT: `W[i2.., :] −= U[i1..i2, i2..]ᵀ · E`
    /// with `E` the block's errors (`(i2 − i1) × m`, row-major) and `W`'s rows
    /// from `i2` on in `after` (`(n − i2) × m`, row-major): one GEMM, `Uᵀ`'s
    /// rows `i2..` and columns `i1..i2` read where they lie.
    pub fn subtract_lazy_batch(
        &self,
        i1: usize,
        i2: usize,
        err: &[f32],
        m: usize,
        after: &mut [f32],
    ) {
        let n = self.n;
        if i2 >= n {
            return;
        }
        let neg: Vec<f32> = err[..(i2 - i1) * m].iter().map(|e| -e).collect();
        gemm(
            MatRef::row_major(&self.data[i2 * n + i1..], n - i2, i2 - i1, n),
            MatRef::row_major(&neg, i2 - i1, m, m),
            after,
            m,
            true,
        );
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
/// an input share one. It owns the Hessian: the factor is built in the
/// Hessian's buffer, whose strict upper triangle keeps the Hessian (in the
/// processing order) for [`output_error`].
pub struct Factored {
    cols: usize,
    dead: Vec<usize>,
    perm: Vec<usize>,
    diag: Vec<f32>,
    /// `diag H` as accumulated (dead inputs 0), in the processing order.
    hessian_diag: Vec<f32>,
    buffer: UpperFactor,
    factored: bool,
    damp: f64,
    seconds: f64,
}

impl Factored {
    /// Factors `h` (`cols × cols`, `2XᵀX/n`, row-major) for `opts`' column order
    /// and dampening, in `h`'s own buffer.
    pub fn new(h: Vec<f32>, cols: usize, opts: &FactorOptions) -> Self {
        assert_eq!(h.len(), cols * cols, "Hessian size");
        let n = cols;
        let start = std::time::Instant::now();
        // Dead inputs: no information, so their weights are zeroed and the
        // diagonal set to 1 (as the reference does) to keep H invertible.
        let dead: Vec<usize> = (0..n).filter(|&j| h[j * n + j] == 0.0).collect();
        let diag: Vec<f32> = (0..n)
            .map(|j| match h[j * n + j] {
                0.0 => 1.0,
                d => d,
            })
            .collect();
        let perm: Vec<usize> = if opts.act_order {
            let mut p: Vec<usize> = (0..n).collect();
            p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
            p
        } else {
            (0..n).collect()
        };
        let hessian_diag: Vec<f32> = perm.iter().map(|&i| h[i * n + i]).collect();
        let mut w = h;
        if opts.act_order {
            permute_symmetric(&mut w, n, &perm);
        }
        // Column-major `J·H·J` of the symmetric H is H's buffer reversed.
        w.reverse();
        let tiles = save_tiles(&w, n);
        let mean_diag = perm.iter().map(|&i| diag[i] as f64).sum::<f64>() / n.max(1) as f64;
        let mut damp = opts.damp_percent;
        let mut factored = false;
        while damp <= 1.0 + 1e-9 {
            let lambda = (damp * mean_diag) as f32;
            let damped: Vec<f32> = perm.iter().rev().map(|&i| diag[i] + lambda).collect();
            factored = inverse_cholesky_lower_in_place(&mut w, n, &damped);
            restore_tiles(&mut w, n, &tiles);
            if factored {
                break;
            }
            mirror_upper_to_lower(&mut w, n);
            damp += 0.0025;
        }
        // Row-major again: `L⁻¹(n-1-i, n-1-j)` is `U(i, j)`, which lands at
        // `j·n + i` (the lower triangle holds `Uᵀ`), and the strict upper
        // triangle holds H in the processing order.
        w.reverse();
        Factored {
            cols,
            dead,
            perm,
            diag,
            hessian_diag,
            buffer: UpperFactor { n, data: w },
            factored,
            damp: if factored { damp } else { 0.0 },
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
        self.factored.then_some(&self.buffer)
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

    /// `Σ_rows d H dᵀ` for the rows of `d` (row-major, natural column order),
    /// from the Hessian kept in the strict upper triangle: `2·d·triu(H, 1)·dᵀ`
    /// plus the diagonal's part (the factor in the lower triangle is not read).
    fn quadratic_form(&self, d: &[f32]) -> f64 {
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        let n = self.cols;
        let m = d.len() / n.max(1);
        if m == 0 || n == 0 {
            return 0.0;
        }
        let natural = self.perm.iter().enumerate().all(|(p, &c)| p == c);
        let dp: Cow<[f32]> = if natural {
            Cow::Borrowed(d)
        } else {
            Cow::Owned(
                d.chunks(n)
                    .flat_map(|row| self.perm.iter().map(move |&c| row[c]))
                    .collect(),
            )
        };
        let mut product = vec![0f32; m * n];
        matmul(
            MatMut::from_row_major_slice_mut(&mut product, m, n),
            BlockStructure::Rectangular,
            faer::Accum::Replace,
            faer::MatRef::from_row_major_slice(&dp, m, n),
            BlockStructure::Rectangular,
            faer::MatRef::from_row_major_slice(&self.buffer.data, n, n),
            BlockStructure::StrictTriangularUpper,
            1.0,
            faer::Par::Seq,
        );
        dp.chunks(n)
            .zip(product.chunks(n))
            .map(|(x, y)| {
                x.iter()
                    .zip(y)
                    .zip(&self.hessian_diag)
                    .map(|((&x, &y), &h)| x as f64 * (2.0 * y as f64 + h as f64 * x as f64))
                    .sum::<f64>()
            })
            .sum()
    }
}

/// Where an output error reads a Hessian from.
#[derive(Clone, Copy)]
pub enum HessianRef<'a> {
    /// `cols × cols`, row-major.
    Dense(&'a [f32]),
    /// The Hessian a [`Factored`] keeps beside its factor.
    Factored(&'a Factored),
}

impl<'a> From<&'a [f32]> for HessianRef<'a> {
    fn from(h: &'a [f32]) -> Self {
        HessianRef::Dense(h)
    }
}

impl<'a> From<&'a Vec<f32>> for HessianRef<'a> {
    fn from(h: &'a Vec<f32>) -> Self {
        HessianRef::Dense(h)
    }
}

impl<'a> From<&'a Factored> for HessianRef<'a> {
    fn from(f: &'a Factored) -> Self {
        HessianRef::Factored(f)
    }
}

/// `Σ_rows (a − b) H (a − b)ᵀ`: the summed squared output error of replacing
/// weights `a` by `b` on inputs with Hessian `h` (f32, `cols × cols`), up to the
/// factor `n / 2`. With `b = 0` it is the output energy.
pub fn output_error<'h>(
    a: &[f32],
    b: Option<&[f32]>,
    h: impl Into<HessianRef<'h>>,
    cols: usize,
) -> f64 {
    let rows = a.len() / cols;
    output_error_of_rows(
        &|r0, n| Ok(Cow::Borrowed(&a[r0 * cols..(r0 + n) * cols])),
        rows,
        b,
        h.into(),
        cols,
    )
    .expect("rows of a slice")
}

/// Bytes of f32 rows a pass over a large matrix handles at a time (GPTQ's
/// working copies, the report's RTN baseline, an output error's differences
/// and products): a few, not a second matrix.
pub const ROW_CHUNK_BYTES: usize = 16 << 20;

/// Rows of `cols` f32 values in [`ROW_CHUNK_BYTES`] (at least one).
pub fn rows_per_chunk(cols: usize) -> usize {
    (ROW_CHUNK_BYTES / (4 * cols.max(1))).max(1)
}

/// [`output_error`] with `a`'s rows made on demand by `a_rows(first, count)`
/// (decoded from a stored tensor, say, rather than held whole beside `b`).
pub fn output_error_of_rows<'a>(
    a_rows: &(dyn Fn(usize, usize) -> anyhow::Result<Cow<'a, [f32]>> + Sync),
    rows: usize,
    b: Option<&[f32]>,
    h: HessianRef<'_>,
    cols: usize,
) -> anyhow::Result<f64> {
    let per_task = rows
        .div_ceil(2 * rayon::current_num_threads())
        .min(rows_per_chunk(cols))
        .max(8);
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
            let h = match h {
                HessianRef::Dense(h) => h,
                HessianRef::Factored(f) => return Ok(f.quadratic_form(&diff)),
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
                h.clone(),
                n,
                &FactorOptions {
                    act_order,
                    ..Default::default()
                },
            );
            let u = f.upper().unwrap();
            for i in 0..n {
                assert!(u.get(i, i) > 0.0);
            }
            assert_eq!(f.damp_percent(), 0.01);
            let r = residual(&f, &h);
            assert!(r < 1e-3, "act_order {act_order}: |UᵀU·H − I| = {r}");
        }
    }

    #[test]
    fn factor_reads_and_multiplies_like_the_dense_one() {
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
        for t in 0..n {
            for c in 0..n {
                let want = if c >= t { dense[t * n + c] } else { 0.0 };
                assert_eq!(u.get(t, c), want, "({t}, {c})");
            }
        }
        // A lazy batch spanning two tiles of rows (100..200) against the dense product.
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
    fn faers_cholesky_scratch_stays_inside_the_diagonal_tiles() {
        // The factor shares the Hessian's buffer on the promise that faer's
        // in-place Cholesky and our inverse write the strict upper triangle
        // only inside the diagonal tiles, which are saved and put back.
        for n in [5, 64, 100, 129, 300, 600] {
            let h = hessian(n, n + 50);
            let mut w = h.clone();
            w.reverse();
            let sentinel = |i: usize, j: usize| 1000.0 + (i * n + j) as f32;
            for j in 0..n {
                for i in 0..j {
                    if i / CHOLESKY_TILE != j / CHOLESKY_TILE {
                        w[j * n + i] = sentinel(i, j);
                    }
                }
            }
            let diag: Vec<f32> = (0..n).map(|i| w[i * n + i] + 0.01).collect();
            assert!(inverse_cholesky_lower_in_place(&mut w, n, &diag), "n = {n}");
            for j in 0..n {
                for i in 0..j {
                    if i / CHOLESKY_TILE != j / CHOLESKY_TILE {
                        assert_eq!(w[j * n + i], sentinel(i, j), "n = {n}: ({i}, {j}) written");
                    }
                }
            }
        }
    }

    #[test]
    fn the_factored_hessian_gives_the_dense_output_errors() {
        let n = 300;
        let mut h = hessian(n, 400);
        // A dead input.
        for j in 0..n {
            h[11 * n + j] = 0.0;
            h[j * n + 11] = 0.0;
        }
        let rows = 20;
        let a: Vec<f32> = (0..rows * n)
            .map(|k| ((k * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = a.iter().map(|v| (v * 4.0).round() / 4.0).collect();
        for act_order in [false, true] {
            let mut f = Factored::new(
                h.clone(),
                n,
                &FactorOptions {
                    act_order,
                    ..Default::default()
                },
            );
            for (b, what) in [(None, "energy"), (Some(&b[..]), "error")] {
                let dense = output_error(&a, b, &h, n);
                let kept = output_error(&a, b, &f, n);
                assert!(
                    ((kept - dense) / dense).abs() < 1e-5,
                    "act_order {act_order} {what}: {kept} vs {dense}"
                );
            }
            // The factor in the lower triangle is not read.
            for j in 0..n {
                for i in j..n {
                    f.buffer.data[i * n + j] = f32::NAN;
                }
            }
            assert!(output_error(&a, Some(&b), &f, n).is_finite());
        }
    }

    #[test]
    fn singular_hessians_escalate_dampening_and_nan_never_factors() {
        let n = 40;
        // Rank one: factors only once the dampening is raised.
        let v: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let rank_one: Vec<f32> = (0..n * n).map(|k| v[k / n] * v[k % n]).collect();
        let f = Factored::new(
            rank_one.clone(),
            n,
            &FactorOptions {
                damp_percent: 0.0,
                ..Default::default()
            },
        );
        assert!(f.upper().is_some() && f.damp_percent() > 0.0);
        assert!(residual(&f, &rank_one) < 1e-2);
        // Every failed try gave the Hessian back intact.
        let ones = vec![1f32; n * 3];
        let e = output_error(&ones, None, &f, n);
        let want = output_error(&ones, None, &rank_one, n);
        assert!(((e - want) / want).abs() < 1e-5, "{e} vs {want}");
        let nan = vec![f32::NAN; n * n];
        let f = Factored::new(nan, n, &FactorOptions::default());
        assert!(f.upper().is_none() && f.damp_percent() == 0.0);
        // A dead input (zero row and column) is marked and kept invertible.
        let mut dead = hessian(n, 80);
        for j in 0..n {
            dead[7 * n + j] = 0.0;
            dead[j * n + 7] = 0.0;
        }
        let f = Factored::new(dead.clone(), n, &FactorOptions::default());
        assert_eq!(f.dead(), [7]);
        assert!(residual(&f, &dead) < 1e-3);
    }
}
