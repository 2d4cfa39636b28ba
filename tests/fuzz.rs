//! The fuzzing harness: our readers of untrusted bytes run in-process on
//! mutated copies of valid inputs, and none may panic, abort or allocate more
//! than a bound. Targets: a GGUF model (header, hyperparameters, tokenizer,
//! tensor shapes, one tensor decoded), an imatrix GGUF (llama.cpp's own), a
//! safetensors file and an HF `config.json`, each from the committed fixtures;
//! a `tokenizer.json` (loaded, turned into a GGUF vocabulary, encoding a
//! sentence); a recipe (`examples/smollm2.toml`, validated); a gate TOML
//! (`examples/gates.toml`, then checked against a report) and an `eval --json`
//! report (checked against those gates); a sensitivity report (loaded for the
//! model it was made on, then turned into the allocator's candidates); and a
//! GPTQ folder's `model.safetensors` and a compressed-tensors folder's
//! `config.json` (the folder opened and one quantized linear unpacked). The
//! reports and folders are made once by the `compress` binary from the qwen3
//! fixture into `target/fuzz-seeds/`; the file-based readers read each case
//! from a scratch folder.
//!
//! Mutations, one to four per case, drawn from a seeded generator (so a case
//! is reproduced by its seed and index): a bit flip; a 4- or 8-byte field set
//! to a boundary value (0, 1, 2³¹, 2³², u64::MAX, …: counts, lengths, type
//! tags, dims and offsets); a byte set to a GGUF type tag; a truncation; a
//! splice of one span over another; in JSON, a number replaced by a boundary
//! number. Positions fall in the header (where the parsers look) nine times
//! in ten.
//!
//! A panic is caught and saved as a reproducer under
//! `target/fuzz-failures/`; an allocation over the bound (64 × the input's
//! size + 64 MiB, the peak over the case, counted by this binary's global
//! allocator) too. `fuzz_smoke` runs 10⁴ cases in the default tests;
//! `bench/fuzz.sh` runs `fuzz_full` (10⁶ cases by default) and writes
//! `bench/results/fuzz.json`.

use e2e::repo_root;
use model::gguf::GgufFile;
use model::io::FileBytes;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts live heap bytes and their peak, so a case's allocation can be bounded.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The case running, and its seed, for the message below.
static CASE: AtomicUsize = AtomicUsize::new(0);
static SEED: AtomicUsize = AtomicUsize::new(0);

/// One request above this aborts the process (Rust's allocation-failure
/// path): the allocator first names the case, so `FUZZ_SEED=S FUZZ_CASE=N
/// cargo test --release -p e2e --test fuzz -- --ignored fuzz_one` saves it.
const ABORT_REQUEST: usize = 1 << 30;

/// Writes `fuzz: seed S case N asks for B bytes` to stderr without allocating.
fn name_the_case(bytes: usize) {
    use std::io::Write;
    fn digits(mut v: usize, buf: &mut [u8; 20]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                return &buf[i..];
            }
        }
    }
    let mut err = std::io::stderr().lock();
    let mut b = [0u8; 20];
    let _ = err.write_all(b"\nfuzz: seed ");
    let _ = err.write_all(digits(SEED.load(Ordering::Relaxed), &mut b));
    let _ = err.write_all(b" case ");
    let _ = err.write_all(digits(CASE.load(Ordering::Relaxed), &mut b));
    let _ = err.write_all(b" asks for ");
    let _ = err.write_all(digits(bytes, &mut b));
    let _ = err.write_all(b" bytes at once\n");
}

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ABORT_REQUEST {
            name_the_case(layout.size());
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ABORT_REQUEST {
            name_the_case(new_size);
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a reader is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    GgufModel,
    Imatrix,
    Safetensors,
    ConfigJson,
    TokenizerJson,
    Recipe,
    GateToml,
    EvalReport,
    SensitivityReport,
    GptqFolder,
    CompressedTensorsConfig,
}

/// The fixture every generated seed is made from.
fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/arch/qwen3")
}

