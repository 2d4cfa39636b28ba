//! Tests of the quantizers: round trips through the real decoders, comparison
//! with plain reference rounding (ggml's `quantize_row_*_ref` for the legacy types,
//! min/max or max-abs rounding per sub-block for the others), importance
//! weighting, exactness on data that already sits on a grid, and robustness to
//! NaN/Inf and degenerate rows. `throughput` (ignored) prints MB/s per type.

use super::iq4::write_iq4_xs;
use super::k_quants::quantize_q4_k;
use super::k_quants::{
    write_q2_k, write_q3_k, write_q4_k, write_q5_k, write_q6_k, AffineSuper, SymSuper,
};
use super::legacy::quantize_q4_0;
use super::search::{nearest_int, to_f16, weighted_err, Grid, Iq4};
use super::*;
use crate::quants::dequantize;
use crate::types::ALL_TYPES;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Columns of every test matrix: a multiple of 256 (and of 576's factor 64 would
/// not do for the k-quants).
const COLS: usize = 1536;

/// Every type with blocks (the float types are conversions).
fn block_types() -> Vec<GgmlType> {
    ALL_TYPES
        .iter()
        .copied()
        .filter(|t| !t.is_float())
        .collect()
}

/// A standard normal sample (Box-Muller).
fn gauss(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(1e-12..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Gaussian rows with a per-row spread, like linear-layer weights (σ ≈ 0.02).
fn gaussian_rows(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * COLS);
    for _ in 0..rows {
        let sigma = 0.02 * (0.5 + rng.gen::<f32>());
        v.extend((0..COLS).map(|_| sigma * gauss(&mut rng)));
    }
    v
}

/// Gaussian rows where about 1% of the elements are outliers 5-15 σ out.
fn outlier_rows(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = gaussian_rows(rows, seed ^ 0x5a5a);
    for x in v.iter_mut() {
        if rng.gen::<f32>() < 0.01 {
            *x *= rng.gen_range(5.0..15.0);
        }
    }
    v
}

/// Log-normal per-column importance (an imatrix spans orders of magnitude).
fn importance(seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..COLS).map(|_| (1.5 * gauss(&mut rng)).exp()).collect()
}

fn decode(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    dequantize(ty, bytes, &mut y).unwrap();
    y
}

/// Squared error of `y` against `x`, weighted per column when `qw` is given.
fn sq_err(x: &[f32], y: &[f32], qw: Option<&[f32]>) -> f64 {
    match qw {
        None => weighted_err(x, &vec![1.0; x.len()], y),
        Some(qw) => x
            .chunks(COLS)
            .zip(y.chunks(COLS))
            .map(|(x, y)| weighted_err(x, qw, y))
            .sum(),
    }
}

/// Root mean square.
fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64).sqrt()
}

// ---------------------------------------------------------------------------
// Reference roundings.

