//! Recipes: one TOML file that describes a batch of compression jobs (models ×
//! variants, each variant an ordered list of stages), how each result is
//! evaluated and the gates it must pass. This module reads and validates a
//! recipe, reporting every problem at once with its line, and expands it into
//! the job list that `run` executes; nothing here does any work on a model.
//!
//! Stage parameters are the flags of the stage's own command (`prune`,
//! `quantize`): a key is a flag's long name (`-` or `_`), so the recipe and the
//! command line cannot drift apart; each stage's arguments are checked by the
//! command's own parser during validation.

use crate::assets::Asset;
use anyhow::{Context, Result};
use clap::{ArgAction, Parser};
use eval::gate::Thresholds;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A value of the recipe with the line it was written on.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based line of the value (or of its table header).
    pub line: usize,
    /// The value.
    pub value: NodeValue,
}

/// The TOML data model, with lines kept on every value and key.
#[derive(Debug, Clone)]
pub enum NodeValue {
    /// A table (header, dotted or inline): key, key line, value, in file order.
    Table(Vec<(String, usize, Node)>),
    /// An array (of values or of tables).
    Array(Vec<Node>),
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A date or time (no recipe key takes one).
    Datetime,
}

impl NodeValue {
    fn type_name(&self) -> &'static str {
        match self {
            NodeValue::Table(_) => "a table",
            NodeValue::Array(_) => "an array",
            NodeValue::Str(_) => "a string",
            NodeValue::Int(_) => "an integer",
            NodeValue::Float(_) => "a float",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Datetime => "a date",
        }
    }
}

/// Byte offset to 1-based line.
fn line_of(text: &str, offset: Option<std::ops::Range<usize>>) -> usize {
    offset.map_or(0, |r| {
        text.as_bytes()[..r.start.min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    })
}

fn node_of_value(text: &str, v: &toml_edit::Value) -> Node {
    let line = line_of(text, v.span());
    let value = match v {
        toml_edit::Value::String(s) => NodeValue::Str(s.value().clone()),
        toml_edit::Value::Integer(i) => NodeValue::Int(*i.value()),
        toml_edit::Value::Float(f) => NodeValue::Float(*f.value()),
        toml_edit::Value::Boolean(b) => NodeValue::Bool(*b.value()),
        toml_edit::Value::Datetime(_) => NodeValue::Datetime,
        toml_edit::Value::Array(a) => {
            NodeValue::Array(a.iter().map(|v| node_of_value(text, v)).collect())
        }
        toml_edit::Value::InlineTable(t) => NodeValue::Table(
            t.iter()
                .map(|(k, v)| {
                    let key_line = line_of(text, t.key(k).and_then(|k| k.span()));
                    (k.to_owned(), key_line, node_of_value(text, v))
                })
                .collect(),
        ),
    };
    Node { line, value }
}

fn node_of_table(text: &str, t: &toml_edit::Table) -> Node {
    Node {
        line: line_of(text, t.span()),
        value: NodeValue::Table(
            t.iter()
                .map(|(k, item)| {
                    let key_line = line_of(text, t.key(k).and_then(|k| k.span()));
                    (k.to_owned(), key_line, node_of_item(text, item, key_line))
                })
                .collect(),
        ),
    }
}

fn node_of_item(text: &str, item: &toml_edit::Item, key_line: usize) -> Node {
    match item {
        toml_edit::Item::Value(v) => node_of_value(text, v),
        toml_edit::Item::Table(t) => node_of_table(text, t),
        toml_edit::Item::ArrayOfTables(a) => Node {
            line: key_line,
            value: NodeValue::Array(a.iter().map(|t| node_of_table(text, t)).collect()),
        },
        toml_edit::Item::None => Node {
            line: key_line,
            value: NodeValue::Table(Vec::new()),
        },
    }
}

/// One problem found in a recipe.
#[derive(Debug, Clone)]
pub struct Problem {
    /// 1-based line (0: the whole file).
    pub line: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Every problem of a recipe, reported together.
#[derive(Debug)]
pub struct Problems {
    /// The recipe file.
    pub file: String,
    /// The problems, in file order.
    pub list: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let n = self.list.len();
        writeln!(
            f,
            "{}: {n} problem{} in the recipe:",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line > 0 {
                write!(f, "  {}:{}: {}", self.file, p.line, p.message)?;
            } else {
                write!(f, "  {}: {}", self.file, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The closest of `valid` to `key`, when one is close enough to be a typo.
pub fn closest<'a>(key: &str, valid: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    valid
        .into_iter()
        .map(|v| (strsim::damerau_levenshtein(key, v), v))
        .filter(|&(d, v)| d <= 2.max(v.len() / 3))
        .min_by_key(|&(d, _)| d)
        .map(|(_, v)| v)
}

fn unknown_key(key: &str, place: &str, valid: &[&str]) -> String {
    match closest(key, valid.iter().copied()) {
        Some(s) => format!("unknown key '{key}' in {place}; did you mean '{s}'?"),
        None => format!(
            "unknown key '{key}' in {place}; valid keys: {}",
            valid.join(", ")
        ),
    }
}

/// The stages a recipe can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// `compress prune`.
    Prune,
    /// `compress quantize`.
    Quantize,
    /// `compress distill` (the job's input model is the teacher).
    Distill,
}

impl StageKind {
    /// The subcommand.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Prune => "prune",
            StageKind::Quantize => "quantize",
            StageKind::Distill => "distill",
        }
    }

    fn command(self) -> clap::Command {
        use clap::Args;
        match self {
            StageKind::Prune => crate::prune::Args::augment_args(clap::Command::new("prune")),
            StageKind::Quantize => {
                crate::quantize::Args::augment_args(clap::Command::new("quantize"))
            }
            StageKind::Distill => crate::distill::Args::augment_args(clap::Command::new("distill")),
        }
    }
}

/// Stage kinds a recipe may use.
const STAGE_KINDS: [&str; 3] = ["prune", "distill", "quantize"];
/// Flags the runner sets itself (or that are not parameters). A recipe's
/// artifacts are single files or folders the runner evaluates, so the split
/// flags and a dry run (which writes nothing) are not stage keys.
const RUNNER_FLAGS: [&str; 11] = [
    "input",
    "output",
    "report",
    "help",
    "imatrix",
    "teacher",
    "student",
    "checkpoint_dir",
    "dry_run",
    "split_max_size",
    "keep_split",
];
/// Stage keys the runner reads itself.
const RUNNER_STAGE_KEYS: [&str; 3] = ["kind", "write", "imatrix"];

/// What a stage (or a job) produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A single GGUF file.
    Gguf,
    /// An HF-style folder (safetensors, config.json, tokenizer files).
    Folder,
}

impl ArtifactKind {
    /// File or folder name inside a stage's folder.
    pub fn file_name(self) -> &'static str {
        match self {
            ArtifactKind::Gguf => "model.gguf",
            ArtifactKind::Folder => "model",
        }
    }
}

