//! Kill -9 anywhere, lose nothing (issue 21 point 3). Every command that writes
//! is run once to the end for reference bytes, then killed with SIGKILL at
//! seeded moments spread over its run, and after each kill:
//! - every file under an output's final name is byte-identical to the
//!   reference (nothing partial or corrupt ever appears there);
//! - the inputs are unchanged;
//! - rerunning the same command gives the reference bytes and leaves no
//!   temporary file behind.
//!
//! Files whose content is a report of the run itself (wall times, peak memory)
//! are compared with those fields removed.

use e2e::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every file under `path` (itself if a file), by path relative to `root`.
fn files_under(root: &Path, path: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            files_under(root, &e.unwrap().path(), out);
        }
    } else if path.is_file() && path.extension().is_none_or(|e| e != "txt" && e != "log") {
        // (A stage's log names its temporary folder: not compared.)
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        out.insert(rel, normalised(path));
    }
}

/// A file's bytes, with a JSON report's timing and memory fields removed.
fn normalised(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    if path.extension().is_some_and(|e| e == "json") {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            strip_volatile(&mut v);
            return v.to_string().into_bytes();
        }
    }
    if path.extension().is_some_and(|e| e == "md" || e == "html") {
        return without_durations(&String::from_utf8(bytes).unwrap()).into_bytes();
    }
    bytes
}

/// `text` with every duration ("1.0 s", "0.93 s") replaced by "_ s".
fn without_durations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || (c == '.' && !number.is_empty()) {
            number.push(c);
            continue;
        }
        if !number.is_empty() {
            let rest: String = chars.clone().take(1).collect();
            if c == ' ' && rest == "s" {
                out.push('_');
            } else {
                out.push_str(&number);
            }
            number.clear();
        }
        out.push(c);
    }
    out.push_str(&number);
    out
}

fn strip_volatile(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| {
                ![
                    "seconds",
                    "rss",
                    "timings",
                    "time",
                    "elapsed",
                    "tokens_per_second",
                    "unix",
                    "cached",
                    // Which process computed a stage and how long others waited.
                    "computed_by",
                    "waited",
                ]
                .iter()
                .any(|w| k.contains(w))
            });
            m.values_mut().for_each(strip_volatile);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

/// Leftover temporary files (`NAME.tmp-PID`, `.tmp*` folders) under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.contains(".tmp") {
                found.push(p.clone());
            }
            if p.is_dir() {
                found.extend(temporaries(&p));
            }
        }
    }
    found
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Outputs (files or folders) inside the work folder.
    outputs: Vec<PathBuf>,
}

fn snapshot(work: &Path, outputs: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for o in outputs {
        files_under(work, o, &mut files);
    }
    files
}

fn remove_outputs(outputs: &[PathBuf]) {
    for o in outputs {
        let _ = std::fs::remove_dir_all(o);
        let _ = std::fs::remove_file(o);
    }
}

fn run_to_end(c: &Case) -> Duration {
    let start = Instant::now();
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let o = compress(&args);
    assert!(o.status.success(), "{}: {}", c.name, output_text(&o));
    start.elapsed()
}

fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    [head, tail].concat()
}

/// Where two byte strings first differ, with some context.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let i = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let around = |v: &[u8]| {
        String::from_utf8_lossy(&v[i.saturating_sub(80)..(i + 80).min(v.len())]).to_string()
    };
    format!("at byte {i}: {:?} vs {:?}", around(a), around(b))
}