/// `(amax, max)`: the largest magnitude and the signed element that has it.
fn abs_max(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn h(v: f32) -> [u8; 2] {
    to_f16(v).0.to_le_bytes()
}

/// ggml's `quantize_row_q4_0_ref` / `q5_0` (`nmax` 8 / 16).
fn ref_sym_legacy(x: &[f32], nmax: i32, out: &mut [u8]) {
    let (_, max) = abs_max(x);
    let d = max / -(nmax as f32);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = x
        .iter()
        .map(|&v| ((v * id + nmax as f32 + 0.5) as i8).min(2 * nmax as i8 - 1) as u8)
        .collect();
    out[..2].copy_from_slice(&h(d));
    write_legacy_quants(&q, nmax == 16, &mut out[2..]);
}

/// ggml's `quantize_row_q4_1_ref` / `q5_1` (`nmax` 15 / 31).
fn ref_affine_legacy(x: &[f32], nmax: i32, out: &mut [u8]) {
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / nmax as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = x
        .iter()
        .map(|&v| (((v - lo) * id + 0.5) as u8).min(nmax as u8))
        .collect();
    out[..2].copy_from_slice(&h(d));
    out[2..4].copy_from_slice(&h(lo));
    write_legacy_quants(&q, nmax == 31, &mut out[4..]);
}

/// Packs 32 legacy quants (with Q5's `qh` first when `five`).
fn write_legacy_quants(q: &[u8], five: bool, out: &mut [u8]) {
    let out = if five {
        let mut qh = 0u32;
        for (i, &v) in q.iter().enumerate() {
            qh |= ((v >> 4) as u32 & 1) << i;
        }
        out[..4].copy_from_slice(&qh.to_le_bytes());
        &mut out[4..]
    } else {
        out
    };
    for j in 0..16 {
        out[j] = (q[j] & 15) | ((q[j + 16] & 15) << 4);
    }
}

/// ggml's `quantize_row_q8_0_ref`.
fn ref_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&h(d));
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Min/max rounding of an affine super-block: per sub-block `d = (max - min) /
/// nmax` with `min <= 0`, sub-scales and mins rounded against the largest of
/// each, elements re-rounded against the stored values.
fn ref_affine_super(x: &[f32], sub: usize, nmax: i32, snmax: i32) -> AffineSuper {
    let nsub = 256 / sub;
    let (mut s, mut m) = ([0f32; 16], [0f32; 16]);
    for j in 0..nsub {
        let (lo, hi) = min_max(&x[j * sub..(j + 1) * sub]);
        let lo = lo.min(0.0);
        s[j] = (hi - lo) / nmax as f32;
        m[j] = -lo;
    }
    let smax = s.iter().fold(0f32, |a, &v| a.max(v));
    let mmax = m.iter().fold(0f32, |a, &v| a.max(v));
    let (db, d) = to_f16(smax / snmax as f32);
    let (mb, dm) = to_f16(mmax / snmax as f32);
    let mut out = AffineSuper {
        d: db,
        dmin: mb,
        ls: [0; 16],
        lm: [0; 16],
        q: [0; 256],
    };
    for j in 0..nsub {
        let r = |v: f32, by: f32| {
            if by > 0.0 {
                nearest_int(v / by).clamp(0, snmax) as u8
            } else {
                0
            }
        };
        out.ls[j] = r(s[j], smax / snmax as f32);
        out.lm[j] = r(m[j], mmax / snmax as f32);
        let (dl, ml) = (d * out.ls[j] as f32, dm * out.lm[j] as f32);
        for i in j * sub..(j + 1) * sub {
            out.q[i] = if dl != 0.0 {
                nearest_int((x[i] + ml) / dl).clamp(0, nmax) as u8
            } else {
                0
            };
        }
    }
    out
}

/// Max-abs rounding of a symmetric super-block: per sub-block the largest element
/// on the grid's first value, sub-scales rounded against the largest (onto the
/// scale grid's low end), elements re-rounded against the stored values.
fn ref_sym_super<G: Grid>(x: &[f32], sub: usize, grid: G, slo: i32, shi: i32) -> SymSuper {
    let nsub = 256 / sub;
    let (first, _) = grid.ends();
    let mut s = [0f32; 16];
    for j in 0..nsub {
        let (_, max) = abs_max(&x[j * sub..(j + 1) * sub]);
        s[j] = max / first;
    }
    let (_, smax) = abs_max(&s[..nsub]);
    let (db, d) = to_f16(smax / slo as f32);
    let ds = smax / slo as f32;
    let mut out = SymSuper {
        d: db,
        ls: [0; 16],
        q: [0; 256],
    };
    for j in 0..nsub {
        let l = if ds != 0.0 {
            nearest_int(s[j] / ds).clamp(slo, shi)
        } else {
            0
        };
        out.ls[j] = (l - slo) as u8;
        let dl = d * l as f32;
        let inv = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        for i in j * sub..(j + 1) * sub {
            out.q[i] = grid.index(x[i] * inv);
        }
    }
    out
}