/// How a quantize stage gets its importance matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImatrixSource {
    /// None.
    None,
    /// Collected from the stage's input on the recipe's calibration text (shared by
    /// every stage with the same input).
    Collect,
    /// A file.
    File(String),
}

/// One stage of a variant, ready to run.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The subcommand.
    pub kind: StageKind,
    /// Flags after the input (the runner adds `-o` and `--report`).
    pub args: Vec<String>,
    /// Flags whose values are files (hashed into the stage's cache key).
    pub file_args: Vec<String>,
    /// The importance matrix.
    pub imatrix: ImatrixSource,
    /// What it writes.
    pub writes: ArtifactKind,
    /// Line of the stage in the recipe.
    pub line: usize,
    /// Whether the output is quantized (nothing can follow it).
    pub quantized: bool,
}

/// A named chain of stages applied to every model.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Name (part of the artifact's path).
    pub name: String,
    /// Stages, in order.
    pub stages: Vec<Stage>,
    /// Artifact path relative to the output folder, `{model}` standing for the
    /// model's name (default `MODEL/VARIANT.gguf` or `MODEL/VARIANT/`).
    pub path: Option<String>,
    /// Line of `path` (or of the variant) in the recipe.
    pub line: usize,
}

/// An input model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name (part of the artifact's path).
    pub name: String,
    /// Path as written (`asset:NAME` allowed).
    pub path: String,
}

/// Calibration defaults for the stages that read calibration text.
#[derive(Debug, Clone)]
pub struct Calib {
    /// Text (path or `asset:NAME`).
    pub text: String,
    /// Samples (imatrix: chunks).
    pub samples: usize,
    /// Tokens per sample.
    pub seq: usize,
}

/// How each job's artifact is evaluated.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Evaluation text.
    pub text: String,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks (None: all).
    pub chunks: Option<usize>,
    /// The base to compare with (None: the job's input model).
    pub base: Option<String>,
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its text (recorded in every manifest).
    pub text: String,
    /// Name.
    pub name: String,
    /// Output folder (before `--out`).
    pub output: PathBuf,
    /// Seed given to every stage that takes one.
    pub seed: u64,
    /// Number of shards `compress run --shard I` divides the jobs into (`shards`;
    /// None: one job per shard).
    pub shards: Option<usize>,
    /// Input models.
    pub models: Vec<ModelSpec>,
    /// Calibration defaults.
    pub calib: Calib,
    /// Evaluation (None: jobs are not evaluated).
    pub eval: Option<EvalSpec>,
    /// Gates (None: none).
    pub gate: Option<Thresholds>,
    /// Variants.
    pub variants: Vec<Variant>,
}

/// One job: a model through a variant.
#[derive(Debug, Clone)]
pub struct Job {
    /// 0-based position in the recipe's job list (models × variants, in order).
    pub index: usize,
    /// Index into `Recipe::models`.
    pub model: usize,
    /// Index into `Recipe::variants`.
    pub variant: usize,
    /// `MODEL/VARIANT`.
    pub name: String,
    /// Artifact path relative to the output folder.
    pub artifact: String,
}

impl Recipe {
    /// Every job, in order: each model through each variant.
    pub fn jobs(&self) -> Vec<Job> {
        let mut out = Vec::new();
        for (m, model) in self.models.iter().enumerate() {
            for (v, variant) in self.variants.iter().enumerate() {
                let kind = variant
                    .stages
                    .last()
                    .map_or(ArtifactKind::Folder, |s| s.writes);
                let artifact = variant
                    .path
                    .as_ref()
                    .map(|p| p.replace("{model}", &model.name));
                let artifact = artifact.unwrap_or_else(|| match kind {
                    ArtifactKind::Gguf => format!("{}/{}.gguf", model.name, variant.name),
                    ArtifactKind::Folder => format!("{}/{}", model.name, variant.name),
                });
                out.push(Job {
                    index: out.len(),
                    model: m,
                    variant: v,
                    name: format!("{}/{}", model.name, variant.name),
                    artifact,
                });
            }
        }
        out
    }
}