/// Runs the `compress` binary once to make a seed input (kept between runs).
fn generated(name: &str, args: &[&str]) -> PathBuf {
    let dir = repo_root().join("target/fuzz-seeds");
    let out = dir.join(name);
    if !out.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let o = e2e::compress(args);
        assert!(o.status.success(), "{args:?}: {}", e2e::output_text(&o));
        if name.ends_with(".json") && !out.exists() {
            std::fs::write(&out, &o.stdout).unwrap();
        }
    }
    out
}

/// Inputs and scratch folders shared by every case (made before any case is
/// counted).
struct Shared {
    model: model::Model,
    seed_report: serde_json::Value,
    gates: eval::gate::Thresholds,
    scratch: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        let model = model::Model::open(&fixture().join("model.gguf")).unwrap();
        let seed_report =
            serde_json::from_slice(&std::fs::read(Target::EvalReport.seed_file()).unwrap())
                .unwrap();
        let gates = eval::gate::Thresholds::from_toml(
            &std::fs::read_to_string(Target::GateToml.seed_file()).unwrap(),
            "gates.toml",
        )
        .unwrap();
        let shm = Path::new("/dev/shm");
        let scratch = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        // One folder per file-based target, holding the files a case does not replace.
        for (sub, from) in [
            ("tokenizer", fixture()),
            (
                "gptq",
                Target::GptqFolder
                    .seed_file()
                    .parent()
                    .unwrap()
                    .to_path_buf(),
            ),
            (
                "ct",
                Target::CompressedTensorsConfig
                    .seed_file()
                    .parent()
                    .unwrap()
                    .to_path_buf(),
            ),
        ] {
            let d = scratch.path().join(sub);
            std::fs::create_dir_all(&d).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap().path();
                let name = f.file_name().unwrap().to_string_lossy().to_string();
                if sub != "tokenizer" || name.starts_with("tokenizer") {
                    std::fs::copy(&f, d.join(&name)).unwrap();
                }
            }
        }
        Shared {
            model,
            seed_report,
            gates,
            scratch,
        }
    })
}

