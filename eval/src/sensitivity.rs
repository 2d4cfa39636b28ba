//! Per-layer sensitivity: how much the model's next-token distribution moves
//! (KL divergence against the unchanged model) when one tensor, or one block, is
//! quantized or pruned while everything else stays at base.
//!
//! The base runs once ([`BaseRun::capture`]): the residual stream entering every
//! block and the base logits of the scored positions are kept, so a candidate
//! that changes block `b` reruns only blocks `b…` and the head. Which changes to
//! try is the caller's business (the `compress` CLI builds them with the quant
//! and prune crates); this module measures and records them.

use crate::kld::{kl_and_top1, KldStats};
use crate::perplexity::{ChunkPlan, PerplexityOptions};
use anyhow::{bail, Context, Result};
use model::arch::Role;
use model::llama::BlockWeights;
use model::{Model, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The base model's activations and logits on the evaluation tokens.
pub struct BaseRun {
    plan: ChunkPlan,
    /// Per chunk: the tokens it runs on (BOS substituted).
    chunk_tokens: Vec<Vec<u32>>,
    /// Per chunk, per block `b` (and `n_layers` for the head): the residual stream
    /// entering it, `ctx × hidden`.
    inputs: Vec<Vec<Vec<f32>>>,
    /// Per chunk: base logits of the scored positions.
    logits: Vec<Vec<f32>>,
}

/// How far one candidate moved the model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Shift {
    /// Mean KL(base ‖ candidate) over the scored tokens, nats.
    pub kld: f64,
    /// Standard error of that mean.
    pub kld_stderr: f64,
    /// Fraction of scored tokens whose top-1 token is unchanged.
    pub top1: f64,
}

impl BaseRun {
    /// Runs `model` on `chunks` chunks of `ctx` tokens of `tokens` and keeps what
    /// candidates need.
    pub fn capture(model: &Model, tokens: &[u32], opts: &PerplexityOptions) -> Result<Self> {
        let plan = ChunkPlan::for_model(model, tokens.len(), opts)?;
        let layers = model.config.num_hidden_layers;
        let mut chunk_tokens = Vec::new();
        let mut inputs = Vec::new();
        let mut logits = Vec::new();
        for c in 0..plan.chunks {
            let toks = plan.chunk_tokens(tokens, c);
            let mut x = model.embed(&toks)?;
            let mut per_block = Vec::with_capacity(layers + 1);
            for layer in 0..layers {
                per_block.push(x.clone());
                let w = model.block_weights(layer)?;
                model
                    .forward_block(&w, &mut x, toks.len())
                    .with_context(|| format!("block {layer}"))?;
            }
            let mut l = model.head_logits(&x, plan.first)?;
            l.truncate(plan.scored_per_chunk() * model.config.vocab_size);
            per_block.push(x);
            inputs.push(per_block);
            logits.push(l);
            chunk_tokens.push(toks);
        }
        Ok(BaseRun {
            plan,
            chunk_tokens,
            inputs,
            logits,
        })
    }

    /// Tokens scored per measurement.
    pub fn scored_tokens(&self) -> usize {
        self.plan.chunks * self.plan.scored_per_chunk()
    }

    /// The chunk plan (ctx, chunks).
    pub fn plan(&self) -> &ChunkPlan {
        &self.plan
    }