impl Recipe {
    /// The number of shards `--shard I` (without `/N`) divides the jobs into: the
    /// recipe's `shards`, or one job per shard. It depends on the recipe alone,
    /// never on how a job array was submitted, so resubmitting one task of an
    /// array runs the same jobs as the first submission.
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| self.models.len() * self.variants.len())
            .max(1)
    }
}

/// `I/N`: the I-th (1-based) of N disjoint slices of a job list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1-based index.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` with 1 ≤ I ≤ N, or `I` alone: the I-th of `default_count`
    /// (the recipe's [`Recipe::shard_count`]).
    pub fn parse(s: &str, default_count: usize) -> Result<Shard> {
        let (i, n) = match s.split_once('/') {
            Some((i, n)) => (i, Some(n)),
            None => (s, None),
        };
        let index: usize = i.trim().parse().with_context(|| {
            format!("--shard {s}: '{i}' is not a number (expected I or I/N, e.g. 2 or 2/8)")
        })?;
        let count: usize = match n {
            Some(n) => n
                .trim()
                .parse()
                .with_context(|| format!("--shard {s}: '{n}' is not a number"))?,
            None => default_count,
        };
        if count == 0 || index == 0 || index > count {
            match n {
                Some(_) => anyhow::bail!("--shard {s}: I must be between 1 and N"),
                None => anyhow::bail!(
                    "--shard {s}: the recipe has {count} shard{} (its `shards` key, or one per job): \
                     I must be between 1 and {count}",
                    if count == 1 { "" } else { "s" }
                ),
            }
        }
        Ok(Shard { index, count })
    }

    /// Whether job `j` (0-based) is in this shard: jobs are dealt round-robin, so
    /// shards get similar mixes of long and short jobs.
    pub fn contains(&self, j: usize) -> bool {
        j % self.count == self.index - 1
    }
}

/// Reads and validates a recipe; every problem is reported at once.
pub fn load(path: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    parse(path, &text).map_err(anyhow::Error::new)
}

/// A recipe table being read: records which keys were used.
struct Reader<'a> {
    problems: &'a mut Vec<Problem>,
}

impl Reader<'_> {
    fn problem(&mut self, line: usize, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            message: message.into(),
        });
    }

    /// Entries of a table node, or a problem.
    fn table<'n>(&mut self, node: &'n Node, what: &str) -> &'n [(String, usize, Node)] {
        match &node.value {
            NodeValue::Table(t) => t,
            other => {
                self.problem(
                    node.line,
                    format!("{what} must be a table, not {}", other.type_name()),
                );
                &[]
            }
        }
    }

    /// Checks that every key of a table is valid.
    fn keys(&mut self, entries: &[(String, usize, Node)], place: &str, valid: &[&str]) {
        for (k, line, _) in entries {
            if !valid.contains(&k.as_str()) {
                let msg = unknown_key(k, place, valid);
                self.problem(*line, msg);
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            NodeValue::Str(s) if !s.is_empty() => Some(s.clone()),
            NodeValue::Str(_) => {
                self.problem(node.line, format!("{what} is empty"));
                None
            }
            other => {
                self.problem(
                    node.line,
                    format!("{what} must be a string, not {}", other.type_name()),
                );
                None
            }
        }
    }

    fn count(&mut self, node: &Node, what: &str, min: i64) -> Option<usize> {
        match &node.value {
            NodeValue::Int(i) if *i >= min => Some(*i as usize),
            NodeValue::Int(i) => {
                self.problem(node.line, format!("{what} = {i}: must be at least {min}"));
                None
            }
            other => {
                self.problem(
                    node.line,
                    format!("{what} must be an integer, not {}", other.type_name()),
                );
                None
            }
        }
    }
}

fn get<'n>(entries: &'n [(String, usize, Node)], key: &str) -> Option<&'n Node> {
    entries.iter().find(|(k, _, _)| k == key).map(|(_, _, n)| n)
}

/// Checks that a path argument names an existing file or a known asset.
fn check_path(r: &mut Reader, node: &Node, what: &str, path: &str) {
    if let Some(name) = path.strip_prefix("asset:") {
        if Asset::from_name(name).is_none() {
            r.problem(
                node.line,
                format!(
                    "{what} = \"{path}\": no asset '{name}' (assets: smollm2, eval, calib, brown)"
                ),
            );
        }
    } else if !Path::new(path).exists() {
        r.problem(node.line, format!("{what} = \"{path}\": no such file"));
    }
}

/// A name usable as a path component.
fn check_name(r: &mut Reader, node: &Node, what: &str, name: &str) {
    let ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        r.problem(
            node.line,
            format!("{what} = \"{name}\": use letters, digits, '-', '_' and '.' (it names files)"),
        );
    }
}