impl Target {
    const ALL: [Target; 11] = [
        Target::GgufModel,
        Target::Imatrix,
        Target::Safetensors,
        Target::ConfigJson,
        Target::TokenizerJson,
        Target::Recipe,
        Target::GateToml,
        Target::EvalReport,
        Target::SensitivityReport,
        Target::GptqFolder,
        Target::CompressedTensorsConfig,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::GgufModel => "gguf-model",
            Target::Imatrix => "imatrix",
            Target::Safetensors => "safetensors",
            Target::ConfigJson => "config-json",
            Target::TokenizerJson => "tokenizer-json",
            Target::Recipe => "recipe",
            Target::GateToml => "gate-toml",
            Target::EvalReport => "eval-report",
            Target::SensitivityReport => "sensitivity-report",
            Target::GptqFolder => "gptq-folder",
            Target::CompressedTensorsConfig => "compressed-tensors-config",
        }
    }

    /// Text formats get the number mutation.
    fn is_text(self) -> bool {
        !matches!(
            self,
            Target::GgufModel | Target::Imatrix | Target::Safetensors | Target::GptqFolder
        )
    }

    fn seed_file(self) -> PathBuf {
        let f = repo_root().join("tests/fixtures");
        let gguf = fixture().join("model.gguf");
        let gguf = gguf.to_str().unwrap();
        let seeds = repo_root().join("target/fuzz-seeds");
        let rtn = |format: &str, out: &str| {
            generated(
                out,
                &[
                    "quantize",
                    gguf,
                    "--method",
                    "rtn",
                    "--bits",
                    "4",
                    "--group",
                    "32",
                    "--format",
                    format,
                    "--calib",
                    "asset:calib",
                    "-o",
                    seeds.join(out).to_str().unwrap(),
                ],
            )
        };
        match self {
            Target::GgufModel => f.join("arch/qwen3/model.gguf"),
            Target::Imatrix => f.join("moe/qwen3_moe/llama-imatrix.gguf"),
            Target::Safetensors => f.join("arch/qwen3/model.safetensors"),
            Target::ConfigJson => f.join("moe/deepseek_v3/config.json"),
            Target::TokenizerJson => fixture().join("tokenizer.json"),
            Target::Recipe => repo_root().join("examples/smollm2.toml"),
            Target::GateToml => repo_root().join("examples/gates.toml"),
            Target::EvalReport => generated(
                "eval.json",
                &[
                    "eval",
                    gguf,
                    "--base",
                    gguf,
                    "--text",
                    "asset:eval",
                    "--ctx",
                    "64",
                    "--chunks",
                    "1",
                    "--json",
                ],
            ),
            Target::SensitivityReport => generated(
                "sensitivity/r.json",
                &[
                    "sensitivity",
                    gguf,
                    "--calib",
                    "asset:calib",
                    "--text",
                    "asset:eval",
                    "--types",
                    "Q4_0,Q8_0",
                    "--ctx",
                    "64",
                    "--chunks",
                    "1",
                    "-o",
                    seeds.join("sensitivity/r.json").to_str().unwrap(),
                ],
            ),
            Target::GptqFolder => rtn("gptq", "gptq").join("model.safetensors"),
            Target::CompressedTensorsConfig => rtn("compressed-tensors", "ct").join("config.json"),
        }
    }

    /// Where the parser reads structure: the header's length.
    fn header_len(self, bytes: &[u8]) -> usize {
        match self {
            Target::GgufModel | Target::Imatrix => {
                GgufFile::from_bytes(Path::new("seed"), FileBytes::Owned(bytes.to_vec()))
                    .expect("valid seed")
                    .data_offset as usize
            }
            Target::Safetensors | Target::GptqFolder => {
                8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
            }
            _ => bytes.len(),
        }
    }

    /// Runs the reader; `Ok(true)` when it accepted the input.
    fn run(self, bytes: Vec<u8>, pick: usize) -> bool {
        let path = Path::new("fuzz-case");
        let scratch = |sub: &str, file: &str, bytes: &[u8]| {
            let p = shared().scratch.path().join(sub).join(file);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let decode_one = |m: &model::Model| {
            let names = m.tensor_names();
            let name = &names[pick % names.len()];
            m.tensor(name).and_then(|t| t.to_f32()).is_ok()
        };
        match self {
            Target::GgufModel => {
                let Ok(g) = GgufFile::from_bytes(path, FileBytes::Owned(bytes)) else {
                    return false;
                };
                let Ok(m) = model::Model::from_gguf(g) else {
                    return false;
                };
                // One tensor decoded: its data lies where the header says.
                decode_one(&m)
            }
            Target::Imatrix => GgufFile::from_bytes(path, FileBytes::Owned(bytes))
                .and_then(|g| model::calib::Imatrix::from_gguf(&g))
                .is_ok(),
            Target::Safetensors => {
                model::safetensors_file::SafetensorsFile::from_bytes(path, FileBytes::Owned(bytes))
                    .is_ok()
            }
            Target::ConfigJson => serde_json::from_slice(&bytes)
                .map_err(anyhow::Error::from)
                .and_then(|v| model::ModelConfig::from_hf_json(&v))
                .is_ok(),
            Target::TokenizerJson => {
                let p = scratch("tokenizer", "tokenizer.json", &bytes);
                model::tokenizer::Tokenizer::from_file(&p)
                    .and_then(|t| {
                        t.to_gguf_vocab()?;
                        t.encode("The quick brown fox, 1234 times.")
                    })
                    .is_ok()
            }
            Target::Recipe => std::str::from_utf8(&bytes)
                .is_ok_and(|text| compress::recipe::parse(Path::new("fuzz.toml"), text).is_ok()),
            Target::GateToml => std::str::from_utf8(&bytes).is_ok_and(|text| {
                eval::gate::Thresholds::from_toml(text, "fuzz.toml")
                    .and_then(|t| eval::gate::check(&shared().seed_report, &t))
                    .is_ok()
            }),
            Target::EvalReport => serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(anyhow::Error::from)
                .and_then(|v| eval::gate::check(&v, &shared().gates))
                .is_ok(),
            Target::SensitivityReport => {
                let p = scratch("tokenizer", "r.json", &bytes);
                let m = &shared().model;
                compress::sensitivity::load_report(&p, m)
                    .and_then(|r| compress::sensitivity::candidates(&r, m))
                    .is_ok()
            }
            Target::GptqFolder | Target::CompressedTensorsConfig => {
                let (sub, file) = if self == Target::GptqFolder {
                    ("gptq", "model.safetensors")
                } else {
                    ("ct", "config.json")
                };
                let p = scratch(sub, file, &bytes);
                model::Model::open(p.parent().unwrap()).is_ok_and(|m| decode_one(&m))
            }
        }
    }
}

