//! The distillation stage (`compress distill`): recovers a pruned or quantized
//! model's quality by training it to match its original on calibration text
//! (knowledge distillation), on the CPU.
//!
//! The teacher's top-k logits (and, for a hidden-state loss, its residual stream
//! after the mapped blocks) for every training sequence are computed once and
//! stored beside the checkpoints, so the teacher is not in memory while the
//! student trains (`top_k: 0` keeps it and uses its full distribution each
//! step, which reverse KL needs). The student trains in f32 with AdamW: whole
//! tensors, low-rank adapters merged at the end, or, for a quantized GGUF
//! student, float masters seen through their block codec (straight-through) and
//! written back in their own types. The exact zeros of a pruned student stay
//! zero. Checkpoints every K steps hold the trained values, the optimizer's
//! moments and the step, and a rerun of the same options resumes from the last
//! one.
//!
//! [`DistillOptions`] says what to do (the `compress distill` flags, paths
//! resolved); [`run`] does it. Messages name the command's flags (`--lr`, …), as
//! the options mirror them.

use crate::loss::{self, TopK};
use crate::train::{clip_scale, global_norm, AdamW, Schedule, Trainable};
use crate::{backward, forward, Method, Params, Student};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::arch::Role;
use model::dense::DenseWriter;
use model::gguf::GgufWriter;
use model::gguf_export;
use model::io::{model_sha256, read_json, read_text, write_atomic, AtomicFile};
use model::progress::{peak_rss_bytes, Progress};
use model::Model;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which tensors train.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Train {
    /// Every tensor.
    All,
    /// Every block tensor (biases and per-head q/k norms included) and the
    /// final norm (not the embedding or head).
    Blocks,
    /// The RMSNorm gains only (per-head q/k norms included).
    Norms,
    /// A low-rank adapter on every block linear ([`DistillOptions::lora_rank`],
    /// [`DistillOptions::lora_alpha`]), merged into the weights when written.
    Lora,
}

/// What a distillation run is asked: the `compress distill` flags, with the
/// input paths resolved.
#[derive(Clone, Debug)]
pub struct DistillOptions {
    /// The original model (teacher).
    pub teacher: PathBuf,
    /// The compressed model to train (student): dense, or pruned (unstructured,
    /// N:M, or structurally smaller), or GGUF-quantized, with the teacher's
    /// vocabulary.
    pub student: PathBuf,
    /// Training text (calibration text, never the evaluation text).
    pub text: PathBuf,
    /// Training tokens in all (rounded up to whole steps of `batch` × `seq`).
    pub tokens: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Output: an HF-style folder (safetensors) or a .gguf file.
    pub output: PathBuf,
    /// Tokens per training sequence.
    pub seq: usize,
    /// Sequences per optimizer step (gradients accumulated over them).
    pub batch: usize,
    /// Warm-up, as a fraction of the steps.
    pub warmup: f64,
    /// Final learning rate of the cosine schedule, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (2-D tensors only).
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this (0: no clipping).
    pub clip: f64,
    /// Softening temperature of the KL terms (scaled by T²).
    pub temperature: f64,
    /// Weight of the forward KL(teacher ‖ student).
    pub kl: f64,
    /// Weight of the reverse KL(student ‖ teacher) (needs `top_k` 0).
    pub reverse_kl: f64,
    /// Weight of the cross-entropy on the text's next tokens.
    pub ce: f64,
    /// Teacher tokens kept per position on disk (0: the teacher's whole
    /// distribution, computed each step with the teacher in memory).
    pub top_k: usize,
    /// Which tensors train.
    pub train: Train,
    /// Rank of the adapters of [`Train::Lora`].
    pub lora_rank: usize,
    /// Adapter scale numerator (the update is alpha/rank · B·A).
    pub lora_alpha: f64,
    /// Weight of the hidden-state loss: the squared distance between the
    /// student's and the teacher's residual stream after mapped blocks, relative
    /// to the teacher's squared norm, averaged over the pairs.
    pub hidden: f64,
    /// Student-to-teacher block pairs of the hidden-state loss: `auto` (four
    /// student blocks spread over the depth, the last included, each paired
    /// with the teacher block it is closest to, in order) or a list `S:T,S:T`
    /// of 0-based block numbers.
    pub layer_map: String,
    /// Steps between checkpoints (0: none).
    pub checkpoint_every: usize,
    /// Checkpoint folder (None: OUTPUT.ckpt beside the output); removed when
    /// the output is written.
    pub checkpoint_dir: Option<PathBuf>,
    /// Seed of the training sequences' choice and order (and of the adapters'
    /// initialisation).
    pub seed: u64,
    /// Element type of the written weights of a float student (F32, F16 or
    /// BF16; a quantized student keeps its own types).
    pub dtype: GgmlType,
    /// Also write the training report (per-step loss, KL, learning rate, gradient
    /// norm; throughput; peak memory) as JSON.
    pub report: Option<PathBuf>,
    /// `general.file_type` of a quantized student's GGUF output from its
    /// tensors' types. The named GGUF mixes are the quantization stage's
    /// knowledge, which this stage does not call: the caller passes
    /// `quant::gguf_mix::file_type_of`.
    pub gguf_file_type: fn(&[GgmlType]) -> u32,
}

