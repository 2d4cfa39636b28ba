//! What trains in a student and how the trained values reach its forward pass.
//!
//! Three kinds of trainable variable, chosen per tensor:
//! - the tensor itself (a float student);
//! - a float master copy of a quantized tensor, seen by the forward pass through
//!   its block codec, `Ŵ = dequant(quant(W))`, with the gradient passed straight
//!   through (`∂L/∂W := ∂L/∂Ŵ`, the straight-through estimator), so the tuned
//!   tensor is written back in its own type;
//! - a low-rank adapter `W = W₀ + s·B·A` on a frozen block linear (`A` is
//!   `[r, in]`, `B` is `[out, r]`, `s = α/r`), merged into the weights at the end;
//!   one adapter per expert on a stack of routed experts.
//!
//! A mixture-of-experts router never trains (see [`crate::moe`]).
//!
//! The exact zeros of a pruned student stay zero whichever kind trains: masked
//! entries are reset after every update (adapters: in the merged weight).

use crate::gemm::{par_gemm, MatRef};
use crate::params::{Grads, Params};
use crate::train::{Masks, Trainable};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::arch::Role;
use std::borrow::Cow;
use std::collections::HashMap;

/// How a student trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// The chosen tensors train directly (quantized ones through their codec).
    Full(Trainable),
    /// A rank-`rank` adapter on every block linear, scaled by `alpha / rank`;
    /// `A` starts uniform in `±1/√in` (from `seed`), `B` at zero, so training
    /// starts from the student as it is.
    Lora {
        /// Rank of the adapters.
        rank: usize,
        /// Scale numerator (`s = alpha / rank`).
        alpha: f64,
        /// Seed of `A`'s initial values.
        seed: u64,
    },
}

/// One trainable variable and the tensor it drives.
struct Var {
    /// The parameter tensor it drives.
    name: String,
    /// Whether it is a matrix (takes weight decay).
    matrix: bool,
    kind: Kind,
}

enum Kind {
    /// The parameter tensor itself.
    Param,
    /// The float master of a tensor stored as `ty` (`cols` per row).
    Quantized {
        ty: GgmlType,
        cols: usize,
        master: Vec<f32>,
    },
    /// `W_e = base_e + scale·B_e·A_e` for each of `experts` stacked
    /// `[rows, cols]` matrices (one for a plain linear).
    Lora {
        base: Vec<f32>,
        a: Vec<f32>,
        b: Vec<f32>,
        experts: usize,
        rank: usize,
        rows: usize,
        cols: usize,
        scale: f32,
    },
}

/// A student's weights (what the forward pass sees) and its trainable variables.
pub struct Student {
    /// The weights the forward pass uses, kept up to date with the variables.
    pub params: Params<f32>,
    /// The pruned zeros that stay zero.
    pub masks: Masks,
    vars: Vec<Var>,
}

/// `Ŵ = dequant(quant(W))` for a tensor stored as `ty` with rows of `cols`.
pub fn fake_quantize(ty: GgmlType, master: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    let bytes = kernels::quants::quantize_to_vec(ty, master, cols, None)?;
    kernels::quants::dequantize(ty, &bytes, out)?;
    Ok(())
}

/// Uniform values in `±bound` from a splitmix64 stream of `seed`.
fn uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut rng = model::calib::SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * bound
        })
        .collect()
}

/// `c = a·b` for row-major `a` `[m, k]` and `b` `[k, n]`, or with `a` / `b`
/// transposed as stored (`ta`: `a` is stored `[k, m]`; `tb`: `b` is `[n, k]`).
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
    let am = if ta {
        MatRef::row_major(a, k, m, m).t()
    } else {
        MatRef::row_major(a, m, k, k)
    };
    let bm = if tb {
        MatRef::row_major(b, n, k, k).t()
    } else {
        MatRef::row_major(b, k, n, n)
    };
    let mut c = vec![0f32; m * n];
    par_gemm(am, bm, &mut c, false);
    c
}

