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
use crate::recipe::{self, ImatrixSource, Job, Recipe, Shard, StageKind};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Arguments of `compress run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Output folder (overrides the recipe's `output`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the I-th of N disjoint slices of the job list (1-based; jobs are dealt
    /// round-robin), e.g. `--shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT`.
    #[arg(long)]
    shard: Option<String>,
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

    fn stage_start(&mut self, job: &str, label: &str, key: &str, cached: bool) {
        self.event(
            json!({"event": if cached { "stage_cached" } else { "stage_start" },
            "job": job, "stage": label, "key": key}),
        );
        if cached {
            self.line(&format!("  {label}: done before ({key}), reused"));
        } else {
            self.line(&format!("  {label}: running ({key})"));
        }
        if let Some(s) = &self.stage {
            s.set_message(label.to_owned());
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

    fn stage_done(&mut self, job: &str, label: &str, seconds: f64) {
        self.event(json!({"event": "stage_done", "job": job, "stage": label, "seconds": seconds}));
        self.line(&format!("  {label}: finished in {seconds:.1}s"));
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

    /// Runs `compress ARGS` as a stage unless its output exists: `build` gets the
    /// stage's temporary folder and returns the arguments.
    fn step(
        &mut self,
        job: &str,
        label: &str,
        key_material: Value,
        build: impl FnOnce(&Path, &Path) -> Vec<String>,
        stdout_file: Option<&str>,
    ) -> Result<Done> {
        let key = sha256_hex(
            json!({"tool": env!("CARGO_PKG_VERSION"), "stage": key_material})
                .to_string()
                .as_bytes(),
        )[..32]
            .to_owned();
        let dir = self.stages_dir.join(&key);
        if dir.is_dir() {
            self.reporter.stage_start(job, label, &key, true);
            let info = model::io::read_json(&dir.join("stage.json")).unwrap_or(Value::Null);
            let command = info["command"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(s) = &self.reporter.stage {
                s.inc(1);
            }
            return Ok(Done {
                key,
                dir,
                cached: true,
                seconds: info["seconds"].as_f64().unwrap_or(0.0),
                command,
            });
        }
        self.reporter.stage_start(job, label, &key, false);
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
        let args = build(&tmp, &keep);
        let start = Instant::now();
        let result = self.spawn(job, label, &args, &tmp, stdout_file);
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
        command.extend(
            args.iter()
                .map(|a| a.replace(&tmp.display().to_string(), &dir.display().to_string())),
        );
        model::io::write_atomic(
            &tmp.join("stage.json"),
            serde_json::to_string_pretty(&json!({"key": key, "command": command, "seconds": seconds, "material": key_material}))?.as_bytes(),
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
        self.reporter.stage_done(job, label, seconds);
        Ok(Done {
            key,
            dir,
            cached: false,
            seconds,
            command,
        })
    }

    /// Removes temporary folders of `key` left by killed runs on this host.
    fn remove_stale(&self, key: &str) -> Result<()> {
        let prefix = format!("{key}.tmp-{}-", self.host);
        for e in std::fs::read_dir(&self.stages_dir)? {
            let p = e?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if let Some(pid) = name
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<u32>().ok())
            {
                let alive =
                    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
                if !alive {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("cannot remove the stale {}", p.display()))?;
                }
            }
        }
        Ok(())
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
    let shard = a.shard.as_deref().map(Shard::parse).transpose()?;
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
    let mut runner = Runner {
        exe: std::env::current_exe().context("cannot find the compress binary")?,
        out: out.clone(),
        stages_dir,
        host: host(),
        hashes: HashMap::new(),
        reporter: Reporter::new(mode, jobs.len()),
    };
    runner
        .reporter
        .event(json!({"event": "run", "recipe": a.recipe, "out": out,
        "jobs": jobs.len(), "of": all.len(), "shard": a.shard}));
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
        let outcome = run_job(&mut runner, &recipe, job, all.len(), &a, &manifest_path);
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

/// Runs one job; `true` with the manifest when it had finished before.
fn run_job(
    runner: &mut Runner,
    recipe: &Recipe,
    job: &Job,
    n_jobs: usize,
    a: &RunArgs,
    manifest_path: &Path,
) -> Result<(Value, bool)> {
    let variant = &recipe.variants[job.variant];
    let spec = &recipe.models[job.model];
    let n_steps = variant.stages.len()
        + variant
            .stages
            .iter()
            .filter(|s| s.imatrix == ImatrixSource::Collect)
            .count()
        + usize::from(recipe.eval.is_some());
    runner.reporter.job_start(job, n_jobs, n_steps);
    let model_path = crate::resolve(&spec.path)?;
    let (model_id, model_files) = runner.hash_input(&model_path)?;
    let mut inputs = vec![
        json!({"role": "model", "path": spec.path, "resolved": model_path, "sha256": model_id, "files": model_files}),
    ];
    let calib_used = variant.stages.iter().any(|s| {
        s.imatrix == ImatrixSource::Collect
            || s.args.iter().any(|x| x == "--calib" || x == "--text")
    });
    let calib_path = if calib_used {
        let p = crate::resolve(&recipe.calib.text)?;
        let (id, files) = runner.hash_input(&p)?;
        inputs.push(json!({"role": "calib", "path": recipe.calib.text, "resolved": p, "sha256": id, "files": files}));
        Some((p, id))
    } else {
        None
    };

    let prefix = job_prefix(&runner.out, job);
    let artifact_path = runner.out.join(&job.artifact);
    let mut manifest = json!({
        "manifest_version": 1,
        "tool": {"name": "compress", "version": env!("CARGO_PKG_VERSION")},
        "recipe": {"path": recipe.path, "name": recipe.name, "sha256": sha256_hex(recipe.text.as_bytes()), "seed": recipe.seed, "text": recipe.text},
        "shard": a.shard,
        "job": {"index": job.index + 1, "of": n_jobs, "name": job.name, "model": spec.name, "variant": variant.name},
        "status": "running",
        "error": null,
        "started_unix": now_unix(),
        "inputs": inputs,
        "stages": [],
        "artifacts": [],
    });
    let previous = model::io::read_json(manifest_path).ok();

    // The stages, from the input model on.
    let mut cur_id = model_id.clone();
    let mut cur_path = model_path.clone();
    let mut stage_records = Vec::new();
    let mut step_keys = Vec::new();
    let mut ran_any = false;
    for (i, stage) in variant.stages.iter().enumerate() {
        let mut files = Vec::new();
        for f in &stage.file_args {
            let p = crate::resolve(f)?;
            files.push(runner.hash_input(&p)?.0);
        }
        let imatrix = match &stage.imatrix {
            ImatrixSource::None => None,
            ImatrixSource::File(f) => {
                let p = crate::resolve(f)?;
                Some(p)
            }
            ImatrixSource::Collect => {
                let (calib, calib_id) = calib_path.clone().context("calibration text")?;
                let label = format!("stage {}a imatrix", i + 1);
                let (samples, seq) = (
                    recipe.calib.samples.to_string(),
                    recipe.calib.seq.to_string(),
                );
                let input = cur_path.clone();
                let d = runner.step(
                    &job.name,
                    &label,
                    json!({"kind": "imatrix", "input": cur_id, "text": calib_id, "ctx": seq, "chunks": samples}),
                    |tmp, _| {
                        vec![
                            "imatrix".into(),
                            input.display().to_string(),
                            "--text".into(),
                            calib.display().to_string(),
                            "--ctx".into(),
                            seq.clone(),
                            "--chunks".into(),
                            samples.clone(),
                            "-o".into(),
                            tmp.join("imatrix.gguf").display().to_string(),
                        ]
                    },
                    None,
                )?;
                record(&mut manifest, &label, &d, &mut stage_records);
                step_keys.push(d.key.clone());
                Some(d.dir.join("imatrix.gguf"))
            }
        };
        let imatrix_id = match &imatrix {
            Some(p) => Some(runner.hash_input(p)?.0),
            None => None,
        };
        let label = format!("stage {} {}", i + 1, stage.kind.name());
        let input = cur_path.clone();
        let d = runner.step(
            &job.name,
            &label,
            json!({"kind": stage.kind.name(), "input": cur_id, "args": stage.args, "files": files,
                "imatrix": imatrix_id, "teacher": (stage.kind == StageKind::Distill).then_some(&model_id)}),
            |tmp, keep| {
                let mut args = vec![stage.kind.name().to_owned()];
                if stage.kind == StageKind::Distill {
                    args.extend([
                        "--teacher".into(),
                        model_path.display().to_string(),
                        "--student".into(),
                        input.display().to_string(),
                        "--checkpoint-dir".into(),
                        keep.display().to_string(),
                    ]);
                } else {
                    args.push(input.display().to_string());
                }
                args.extend(stage.args.iter().cloned());
                // The stage's own reading of a calibration file is resolved here
                // (asset:NAME is fine, the child resolves it the same way).
                if let Some(p) = &imatrix {
                    args.extend(["--imatrix".into(), p.display().to_string()]);
                }
                args.extend([
                    "-o".into(),
                    tmp.join(stage.writes.file_name()).display().to_string(),
                    "--report".into(),
                    tmp.join("report.json").display().to_string(),
                ]);
                args
            },
            None,
        )?;
        record(&mut manifest, &label, &d, &mut stage_records);
        step_keys.push(d.key.clone());
        cur_id = d.key.clone();
        cur_path = d.dir.join(stage.writes.file_name());
        // A finished job's manifest stays as it is until the job proves changed.
        if !d.cached {
            ran_any = true;
            write_manifest(manifest_path, &manifest)?;
        }
    }

    // Evaluation, cached like a stage.
    let eval_step = match &recipe.eval {
        None => None,
        Some(e) => {
            let text = crate::resolve(&e.text)?;
            let (text_id, text_files) = runner.hash_input(&text)?;
            let base = match &e.base {
                Some(b) => crate::resolve(b)?,
                None => model_path.clone(),
            };
            let (base_id, base_files) = runner.hash_input(&base)?;
            manifest["inputs"]
                .as_array_mut()
                .expect("array")
                .extend([
                    json!({"role": "eval text", "path": e.text, "resolved": text, "sha256": text_id, "files": text_files}),
                    json!({"role": "eval base", "path": e.base.as_deref().unwrap_or(&spec.path), "resolved": base, "sha256": base_id, "files": base_files}),
                ]);
            let label = "eval".to_owned();
            let (ctx, chunks) = (e.ctx.to_string(), e.chunks.map(|c| c.to_string()));
            let artifact = cur_path.clone();
            let d = runner.step(
                &job.name,
                &label,
                json!({"kind": "eval", "input": cur_id, "base": base_id, "text": text_id, "ctx": ctx, "chunks": chunks}),
                |_, _| {
                    let mut args = vec![
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
                        args.extend(["--chunks".into(), c.clone()]);
                    }
                    args
                },
                Some("eval.json"),
            )?;
            record(&mut manifest, &label, &d, &mut stage_records);
            step_keys.push(d.key.clone());
            Some(d)
        }
    };

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
    if let Some(d) = eval_step {
        let mut report = model::io::read_json(&d.dir.join("eval.json"))?;
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
        "cached": d.cached, "seconds": d.seconds, "folder": d.dir}));
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

#[cfg(test)]
mod tests {
    use super::*;

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
