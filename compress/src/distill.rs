//! `compress distill`: the flags of the distillation stage. Checks them, resolves
//! `asset:` paths and runs [`distill::run`] (the teacher cache, the training
//! loop, checkpoints and writing the trained model live there).

use anyhow::Result;
use distill::{DistillOptions, Train};
use std::path::PathBuf;

/// Which tensors train.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum TrainArg {
    /// Every tensor.
    All,
    /// Every block tensor (biases and per-head q/k norms included) and the
    /// final norm (not the embedding or head).
    Blocks,
    /// The RMSNorm gains only (per-head q/k norms included).
    Norms,
    /// A low-rank adapter on every block linear (--lora-rank, --lora-alpha),
    /// merged into the weights when written.
    Lora,
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
    /// Rank of the adapters of --train lora.
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Adapter scale numerator (the update is alpha/rank · B·A).
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// Weight of the hidden-state loss: the squared distance between the
    /// student's and the teacher's residual stream after mapped blocks, relative
    /// to the teacher's squared norm, averaged over the pairs.
    #[arg(long, default_value_t = 0.0)]
    hidden: f64,
    /// Student-to-teacher block pairs of the hidden-state loss: `auto` (four
    /// student blocks spread over the depth, the last included, each paired
    /// with the teacher block it is closest to, in order) or a list `S:T,S:T`
    /// of 0-based block numbers.
    #[arg(long, default_value = "auto")]
    layer_map: String,
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

impl TrainArg {
    /// The stage's choice.
    fn train(self) -> Train {
        match self {
            TrainArg::All => Train::All,
            TrainArg::Blocks => Train::Blocks,
            TrainArg::Norms => Train::Norms,
            TrainArg::Lora => Train::Lora,
        }
    }
}

/// The stage's options for `a` with these input paths.
fn options(a: &Args, teacher: PathBuf, student: PathBuf, text: PathBuf) -> DistillOptions {
    DistillOptions {
        teacher,
        student,
        text,
        tokens: a.tokens,
        lr: a.lr,
        output: a.output.clone(),
        seq: a.seq,
        batch: a.batch,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        weight_decay: a.weight_decay,
        clip: a.clip,
        temperature: a.temperature,
        kl: a.kl,
        reverse_kl: a.reverse_kl,
        ce: a.ce,
        top_k: a.top_k,
        train: a.train.train(),
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        hidden: a.hidden,
        layer_map: a.layer_map.clone(),
        checkpoint_every: a.checkpoint_every,
        checkpoint_dir: a.checkpoint_dir.clone(),
        seed: a.seed,
        dtype: a.dtype.ggml(),
        report: a.report.clone(),
        gguf_file_type: quant::gguf_mix::file_type_of,
    }
}

/// Checks the arguments alone, reading no file (the paths as given: nothing
/// is resolved or opened).
pub fn check_args(a: &Args) -> Result<()> {
    let given = |p: &String| PathBuf::from(p);
    options(a, given(&a.teacher), given(&a.student), given(&a.text)).check()
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    check_args(&a)?;
    for out in std::iter::once(&a.output).chain(&a.report) {
        model::io::prepare_output(out)?;
    }
    let teacher = crate::resolve(&a.teacher)?;
    let student = crate::resolve(&a.student)?;
    let text = crate::resolve(&a.text)?;
    distill::run::run(&options(&a, teacher, student, text))
}