/// Every tensor of `params`, writable, by name.
fn by_name(params: &mut Params<f32>) -> HashMap<String, &mut [f32]> {
    params
        .tensors_mut()
        .into_iter()
        .map(|t| (t.name, t.data))
        .collect()
}

impl Student {
    /// Sets up `params` to train by `method`. `types` gives each tensor's stored
    /// type (a float type, or a quantized one whose tensors then train through
    /// their codec); tensors it does not name are float.
    pub fn new(
        params: Params<f32>,
        types: &HashMap<String, GgmlType>,
        method: Method,
    ) -> Result<Student> {
        let masks = Masks::of_zeros(&params, 0.1);
        let arch = params.config.arch;
        let mut vars = Vec::new();
        for (i, t) in params.tensors().into_iter().enumerate() {
            let ty = types.get(&t.name).copied().unwrap_or(GgmlType::F32);
            let quantized = !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
            let matrix = t.shape.len() >= 2;
            let kind = match method {
                Method::Full(trainable) if trainable.includes(arch, &t.name) => {
                    if quantized {
                        Kind::Quantized {
                            ty,
                            cols: *t.shape.last().unwrap_or(&1),
                            master: t.data.to_vec(),
                        }
                    } else {
                        Kind::Param
                    }
                }
                Method::Lora { rank, alpha, seed } if arch.role(&t.name) == Some(Role::Linear) => {
                    if quantized {
                        bail!(
                            "tensor '{}' is {ty}: adapters on a quantized student are not supported (train it with --train blocks or all, through its codec)",
                            t.name
                        );
                    }
                    // A stack of routed experts `[experts, rows, cols]` gets one
                    // adapter per expert.
                    let (lead, matrix) = t.shape.split_at(t.shape.len() - 2);
                    let (experts, rows, cols) = (lead.iter().product(), matrix[0], matrix[1]);
                    if rank == 0 || rank > rows.min(cols) {
                        bail!(
                            "adapter rank {rank} for '{}' ({rows}×{cols}): it must be between 1 and {}",
                            t.name,
                            rows.min(cols)
                        );
                    }
                    Kind::Lora {
                        base: t.data.to_vec(),
                        a: uniform(
                            experts * rank * cols,
                            1.0 / (cols as f32).sqrt(),
                            seed.wrapping_add(i as u64),
                        ),
                        b: vec![0.0; experts * rows * rank],
                        experts,
                        rank,
                        rows,
                        cols,
                        scale: (alpha / rank as f64) as f32,
                    }
                }
                _ => continue,
            };
            vars.push(Var {
                name: t.name.clone(),
                matrix,
                kind,
            });
        }
        Ok(Student {
            params,
            masks,
            vars,
        })
    }

    /// Element count of every variable, in order (for the optimizer).
    pub fn sizes(&self) -> Vec<usize> {
        self.state().iter().map(|v| v.len()).collect()
    }

    /// Whether each variable takes weight decay (matrices and adapters do).
    pub fn decay(&self) -> Vec<bool> {
        self.vars
            .iter()
            .flat_map(|v| match v.kind {
                Kind::Lora { .. } => vec![true, true],
                _ => vec![v.matrix],
            })
            .collect()
    }

    /// Trainable values in all.
    pub fn n_trainable(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// Whether tensor `name` is driven by a variable (and so may have changed).
    pub fn trains(&self, name: &str) -> bool {
        self.vars.iter().any(|v| v.name == name)
    }

    /// The stored type of a quantized tensor that trains through its codec.
    pub fn quantized_type(&self, name: &str) -> Option<GgmlType> {
        self.vars
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| match v.kind {
                Kind::Quantized { ty, .. } => Some(ty),
                _ => None,
            })
    }

    /// The values to write for tensor `name`: a quantized tensor's master (to be
    /// encoded in its type, which gives the bytes the forward pass saw),
    /// otherwise the weights themselves.
    pub fn values(&self, name: &str) -> Option<&[f32]> {
        match self.vars.iter().find(|v| v.name == name).map(|v| &v.kind) {
            Some(Kind::Quantized { master, .. }) => Some(master),
            _ => self.params.get(name),
        }
    }