const BOUNDARIES: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

const JSON_NUMBERS: [&str; 8] = [
    "0",
    "-1",
    "1e308",
    "4294967296",
    "18446744073709551615",
    "1099511627776",
    "0.5",
    "null",
];

/// One mutation of `b`, positions in `0..header` nine times in ten.
fn mutate(b: &mut Vec<u8>, header: usize, json: bool, rng: &mut rand::rngs::StdRng) {
    if b.is_empty() {
        b.push(0);
    }
    let pos = |rng: &mut rand::rngs::StdRng, len: usize| {
        if rng.gen_range(0..10) < 9 {
            rng.gen_range(0..header.clamp(1, len))
        } else {
            rng.gen_range(0..len)
        }
    };
    match rng.gen_range(0..6) {
        0 => {
            let p = pos(rng, b.len());
            b[p] ^= 1 << rng.gen_range(0..8);
        }
        1 if json => {
            // A number replaced by a boundary one.
            let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
            if let Some(&start) = digits.get(rng.gen_range(0..digits.len().max(1))) {
                let end = (start..b.len())
                    .find(|&i| !b[i].is_ascii_digit() && b[i] != b'.')
                    .unwrap_or(b.len());
                let with = JSON_NUMBERS[rng.gen_range(0..JSON_NUMBERS.len())].as_bytes();
                b.splice(start..end, with.iter().copied());
            }
        }
        1 | 2 => {
            let width = if rng.gen_bool(0.5) { 4 } else { 8 };
            let p = pos(rng, b.len());
            let v = BOUNDARIES[rng.gen_range(0..BOUNDARIES.len())];
            let bytes = v.to_le_bytes();
            for (i, &x) in bytes[..width].iter().enumerate() {
                if let Some(t) = b.get_mut(p + i) {
                    *t = x;
                }
            }
        }
        3 => {
            let p = pos(rng, b.len());
            b[p] = rng.gen_range(0..14);
        }
        4 => {
            let cut = pos(rng, b.len());
            b.truncate(cut);
        }
        _ => {
            let (from, to) = (pos(rng, b.len()), pos(rng, b.len()));
            let len = rng.gen_range(1..=64).min(b.len() - from);
            let span: Vec<u8> = b[from..from + len].to_vec();
            let end = (to + len).min(b.len());
            b.splice(to..end, span);
        }
    }
}

/// What the cases of one run came to.
#[derive(Debug, Default)]
struct Summary {
    cases: usize,
    accepted: usize,
    refused: usize,
    /// Per target: cases accepted and cases in all.
    per_target: [(usize, usize); Target::ALL.len()],
    failures: Vec<String>,
    worst_alloc_ratio: f64,
}

/// Each target with its valid input and that input's header length.
type Seeds = Vec<(Target, Vec<u8>, usize)>;

fn seeds() -> Seeds {
    Target::ALL
        .iter()
        .map(|&t| {
            let bytes = std::fs::read(t.seed_file()).unwrap();
            let header = t.header_len(&bytes);
            (t, bytes, header)
        })
        .collect()
}

