//! Bits where they reduce error most: for a target bits-per-weight, choose a type
//! per tensor minimising the summed importance-weighted relative error.
//!
//! Each tensor is quantized to every candidate type that fits its rows and the
//! error `Σ_j imp_j ‖w_:j − ŵ_:j‖² / Σ_j imp_j ‖w_:j‖²` is measured (imp = the
//! imatrix column weights, or 1). On each tensor's lower convex hull of
//! (bytes, error), upgrades are taken greedily, best error reduction per byte
//! first, while the budget allows. (The measured-sensitivity refinement of a
//! later issue replaces the error proxy, not the allocator.)

use crate::gguf_quantize::{importance_of, quantize_stacked, PlannedTensor};
use anyhow::{bail, Result};
use kernels::GgmlType;
use model::calib::Imatrix;
use model::Model;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Block types the allocator may choose from (it keeps those that fit each tensor's rows).
pub const CANDIDATES: [GgmlType; 13] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::IQ4_XS,
    GgmlType::Q4_0,
    GgmlType::IQ4_NL,
    GgmlType::Q4_K,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_K,
    GgmlType::Q5_1,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::F16,
];

/// One option for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Storage type.
    pub ty: GgmlType,
    /// Stored bytes.
    pub bytes: u64,
    /// Importance-weighted relative squared error.
    pub err: f64,
}

