//! Dequantization of ggml's legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1
//! and Q8_0.
//!
//! Block layouts (little-endian, as `block_q*` in ggml's `ggml-common.h`):
//!
//! | type | bytes | layout |
//! | --- | --- | --- |
//! | Q4_0 | 18 | `d: f16`, `qs: [u8; 16]` |
//! | Q4_1 | 20 | `d: f16`, `m: f16`, `qs: [u8; 16]` |
//! | Q5_0 | 22 | `d: f16`, `qh: u32`, `qs: [u8; 16]` |
//! | Q5_1 | 24 | `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]` |
//! | Q8_0 | 34 | `d: f16`, `qs: [i8; 32]` |
//!
//! In the 4- and 5-bit types byte `qs[j]` holds element `j` in its low nibble and
//! element `j + 16` in its high nibble; bit `i` of `qh` is the fifth bit of element
//! `i`. The arithmetic is that of ggml's `dequantize_row_*`: `d * q` for the
//! symmetric types (with `q` already re-centred as an integer) and `d * q + m`,
//! rounded after the product, for the types with a min.

use super::f16_le;

/// Elements per block of every legacy type.
pub const QK: usize = 32;

/// Bytes per Q4_0 block.
pub const Q4_0_BYTES: usize = 18;
/// Bytes per Q4_1 block.
pub const Q4_1_BYTES: usize = 20;
/// Bytes per Q5_0 block.
pub const Q5_0_BYTES: usize = 22;
/// Bytes per Q5_1 block.
pub const Q5_1_BYTES: usize = 24;
/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 34;

/// Splits a 32-element output block into its two halves of 16.
#[inline(always)]
fn halves(y: &mut [f32]) -> (&mut [f32; 16], &mut [f32; 16]) {
    let (lo, hi) = y.split_at_mut(16);
    (lo.try_into().unwrap(), hi.try_into().unwrap())
}

/// Dequantizes Q4_0 blocks: `y = d * (q - 8)`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 18 bytes.
pub fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q4_0_BYTES * QK, dst.len());
    for (b, y) in src.chunks_exact(Q4_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let b: &[u8; Q4_0_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let (lo, hi) = halves(y);
        for j in 0..16 {
            let q = b[2 + j];
            lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Dequantizes Q4_1 blocks: `y = d * q + m`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 20 bytes.
pub fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q4_1_BYTES * QK, dst.len());
    for (b, y) in src.chunks_exact(Q4_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let b: &[u8; Q4_1_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let (lo, hi) = halves(y);
        for j in 0..16 {
            let q = b[4 + j];
            lo[j] = d * (q & 0x0F) as f32 + m;
            hi[j] = d * (q >> 4) as f32 + m;
        }
    }
}

/// Dequantizes Q5_0 blocks: `y = d * (q - 16)` with 5-bit `q`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 22 bytes.
pub fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q5_0_BYTES * QK, dst.len());
    for (b, y) in src.chunks_exact(Q5_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let b: &[u8; Q5_0_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = halves(y);
        for j in 0..16 {
            let q = b[6 + j] as i32;
            let q0 = (q & 0x0F) | ((((qh >> j) & 1) as i32) << 4);
            let q1 = (q >> 4) | ((((qh >> (j + 16)) & 1) as i32) << 4);
            lo[j] = (q0 - 16) as f32 * d;
            hi[j] = (q1 - 16) as f32 * d;
        }
    }
}

/// Dequantizes Q5_1 blocks: `y = d * q + m` with 5-bit `q`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 24 bytes.
pub fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q5_1_BYTES * QK, dst.len());
    for (b, y) in src.chunks_exact(Q5_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let b: &[u8; Q5_1_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (lo, hi) = halves(y);
        for j in 0..16 {
            let q = b[8 + j] as i32;
            let q0 = (q & 0x0F) | ((((qh >> j) & 1) as i32) << 4);
            let q1 = (q >> 4) | ((((qh >> (j + 16)) & 1) as i32) << 4);
            lo[j] = d * q0 as f32 + m;
            hi[j] = d * q1 as f32 + m;
        }
    }
}

