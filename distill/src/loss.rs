//! The distillation losses on logits and their gradients with respect to the
//! student's logits: cross-entropy on the text, forward KL(teacher ‖ student) on
//! temperature-softened distributions (Hinton's T² scaling, so the gradient's size
//! does not shrink as T grows), and reverse KL(student ‖ teacher).
//!
//! Every loss is the mean over positions of a per-position loss, returns that
//! mean, and *adds* `weight · ∂loss/∂logits` into a gradient buffer, so a
//! weighted sum of losses is built by calling them in turn on one buffer that
//! then goes to [`crate::transformer::backward`]. Softmaxes are evaluated as
//! `z − logsumexp(z)` in f64 with the row maximum subtracted first, so large
//! logits neither overflow nor lose the small probabilities.

use crate::float::Float;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// One row's `softmax(row / temperature)`, as log-probabilities and
/// probabilities, in f64. Subtracting the row maximum keeps every `exp` in
/// `(0, 1]`; one `exp` per element serves both outputs.
struct Softmax {
    logp: Vec<f64>,
    p: Vec<f64>,
}

impl Softmax {
    fn new(vocab: usize) -> Self {
        Softmax {
            logp: vec![0.0; vocab],
            p: vec![0.0; vocab],
        }
    }

    fn compute<T: Float>(&mut self, row: &[T], inv_temp: f64) {
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &z| m.max(z.to_f64() * inv_temp));
        let mut sum = 0.0;
        for ((l, p), &z) in self.logp.iter_mut().zip(&mut self.p).zip(row) {
            *l = z.to_f64() * inv_temp - max;
            *p = l.exp();
            sum += *p;
        }
        let (ln_sum, inv_sum) = (sum.ln(), 1.0 / sum);
        for (l, p) in self.logp.iter_mut().zip(&mut self.p) {
            *l -= ln_sum;
            *p *= inv_sum;
        }
    }
}

/// Checks the shared arguments; returns the number of positions.
fn check_rows<T>(logits: &[T], vocab: usize, grad: &[T], what: &str) -> Result<usize> {
    assert!(vocab > 0, "{what}: vocabulary of 0 tokens");
    assert!(
        logits.len().is_multiple_of(vocab),
        "{what}: {} logits are not whole rows of {vocab}",
        logits.len()
    );
    assert_eq!(
        grad.len(),
        logits.len(),
        "{what}: gradient buffer differs from the logits"
    );
    let rows = logits.len() / vocab;
    if rows == 0 {
        bail!("{what} over zero positions");
    }
    Ok(rows)
}

/// Checks a softening temperature.
fn check_temperature(temperature: f64, what: &str) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("{what}: temperature must be a positive number, got {temperature}");
    }
    Ok(())
}

/// Mean cross-entropy `−log softmax(z_p)[targets_p]` of the rows of `logits`
/// (`[targets.len(), vocab]`). Adds `weight · (softmax(z_p) − onehot(targets_p)) / N`
/// into `grad`.
pub fn cross_entropy<T: Float>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    weight: f64,
    grad: &mut [T],
) -> Result<f64> {
    let rows = check_rows(logits, vocab, grad, "cross-entropy")?;
    assert_eq!(
        rows,
        targets.len(),
        "cross-entropy: {rows} rows for {} targets",
        targets.len()
    );
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("cross-entropy: target token {t} is outside the vocabulary of {vocab}");
    }
    let w = weight / rows as f64;
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map_init(
            || Softmax::new(vocab),
            |q, ((g, z), &t)| {
                q.compute(z, 1.0);
                for (g, &q) in g.iter_mut().zip(&q.p) {
                    *g += T::from_f64(w * q);
                }
                g[t as usize] -= T::from_f64(w);
                -q.logp[t as usize]
            },
        )
        .sum();
    Ok(total / rows as f64)
}

/// Next-token cross-entropy of one sequence: row `p` of `logits`
/// (`[tokens.len(), vocab]`) predicts `tokens[p + 1]`; the last row has no target
/// and gets no gradient. The mean is over the `n − 1` predicted positions.
pub fn next_token_cross_entropy<T: Float>(
    logits: &[T],
    vocab: usize,
    tokens: &[u32],
    weight: f64,
    grad: &mut [T],
) -> Result<f64> {
    let n = tokens.len();
    if n < 2 {
        bail!("next-token cross-entropy needs at least 2 tokens, got {n}");
    }
    assert_eq!(
        logits.len(),
        n * vocab,
        "next-token cross-entropy: logits are not [n, vocab]"
    );
    assert_eq!(
        grad.len(),
        logits.len(),
        "next-token cross-entropy: gradient buffer differs"
    );
    let m = (n - 1) * vocab;
    cross_entropy(&logits[..m], vocab, &tokens[1..], weight, &mut grad[..m])
}

