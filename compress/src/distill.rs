//! `compress distill`: recovers a pruned model's quality by training it to match
//! its original on calibration text (knowledge distillation), on the CPU.
//!
//! The teacher's top-k logits for every training sequence are computed once and
//! stored beside the checkpoints, so the teacher is not in memory while the
//! student trains (`--top-k 0` keeps it and uses its full distribution each
//! step, which reverse KL needs). The student trains in f32 with AdamW; the
//! exact zeros of a pruned student stay zero. Checkpoints every K steps hold the
//! weights, the optimizer's moments and the step, and a rerun of the same
//! command resumes from the last one.

use crate::progress::Progress;
use crate::prune::DenseWriter;
use anyhow::{bail, Context, Result};
use distill::loss::{self, TopK};
use distill::train::{self, AdamW, Masks, Schedule, Trainable};
use distill::{backward, forward, Params};
use model::io::{read_json, write_atomic, AtomicFile};
use model::Model;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which tensors train.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum TrainArg {
    /// Every tensor.
    All,
    /// Every block tensor and the final norm (not the embedding or head).
    Blocks,
    /// The RMSNorm gains only.
    Norms,
}

/// Arguments of `compress distill`.
#[derive(clap::Args)]
pub struct Args {
    /// The original model (teacher).
    #[arg(long)]
    teacher: String,
    /// The compressed model to train (student): dense, or pruned (unstructured,
    /// N:M, or structurally smaller), with the teacher's vocabulary.
    #[arg(long)]
    student: String,
    /// Training text (calibration text, never the evaluation text).
    #[arg(long, default_value = "asset:calib")]
    text: String,
    /// Training tokens in all (rounded up to whole steps of --batch × --seq).
    #[arg(long)]
    tokens: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    lr: f64,
    /// Output: an HF-style folder (safetensors) or a .gguf file.
    #[arg(short, long)]
    output: PathBuf,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Sequences per optimizer step (gradients accumulated over them).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Warm-up, as a fraction of the steps.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// Final learning rate of the cosine schedule, as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Decoupled weight decay (2-D tensors only).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Softening temperature of the KL terms (scaled by T²).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Weight of the forward KL(teacher ‖ student).
    #[arg(long, default_value_t = 1.0)]
    kl: f64,
    /// Weight of the reverse KL(student ‖ teacher) (needs --top-k 0).
    #[arg(long, default_value_t = 0.0)]
    reverse_kl: f64,
    /// Weight of the cross-entropy on the text's next tokens.
    #[arg(long, default_value_t = 0.0)]
    ce: f64,
    /// Teacher tokens kept per position on disk (0: the teacher's whole
    /// distribution, computed each step with the teacher in memory).
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    /// Which tensors train.
    #[arg(long, value_enum, default_value_t = TrainArg::All)]
    train: TrainArg,
    /// Steps between checkpoints (0: none).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Checkpoint folder (default: OUTPUT.ckpt beside the output); removed when
    /// the output is written.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Seed of the training sequences' choice and order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Element type of the written weights.
    #[arg(long, value_enum, default_value_t = crate::DtypeArg::F32)]
    dtype: crate::DtypeArg,
    /// Also write the training report (per-step loss, KL, learning rate, gradient
    /// norm; throughput; peak memory) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Checks the arguments alone, reading no file.
pub fn check_args(a: &Args) -> Result<()> {
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr {} must be a positive learning rate", a.lr);
    }
    if a.tokens == 0 {
        bail!("--tokens must be at least 1 (the training budget)");
    }
    if a.seq < 2 || a.batch == 0 {
        bail!("--seq must be at least 2 and --batch at least 1");
    }
    for (flag, v) in [("--warmup", a.warmup), ("--min-lr-ratio", a.min_lr_ratio)] {
        if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
            bail!("{flag} {v} must be a fraction in [0, 1]");
        }
    }
    for (flag, v) in [
        ("--weight-decay", a.weight_decay),
        ("--clip", a.clip),
        ("--kl", a.kl),
        ("--reverse-kl", a.reverse_kl),
        ("--ce", a.ce),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag} {v} must be a non-negative number");
        }
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature {} must be positive", a.temperature);
    }
    if a.kl + a.reverse_kl + a.ce == 0.0 {
        bail!("every loss weight is 0: give --kl, --reverse-kl or --ce");
    }
    if a.reverse_kl > 0.0 && a.top_k > 0 {
        bail!("--reverse-kl needs the teacher's whole distribution: add --top-k 0");
    }
    Ok(())
}

