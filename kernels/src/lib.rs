//! Kernels: the block codecs of every supported weight format and the CPU matmul
//! that multiplies activations by weights kept in their stored format.
//!
//! Nothing here knows about models or files: a weight is a type, a shape and bytes.

pub mod matmul;
pub mod quants;
pub mod types;

pub use types::GgmlType;

/// Errors from the kernels: always about a buffer whose size or type does not fit.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer length does not match what the type and element count require.
    #[error("{what}: expected {expected} bytes for {elems} elements of {ty}, got {got}")]
    SizeMismatch {
        /// Which buffer.
        what: &'static str,
        /// The weight type.
        ty: GgmlType,
        /// Number of elements.
        elems: usize,
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The element count is not a whole number of blocks of the type.
    #[error("{elems} elements is not a multiple of the {ty} block size {block}")]
    NotBlockAligned {
        /// The weight type.
        ty: GgmlType,
        /// Number of elements.
        elems: usize,
        /// Elements per block.
        block: usize,
    },
    /// The operation is not available for this type.
    #[error("{op} is not supported for {ty}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The weight type.
        ty: GgmlType,
    },
}