/// The reference rounding of `ty` for `src` (whole blocks).
fn reference(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let mut out = vec![0u8; src.len() / be * bb];
    for (x, o) in src.chunks_exact(be).zip(out.chunks_exact_mut(bb)) {
        match ty {
            GgmlType::Q4_0 => ref_sym_legacy(x, 8, o),
            GgmlType::Q5_0 => ref_sym_legacy(x, 16, o),
            GgmlType::Q4_1 => ref_affine_legacy(x, 15, o),
            GgmlType::Q5_1 => ref_affine_legacy(x, 31, o),
            GgmlType::Q8_0 => ref_q8_0(x, o),
            GgmlType::Q2_K => write_q2_k(&ref_affine_super(x, 16, 3, 15), o),
            GgmlType::Q4_K => write_q4_k(&ref_affine_super(x, 32, 15, 63), o),
            GgmlType::Q5_K => write_q5_k(&ref_affine_super(x, 32, 31, 63), o),
            GgmlType::Q3_K => write_q3_k(
                &ref_sym_super(x, 16, search::Uniform { lo: -4, hi: 3 }, -32, 31),
                o,
            ),
            GgmlType::Q6_K => write_q6_k(
                &ref_sym_super(x, 16, search::Uniform { lo: -32, hi: 31 }, -128, 127),
                o,
            ),
            GgmlType::IQ4_XS => write_iq4_xs(&ref_sym_super(x, 32, Iq4, -32, 31), o),
            GgmlType::IQ4_NL => {
                let (_, max) = abs_max(x);
                let d = max / -127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x.iter().map(|&v| Iq4.index(v * id)).collect();
                o[..2].copy_from_slice(&h(d));
                write_legacy_quants(&q, false, &mut o[2..]);
            }
            GgmlType::Q1_0 => {
                // ggml's quantize_row_q1_0_ref: d = mean |x|, bit = x >= 0.
                let d = x.iter().map(|v| v.abs()).sum::<f32>() / x.len() as f32;
                o[..2].copy_from_slice(&h(d));
                o[2..].fill(0);
                for (j, &v) in x.iter().enumerate() {
                    if v >= 0.0 {
                        o[2 + j / 8] |= 1 << (j % 8);
                    }
                }
            }
            GgmlType::Q2_0 => {
                // ggml's quantize_row_q2_0_ref: d = max |x|, q = round(x / d) + 1.
                let (d, _) = abs_max(x);
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                o[..2].copy_from_slice(&h(d));
                o[2..].fill(0);
                for (j, &v) in x.iter().enumerate() {
                    let q = ((v * id).round() as i32 + 1).clamp(0, 3) as u8;
                    o[2 + j / 4] |= q << (2 * (j % 4));
                }
            }
            GgmlType::NVFP4 => {
                // ggml's quantize_row_nvfp4_ref: scale ue4m3(amax / 6), nearest value.
                for s in 0..4 {
                    let xs = &x[16 * s..16 * s + 16];
                    let (amax, _) = abs_max(xs);
                    let code = ref_fp32_to_ue4m3(amax / 6.0);
                    let d = crate::quants::nvfp4::ue4m3_to_f32(code);
                    o[s] = code;
                    let idx = |v: f32| {
                        (0..16u8)
                            .min_by(|&a, &b| {
                                let ea = (crate::quants::nvfp4::KVALUES_FP4[a as usize] as f32 * d
                                    - v)
                                    .abs();
                                let eb = (crate::quants::nvfp4::KVALUES_FP4[b as usize] as f32 * d
                                    - v)
                                    .abs();
                                ea.partial_cmp(&eb).unwrap()
                            })
                            .unwrap()
                    };
                    for j in 0..8 {
                        o[4 + 8 * s + j] = idx(xs[j]) | (idx(xs[j + 8]) << 4);
                    }
                }
            }
            GgmlType::MXFP4 => {
                // ggml's quantize_row_mxfp4_ref: exponent floor(log2 amax) - 2,
                // nearest value (the first of equals).
                use crate::quants::mxfp4::{e8m0_to_f32_half, KVALUES_FP4};
                let (amax, _) = abs_max(x);
                let e = if amax > 0.0 {
                    super::mxfp4::reference_exponent(amax) as u8
                } else {
                    0
                };
                let d = e8m0_to_f32_half(e);
                o[0] = e;
                let idx = |v: f32| {
                    (0..16u8)
                        .min_by(|&a, &b| {
                            let ea = (KVALUES_FP4[a as usize] as f32 * d - v).abs();
                            let eb = (KVALUES_FP4[b as usize] as f32 * d - v).abs();
                            ea.partial_cmp(&eb).unwrap().then(a.cmp(&b))
                        })
                        .unwrap()
                };
                for j in 0..16 {
                    o[1 + j] = idx(x[j]) | (idx(x[j + 16]) << 4);
                }
            }
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => {
                // ggml's quantize_row_tq{1,2}_0_ref: d = max |x|, t = round(x / d) + 1.
                let (d, _) = abs_max(x);
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let t: Vec<u8> = x
                    .iter()
                    .map(|&v| ((v * id).round() as i32 + 1) as u8)
                    .collect();
                let n = o.len() - 2;
                if ty == GgmlType::TQ1_0 {
                    super::ternary::pack_trits(&t, &mut o[..n]);
                } else {
                    super::ternary::pack_tq2(&t, &mut o[..n]);
                }
                o[n..].copy_from_slice(&h(d));
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
        }
    }
    out
}

/// ggml's `ggml_fp32_to_ue4m3`: the UE4M3 byte of a positive `x` (round half up
/// on the fourth mantissa bit, subnormals by `x · 512 + 0.5`, saturating at 0x7E).
fn ref_fp32_to_ue4m3(x: f32) -> u8 {
    if !(x > 0.0) {
        return 0;
    }
    let x = x.min(448.0);
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127 + 7;
    if exp <= 0 {
        let man = (x * 512.0 + 0.5) as i32;
        return if man < 1 { 0 } else { man.min(7) as u8 };
    }
    if exp >= 15 {
        return 0x7E;
    }
    let mut man = ((bits >> 20) & 7) as i32 + ((bits >> 19) & 1) as i32;
    let mut exp = exp;
    if man > 7 {
        man = 0;
        exp += 1;
        if exp >= 15 {
            return 0x7E;
        }
    }
    ((exp << 3) | man) as u8
}

/// Relative RMSE bound per type on Gaussian data (about 1.25x what the
/// quantizers reach, so a regression shows).
fn rmse_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::Q8_0 => 0.0068,
        GgmlType::Q6_K => 0.021,
        GgmlType::Q5_1 | GgmlType::Q5_K => 0.043,
        GgmlType::Q5_0 => 0.05,
        GgmlType::Q4_1 | GgmlType::Q4_K => 0.088,
        GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => 0.1,
        GgmlType::Q3_K => 0.18,
        GgmlType::Q2_K => 0.33,
        GgmlType::NVFP4 => 0.112,
        GgmlType::MXFP4 => 0.14,
        GgmlType::TQ2_0 => 0.42,
        GgmlType::TQ1_0 => 0.5,
        GgmlType::Q2_0 => 0.45,
        GgmlType::Q1_0 => 0.75,
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------

#[test]
fn round_trip_beats_reference_rounding() {
    let sets = [
        ("gauss", gaussian_rows(48, 1)),
        ("outliers", outlier_rows(48, 2)),
    ];
    let mut report = String::new();
    for ty in block_types() {
        for (name, x) in &sets {
            let ours = quantize_to_vec(ty, x, COLS, None).unwrap();
            let y = decode(ty, &ours, x.len());
            let r = decode(ty, &reference(ty, x), x.len());
            let (e_ours, e_ref) = (sq_err(x, &y, None), sq_err(x, &r, None));
            let scale = rms(x) * (x.len() as f64).sqrt();
            let (rel_ours, rel_ref) = (e_ours.sqrt() / scale, e_ref.sqrt() / scale);
            report += &format!(
                "{:7} {:9} rel RMSE ours {:.5} ref {:.5} ({:+.1}% MSE)\n",
                ty.name(),
                name,
                rel_ours,
                rel_ref,
                100.0 * (e_ours / e_ref - 1.0)
            );
            assert!(
                e_ours <= e_ref,
                "{ty} {name}: ours {e_ours} > reference {e_ref}"
            );
            if *name == "gauss" {
                assert!(rel_ours < rmse_bound(ty), "{ty}: relative RMSE {rel_ours}");
            }
        }
    }
    println!("{report}");
}

#[test]
fn importance_lowers_weighted_error() {
    let mut report = String::new();
    for (seed, x) in [(3, gaussian_rows(32, 4)), (5, outlier_rows(32, 6))] {
        let qw = importance(seed);
        for ty in block_types() {
            let plain = decode(ty, &quantize_to_vec(ty, &x, COLS, None).unwrap(), x.len());
            let weighted = decode(
                ty,
                &quantize_to_vec(ty, &x, COLS, Some(&qw)).unwrap(),
                x.len(),
            );
            let (e_plain, e_w) = (
                sq_err(&x, &plain, Some(&qw)),
                sq_err(&x, &weighted, Some(&qw)),
            );
            report += &format!(
                "{:7} seed {seed}: weighted error {:+.1}% with importance\n",
                ty.name(),
                100.0 * (e_w / e_plain - 1.0)
            );
            assert!(e_w < e_plain, "{ty}: {e_w} >= {e_plain}");
        }
    }
    println!("{report}");
}

#[test]
fn q8_0_without_importance_is_the_reference_rounding() {
    let x = outlier_rows(8, 7);
    assert_eq!(
        quantize_to_vec(GgmlType::Q8_0, &x, COLS, None).unwrap(),
        reference(GgmlType::Q8_0, &x)
    );
}

#[test]
fn floats_round_to_nearest_even() {
    let x = [
        1.0,
        -2.5,
        1.0 + f32::EPSILON,
        f32::from_bits(0x3f80_8000), // bf16 tie: even (down)
        f32::from_bits(0x3f81_8000), // bf16 tie: even (up)
        65520.0,                     // f16 overflow
        1e-8,
        f32::INFINITY,
        f32::NAN,
    ];
    let b = quantize_to_vec(GgmlType::BF16, &x, x.len(), None).unwrap();
    let bits: Vec<u16> = b
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(&bits[..5], &[0x3f80, 0xc020, 0x3f80, 0x3f80, 0x3f82]);
    assert_eq!(bits[7], 0x7f80);
    assert!(half::bf16::from_bits(bits[8]).is_nan());
    let f = quantize_to_vec(GgmlType::F16, &x, x.len(), None).unwrap();
    let y = decode(GgmlType::F16, &f, x.len());
    assert_eq!(y[1], -2.5);
    assert_eq!(y[5], f32::INFINITY);
    assert!(y[8].is_nan());
    assert!(quantize_to_vec(GgmlType::F32, &x, 4, None).is_err());
    let f = quantize_to_vec(GgmlType::F32, &x, 3, None).unwrap();
    assert_eq!(f[..4], 1f32.to_le_bytes());
}

#[test]
fn lossless_on_its_own_grid() {
    // Data decoded from random blocks (f16 scales 2^-10..2^-4, random quants)
    // quantizes back to the same values. Q4_1 data also fits Q5_1 exactly.
    let mut rng = StdRng::seed_from_u64(11);
    let cases = [
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::Q5_0, GgmlType::Q5_0),
        (GgmlType::Q4_1, GgmlType::Q4_1),
        (GgmlType::Q5_1, GgmlType::Q5_1),
        (GgmlType::Q4_1, GgmlType::Q5_1),
        (GgmlType::IQ4_NL, GgmlType::IQ4_NL),
        (GgmlType::Q8_0, GgmlType::Q8_0),
    ];
    for (from, to) in cases {
        let bb = from.block_bytes();
        let blocks = 512;
        let mut src = vec![0u8; blocks * bb];
        rng.fill(&mut src[..]);
        for b in src.chunks_exact_mut(bb) {
            let d: f32 = 2f32.powi(rng.gen_range(-10..-4)) * rng.gen_range(1.0..2.0);
            b[..2].copy_from_slice(&h(d));
            if from == GgmlType::Q8_0 {
                // The reference rounding maps the largest magnitude to ±127.
                for q in &mut b[2..] {
                    if *q == 0x80 {
                        *q = 0x81;
                    }
                }
                b[2 + rng.gen_range(0..32)] = if rng.gen() { 127 } else { 0x81 };
            }
            if matches!(from, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let m: f32 = -d * rng.gen_range(0.0..16.0);
                b[2..4].copy_from_slice(&h(m));
            }
        }
        let x = decode(from, &src, blocks * 32);
        for qw in [None, Some(importance(12))] {
            let qw = qw.as_ref().map(|v| &v[..32 * 16]);
            let y = decode(to, &quantize_to_vec(to, &x, 32 * 16, qw).unwrap(), x.len());
            let bad = x.iter().zip(&y).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad,
                0,
                "{from} data as {to} (importance {}): {bad} differ",
                qw.is_some()
            );
        }
    }
}