/// Validates a recipe's text.
pub fn parse(path: &Path, text: &str) -> std::result::Result<Recipe, Problems> {
    let file = path.display().to_string();
    let doc = toml_edit::ImDocument::parse(text.to_owned()).map_err(|e| Problems {
        file: file.clone(),
        list: vec![Problem {
            line: line_of(text, e.span()),
            message: format!("not valid TOML: {}", e.message()),
        }],
    })?;
    let root = node_of_table(text, doc.as_table());
    let mut problems = Vec::new();
    let mut r = Reader {
        problems: &mut problems,
    };
    let top = r.table(&root, "the recipe").to_vec();
    r.keys(
        &top,
        "the recipe",
        &[
            "name", "output", "seed", "shards", "model", "calib", "eval", "gate", "variant",
        ],
    );

    let name = get(&top, "name")
        .and_then(|n| r.string(n, "name"))
        .unwrap_or_else(|| {
            path.file_stem()
                .map_or("recipe".into(), |s| s.to_string_lossy().into_owned())
        });
    let output = match get(&top, "output") {
        Some(n) => r.string(n, "output").map(PathBuf::from),
        None => {
            r.problem(0, "missing key 'output' (the folder the artifacts go to; `compress run --out DIR` overrides it)");
            None
        }
    };
    let seed = get(&top, "seed")
        .and_then(|n| r.count(n, "seed", 0))
        .unwrap_or(0) as u64;
    let shards = get(&top, "shards").and_then(|n| r.count(n, "shards", 1));

    // [[model]]
    let mut models = Vec::new();
    match get(&top, "model") {
        None => r.problem(
            0,
            "no [[model]]: give at least one input model (name, path)",
        ),
        Some(node) => {
            let list = match &node.value {
                NodeValue::Array(a) => a.clone(),
                NodeValue::Table(_) => vec![node.clone()],
                other => {
                    r.problem(
                        node.line,
                        format!("model must be [[model]] tables, not {}", other.type_name()),
                    );
                    Vec::new()
                }
            };
            for m in &list {
                let entries = r.table(m, "[[model]]").to_vec();
                r.keys(&entries, "[[model]]", &["name", "path"]);
                let path = match get(&entries, "path") {
                    Some(n) => r.string(n, "model path").inspect(|p| {
                        check_path(&mut r, n, "path", p);
                    }),
                    None => {
                        r.problem(
                            m.line,
                            "[[model]] needs a path (a model file, folder or asset:smollm2)",
                        );
                        None
                    }
                };
                let name = match get(&entries, "name") {
                    Some(n) => r
                        .string(n, "model name")
                        .inspect(|s| check_name(&mut r, n, "name", s)),
                    None => path.as_deref().map(default_model_name),
                };
                if let (Some(name), Some(path)) = (name, path) {
                    if models.iter().any(|x: &ModelSpec| x.name == name) {
                        r.problem(m.line, format!("two models are named '{name}': their artifacts would overwrite each other"));
                    }
                    models.push(ModelSpec { name, path });
                }
            }
        }
    }

    // [calib]
    let mut calib = Calib {
        text: "asset:calib".into(),
        samples: 128,
        seq: 512,
    };
    if let Some(node) = get(&top, "calib") {
        let entries = r.table(node, "[calib]").to_vec();
        r.keys(&entries, "[calib]", &["text", "samples", "seq"]);
        if let Some(n) = get(&entries, "text") {
            if let Some(t) = r.string(n, "calib text") {
                check_path(&mut r, n, "text", &t);
                calib.text = t;
            }
        }
        if let Some(n) = get(&entries, "samples") {
            calib.samples = r.count(n, "samples", 1).unwrap_or(calib.samples);
        }
        if let Some(n) = get(&entries, "seq") {
            calib.seq = r.count(n, "seq", 8).unwrap_or(calib.seq);
        }
    }

    // [eval]
    let eval = get(&top, "eval").map(|node| {
        let entries = r.table(node, "[eval]").to_vec();
        r.keys(&entries, "[eval]", &["text", "ctx", "chunks", "base"]);
        let text = match get(&entries, "text") {
            Some(n) => r
                .string(n, "eval text")
                .inspect(|t| check_path(&mut r, n, "text", t))
                .unwrap_or_default(),
            None => "asset:eval".into(),
        };
        let ctx = get(&entries, "ctx")
            .and_then(|n| r.count(n, "ctx", 16))
            .unwrap_or(512);
        let chunks = get(&entries, "chunks").and_then(|n| r.count(n, "chunks", 1));
        let base = get(&entries, "base").and_then(|n| {
            r.string(n, "eval base")
                .inspect(|b| check_path(&mut r, n, "base", b))
        });
        EvalSpec {
            text,
            ctx,
            chunks,
            base,
        }
    });

    // [gate]
    let gate = get(&top, "gate").map(|node| {
        let entries = r.table(node, "[gate]").to_vec();
        let valid: Vec<String> = eval::gate::KEYS
            .iter()
            .map(|k| k.replace('-', "_"))
            .collect();
        let valid: Vec<&str> = valid.iter().map(String::as_str).collect();
        let mut t = Thresholds::default();
        for (k, line, v) in &entries {
            let key = k.replace('_', "-");
            if !eval::gate::KEYS.contains(&key.as_str()) {
                let msg = unknown_key(k, "[gate]", &valid);
                r.problem(*line, msg);
                continue;
            }
            let text = match &v.value {
                NodeValue::Str(s) => s.clone(),
                NodeValue::Int(i) => i.to_string(),
                NodeValue::Float(f) => f.to_string(),
                other => {
                    r.problem(
                        v.line,
                        format!("gate {k} must be a number, not {}", other.type_name()),
                    );
                    continue;
                }
            };
            match eval::gate::parse_value(k, &text).and_then(|x| t.set(&key, x)) {
                Ok(()) => {}
                Err(e) => r.problem(v.line, format!("{e:#}")),
            }
        }
        if entries.is_empty() {
            r.problem(node.line, "[gate] sets no threshold");
        }
        t
    });
    if gate.is_some() && eval.is_none() {
        r.problem(
            get(&top, "gate").map_or(0, |n| n.line),
            "[gate] needs an [eval] table: the thresholds are checked on its report",
        );
    }

    // [[variant]]
    let mut variants = Vec::new();
    match get(&top, "variant") {
        None => r.problem(0, "no [[variant]]: give at least one (name, stages)"),
        Some(node) => {
            let list = match &node.value {
                NodeValue::Array(a) => a.clone(),
                NodeValue::Table(_) => vec![node.clone()],
                other => {
                    r.problem(
                        node.line,
                        format!(
                            "variant must be [[variant]] tables, not {}",
                            other.type_name()
                        ),
                    );
                    Vec::new()
                }
            };
            for v in &list {
                if let Some(variant) = read_variant(&mut r, v, &calib, seed) {
                    if variants.iter().any(|x: &Variant| x.name == variant.name) {
                        r.problem(v.line, format!("two variants are named '{}'", variant.name));
                    }
                    variants.push(variant);
                }
            }
        }
    }

    let recipe = Recipe {
        path: path.to_path_buf(),
        text: text.to_owned(),
        name,
        output: output.unwrap_or_default(),
        seed,
        shards,
        models,
        calib,
        eval,
        gate,
        variants,
    };
    check_outputs(&mut r, &recipe, &recipe.output);
    if problems.is_empty() {
        Ok(recipe)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(Problems {
            file,
            list: problems,
        })
    }
}