impl DistillOptions {
    /// Checks the options alone, reading no file.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {} must be a positive learning rate", self.lr);
        }
        if self.tokens == 0 {
            bail!("--tokens must be at least 1 (the training budget)");
        }
        if self.seq < 2 || self.batch == 0 {
            bail!("--seq must be at least 2 and --batch at least 1");
        }
        for (flag, v) in [
            ("--warmup", self.warmup),
            ("--min-lr-ratio", self.min_lr_ratio),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                bail!("{flag} {v} must be a fraction in [0, 1]");
            }
        }
        for (flag, v) in [
            ("--weight-decay", self.weight_decay),
            ("--clip", self.clip),
            ("--kl", self.kl),
            ("--reverse-kl", self.reverse_kl),
            ("--ce", self.ce),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} {v} must be a non-negative number");
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("--temperature {} must be positive", self.temperature);
        }
        if !(self.hidden.is_finite() && self.hidden >= 0.0) {
            bail!("--hidden {} must be a non-negative number", self.hidden);
        }
        if self.kl + self.reverse_kl + self.ce + self.hidden == 0.0 {
            bail!("every loss weight is 0: give --kl, --reverse-kl, --ce or --hidden");
        }
        if self.train == Train::Lora {
            if self.lora_rank == 0 {
                bail!("--lora-rank must be at least 1");
            }
            if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
                bail!("--lora-alpha {} must be positive", self.lora_alpha);
            }
        }
        if self.layer_map != "auto" {
            parse_layer_map(&self.layer_map)?;
        }
        if self.reverse_kl > 0.0 && self.top_k > 0 {
            bail!("--reverse-kl needs the teacher's whole distribution: add --top-k 0");
        }
        Ok(())
    }
}

/// Parses `S:T,S:T` (student block : teacher block, 0-based).
fn parse_layer_map(text: &str) -> Result<Vec<(usize, usize)>> {
    let mut pairs = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parsed = item
            .split_once(':')
            .and_then(|(s, t)| Some((s.trim().parse().ok()?, t.trim().parse().ok()?)));
        let Some(pair) = parsed else {
            bail!("--layer-map: '{item}' is not STUDENT:TEACHER (two block numbers, e.g. 25:29)");
        };
        if pairs.iter().any(|&(s, _)| s == pair.0) {
            bail!("--layer-map: student block {} is mapped twice", pair.0);
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!("--layer-map is empty: give `auto` or pairs like 5:6,25:29");
    }
    Ok(pairs)
}

/// Pairs `chosen` student blocks with teacher blocks: every student block is
/// aligned, in order, to a distinct teacher block so that the summed relative
/// distance of their outputs on one sequence is smallest (dynamic programming
/// over monotone alignments; equal depths give the identity), and the chosen
/// ones keep their partners. `distance[s][t]` is student block s against
/// teacher block t.
fn align_blocks(distance: &[Vec<f64>], chosen: &[usize]) -> Vec<(usize, usize)> {
    let (ns, nt) = (distance.len(), distance[0].len());
    // cost[s][t]: best total for student blocks 0..=s with s on teacher block t.
    let mut cost = vec![vec![f64::INFINITY; nt]; ns];
    let mut from = vec![vec![0usize; nt]; ns];
    for t in 0..nt {
        if t + ns <= nt {
            cost[0][t] = distance[0][t];
        }
    }
    for s in 1..ns {
        let (mut best, mut arg) = (f64::INFINITY, 0);
        for t in s..nt {
            if cost[s - 1][t - 1] < best {
                (best, arg) = (cost[s - 1][t - 1], t - 1);
            }
            if t + (ns - s) <= nt {
                cost[s][t] = best + distance[s][t];
                from[s][t] = arg;
            }
        }
    }
    let mut t = (0..nt)
        .min_by(|&a, &b| cost[ns - 1][a].total_cmp(&cost[ns - 1][b]))
        .expect("a teacher block");
    let mut partner = vec![0; ns];
    for s in (0..ns).rev() {
        partner[s] = t;
        t = from[s][t];
    }
    chosen.iter().map(|&s| (s, partner[s])).collect()
}

/// `‖a − b‖² / ‖b‖²` and its gradient with respect to `a` times `weight`,
/// added into `grad`.
fn relative_distance(a: &[f32], b: &[f32], weight: f64, grad: Option<&mut [f32]>) -> f64 {
    let (num, den) = a.iter().zip(b).fold((0f64, 0f64), |(n, d), (&x, &y)| {
        (n + ((x - y) as f64).powi(2), d + (y as f64).powi(2))
    });
    let den = den.max(f64::MIN_POSITIVE);
    if let Some(g) = grad {
        let s = 2.0 * weight / den;
        g.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(g, (&x, &y))| *g += (s * (x - y) as f64) as f32);
    }
    num / den
}

