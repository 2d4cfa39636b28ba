//! The scalar type of the training code. Everything in this crate is generic over
//! [`Float`] so that one implementation runs in f64 (where central finite
//! differences are accurate enough to check every gradient to 1e-6) and in f32
//! (the precision training runs in). Only `f32` and `f64` implement it.

use crate::gemm::{check_gemm, MatRef};
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point scalar: `f32` or `f64`.
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + Display
    + PartialOrd
    + Sum
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Minus infinity (the start of a running maximum).
    const NEG_INFINITY: Self;
    /// Type name, for messages.
    const NAME: &'static str;

    /// The nearest value of this type (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// The value as f64 (exact).
    fn to_f64(self) -> f64;
    /// `e^self`.
    fn exp(self) -> Self;
    /// Hyperbolic tangent (GELU's tanh form).
    fn tanh(self) -> Self;
    /// The larger of two values.
    fn max(self, other: Self) -> Self;
    /// `c = a · b`, or `c += a · b` when `accumulate`; `c` is row-major
    /// `a.rows × b.cols` with row stride `ldc`. Single-threaded; panics when a view
    /// reaches outside its slice.
    fn gemm(a: MatRef<'_, Self>, b: MatRef<'_, Self>, c: &mut [Self], ldc: usize, accumulate: bool);
}

macro_rules! impl_float {
    ($t:ty, $gemm:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const NAME: &'static str = stringify!($t);

            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn gemm(
                a: MatRef<'_, Self>,
                b: MatRef<'_, Self>,
                c: &mut [Self],
                ldc: usize,
                accumulate: bool,
            ) {
                if !check_gemm(&a, &b, c, ldc) {
                    return;
                }
                // SAFETY: check_gemm verified that every element the three strided
                // views address lies inside its slice, and `c` is borrowed mutably.
                unsafe {
                    $gemm(
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
        }
    };
}

impl_float!(f32, matrixmultiply::sgemm);
impl_float!(f64, matrixmultiply::dgemm);