/// Mean forward KL `T²·KL(p ‖ q)` with `p = softmax(teacher/T)`,
/// `q = softmax(student/T)` per row (both `[n, vocab]`). Adds
/// `weight · T·(q − p) / N` into `grad`: `∂KL/∂(z/T) = q − p`, times `1/T` for the
/// softening and `T²` for the scaling.
pub fn forward_kl<T: Float>(
    student: &[T],
    teacher: &[T],
    vocab: usize,
    temperature: f64,
    weight: f64,
    grad: &mut [T],
) -> Result<f64> {
    let rows = check_rows(student, vocab, grad, "forward KL")?;
    assert_eq!(
        teacher.len(),
        student.len(),
        "forward KL: teacher and student logits differ"
    );
    check_temperature(temperature, "forward KL")?;
    let (inv_t, t2) = (1.0 / temperature, temperature * temperature);
    let w = weight * temperature / rows as f64;
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(student.par_chunks(vocab).zip(teacher.par_chunks(vocab)))
        .map_init(
            || (Softmax::new(vocab), Softmax::new(vocab)),
            |(q, p), (g, (zs, zt))| {
                q.compute(zs, inv_t);
                p.compute(zt, inv_t);
                let mut kl = 0.0;
                for (j, g) in g.iter_mut().enumerate() {
                    // p = 0 contributes nothing (and log p may be −∞ there).
                    if p.p[j] > 0.0 {
                        kl += p.p[j] * (p.logp[j] - q.logp[j]);
                    }
                    *g += T::from_f64(w * (q.p[j] - p.p[j]));
                }
                t2 * kl
            },
        )
        .sum();
    Ok(total / rows as f64)
}

/// Mean reverse KL `T²·KL(q ‖ p)` with `q = softmax(student/T)`,
/// `p = softmax(teacher/T)` per row (both `[n, vocab]`). With
/// `f_j = log q_j − log p_j` and `KL = Σ q_j f_j`, `∂KL/∂(z_j/T) = q_j·(f_j − KL)`
/// (the `Σ_k q_k ∂log q_k` term is `∂Σq = 0`); adds `weight · T·q_j·(f_j − KL) / N`
/// into `grad`.
pub fn reverse_kl<T: Float>(
    student: &[T],
    teacher: &[T],
    vocab: usize,
    temperature: f64,
    weight: f64,
    grad: &mut [T],
) -> Result<f64> {
    let rows = check_rows(student, vocab, grad, "reverse KL")?;
    assert_eq!(
        teacher.len(),
        student.len(),
        "reverse KL: teacher and student logits differ"
    );
    check_temperature(temperature, "reverse KL")?;
    let (inv_t, t2) = (1.0 / temperature, temperature * temperature);
    let w = weight * temperature / rows as f64;
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(student.par_chunks(vocab).zip(teacher.par_chunks(vocab)))
        .map_init(
            || (Softmax::new(vocab), Softmax::new(vocab)),
            |(q, p), (g, (zs, zt))| {
                q.compute(zs, inv_t);
                p.compute(zt, inv_t);
                // f_j = log q_j − log p_j, kept in p.logp; q = 0 contributes
                // nothing to KL or its gradient (and f may be ∞ there).
                for (f, &lq) in p.logp.iter_mut().zip(&q.logp) {
                    *f = lq - *f;
                }
                let f = &p.logp;
                let kl: f64 = (0..vocab)
                    .filter(|&j| q.p[j] > 0.0)
                    .map(|j| q.p[j] * f[j])
                    .sum();
                for (j, g) in g.iter_mut().enumerate() {
                    if q.p[j] > 0.0 {
                        *g += T::from_f64(w * q.p[j] * (f[j] - kl));
                    }
                }
                t2 * kl
            },
        )
        .sum();
    Ok(total / rows as f64)
}

