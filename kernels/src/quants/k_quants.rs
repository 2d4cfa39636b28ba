//! Dequantization of ggml's k-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, all with
//! 256-element super-blocks.
//!
//! Block layouts (little-endian, as `block_q*_K` in ggml's `ggml-common.h`):
//!
//! | type | bytes | layout |
//! | --- | --- | --- |
//! | Q2_K | 84 | `scales: [u8; 16]`, `qs: [u8; 64]`, `d: f16`, `dmin: f16` |
//! | Q3_K | 110 | `hmask: [u8; 32]`, `qs: [u8; 64]`, `scales: [u8; 12]`, `d: f16` |
//! | Q4_K | 144 | `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qs: [u8; 128]` |
//! | Q5_K | 176 | `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`, `qs: [u8; 128]` |
//! | Q6_K | 210 | `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16` |
//!
//! The arithmetic is that of ggml's `dequantize_row_q*_K`: the sub-block scale
//! `d * sc` (and min `dmin * m`) is rounded to f32 first, then multiplied by the
//! integer quant (and the min subtracted), each step rounded in f32.

use super::f16_le;

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;

/// Bytes per Q2_K block.
pub const Q2_K_BYTES: usize = 84;
/// Bytes per Q3_K block.
pub const Q3_K_BYTES: usize = 110;
/// Bytes per Q4_K block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes per Q5_K block.
pub const Q5_K_BYTES: usize = 176;
/// Bytes per Q6_K block.
pub const Q6_K_BYTES: usize = 210;

/// Unpacks the eight 6-bit (scale, min) pairs of Q4_K/Q5_K (ggml's
/// `get_scale_min_k4`).
///
/// Bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4; scales
/// and mins 4..8 take their low 4 bits from the nibbles of bytes 8..12 and their
/// high 2 bits from the top bits of bytes 0..4 (scales) and 4..8 (mins).
#[inline(always)]
pub fn scale_min_k4(scales: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = scales[j] & 63;
        mn[j] = scales[j + 4] & 63;
        sc[j + 4] = (scales[j + 8] & 0x0F) | ((scales[j] >> 6) << 4);
        mn[j + 4] = (scales[j + 8] >> 4) | ((scales[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Unpacks the sixteen 6-bit scales of Q3_K, already re-centred (`s - 32`).
///
/// Scale `s` takes its low 4 bits from byte `s % 8` (low nibble for `s < 8`,
/// high nibble otherwise) and its high 2 bits from byte `8 + s % 4`, bits
/// `2 * (s / 4)`.
#[inline(always)]
pub fn scales_q3_k(scales: &[u8; 12]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (s, o) in out.iter_mut().enumerate() {
        let low = (scales[s % 8] >> (4 * (s / 8))) & 0x0F;
        let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

/// Dequantizes Q2_K blocks: `y = (d * sc) * q - (dmin * m)` with 2-bit `q` and
/// 4-bit `sc`, `m` per 16 elements.
///
/// Element `e` is stored in `qs[32 * (e / 128) + e % 32]`, bits `2 * ((e % 128) / 32)`;
/// its scale byte is `scales[e / 16]` (scale in the low nibble, min in the high).
///
/// `src` must hold exactly `dst.len() / 256` blocks of 84 bytes.
pub fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q2_K_BYTES * QK_K, dst.len());
    for (b, y) in src.chunks_exact(Q2_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let b: &[u8; Q2_K_BYTES] = b.try_into().unwrap();
        let scales: &[u8; 16] = b[0..16].try_into().unwrap();
        let qs: &[u8; 64] = b[16..80].try_into().unwrap();
        let d = f16_le(b[80], b[81]);
        let dmin = f16_le(b[82], b[83]);
        // Each 128-element half reads 32 bytes of qs four times (shifts 0, 2, 4, 6);
        // its 16-element groups, in order, alternate between bytes 0..16 and 16..32.
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            let q: &[u8; 32] = qs[32 * n..32 * n + 32].try_into().unwrap();
            let sc: &[u8; 8] = scales[8 * n..8 * n + 8].try_into().unwrap();
            let (q0, q1) = q.split_at(16);
            let (q0, q1): (&[u8; 16], &[u8; 16]) = (q0.try_into().unwrap(), q1.try_into().unwrap());
            let mut groups = y.chunks_exact_mut(16);
            let mut group = |q: &[u8; 16], sc: u8, shift: u32| {
                let out: &mut [f32; 16] = groups.next().unwrap().try_into().unwrap();
                q2_group(
                    q,
                    d * (sc & 0x0F) as f32,
                    dmin * (sc >> 4) as f32,
                    shift,
                    out,
                );
            };
            group(q0, sc[0], 0);
            group(q1, sc[1], 0);
            group(q0, sc[2], 2);
            group(q1, sc[3], 2);
            group(q0, sc[4], 4);
            group(q1, sc[5], 4);
            group(q0, sc[6], 6);
            group(q1, sc[7], 6);
        }
    }
}

/// Writes `dl * ((q >> shift) & 3) - ml` for 16 Q2_K quants.
#[inline(always)]
fn q2_group(q: &[u8; 16], dl: f32, ml: f32, shift: u32, out: &mut [f32; 16]) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = dl * ((q >> shift) & 3) as f32 - ml;
    }
}

/// Dequantizes Q3_K blocks: `y = (d * (sc - 32)) * (q - 4 * !h)` with 2-bit `q`,
/// high bit `h` and 6-bit `sc` per 16 elements.
///
/// Element `e` is stored in `qs[32 * (e / 128) + e % 32]`, bits `2 * ((e % 128) / 32)`;
/// its high bit is bit `e / 32` of `hmask[e % 32]` (a clear bit subtracts 4).
///
/// `src` must hold exactly `dst.len() / 256` blocks of 110 bytes.
pub fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q3_K_BYTES * QK_K, dst.len());
    for (b, y) in src.chunks_exact(Q3_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let b: &[u8; Q3_K_BYTES] = b.try_into().unwrap();
        let hmask: &[u8; 32] = b[0..32].try_into().unwrap();
        let qs: &[u8; 64] = b[32..96].try_into().unwrap();
        let scales = scales_q3_k(b[96..108].try_into().unwrap());
        let d = f16_le(b[108], b[109]);
        let (hm0, hm1) = hmask.split_at(16);
        let (hm0, hm1): (&[u8; 16], &[u8; 16]) = (hm0.try_into().unwrap(), hm1.try_into().unwrap());
        // Same walk as Q2_K; group `j` of half `n` also reads hmask bit `4 n + j`.
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            let q: &[u8; 32] = qs[32 * n..32 * n + 32].try_into().unwrap();
            let sc: &[i32; 8] = scales[8 * n..8 * n + 8].try_into().unwrap();
            let (q0, q1) = q.split_at(16);
            let (q0, q1): (&[u8; 16], &[u8; 16]) = (q0.try_into().unwrap(), q1.try_into().unwrap());
            let mut groups = y.chunks_exact_mut(16);
            let mut group = |q: &[u8; 16], hm: &[u8; 16], sc: i32, j: u32| {
                let out: &mut [f32; 16] = groups.next().unwrap().try_into().unwrap();
                let mask = 1u8 << (4 * n as u32 + j);
                q3_group(q, hm, mask, d * sc as f32, 2 * j, out);
            };
            group(q0, hm0, sc[0], 0);
            group(q1, hm1, sc[1], 0);
            group(q0, hm0, sc[2], 1);
            group(q1, hm1, sc[3], 1);
            group(q0, hm0, sc[4], 2);
            group(q1, hm1, sc[5], 2);
            group(q0, hm0, sc[6], 3);
            group(q1, hm1, sc[7], 3);
        }
    }
}