/// Q1_0 and Q2_0 data (random f16 scales and codes, every Q2_0 block using both
/// ends of its grid) quantizes back to the same values, with and without
/// importance; so does NVFP4 data whose sub-blocks each hold a ±12 code (the
/// scale search starts from the largest element on the grid's end), and MXFP4
/// data whose blocks each hold a ±12 code.
#[test]
fn low_bit_types_are_lossless_on_their_own_grid() {
    let mut rng = StdRng::seed_from_u64(13);
    let row = 512;
    for ty in [
        GgmlType::Q1_0,
        GgmlType::Q2_0,
        GgmlType::NVFP4,
        GgmlType::MXFP4,
    ] {
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        let blocks = 4 * row / be;
        let mut src = vec![0u8; blocks * bb];
        rng.fill(&mut src[..]);
        for b in src.chunks_exact_mut(bb) {
            match ty {
                GgmlType::NVFP4 => {
                    for s in 0..4 {
                        // Normal UE4M3 codes (exponent 1..14), and a ±12 nibble.
                        b[s] = (rng.gen_range(1..15u8) << 3) | rng.gen_range(0..8u8);
                        let j = 4 + 8 * s + rng.gen_range(0..8);
                        b[j] = (b[j] & 0xF0) | if rng.gen() { 7 } else { 15 };
                    }
                }
                GgmlType::TQ1_0 | GgmlType::TQ2_0 => {
                    // Random codes (trits for TQ1_0) with both ends of the grid used.
                    let n = bb - 2;
                    let top = if ty == GgmlType::TQ1_0 { 3 } else { 4 };
                    let mut t: Vec<u8> = (0..256).map(|_| rng.gen_range(0..top)).collect();
                    (t[0], t[1]) = (0, top - 1);
                    if ty == GgmlType::TQ1_0 {
                        super::ternary::pack_trits(&t, &mut b[..n]);
                    } else {
                        super::ternary::pack_tq2(&t, &mut b[..n]);
                    }
                    let d: f32 = 2f32.powi(rng.gen_range(-10..-4)) * rng.gen_range(1.0..2.0);
                    b[n..].copy_from_slice(&h(d));
                }
                GgmlType::MXFP4 => {
                    b[0] = rng.gen_range(100..140u8);
                    let j = 1 + rng.gen_range(0..16);
                    b[j] = (b[j] & 0xF0) | if rng.gen() { 7 } else { 15 };
                }
                _ => {
                    let d: f32 = 2f32.powi(rng.gen_range(-10..-4)) * rng.gen_range(1.0..2.0);
                    b[..2].copy_from_slice(&h(d));
                    if ty == GgmlType::Q2_0 {
                        b[2] = (b[2] & 0xF0) | 0b1100; // codes 0 (-1) and 3 (+2)
                    }
                }
            }
        }
        let x = decode(ty, &src, blocks * be);
        for qw in [None, Some(importance(14))] {
            let qw = qw.as_ref().map(|v| &v[..row]);
            let y = decode(ty, &quantize_to_vec(ty, &x, row, qw).unwrap(), x.len());
            let bad = x.iter().zip(&y).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "{ty} (importance {}): {bad} differ", qw.is_some());
        }
    }
}