/// Case `case` of the run from `seed`: its target, its bytes and which
/// tensor a model case decodes.
fn make_case(seeds: &Seeds, seed: u64, case: usize) -> (Target, Vec<u8>, usize) {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (case as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let (target, base, header) = &seeds[case % seeds.len()];
    let mut bytes = base.clone();
    for _ in 0..rng.gen_range(1..=4) {
        mutate(&mut bytes, *header, target.is_text(), &mut rng);
    }
    (*target, bytes, rng.gen_range(0..1000))
}

/// Runs `cases` cases from `seed`, spread over the targets.
fn run_cases(cases: usize, seed: u64) -> Summary {
    let seeds = seeds();
    shared();
    let failures_dir = repo_root().join("target/fuzz-failures");
    let mut s = Summary::default();
    std::panic::set_hook(Box::new(|_| {}));
    SEED.store(seed as usize, Ordering::Relaxed);
    for case in 0..cases {
        CASE.store(case, Ordering::Relaxed);
        let (target, bytes, pick) = make_case(&seeds, seed, case);
        let bound = 64 * bytes.len() + (64 << 20);
        let input = bytes.clone();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(|| target.run(input, pick));
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        s.worst_alloc_ratio = s
            .worst_alloc_ratio
            .max(used as f64 / bytes.len().max(1) as f64);
        s.cases += 1;
        s.per_target[case % seeds.len()].1 += 1;
        let failure = match outcome {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("panic: {msg}"))
            }
            Ok(_) if used > bound => Some(format!("allocated {used} bytes, bound {bound}")),
            Ok(true) => {
                s.accepted += 1;
                s.per_target[case % seeds.len()].0 += 1;
                None
            }
            Ok(false) => {
                s.refused += 1;
                None
            }
        };
        if let Some(f) = failure {
            std::fs::create_dir_all(&failures_dir).unwrap();
            let file = failures_dir.join(format!("{}-{seed}-{case}.bin", target.name()));
            std::fs::write(&file, &bytes).unwrap();
            s.failures.push(format!(
                "{} case {case}: {f} ({})",
                target.name(),
                file.display()
            ));
        }
    }
    let _ = std::panic::take_hook();
    s
}

#[test]
fn fuzz_smoke() {
    let start = Instant::now();
    let s = run_cases(10_000, 1);
    eprintln!(
        "fuzz smoke: {} cases in {:.1}s, {} accepted, {} refused, worst allocation {:.1}× the input; accepted/cases per target {:?}",
        s.cases,
        start.elapsed().as_secs_f64(),
        s.accepted,
        s.refused,
        s.worst_alloc_ratio,
        s.per_target
    );
    assert!(s.failures.is_empty(), "{}", s.failures.join("\n"));
    // The mutations reach past the first checks: every target still accepts
    // some cases (a mutation outside what it reads, or a harmless one).
    assert!(s.per_target.iter().all(|&(ok, _)| ok > 0), "{s:?}");
}

/// Saves case `FUZZ_CASE` of the run from `FUZZ_SEED` under
/// `target/fuzz-failures/` and runs it (to reproduce one the allocator named).
#[test]
#[ignore]
fn fuzz_one() {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let (Some(seed), Some(case)) = (var("FUZZ_SEED"), var("FUZZ_CASE")) else {
        panic!("set FUZZ_SEED and FUZZ_CASE");
    };
    let (target, bytes, pick) = make_case(&seeds(), seed, case as usize);
    let dir = repo_root().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}-{seed}-{case}.bin", target.name()));
    std::fs::write(&file, &bytes).unwrap();
    eprintln!("saved {}", file.display());
    target.run(bytes, pick);
}

/// The full run (`bench/fuzz.sh`): `FUZZ_CASES` cases (10⁶) from `FUZZ_SEED`
/// (1), summary in `bench/results/fuzz.json`.
#[test]
#[ignore]
fn fuzz_full() {
    let var = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (cases, seed) = (var("FUZZ_CASES", 1_000_000) as usize, var("FUZZ_SEED", 1));
    let start = Instant::now();
    let s = run_cases(cases, seed);
    let seconds = start.elapsed().as_secs_f64();
    let json = serde_json::json!({
        "cases": s.cases, "seed": seed, "seconds": seconds, "accepted": s.accepted,
        "refused": s.refused, "failures": s.failures, "worst_alloc_ratio": s.worst_alloc_ratio,
        "accepted_per_target": s.per_target.iter().map(|p| p.0).collect::<Vec<_>>(),
        "targets": Target::ALL.iter().map(|t| t.name()).collect::<Vec<_>>(),
    });
    let out = repo_root().join("bench/results/fuzz.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    eprintln!("{json}");
    assert!(s.failures.is_empty(), "{}", s.failures.join("\n"));
}