/// The block pairs of the hidden-state loss: `--layer-map` as given, or the
/// automatic choice ([`align_blocks`] on the first training sequence).
fn layer_map(
    map: &str,
    teacher: &Params<f32>,
    student: &Params<f32>,
    sample: &[u32],
) -> Result<Vec<(usize, usize)>> {
    let (ns, nt) = (
        student.config.num_hidden_layers,
        teacher.config.num_hidden_layers,
    );
    if map != "auto" {
        let pairs = parse_layer_map(map)?;
        for &(s, t) in &pairs {
            if s >= ns || t >= nt {
                bail!("--layer-map {s}:{t}: the student has {ns} blocks and the teacher {nt} (numbered from 0)");
            }
        }
        return Ok(pairs);
    }
    if ns > nt {
        bail!("the student has {ns} blocks, the teacher only {nt}: give --layer-map");
    }
    let chosen: Vec<usize> = if ns <= 4 {
        (0..ns).collect()
    } else {
        (1..=4)
            .map(|j| ((j * ns) as f64 / 4.0).round() as usize - 1)
            .collect()
    };
    let (ts, ss) = (forward(teacher, sample)?, forward(student, sample)?);
    let distance: Vec<Vec<f64>> = (0..ns)
        .map(|s| {
            (0..nt)
                .map(|t| relative_distance(ss.hidden(s), ts.hidden(t), 0.0, None))
                .collect()
        })
        .collect();
    Ok(align_blocks(&distance, &chosen))
}

/// Refuses a student that cannot learn from this teacher.
fn check_pair(o: &DistillOptions, teacher: &Model, student: &Model, text: &str) -> Result<()> {
    let (t, s) = (&teacher.config, &student.config);
    if t.vocab_size != s.vocab_size {
        bail!(
            "{}: vocabulary of {} tokens, the teacher {} has {}: their logits cannot be compared",
            student.path.display(),
            s.vocab_size,
            teacher.path.display(),
            t.vocab_size
        );
    }
    let sample: String = text.chars().take(4000).collect();
    if teacher.tokenizer.encode(&sample)? != student.tokenizer.encode(&sample)? {
        bail!(
            "{} and {} tokenize the text differently: distillation needs the same tokenizer",
            student.path.display(),
            teacher.path.display()
        );
    }
    if o.hidden > 0.0 && t.hidden_size != s.hidden_size {
        bail!(
            "{}: hidden size {}, the teacher {} has {}: the hidden-state loss (--hidden) has no mapping between them; match the logits only (--hidden 0)",
            student.path.display(),
            s.hidden_size,
            teacher.path.display(),
            t.hidden_size
        );
    }
    if student.quantized.is_some() {
        bail!(
            "{}: a GPTQ / compressed-tensors integer student is not trained in this version; distill the dense pruned model, then quantize it (GGUF-quantized students train through their codec)",
            student.path.display()
        );
    }
    Ok(())
}

/// The stored type of every tensor of `model`.
fn tensor_types(model: &Model) -> Result<HashMap<String, GgmlType>> {
    model
        .tensor_names()
        .into_iter()
        .map(|n| Ok((n.clone(), model.tensor_meta(&n)?.0)))
        .collect()
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// The sha256 of `bytes` in lower-case hex.
fn hex_sha(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes f32 values little-endian.
fn write_f32s(w: &mut impl Write, data: &[f32]) -> Result<()> {
    let mut buf = Vec::with_capacity(data.len() * 4);
    for x in data {
        buf.extend_from_slice(&x.to_le_bytes());
    }
    w.write_all(&buf)?;
    Ok(())
}

fn read_f32s(r: &mut impl Read, out: &mut [f32], what: &str) -> Result<()> {
    let mut buf = vec![0u8; out.len() * 4];
    r.read_exact(&mut buf)
        .with_context(|| format!("{what} is shorter than expected"))?;
    for (x, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    Ok(())
}

/// Saves vectors one after another into one file.
fn save_vectors<'a>(vectors: impl IntoIterator<Item = &'a [f32]>, path: &Path) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    for v in vectors {
        write_f32s(&mut f, v)?;
    }
    f.commit()
}

/// Reads what [`save_vectors`] wrote into vectors of the same sizes.
fn load_vectors<'a>(vectors: impl IntoIterator<Item = &'a mut [f32]>, path: &Path) -> Result<()> {
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    for v in vectors {
        read_f32s(&mut f, v, &path.display().to_string())?;
    }
    Ok(())
}

