//! The weight types of GGUF (ggml's `ggml_type`): ids, names and block geometry.

use std::fmt;

/// A ggml weight type. Discriminants are the GGUF type ids.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// IEEE half.
    F16 = 1,
    /// 4-bit, 32 per block, one f16 scale, symmetric around 8.
    Q4_0 = 2,
    /// 4-bit, 32 per block, f16 scale and min.
    Q4_1 = 3,
    /// 5-bit, 32 per block, f16 scale.
    Q5_0 = 6,
    /// 5-bit, 32 per block, f16 scale and min.
    Q5_1 = 7,
    /// 8-bit, 32 per block, f16 scale.
    Q8_0 = 8,
    /// 2-bit k-quant, 256 per super-block.
    Q2_K = 10,
    /// 3-bit k-quant, 256 per super-block.
    Q3_K = 11,
    /// 4-bit k-quant, 256 per super-block.
    Q4_K = 12,
    /// 5-bit k-quant, 256 per super-block.
    Q5_K = 13,
    /// 6-bit k-quant, 256 per super-block.
    Q6_K = 14,
    /// 4-bit non-linear grid, 32 per block.
    IQ4_NL = 20,
    /// 4-bit non-linear grid, 256 per super-block with 6-bit sub-scales.
    IQ4_XS = 23,
    /// bfloat16.
    BF16 = 30,
    /// Ternary `{-1, 0, 1} · d`, 256 per block, five trits per byte: 1.6875 bpw.
    TQ1_0 = 34,
    /// Ternary 2-bit codes `(q − 1) · d`, 256 per block: 2.0625 bpw.
    TQ2_0 = 35,
    /// 4-bit E2M1 floats, 32 per block, one E8M0 (power of two) scale: the OCP
    /// microscaling MXFP4 (gpt-oss's experts).
    MXFP4 = 39,
    /// 4-bit E2M1 floats, 64 per block in four sub-blocks of 16, each with a
    /// UE4M3 scale (NVIDIA's NVFP4).
    NVFP4 = 40,
    /// 1-bit signs, 128 per block, one f16 scale: values ±d.
    Q1_0 = 41,
    /// 2-bit, 64 per block, one f16 scale: values {-1, 0, 1, 2}·d.
    Q2_0 = 42,
}

/// Every type this crate knows, in id order.
pub const ALL_TYPES: [GgmlType; 21] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::BF16,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::MXFP4,
    GgmlType::NVFP4,
    GgmlType::Q1_0,
    GgmlType::Q2_0,
];

impl GgmlType {
    /// The type with GGUF id `id`, if this crate supports it.
    pub fn from_id(id: u32) -> Option<Self> {
        ALL_TYPES.iter().copied().find(|t| t.id() == id)
    }

    /// The type named `name` (case-insensitive, as llama.cpp spells it: `Q4_K`, `f16`).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL_TYPES
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The name llama.cpp prints.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::IQ4_NL => "IQ4_NL",
            GgmlType::IQ4_XS => "IQ4_XS",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::MXFP4 => "MXFP4",
            GgmlType::NVFP4 => "NVFP4",
            GgmlType::Q1_0 => "Q1_0",
            GgmlType::Q2_0 => "Q2_0",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::IQ4_NL
            | GgmlType::MXFP4 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_XS
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => 256,
            GgmlType::NVFP4 | GgmlType::Q2_0 => 64,
            GgmlType::Q1_0 => 128,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::IQ4_NL => 18,
            GgmlType::IQ4_XS => 136,
            GgmlType::TQ1_0 => 54,
            GgmlType::TQ2_0 => 66,
            GgmlType::MXFP4 => 17,
            GgmlType::NVFP4 => 36,
            GgmlType::Q1_0 | GgmlType::Q2_0 => 18,
        }
    }

    /// Bytes that `elems` elements take, or `None` when `elems` is not a whole
    /// number of blocks.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        let b = self.block_elems();
        elems
            .is_multiple_of(b)
            .then(|| elems / b * self.block_bytes())
    }

    /// Bits per weight of the type itself.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }

    /// Whether the type is a plain float format (no blocks).
    pub fn is_float(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for t in ALL_TYPES {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(99), None);
    }

    #[test]
    fn geometry_matches_design_table() {
        assert_eq!(GgmlType::Q8_0.bytes_for(32), Some(34));
        assert_eq!(GgmlType::Q4_K.bytes_for(256), Some(144));
        assert_eq!(GgmlType::Q2_K.bytes_for(512), Some(168));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert!((GgmlType::Q4_0.bits_per_weight() - 4.5).abs() < 1e-12);
        // ggml-common.h's static_asserts: 4 + 32, 2 + 16 and 2 + 16 bytes.
        assert_eq!(GgmlType::NVFP4.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q1_0.bytes_for(128), Some(18));
        assert_eq!(GgmlType::Q2_0.bytes_for(64), Some(18));
        assert!((GgmlType::Q1_0.bits_per_weight() - 1.125).abs() < 1e-12);
        assert!((GgmlType::Q2_0.bits_per_weight() - 2.25).abs() < 1e-12);
        assert!((GgmlType::NVFP4.bits_per_weight() - 4.5).abs() < 1e-12);
        assert_eq!(GgmlType::MXFP4.bytes_for(32), Some(17));
        assert!((GgmlType::TQ1_0.bits_per_weight() - 1.6875).abs() < 1e-12);
        assert!((GgmlType::TQ2_0.bits_per_weight() - 2.0625).abs() < 1e-12);
        assert!((GgmlType::MXFP4.bits_per_weight() - 4.25).abs() < 1e-12);
    }
}