/// Refuses a student that cannot learn from this teacher.
fn check_pair(teacher: &Model, student: &Model, text: &str) -> Result<()> {
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
    if student.quantized.is_some() {
        bail!(
            "{}: a quantized student (GPTQ / compressed-tensors integer weights) is not trained in this version; distill the dense pruned model, then quantize it",
            student.path.display()
        );
    }
    for name in student.tensor_names() {
        let (ty, _) = student.tensor_meta(&name)?;
        if !matches!(
            ty,
            kernels::GgmlType::F32 | kernels::GgmlType::F16 | kernels::GgmlType::BF16
        ) {
            bail!(
                "{}: tensor '{name}' is {ty:?}; a quantized student is not trained in this version (distill the float model, then quantize it)",
                student.path.display()
            );
        }
    }
    Ok(())
}

fn hex_sha(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    crate::assets::hex(&Sha256::digest(bytes))
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
        .with_context(|| format!("{what} is shorter than the model"))?;
    for (x, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    Ok(())
}

/// Saves every tensor of `p` into one file.
fn save_params(p: &Params<f32>, path: &Path) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    for t in p.tensors() {
        write_f32s(&mut f, t.data)?;
    }
    f.commit()
}

fn load_params(p: &mut Params<f32>, path: &Path) -> Result<()> {
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    for t in p.tensors_mut() {
        read_f32s(&mut f, t.data, &path.display().to_string())?;
    }
    Ok(())
}