/// The teacher's distribution at one position kept as its `k` largest logits
/// and the log-sum-exp of all its softened logits: enough to compute the
/// forward KL with every other token's probability pooled into one "rest" bucket,
/// so the teacher's logits for a training set fit on disk and the teacher need
/// not be in memory while the student trains.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// Tokens, `k` per position.
    pub ids: Vec<u32>,
    /// Their logits (before softening), `k` per position.
    pub logits: Vec<f32>,
    /// `logsumexp(z / T)` over the whole vocabulary, per position.
    pub lse: Vec<f32>,
    /// Entries per position.
    pub k: usize,
    /// The temperature `lse` was computed at.
    pub temperature: f64,
}

impl TopK {
    /// The top `k` of each row of `logits` (`[n, vocab]`) at `temperature`.
    pub fn from_logits(logits: &[f32], vocab: usize, k: usize, temperature: f64) -> Self {
        let k = k.min(vocab);
        let rows: Vec<(Vec<u32>, Vec<f32>, f32)> = logits
            .par_chunks(vocab)
            .map(|row| {
                let mut idx: Vec<u32> = (0..vocab as u32).collect();
                // Ties broken by token id, so the selection is reproducible.
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
                });
                idx.truncate(k);
                idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
                let vals = idx.iter().map(|&i| row[i as usize]).collect();
                let max = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64 / temperature));
                let sum: f64 = row
                    .iter()
                    .map(|&z| (z as f64 / temperature - max).exp())
                    .sum();
                (idx, vals, (max + sum.ln()) as f32)
            })
            .collect();
        let mut out = TopK {
            ids: Vec::with_capacity(rows.len() * k),
            logits: Vec::with_capacity(rows.len() * k),
            lse: Vec::with_capacity(rows.len()),
            k,
            temperature,
        };
        for (i, v, l) in rows {
            out.ids.extend(i);
            out.logits.extend(v);
            out.lse.push(l);
        }
        out
    }

    /// Positions held.
    pub fn rows(&self) -> usize {
        self.lse.len()
    }
}

