//! CPU matmul: `Y = X · Wᵀ` with `W` kept in its stored format.
//!
//! The weight is cut into panels of rows; each rayon task dequantizes one panel into
//! a small f32 buffer (it stays in L2) and multiplies the whole activation matrix by
//! it with a packed, SIMD GEMM microkernel (matrixmultiply, runtime-dispatched to
//! AVX2/FMA). Dequantization is paid once per panel and amortised over every token,
//! and the weights are never expanded to f32 as a whole.

use crate::quants::{check_sizes, dequantize};
use crate::{GgmlType, KernelError};
use rayon::prelude::*;

/// A weight matrix in its stored format: `rows` output features by `cols` inputs,
/// row-major, each row a whole number of blocks.
#[derive(Debug, Clone, Copy)]
pub struct WeightRef<'a> {
    /// Storage type.
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The stored bytes.
    pub data: &'a [u8],
    /// A factor every stored value is multiplied by (llama.cpp's per-tensor
    /// `NAME.scale`, as NVFP4 checkpoints carry); 1 for none.
    pub scale: f32,
}

impl<'a> WeightRef<'a> {
    /// Checks that `data` holds `rows × cols` elements of `ty` with block-aligned rows.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(ty.block_elems()) {
            return Err(KernelError::NotBlockAligned {
                ty,
                elems: cols,
                block: ty.block_elems(),
            });
        }
        check_sizes(ty, data.len(), rows * cols)?;
        Ok(WeightRef {
            ty,
            rows,
            cols,
            data,
            scale: 1.0,
        })
    }

    /// The same weight with every value multiplied by `scale`.
    pub fn with_scale(self, scale: f32) -> Self {
        WeightRef { scale, ..self }
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// Dequantizes rows `r0..r1` into `out` (`(r1 - r0) × cols` floats).
    pub fn dequantize_rows(
        &self,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let rb = self.row_bytes();
        let out = &mut out[..(r1 - r0) * self.cols];
        dequantize(self.ty, &self.data[r0 * rb..r1 * rb], out)?;
        if self.scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= self.scale);
        }
        Ok(())
    }

    /// The whole matrix as f32.
    pub fn to_f32(&self) -> Result<Vec<f32>, KernelError> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out)?;
        Ok(out)
    }
}

/// Rows per dequantized panel. The GEMM repacks the activation rows it is given
/// once per panel, so a panel must be wide enough (many output features) to
/// amortise that; 128 rows of f32 are at most 768 KiB for K ≤ 1536, inside L2.
const PANEL_ROWS: usize = 128;

/// Fewest tokens per task when the token dimension is split for parallelism.
const MIN_TOKEN_BLOCK: usize = 64;