    /// The variables' values, in order (what a checkpoint saves).
    pub fn state(&self) -> Vec<&[f32]> {
        let mut out = Vec::new();
        for v in &self.vars {
            match &v.kind {
                Kind::Param => out.push(self.params.get(&v.name).expect("a parameter")),
                Kind::Quantized { master, .. } => out.push(master),
                Kind::Lora { a, b, .. } => {
                    out.push(a);
                    out.push(b);
                }
            }
        }
        out
    }

    /// The variables, writable, in [`Student::state`] order. Call
    /// [`Student::sync`] after changing them.
    pub fn state_mut(&mut self) -> Vec<&mut [f32]> {
        let mut tensors = by_name(&mut self.params);
        let mut out: Vec<&mut [f32]> = Vec::new();
        for v in &mut self.vars {
            match &mut v.kind {
                Kind::Param => out.push(tensors.remove(&v.name).expect("a parameter")),
                Kind::Quantized { master, .. } => out.push(master),
                Kind::Lora { a, b, .. } => {
                    out.push(a);
                    out.push(b);
                }
            }
        }
        out
    }

    /// The gradient of every variable from the gradient of the weights, in
    /// [`Student::state`] order: the weights' own for a tensor or a quantized
    /// master (straight through the codec), `∂A = s·Bᵀ·∂W` and `∂B = s·∂W·Aᵀ`
    /// (over the unmasked entries) for an adapter.
    pub fn gradients<'a>(&self, grads: &'a Grads<f32>) -> Vec<Cow<'a, [f32]>> {
        let mut out = Vec::new();
        for v in &self.vars {
            let g = grads.get(&v.name).expect("gradients of the same model");
            match &v.kind {
                Kind::Param | Kind::Quantized { .. } => out.push(Cow::Borrowed(g)),
                Kind::Lora {
                    a,
                    b,
                    experts,
                    rank,
                    rows,
                    cols,
                    scale,
                    ..
                } => {
                    let mut dw = g.to_vec();
                    self.masks.apply(&v.name, &mut dw);
                    let (r, m, n) = (*rank, *rows, *cols);
                    let (mut da, mut db) =
                        (Vec::with_capacity(a.len()), Vec::with_capacity(b.len()));
                    for e in 0..*experts {
                        let (a, b) = (
                            &a[e * r * n..(e + 1) * r * n],
                            &b[e * m * r..(e + 1) * m * r],
                        );
                        let dw = &dw[e * m * n..(e + 1) * m * n];
                        // ∂A [r, n] = Bᵀ [r, m] · ∂W [m, n]
                        da.extend(matmul(b, dw, r, m, n, true, false));
                        // ∂B [m, r] = ∂W [m, n] · Aᵀ [n, r]
                        db.extend(matmul(dw, a, m, n, r, false, true));
                    }
                    da.iter_mut().chain(db.iter_mut()).for_each(|x| *x *= scale);
                    out.push(Cow::Owned(da));
                    out.push(Cow::Owned(db));
                }
            }
        }
        out
    }

    /// Brings the weights up to date with the variables after an update: masked
    /// zeros reset, quantized tensors re-encoded in their type and decoded,
    /// adapters merged.
    pub fn sync(&mut self) -> Result<()> {
        let masks = &self.masks;
        let mut tensors = by_name(&mut self.params);
        for v in &mut self.vars {
            let w = tensors.get_mut(&v.name).expect("a parameter");
            match &mut v.kind {
                Kind::Param => masks.apply(&v.name, w),
                Kind::Quantized { ty, cols, master } => {
                    masks.apply(&v.name, master);
                    fake_quantize(*ty, master, *cols, w)
                        .with_context(|| format!("re-encoding '{}' as {ty}", v.name))?;
                }
                Kind::Lora {
                    base,
                    a,
                    b,
                    experts,
                    rank,
                    rows,
                    cols,
                    scale,
                } => {
                    let (r, m, n) = (*rank, *rows, *cols);
                    let delta: Vec<f32> = (0..*experts)
                        .flat_map(|e| {
                            let (a, b) = (
                                &a[e * r * n..(e + 1) * r * n],
                                &b[e * m * r..(e + 1) * m * r],
                            );
                            matmul(b, a, m, r, n, false, false)
                        })
                        .collect();
                    w.iter_mut()
                        .zip(base.iter())
                        .zip(&delta)
                        .for_each(|((w, &w0), &d)| *w = w0 + *scale * d);
                    masks.apply(&v.name, w);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_params, tiny_config};
    use crate::train::{clip_scale, global_norm, AdamW};

    fn step(s: &mut Student, g: &Grads<f32>, lr: f64, opt: &mut AdamW) {
        let grads = s.gradients(g);
        let refs: Vec<&[f32]> = grads.iter().map(|c| c.as_ref()).collect();
        let scale = clip_scale(global_norm(&refs), 1.0);
        let decay = s.decay();
        opt.update(s.state_mut(), &refs, &decay, lr, scale);
        s.sync().unwrap();
    }

    #[test]
    fn only_the_chosen_tensors_train_and_masked_zeros_stay_zero() {
        let c = tiny_config(true);
        let mut p: Params<f32> = random_params(&c, 3);
        let wq = p.get_mut("blk.0.attn_q.weight").unwrap();
        for x in wq.iter_mut().step_by(2) {
            *x = 0.0;
        }
        let before = p.clone();
        let g: Params<f32> = random_params(&c, 4);
        let mut s = Student::new(p, &HashMap::new(), Method::Full(Trainable::Norms)).unwrap();
        assert_eq!(
            s.masks.count,
            before.get("blk.0.attn_q.weight").unwrap().len() / 2
        );
        let mut opt = AdamW::new(&s.sizes(), 0.1);
        for _ in 0..3 {
            step(&mut s, &g, 1e-2, &mut opt);
        }
        for (a, b) in s.params.tensors().iter().zip(before.tensors()) {
            let changed = a.data != b.data;
            assert_eq!(changed, a.name.ends_with("_norm.weight"), "{}", a.name);
        }
        let mut s = Student::new(s.params, &HashMap::new(), Method::Full(Trainable::All)).unwrap();
        let mut opt = AdamW::new(&s.sizes(), 0.1);
        for _ in 0..3 {
            step(&mut s, &g, 1e-2, &mut opt);
        }
        let wq = s.params.get("blk.0.attn_q.weight").unwrap();
        assert!(wq.iter().step_by(2).all(|&x| x == 0.0));
        assert!(wq.iter().skip(1).step_by(2).all(|&x| x != 0.0));
    }

    #[test]
    fn biases_and_qk_norms_train_with_their_groups() {
        use crate::testutil::{tiny_qwen2_config, tiny_qwen3_config};
        for c in [tiny_qwen2_config(true), tiny_qwen3_config(false)] {
            let p: Params<f32> = random_params(&c, 9);
            let trained = |method| {
                let s = Student::new(p.clone(), &HashMap::new(), method).unwrap();
                let names: Vec<String> = p
                    .tensors()
                    .iter()
                    .filter(|t| s.trains(&t.name))
                    .map(|t| t.name.clone())
                    .collect();
                (names, s.sizes().len())
            };
            let (norms, _) = trained(Method::Full(Trainable::Norms));
            let (blocks, _) = trained(Method::Full(Trainable::Blocks));
            let (all, _) = trained(Method::Full(Trainable::All));
            let lora = Method::Lora {
                rank: 2,
                alpha: 4.0,
                seed: 1,
            };
            let (adapted, n_vars) = trained(lora);
            for t in p.tensors() {
                let role = c.arch.role(&t.name).unwrap();
                let has = |v: &[String]| v.contains(&t.name);
                assert_eq!(
                    has(&norms),
                    matches!(role, Role::Norm | Role::QkNorm),
                    "{}",
                    t.name
                );
                let in_blocks = t.name.starts_with("blk.") || t.name == "output_norm.weight";
                assert_eq!(has(&blocks), in_blocks, "{}", t.name);
                assert!(has(&all), "{}", t.name);
                assert_eq!(has(&adapted), role == Role::Linear, "{}", t.name);
            }
            assert_eq!(n_vars, 2 * 7 * c.num_hidden_layers);
            let extras = [
                "attn_q.bias",
                "attn_v.bias",
                "attn_q_norm.weight",
                "attn_k_norm.weight",
            ];
            assert!(blocks.iter().any(|n| extras.iter().any(|e| n.ends_with(e))));
        }
    }

    #[test]
    fn adapter_gradients_match_finite_differences_of_the_merged_weight() {
        // L(W) = Σ G ⊙ W with W = W₀ + s·B·A: ∂L/∂A = s·Bᵀ·G, ∂L/∂B = s·G·Aᵀ.
        let c = tiny_config(true);
        let p: Params<f32> = random_params(&c, 5);
        let g: Params<f32> = random_params(&c, 6);
        let method = Method::Lora {
            rank: 2,
            alpha: 4.0,
            seed: 1,
        };
        let mut s = Student::new(p.clone(), &HashMap::new(), method).unwrap();
        // Give B values so both gradients are non-zero.
        for (i, v) in s.state_mut().into_iter().enumerate() {
            if i % 2 == 1 {
                v.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = ((j * 7 + i) % 5) as f32 * 0.1 - 0.2);
            }
        }
        s.sync().unwrap();
        let loss = |s: &Student| -> f64 {
            s.params
                .tensors()
                .iter()
                .zip(g.tensors())
                .map(|(w, g)| {
                    w.data
                        .iter()
                        .zip(g.data)
                        .map(|(&w, &g)| w as f64 * g as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let analytic: Vec<Vec<f32>> = s
            .gradients(&g)
            .into_iter()
            .map(|c| c.into_owned())
            .collect();
        assert_eq!(analytic.len(), 2 * 7 * c.num_hidden_layers);
        let h = 1e-2f32;
        for (vi, grad) in analytic.iter().enumerate() {
            for j in [0, grad.len() / 2, grad.len() - 1] {
                let orig = s.state()[vi][j];
                s.state_mut()[vi][j] = orig + h;
                s.sync().unwrap();
                let up = loss(&s);
                s.state_mut()[vi][j] = orig - h;
                s.sync().unwrap();
                let down = loss(&s);
                s.state_mut()[vi][j] = orig;
                s.sync().unwrap();
                let fd = (up - down) / (2.0 * h as f64);
                assert!(
                    (fd - grad[j] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                    "variable {vi} element {j}: {fd} vs {}",
                    grad[j]
                );
            }
        }
        // The untouched student: B = 0 at the start, so the merged weights are W₀.
        let fresh = Student::new(p.clone(), &HashMap::new(), method).unwrap();
        assert_eq!(fresh.params, p);
    }

    #[test]
    fn quantized_tensors_train_through_their_codec_and_stay_on_its_grid() {
        let mut c = tiny_config(true);
        c.hidden_size = 32;
        c.intermediate_size = 64;
        c.head_dim = 16;
        let p: Params<f32> = random_params(&c, 7);
        let types: HashMap<String, GgmlType> = p
            .tensors()
            .iter()
            .filter(|t| t.shape.len() == 2 && t.name.starts_with("blk."))
            .map(|t| (t.name.clone(), GgmlType::Q8_0))
            .collect();
        let g: Params<f32> = random_params(&c, 8);
        let mut s = Student::new(p, &types, Method::Full(Trainable::Blocks)).unwrap();
        let mut opt = AdamW::new(&s.sizes(), 0.0);
        for _ in 0..2 {
            step(&mut s, &g, 1e-2, &mut opt);
        }
        for name in types.keys() {
            assert_eq!(s.quantized_type(name), Some(GgmlType::Q8_0));
            let w = s.params.get(name).unwrap();
            let master = s.values(name).unwrap();
            assert_ne!(w, master, "{name}: the forward sees the codec's values");
            let mut again = vec![0f32; w.len()];
            fake_quantize(GgmlType::Q8_0, master, 32, &mut again).unwrap();
            assert_eq!(w, &again[..], "{name}");
        }
    }
}