/// Mean forward `T²·KL(p ‖ q)` against a teacher kept as its top `k` tokens
/// ([`TopK`]): over the teacher's `k` tokens and one bucket for the rest, with
/// `p_rest = 1 − Σ_K p` and `q_rest = 1 − Σ_K q`. Its gradient with respect to
/// `z/T` is `q − p̃`, where `p̃` is `p` on the top `k` and the rest mass spread in
/// proportion to the student's own probabilities elsewhere (`p_rest · q_j /
/// q_rest`); adds `weight · T·(q − p̃) / N` into `grad`. With `k = vocab` it is
/// [`forward_kl`].
pub fn forward_kl_topk<T: Float>(
    student: &[T],
    teacher: &TopK,
    vocab: usize,
    weight: f64,
    grad: &mut [T],
) -> Result<f64> {
    let rows = check_rows(student, vocab, grad, "top-k forward KL")?;
    if teacher.rows() != rows {
        bail!(
            "top-k forward KL: the teacher holds {} positions, the student {rows}",
            teacher.rows()
        );
    }
    let temperature = teacher.temperature;
    check_temperature(temperature, "top-k forward KL")?;
    let (inv_t, t2, k) = (1.0 / temperature, temperature * temperature, teacher.k);
    let w = weight * temperature / rows as f64;
    let total: f64 = grad
        .par_chunks_mut(vocab)
        .zip(student.par_chunks(vocab))
        .enumerate()
        .map_init(
            || (Softmax::new(vocab), vec![false; vocab]),
            |(q, in_k), (r, (g, zs))| {
                q.compute(zs, inv_t);
                let ids = &teacher.ids[r * k..(r + 1) * k];
                let zt = &teacher.logits[r * k..(r + 1) * k];
                let lse = teacher.lse[r] as f64;
                let (mut kl, mut p_k) = (0.0, 0.0);
                for (&id, &z) in ids.iter().zip(zt) {
                    let logp = z as f64 * inv_t - lse;
                    let p = logp.exp();
                    let j = id as usize;
                    in_k[j] = true;
                    kl += p * (logp - q.logp[j]);
                    p_k += p;
                    g[j] += T::from_f64(w * (q.p[j] - p));
                }
                // Summed directly (not 1 − Σ_K q) so a small rest keeps its digits.
                let q_rest: f64 = (0..vocab).filter(|&j| !in_k[j]).map(|j| q.p[j]).sum();
                // The stored log-sum-exp is f32: a rest below its rounding is none.
                let p_rest = if 1.0 - p_k > 1e-6 { 1.0 - p_k } else { 0.0 };
                let spread = if q_rest > 0.0 { p_rest / q_rest } else { 0.0 };
                if p_rest > 0.0 && q_rest > 0.0 {
                    kl += p_rest * (p_rest.ln() - q_rest.ln());
                }
                for (j, g) in g.iter_mut().enumerate() {
                    if in_k[j] {
                        in_k[j] = false;
                    } else {
                        *g += T::from_f64(w * q.p[j] * (1.0 - spread));
                    }
                }
                t2 * kl
            },
        )
        .sum();
    Ok(total / rows as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const V: usize = 11;
    const N: usize = 4;

    fn logits(seed: u64, spread: f64) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..N * V).map(|_| rng.gen_range(-spread..spread)).collect()
    }

    /// Max over elements of |fd − g| / (max(|fd|, |g|) + 1e-8): the gradient of
    /// `loss` at `z` by finite differences against the analytic one. The
    /// five-point stencil (error O(h⁴)) is used because sharp softmaxes
    /// (T = 0.5) have third derivatives large enough to show in the plain
    /// central difference at the 1e-6 level.
    fn fd_check(z: &[f64], loss: &dyn Fn(&[f64], &mut [f64]) -> f64) -> f64 {
        let mut g = vec![0.0; z.len()];
        loss(z, &mut g);
        let mut worst = 0f64;
        let h = 1e-4;
        let mut zz = z.to_vec();
        let mut scratch = vec![0.0; z.len()];
        let mut at = |i: usize, x: f64| {
            zz[i] = x;
            let l = loss(&zz, &mut scratch);
            zz[i] = z[i];
            l
        };
        for i in 0..z.len() {
            let fd = (8.0 * (at(i, z[i] + h) - at(i, z[i] - h))
                - (at(i, z[i] + 2.0 * h) - at(i, z[i] - 2.0 * h)))
                / (12.0 * h);
            let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()) + 1e-8);
            if err > 1e-6 {
                println!(
                    "  element {i}: finite differences {fd:e}, analytic {:e}",
                    g[i]
                );
            }
            worst = worst.max(err);
        }
        worst
    }

    #[test]
    fn loss_gradients_match_finite_differences() {
        let z = logits(1, 3.0);
        let teacher = logits(2, 4.0);
        let targets: Vec<u32> = (0..N as u32).map(|i| (i * 3 + 1) % V as u32).collect();
        let tokens: Vec<u32> = (0..N as u32).map(|i| (i * 5 + 2) % V as u32).collect();
        type LossFn<'a> = Box<dyn Fn(&[f64], &mut [f64]) -> f64 + 'a>;
        let checks: Vec<(&str, LossFn)> = vec![
            (
                "cross-entropy",
                Box::new(|z, g| cross_entropy(z, V, &targets, 0.7, g).unwrap() * 0.7),
            ),
            (
                "next-token cross-entropy",
                Box::new(|z, g| next_token_cross_entropy(z, V, &tokens, 1.0, g).unwrap()),
            ),
            (
                "forward KL, T = 1",
                Box::new(|z, g| forward_kl(z, &teacher, V, 1.0, 1.0, g).unwrap()),
            ),
            (
                "forward KL, T = 2.5",
                Box::new(|z, g| forward_kl(z, &teacher, V, 2.5, 1.3, g).unwrap() * 1.3),
            ),
            (
                "reverse KL, T = 1",
                Box::new(|z, g| reverse_kl(z, &teacher, V, 1.0, 1.0, g).unwrap()),
            ),
            (
                "reverse KL, T = 0.5",
                Box::new(|z, g| reverse_kl(z, &teacher, V, 0.5, 0.4, g).unwrap() * 0.4),
            ),
        ];
        let top3 = TopK::from_logits(
            &teacher.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            V,
            3,
            1.7,
        );
        let checks_topk: Vec<(&str, LossFn)> = vec![(
            "top-3 forward KL, T = 1.7",
            Box::new(|z, g| forward_kl_topk(z, &top3, V, 0.9, g).unwrap() * 0.9),
        )];
        for (name, f) in checks.iter().chain(&checks_topk) {
            let err = fd_check(&z, f.as_ref());
            println!("{name}: max rel err {err:.2e}");
            assert!(err < 1e-6, "{name}: gradient off by {err:e}");
        }
    }

    #[test]
    fn top_k_with_the_whole_vocabulary_is_the_full_forward_kl() {
        let z = logits(7, 2.0);
        let t: Vec<f32> = logits(8, 3.0).iter().map(|&x| x as f32).collect();
        let t64: Vec<f64> = t.iter().map(|&x| x as f64).collect();
        let (mut g1, mut g2) = (vec![0.0; z.len()], vec![0.0; z.len()]);
        let full = forward_kl(&z, &t64, V, 1.3, 1.0, &mut g1).unwrap();
        let all = TopK::from_logits(&t, V, V, 1.3);
        let topk = forward_kl_topk(&z, &all, V, 1.0, &mut g2).unwrap();
        assert!((full - topk).abs() < 1e-6, "{full} vs {topk}");
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // The top entries are the largest logits, in decreasing order.
        let top2 = TopK::from_logits(&t, V, 2, 1.0);
        let row = &t[..V];
        let mut sorted: Vec<f32> = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(&top2.logits[..2], &sorted[..2]);
        // A truncated teacher still gives a non-negative divergence, zero at itself.
        let mut g = vec![0.0; z.len()];
        let t_as_student: Vec<f64> = t64.clone();
        let self_kl = forward_kl_topk(&t_as_student, &top2, V, 1.0, &mut g).unwrap();
        assert!(self_kl.abs() < 1e-6, "{self_kl}");
    }

    #[test]
    fn values_match_their_definitions() {
        let z = logits(3, 2.0);
        let t = logits(4, 2.0);
        let mut g = vec![0.0; z.len()];
        // KL of a distribution with itself is 0, and so is its gradient.
        assert!(forward_kl(&z, &z, V, 2.0, 1.0, &mut g).unwrap().abs() < 1e-14);
        assert!(reverse_kl(&z, &z, V, 1.0, 1.0, &mut g).unwrap().abs() < 1e-14);
        assert!(g.iter().all(|x| x.abs() < 1e-14));
        // Uniform logits: cross-entropy ln V.
        let flat = vec![0.5; N * V];
        let ce = cross_entropy(&flat, V, &[0; N], 1.0, &mut g).unwrap();
        assert!((ce - (V as f64).ln()).abs() < 1e-12);
        // Forward and reverse KL at T = 1 against a direct evaluation of row 0.
        let sm = |r: &[f64]| {
            let e: Vec<f64> = r.iter().map(|x| x.exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect::<Vec<_>>()
        };
        let (q, p) = (sm(&z[..V]), sm(&t[..V]));
        let fwd: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        let rev: f64 = q.iter().zip(&p).map(|(q, p)| q * (q / p).ln()).sum();
        let mut g = vec![0.0; V];
        assert!((forward_kl(&z[..V], &t[..V], V, 1.0, 1.0, &mut g).unwrap() - fwd).abs() < 1e-12);
        assert!((reverse_kl(&z[..V], &t[..V], V, 1.0, 1.0, &mut g).unwrap() - rev).abs() < 1e-12);
    }

    #[test]
    fn large_logits_stay_finite() {
        let mut z = logits(5, 1.0);
        z[3] = 1e4;
        z[V + 2] = -1e4;
        let t: Vec<f32> = z.iter().map(|&x| (x * 0.9) as f32).collect();
        let z32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let mut g = vec![0f32; z.len()];
        let ce = cross_entropy(&z32, V, &[0; N], 1.0, &mut g).unwrap();
        let f = forward_kl(&z32, &t, V, 1.0, 1.0, &mut g).unwrap();
        let r = reverse_kl(&z32, &t, V, 1.0, 1.0, &mut g).unwrap();
        assert!(
            ce.is_finite() && f.is_finite() && r.is_finite(),
            "{ce} {f} {r}"
        );
        assert!(g.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let z = logits(6, 1.0);
        let mut g = vec![0.0; z.len()];
        let e = cross_entropy(&z, V, &[0, 1, 2, 11], 1.0, &mut g).unwrap_err();
        assert!(e.to_string().contains("target token 11"), "{e}");
        let e = forward_kl(&z, &z, V, 0.0, 1.0, &mut g).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let e = next_token_cross_entropy(&z[..V], V, &[3], 1.0, &mut g[..V]).unwrap_err();
        assert!(e.to_string().contains("at least 2 tokens"), "{e}");
    }
}