/// A raw output pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint (token block × column range) blocks; see `matmul`.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `out[t, n] = Σ_k x[t, k] · w[n, k]` for `n_tokens` rows of `x` (`n_tokens × w.cols`,
/// row-major) into `out` (`n_tokens × w.rows`, row-major, overwritten).
///
/// Tasks are (weight panel × token block) pairs: panels of [`PANEL_ROWS`] rows, and
/// the tokens split only as far as needed to give every thread a few tasks when a
/// matrix has few panels (the K/V projections).
pub fn matmul(
    x: &[f32],
    n_tokens: usize,
    w: &WeightRef,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let (k, n) = (w.cols, w.rows);
    assert_eq!(
        x.len(),
        n_tokens * k,
        "matmul: x has {} floats, expected {n_tokens}×{k}",
        x.len()
    );
    assert_eq!(
        out.len(),
        n_tokens * n,
        "matmul: out has {} floats, expected {n_tokens}×{n}",
        out.len()
    );
    if n_tokens == 0 || n == 0 {
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let panels = n.div_ceil(PANEL_ROWS);
    let nb = n.div_ceil(panels);
    let token_blocks = (4 * threads)
        .div_ceil(panels)
        .min(n_tokens.div_ceil(MIN_TOKEN_BLOCK))
        .max(1);
    let tb = n_tokens.div_ceil(token_blocks);
    let shared = SharedOut(out.as_mut_ptr());
    (0..panels * token_blocks)
        .into_par_iter()
        .map_init(
            || vec![0f32; nb * k],
            |panel, task| {
                let (p, b) = (task / token_blocks, task % token_blocks);
                let (r0, r1) = (p * nb, ((p + 1) * nb).min(n));
                let (t0, t1) = (b * tb, ((b + 1) * tb).min(n_tokens));
                if t0 >= t1 {
                    return Ok(());
                }
                w.dequantize_rows(r0, r1, panel)?;
                let out = shared;
                // SAFETY: rows t0..t1 of `x` (row stride k) are in bounds; the panel
                // holds (r1-r0) rows of k floats, read as a k×(r1-r0) matrix (row
                // stride 1, column stride k); the output block is rows t0..t1,
                // columns r0..r1 of the n_tokens×n output, which no other task writes.
                unsafe {
                    matrixmultiply::sgemm(
                        t1 - t0,
                        k,
                        r1 - r0,
                        1.0,
                        x.as_ptr().add(t0 * k),
                        k as isize,
                        1,
                        panel.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        out.0.add(t0 * n + r0),
                        n as isize,
                        1,
                    );
                }
                Ok(())
            },
        )
        .collect::<Result<(), KernelError>>()
}

/// A strided read-only f32 matrix view.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// Backing slice.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major view with the given row stride.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "{what}: view reaches index {last} of a slice of {}",
                self.data.len()
            );
        }
    }
}

/// `c = a · b` (or `c += a · b` when `accumulate`), single-threaded; `c` is
/// row-major `a.rows × b.cols` with row stride `ldc`. Used inside tasks that are
/// already parallel (attention heads).
pub fn gemm(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, accumulate: bool) {
    assert_eq!(
        a.cols, b.rows,
        "gemm: inner dimensions {} and {} differ",
        a.cols, b.rows
    );
    a.check("gemm a");
    b.check("gemm b");
    let c_view = MatRef::row_major(c, a.rows, b.cols, ldc);
    c_view.check("gemm c");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: all three views were bounds-checked above.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], t: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn f32_matmul_matches_reference_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (t, n, k) in [(1, 1, 1), (3, 70, 33), (17, 129, 64), (64, 8, 300)] {
            let x: Vec<f32> = (0..t * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let wr = WeightRef::new(GgmlType::F32, n, k, &bytes).unwrap();
            let mut out = vec![f32::NAN; t * n];
            matmul(&x, t, &wr, &mut out).unwrap();
            let r = reference(&x, t, &w, n, k);
            for (a, b) in out.iter().zip(&r) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "({t},{n},{k}): {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn f16_weights_go_through_the_dequantizing_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (t, n, k) = (5, 40, 96);
        let w: Vec<half::f16> = (0..n * k)
            .map(|_| half::f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let x: Vec<f32> = (0..t * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let wr = WeightRef::new(GgmlType::F16, n, k, &bytes).unwrap();
        let mut out = vec![0f32; t * n];
        matmul(&x, t, &wr, &mut out).unwrap();
        let r = reference(&x, t, &wf, n, k);
        for (a, b) in out.iter().zip(&r) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
        }
    }

    #[test]
    fn weight_sizes_are_checked() {
        assert!(WeightRef::new(GgmlType::Q8_0, 2, 32, &[0u8; 67]).is_err());
        assert!(WeightRef::new(GgmlType::Q8_0, 2, 33, &[0u8; 68]).is_err());
        assert!(WeightRef::new(GgmlType::Q8_0, 2, 32, &[0u8; 68]).is_ok());
    }

    #[test]
    fn strided_gemm_matches_reference() {
        let a: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 3x4
        let b: Vec<f32> = (0..8).map(|v| v as f32 * 0.5).collect(); // read as 4x2 transposed from 2x4
        let mut c = vec![1f32; 6];
        gemm(
            MatRef::row_major(&a, 3, 4, 4),
            MatRef::row_major(&b, 2, 4, 4).t(),
            &mut c,
            2,
            true,
        );
        let want = reference(&a, 3, &b, 2, 4);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5);
        }
    }
}