/// The teacher's top-k logits of every training sequence, computed once and
/// kept in the checkpoint folder (reused when the same run resumes).
fn teacher_topk(
    teacher: &Model,
    samples: &[Vec<u32>],
    k: usize,
    temperature: f64,
    dir: &Path,
    key: &str,
) -> Result<Vec<TopK>> {
    let (meta_path, bin_path) = (dir.join("teacher-topk.json"), dir.join("teacher-topk.bin"));
    let vocab = teacher.config.vocab_size;
    let k = k.min(vocab);
    let seq = samples.first().map_or(0, Vec::len);
    if let Ok(meta) = read_json(&meta_path) {
        if meta["key"] == json!(key) {
            let mut f = std::io::BufReader::new(std::fs::File::open(&bin_path)?);
            let mut out = Vec::with_capacity(samples.len());
            for _ in samples {
                let mut ids = vec![0u8; seq * k * 4];
                f.read_exact(&mut ids)
                    .with_context(|| format!("{} is truncated", bin_path.display()))?;
                let mut logits = vec![0f32; seq * k];
                let mut lse = vec![0f32; seq];
                read_f32s(&mut f, &mut logits, &bin_path.display().to_string())?;
                read_f32s(&mut f, &mut lse, &bin_path.display().to_string())?;
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
            eprintln!(
                "teacher: top-{k} logits of {} sequences reused from {}",
                samples.len(),
                bin_path.display()
            );
            return Ok(out);
        }
    }
    let mut bar = Progress::new(samples.len() as u64, "teacher");
    let start = Instant::now();
    let mut out = Vec::with_capacity(samples.len());
    let mut f = AtomicFile::create(&bin_path)?;
    for (i, s) in samples.iter().enumerate() {
        let logits = teacher.logits(s, 0)?;
        let t = TopK::from_logits(&logits, vocab, k, temperature);
        f.write_all(
            &t.ids
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )?;
        write_f32s(&mut f, &t.logits)?;
        write_f32s(&mut f, &t.lse)?;
        out.push(t);
        bar.set(i as u64 + 1, "");
    }
    bar.finish();
    f.commit()?;
    write_atomic(
        &meta_path,
        serde_json::to_string_pretty(
            &json!({"key": key, "k": k, "sequences": samples.len(), "seq": seq}),
        )?
        .as_bytes(),
    )?;
    eprintln!(
        "teacher: top-{k} logits of {} sequences × {seq} tokens in {:.1}s ({})",
        samples.len(),
        start.elapsed().as_secs_f64(),
        bin_path.display()
    );
    Ok(out)
}

/// Saves a checkpoint as `DIR/step-N/` (weights and moments), then points
/// `DIR/state.json` at it and removes the older one.
fn save_checkpoint(
    dir: &Path,
    step: usize,
    key: &str,
    params: &Params<f32>,
    opt: &AdamW,
    history: &[Value],
) -> Result<()> {
    let name = format!("step-{step:06}");
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    save_params(params, &tmp.join("params.bin"))?;
    save_params(&opt.m, &tmp.join("adam_m.bin"))?;
    save_params(&opt.v, &tmp.join("adam_v.bin"))?;
    let final_dir = dir.join(&name);
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

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    check_args(&a)?;
    let start = Instant::now();
    let teacher_path = crate::resolve(&a.teacher)?;
    let student_path = crate::resolve(&a.student)?;
    let text_path = crate::resolve(&a.text)?;
    for p in [&teacher_path, &student_path, &text_path] {
        if a.output.canonicalize().ok() == p.canonicalize().ok() {
            bail!(
                "output {} is an input; inputs are never modified",
                a.output.display()
            );
        }
    }
    let teacher = Model::open(&teacher_path)?;
    let student = Model::open(&student_path)?;
    let text = eval::text::read_text(&text_path)?;
    check_pair(&teacher, &student, &text)?;

    let per_step = a.batch * a.seq;
    let steps = a.tokens.div_ceil(per_step);
    let tokens = student.tokenizer.encode(&text)?;
    let bos = student
        .tokenizer
        .add_bos()
        .then(|| student.tokenizer.bos())
        .flatten();
    let samples = model::calib::calibration_samples(&tokens, steps * a.batch, a.seq, a.seed, bos)
        .with_context(|| format!("training text {}", text_path.display()))?;
    let vocab = student.config.vocab_size;

    let teacher_sha = crate::sensitivity::model_sha256(&teacher)?;
    let student_sha = crate::sensitivity::model_sha256(&student)?;
    let text_sha = hex_sha(text.as_bytes());
    let teacher_key = hex_sha(
        json!({"teacher": teacher_sha, "text": text_sha, "seq": a.seq, "n": samples.len(),
            "seed": a.seed, "k": a.top_k, "t": a.temperature})
        .to_string()
        .as_bytes(),
    );
    let run_key = hex_sha(
        json!({"teacher": teacher_key, "student": student_sha, "lr": a.lr, "batch": a.batch,
            "warmup": a.warmup, "min_lr": a.min_lr_ratio, "wd": a.weight_decay, "clip": a.clip,
            "kl": a.kl, "rkl": a.reverse_kl, "ce": a.ce, "train": format!("{:?}", a.train), "steps": steps})
        .to_string()
        .as_bytes(),
    );
    let ckpt_dir = a.checkpoint_dir.clone().unwrap_or_else(|| {
        let mut s = a.output.as_os_str().to_os_string();
        s.push(".ckpt");
        PathBuf::from(s)
    });
    std::fs::create_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;

    let topk = if a.top_k > 0 {
        Some(teacher_topk(
            &teacher,
            &samples,
            a.top_k,
            a.temperature,
            &ckpt_dir,
            &teacher_key,
        )?)
    } else {
        None
    };
    let mut params = Params::from_model(&student)?;
    let masks = Masks::of_zeros(&params, 0.1);
    if masks.count > 0 {
        eprintln!("keeping {} pruned weights at exactly zero", masks.count);
    }
    let trainable = match a.train {
        TrainArg::All => Trainable::All,
        TrainArg::Blocks => Trainable::Blocks,
        TrainArg::Norms => Trainable::Norms,
    };
    let mut opt = AdamW::new(&params, a.weight_decay);
    let schedule = Schedule {
        peak: a.lr,
        warmup: ((a.warmup * steps as f64).round() as usize).max(1),
        total: steps,
        min_ratio: a.min_lr_ratio,
    };
    let mut history: Vec<Value> = Vec::new();
    let mut first = 0usize;
    if let Ok(state) = read_json(&ckpt_dir.join("state.json")) {
        if state["key"] == json!(run_key) {
            let step = state["step"].as_u64().unwrap_or(0) as usize;
            let dir = ckpt_dir.join(state["checkpoint"].as_str().unwrap_or(""));
            load_params(&mut params, &dir.join("params.bin"))?;
            load_params(&mut opt.m, &dir.join("adam_m.bin"))?;
            load_params(&mut opt.v, &dir.join("adam_v.bin"))?;
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
    drop(teacher_path);
    let teacher_full = if topk.is_none() { Some(&teacher) } else { None };

    eprintln!(
        "distill: {} steps × {} sequences × {} tokens ({} tokens) of {}, lr {}, {} of {} parameters training",
        steps,
        a.batch,
        a.seq,
        steps * per_step,
        text_path.display(),
        a.lr,
        params
            .tensors()
            .iter()
            .filter(|t| trainable.includes(&t.name))
            .map(|t| t.data.len())
            .sum::<usize>(),
        params.n_params()
    );
    let mut bar = Progress::new(steps as u64, "distill");
    bar.set(first as u64, "");
    let mut grads = params.zeros_like();
    let train_start = Instant::now();
    let mut last_good = history
        .last()
        .and_then(|h| h["step"].as_u64())
        .map(|s| s as usize);
    for step in first..steps {
        grads.zero();
        let (mut kl_sum, mut loss_sum) = (0.0, 0.0);
        for b in 0..a.batch {
            let i = step * a.batch + b;
            let sample = &samples[i];
            let acts = forward(&params, sample)?;
            let mut dlogits = vec![0f32; acts.logits.len()];
            let w = 1.0 / a.batch as f64;
            let kl = match (&topk, teacher_full) {
                (Some(t), _) => {
                    loss::forward_kl_topk(&acts.logits, &t[i], vocab, a.kl * w, &mut dlogits)?
                }
                (None, Some(teacher)) => {
                    let tl = teacher.logits(sample, 0)?;
                    let kl = loss::forward_kl(
                        &acts.logits,
                        &tl,
                        vocab,
                        a.temperature,
                        a.kl * w,
                        &mut dlogits,
                    )?;
                    if a.reverse_kl > 0.0 {
                        let r = loss::reverse_kl(
                            &acts.logits,
                            &tl,
                            vocab,
                            a.temperature,
                            a.reverse_kl * w,
                            &mut dlogits,
                        )?;
                        loss_sum += a.reverse_kl * r;
                    }
                    kl
                }
                (None, None) => unreachable!("a teacher is always given"),
            };
            loss_sum += a.kl * kl;
            kl_sum += kl;
            if a.ce > 0.0 {
                let ce = loss::next_token_cross_entropy(
                    &acts.logits,
                    vocab,
                    sample,
                    a.ce * w,
                    &mut dlogits,
                )?;
                loss_sum += a.ce * ce;
            }
            backward(&params, &acts, &dlogits, &[], &mut grads);
        }
        let (kl_mean, loss_mean) = (kl_sum / a.batch as f64, loss_sum / a.batch as f64);
        let norm = train::clip(&mut grads, trainable, a.clip);
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
                a.output.display()
            );
        }
        let lr = schedule.lr(step);
        opt.update(&mut params, &grads, lr, trainable);
        masks.apply(&mut params);
        history.push(json!({"step": step + 1, "loss": loss_mean, "kl": kl_mean, "lr": lr, "grad_norm": norm}));
        let done = step + 1 - first;
        let rate = (done * per_step) as f64 / train_start.elapsed().as_secs_f64();
        bar.set(
            step as u64 + 1,
            &format!("loss {loss_mean:.4} KL {kl_mean:.4} lr {lr:.2e} {rate:.0} tok/s"),
        );
        if a.checkpoint_every > 0 && (step + 1) % a.checkpoint_every == 0 && step + 1 < steps {
            save_checkpoint(&ckpt_dir, step + 1, &run_key, &params, &opt, &history)?;
            last_good = Some(step + 1);
        }
    }
    bar.finish();
    let train_seconds = train_start.elapsed().as_secs_f64();
    let trained_tokens = (steps - first) * per_step;

    // The student's own tensor list and shapes, in its order.
    let declared: Vec<(String, Vec<usize>)> = student
        .tensor_names()
        .into_iter()
        .map(|n| Ok((n.clone(), student.tensor_meta(&n)?.1)))
        .collect::<Result<_>>()?;
    let mut writer = DenseWriter::create(
        &student,
        &student.config,
        &declared,
        &a.output,
        a.dtype.ggml(),
    )?;
    for (name, shape) in &declared {
        let values = params
            .get(name)
            .with_context(|| format!("the trained model has no tensor '{name}'"))?;
        writer.write(name, shape, values)?;
    }
    writer.finish(&student)?;
    let first_kl = history.first().and_then(|h| h["kl"].as_f64());
    let last_kl = history.last().and_then(|h| h["kl"].as_f64());
    eprintln!(
        "wrote {}: {} steps, training KL {:.4} → {:.4}, {:.0} tokens/s, {:.0}s in all",
        a.output.display(),
        steps,
        first_kl.unwrap_or(f64::NAN),
        last_kl.unwrap_or(f64::NAN),
        trained_tokens as f64 / train_seconds,
        start.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.report {
        let report = json!({
            "teacher": teacher.path, "teacher_sha256": teacher_sha,
            "student": student.path, "student_sha256": student_sha,
            "text": text_path, "steps": steps, "batch": a.batch, "seq": a.seq,
            "tokens": steps * per_step, "lr": a.lr, "top_k": a.top_k, "temperature": a.temperature,
            "train": format!("{:?}", a.train).to_lowercase(), "masked_zeros": masks.count,
            "resumed_from_step": first, "train_seconds": train_seconds,
            "tokens_per_second": trained_tokens as f64 / train_seconds,
            "peak_rss_bytes": crate::evaluate::peak_rss_bytes(),
            "history": history,
        });
        write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    std::fs::remove_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot remove the checkpoints {}", ckpt_dir.display()))?;
    Ok(())
}