#[test]
fn survives_nan_inf_and_degenerate_rows() {
    let n = 512;
    let mut rows: Vec<Vec<f32>> = vec![
        vec![0.0; n],
        vec![0.25; n],
        vec![-3.0; n],
        vec![1e30; n],
        vec![1e-30; n],
        vec![f32::from_bits(1); n],
    ];
    let g = gaussian_rows(1, 13);
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38, -6e37] {
        let mut r = g[..n].to_vec();
        r[5] = special;
        r[300] = special;
        rows.push(r);
    }
    rows.push(vec![f32::NAN; n]);
    let qws: [Option<Vec<f32>>; 4] = [
        None,
        Some(vec![0.0; n]),
        Some(vec![f32::NAN; n]),
        Some(
            (0..n)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1e20 })
                .collect(),
        ),
    ];
    for ty in ALL_TYPES {
        for (ri, row) in rows.iter().enumerate() {
            for qw in &qws {
                let bytes = quantize_to_vec(ty, row, n, qw.as_deref()).unwrap();
                let y = decode(ty, &bytes, n);
                if ri == 0 {
                    assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros");
                }
                if ri == 1 || ri == 2 {
                    let rel = rms(&y.iter().zip(row).map(|(a, b)| a - b).collect::<Vec<_>>())
                        / row[0].abs() as f64;
                    assert!(rel < 0.1, "{ty}: constant row {ri} off by {rel}");
                }
            }
        }
    }
}

