//! `compress run`, `compress validate` and `compress status`: the batch runner.
//!
//! A recipe's jobs run one after another; each stage is this same binary run as
//! a child process (`compress prune|quantize|imatrix|eval …`), so a stage in a
//! recipe is exactly the command a user would type. Every stage's output lives
//! in `OUT/.stages/KEY/`, where KEY is a hash of the stage's input (the input
//! model's file contents, or the key of the stage before), its arguments and the
//! contents of every file it reads; the folder appears only when the stage
//! finished (written as `KEY.tmp-HOST-PID`, then renamed). So a killed run
//! resumes from the last finished stage, variants sharing a prefix (the same
//! imatrix, the same pruning) compute it once, and shards running at the same
//! time on a shared folder never see half a stage.
//!
//! Each job ends with its artifact copied (atomically) to `OUT/MODEL/VARIANT…`,
//! and `MODEL/VARIANT.manifest.json` beside it: the job's status, its inputs with
//! sha256, the recipe, the tool version, the stages with their commands, every
//! artifact file with size and sha256, the evaluation and the gate results.

use crate::assets::sha256_file;
use crate::lease::{self, Attempt, Holder, Lease, LeaseTimes, Watch};
use crate::recipe::{self, ImatrixSource, Job, Recipe, Shard, StageKind};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Arguments of `compress run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Output folder (overrides the recipe's `output`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the I-th of N disjoint slices of the job list (1-based; jobs are dealt
    /// round-robin). `I` alone takes N from the recipe (its `shards` key, or one
    /// job per shard), so a job array's task runs the same jobs however the array
    /// was submitted: `--shard $((SLURM_ARRAY_TASK_ID+1))`. `I/N` sets N.
    #[arg(long)]
    shard: Option<String>,
    /// Print the stage graph: every stage, the jobs that share it, and which
    /// shard computes it (the others wait for it); then stop.
    #[arg(long, conflicts_with = "list")]
    plan: bool,
    /// Print only errors (and nothing on success).
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print one JSON object per event on stdout (job, stage, progress, result).
    #[arg(long)]
    json: bool,
    /// List the jobs this run (or shard) would run, and stop.
    #[arg(long)]
    list: bool,
}

/// Arguments of `compress validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Output folder the run would use (checked against the inputs).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Arguments of `compress status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Output folder of one or more runs (every shard's manifests are merged).
    dir: PathBuf,
    /// The recipe: also list its jobs that have no manifest yet.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Print the merged manifests as JSON.
    #[arg(long)]
    json: bool,
}

/// `compress validate`: every problem at once; exit 0 when there is none.
pub fn validate(a: ValidateArgs) -> Result<()> {
    let r = recipe::load(&a.recipe)?;
    let out = a.out.clone().unwrap_or_else(|| r.output.clone());
    recipe::check_outputs_for(&r, &out)?;
    let jobs = r.jobs();
    println!(
        "{}: valid: {} model{} × {} variant{} = {} jobs into {}",
        a.recipe.display(),
        r.models.len(),
        plural(r.models.len()),
        r.variants.len(),
        plural(r.variants.len()),
        jobs.len(),
        out.display()
    );
    for job in &jobs {
        let v = &r.variants[job.variant];
        let stages: Vec<String> = v
            .stages
            .iter()
            .map(|s| {
                let im = match &s.imatrix {
                    ImatrixSource::None => String::new(),
                    ImatrixSource::Collect => " --imatrix (collected)".into(),
                    ImatrixSource::File(f) => format!(" --imatrix {f}"),
                };
                format!("{} {}{im}", s.kind.name(), s.args.join(" "))
            })
            .collect();
        println!("  {:>3}  {}  ->  {}", job.index + 1, job.name, job.artifact);
        for s in stages {
            println!("         {s}");
        }
    }
    if let Some(e) = &r.eval {
        println!(
            "  eval: {} ctx {} chunks {} against {}",
            e.text,
            e.ctx,
            e.chunks.map_or("all".into(), |c| c.to_string()),
            e.base.as_deref().unwrap_or("each job's input model")
        );
    }
    if let Some(g) = &r.gate {
        println!("  gate: {}", gate_json(g));
    }
    let n = r.shard_count();
    println!(
        "  shards: {n} (`compress run {} --shard I`, I = 1..{n}; `--plan` shows which stages they share)",
        a.recipe.display()
    );
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn gate_json(t: &eval::gate::Thresholds) -> Value {
    json!({
        "max_kld": t.max_kld, "max_kld_p99": t.max_kld_p99,
        "max_ppl_increase": t.max_ppl_increase, "min_top1": t.min_top1,
        "min_compression": t.min_compression,
    })
}

/// How progress is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// indicatif bars (stderr is a terminal).
    Bars,
    /// One line per event on stderr (CI logs).
    Lines,
    /// Errors only.
    Quiet,
    /// JSON events on stdout.
    Json,
}

/// Progress and events of a run.
struct Reporter {
    mode: Mode,
    multi: MultiProgress,
    jobs: Option<ProgressBar>,
    stage: Option<ProgressBar>,
    task: Option<ProgressBar>,
    task_name: String,
    last_line: Instant,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

impl Reporter {
    fn new(mode: Mode, jobs: usize) -> Reporter {
        let multi = MultiProgress::new();
        let jobs = (mode == Mode::Bars).then(|| {
            let b = multi.add(ProgressBar::new(jobs as u64));
            b.set_style(style(
                "jobs   [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            ));
            b
        });
        Reporter {
            mode,
            multi,
            jobs,
            stage: None,
            task: None,
            task_name: String::new(),
            last_line: Instant::now(),
        }
    }

    fn event(&self, v: Value) {
        if self.mode == Mode::Json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        }
    }

    fn line(&self, s: &str) {
        match self.mode {
            Mode::Lines => eprintln!("{s}"),
            Mode::Bars => {
                let _ = self.multi.println(s);
            }
            Mode::Quiet | Mode::Json => {}
        }
    }

    fn job_start(&mut self, job: &Job, n_jobs: usize, n_stages: usize) {
        self.event(
            json!({"event": "job_start", "job": job.name, "index": job.index + 1, "jobs": n_jobs}),
        );
        self.line(&format!(
            "[job {}/{n_jobs}] {} -> {}",
            job.index + 1,
            job.name,
            job.artifact
        ));
        if let Some(j) = &self.jobs {
            j.set_message(job.name.clone());
        }
        if self.mode == Mode::Bars {
            let b = self.multi.add(ProgressBar::new(n_stages as u64));
            b.set_style(style("stages [{bar:30}] {pos}/{len} {msg}"));
            self.stage = Some(b);
        }
    }

    fn stage_start(&mut self, job: &str, label: &str, key: &str, by: &str) {
        self.event(
            json!({"event": "stage_start", "job": job, "stage": label, "key": key, "by": by}),
        );
        self.line(&format!("  {label}: running ({key}) in {by}"));
        if let Some(s) = &self.stage {
            s.set_message(label.to_owned());
        }
        self.task_name.clear();
    }

    /// Another shard holds the stage's lease.
    fn stage_wait(&mut self, job: &str, label: &str, key: &str, by: &str) {
        self.event(
            json!({"event": "stage_wait", "job": job, "stage": label, "key": key, "by": by}),
        );
        self.line(&format!(
            "  {label}: being computed by {by}; waiting ({key})"
        ));
        if let Some(s) = &self.stage {
            s.set_message(format!("{label}: waiting for {by}"));
        }
    }

    /// A finished stage reused, computed by `by`, after `waited` seconds of waiting.
    fn stage_reused(
        &mut self,
        job: &str,
        label: &str,
        key: &str,
        by: Option<&str>,
        waited: Option<f64>,
    ) {
        self.event(
            json!({"event": "stage_cached", "job": job, "stage": label, "key": key,
            "computed_by": by, "waited_s": waited}),
        );
        let by = by.map_or(String::new(), |b| format!(" by {b}"));
        match waited {
            Some(w) => self.line(&format!(
                "  {label}: computed{by}; reused after waiting {w:.1}s ({key})"
            )),
            None => self.line(&format!("  {label}: done before{by}, reused ({key})")),
        }
        self.task_name.clear();
    }

    /// A line the stage printed on stderr: progress lines (`NAME D/N MSG`) drive
    /// the task bar; the others are shown as they are.
    fn child_line(&mut self, job: &str, label: &str, line: &str) {
        if let Some((task, done, total, msg)) = parse_progress(line) {
            self.event(json!({"event": "progress", "job": job, "stage": label,
                "task": task, "done": done, "total": total, "message": msg}));
            match self.mode {
                Mode::Bars => {
                    if self.task.is_none() || self.task_name != task {
                        if let Some(t) = self.task.take() {
                            t.finish_and_clear();
                        }
                        let b = self.multi.add(ProgressBar::new(total));
                        b.set_style(style(
                            "{prefix:6} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
                        ));
                        b.set_prefix(task.to_owned());
                        self.task = Some(b);
                        self.task_name = task.to_owned();
                    }
                    if let Some(t) = &self.task {
                        t.set_length(total);
                        t.set_position(done);
                        t.set_message(msg.to_owned());
                    }
                }
                Mode::Lines => {
                    // CI logs get a line every few seconds, not one per tensor.
                    let due = self.last_line.elapsed().as_secs_f64() >= 5.0;
                    if done == total || done <= 1 || due {
                        eprintln!("    {label}: {line}");
                        self.last_line = Instant::now();
                    }
                }
                Mode::Quiet | Mode::Json => {}
            }
        } else {
            self.event(json!({"event": "log", "job": job, "stage": label, "line": line}));
            if self.mode == Mode::Lines || self.mode == Mode::Bars {
                self.line(&format!("    {label}: {line}"));
            }
        }
    }

    fn stage_done(&mut self, job: &str, label: &str, key: &str, seconds: f64) {
        self.event(json!({"event": "stage_done", "job": job, "stage": label, "key": key, "seconds": seconds}));
        self.line(&format!("  {label}: finished in {seconds:.1}s ({key})"));
        if let Some(t) = self.task.take() {
            t.finish_and_clear();
        }
        if let Some(s) = &self.stage {
            s.inc(1);
        }
    }

    fn job_done(&mut self, job: &Job, manifest: &Value) {
        if let Some(s) = self.stage.take() {
            s.finish_and_clear();
        }
        if let Some(j) = &self.jobs {
            j.inc(1);
        }
        self.event(json!({"event": "job_done", "job": job.name,
            "status": manifest["status"], "artifacts": manifest["artifacts"],
            "eval": manifest["eval"], "gate": manifest["gate"], "error": manifest["error"]}));
        self.line(&format!(
            "[job {}] {}: {}",
            job.index + 1,
            job.name,
            summary_of(manifest)
        ));
    }

    fn finish(&self) {
        if let Some(j) = &self.jobs {
            j.finish_and_clear();
        }
    }
}

/// `NAME D/N REST` (the plain-line form of [`model::progress::Progress`];
/// NAME may have spaces).
fn parse_progress(line: &str) -> Option<(&str, u64, u64, &str)> {
    let mut start = 0;
    for word in line.split(' ') {
        let here = start;
        start += word.len() + 1;
        let Some((d, n)) = word.split_once('/') else {
            continue;
        };
        let (Ok(done), Ok(total)) = (d.parse(), n.parse()) else {
            continue;
        };
        let task = line[..here].trim_end();
        if task.is_empty() || task.ends_with(':') {
            return None;
        }
        return Some((task, done, total, line.get(start..).unwrap_or("").trim()));
    }
    None
}

/// One line about a finished job.
fn summary_of(m: &Value) -> String {
    let status = m["status"].as_str().unwrap_or("?");
    if status == "failed" {
        return format!("failed: {}", m["error"].as_str().unwrap_or(""));
    }
    let bytes: u64 = m["artifacts"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|f| f["bytes"].as_u64()).sum());
    let mut s = format!("{status}, {:.1} MB", bytes as f64 / 1e6);
    let e = &m["eval"];
    if let Some(p) = e["ppl"].as_f64() {
        s.push_str(&format!(", PPL {p:.3}"));
    }
    if let Some(k) = e["kld"].as_f64() {
        s.push_str(&format!(", KLD {k:.4}"));
    }
    if let Some(t) = e["top1"].as_f64() {
        s.push_str(&format!(", top-1 {:.1}%", 100.0 * t));
    }
    if let Some(c) = e["compression"].as_f64() {
        s.push_str(&format!(", {c:.2}x"));
    }
    s
}

/// The host name (for temporary names on a shared folder).
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(|c: char| !c.is_ascii_alphanumeric(), "-"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    crate::assets::hex(&Sha256::digest(bytes))
}

/// The files that make up a model or text input, for its content hash: a file
/// (with the config and tokenizer beside a safetensors file), or every file of
/// a folder.
fn input_files(path: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in
            std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
    } else {
        files.push(path.to_path_buf());
        let is_hf = path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json");
        if let (true, Some(dir)) = (is_hf, path.parent()) {
            for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
                let p = dir.join(name);
                if p.is_file() && p != path {
                    files.push(p);
                }
            }
            if path.extension().is_some_and(|e| e == "json") {
                for e in std::fs::read_dir(dir)? {
                    let p = e?.path();
                    if p.extension().is_some_and(|e| e == "safetensors") {
                        files.push(p);
                    }
                }
            }
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!("{} holds no files", path.display());
    }
    Ok(files)
}

/// A file's record in a manifest.
fn file_record(path: &Path, sha: &str) -> Result<Value> {
    let bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    Ok(json!({"path": path, "bytes": bytes, "sha256": sha}))
}

/// The runner's state for one run.
struct Runner {
    exe: PathBuf,
    out: PathBuf,
    stages_dir: PathBuf,
    host: String,
    /// This run's `--shard` (recorded in leases and stage records).
    shard: Option<String>,
    /// Heartbeat and staleness of stage leases.
    lease_times: LeaseTimes,
    /// Content hashes by path (each input is hashed once per run).
    hashes: HashMap<PathBuf, (String, Vec<Value>)>,
    reporter: Reporter,
}

/// A stage's result: its key and where its output is.
#[derive(Clone)]
struct Done {
    key: String,
    dir: PathBuf,
    cached: bool,
    seconds: f64,
    command: Vec<String>,
    /// The stage's `computed_by` record (a [`Holder`]).
    computed_by: Value,
    /// Seconds this run waited for another shard to finish it.
    waited: Option<f64>,
}

impl Runner {
    /// The content hash of an input (file or folder) and its files' records.
    fn hash_input(&mut self, path: &Path) -> Result<(String, Vec<Value>)> {
        if let Some(h) = self.hashes.get(path) {
            return Ok(h.clone());
        }
        let mut records = Vec::new();
        let mut all = Vec::new();
        for f in input_files(path)? {
            let sha = sha256_file(&f)?;
            all.push(format!(
                "{}:{sha}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ));
            records.push(file_record(&f, &sha)?);
        }
        let h = (sha256_hex(all.join("\n").as_bytes()), records);
        self.hashes.insert(path.to_path_buf(), h.clone());
        Ok(h)
    }

    /// Runs a step unless its output exists. A step another shard is computing
    /// (it holds the stage's lease) is waited for, then reused.
    fn step(&mut self, job: &str, step: &Step) -> Result<Done> {
        let key = step.key.clone();
        let dir = self.stages_dir.join(&key);
        let lease_file = lease::lease_path(&dir);
        let me = Holder::me(&self.host, self.shard.as_deref(), job, &step.label);
        let poll = self.lease_times.beat.min(Duration::from_secs(1)) / 2;
        let mut waiting: Option<(Instant, Option<Watch>)> = None;
        let held = loop {
            if dir.is_dir() {
                return Ok(self.reuse(job, step, &dir, waiting.map(|w| w.0)));
            }
            match lease::try_acquire(&lease_file, &me, self.lease_times) {
                Ok(Attempt::Acquired(held)) => {
                    // The holder before us may have finished between our look and our take.
                    if dir.is_dir() {
                        continue;
                    }
                    break Some(held);
                }
                Ok(Attempt::Held(holder, raw)) => {
                    let (_, watch) = waiting.get_or_insert_with(|| {
                        let by = holder
                            .as_ref()
                            .map_or("another run".into(), Holder::describe);
                        self.reporter.stage_wait(job, &step.label, &key, &by);
                        (Instant::now(), None)
                    });
                    let watch = watch.get_or_insert_with(|| Watch::new(&raw));
                    if let Some(why) =
                        watch.stale(holder.as_ref(), &raw, &self.host, self.lease_times)
                    {
                        if lease::take_over(&lease_file, &me, &raw)? {
                            let by = holder
                                .as_ref()
                                .map_or("another run".into(), Holder::describe);
                            self.reporter.line(&format!(
                                "  {}: cleared the stale lease of {by}: {why}",
                                step.label
                            ));
                        }
                        waiting = waiting.map(|(t, _)| (t, None));
                        continue;
                    }
                    std::thread::sleep(poll);
                }
                Err(e) => {
                    self.reporter.line(&format!(
                        "  {}: warning: {e:#}; computing without a lease (another shard may compute it too)",
                        step.label
                    ));
                    break None;
                }
            }
        };
        self.reporter
            .stage_start(job, &step.label, &key, &me.describe());
        let tmp = self
            .stages_dir
            .join(format!("{key}.tmp-{}-{}", self.host, std::process::id()));
        self.remove_stale(&key)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // A folder beside the stage's for state that must survive a kill (the
        // checkpoints of a training stage).
        let keep = self.stages_dir.join(format!("{key}.keep"));
        let args = (step.args)(&tmp, &keep);
        let start = Instant::now();
        let result = self.spawn(job, &step.label, &args, &tmp, step.stdout_file);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let seconds = start.elapsed().as_secs_f64();
        // The stage's reports name its outputs by the temporary folder's path:
        // point them at the folder they are about to be renamed to.
        let (from, to) = (tmp.display().to_string(), dir.display().to_string());
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = model::io::read_text(&path)?;
                if text.contains(&from) {
                    model::io::write_atomic(&path, text.replace(&from, &to).as_bytes())?;
                }
            }
        }
        let mut command = vec!["compress".to_owned()];
        command.extend(args.iter().map(|a| a.replace(&from, &to)));
        let computed_by = json!(me);
        model::io::write_atomic(
            &tmp.join("stage.json"),
            serde_json::to_string_pretty(
                &json!({"key": key, "command": command, "seconds": seconds,
                "material": step.material, "computed_by": computed_by}),
            )?
            .as_bytes(),
        )?;
        sync_dir(&tmp);
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Another shard finished the same stage first: its output is identical.
            Err(_) if dir.is_dir() => std::fs::remove_dir_all(&tmp)?,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), dir.display())
                })
            }
        }
        sync_dir(&self.stages_dir);
        if let Some(lost) = held.as_ref().and_then(Lease::lost) {
            self.reporter
                .line(&format!("  {}: warning: {lost}", step.label));
        }
        // Released only now: a waiter sees the finished folder before the lease goes.
        drop(held);
        self.reporter.stage_done(job, &step.label, &key, seconds);
        Ok(Done {
            key,
            dir,
            cached: false,
            seconds,
            command,
            computed_by,
            waited: None,
        })
    }

    /// A finished step's record, read from its `stage.json`.
    fn reuse(&mut self, job: &str, step: &Step, dir: &Path, waited_since: Option<Instant>) -> Done {
        let info = model::io::read_json(&dir.join("stage.json")).unwrap_or(Value::Null);
        let command = info["command"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let waited = waited_since.map(|t| t.elapsed().as_secs_f64());
        let by: Option<Holder> = serde_json::from_value(info["computed_by"].clone()).ok();
        let by_text = by.as_ref().map(Holder::describe);
        self.reporter
            .stage_reused(job, &step.label, &step.key, by_text.as_deref(), waited);
        if let Some(s) = &self.reporter.stage {
            s.inc(1);
        }
        Done {
            key: step.key.clone(),
            dir: dir.to_path_buf(),
            cached: true,
            seconds: info["seconds"].as_f64().unwrap_or(0.0),
            command,
            computed_by: info["computed_by"].clone(),
            waited,
        }
    }

    /// Removes the temporary folder and private lease files of `key` left by
    /// killed runs on this host.
    fn remove_stale(&self, key: &str) -> Result<()> {
        let prefixes: Vec<String> = ["tmp", "lease.take", "lease.new", "lease.stale"]
            .iter()
            .map(|what| format!("{key}.{what}-{}-", self.host))
            .collect();
        remove_dead_leftovers(&self.stages_dir, &prefixes)
    }

    /// Runs the child; its stderr is logged to `tmp/log.txt` and reported.
    fn spawn(
        &mut self,
        job: &str,
        label: &str,
        args: &[String],
        tmp: &Path,
        stdout_file: Option<&str>,
    ) -> Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
        match stdout_file {
            Some(f) => {
                let file = std::fs::File::create(tmp.join(f))?;
                cmd.stdout(file)
            }
            None => cmd.stdout(Stdio::null()),
        };
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        let mut log = std::fs::File::create(tmp.join("log.txt"))?;
        let mut tail: Vec<String> = Vec::new();
        let stderr = child.stderr.take().expect("piped");
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            writeln!(log, "{line}")?;
            self.reporter.child_line(job, label, &line);
            tail.push(line);
            if tail.len() > 8 {
                tail.remove(0);
            }
        }
        let status = child.wait()?;
        if !status.success() {
            let last = tail
                .iter()
                .rev()
                .find(|l| l.starts_with("error"))
                .cloned()
                .unwrap_or_else(|| tail.join(" | "));
            bail!("{label} failed ({status}): {last}");
        }
        Ok(())
    }
}

/// Removes the entries of `dir` named `PREFIX` + PID whose process is gone.
fn remove_dead_leftovers(dir: &Path, prefixes: &[String]) -> Result<()> {
    model::io::remove_dead_writers_entries(dir, prefixes)
        .with_context(|| format!("cannot remove stale temporaries in {}", dir.display()))
}

/// Makes the child die when the runner dies (a killed run leaves no stage
/// running behind it).
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// fsync a folder so a rename in it survives a crash (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Copies a stage's output to the job's artifact path atomically; returns the
/// artifact's files with sha256.
fn export(src: &Path, dest: &Path) -> Result<Vec<Value>> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dest.with_file_name(name);
    if src.is_dir() {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for p in entries {
            let to = tmp.join(p.file_name().unwrap_or_default());
            copy_synced(&p, &to)?;
        }
        sync_dir(&tmp);
        if dest.exists() {
            std::fs::remove_dir_all(dest)
                .with_context(|| format!("cannot replace {}", dest.display()))?;
        }
    } else {
        copy_synced(src, &tmp)?;
    }
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent);
    }
    artifact_records(dest)
}

fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}

/// Every file of an artifact (file or folder) with size and sha256.
fn artifact_records(path: &Path) -> Result<Vec<Value>> {
    let files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .map(|f| file_record(f, &sha256_file(f)?))
        .collect()
}

/// Whether a finished job's artifacts are still what its manifest says.
fn artifacts_intact(m: &Value) -> bool {
    m["artifacts"].as_array().is_some_and(|files| {
        !files.is_empty()
            && files.iter().all(|f| {
                let p = Path::new(f["path"].as_str().unwrap_or(""));
                std::fs::metadata(p).is_ok_and(|md| Some(md.len()) == f["bytes"].as_u64())
                    && sha256_file(p).ok().as_deref() == f["sha256"].as_str()
            })
    })
}

/// `OUT/MODEL/VARIANT` (the artifact path without `.gguf`): the prefix of the
/// job's manifest, report and gate files.
fn job_prefix(out: &Path, job: &Job) -> PathBuf {
    out.join(job.artifact.strip_suffix(".gguf").unwrap_or(&job.artifact))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The numbers of an eval report a manifest keeps.
fn eval_summary(report: &Value) -> Value {
    json!({
        "ppl": report["perplexity"]["perplexity"], "ppl_stderr": report["perplexity"]["perplexity_stderr"],
        "base_ppl": report["base_perplexity"]["perplexity"], "ppl_increase": report["ppl_increase"],
        "kld": report["kld"]["mean"], "kld_p99": report["kld"]["p99"],
        "top1": report["top1_agreement"], "compression": report["compression_ratio"],
        "bits_per_weight": report["bits_per_weight"],
    })
}

/// `compress run`. Exit code 0 when every job finished and passed its gates, 1
/// when a gate failed, 2 when a job could not run.
pub fn run(a: RunArgs) -> Result<ExitCode> {
    let recipe = recipe::load(&a.recipe)?;
    let out = a.out.clone().unwrap_or_else(|| recipe.output.clone());
    recipe::check_outputs_for(&recipe, &out)?;
    let shard = a
        .shard
        .as_deref()
        .map(|s| Shard::parse(s, recipe.shard_count()))
        .transpose()?;
    let shard_label = shard.map(|s| format!("{}/{}", s.index, s.count));
    let all = recipe.jobs();
    let jobs: Vec<Job> = all
        .iter()
        .filter(|j| shard.is_none_or(|s| s.contains(j.index)))
        .cloned()
        .collect();
    if a.list {
        for j in &jobs {
            if a.json {
                println!(
                    "{}",
                    json!({"index": j.index + 1, "job": j.name, "artifact": out.join(&j.artifact)})
                );
            } else {
                println!(
                    "{:>3}  {}  {}",
                    j.index + 1,
                    j.name,
                    out.join(&j.artifact).display()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let lease_times = LeaseTimes::from_env()?;
    if a.plan {
        let mut runner = Runner {
            exe: PathBuf::new(),
            out: out.clone(),
            stages_dir: out.join(".stages"),
            host: host(),
            shard: None,
            lease_times,
            hashes: HashMap::new(),
            reporter: Reporter::new(Mode::Quiet, 0),
        };
        print_plan(&mut runner, &recipe, &all, a.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    check_shared_folder(&out)?;
    let mode = if a.json {
        Mode::Json
    } else if a.quiet {
        Mode::Quiet
    } else if std::io::stderr().is_terminal() {
        Mode::Bars
    } else {
        Mode::Lines
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let stages_dir = out.join(".stages");
    std::fs::create_dir_all(&stages_dir)?;
    claim_output(&out, &recipe)?;
    let mut runner = Runner {
        exe: std::env::current_exe().context("cannot find the compress binary")?,
        out: out.clone(),
        stages_dir,
        host: host(),
        shard: shard_label.clone(),
        lease_times,
        hashes: HashMap::new(),
        reporter: Reporter::new(mode, jobs.len()),
    };
    runner
        .reporter
        .event(json!({"event": "run", "recipe": a.recipe, "out": out,
        "jobs": jobs.len(), "of": all.len(), "shard": shard_label}));
    let shard_text = shard.map_or(String::new(), |s| {
        format!(" (shard {}/{})", s.index, s.count)
    });
    runner.reporter.line(&format!(
        "{}: {} of {} jobs{shard_text} into {}",
        recipe.name,
        jobs.len(),
        all.len(),
        out.display()
    ));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut skipped = 0;
    let started = Instant::now();
    for job in &jobs {
        let manifest_path = with_suffix(&job_prefix(&out, job), ".manifest.json");
        let outcome = run_job(&mut runner, &recipe, job, all.len(), &manifest_path);
        let manifest = match outcome {
            Ok((m, was_done)) => {
                if was_done {
                    skipped += 1;
                }
                m
            }
            Err(e) => {
                let mut m = model::io::read_json(&manifest_path).unwrap_or_else(|_| json!({}));
                m["status"] = json!("failed");
                m["error"] = json!(format!("{e:#}"));
                m["finished_unix"] = json!(now_unix());
                if let Some(parent) = manifest_path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = model::io::write_atomic(
                    &manifest_path,
                    serde_json::to_string_pretty(&m)?.as_bytes(),
                );
                if mode != Mode::Json {
                    runner
                        .reporter
                        .multi
                        .suspend(|| eprintln!("error: job {}: {e:#}", job.name));
                }
                m
            }
        };
        *counts
            .entry(manifest["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        runner.reporter.job_done(job, &manifest);
    }
    runner.reporter.finish();
    let failed = counts.get("failed").copied().unwrap_or(0);
    let gate_failed = counts.get("gate-failed").copied().unwrap_or(0);
    runner.reporter.event(
        json!({"event": "done", "counts": counts, "seconds": started.elapsed().as_secs_f64()}),
    );
    if skipped == jobs.len() && failed == 0 {
        runner.reporter.line(&format!(
            "nothing to do: all {} jobs{shard_text} had finished before ({})",
            jobs.len(),
            out.display()
        ));
    } else {
        let list: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        runner.reporter.line(&format!(
            "{} jobs: {} ({:.0}s); `compress status {}` shows them all",
            jobs.len(),
            list.join(", "),
            started.elapsed().as_secs_f64(),
            out.display()
        ));
    }
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else if gate_failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One step of a job (a stage, the imatrix it collects, or the evaluation),
/// planned before anything runs: its key names its folder, `.stages/KEY/`, so
/// the whole stage graph of a recipe is known up front (`compress run --plan`).
struct Step {
    label: String,
    /// `imatrix`, `eval` or the stage's kind.
    kind: &'static str,
    key: String,
    material: Value,
    /// The command's arguments, given the stage's temporary folder and the
    /// folder kept across kills.
    args: BuildArgs,
    /// The file under the stage folder the command's stdout goes to.
    stdout_file: Option<&'static str>,
}

/// Builds a step's command line from its temporary folder and its kept folder.
type BuildArgs = Box<dyn Fn(&Path, &Path) -> Vec<String>>;

/// Everything a job will do, with its inputs' records for the manifest.
struct JobPlan {
    inputs: Vec<Value>,
    steps: Vec<Step>,
    /// The last stage's output: the job's artifact.
    output: PathBuf,
    /// The evaluation step's index in `steps`.
    eval: Option<usize>,
}

/// The key of a step: a hash of what determines its output.
fn step_key(material: &Value) -> String {
    sha256_hex(
        json!({"tool": env!("CARGO_PKG_VERSION"), "stage": material})
            .to_string()
            .as_bytes(),
    )[..32]
        .to_owned()
}

impl Step {
    fn new(
        label: String,
        kind: &'static str,
        material: Value,
        args: BuildArgs,
        stdout_file: Option<&'static str>,
    ) -> Step {
        Step {
            label,
            kind,
            key: step_key(&material),
            material,
            args,
            stdout_file,
        }
    }
}

/// Plans a job: hashes its inputs and chains its steps' keys (each stage's key
/// covers the key of the stage before, so equal prefixes share folders).
fn plan_job(runner: &mut Runner, recipe: &Recipe, job: &Job) -> Result<JobPlan> {
    let variant = &recipe.variants[job.variant];
    let spec = &recipe.models[job.model];
    let model_path = crate::resolve(&spec.path)?;
    let (model_id, model_files) = runner.hash_input(&model_path)?;
    let mut inputs = vec![
        json!({"role": "model", "path": spec.path, "resolved": model_path, "sha256": model_id, "files": model_files}),
    ];
    let calib_used = variant.stages.iter().any(|s| {
        s.imatrix == ImatrixSource::Collect
            || s.args.iter().any(|x| x == "--calib" || x == "--text")
    });
    let calib = if calib_used {
        let p = crate::resolve(&recipe.calib.text)?;
        let (id, files) = runner.hash_input(&p)?;
        inputs.push(json!({"role": "calib", "path": recipe.calib.text, "resolved": p, "sha256": id, "files": files}));
        Some((p, id))
    } else {
        None
    };

    let mut steps: Vec<Step> = Vec::new();
    let mut cur_id = model_id.clone();
    let mut cur_path = model_path.clone();
    for (i, stage) in variant.stages.iter().enumerate() {
        let mut files = Vec::new();
        for f in &stage.file_args {
            let p = crate::resolve(f)?;
            files.push(runner.hash_input(&p)?.0);
        }
        let imatrix: Option<(PathBuf, String)> = match &stage.imatrix {
            ImatrixSource::None => None,
            ImatrixSource::File(f) => {
                let p = crate::resolve(f)?;
                let id = runner.hash_input(&p)?.0;
                Some((p, id))
            }
            ImatrixSource::Collect => {
                let (text, text_id) = calib.clone().context("calibration text")?;
                let (samples, seq) = (
                    recipe.calib.samples.to_string(),
                    recipe.calib.seq.to_string(),
                );
                let input = cur_path.clone();
                let step = Step::new(
                    format!("stage {}a imatrix", i + 1),
                    "imatrix",
                    json!({"kind": "imatrix", "input": cur_id, "text": text_id, "ctx": seq, "chunks": samples}),
                    Box::new(move |tmp, _| {
                        vec![
                            "imatrix".into(),
                            input.display().to_string(),
                            "--text".into(),
                            text.display().to_string(),
                            "--ctx".into(),
                            seq.clone(),
                            "--chunks".into(),
                            samples.clone(),
                            "-o".into(),
                            tmp.join("imatrix.gguf").display().to_string(),
                        ]
                    }),
                    None,
                );
                // The collected imatrix is named by its step's key: its bytes
                // follow from it, and the key is known before it is computed.
                let out = (
                    runner.stages_dir.join(&step.key).join("imatrix.gguf"),
                    step.key.clone(),
                );
                steps.push(step);
                Some(out)
            }
        };
        let input = cur_path.clone();
        let (kind, teacher) = (stage.kind, model_path.clone());
        let (args, writes) = (stage.args.clone(), stage.writes.file_name());
        let imatrix_path = imatrix.as_ref().map(|(p, _)| p.clone());
        let step = Step::new(
            format!("stage {} {}", i + 1, stage.kind.name()),
            stage.kind.name(),
            json!({"kind": stage.kind.name(), "input": cur_id, "args": stage.args, "files": files,
                "imatrix": imatrix.as_ref().map(|(_, id)| id),
                "teacher": (stage.kind == StageKind::Distill).then_some(&model_id)}),
            Box::new(move |tmp, keep| {
                let mut a = vec![kind.name().to_owned()];
                if kind == StageKind::Distill {
                    a.extend([
                        "--teacher".into(),
                        teacher.display().to_string(),
                        "--student".into(),
                        input.display().to_string(),
                        "--checkpoint-dir".into(),
                        keep.display().to_string(),
                    ]);
                } else {
                    a.push(input.display().to_string());
                }
                a.extend(args.iter().cloned());
                if let Some(p) = &imatrix_path {
                    a.extend(["--imatrix".into(), p.display().to_string()]);
                }
                a.extend([
                    "-o".into(),
                    tmp.join(writes).display().to_string(),
                    "--report".into(),
                    tmp.join("report.json").display().to_string(),
                ]);
                a
            }),
            None,
        );
        cur_id = step.key.clone();
        cur_path = runner
            .stages_dir
            .join(&step.key)
            .join(stage.writes.file_name());
        steps.push(step);
    }

    let mut eval = None;
    if let Some(e) = &recipe.eval {
        let text = crate::resolve(&e.text)?;
        let (text_id, text_files) = runner.hash_input(&text)?;
        let base = match &e.base {
            Some(b) => crate::resolve(b)?,
            None => model_path.clone(),
        };
        let (base_id, base_files) = runner.hash_input(&base)?;
        inputs.extend([
            json!({"role": "eval text", "path": e.text, "resolved": text, "sha256": text_id, "files": text_files}),
            json!({"role": "eval base", "path": e.base.as_deref().unwrap_or(&spec.path), "resolved": base, "sha256": base_id, "files": base_files}),
        ]);
        let (ctx, chunks) = (e.ctx.to_string(), e.chunks.map(|c| c.to_string()));
        let artifact = cur_path.clone();
        eval = Some(steps.len());
        steps.push(Step::new(
            "eval".to_owned(),
            "eval",
            json!({"kind": "eval", "input": cur_id, "base": base_id, "text": text_id, "ctx": ctx, "chunks": chunks}),
            Box::new(move |_, _| {
                let mut a = vec![
                    "eval".to_owned(),
                    artifact.display().to_string(),
                    "--base".into(),
                    base.display().to_string(),
                    "--text".into(),
                    text.display().to_string(),
                    "--ctx".into(),
                    ctx.clone(),
                    "--json".into(),
                ];
                if let Some(c) = &chunks {
                    a.extend(["--chunks".into(), c.clone()]);
                }
                a
            }),
            Some("eval.json"),
        ));
    }
    Ok(JobPlan {
        inputs,
        steps,
        output: cur_path,
        eval,
    })
}

/// Runs one job; `true` with the manifest when it had finished before.
fn run_job(
    runner: &mut Runner,
    recipe: &Recipe,
    job: &Job,
    n_jobs: usize,
    manifest_path: &Path,
) -> Result<(Value, bool)> {
    let variant = &recipe.variants[job.variant];
    let spec = &recipe.models[job.model];
    let plan = plan_job(runner, recipe, job)?;
    runner.reporter.job_start(job, n_jobs, plan.steps.len());

    let prefix = job_prefix(&runner.out, job);
    let artifact_path = runner.out.join(&job.artifact);
    let mut manifest = json!({
        "manifest_version": 1,
        "tool": {"name": "compress", "version": env!("CARGO_PKG_VERSION")},
        "recipe": {"path": recipe.path, "name": recipe.name, "sha256": sha256_hex(recipe.text.as_bytes()), "seed": recipe.seed, "text": recipe.text},
        "shard": runner.shard,
        "job": {"index": job.index + 1, "of": n_jobs, "name": job.name, "model": spec.name, "variant": variant.name},
        "status": "running",
        "error": null,
        "started_unix": now_unix(),
        "inputs": plan.inputs,
        "stages": [],
        "artifacts": [],
    });
    let previous = model::io::read_json(manifest_path).ok();

    let mut stage_records = Vec::new();
    let mut step_keys = Vec::new();
    let mut ran_any = false;
    let mut eval_dir = None;
    for (i, step) in plan.steps.iter().enumerate() {
        let d = runner.step(&job.name, step)?;
        record(&mut manifest, &step.label, &d, &mut stage_records);
        step_keys.push(d.key.clone());
        if plan.eval == Some(i) {
            eval_dir = Some(d.dir);
        } else if !d.cached {
            // A finished job's manifest stays as it is until the job proves changed.
            ran_any = true;
            write_manifest(manifest_path, &manifest)?;
        }
    }
    let cur_path = plan.output;

    let job_key = sha256_hex(
        json!({"steps": step_keys, "artifact": job.artifact,
            "gate": recipe.gate.as_ref().map(gate_json)})
        .to_string()
        .as_bytes(),
    );
    manifest["job"]["key"] = json!(job_key);
    if let Some(prev) = previous.filter(|p| {
        p["job"]["key"] == json!(job_key)
            && matches!(
                p["status"].as_str(),
                Some("done" | "passed" | "gate-failed")
            )
            && artifacts_intact(p)
    }) {
        runner
            .reporter
            .line(&format!("  {}: finished before, nothing to do", job.name));
        if ran_any {
            write_manifest(manifest_path, &prev)?;
        }
        return Ok((prev, true));
    }

    // The artifact, then the report and gates beside it.
    let artifacts = export(&cur_path, &artifact_path)?;
    manifest["artifacts"] = json!(artifacts);
    manifest["status"] = json!("done");
    if let Some(dir) = eval_dir {
        let mut report = model::io::read_json(&dir.join("eval.json"))?;
        report["model"] = json!(artifact_path);
        let report_path = with_suffix(&prefix, ".eval.json");
        model::io::write_atomic(
            &report_path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        let mut summary = eval_summary(&report);
        summary["report"] = json!(report_path);
        manifest["eval"] = summary;
        if let Some(t) = &recipe.gate {
            let outcomes = eval::gate::check(&report, t)
                .with_context(|| format!("gating {}", report_path.display()))?;
            let junit = with_suffix(&prefix, ".junit.xml");
            let md = with_suffix(&prefix, ".gate.md");
            model::io::write_atomic(&junit, eval::gate::junit_xml(&outcomes).as_bytes())?;
            model::io::write_atomic(&md, eval::gate::markdown(&outcomes).as_bytes())?;
            let passed = outcomes.iter().all(|o| o.pass);
            manifest["gate"] =
                json!({"passed": passed, "checks": outcomes, "junit": junit, "markdown": md});
            manifest["status"] = json!(if passed { "passed" } else { "gate-failed" });
        }
    }
    manifest["finished_unix"] = json!(now_unix());
    write_manifest(manifest_path, &manifest)?;
    Ok((manifest, false))
}

/// Adds a finished step to the manifest's stage list.
fn record(manifest: &mut Value, label: &str, d: &Done, records: &mut Vec<Value>) {
    records.push(json!({"stage": label, "key": d.key, "command": d.command,
        "cached": d.cached, "seconds": d.seconds, "folder": d.dir,
        "computed_by": d.computed_by, "waited_s": d.waited}));
    manifest["stages"] = json!(records.clone());
}

fn write_manifest(path: &Path, m: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    model::io::write_atomic(path, serde_json::to_string_pretty(m)?.as_bytes())
}

/// Every `*.manifest.json` under `dir` (not in `.stages`).
fn find_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if p.is_dir() && name != ".stages" {
            find_manifests(&p, out)?;
        } else if name.ends_with(".manifest.json") {
            out.push(p);
        }
    }
    Ok(())
}

/// `compress status`: the manifests of every shard merged into one table. Exit
/// code 0 when every job finished and passed, 1 otherwise.
pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let mut paths = Vec::new();
    find_manifests(&a.dir, &mut paths)?;
    let mut jobs: BTreeMap<(String, u64, String), Value> = BTreeMap::new();
    for p in &paths {
        let m = model::io::read_json(p)?;
        let key = (
            m["recipe"]["name"].as_str().unwrap_or("").to_owned(),
            m["job"]["index"].as_u64().unwrap_or(0),
            m["job"]["name"].as_str().unwrap_or("").to_owned(),
        );
        jobs.insert(key, m);
    }
    let mut missing = Vec::new();
    if let Some(r) = &a.recipe {
        let recipe = recipe::load(r)?;
        for j in recipe.jobs() {
            if !jobs
                .keys()
                .any(|(rn, _, n)| *rn == recipe.name && *n == j.name)
            {
                missing.push(j.name);
            }
        }
    }
    let all_ok = missing.is_empty()
        && !jobs.is_empty()
        && jobs
            .values()
            .all(|m| matches!(m["status"].as_str(), Some("done" | "passed")));
    if a.json {
        let list: Vec<&Value> = jobs.values().collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"jobs": list, "missing": missing, "ok": all_ok}))?
        );
    } else {
        if jobs.is_empty() {
            println!("no job manifests under {}", a.dir.display());
        }
        println!(
            "{:<4} {:<28} {:<12} {:>9} {:>9} {:>8} {:>7} {:>7}  shard",
            "job", "name", "status", "MB", "PPL", "KLD", "top-1", "ratio"
        );
        for ((_, index, name), m) in &jobs {
            let bytes: u64 = m["artifacts"]
                .as_array()
                .map_or(0, |a| a.iter().filter_map(|f| f["bytes"].as_u64()).sum());
            let e = &m["eval"];
            let num = |v: &Value, f: &dyn Fn(f64) -> String| v.as_f64().map_or("-".into(), f);
            println!(
                "{:<4} {:<28} {:<12} {:>9.1} {:>9} {:>8} {:>7} {:>7}  {}",
                index,
                name,
                m["status"].as_str().unwrap_or("?"),
                bytes as f64 / 1e6,
                num(&e["ppl"], &|x| format!("{x:.3}")),
                num(&e["kld"], &|x| format!("{x:.4}")),
                num(&e["top1"], &|x| format!("{:.1}%", 100.0 * x)),
                num(&e["compression"], &|x| format!("{x:.2}x")),
                m["shard"].as_str().unwrap_or("-"),
            );
            if let Some(err) = m["error"].as_str() {
                println!("     error: {err}");
            }
        }
        for name in &missing {
            println!("{:<4} {:<28} {:<12}", "-", name, "not run");
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for m in jobs.values() {
            *counts
                .entry(m["status"].as_str().unwrap_or("?"))
                .or_default() += 1;
        }
        let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        if !missing.is_empty() {
            parts.push(format!("{} not run", missing.len()));
        }
        println!("{} manifests: {}", paths.len(), parts.join(", "));
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `compress run --plan`: every stage of every job, the jobs that share it, and
/// which shard computes it. Jobs are dealt round-robin, so job J is the
/// (J / N)-th of shard J mod N; a stage is computed by the shard that reaches
/// it first (the one whose first job using it comes earliest in its list) and
/// the others wait for it.
fn print_plan(runner: &mut Runner, recipe: &Recipe, jobs: &[Job], as_json: bool) -> Result<()> {
    struct Node {
        kind: &'static str,
        /// (job index, shard, position in the shard's list).
        users: Vec<(usize, usize, usize)>,
        done: bool,
    }
    let n = recipe.shard_count();
    let mut order: Vec<String> = Vec::new();
    let mut nodes: HashMap<String, Node> = HashMap::new();
    let mut job_rows = Vec::new();
    for job in jobs {
        let plan = plan_job(runner, recipe, job)?;
        let (shard, position) = (job.index % n + 1, job.index / n);
        for step in &plan.steps {
            let node = nodes.entry(step.key.clone()).or_insert_with(|| {
                order.push(step.key.clone());
                Node {
                    kind: step.kind,
                    users: Vec::new(),
                    done: runner.stages_dir.join(&step.key).is_dir(),
                }
            });
            node.users.push((job.index, shard, position));
        }
        let keys: Vec<&str> = plan.steps.iter().map(|s| s.key.as_str()).collect();
        let kinds: Vec<&str> = plan.steps.iter().map(|s| s.kind).collect();
        job_rows.push(
            json!({"index": job.index + 1, "job": job.name, "shard": shard,
            "steps": keys, "kinds": kinds}),
        );
    }
    let mut stages = Vec::new();
    for key in &order {
        let node = &nodes[key];
        let first = node.users.iter().map(|u| (u.2, u.1)).min().expect("a user");
        let mut shards: Vec<usize> = node.users.iter().map(|u| u.1).collect();
        shards.sort();
        shards.dedup();
        let racing: Vec<usize> = shards
            .iter()
            .copied()
            .filter(|&s| node.users.iter().any(|u| u.1 == s && u.2 == first.0))
            .collect();
        let waits: Vec<usize> = shards.iter().copied().filter(|&s| s != first.1).collect();
        let job_numbers: Vec<usize> = node.users.iter().map(|u| u.0 + 1).collect();
        stages.push(
            json!({"key": key, "kind": node.kind, "jobs": job_numbers, "shards": shards,
            "computed_by": first.1, "races": racing, "waits": waits, "done": node.done}),
        );
    }
    let shared = stages
        .iter()
        .filter(|s| s["jobs"].as_array().is_some_and(|j| j.len() > 1))
        .count();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"recipe": recipe.name, "shards": n, "jobs": job_rows, "stages": stages})
            )?
        );
        return Ok(());
    }
    println!(
        "{}: {} jobs in {n} shard{} (--shard 1 … --shard {n}; sbatch --array=0-{}), {} stages, {shared} shared by several jobs",
        recipe.name,
        jobs.len(),
        plural(n),
        n - 1,
        stages.len(),
    );
    println!(
        "\n  {:<12}  {:<9} {:<5} {:<18} computed by",
        "stage", "kind", "state", "jobs"
    );
    let list = |v: &Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    for s in &stages {
        let who = if s["races"].as_array().is_some_and(|r| r.len() > 1) {
            format!(
                "shards {} race for it (the first takes the lease, the others wait)",
                list(&s["races"])
            )
        } else if s["waits"].as_array().is_some_and(|w| !w.is_empty()) {
            format!(
                "shard {}; shard{} {} wait{} for it",
                s["computed_by"],
                if s["waits"].as_array().is_some_and(|w| w.len() > 1) {
                    "s"
                } else {
                    ""
                },
                list(&s["waits"]),
                if s["waits"].as_array().is_some_and(|w| w.len() > 1) {
                    ""
                } else {
                    "s"
                },
            )
        } else {
            format!("shard {}", s["computed_by"])
        };
        println!(
            "  {:<12}  {:<9} {:<5} {:<18} {who}",
            &s["key"].as_str().unwrap_or("")[..12],
            s["kind"].as_str().unwrap_or(""),
            if s["done"] == json!(true) { "done" } else { "" },
            list(&s["jobs"]),
        );
    }
    println!();
    for j in &job_rows {
        let chain: Vec<String> = j["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(j["kinds"].as_array().into_iter().flatten())
            .map(|(k, kind)| {
                format!(
                    "{} {}",
                    kind.as_str().unwrap_or(""),
                    &k.as_str().unwrap_or("")[..12]
                )
            })
            .collect();
        println!(
            "  job {:>2} {} (shard {}): {}",
            j["index"],
            j["job"].as_str().unwrap_or(""),
            j["shard"],
            chain.join(" -> ")
        );
    }
    Ok(())
}

/// File systems whose rename is a copy and a delete (object stores mounted by
/// FUSE): a stage folder could be seen half-copied by another shard.
const NON_ATOMIC_RENAME: [&str; 7] = [
    "fuse.s3fs",
    "fuse.goofys",
    "fuse.gcsfuse",
    "fuse.mountpoint-s3",
    "fuse.blobfuse",
    "fuse.blobfuse2",
    "fuse.rclone",
];

/// The file system type of the mount holding `path`, from a mountinfo text
/// (`/proc/self/mountinfo`): the longest mount point that contains it.
fn mount_type(mountinfo: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(mount_point), Some(dash)) =
            (fields.get(4), fields.iter().position(|f| *f == "-"))
        else {
            continue;
        };
        let Some(fs) = fields.get(dash + 1) else {
            continue;
        };
        // mountinfo escapes spaces and the like as octal.
        let mount_point = mount_point.replace("\\040", " ");
        if path.starts_with(&mount_point) && best.as_ref().is_none_or(|b| mount_point.len() >= b.0)
        {
            best = Some((mount_point.len(), (*fs).to_owned()));
        }
    }
    best.map(|b| b.1)
}

/// Refuses an output folder on a file system where rename is not atomic (the
/// stage folders and leases rely on it).
fn check_shared_folder(out: &Path) -> Result<()> {
    let mut existing = absolute_path(out);
    while !existing.exists() {
        if !existing.pop() {
            return Ok(());
        }
    }
    let (Ok(real), Ok(info)) = (
        existing.canonicalize(),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Ok(());
    };
    match mount_type(&info, &real) {
        Some(fs) if NON_ATOMIC_RENAME.contains(&fs.as_str()) => bail!(
            "{} is on a {fs} file system, whose rename is a copy and a delete: shards could see half-written stages. \
             Put the output folder on a POSIX or NFS file system (--out)",
            out.display()
        ),
        _ => Ok(()),
    }
}

fn absolute_path(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Records which recipe an output folder belongs to (`OUT/.recipe.json`) and
/// refuses a second, different recipe writing into it: their manifests and
/// `compress status` would mix. The same recipe, edited, may go on (its changed
/// jobs rerun).
fn claim_output(out: &Path, recipe: &Recipe) -> Result<()> {
    let path = out.join(".recipe.json");
    remove_dead_leftovers(out, &[format!(".recipe.json.tmp-{}-", host())])?;
    let mine = json!({"name": recipe.name, "path": absolute_path(&recipe.path),
        "sha256": sha256_hex(recipe.text.as_bytes())});
    let tmp = out.join(format!(
        ".recipe.json.tmp-{}-{}",
        host(),
        std::process::id()
    ));
    std::fs::write(&tmp, serde_json::to_string_pretty(&mine)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    // Created atomically: of shards starting together, one writes it.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        // No hard links on this file system: the rename of the same content.
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            return Ok(());
        }
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    let theirs = model::io::read_json(&path).unwrap_or(Value::Null);
    if theirs["name"] != mine["name"] {
        bail!(
            "{} holds the outputs of recipe '{}' ({}), not of '{}' ({}): give each recipe its own output folder (--out DIR)",
            out.display(),
            theirs["name"].as_str().unwrap_or("?"),
            theirs["path"].as_str().unwrap_or("?"),
            recipe.name,
            recipe.path.display()
        );
    }
    if theirs["sha256"] != mine["sha256"] {
        model::io::write_atomic(&path, serde_json::to_string_pretty(&mine)?.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_is_found_and_object_store_mounts_are_refused() {
        let info = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:40 / /mnt/bucket rw,nosuid - fuse.s3fs s3fs rw,user_id=0
41 22 0:41 / /mnt/nfs\\040share rw - nfs4 server:/export rw,vers=4.2
";
        assert_eq!(
            mount_type(info, Path::new("/work/out")).as_deref(),
            Some("ext4")
        );
        assert_eq!(
            mount_type(info, Path::new("/mnt/bucket/out")).as_deref(),
            Some("fuse.s3fs")
        );
        assert_eq!(
            mount_type(info, Path::new("/mnt/nfs share/out")).as_deref(),
            Some("nfs4")
        );
        // A sibling whose name only starts like a mount point is not inside it.
        assert_eq!(
            mount_type(info, Path::new("/mnt/bucket2")).as_deref(),
            Some("ext4")
        );
        assert!(NON_ATOMIC_RENAME.contains(&"fuse.s3fs"));
        assert!(check_shared_folder(Path::new("/tmp")).is_ok());
    }

    #[test]
    fn progress_lines_are_recognised() {
        assert_eq!(
            parse_progress("quantize 12/211 blk.3.ffn_up (4.2s)"),
            Some(("quantize", 12, 211, "blk.3.ffn_up (4.2s)"))
        );
        assert_eq!(
            parse_progress("channel statistics 5/30  (0.5s)"),
            Some(("channel statistics", 5, 30, "(0.5s)"))
        );
        assert_eq!(parse_progress("wrote out.gguf (5 MB)"), None);
        assert_eq!(parse_progress("note: 1/2"), None);
        assert_eq!(parse_progress("1/2 x"), None);
    }

    #[test]
    fn exported_folders_and_files_are_recorded_with_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.json"), b"{}").unwrap();
        std::fs::write(src.join("b.bin"), b"xyz").unwrap();
        let dest = dir.path().join("out/m/v");
        let recs = export(&src, &dest).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[1]["sha256"],
            "3608bca1e44ea6c4d268eb6db02260269892c0b42b86bbf1e77a6fa16c3c9282"
        );
        // Exporting again replaces the folder.
        assert_eq!(export(&src, &dest).unwrap().len(), 2);
        let m = json!({"artifacts": recs});
        assert!(artifacts_intact(&m));
        std::fs::write(dest.join("b.bin"), b"xyZ").unwrap();
        assert!(!artifacts_intact(&m));
    }
}
