//! Strided matrix views and the matrix product every linear layer and attention
//! head goes through. The packed kernels are `matrixmultiply`'s (single-threaded);
//! [`par_gemm`] spreads one product over the rayon pool by cutting the output into
//! row bands (or column bands when there are few rows), so the caller never
//! writes a loop over threads.

use crate::float::Float;
use rayon::prelude::*;

/// A read-only strided view of a matrix: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    /// Backing slice; the view starts at its first element.
    pub data: &'a [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` view whose rows are `row_stride` apart (a column
    /// band of a wider matrix has `row_stride` > `cols`).
    pub fn row_major(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows `r0..r1` of the view.
    pub fn row_band(self, r0: usize, r1: usize) -> Self {
        assert!(
            r0 <= r1 && r1 <= self.rows,
            "rows {r0}..{r1} of {}",
            self.rows
        );
        let start = if r0 == r1 { 0 } else { r0 * self.row_stride };
        MatRef {
            data: &self.data[start.min(self.data.len())..],
            rows: r1 - r0,
            ..self
        }
    }

    /// Columns `c0..c1` of the view.
    pub fn col_band(self, c0: usize, c1: usize) -> Self {
        self.t().row_band(c0, c1).t()
    }

    /// Whether every element the view addresses lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Checks the shapes of `c = a · b` (panicking with the shapes when they do not
/// agree or a view reaches outside its slice); false when the product is empty.
pub(crate) fn check_gemm<T>(a: &MatRef<T>, b: &MatRef<T>, c: &[T], ldc: usize) -> bool {
    assert_eq!(
        a.cols, b.rows,
        "gemm: inner dimensions {}×{} · {}×{} differ",
        a.rows, a.cols, b.rows, b.cols
    );
    assert!(
        a.fits(),
        "gemm: a ({}×{}) reaches outside its slice",
        a.rows,
        a.cols
    );
    assert!(
        b.fits(),
        "gemm: b ({}×{}) reaches outside its slice",
        b.rows,
        b.cols
    );
    let c_view = MatRef::row_major(c, a.rows, b.cols, ldc);
    assert!(
        c_view.fits() && (b.cols <= ldc || a.rows <= 1),
        "gemm: c ({}×{}, row stride {ldc}) does not fit a slice of {}",
        a.rows,
        b.cols,
        c.len()
    );
    a.rows > 0 && b.cols > 0
}

/// Products with fewer multiply-adds than this run on the calling thread: below it
/// rayon's hand-off costs more than the work.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// Rows (or columns) of the output one task takes at least, so each task still
/// amortises the packing of its operands.
const PAR_MIN_BAND: usize = 32;

/// `c = a · b` (or `c += a · b` when `accumulate`) for a contiguous row-major
/// `c` of `a.rows × b.cols`, on the rayon pool when the product is large enough.
pub fn par_gemm<T: Float>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        c.len(),
        m * n,
        "par_gemm: c has {} elements, not {m}×{n}",
        c.len()
    );
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * k * n < PAR_MIN_FLOPS {
        return T::gemm(a, b, c, n, accumulate);
    }
    if m >= 2 * PAR_MIN_BAND {
        // Row bands: each task multiplies its rows of `a` by the whole of `b` and
        // writes a contiguous slab of `c`.
        let band = m.div_ceil(threads).max(PAR_MIN_BAND);
        c.par_chunks_mut(band * n)
            .enumerate()
            .for_each(|(i, slab)| {
                let r0 = i * band;
                let rows = slab.len() / n;
                T::gemm(a.row_band(r0, r0 + rows), b, slab, n, accumulate);
            });
    } else if n >= 2 * PAR_MIN_BAND {
        // Few rows (short sequences through a wide layer): column bands of `b`,
        // each computed into its own buffer and copied into place.
        let band = n.div_ceil(threads).max(PAR_MIN_BAND);
        let starts: Vec<usize> = (0..n).step_by(band).collect();
        let parts: Vec<Vec<T>> = starts
            .par_iter()
            .map(|&c0| {
                let c1 = (c0 + band).min(n);
                let w = c1 - c0;
                let mut part = vec![T::ZERO; m * w];
                if accumulate {
                    for (dst, src) in part.chunks_mut(w).zip(c.chunks(n)) {
                        dst.copy_from_slice(&src[c0..c1]);
                    }
                }
                T::gemm(a, b.col_band(c0, c1), &mut part, w, accumulate);
                part
            })
            .collect();
        for (&c0, part) in starts.iter().zip(&parts) {
            let w = part.len() / m;
            for (dst, src) in c.chunks_mut(n).zip(part.chunks(w)) {
                dst[c0..c0 + w].copy_from_slice(src);
            }
        }
    } else {
        T::gemm(a, b, c, n, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<f64>, b: MatRef<f64>) -> Vec<f64> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|l| {
                        a.data[i * a.row_stride + l * a.col_stride]
                            * b.data[l * b.row_stride + j * b.col_stride]
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn par_gemm_matches_naive_in_every_split() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // Shapes that take the serial path, row bands and column bands.
        for (m, k, n) in [(3, 5, 7), (200, 64, 90), (4, 300, 700), (70, 129, 33)] {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
            let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) * 0.5).collect();
            // b is used transposed: stored n × k.
            let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let av = MatRef::row_major(&a, m, k, k);
            let bv = MatRef::row_major(&bt, n, k, k).t();
            let want = naive(av, bv);
            let mut c = vec![1.0; m * n];
            pool.install(|| par_gemm(av, bv, &mut c, true));
            for (g, w) in c.iter().zip(&want) {
                assert_eq!(*g, w + 1.0, "{m}×{k}×{n}");
            }
            pool.install(|| par_gemm(av, bv, &mut c, false));
            assert_eq!(c, want, "{m}×{k}×{n}");
        }
    }
}