    /// KL divergence of `model` with the tensors of `replaced` (by canonical name,
    /// same shapes) swapped in, against the base run. Only the blocks from the
    /// first one touched onward are rerun.
    pub fn shift(&self, model: &Model, replaced: &[Tensor]) -> Result<Shift> {
        let layers = model.config.num_hidden_layers;
        let vocab = model.config.vocab_size;
        for t in replaced {
            let (_, shape) = model.tensor_meta(&t.name)?;
            if shape != t.shape {
                bail!(
                    "replacement for '{}' has shape {:?}, the model's is {:?}",
                    t.name,
                    t.shape,
                    shape
                );
            }
        }
        let arch = model.config.arch;
        let find = |role: Role| replaced.iter().find(|t| t.name == arch.global_name(role));
        let embd = find(Role::Embedding);
        let start = if embd.is_some() {
            0
        } else {
            replaced
                .iter()
                .map(|t| model::names::block_index(&t.name).unwrap_or(layers))
                .min()
                .unwrap_or(layers)
        };
        let head = match find(Role::Head) {
            Some(t) => t.borrowed(),
            None if model.config.tie_word_embeddings && embd.is_some() => {
                embd.map(Tensor::borrowed).expect("checked")
            }
            None => model.output_head()?,
        };
        let norm = match find(Role::Norm) {
            Some(t) => t.to_f32()?,
            None => model.tensor(arch.global_name(Role::Norm))?.to_f32()?,
        };
        let mut klds = Vec::with_capacity(self.scored_tokens());
        let mut same = 0usize;
        for (c, toks) in self.chunk_tokens.iter().enumerate() {
            let mut x = match embd {
                Some(e) => model.embed_with(e, toks)?,
                None => self.inputs[c][start].clone(),
            };
            for layer in start..layers {
                let mut w = model.block_weights(layer)?;
                replace_in_block(model, &mut w, replaced, layer)?;
                model
                    .forward_block(&w, &mut x, toks.len())
                    .with_context(|| format!("block {layer}"))?;
            }
            let mut l = model.head_logits_with(&x, self.plan.first, &norm, &head)?;
            l.truncate(self.plan.scored_per_chunk() * vocab);
            let rows: Vec<(f64, bool)> = self.logits[c]
                .par_chunks(vocab)
                .zip(l.par_chunks(vocab))
                .map(|(b, m)| kl_and_top1(b, m))
                .collect();
            for (kl, top) in rows {
                klds.push(kl);
                same += top as usize;
            }
        }
        let n = klds.len().max(1);
        let stats = KldStats::from_values(klds);
        Ok(Shift {
            kld: stats.mean,
            kld_stderr: stats.mean_stderr,
            top1: same as f64 / n as f64,
        })
    }
}

/// Swaps the replacements that belong to block `layer` into its weights, each
/// into the slot its architecture's description gives it.
fn replace_in_block<'a>(
    model: &Model,
    w: &mut BlockWeights<'a>,
    replaced: &'a [Tensor],
    layer: usize,
) -> Result<()> {
    for t in replaced {
        if model::names::block_index(&t.name) != Some(layer) {
            continue;
        }
        let slot = model
            .config
            .arch
            .spec(&t.name)
            .and_then(|s| s.slot)
            .with_context(|| format!("'{}' is not a tensor of a decoder block", t.name))?;
        w.replace(slot, t.borrowed())?;
    }
    Ok(())
}

/// What kind of change a setting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingKind {
    /// A GGUF block type (importance-weighted when the report has an imatrix).
    Quant,
    /// Pruning (unstructured fraction or N:M), kept dense.
    Sparsity,
}

/// One column of the report: a type or a sparsity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setting {
    /// As given on the command line: `Q4_K`, `0.5`, `2:4`.
    pub name: String,
    /// Quantization or pruning.
    pub kind: SettingKind,
}

/// One row of the report: a tensor, or a whole block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unit {
    /// Canonical tensor name (`blk.3.ffn_down.weight`), or `blk.3` for a block.
    pub name: String,
    /// Block index, if inside one.
    pub block: Option<usize>,
    /// Weights changed.
    pub params: u64,
    /// Stored bytes in the base.
    pub base_bytes: u64,
    /// Mean KLD over the unit's measured settings (ranking key).
    pub score: f64,
    /// 1 = most sensitive.
    pub rank: usize,
}

/// One measurement: a unit changed by a setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// Index into `units`.
    pub unit: usize,
    /// Index into `settings`.
    pub setting: usize,
    /// What was actually applied, e.g. the fallback type when the setting's type
    /// does not fit the rows (`IQ4_NL`), or `Q4_K` / `2:4`.
    pub applied: String,
    /// Stored bytes of the unit after the change (dense bytes for pruning).
    pub bytes: u64,
    /// Bits per weight of the unit after the change.
    pub bits_per_weight: f64,
    /// Relative squared Frobenius error of the changed weights.
    pub weight_error: f64,
    /// The measured shift.
    pub shift: Shift,
}

