//! The optimizer side of training: AdamW with decoupled weight decay, a linear
//! warm-up then cosine learning-rate schedule, gradient clipping by global norm,
//! the choice of which tensors train, and masks that keep a pruned student's
//! removed weights exactly zero after every step.

use crate::params::Params;
use model::arch::{Arch, Role};
use rayon::prelude::*;

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every tensor but a mixture-of-experts router.
    All,
    /// The RMSNorm gains only, per-head q/k norms included (a cheap
    /// recalibration of a pruned model's scales).
    Norms,
    /// Every tensor but the token embedding and the output head (the largest
    /// tensors, whose update costs the most and helps the least): the block
    /// tensors (biases and q/k norms included) and the final norm.
    Blocks,
}

impl Trainable {
    /// Whether tensor `name` of a model of architecture `arch` trains (decided
    /// by the role the description gives it). A mixture-of-experts router never
    /// does: the routing stays the one the model was calibrated with.
    pub fn includes(self, arch: &Arch, name: &str) -> bool {
        let role = arch.role(name);
        if role == Some(Role::Router) {
            return false;
        }
        match self {
            Trainable::All => true,
            Trainable::Norms => matches!(role, Some(Role::Norm | Role::QkNorm)),
            Trainable::Blocks => {
                model::names::block_index(name).is_some() || role == Some(Role::Norm)
            }
        }
    }
}

/// Learning rate at each step: linear warm-up from 0 over `warmup` steps, then a
/// cosine decay from `peak` to `peak · min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Largest learning rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Steps in all.
    pub total: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The L2 norm of `grads` together. Partial sums over fixed chunks, added in
/// order, so the norm (which scales the clipped update) is the same bits on
/// every run and any number of threads.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| {
            g.par_chunks(1 << 14)
                .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
        })
        .sum::<f64>()
        .sqrt()
}

/// The factor that brings a gradient of global norm `norm` down to at most
/// `max_norm` (1 when `max_norm` is 0, no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// The exact zeros of a pruned student's block linears, kept zero through
/// training (a bit per weight, for the tensors that have any).
pub struct Masks {
    /// Tensor name and a bitset of its zeros.
    zeros: Vec<(String, Vec<u64>)>,
    /// Weights held at zero.
    pub count: usize,
}

impl Masks {
    /// Records the zeros of every block matrix (a stack of experts included)
    /// in which at least
    /// `min_fraction` of the weights are exactly zero (a pruned layer; an
    /// unpruned one has almost none).
    pub fn of_zeros(params: &Params<f32>, min_fraction: f64) -> Masks {
        let mut count = 0;
        let zeros = params
            .tensors()
            .iter()
            .filter_map(|t| {
                if t.shape.len() < 2 || model::names::block_index(&t.name).is_none() {
                    return None;
                }
                let n = t.data.iter().filter(|&&x| x == 0.0).count();
                if (n as f64) < min_fraction * t.data.len() as f64 {
                    return None;
                }
                count += n;
                let mut bits = vec![0u64; t.data.len().div_ceil(64)];
                for (i, &x) in t.data.iter().enumerate() {
                    if x == 0.0 {
                        bits[i / 64] |= 1 << (i % 64);
                    }
                }
                Some((t.name.clone(), bits))
            })
            .collect();
        Masks { zeros, count }
    }

    /// Sets the masked weights of tensor `name` (laid out as in the model) back
    /// to zero; tensors without a mask are left as they are.
    pub fn apply(&self, name: &str, data: &mut [f32]) {
        let Some((_, bits)) = self.zeros.iter().find(|(n, _)| n == name) else {
            return;
        };
        data.par_chunks_mut(64).zip(bits).for_each(|(w, &b)| {
            if b != 0 {
                for (i, x) in w.iter_mut().enumerate() {
                    if b >> i & 1 == 1 {
                        *x = 0.0;
                    }
                }
            }
        });
    }

    /// [`Masks::apply`] to every tensor of `params`.
    pub fn apply_all(&self, params: &mut Params<f32>) {
        for t in params.tensors_mut() {
            self.apply(&t.name, t.data);
        }
    }
}