/// Dequantizes Q8_0 blocks: `y = d * q` with signed 8-bit `q`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 34 bytes.
pub fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q8_0_BYTES * QK, dst.len());
    for (b, y) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let b: &[u8; Q8_0_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let y: &mut [f32; QK] = y.try_into().unwrap();
        for j in 0..QK {
            y[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_full_range() {
        // 8 blocks, d = 0.5, quants -128..=127 in order.
        let mut src = Vec::new();
        for blk in 0..8 {
            src.extend_from_slice(&h(0.5));
            for j in 0..32 {
                src.push((-128i32 + blk * 32 + j) as i8 as u8);
            }
        }
        let mut y = vec![0f32; 256];
        dequantize_q8_0(&src, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 128.0) * 0.5, "element {i}");
        }
    }

    #[test]
    fn q4_0_nibble_order() {
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let mut src = h(2.0).to_vec();
        for j in 0..16u8 {
            src.push(j | ((15 - j) << 4));
        }
        let mut y = [0f32; 32];
        dequantize_q4_0(&src, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(y[16 + j], 2.0 * (7.0 - j as f32));
        }
    }

    #[test]
    fn q4_0_negative_scale_gives_signed_zero() {
        let mut src = h(-1.0).to_vec();
        src.extend_from_slice(&[0x88; 16]);
        let mut y = [1f32; 32];
        dequantize_q4_0(&src, &mut y);
        assert!(y.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut src = h(0.5).to_vec();
        src.extend_from_slice(&h(-1.0));
        for j in 0..16u8 {
            src.push((15 - j) | (j << 4));
        }
        let mut y = [0f32; 32];
        dequantize_q4_1(&src, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * (15 - j) as f32 - 1.0);
            assert_eq!(y[16 + j], 0.5 * j as f32 - 1.0);
        }
    }

    /// Packs 32 five-bit quants the way Q5_0/Q5_1 store them: `(qh, qs)`.
    fn pack5(q: &[u32; 32]) -> (u32, [u8; 16]) {
        let mut qh = 0u32;
        let mut qs = [0u8; 16];
        for (i, &v) in q.iter().enumerate() {
            qh |= (v >> 4) << i;
            qs[i % 16] |= ((v & 0x0F) as u8) << (4 * (i / 16));
        }
        (qh, qs)
    }

    #[test]
    fn q5_0_high_bits() {
        let q: [u32; 32] = std::array::from_fn(|i| ((i * 7 + 3) % 32) as u32);
        let (qh, qs) = pack5(&q);
        let mut src = h(0.25).to_vec();
        src.extend_from_slice(&qh.to_le_bytes());
        src.extend_from_slice(&qs);
        let mut y = [0f32; 32];
        dequantize_q5_0(&src, &mut y);
        for i in 0..32 {
            assert_eq!(y[i], 0.25 * (q[i] as f32 - 16.0), "element {i}");
        }
    }

    #[test]
    fn q5_1_high_bits() {
        let q: [u32; 32] = std::array::from_fn(|i| ((i * 11 + 5) % 32) as u32);
        let (qh, qs) = pack5(&q);
        let mut src = h(0.125).to_vec();
        src.extend_from_slice(&h(3.0));
        src.extend_from_slice(&qh.to_le_bytes());
        src.extend_from_slice(&qs);
        let mut y = [0f32; 32];
        dequantize_q5_1(&src, &mut y);
        for i in 0..32 {
            assert_eq!(y[i], 0.125 * q[i] as f32 + 3.0, "element {i}");
        }
    }

    #[test]
    fn several_blocks_go_to_their_own_outputs() {
        let mut src = Vec::new();
        for blk in 0..3u8 {
            src.extend_from_slice(&h(1.0));
            src.extend_from_slice(&[blk; 32]);
        }
        let mut y = vec![0f32; 96];
        dequantize_q8_0(&src, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i / 32) as f32);
        }
    }
}