/// Writes `dl * (((q >> shift) & 3) - (hm & mask == 0 ? 4 : 0))` for 16 Q3_K quants.
#[inline(always)]
fn q3_group(q: &[u8; 16], hm: &[u8; 16], mask: u8, dl: f32, shift: u32, out: &mut [f32; 16]) {
    for ((o, &q), &h) in out.iter_mut().zip(q).zip(hm) {
        let low = ((q >> shift) & 3) as i32;
        let sub = if h & mask == 0 { 4 } else { 0 };
        *o = dl * (low - sub) as f32;
    }
}

/// Dequantizes Q4_K blocks: `y = (d * sc) * q - (dmin * m)` with 4-bit `q` and
/// 6-bit `sc`, `m` per 32 elements.
///
/// Each 64 elements share 32 bytes of `qs`: low nibbles first, then high nibbles.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 144 bytes.
pub fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q4_K_BYTES * QK_K, dst.len());
    for (b, y) in src.chunks_exact(Q4_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let b: &[u8; Q4_K_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let (sc, mn) = scale_min_k4(b[4..16].try_into().unwrap());
        let qs = &b[16..144];
        for (j, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let q: &[u8; 32] = q.try_into().unwrap();
            let d1 = d * sc[2 * j] as f32;
            let m1 = dmin * mn[2 * j] as f32;
            let d2 = d * sc[2 * j + 1] as f32;
            let m2 = dmin * mn[2 * j + 1] as f32;
            let (lo, hi) = y.split_at_mut(32);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                *l = d1 * (q & 0x0F) as f32 - m1;
                *h = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

/// Dequantizes Q5_K blocks: `y = (d * sc) * q - (dmin * m)` with 5-bit `q` and
/// 6-bit `sc`, `m` per 32 elements.
///
/// Low 4 bits as in Q4_K; the fifth bit of element `e` is bit `e / 32` of
/// `qh[e % 32]`.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 176 bytes.
pub fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q5_K_BYTES * QK_K, dst.len());
    for (b, y) in src.chunks_exact(Q5_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let b: &[u8; Q5_K_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let (sc, mn) = scale_min_k4(b[4..16].try_into().unwrap());
        let qh: &[u8; 32] = b[16..48].try_into().unwrap();
        let qs = &b[48..176];
        for (j, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let q: &[u8; 32] = q.try_into().unwrap();
            let d1 = d * sc[2 * j] as f32;
            let m1 = dmin * mn[2 * j] as f32;
            let d2 = d * sc[2 * j + 1] as f32;
            let m2 = dmin * mn[2 * j + 1] as f32;
            let (s1, s2) = (2 * j, 2 * j + 1);
            let (lo, hi) = y.split_at_mut(32);
            for (((l, h), &q), &qh) in lo.iter_mut().zip(hi.iter_mut()).zip(q).zip(qh) {
                let v1 = (q & 0x0F) | (((qh >> s1) & 1) << 4);
                let v2 = (q >> 4) | (((qh >> s2) & 1) << 4);
                *l = d1 * v1 as f32 - m1;
                *h = d2 * v2 as f32 - m2;
            }
        }
    }
}

/// Dequantizes Q6_K blocks: `y = (d * sc) * (q - 32)` with 6-bit `q` and signed
/// 8-bit `sc` per 16 elements.
///
/// Per half `n` (128 elements, 64 bytes of `ql`, 32 of `qh`), element
/// `128 n + 32 k + l` (`k` in 0..4, `l` in 0..32) takes its low 4 bits from
/// `ql[64 n + l + 32 (k % 2)]` (low nibble for `k < 2`) and its high 2 bits from
/// `qh[32 n + l]`, bits `2 k`.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 210 bytes.
pub fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q6_K_BYTES * QK_K, dst.len());
    for (b, y) in src.chunks_exact(Q6_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let b: &[u8; Q6_K_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[208], b[209]);
        let mut ds = [0f32; 16];
        for (o, &s) in ds.iter_mut().zip(&b[192..208]) {
            *o = d * (s as i8) as f32;
        }
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            let ql: &[u8; 64] = b[64 * n..64 * n + 64].try_into().unwrap();
            let qh: &[u8; 32] = b[128 + 32 * n..128 + 32 * n + 32].try_into().unwrap();
            let ds: &[f32; 8] = ds[8 * n..8 * n + 8].try_into().unwrap();
            let y: &mut [f32; 128] = y.try_into().unwrap();
            for l in 0..32 {
                let is = l / 16;
                let h = qh[l];
                let (a, c) = (ql[l], ql[l + 32]);
                let q1 = ((a & 0x0F) | ((h & 3) << 4)) as i32 - 32;
                let q2 = ((c & 0x0F) | (((h >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
                y[l] = ds[is] * q1 as f32;
                y[l + 32] = ds[is + 2] * q2 as f32;
                y[l + 64] = ds[is + 4] * q3 as f32;
                y[l + 96] = ds[is + 6] * q4 as f32;
            }
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

    /// Where element `e` of a 2-bit-per-element 256 block lives: (byte, shift).
    fn pos2(e: usize) -> (usize, usize) {
        (32 * (e / 128) + e % 32, 2 * ((e % 128) / 32))
    }

    #[test]
    fn q2_k_layout() {
        let q: [u8; 256] = std::array::from_fn(|e| ((e * 5 + e / 7) % 4) as u8);
        let scales: [u8; 16] = std::array::from_fn(|i| (i as u8) | (((15 - i) as u8) << 4));
        let mut qs = [0u8; 64];
        for (e, &v) in q.iter().enumerate() {
            let (byte, shift) = pos2(e);
            qs[byte] |= v << shift;
        }
        let mut src = scales.to_vec();
        src.extend_from_slice(&qs);
        src.extend_from_slice(&h(0.5));
        src.extend_from_slice(&h(0.25));
        let mut y = [0f32; 256];
        dequantize_q2_k(&src, &mut y);
        for e in 0..256 {
            let s = e / 16;
            let want = 0.5 * s as f32 * q[e] as f32 - 0.25 * (15 - s) as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q3_k_scales_and_hmask() {
        // Signed scales -32..31 spread over the 16 sub-blocks.
        let sc: [i32; 16] = std::array::from_fn(|s| (s as i32 * 5) % 64 - 32);
        let mut packed = [0u8; 12];
        for (s, &v) in sc.iter().enumerate() {
            let u = (v + 32) as u8;
            packed[s % 8] |= (u & 0x0F) << (4 * (s / 8));
            packed[8 + s % 4] |= (u >> 4) << (2 * (s / 4));
        }
        assert_eq!(scales_q3_k(&packed), sc);

        // 3-bit quants -4..3: low 2 bits in qs, high bit set means no -4.
        let q: [i32; 256] = std::array::from_fn(|e| ((e * 3 + e / 5) % 8) as i32 - 4);
        let mut qs = [0u8; 64];
        let mut hmask = [0u8; 32];
        for (e, &v) in q.iter().enumerate() {
            let u = (v + 4) as u8;
            let (byte, shift) = pos2(e);
            qs[byte] |= (u & 3) << shift;
            hmask[e % 32] |= (u >> 2) << (e / 32);
        }
        let mut src = hmask.to_vec();
        src.extend_from_slice(&qs);
        src.extend_from_slice(&packed);
        src.extend_from_slice(&h(0.125));
        let mut y = [0f32; 256];
        dequantize_q3_k(&src, &mut y);
        for e in 0..256 {
            assert_eq!(y[e], 0.125 * sc[e / 16] as f32 * q[e] as f32, "element {e}");
        }
    }

    /// Packs eight 6-bit scales and mins the way Q4_K/Q5_K store them.
    fn pack_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            p[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            p[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        p
    }

    #[test]
    fn scale_min_k4_round_trips() {
        let sc = [0, 63, 17, 42, 63, 1, 48, 31];
        let mn = [63, 0, 33, 5, 16, 62, 15, 47];
        assert_eq!(scale_min_k4(&pack_k4(&sc, &mn)), (sc, mn));
    }

    #[test]
    fn q4_k_and_q5_k_layout() {
        let sc: [u8; 8] = [1, 63, 17, 42, 60, 2, 48, 31];
        let mn: [u8; 8] = [63, 0, 33, 5, 16, 62, 15, 47];
        let packed = pack_k4(&sc, &mn);
        let q: [u8; 256] = std::array::from_fn(|e| ((e * 13 + e / 9) % 32) as u8);
        let (d, dmin) = (0.0625f32, 0.03125f32);
        let mut q4 = [0u8; 128];
        let mut q5 = [0u8; 128];
        let mut qh = [0u8; 32];
        for (e, &v) in q.iter().enumerate() {
            let (byte, shift) = (32 * (e / 64) + e % 32, 4 * ((e % 64) / 32));
            q4[byte] |= (v & 0x0F) << shift;
            q5[byte] |= (v & 0x0F) << shift;
            qh[e % 32] |= (v >> 4) << (e / 32);
        }
        let mut head = h(d).to_vec();
        head.extend_from_slice(&h(dmin));
        head.extend_from_slice(&packed);

        let mut src4 = head.clone();
        src4.extend_from_slice(&q4);
        let mut y = [0f32; 256];
        dequantize_q4_k(&src4, &mut y);
        for e in 0..256 {
            let s = e / 32;
            let want = d * sc[s] as f32 * (q[e] & 0x0F) as f32 - dmin * mn[s] as f32;
            assert_eq!(y[e], want, "q4_k element {e}");
        }

        let mut src5 = head;
        src5.extend_from_slice(&qh);
        src5.extend_from_slice(&q5);
        dequantize_q5_k(&src5, &mut y);
        for e in 0..256 {
            let s = e / 32;
            let want = d * sc[s] as f32 * q[e] as f32 - dmin * mn[s] as f32;
            assert_eq!(y[e], want, "q5_k element {e}");
        }
    }

    #[test]
    fn q6_k_layout() {
        let q: [i32; 256] = std::array::from_fn(|e| ((e * 29 + e / 3) % 64) as i32 - 32);
        let sc: [i8; 16] = std::array::from_fn(|i| (i as i8 - 8) * 15);
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (e, &v) in q.iter().enumerate() {
            let u = (v + 32) as u8;
            let (n, r) = (e / 128, e % 128);
            let (k, l) = (r / 32, r % 32);
            ql[64 * n + l + 32 * (k % 2)] |= (u & 0x0F) << (4 * (k / 2));
            qh[32 * n + l] |= (u >> 4) << (2 * k);
        }
        let mut src = ql.to_vec();
        src.extend_from_slice(&qh);
        src.extend(sc.iter().map(|&s| s as u8));
        src.extend_from_slice(&h(0.01));
        let d = f16::from_f32(0.01).to_f32();
        let mut y = [0f32; 256];
        dequantize_q6_k(&src, &mut y);
        for e in 0..256 {
            let want = d * sc[e / 16] as f32 * q[e] as f32;
            assert_eq!(y[e].to_bits(), want.to_bits(), "element {e}");
        }
    }
}