/// splitmix64, for seeded kill moments.
fn next(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

#[test]
fn every_writing_command_survives_kill_9_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_path_buf();
    let p = |n: &str| work.join(n);
    let teacher = p("tiny.gguf");
    write_tiny_llama(&teacher, 2, 64, 21, &|_| 1.0);
    let calib = s(&asset("calib.txt"));
    let text = s(&eval_text());
    let t = s(&teacher);
    // The distillation student: made once, an input of the distill case.
    let student = p("student.gguf");
    let o = compress(&[
        "prune",
        &t,
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-o",
        &s(&student),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let recipe = p("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"
output = "{out}"
[[model]]
path = "{t}"
[calib]
text = "{calib}"
samples = 4
seq = 64
[eval]
text = "{text}"
ctx = 64
chunks = 1
[[variant]]
name = "q4_k_m"
stages = [{{ kind = "quantize", type = "Q4_K_M", imatrix = true }}]
[[variant]]
name = "wanda-q4_0"
stages = [{{ kind = "prune", method = "wanda", sparsity = 0.5 }}, {{ kind = "quantize", type = "Q4_0" }}]
"#,
            out = s(&p("run-out")),
        ),
    )
    .unwrap();
    let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cal = ["--calib", &calib, "--samples", "8", "--seq", "64"];
    let cases = vec![
        Case {
            name: "convert",
            args: args(&[
                "convert",
                &t,
                "-o",
                &s(&p("conv/model.safetensors")),
                "--dtype",
                "bf16",
            ]),
            outputs: vec![p("conv")],
        },
        Case {
            name: "imatrix",
            args: args(&[
                "imatrix",
                &t,
                "--text",
                &calib,
                "--chunks",
                "24",
                "-o",
                &s(&p("imx.gguf")),
            ]),
            outputs: vec![p("imx.gguf")],
        },
        Case {
            name: "quantize Q4_K_M",
            args: args(&[
                "quantize",
                &t,
                "--type",
                "Q4_K_M",
                "-o",
                &s(&p("q4km.gguf")),
            ]),
            outputs: vec![p("q4km.gguf")],
        },
        Case {
            name: "quantize --target-bpw",
            args: args(&[
                "quantize",
                &t,
                "--target-bpw",
                "6.0",
                "-o",
                &s(&p("bpw.gguf")),
            ]),
            outputs: vec![p("bpw.gguf")],
        },
        Case {
            name: "quantize gptq folder",
            args: args(&with(
                &[
                    "quantize",
                    &t,
                    "--method",
                    "gptq",
                    "--bits",
                    "4",
                    "--group",
                    "64",
                    "-o",
                    &s(&p("gptq")),
                ],
                &cal,
            )),
            outputs: vec![p("gptq")],
        },
        Case {
            name: "quantize gptq compressed-tensors",
            args: args(&with(
                &[
                    "quantize",
                    &t,
                    "--method",
                    "gptq",
                    "--bits",
                    "4",
                    "--group",
                    "64",
                    "--format",
                    "compressed-tensors",
                    "-o",
                    &s(&p("ct")),
                ],
                &cal,
            )),
            outputs: vec![p("ct")],
        },
        Case {
            name: "quantize awq GGUF",
            args: args(&with(
                &[
                    "quantize",
                    &t,
                    "--method",
                    "awq",
                    "--type",
                    "Q4_0",
                    "-o",
                    &s(&p("awq.gguf")),
                ],
                &cal,
            )),
            outputs: vec![p("awq.gguf")],
        },
        Case {
            name: "quantize rtn",
            args: args(&with(
                &[
                    "quantize",
                    &t,
                    "--method",
                    "rtn",
                    "--bits",
                    "4",
                    "--group",
                    "64",
                    "-o",
                    &s(&p("rtn")),
                ],
                &cal,
            )),
            outputs: vec![p("rtn")],
        },
        Case {
            name: "prune sparsegpt",
            args: args(&with(
                &[
                    "prune",
                    &t,
                    "--method",
                    "sparsegpt",
                    "--sparsity",
                    "0.5",
                    "-o",
                    &s(&p("sgpt.gguf")),
                ],
                &cal,
            )),
            outputs: vec![p("sgpt.gguf")],
        },
        Case {
            name: "prune wanda 2:4 compressed-tensors",
            args: args(&with(
                &[
                    "prune",
                    &t,
                    "--method",
                    "wanda",
                    "--nm",
                    "2:4",
                    "--format",
                    "compressed-tensors",
                    "-o",
                    &s(&p("wanda")),
                ],
                &cal,
            )),
            outputs: vec![p("wanda")],
        },
        Case {
            name: "prune --ffn",
            args: args(&[
                "prune",
                &t,
                "--ffn",
                "0.25",
                "--calib",
                &calib,
                "-o",
                &s(&p("ffn")),
            ]),
            outputs: vec![p("ffn")],
        },
        Case {
            name: "distill",
            args: args(&[
                "distill",
                "--teacher",
                &t,
                "--student",
                &s(&student),
                "--text",
                &calib,
                "--tokens",
                "4096",
                "--seq",
                "64",
                "--batch",
                "2",
                "--lr",
                "1e-3",
                "--checkpoint-every",
                "4",
                "-o",
                &s(&p("distilled.gguf")),
            ]),
            outputs: vec![p("distilled.gguf"), p("distilled.gguf.ckpt")],
        },
        Case {
            name: "sensitivity",
            args: args(&[
                "sensitivity",
                &t,
                "--calib",
                &calib,
                "--text",
                &text,
                "--types",
                "Q4_0,Q2_K",
                "--ctx",
                "64",
                "--chunks",
                "1",
                "-o",
                &s(&p("sens/r.json")),
            ]),
            outputs: vec![p("sens")],
        },
        Case {
            name: "run",
            args: args(&["run", &s(&recipe), "--quiet"]),
            outputs: vec![p("run-out")],
        },
    ];
    let inputs = [teacher.clone(), student.clone(), recipe.clone()];
    let input_bytes: Vec<Vec<u8>> = inputs.iter().map(|i| std::fs::read(i).unwrap()).collect();
    let mut rng = 21u64;
    let (mut kills, mut mid_run) = (0, 0);
    for c in &cases {
        remove_outputs(&c.outputs);
        let took = run_to_end(c);
        let reference = snapshot(&work, &c.outputs);
        assert!(!reference.is_empty(), "{}: no output", c.name);
        for point in 0..3 {
            remove_outputs(&c.outputs);
            // Spread over the run, one kill point in each third.
            let at = took.mul_f64((point as f64 + next(&mut rng)) / 3.0);
            let mut child = Command::new(bin())
                .args(&c.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(at);
            let finished = child.try_wait().unwrap().is_some();
            child.kill().ok();
            child.wait().unwrap();
            kills += 1;
            mid_run += usize::from(!finished);
            for (rel, bytes) in snapshot(&work, &c.outputs) {
                let name = rel.to_string_lossy();
                if name.contains(".tmp")
                    || name.ends_with(".lease")
                    || rel.starts_with("distilled.gguf.ckpt")
                {
                    // Temporaries, checkpoints and a stage's lease (cleared by
                    // the rerun: the snapshot after it must equal the reference)
                    // are not final names.
                    continue;
                }
                // A job manifest records a run in progress (its status and
                // finished stages, rewritten atomically as each ends): after a
                // kill it must be whole JSON, not yet the final record.
                if rel.to_string_lossy().ends_with(".manifest.json") {
                    assert!(
                        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
                        "{} killed at {at:?}: {} is not whole JSON",
                        c.name,
                        rel.display()
                    );
                    continue;
                }
                match reference.get(&rel) {
                    Some(want) => assert!(
                        *want == bytes,
                        "{} killed at {at:?}: {} differs from the uninterrupted run's: {}",
                        c.name,
                        rel.display(),
                        first_difference(want, &bytes)
                    ),
                    None => panic!(
                        "{} killed at {at:?}: {} is not an output",
                        c.name,
                        rel.display()
                    ),
                }
            }
            for (i, want) in inputs.iter().zip(&input_bytes) {
                assert!(
                    std::fs::read(i).unwrap() == *want,
                    "{}: input {} changed",
                    c.name,
                    i.display()
                );
            }
            // The rerun (resuming where the command resumes) ends with the
            // reference bytes and no temporary file.
            run_to_end(c);
            let again = snapshot(&work, &c.outputs);
            assert_eq!(
                again.keys().collect::<Vec<_>>(),
                reference.keys().collect::<Vec<_>>(),
                "{} after a kill at {at:?}",
                c.name
            );
            for (rel, want) in &reference {
                assert!(
                    again[rel] == *want,
                    "{} rerun after a kill at {at:?}: {} differs: {}",
                    c.name,
                    rel.display(),
                    first_difference(want, &again[rel])
                );
            }
            let left: Vec<_> = c
                .outputs
                .iter()
                .flat_map(|o| temporaries(o.parent().unwrap()))
                .collect();
            assert!(left.is_empty(), "{} rerun left {left:?}", c.name);
        }
    }
    eprintln!("{kills} kills, {mid_run} while the command was running");
    assert!(
        mid_run >= 20,
        "only {mid_run} of {kills} kills landed mid-run"
    );
}