/// What the teacher gives every training sequence, computed once: its top-k
/// logits (in memory) and its residual stream after the mapped blocks (on disk,
/// read one sequence at a time).
struct TeacherCache {
    topk: Option<Vec<TopK>>,
    hidden: Option<(PathBuf, usize)>,
}

impl TeacherCache {
    /// The teacher's hidden states of sequence `i`, the mapped blocks' one after
    /// another.
    fn hidden(&self, i: usize) -> Result<Vec<f32>> {
        let (path, per_seq) = self.hidden.as_ref().expect("a hidden-state cache");
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        f.seek(SeekFrom::Start((i * per_seq * 4) as u64))?;
        let mut out = vec![0f32; *per_seq];
        read_f32s(&mut f, &mut out, &path.display().to_string())?;
        Ok(out)
    }
}

/// Computes (or reuses, when `key` matches) the teacher's top-`k` logits (when
/// `k > 0`) and hidden states after `blocks` of every sample, in `dir`.
fn teacher_cache(
    teacher: &mut dyn FnMut() -> Result<Params<f32>>,
    samples: &[Vec<u32>],
    k: usize,
    temperature: f64,
    blocks: &[usize],
    dir: &Path,
    key: &str,
) -> Result<TeacherCache> {
    let meta_path = dir.join("teacher.json");
    let (topk_path, hidden_path) = (dir.join("teacher-topk.bin"), dir.join("teacher-hidden.bin"));
    let seq = samples.first().map_or(0, Vec::len);
    let hidden_of =
        |h: usize| (!blocks.is_empty()).then(|| (hidden_path.clone(), blocks.len() * seq * h));
    if let Ok(meta) = read_json(&meta_path) {
        if meta["key"] == json!(key) {
            let k = meta["k"].as_u64().unwrap_or(0) as usize;
            let hidden = meta["hidden"].as_u64().unwrap_or(0) as usize;
            let topk = if k > 0 {
                let mut f = std::io::BufReader::new(std::fs::File::open(&topk_path)?);
                let what = topk_path.display().to_string();
                let mut out = Vec::with_capacity(samples.len());
                for _ in samples {
                    let mut ids = vec![0u8; seq * k * 4];
                    f.read_exact(&mut ids)
                        .with_context(|| format!("{what} is truncated"))?;
                    let mut logits = vec![0f32; seq * k];
                    let mut lse = vec![0f32; seq];
                    read_f32s(&mut f, &mut logits, &what)?;
                    read_f32s(&mut f, &mut lse, &what)?;
                    out.push(TopK {
                        ids: ids
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                            .collect(),
                        logits,
                        lse,
                        k,
                        temperature,
                    });
                }
                Some(out)
            } else {
                None
            };
            eprintln!(
                "teacher: outputs of {} sequences reused from {}",
                samples.len(),
                dir.display()
            );
            return Ok(TeacherCache {
                topk,
                hidden: hidden_of(hidden),
            });
        }
    }
    let params = teacher()?;
    let (vocab, h) = (params.config.vocab_size, params.config.hidden_size);
    let k = k.min(vocab);
    let mut bar = Progress::new(samples.len() as u64, "teacher");
    let start = Instant::now();
    let mut topk = (k > 0).then(|| Vec::with_capacity(samples.len()));
    let mut topk_file = if k > 0 {
        Some(AtomicFile::create(&topk_path)?)
    } else {
        None
    };
    let mut hidden_file = if blocks.is_empty() {
        None
    } else {
        Some(AtomicFile::create(&hidden_path)?)
    };
    for (i, s) in samples.iter().enumerate() {
        let acts = forward(&params, s)?;
        if let (Some(out), Some(f)) = (topk.as_mut(), topk_file.as_mut()) {
            let t = TopK::from_logits(&acts.logits, vocab, k, temperature);
            f.write_all(
                &t.ids
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )?;
            write_f32s(f, &t.logits)?;
            write_f32s(f, &t.lse)?;
            out.push(t);
        }
        if let Some(f) = hidden_file.as_mut() {
            for &b in blocks {
                write_f32s(f, acts.hidden(b))?;
            }
        }
        bar.set(i as u64 + 1, "");
    }
    bar.finish();
    if let Some(f) = topk_file {
        f.commit()?;
    }
    if let Some(f) = hidden_file {
        f.commit()?;
    }
    write_atomic(
        &meta_path,
        serde_json::to_string_pretty(&json!({"key": key, "k": k, "vocab": vocab, "hidden": h,
            "blocks": blocks, "sequences": samples.len(), "seq": seq}))?
        .as_bytes(),
    )?;
    eprintln!(
        "teacher: top-{k} logits{} of {} sequences × {seq} tokens in {:.1}s ({})",
        if blocks.is_empty() {
            String::new()
        } else {
            format!(" and hidden states after blocks {blocks:?}")
        },
        samples.len(),
        start.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(TeacherCache {
        topk,
        hidden: hidden_of(h),
    })
}

/// Saves a checkpoint as `DIR/step-N/` (trained values and moments), then
/// points `DIR/state.json` at it and removes the older one.
fn save_checkpoint(
    dir: &Path,
    step: usize,
    key: &str,
    student: &Student,
    opt: &AdamW,
    history: &[Value],
) -> Result<()> {
    let name = format!("step-{step:06}");
    let final_dir = dir.join(&name);
    model::io::remove_stale_temporaries(&final_dir);
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    save_vectors(student.state(), &tmp.join("params.bin"))?;
    save_vectors(opt.m.iter().map(Vec::as_slice), &tmp.join("adam_m.bin"))?;
    save_vectors(opt.v.iter().map(Vec::as_slice), &tmp.join("adam_v.bin"))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    let old = read_json(&dir.join("state.json"))
        .ok()
        .and_then(|s| s["checkpoint"].as_str().map(String::from));
    write_atomic(
        &dir.join("state.json"),
        serde_json::to_string_pretty(
            &json!({"key": key, "step": step, "checkpoint": name, "history": history}),
        )?
        .as_bytes(),
    )?;
    if let Some(old) = old.filter(|o| *o != name) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// Writes a quantized student: every tensor in its own stored type, the trained
/// ones re-encoded from their values (a quantized tensor's master gives exactly
/// the bytes its forward pass saw), the others copied as they are.
/// `file_type` gives `general.file_type` from the tensors' types.
fn write_quantized(
    model: &Model,
    student: &Student,
    types: &HashMap<String, GgmlType>,
    output: &Path,
    file_type: fn(&[GgmlType]) -> u32,
) -> Result<()> {
    let names = model.tensor_names();
    let metas: Vec<(String, GgmlType, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let (ty, shape) = model.tensor_meta(n)?;
            Ok((n.clone(), ty, shape))
        })
        .collect::<Result<_>>()?;
    let file_type = file_type(&metas.iter().map(|m| m.1).collect::<Vec<_>>());
    let metadata = gguf_export::metadata(model, file_type)?;
    let decls: Vec<_> = metas
        .iter()
        .map(|(n, ty, shape)| gguf_export::tensor_decl(n, shape, *ty))
        .collect();
    let mut writer = GgufWriter::create(output, &metadata, &decls)?;
    for (name, _, shape) in &metas {
        let ty = types[name];
        let cols = *shape.last().unwrap_or(&1);
        let bytes = if student.trains(name) {
            let values = student
                .values(name)
                .with_context(|| format!("the trained model has no tensor '{name}'"))?;
            kernels::quants::quantize_to_vec(ty, values, cols, None)
                .with_context(|| format!("encoding '{name}' as {ty}"))?
        } else {
            model.tensor(name)?.data.into_owned()
        };
        let rows = shape.iter().product::<usize>() / cols.max(1);
        writer.write_tensor(name, &gguf_export::to_gguf_rows(model, name, rows, bytes))?;
    }
    writer.finish().map(drop)
}

/// Trains the student of `o` against its teacher and writes it to `o.output`
/// (and the report, when asked), resuming from a checkpoint of the same run.
/// Inputs are never modified.
pub fn run(o: &DistillOptions) -> Result<()> {
    o.check()?;
    let start = Instant::now();
    let (teacher_path, student_path, text_path) = (&o.teacher, &o.student, &o.text);
    for p in [teacher_path, student_path, text_path] {
        if o.output.canonicalize().ok() == p.canonicalize().ok() {
            bail!(
                "output {} is an input; inputs are never modified",
                o.output.display()
            );
        }
    }
    let teacher = Model::open(teacher_path)?;
    let student_model = Model::open(student_path)?;
    let text = read_text(text_path)?;
    check_pair(o, &teacher, &student_model, &text)?;
    let types = tensor_types(&student_model)?;
    let quantized: Vec<&String> = types
        .iter()
        .filter(|(_, t)| !is_float(**t))
        .map(|(n, _)| n)
        .collect();
    if !quantized.is_empty() && o.output.extension().is_none_or(|e| e != "gguf") {
        bail!(
            "{} is a quantized student ({} quantized tensors): it is written back in its own types, which needs a .gguf output, not {}",
            student_model.path.display(),
            quantized.len(),
            o.output.display()
        );
    }

    let per_step = o.batch * o.seq;
    let steps = o.tokens.div_ceil(per_step);
    let tokens = student_model.tokenizer.encode(&text)?;
    let bos = student_model
        .tokenizer
        .add_bos()
        .then(|| student_model.tokenizer.bos())
        .flatten();
    let samples = model::calib::calibration_samples(&tokens, steps * o.batch, o.seq, o.seed, bos)
        .with_context(|| format!("training text {}", text_path.display()))?;
    let vocab = student_model.config.vocab_size;

    let method = match o.train {
        Train::All => Method::Full(Trainable::All),
        Train::Blocks => Method::Full(Trainable::Blocks),
        Train::Norms => Method::Full(Trainable::Norms),
        Train::Lora => Method::Lora {
            rank: o.lora_rank,
            alpha: o.lora_alpha,
            seed: o.seed,
        },
    };
    let params = Params::from_model(&student_model)?;
    // The teacher in f32 is needed for the automatic layer map and the cache;
    // loaded once for both, dropped before training.
    let mut teacher_params: Option<Params<f32>> = None;
    let pairs = if o.hidden > 0.0 {
        let tp = Params::from_model(&teacher)?;
        let pairs = layer_map(&o.layer_map, &tp, &params, &samples[0])?;
        teacher_params = Some(tp);
        eprintln!(
            "hidden-state loss on student:teacher blocks {}",
            pairs
                .iter()
                .map(|(s, t)| format!("{s}:{t}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        pairs
    } else {
        Vec::new()
    };
    let mut load_teacher = || -> Result<Params<f32>> {
        match teacher_params.take() {
            Some(p) => Ok(p),
            None => Params::from_model(&teacher),
        }
    };
    let mut student = Student::new(params, &types, method)?;
    if !quantized.is_empty() && student.n_trainable() > 0 {
        eprintln!(
            "{} quantized tensors train through their codecs (straight-through) and are written back in their types",
            quantized.iter().filter(|n| student.trains(n)).count()
        );
    }
    if student.masks.count > 0 {
        eprintln!(
            "keeping {} pruned weights at exactly zero",
            student.masks.count
        );
    }

    let teacher_sha = model_sha256(&teacher)?;
    let student_sha = model_sha256(&student_model)?;
    let text_sha = hex_sha(text.as_bytes());
    let teacher_blocks: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let teacher_key = hex_sha(
        json!({"teacher": teacher_sha, "text": text_sha, "seq": o.seq, "n": samples.len(),
            "seed": o.seed, "k": o.top_k, "t": o.temperature, "blocks": teacher_blocks})
        .to_string()
        .as_bytes(),
    );
    let run_key = hex_sha(
        json!({"teacher": teacher_key, "student": student_sha, "lr": o.lr, "batch": o.batch,
            "warmup": o.warmup, "min_lr": o.min_lr_ratio, "wd": o.weight_decay, "clip": o.clip,
            "kl": o.kl, "rkl": o.reverse_kl, "ce": o.ce, "hidden": o.hidden, "pairs": pairs,
            "train": format!("{method:?}"), "steps": steps})
        .to_string()
        .as_bytes(),
    );
    let ckpt_dir = o.checkpoint_dir.clone().unwrap_or_else(|| {
        let mut s = o.output.as_os_str().to_os_string();
        s.push(".ckpt");
        PathBuf::from(s)
    });
    std::fs::create_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;

    let cache = if o.top_k > 0 || !pairs.is_empty() {
        teacher_cache(
            &mut load_teacher,
            &samples,
            o.top_k,
            o.temperature,
            &teacher_blocks,
            &ckpt_dir,
            &teacher_key,
        )?
    } else {
        TeacherCache {
            topk: None,
            hidden: None,
        }
    };
    drop(teacher_params);

    let mut opt = AdamW::new(&student.sizes(), o.weight_decay);
    let decay = student.decay();
    let schedule = Schedule {
        peak: o.lr,
        warmup: ((o.warmup * steps as f64).round() as usize).max(1),
        total: steps,
        min_ratio: o.min_lr_ratio,
    };
    let mut history: Vec<Value> = Vec::new();
    let mut first = 0usize;
    if let Ok(state) = read_json(&ckpt_dir.join("state.json")) {
        if state["key"] == json!(run_key) {
            let step = state["step"].as_u64().unwrap_or(0) as usize;
            let dir = ckpt_dir.join(state["checkpoint"].as_str().unwrap_or(""));
            load_vectors(student.state_mut(), &dir.join("params.bin"))?;
            load_vectors(
                opt.m.iter_mut().map(Vec::as_mut_slice),
                &dir.join("adam_m.bin"),
            )?;
            load_vectors(
                opt.v.iter_mut().map(Vec::as_mut_slice),
                &dir.join("adam_v.bin"),
            )?;
            student.sync()?;
            opt.step = step as u64;
            history = state["history"].as_array().cloned().unwrap_or_default();
            first = step;
            eprintln!("resuming from step {step} of {steps} ({})", dir.display());
        } else {
            eprintln!(
                "note: {} holds a checkpoint of another run; starting over",
                ckpt_dir.display()
            );
        }
    }
    let teacher_full = if cache.topk.is_none() && o.kl + o.reverse_kl > 0.0 {
        Some(&teacher)
    } else {
        None
    };

    eprintln!(
        "distill: {} steps × {} sequences × {} tokens ({} tokens) of {}, lr {}, {} trained values for {} parameters",
        steps,
        o.batch,
        o.seq,
        steps * per_step,
        text_path.display(),
        o.lr,
        student.n_trainable(),
        student.params.n_params()
    );
    let mut bar = Progress::new(steps as u64, "distill");
    bar.set(first as u64, "");
    let mut grads = student.params.zeros_like();
    let train_start = Instant::now();
    let mut last_good = history
        .last()
        .and_then(|h| h["step"].as_u64())
        .map(|s| s as usize);
    let h = student.params.config.hidden_size;
    for step in first..steps {
        grads.zero();
        let (mut kl_sum, mut loss_sum, mut hidden_sum) = (0.0, 0.0, 0.0);
        for b in 0..o.batch {
            let i = step * o.batch + b;
            let sample = &samples[i];
            let acts = forward(&student.params, sample)?;
            let mut dlogits = vec![0f32; acts.logits.len()];
            let w = 1.0 / o.batch as f64;
            let kl = match (&cache.topk, teacher_full) {
                (Some(t), _) => {
                    loss::forward_kl_topk(&acts.logits, &t[i], vocab, o.kl * w, &mut dlogits)?
                }
                (None, Some(teacher)) => {
                    let tl = teacher.logits(sample, 0)?;
                    let kl = loss::forward_kl(
                        &acts.logits,
                        &tl,
                        vocab,
                        o.temperature,
                        o.kl * w,
                        &mut dlogits,
                    )?;
                    if o.reverse_kl > 0.0 {
                        let r = loss::reverse_kl(
                            &acts.logits,
                            &tl,
                            vocab,
                            o.temperature,
                            o.reverse_kl * w,
                            &mut dlogits,
                        )?;
                        loss_sum += o.reverse_kl * r;
                    }
                    kl
                }
                (None, None) => 0.0,
            };
            loss_sum += o.kl * kl;
            kl_sum += kl;
            if o.ce > 0.0 {
                let ce = loss::next_token_cross_entropy(
                    &acts.logits,
                    vocab,
                    sample,
                    o.ce * w,
                    &mut dlogits,
                )?;
                loss_sum += o.ce * ce;
            }
            let mut hidden_grads: Vec<(usize, Vec<f32>)> = Vec::new();
            if !pairs.is_empty() {
                let target = cache.hidden(i)?;
                let pair_weight = o.hidden * w / pairs.len() as f64;
                let mut dist = 0.0;
                for (j, &(s, _)) in pairs.iter().enumerate() {
                    let t = &target[j * sample.len() * h..(j + 1) * sample.len() * h];
                    let mut g = vec![0f32; t.len()];
                    dist += relative_distance(acts.hidden(s), t, pair_weight, Some(&mut g));
                    hidden_grads.push((s, g));
                }
                let dist = dist / pairs.len() as f64;
                loss_sum += o.hidden * dist;
                hidden_sum += dist;
            }
            let hidden_refs: Vec<(usize, &[f32])> = hidden_grads
                .iter()
                .map(|(l, g)| (*l, g.as_slice()))
                .collect();
            backward(&student.params, &acts, &dlogits, &hidden_refs, &mut grads);
        }
        let n = o.batch as f64;
        let (kl_mean, loss_mean, hidden_mean) = (kl_sum / n, loss_sum / n, hidden_sum / n);
        let var_grads = student.gradients(&grads);
        let var_refs: Vec<&[f32]> = var_grads.iter().map(|g| g.as_ref()).collect();
        let norm = global_norm(&var_refs);
        if !(loss_mean.is_finite() && norm.is_finite()) {
            let kept = match last_good {
                Some(s) => format!(
                    "the last good checkpoint (step {s}) is in {}",
                    ckpt_dir.display()
                ),
                None => "no checkpoint was written before it".to_owned(),
            };
            bail!(
                "the loss became {} at step {} (gradient norm {norm}); nothing was written to {}; {kept}; try a lower --lr",
                if loss_mean.is_finite() { "finite but the gradient not" } else { "NaN or infinite" },
                step + 1,
                o.output.display()
            );
        }
        let lr = schedule.lr(step);
        opt.update(
            student.state_mut(),
            &var_refs,
            &decay,
            lr,
            clip_scale(norm, o.clip),
        );
        drop(var_grads);
        student.sync()?;
        let mut entry = json!({"step": step + 1, "loss": loss_mean, "kl": kl_mean, "lr": lr, "grad_norm": norm});
        if !pairs.is_empty() {
            entry["hidden"] = json!(hidden_mean);
        }
        history.push(entry);
        let done = step + 1 - first;
        let rate = (done * per_step) as f64 / train_start.elapsed().as_secs_f64();
        let hidden_text = if pairs.is_empty() {
            String::new()
        } else {
            format!(" hidden {hidden_mean:.4}")
        };
        bar.set(
            step as u64 + 1,
            &format!(
                "loss {loss_mean:.4} KL {kl_mean:.4}{hidden_text} lr {lr:.2e} {rate:.0} tok/s"
            ),
        );
        if o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 && step + 1 < steps {
            save_checkpoint(&ckpt_dir, step + 1, &run_key, &student, &opt, &history)?;
            last_good = Some(step + 1);
        }
    }
    bar.finish();
    let train_seconds = train_start.elapsed().as_secs_f64();
    let trained_tokens = (steps - first) * per_step;

    if quantized.is_empty() {
        // The student's own tensor list and shapes, in its order.
        let declared: Vec<(String, Vec<usize>)> = student_model
            .tensor_names()
            .into_iter()
            .map(|n| Ok((n.clone(), student_model.tensor_meta(&n)?.1)))
            .collect::<Result<_>>()?;
        let mut writer = DenseWriter::create(
            &student_model,
            &student_model.config,
            &declared,
            &o.output,
            o.dtype,
        )?;
        for (name, shape) in &declared {
            // RoPE frequency factors (Llama 3 rope scaling) are no parameter: copied.
            let copied;
            let values = match student.values(name) {
                Some(v) => v,
                None if student_model.role(name) == Some(Role::RopeFreqs) => {
                    copied = student_model.tensor(name)?.to_f32()?;
                    &copied[..]
                }
                None => bail!("the trained model has no tensor '{name}'"),
            };
            writer.write(name, shape, values)?;
        }
        writer.finish(&student_model)?;
    } else {
        write_quantized(
            &student_model,
            &student,
            &types,
            &o.output,
            o.gguf_file_type,
        )?;
    }
    let first_kl = history.first().and_then(|h| h["kl"].as_f64());
    let last_kl = history.last().and_then(|h| h["kl"].as_f64());
    eprintln!(
        "wrote {}: {} steps, training KL {:.4} → {:.4}, {:.0} tokens/s, {:.0}s in all",
        o.output.display(),
        steps,
        first_kl.unwrap_or(f64::NAN),
        last_kl.unwrap_or(f64::NAN),
        trained_tokens as f64 / train_seconds,
        start.elapsed().as_secs_f64()
    );
    if let Some(p) = &o.report {
        let report = json!({
            "teacher": teacher.path, "teacher_sha256": teacher_sha,
            "student": student_model.path, "student_sha256": student_sha,
            "text": text_path, "steps": steps, "batch": o.batch, "seq": o.seq,
            "tokens": steps * per_step, "lr": o.lr, "top_k": o.top_k, "temperature": o.temperature,
            "train": format!("{:?}", o.train).to_lowercase(), "trained_values": student.n_trainable(),
            "quantized_tensors": quantized.len(), "hidden": o.hidden,
            "layer_map": pairs.iter().map(|(s, t)| json!([s, t])).collect::<Vec<_>>(),
            "masked_zeros": student.masks.count,
            "resumed_from_step": first, "train_seconds": train_seconds,
            "tokens_per_second": trained_tokens as f64 / train_seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "history": history,
        });
        write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    std::fs::remove_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot remove the checkpoints {}", ckpt_dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_skips_the_teacher_blocks_a_depth_pruned_student_lacks() {
        // A student made by removing teacher blocks 2 and 5 of 8: each student
        // block is nearest its own source block.
        let kept = [0, 1, 3, 4, 6, 7];
        let distance: Vec<Vec<f64>> = kept
            .iter()
            .map(|&src| {
                (0..8)
                    .map(|t| {
                        if t == src {
                            0.1
                        } else {
                            1.0 + (t as f64 - src as f64).abs()
                        }
                    })
                    .collect()
            })
            .collect();
        let pairs = align_blocks(&distance, &[0, 2, 5]);
        assert_eq!(pairs, vec![(0, 0), (2, 3), (5, 7)]);
        // Equal depths give the identity whatever the distances.
        let flat = vec![vec![1.0; 4]; 4];
        assert_eq!(
            align_blocks(&flat, &[0, 1, 2, 3]),
            vec![(0, 0), (1, 1), (2, 2), (3, 3)]
        );
    }

    #[test]
    fn layer_maps_are_parsed_or_refused_clearly() {
        assert_eq!(
            parse_layer_map("0:0, 25:29").unwrap(),
            vec![(0, 0), (25, 29)]
        );
        for bad in ["", "3", "a:b", "1:2,1:3"] {
            assert!(parse_layer_map(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_distance_gradient_matches_finite_differences() {
        let a = [0.3f32, -1.2, 0.7, 2.0];
        let b = [0.1f32, -1.0, 0.9, 1.5];
        let mut g = [0f32; 4];
        let d = relative_distance(&a, &b, 1.0, Some(&mut g));
        assert!(d > 0.0);
        for i in 0..4 {
            let (mut up, mut down) = (a, a);
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let fd = (relative_distance(&up, &b, 0.0, None)
                - relative_distance(&down, &b, 0.0, None))
                / 2e-3;
            assert!((fd - g[i] as f64).abs() < 1e-3, "{i}: {fd} vs {}", g[i]);
        }
    }
}