/// A model's default name: its file or folder name without the extension.
fn default_model_name(path: &str) -> String {
    let p = path.strip_prefix("asset:").unwrap_or(path);
    let stem = Path::new(p)
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Checks that no two jobs write the same artifact and no artifact is an input.
pub fn check_outputs_for(recipe: &Recipe, out: &Path) -> std::result::Result<(), Problems> {
    let mut problems = Vec::new();
    check_outputs(
        &mut Reader {
            problems: &mut problems,
        },
        recipe,
        out,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems {
            file: recipe.path.display().to_string(),
            list: problems,
        })
    }
}

fn check_outputs(r: &mut Reader, recipe: &Recipe, out: &Path) {
    let mut seen: BTreeMap<PathBuf, String> = BTreeMap::new();
    let inputs: Vec<(String, PathBuf)> = recipe
        .models
        .iter()
        .map(|m| (format!("model '{}'", m.name), m.path.clone()))
        .chain([("calib text".to_owned(), recipe.calib.text.clone())])
        .chain(recipe.eval.iter().flat_map(|e| {
            [("eval text".to_owned(), e.text.clone())]
                .into_iter()
                .chain(e.base.iter().map(|b| ("eval base".to_owned(), b.clone())))
        }))
        .filter(|(_, p)| !p.starts_with("asset:"))
        .map(|(w, p)| (w, absolute(Path::new(&p))))
        .collect();
    let out_abs = absolute(out);
    for (what, p) in &inputs {
        if *p == out_abs {
            r.problem(
                0,
                format!("the output folder {} is the {what}", out.display()),
            );
        }
    }
    for job in recipe.jobs() {
        let path = absolute(&out.join(&job.artifact));
        let line = recipe.variants[job.variant].line;
        if let Some(other) = seen.insert(path.clone(), job.name.clone()) {
            r.problem(
                line,
                format!(
                    "jobs {other} and {} both write {}",
                    job.name,
                    path.display()
                ),
            );
        }
        for (what, p) in &inputs {
            if *p == path || p.starts_with(&path) {
                r.problem(
                    line,
                    format!(
                        "job {} would write {}, which is the {what}; inputs are never modified",
                        job.name,
                        path.display()
                    ),
                );
            }
        }
    }
}

/// `p` made absolute against the current folder, `.` and `..` folded, symlinks
/// resolved where the path exists.
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let joined = std::env::current_dir().unwrap_or_default().join(p);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn read_variant(r: &mut Reader, node: &Node, calib: &Calib, seed: u64) -> Option<Variant> {
    let entries = r.table(node, "[[variant]]").to_vec();
    r.keys(&entries, "[[variant]]", &["name", "stages", "path"]);
    let name = match get(&entries, "name") {
        Some(n) => r
            .string(n, "variant name")
            .inspect(|s| check_name(r, n, "name", s)),
        None => {
            r.problem(node.line, "[[variant]] needs a name");
            None
        }
    };
    let path = get(&entries, "path").and_then(|n| r.string(n, "variant path"));
    let stage_nodes = match get(&entries, "stages").map(|n| &n.value) {
        Some(NodeValue::Array(a)) if !a.is_empty() => a.clone(),
        Some(NodeValue::Array(_)) | None => {
            r.problem(
                node.line,
                format!(
                    "variant '{}' has no stages (stages = [{{ kind = \"quantize\", type = \"Q4_K_M\" }}])",
                    name.as_deref().unwrap_or("?")
                ),
            );
            Vec::new()
        }
        Some(other) => {
            r.problem(
                node.line,
                format!(
                    "stages must be an array of tables, not {}",
                    other.type_name()
                ),
            );
            Vec::new()
        }
    };
    let mut stages: Vec<Stage> = Vec::new();
    for (i, s) in stage_nodes.iter().enumerate() {
        let place = format!(
            "stage {} of variant '{}'",
            i + 1,
            name.as_deref().unwrap_or("?")
        );
        let Some(mut stage) = read_stage(r, s, &place, calib, seed) else {
            continue;
        };
        let prev_gguf = stages
            .last()
            .is_some_and(|p| p.quantized && p.writes == ArtifactKind::Gguf);
        if stage.kind == StageKind::Distill && prev_gguf {
            // A GGUF-quantized student trains through its codecs and is written
            // back in its types: still a quantized GGUF.
            stage.writes = ArtifactKind::Gguf;
            stage.quantized = true;
        } else if let Some(prev) = stages.last().filter(|p| p.quantized) {
            let msg = if stage.kind == StageKind::Distill {
                format!(
                    "{place}: distill after quantize to an integer (GPTQ / AWQ) folder: such students are not trained in this version; quantize to GGUF types (`type = ...`), which distill trains through, or put distill before quantize (line {})",
                    prev.line
                )
            } else if stage.kind == StageKind::Quantize {
                format!(
                    "{place}: quantize twice: stage {} already quantized the model (line {}); give one quantize stage per variant",
                    i, prev.line
                )
            } else {
                format!(
                    "{place}: prune after quantize: a quantized model cannot be pruned; put prune before quantize (line {})",
                    prev.line
                )
            };
            r.problem(stage.line, msg);
        } else if let Some(prev) = stages.last().filter(|p| {
            p.kind == StageKind::Prune
                && p.args
                    .windows(2)
                    .any(|w| w == ["--format", "compressed-tensors"])
        }) {
            r.problem(
                stage.line,
                format!(
                    "{place}: the stage before (line {}) writes a compressed-tensors sparse folder, which only `eval` reads; write it dense (the default) and choose the format in the last stage",
                    prev.line
                ),
            );
        }
        stages.push(stage);
    }
    if let Some(p) = path.as_deref() {
        let last = stages.last().map(|s| s.writes);
        if last == Some(ArtifactKind::Gguf) && !p.ends_with(".gguf") {
            r.problem(
                get(&entries, "path").map_or(node.line, |n| n.line),
                format!("path = \"{p}\": the variant writes a GGUF file; end it with .gguf"),
            );
        }
        if Path::new(p).is_absolute() || p.split('/').any(|c| c == "..") {
            r.problem(
                get(&entries, "path").map_or(node.line, |n| n.line),
                format!("path = \"{p}\": must be relative to the output folder, without '..'"),
            );
        }
    }
    Some(Variant {
        name: name?,
        stages,
        path,
        line: get(&entries, "path").map_or(node.line, |n| n.line),
    })
}