/// AdamW (Loshchilov & Hutter): Adam's moment estimates with bias correction,
/// and weight decay applied to the weights directly rather than through the
/// gradient. It updates a fixed list of variables (whole tensors, quantized
/// tensors' float masters, or adapter matrices), given in the same order at
/// every step.
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay per unit learning rate.
    pub weight_decay: f64,
    /// First moments, one vector per variable.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one vector per variable.
    pub v: Vec<Vec<f32>>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// Zero moments for variables of `sizes` elements.
    pub fn new(sizes: &[usize], weight_decay: f64) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            step: 0,
        }
    }

    /// One update with learning rate `lr` of every variable in `vars` by its
    /// gradient in `grads` times `grad_scale` (the clipping factor). `decay[i]`
    /// says whether variable `i` takes weight decay (matrices do, norm gains
    /// do not).
    ///
    /// # Panics
    /// When the lists' lengths or a variable's size differ from [`AdamW::new`]'s.
    pub fn update(
        &mut self,
        vars: Vec<&mut [f32]>,
        grads: &[&[f32]],
        decay: &[bool],
        lr: f64,
        grad_scale: f64,
    ) {
        assert!(
            vars.len() == self.m.len() && grads.len() == vars.len() && decay.len() == vars.len(),
            "AdamW: {} variables, {} gradients, {} moments",
            vars.len(),
            grads.len(),
            self.m.len()
        );
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((((w, g), m), v), &d) in vars
            .into_iter()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(decay)
        {
            assert!(
                w.len() == g.len() && w.len() == m.len(),
                "AdamW: size changed"
            );
            let decay = if d { lr * self.weight_decay } else { 0.0 };
            w.par_iter_mut()
                .zip(g.par_iter())
                .zip(m.par_iter_mut().zip(v.par_iter_mut()))
                .for_each(|((w, &g), (m, v))| {
                    let g = g as f64 * grad_scale;
                    let m1 = b1 * *m as f64 + (1.0 - b1) * g;
                    let v1 = b2 * *v as f64 + (1.0 - b2) * g * g;
                    *m = m1 as f32;
                    *v = v1 as f32;
                    let step = lr * (m1 / c1) / ((v1 / c2).sqrt() + eps);
                    *w = (*w as f64 * (1.0 - decay) - step) as f32;
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_params, tiny_config};

    #[test]
    fn schedule_warms_up_then_decays_to_its_floor() {
        let s = Schedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-9);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|i| s.lr(i + 10) <= s.lr(i + 9) + 1e-15));
    }

    #[test]
    fn first_adam_step_moves_each_weight_by_the_learning_rate() {
        // With bias correction the first step is lr · g / |g| for every weight,
        // whatever the gradient's scale.
        let c = tiny_config(false);
        let mut p: Params<f32> = random_params(&c, 1);
        let before = p.clone();
        let g: Params<f32> = random_params(&c, 2);
        let sizes: Vec<usize> = p.tensors().iter().map(|t| t.data.len()).collect();
        let mut opt = AdamW::new(&sizes, 0.0);
        let grads: Vec<&[f32]> = g.tensors().into_iter().map(|t| t.data).collect();
        let vars: Vec<&mut [f32]> = p.tensors_mut().into_iter().map(|t| t.data).collect();
        opt.update(vars, &grads, &vec![true; sizes.len()], 1e-2, 0.25);
        for ((a, b), gt) in p.tensors().iter().zip(before.tensors()).zip(g.tensors()) {
            for ((x, y), gg) in a.data.iter().zip(b.data).zip(gt.data) {
                if *gg != 0.0 {
                    let expect = y - 1e-2 * gg.signum();
                    assert!((x - expect).abs() < 1e-6, "{}: {x} vs {expect}", a.name);
                }
            }
        }
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let c = tiny_config(false);
        let g: Params<f32> = random_params(&c, 5);
        let grads: Vec<&[f32]> = g.tensors().into_iter().map(|t| t.data).collect();
        let norm = global_norm(&grads);
        let direct: f64 = grads
            .iter()
            .flat_map(|g| g.iter())
            .map(|&x| (x as f64).powi(2))
            .sum();
        assert!((norm - direct.sqrt()).abs() < 1e-9 * norm);
        assert!(norm > 0.5);
        assert!((clip_scale(norm, 0.5) * norm - 0.5).abs() < 1e-12);
        assert_eq!(clip_scale(norm, 0.0), 1.0);
        assert_eq!(clip_scale(norm, 2.0 * norm), 1.0);
    }
}