#[test]
fn dispatcher_checks_sizes_and_splits_rows() {
    let x = gaussian_rows(4, 14);
    let ty = GgmlType::Q4_K;
    assert!(quantize_to_vec(ty, &x, 100, None).is_err());
    assert!(quantize_to_vec(ty, &x[..1000], 256, None).is_err());
    assert!(quantize_to_vec(ty, &x, COLS, Some(&[1.0; 10])).is_err());
    let mut short = vec![0u8; 10];
    assert!(quantize(ty, &x, COLS, None, &mut short).is_err());
    assert!(quantize_to_vec(GgmlType::Q4_0, &[], 0, None)
        .unwrap()
        .is_empty());
    // Row by row (importance per column) equals the per-type function per row.
    let qw = importance(15);
    let all = quantize_to_vec(ty, &x, COLS, Some(&qw)).unwrap();
    let rb = ty.bytes_for(COLS).unwrap();
    for (r, row) in x.chunks(COLS).enumerate() {
        let mut one = vec![0u8; rb];
        quantize_q4_k(row, Some(&qw), &mut one);
        assert_eq!(&all[r * rb..(r + 1) * rb], &one[..]);
    }
    // The parallel path gives the same bytes as one thread.
    let big = gaussian_rows(64, 16);
    let par = quantize_to_vec(GgmlType::Q4_0, &big, COLS, None).unwrap();
    let mut seq = vec![0u8; par.len()];
    let rb = GgmlType::Q4_0.bytes_for(COLS).unwrap();
    for (row, out) in big.chunks(COLS).zip(seq.chunks_mut(rb)) {
        quantize_q4_0(row, None, out);
    }
    assert_eq!(par, seq);
}