/// Importance-weighted relative squared error of `restored` against `values`.
/// `imp` holds one row of `cols` weights per matrix: one, or one per expert
/// of a stacked experts' tensor (whose rows are expert-major).
pub fn weighted_rel_error(
    values: &[f32],
    restored: &[f32],
    cols: usize,
    imp: Option<&[f32]>,
) -> f64 {
    let matrices = imp.map_or(1, |i| (i.len() / cols.max(1)).max(1));
    let rows_per_matrix = (values.len() / cols.max(1) / matrices).max(1);
    let (mut num, mut den) = (0f64, 0f64);
    for (r, (row_v, row_r)) in values.chunks(cols).zip(restored.chunks(cols)).enumerate() {
        let m = (r / rows_per_matrix).min(matrices - 1);
        for (j, (&v, &r)) in row_v.iter().zip(row_r).enumerate() {
            let w = imp.map_or(1.0, |i| i[m * cols + j] as f64);
            num += w * ((v - r) as f64).powi(2);
            den += w * (v as f64).powi(2);
        }
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// The types tried for a tensor with `cols` columns: the given list with
/// llama.cpp's fallback for types that do not fit the rows (duplicates dropped),
/// or every type of [`CANDIDATES`] that fits.
pub fn types_for(cols: usize, allowed: Option<&[GgmlType]>) -> Vec<GgmlType> {
    let mut out = Vec::new();
    match allowed {
        Some(list) => {
            for &t in list {
                let t = crate::gguf_mix::fallback(t, cols);
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        None => out.extend(
            CANDIDATES
                .iter()
                .copied()
                .filter(|t| cols.is_multiple_of(t.block_elems())),
        ),
    }
    out
}

/// Measures every candidate type (see [`types_for`]) of every 2-D tensor in
/// `names` (1-D tensors get the single option F32).
pub fn measure(
    model: &Model,
    names: &[String],
    imatrix: Option<&Imatrix>,
    allowed: Option<&[GgmlType]>,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Vec<Candidate>>> {
    let mut all = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let t = model.tensor(name)?;
        let values = t.to_f32()?;
        let cols = *t.shape.last().unwrap_or(&1);
        if t.shape.len() < 2 {
            all.push(vec![Candidate {
                ty: GgmlType::F32,
                bytes: values.len() as u64 * 4,
                err: 0.0,
            }]);
            continue;
        }
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "tensor '{name}' holds {} at element {bad}: refusing to quantize",
                values[bad]
            );
        }
        let imp = importance_of(imatrix, name, &t.shape)?;
        let mut opts = Vec::new();
        let mut restored = vec![0f32; values.len()];
        for ty in types_for(cols, allowed) {
            let bytes = quantize_stacked(&values, &t.shape, ty, imp.as_deref())?;
            kernels::quants::dequantize(ty, &bytes, &mut restored)?;
            let err = weighted_rel_error(&values, &restored, cols, imp.as_deref());
            opts.push(Candidate {
                ty,
                bytes: bytes.len() as u64,
                err,
            });
        }
        all.push(opts);
        progress(i + 1, names.len(), name);
    }
    Ok(all)
}

/// Lower convex hull of a tensor's options by (bytes, error), smallest first:
/// the only options a greedy budget allocation should step through.
fn hull(opts: &[Candidate]) -> Vec<Candidate> {
    let mut sorted = opts.to_vec();
    sorted.sort_by(|a, b| a.bytes.cmp(&b.bytes).then(a.err.total_cmp(&b.err)));
    let mut h: Vec<Candidate> = Vec::new();
    for o in sorted {
        if h.last().is_some_and(|l| o.err >= l.err) {
            continue; // more bytes for no less error
        }
        while h.len() >= 2 {
            let (a, b) = (h[h.len() - 2], h[h.len() - 1]);
            // Drop b if it lies on or above the segment a→o.
            let cross = (b.bytes - a.bytes) as f64 * (o.err - a.err)
                - (b.err - a.err) * (o.bytes - a.bytes) as f64;
            if cross <= 0.0 {
                h.pop();
            } else {
                break;
            }
        }
        h.push(o);
    }
    h
}

/// A possible upgrade: tensor `t` from hull step `from` to `from + 1`.
#[derive(PartialEq)]
struct Step {
    gain_per_byte: f64,
    t: usize,
    from: usize,
}
impl Eq for Step {}
impl PartialOrd for Step {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Step {
    fn cmp(&self, o: &Self) -> Ordering {
        self.gain_per_byte
            .total_cmp(&o.gain_per_byte)
            .then(o.t.cmp(&self.t))
    }
}

/// Chooses one candidate per tensor so the total bytes stay within
/// `target_bpw × n_params / 8`; returns the chosen options.
pub fn allocate(options: &[Vec<Candidate>], target_bpw: f64) -> Result<Vec<Candidate>> {
    let hulls: Vec<Vec<Candidate>> = options.iter().map(|o| hull(o)).collect();
    let params: f64 = options
        .iter()
        .map(|o| {
            let x = o[0];
            x.bytes as f64 * 8.0 / x.ty.bits_per_weight()
        })
        .sum();
    let budget = target_bpw * params / 8.0;
    let min_bytes: u64 = hulls.iter().map(|h| h[0].bytes).sum();
    let max_bytes: u64 = hulls.iter().map(|h| h[h.len() - 1].bytes).sum();
    if (min_bytes as f64) > budget {
        bail!(
            "--target-bpw {target_bpw} is below the smallest mix possible for this model ({:.3} bits per weight)",
            min_bytes as f64 * 8.0 / params
        );
    }
    let mut at = vec![0usize; hulls.len()];
    let mut used = min_bytes as f64;
    if (max_bytes as f64) <= budget {
        return Ok(hulls.iter().map(|h| h[h.len() - 1]).collect());
    }
    let step = |t: usize, from: usize| -> Option<Step> {
        let h = &hulls[t];
        (from + 1 < h.len()).then(|| Step {
            gain_per_byte: (h[from].err - h[from + 1].err)
                / (h[from + 1].bytes - h[from].bytes) as f64,
            t,
            from,
        })
    };
    let mut heap: BinaryHeap<Step> = (0..hulls.len()).filter_map(|t| step(t, 0)).collect();
    while let Some(s) = heap.pop() {
        let h = &hulls[s.t];
        let extra = (h[s.from + 1].bytes - h[s.from].bytes) as f64;
        if used + extra > budget {
            continue; // this tensor cannot afford its next step; others may
        }
        used += extra;
        at[s.t] = s.from + 1;
        if let Some(next) = step(s.t, s.from + 1) {
            heap.push(next);
        }
    }
    Ok(hulls.iter().zip(&at).map(|(h, &i)| h[i]).collect())
}

/// A plan for `target_bpw`: every tensor of `model` gets the allocated type.
/// `allowed` limits the candidate types (see [`types_for`]).
pub fn plan_for_target(
    model: &Model,
    target_bpw: f64,
    imatrix: Option<&Imatrix>,
    allowed: Option<&[GgmlType]>,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<PlannedTensor>> {
    check_target(target_bpw)?;
    let names = model.tensor_names();
    let options = measure(model, &names, imatrix, allowed, progress)?;
    plan_from_options(model, &options, target_bpw, "relative error")
}

fn check_target(target_bpw: f64) -> Result<()> {
    if !(target_bpw > 0.0 && target_bpw <= 32.0) {
        bail!("--target-bpw {target_bpw} is outside (0, 32]: 32 is F32, the largest type");
    }
    Ok(())
}

/// A plan for `target_bpw` from per-tensor options already measured (one list
/// per tensor of `model`, in `tensor_names` order); `cost` names what the
/// options' `err` is, for the plan's notes.
pub fn plan_from_options(
    model: &Model,
    options: &[Vec<Candidate>],
    target_bpw: f64,
    cost: &str,
) -> Result<Vec<PlannedTensor>> {
    check_target(target_bpw)?;
    let names = model.tensor_names();
    if names.len() != options.len() {
        bail!(
            "{} option lists for the {} tensors of {}",
            options.len(),
            names.len(),
            model.path.display()
        );
    }
    let chosen = allocate(options, target_bpw)?;
    names
        .into_iter()
        .zip(chosen)
        .map(|(name, o)| {
            let shape = model.tensor_meta(&name)?.1;
            let note =
                (shape.len() > 1).then(|| format!("target {target_bpw} bpw: {cost} {:.2e}", o.err));
            Ok(PlannedTensor {
                name,
                shape,
                ty: o.ty,
                note,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(ty: GgmlType, bytes: u64, err: f64) -> Candidate {
        Candidate { ty, bytes, err }
    }

    #[test]
    fn hull_drops_dominated_and_concave_points() {
        let h = hull(&[
            o(GgmlType::Q4_0, 18, 0.10),
            o(GgmlType::Q4_1, 20, 0.09), // above the segment Q4_0 → Q5_0
            o(GgmlType::Q5_0, 22, 0.03),
            o(GgmlType::Q5_1, 24, 0.05), // dominated: more bytes, more error
            o(GgmlType::Q8_0, 34, 0.001),
        ]);
        let tys: Vec<_> = h.iter().map(|x| x.ty).collect();
        assert_eq!(tys, vec![GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0]);
    }

    #[test]
    fn budget_goes_where_error_drops_most() {
        // Two tensors of 32 weights: A gains a lot from Q8_0, B little.
        let a = vec![o(GgmlType::Q4_0, 18, 0.5), o(GgmlType::Q8_0, 34, 0.01)];
        let b = vec![o(GgmlType::Q4_0, 18, 0.02), o(GgmlType::Q8_0, 34, 0.001)];
        // 64 weights at 6.5 bpw = 52 bytes: room for exactly one upgrade.
        let chosen = allocate(&[a.clone(), b.clone()], 6.5).unwrap();
        assert_eq!(
            (chosen[0].ty, chosen[1].ty),
            (GgmlType::Q8_0, GgmlType::Q4_0)
        );
        assert!(allocate(&[a.clone(), b.clone()], 3.0)
            .unwrap_err()
            .to_string()
            .contains("below the smallest"));
        let all = allocate(&[a, b], 9.0).unwrap();
        assert!(all.iter().all(|x| x.ty == GgmlType::Q8_0));
    }

    #[test]
    fn weighted_error_uses_column_importance() {
        let v = [1.0f32, 1.0, 1.0, 1.0];
        let r = [1.0f32, 0.0, 1.0, 0.0];
        assert!((weighted_rel_error(&v, &r, 2, None) - 0.5).abs() < 1e-12);
        assert!((weighted_rel_error(&v, &r, 2, Some(&[3.0, 1.0])) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn weighted_error_of_stacked_experts_uses_each_experts_importance() {
        // Two experts of one row each: the first errs in column 1, the second in column 0.
        let v = [1.0f32, 1.0, 1.0, 1.0];
        let r = [1.0f32, 0.0, 0.0, 1.0];
        // Expert 0 weighs column 1 by 3, expert 1 weighs column 0 by 1: error (3 + 1) / (4 + 2).
        let imp = [1.0, 3.0, 1.0, 1.0];
        let e = weighted_rel_error(&v, &r, 2, Some(&imp));
        assert!((e - 4.0 / 6.0).abs() < 1e-12, "{e}");
    }
}