/// A whole-model mix on the size/KLD plane, with KLD predicted as the sum of the
/// measured single-unit shifts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixPoint {
    /// What the mix is (`alloc 4.50 bpw`, `all Q4_K`).
    pub label: String,
    /// Bytes of the tensors.
    pub bytes: u64,
    /// Bits per weight over all tensors.
    pub bits_per_weight: f64,
    /// Σ of the units' measured KLD.
    pub predicted_kld: f64,
}

/// A complete sensitivity report: what was measured, how, and the results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SensitivityReport {
    /// Model path.
    pub model: String,
    /// sha256 of the model's weight file(s), to refuse reports of another model.
    pub model_sha256: String,
    /// Parameters of the model.
    pub model_params: u64,
    /// Calibration text (source of the importance weights and activation norms).
    pub calib: String,
    /// Evaluation text the KLD is measured on.
    pub text: String,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks.
    pub chunks: usize,
    /// Scored tokens per measurement.
    pub scored_tokens: usize,
    /// `tensor` or `block`.
    pub granularity: String,
    /// Where the importance weights came from (None: unweighted).
    pub imatrix: Option<String>,
    /// Columns.
    pub settings: Vec<Setting>,
    /// Rows.
    pub units: Vec<Unit>,
    /// Measurements (every unit × setting that applies).
    pub cells: Vec<Cell>,
    /// Mixes chosen by the allocator at several budgets (the Pareto front).
    pub pareto: Vec<MixPoint>,
    /// Each quantization setting applied everywhere, predicted the same way.
    pub uniform: Vec<MixPoint>,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// Wall time of the base run, seconds.
    pub base_seconds: f64,
}

impl SensitivityReport {
    /// Fills each unit's score (mean KLD over its cells) and rank (1 = highest score).
    pub fn rank_units(&mut self) {
        let mut sums = vec![(0f64, 0usize); self.units.len()];
        for c in &self.cells {
            sums[c.unit].0 += c.shift.kld;
            sums[c.unit].1 += 1;
        }
        for (u, (s, n)) in self.units.iter_mut().zip(&sums) {
            u.score = if *n > 0 { s / *n as f64 } else { 0.0 };
        }
        let mut order: Vec<usize> = (0..self.units.len()).collect();
        order.sort_by(|&a, &b| self.units[b].score.total_cmp(&self.units[a].score));
        for (r, &u) in order.iter().enumerate() {
            self.units[u].rank = r + 1;
        }
    }

    /// Units, most sensitive first.
    pub fn ranked(&self) -> Vec<&Unit> {
        let mut v: Vec<&Unit> = self.units.iter().collect();
        v.sort_by_key(|u| u.rank);
        v
    }

    /// The cell of (unit, setting), if measured.
    pub fn cell(&self, unit: usize, setting: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.unit == unit && c.setting == setting)
    }
}

/// One tensor changed by one setting: the replacement, what was applied (the
/// type after fallbacks; empty for pruning), its stored bytes and the relative
/// squared weight error.
pub struct Changed {
    /// The replacement tensor.
    pub tensor: Tensor<'static>,
    /// What was applied, e.g. `Q4_K`.
    pub applied: String,
    /// Stored bytes of the changed tensor.
    pub bytes: u64,
    /// `‖W − Ŵ‖² / ‖W‖²`.
    pub weight_error: f64,
}

/// How a setting changes a tensor: `change(name, setting)` gives the replacement,
/// or `None` where the setting does not apply (pruning the embedding).
pub type ChangeFn<'a> = dyn Fn(&str, usize) -> Result<Option<Changed>> + Sync + 'a;