/// Seconds this thread has run on a CPU (Linux `schedstat`), else wall-clock
/// seconds since `start`: throughput on a busy machine should not count the time
/// other processes had the core.
fn thread_seconds(start: std::time::Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 * 1e-9)
        .unwrap_or_else(|| start.elapsed().as_secs_f64())
}

/// Prints single-thread quantization throughput per type (MB/s of f32 input, CPU
/// time of this thread): `cargo test -p kernels throughput -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let x = gaussian_rows(256, 17);
    let qw = importance(18);
    let rb = |ty: GgmlType| ty.bytes_for(COLS).unwrap();
    for ty in ALL_TYPES {
        let f = block_fn(ty);
        for with in [false, true] {
            let mut dst = vec![0u8; ty.bytes_for(x.len()).unwrap()];
            let wall = std::time::Instant::now();
            let t0 = thread_seconds(wall);
            let mut reps = 0;
            while thread_seconds(wall) - t0 < 1.0 {
                for (row, out) in x.chunks(COLS).zip(dst.chunks_mut(rb(ty))) {
                    match f {
                        Some(f) => f(row, with.then_some(&qw[..]), out),
                        None => quantize(ty, row, COLS, None, out).unwrap(),
                    }
                }
                reps += 1;
            }
            let mb = (reps * x.len() * 4) as f64 / 1e6;
            println!(
                "{:7} importance {:5}: {:8.1} MB/s",
                ty.name(),
                with,
                mb / (thread_seconds(wall) - t0)
            );
        }
    }
}
