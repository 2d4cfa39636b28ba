//! The optimizer side of training: AdamW with decoupled weight decay, a linear
//! warm-up then cosine learning-rate schedule, gradient clipping by global norm,
//! the choice of which tensors train, and masks that keep a pruned student's
//! removed weights exactly zero after every step.

use crate::params::{Grads, Params};
use rayon::prelude::*;

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every tensor.
    All,
    /// The RMSNorm gains only (a cheap recalibration of a pruned model's scales).
    Norms,
    /// Every tensor but the token embedding and the output head (the largest
    /// tensors, whose update costs the most and helps the least).
    Blocks,
}

impl Trainable {
    /// Whether tensor `name` trains.
    pub fn includes(self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Norms => name.ends_with("_norm.weight"),
            Trainable::Blocks => name.starts_with("blk.") || name == "output_norm.weight",
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

/// The L2 norm of every gradient of the trainable tensors together. Partial sums
/// over fixed chunks, added in order, so the norm (which scales the clipped
/// update) is the same bits on every run.
pub fn global_norm(grads: &Grads<f32>, trainable: Trainable) -> f64 {
    grads
        .tensors()
        .iter()
        .filter(|t| trainable.includes(t.name.as_str()))
        .flat_map(|t| {
            t.data
                .par_chunks(1 << 14)
                .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients down so their global norm is at most `max_norm` (no
/// clipping when `max_norm` is 0); returns the norm before clipping.
pub fn clip(grads: &mut Grads<f32>, trainable: Trainable, max_norm: f64) -> f64 {
    let norm = global_norm(grads, trainable);
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / norm) as f32;
        for t in grads.tensors_mut() {
            t.data.par_iter_mut().for_each(|g| *g *= s);
        }
    }
    norm
}

/// The exact zeros of a pruned student's block linears, kept zero through
/// training (a bit per weight, for the tensors that have any).
pub struct Masks {
    /// Per tensor in [`Params::tensors`] order: a bitset of the zeros, or none.
    zeros: Vec<Option<Vec<u64>>>,
    /// Weights held at zero.
    pub count: usize,
}

impl Masks {
    /// Records the zeros of every 2-D block tensor in which at least
    /// `min_fraction` of the weights are exactly zero (a pruned layer; an
    /// unpruned one has almost none).
    pub fn of_zeros(params: &Params<f32>, min_fraction: f64) -> Masks {
        let mut count = 0;
        let zeros = params
            .tensors()
            .iter()
            .map(|t| {
                if t.shape.len() != 2 || !t.name.starts_with("blk.") {
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
                Some(bits)
            })
            .collect();
        Masks { zeros, count }
    }

    /// Sets the masked weights of `params` back to zero.
    pub fn apply(&self, params: &mut Params<f32>) {
        for (t, mask) in params.tensors_mut().into_iter().zip(&self.zeros) {
            if let Some(bits) = mask {
                t.data.par_chunks_mut(64).zip(bits).for_each(|(w, &b)| {
                    if b != 0 {
                        for (i, x) in w.iter_mut().enumerate() {
                            if b >> i & 1 == 1 {
                                *x = 0.0;
                            }
                        }
                    }
                });
            }
        }
    }
}

/// AdamW (Loshchilov & Hutter): Adam's moment estimates with bias correction,
/// and weight decay applied to the weights directly rather than through the
/// gradient, only to 2-D tensors (not to norm gains).
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay per unit learning rate.
    pub weight_decay: f64,
    /// First moments.
    pub m: Params<f32>,
    /// Second moments.
    pub v: Params<f32>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// Zero moments shaped like `params`.
    pub fn new(params: &Params<f32>, weight_decay: f64) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            m: params.zeros_like(),
            v: params.zeros_like(),
            step: 0,
        }
    }

    /// One update of the trainable tensors with learning rate `lr`.
    pub fn update(
        &mut self,
        params: &mut Params<f32>,
        grads: &Grads<f32>,
        lr: f64,
        trainable: Trainable,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let tensors = params.tensors_mut();
        let g = grads.tensors();
        let m = self.m.tensors_mut();
        let v = self.v.tensors_mut();
        for (((p, g), m), v) in tensors.into_iter().zip(&g).zip(m).zip(v) {
            if !trainable.includes(p.name.as_str()) {
                continue;
            }
            let decay = if p.shape.len() == 2 {
                lr * self.weight_decay
            } else {
                0.0
            };
            p.data
                .par_iter_mut()
                .zip(g.data.par_iter())
                .zip(m.data.par_iter_mut().zip(v.data.par_iter_mut()))
                .for_each(|((w, &g), (m, v))| {
                    let g = g as f64;
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
        // With bias correction the first step is lr · g / |g| for every weight.
        let c = tiny_config(false);
        let mut p: Params<f32> = random_params(&c, 1);
        let before = p.clone();
        let g: Params<f32> = random_params(&c, 2);
        let mut opt = AdamW::new(&p, 0.0);
        opt.update(&mut p, &g, 1e-2, Trainable::All);
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
    fn only_the_chosen_tensors_train_and_masked_zeros_stay_zero() {
        let c = tiny_config(true);
        let mut p: Params<f32> = random_params(&c, 3);
        // Prune half of one layer.
        let wq = p.get_mut("blk.0.attn_q.weight").unwrap();
        for x in wq.iter_mut().step_by(2) {
            *x = 0.0;
        }
        let masks = Masks::of_zeros(&p, 0.1);
        assert_eq!(masks.count, p.get("blk.0.attn_q.weight").unwrap().len() / 2);
        let before = p.clone();
        let g: Params<f32> = random_params(&c, 4);
        let mut opt = AdamW::new(&p, 0.1);
        for _ in 0..3 {
            opt.update(&mut p, &g, 1e-2, Trainable::Norms);
            masks.apply(&mut p);
        }
        for (a, b) in p.tensors().iter().zip(before.tensors()) {
            let changed = a.data != b.data;
            assert_eq!(changed, a.name.ends_with("_norm.weight"), "{}", a.name);
        }
        for _ in 0..3 {
            opt.update(&mut p, &g, 1e-2, Trainable::All);
            masks.apply(&mut p);
        }
        let wq = p.get("blk.0.attn_q.weight").unwrap();
        assert!(wq.iter().step_by(2).all(|&x| x == 0.0));
        assert!(wq.iter().skip(1).step_by(2).all(|&x| x != 0.0));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let c = tiny_config(false);
        let mut g: Params<f32> = random_params(&c, 5);
        let before = clip(&mut g, Trainable::All, 0.5);
        assert!(before > 0.5);
        assert!((global_norm(&g, Trainable::All) - 0.5).abs() < 1e-4);
    }
}