/// Measures every setting on every unit (a name and the tensors it changes),
/// units side by side: one candidate's forward pass on a few hundred tokens
/// does not keep every core busy on its own. `tick(message)` after each cell.
pub fn measure(
    units: &[(String, Vec<String>)],
    settings: &[Setting],
    change: &ChangeFn<'_>,
    model: &Model,
    base: &BaseRun,
    tick: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Cell>> {
    let per_unit: Vec<Vec<Cell>> = units
        .par_iter()
        .enumerate()
        .map(|(u, (name, tensors))| {
            measure_unit(u, name, tensors, settings, change, model, base, tick)
        })
        .collect::<Result<_>>()?;
    Ok(per_unit.into_iter().flatten().collect())
}

/// Every setting of one unit: the changed tensors, and the KLD they add.
/// Settings that land on the same types share one measurement.
#[allow(clippy::too_many_arguments)]
fn measure_unit(
    u: usize,
    unit_name: &str,
    tensors: &[String],
    settings: &[Setting],
    change: &ChangeFn<'_>,
    model: &Model,
    base: &BaseRun,
    tick: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = Vec::new();
    let mut measured: HashMap<Vec<String>, usize> = HashMap::new();
    for (s, setting) in settings.iter().enumerate() {
        let mut replaced = Vec::new();
        let mut applied = Vec::new();
        let (mut bytes, mut params, mut err_num) = (0u64, 0u64, 0f64);
        for t in tensors {
            if let Some(c) = change(t, s)? {
                let n = c.tensor.n_elements() as u64;
                bytes += c.bytes;
                params += n;
                err_num += c.weight_error * n as f64;
                applied.push(c.applied);
                replaced.push(c.tensor);
            }
        }
        if replaced.is_empty() {
            tick(unit_name);
            continue;
        }
        let key = match setting.kind {
            SettingKind::Quant => applied.clone(),
            SettingKind::Sparsity => vec![setting.name.clone()],
        };
        let shift = match measured.get(&key) {
            Some(&i) => cells[i].shift,
            None => {
                let sh = base
                    .shift(model, &replaced)
                    .with_context(|| format!("{unit_name} at {}", setting.name))?;
                measured.insert(key, cells.len());
                sh
            }
        };
        applied.dedup();
        let applied = applied.join("+");
        cells.push(Cell {
            unit: u,
            setting: s,
            applied: if applied.is_empty() {
                setting.name.clone()
            } else {
                applied
            },
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / params.max(1) as f64,
            weight_error: err_num / params.max(1) as f64,
            shift,
        });
        tick(&format!(
            "{unit_name} {}: KLD {:.2e}",
            setting.name, shift.kld
        ));
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with_scores(klds: &[[f64; 2]]) -> SensitivityReport {
        let units = (0..klds.len())
            .map(|i| Unit {
                name: format!("blk.{i}.ffn_down.weight"),
                block: Some(i),
                params: 100,
                base_bytes: 400,
                score: 0.0,
                rank: 0,
            })
            .collect();
        let cells = klds
            .iter()
            .enumerate()
            .flat_map(|(u, k)| {
                k.iter().enumerate().map(move |(s, &kld)| Cell {
                    unit: u,
                    setting: s,
                    applied: "Q4_0".into(),
                    bytes: 56,
                    bits_per_weight: 4.5,
                    weight_error: 0.01,
                    shift: Shift {
                        kld,
                        kld_stderr: 0.0,
                        top1: 1.0,
                    },
                })
            })
            .collect();
        SensitivityReport {
            model: "m".into(),
            model_sha256: "0".into(),
            model_params: 300,
            calib: "c".into(),
            text: "t".into(),
            ctx: 64,
            chunks: 1,
            scored_tokens: 31,
            granularity: "tensor".into(),
            imatrix: None,
            settings: vec![
                Setting {
                    name: "Q4_0".into(),
                    kind: SettingKind::Quant,
                },
                Setting {
                    name: "Q8_0".into(),
                    kind: SettingKind::Quant,
                },
            ],
            units,
            cells,
            pareto: vec![],
            uniform: vec![],
            seconds: 1.0,
            base_seconds: 0.5,
        }
    }

    #[test]
    fn ranks_by_mean_kld() {
        let mut r = report_with_scores(&[[0.1, 0.01], [0.5, 0.02], [0.05, 0.001]]);
        r.rank_units();
        let names: Vec<_> = r.ranked().iter().map(|u| u.block.unwrap()).collect();
        assert_eq!(names, vec![1, 0, 2]);
        assert!((r.units[1].score - 0.26).abs() < 1e-12);
        assert_eq!(r.cell(2, 1).unwrap().shift.kld, 0.001);
    }
}