/// A stage key's value as command-line text.
fn flag_text(v: &NodeValue) -> Option<String> {
    match v {
        NodeValue::Str(s) => Some(s.clone()),
        NodeValue::Int(i) => Some(i.to_string()),
        NodeValue::Float(f) => Some(format!("{f:?}")),
        NodeValue::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn read_stage(r: &mut Reader, node: &Node, place: &str, calib: &Calib, seed: u64) -> Option<Stage> {
    let entries = r.table(node, place).to_vec();
    let kind = match get(&entries, "kind").map(|n| (n, &n.value)) {
        Some((_, NodeValue::Str(k))) if k == "prune" => StageKind::Prune,
        Some((_, NodeValue::Str(k))) if k == "quantize" => StageKind::Quantize,
        Some((_, NodeValue::Str(k))) if k == "distill" => StageKind::Distill,
        Some((n, NodeValue::Str(k))) => {
            let hint = closest(k, STAGE_KINDS.iter().copied())
                .map_or(String::new(), |s| format!("; did you mean '{s}'?"));
            r.problem(
                n.line,
                format!(
                    "{place}: unknown stage kind '{k}' (stages: {}){hint}",
                    STAGE_KINDS.join(", ")
                ),
            );
            return None;
        }
        Some((n, other)) => {
            r.problem(
                n.line,
                format!("{place}: kind must be a string, not {}", other.type_name()),
            );
            return None;
        }
        None => {
            r.problem(
                node.line,
                format!("{place}: needs kind = \"prune\", \"distill\" or \"quantize\""),
            );
            return None;
        }
    };
    let place = format!("{place} ({})", kind.name());
    let command = kind.command();
    let flags: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !RUNNER_FLAGS.contains(&a.get_id().as_str()))
        .collect();
    let mut valid: Vec<String> = flags
        .iter()
        .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
        .collect();
    valid.extend(RUNNER_STAGE_KEYS.iter().map(|s| s.to_string()));
    let valid: Vec<&str> = valid.iter().map(String::as_str).collect();

    let mut args: Vec<String> = Vec::new();
    let mut file_args = Vec::new();
    let mut given: Vec<String> = Vec::new();
    let mut imatrix = ImatrixSource::None;
    let mut write: Option<(String, usize)> = None;
    let problems_before = r.problems.len();
    for (k, line, v) in &entries {
        let long = k.replace('_', "-");
        match long.as_str() {
            "kind" => continue,
            "imatrix" if kind == StageKind::Quantize => {
                match &v.value {
                    NodeValue::Bool(true) => imatrix = ImatrixSource::Collect,
                    NodeValue::Bool(false) => {}
                    NodeValue::Str(p) => {
                        check_path(r, v, "imatrix", p);
                        imatrix = ImatrixSource::File(p.clone());
                    }
                    other => r.problem(
                        v.line,
                        format!(
                            "{place}: imatrix must be true (collect one on the calibration text) or a file, not {}",
                            other.type_name()
                        ),
                    ),
                }
                continue;
            }
            "write" if kind != StageKind::Quantize => {
                match &v.value {
                    NodeValue::Str(s) if s == "gguf" || s == "safetensors" => {
                        write = Some((s.clone(), v.line))
                    }
                    _ => r.problem(
                        v.line,
                        format!("{place}: write must be \"safetensors\" (an HF folder, the default) or \"gguf\""),
                    ),
                }
                continue;
            }
            _ => {}
        }
        let Some(arg) = flags.iter().find(|a| a.get_long() == Some(long.as_str())) else {
            let msg = unknown_key(k, &place, &valid);
            r.problem(*line, msg);
            continue;
        };
        given.push(long.clone());
        let flag = format!("--{long}");
        match (arg.get_action(), &v.value) {
            (ArgAction::SetTrue, NodeValue::Bool(b)) => {
                if *b {
                    args.push(flag);
                }
            }
            (ArgAction::SetTrue, other) => r.problem(
                v.line,
                format!(
                    "{place}: {k} must be true or false, not {}",
                    other.type_name()
                ),
            ),
            (ArgAction::Append, NodeValue::Array(items)) => {
                let delimited = arg.get_value_delimiter().is_some();
                let texts: Option<Vec<String>> =
                    items.iter().map(|i| flag_text(&i.value)).collect();
                match texts {
                    Some(t) if delimited => {
                        args.push(flag);
                        args.push(t.join(","));
                    }
                    Some(t) => {
                        for x in t {
                            args.push(flag.clone());
                            args.push(x);
                        }
                    }
                    None => r.problem(
                        v.line,
                        format!("{place}: {k} must be an array of strings or numbers"),
                    ),
                }
            }
            (_, value) => match flag_text(value) {
                Some(t) => {
                    args.push(flag);
                    args.push(t);
                }
                None => r.problem(
                    v.line,
                    format!(
                        "{place}: {k} must be a string, number or boolean, not {}",
                        value.type_name()
                    ),
                ),
            },
        }
        if long == "calib" || long == "sensitivity" || long == "text" {
            if let NodeValue::Str(p) = &v.value {
                check_path(r, v, k, p);
            }
        }
    }
    // Recipe-wide defaults for what the stage did not set.
    let defaults = [
        ("calib", calib.text.clone()),
        ("text", calib.text.clone()),
        ("samples", calib.samples.to_string()),
        ("seq", calib.seq.to_string()),
        ("seed", seed.to_string()),
    ];
    // A GGUF mix without --method reads no calibration text (its imatrix stage does).
    let calibrates = kind != StageKind::Quantize || given.iter().any(|g| g == "method");
    for (k, v) in defaults {
        if calibrates
            && !given.iter().any(|g| g == k)
            && flags.iter().any(|a| a.get_long() == Some(k))
        {
            args.push(format!("--{k}"));
            args.push(v);
        }
    }
    for f in ["calib", "sensitivity", "text"] {
        if let Some(i) = args.iter().position(|a| *a == format!("--{f}")) {
            file_args.push(args[i + 1].clone());
        }
    }
    if let ImatrixSource::File(p) = &imatrix {
        file_args.push(p.clone());
    }
    let has = |f: &str| args.iter().any(|a| a == f);
    let writes = match kind {
        StageKind::Quantize => {
            if has("--method") && !has("--type") && !has("--target-bpw") {
                ArtifactKind::Folder
            } else {
                ArtifactKind::Gguf
            }
        }
        StageKind::Prune | StageKind::Distill => match write {
            Some((w, line)) if w == "gguf" => {
                if args
                    .windows(2)
                    .any(|w| w == ["--format", "compressed-tensors"])
                {
                    r.problem(line, format!("{place}: format = \"compressed-tensors\" writes a folder; drop write = \"gguf\""));
                }
                ArtifactKind::Gguf
            }
            _ => ArtifactKind::Folder,
        },
    };
    if kind == StageKind::Quantize
        && imatrix != ImatrixSource::None
        && has("--method")
        && !has("--type")
    {
        r.problem(node.line, format!("{place}: imatrix applies to GGUF types (--type or --target-bpw); --method without --type calibrates on its own"));
    }
    // The command's own parser checks types, choices and combinations.
    if r.problems.len() == problems_before {
        let mut argv = vec!["compress".to_owned(), kind.name().to_owned()];
        if kind == StageKind::Distill {
            argv.extend(["--teacher", "TEACHER", "--student", "STUDENT"].map(String::from));
        } else {
            argv.push("INPUT".to_owned());
        }
        argv.extend(args.iter().cloned());
        argv.extend(["--output".to_owned(), "OUTPUT".to_owned()]);
        if imatrix != ImatrixSource::None {
            argv.extend(["--imatrix".to_owned(), "IMATRIX".to_owned()]);
        }
        if let Err(e) = crate::Cli::try_parse_from(&argv) {
            let text = e
                .kind()
                .as_str()
                .map_or_else(|| e.to_string(), |_| e.to_string());
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_owned();
            r.problem(node.line, format!("{place}: {first}"));
        } else if let Err(e) = stage_check(kind, &argv) {
            r.problem(node.line, format!("{place}: {e:#}"));
        }
    }
    let quantized = kind == StageKind::Quantize;
    Some(Stage {
        kind,
        args,
        file_args,
        imatrix,
        writes,
        line: node.line,
        quantized,
    })
}

/// The stage command's own argument checks (ranges, names), without any work.
fn stage_check(kind: StageKind, argv: &[String]) -> Result<()> {
    match crate::Cli::try_parse_from(argv).map(|c| c.command) {
        Ok(crate::Command::Prune(a)) => crate::prune::check_args(&a),
        Ok(crate::Command::Quantize(a)) => crate::quantize::check_args(&a),
        Ok(crate::Command::Distill(a)) => crate::distill::check_args(&a),
        Ok(_) | Err(_) => anyhow::bail!("cannot check {} arguments", kind.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(usize, String)> {
        match parse(Path::new("r.toml"), text) {
            Ok(_) => Vec::new(),
            Err(p) => p.list.into_iter().map(|p| (p.line, p.message)).collect(),
        }
    }

    const GOOD: &str = r#"
output = "/tmp/compress-recipe-test-out"
[[model]]
name = "m"
path = "asset:smollm2"
[eval]
chunks = 2
[gate]
max_kld = 0.1
[[variant]]
name = "q4"
stages = [{ kind = "quantize", type = "Q4_K_M", imatrix = true }]
[[variant]]
name = "s24"
stages = [
  { kind = "prune", nm = "2:4", method = "wanda" },
  { kind = "quantize", method = "gptq", bits = 4 },
]
"#;

    #[test]
    fn good_recipe_expands_to_jobs() {
        let r = parse(Path::new("r.toml"), GOOD).unwrap();
        let jobs = r.jobs();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].artifact, "m/q4.gguf");
        assert_eq!(jobs[1].artifact, "m/s24");
        assert_eq!(r.variants[0].stages[0].imatrix, ImatrixSource::Collect);
        let s = &r.variants[1].stages[0].args;
        assert!(s.windows(2).any(|w| w == ["--nm", "2:4"]), "{s:?}");
        assert!(s.windows(2).any(|w| w == ["--seed", "0"]), "{s:?}");
        assert_eq!(r.variants[1].stages[1].writes, ArtifactKind::Folder);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = GOOD
            .replace("type = \"Q4_K_M\"", "tpye = \"Q4_K_M\"")
            .replace("chunks = 2", "chunks = \"two\"")
            .replace("max_kld = 0.1", "max_kdl = 0.1");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p
            .iter()
            .any(|(l, m)| *l == 12 && m.contains("did you mean 'type'")));
        assert!(p.iter().any(|(l, m)| *l == 7 && m.contains("integer")));
        assert!(p
            .iter()
            .any(|(l, m)| *l == 9 && m.contains("did you mean 'max_kld'")));
    }

    #[test]
    fn impossible_stage_orders_are_refused() {
        let twice = GOOD.replace(
            "{ kind = \"prune\", nm = \"2:4\", method = \"wanda\" }",
            "{ kind = \"quantize\", type = \"Q8_0\" }",
        );
        let p = problems(&twice);
        assert!(p.iter().any(|(_, m)| m.contains("quantize twice")), "{p:?}");
        let typo = GOOD.replace("kind = \"prune\"", "kind = \"distil\"");
        let p = problems(&typo);
        assert!(
            p.iter().any(|(_, m)| m.contains("did you mean 'distill'")),
            "{p:?}"
        );
        let after = GOOD.replace(
            "{ kind = \"prune\", nm = \"2:4\", method = \"wanda\" },\n  { kind = \"quantize\", method = \"gptq\", bits = 4 },",
            "{ kind = \"quantize\", method = \"gptq\", bits = 4 },\n  { kind = \"distill\", tokens = 1000 },",
        );
        let p = problems(&after);
        assert!(
            p.iter().any(|(_, m)| m.contains("distill after quantize")),
            "{p:?}"
        );
        let after_gguf = GOOD.replace(
            "{ kind = \"prune\", nm = \"2:4\", method = \"wanda\" },\n  { kind = \"quantize\", method = \"gptq\", bits = 4 },",
            "{ kind = \"quantize\", type = \"Q4_K_M\" },\n  { kind = \"distill\", tokens = 1000 },",
        );
        assert_ne!(after_gguf, GOOD);
        assert!(
            problems(&after_gguf).is_empty(),
            "{:?}",
            problems(&after_gguf)
        );
    }

    #[test]
    fn bad_values_are_caught_by_the_stage_parser() {
        let p = problems(&GOOD.replace("bits = 4", "bits = \"four\""));
        assert!(
            p.iter().any(|(l, m)| *l == 17 && m.contains("four")),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("nm = \"2:4\"", "sparsity = 1.5"));
        assert!(p.iter().any(|(_, m)| m.contains("1.5")), "{p:?}");
        let p = problems(&GOOD.replace("Q4_K_M", "Q4_K_Z"));
        assert!(p.iter().any(|(_, m)| m.contains("Q4_K_Z")), "{p:?}");
    }

    #[test]
    fn same_output_twice_and_output_onto_input_are_refused() {
        let dup = GOOD.replace("name = \"s24\"", "name = \"q4\"");
        assert!(problems(&dup)
            .iter()
            .any(|(_, m)| m.contains("two variants")));
        let onto = GOOD.replace("name = \"q4\"\n", "name = \"q4\"\npath = \"m/s24\"\n");
        let p = problems(&onto);
        assert!(p.iter().any(|(_, m)| m.contains("both write")), "{p:?}");
    }

    #[test]
    fn an_artifact_onto_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("out/m/q4.gguf");
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        std::fs::write(&model, b"GGUF").unwrap();
        let text = GOOD
            .replace(
                "/tmp/compress-recipe-test-out",
                &dir.path().join("out").display().to_string(),
            )
            .replace("asset:smollm2", &model.display().to_string());
        let p = problems(&text);
        assert!(
            p.iter().any(|(_, m)| m.contains("which is the model 'm'")),
            "{p:?}"
        );
    }

    #[test]
    fn shards_partition_the_jobs() {
        for n in 1..6 {
            let shards: Vec<Shard> = (1..=n)
                .map(|i| Shard::parse(&format!("{i}/{n}"), 1).unwrap())
                .collect();
            for j in 0..17 {
                assert_eq!(shards.iter().filter(|s| s.contains(j)).count(), 1);
            }
        }
        assert!(Shard::parse("0/3", 9).is_err());
        assert!(Shard::parse("4/3", 9).is_err());
        assert!(Shard::parse("x", 9).is_err());
        // `I` alone takes N from the recipe, whatever the array's size.
        assert_eq!(Shard::parse("4", 7).unwrap(), Shard { index: 4, count: 7 });
        let beyond = Shard::parse("8", 7).unwrap_err().to_string();
        assert!(beyond.contains("the recipe has 7 shards"), "{beyond}");
    }
}
