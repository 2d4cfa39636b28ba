//! `compress run`, `validate` and `status`: a run killed with SIGKILL in the
//! middle of a stage resumes and produces the same bytes as an uninterrupted run
//! (on the real model); a finished recipe reruns as a no-op; shards I/N cover
//! the job list exactly once and `status` merges their manifests; a bad recipe
//! is refused with every problem and its line before any work.

use e2e::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn write_recipe(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every artifact file of every job manifest under `out`: job -> [(file name, sha256)].
fn artifact_hashes(out: &Path) -> Vec<(String, Vec<(String, String)>)> {
    let status = compress(&["status", &s(out), "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|_| panic!("status --json: {}", output_text(&status)));
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let files = m["artifacts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let p = Path::new(f["path"].as_str().unwrap());
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    (name, f["sha256"].as_str().unwrap().to_owned())
                })
                .collect();
            (m["job"]["name"].as_str().unwrap().to_owned(), files)
        })
        .collect()
}

/// The real model through two variants that share an imatrix and a calibration
/// text: a GGUF mix, and 2:4 Wanda pruning (an HF folder) quantized to Q8_0.
fn real_recipe(dir: &Path) -> PathBuf {
    write_recipe(
        dir,
        &format!(
            r#"
name = "resume"
output = "{out}"
[[model]]
name = "smollm2"
path = "{model}"
[calib]
text = "{calib}"
samples = 4
seq = 128
[eval]
text = "{eval}"
ctx = 128
chunks = 2
[gate]
max_kld = 5.0
[[variant]]
name = "q4_k_m"
stages = [{{ kind = "quantize", type = "Q4_K_M", imatrix = true }}]
[[variant]]
name = "s24-q8"
stages = [
  {{ kind = "prune", method = "wanda", nm = "2:4" }},
  {{ kind = "quantize", type = "Q8_0" }},
]
"#,
            out = s(&dir.join("unused")),
            model = s(&real_model()),
            calib = s(&asset("calib.txt")),
            eval = s(&eval_text()),
        ),
    )
}

#[test]
fn killed_run_resumes_to_the_same_bytes_and_a_finished_run_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = real_recipe(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    let first = compress(&["run", &s(&recipe), "--out", &s(&a)]);
    assert!(first.status.success(), "{}", output_text(&first));
    let reference = artifact_hashes(&a);
    assert_eq!(reference.len(), 2, "{reference:?}");
    assert!(a.join("smollm2/q4_k_m.gguf").is_file());
    assert!(a.join("smollm2/s24-q8.gguf").is_file());
    let junit = std::fs::read_to_string(a.join("smollm2/q4_k_m.junit.xml")).unwrap();
    assert!(junit.contains("<testcase"), "{junit}");

    // Second run into another folder, killed with SIGKILL while the GGUF
    // quantization of the first job is a third of the way through.
    let mut child = Command::new(bin())
        .args(["run", &s(&recipe), "--out", &s(&b), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut killed_at = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let ev: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if ev["event"] == "progress"
            && ev["stage"] == "stage 1 quantize"
            && ev["done"].as_u64().unwrap() >= 90
        {
            child.kill().unwrap();
            killed_at = Some(ev["done"].as_u64().unwrap());
            break;
        }
    }
    child.wait().unwrap();
    assert!(killed_at.is_some(), "the run ended before the kill");
    assert!(
        !b.join("smollm2/q4_k_m.gguf").exists(),
        "an artifact appeared although its stage was killed"
    );
    let stages = b.join(".stages");
    let names: Vec<String> = std::fs::read_dir(&stages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| !n.contains(".tmp-") && !n.ends_with(".lease"))
            .count(),
        1,
        "only the imatrix stage had finished: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with(".lease")),
        "the killed stage held no lease: {names:?}"
    );

    let resumed = compress(&["run", &s(&recipe), "--out", &s(&b)]);
    let text = output_text(&resumed);
    assert!(resumed.status.success(), "{text}");
    assert!(
        text.contains("stage 1a imatrix: done before"),
        "the finished imatrix stage was not reused:\n{text}"
    );
    // The killed run's lease names a process of this host that is gone: the
    // rerun clears it at once instead of waiting for it to go stale.
    assert!(
        text.contains("stage 1 quantize: cleared the stale lease of a run")
            && text.contains("on this host is gone"),
        "{text}"
    );
    assert!(
        !names
            .iter()
            .filter(|n| n.contains(".tmp-") || n.ends_with(".lease"))
            .any(|n| stages.join(n).exists()),
        "the killed stage's temporary folder or lease was left behind"
    );
    assert_eq!(
        artifact_hashes(&b),
        reference,
        "a resumed run wrote other bytes than an uninterrupted one"
    );

    // A finished recipe: nothing runs, nothing is rewritten.
    let manifest = a.join("smollm2/q4_k_m.manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let mtime = std::fs::metadata(a.join("smollm2/q4_k_m.gguf"))
        .unwrap()
        .modified()
        .unwrap();
    let again = compress(&["run", &s(&recipe), "--out", &s(&a)]);
    let text = output_text(&again);
    assert!(again.status.success(), "{text}");
    assert!(text.contains("nothing to do"), "{text}");
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    let mtime_after = std::fs::metadata(a.join("smollm2/q4_k_m.gguf"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, mtime_after);
    let m: Value = serde_json::from_slice(&before).unwrap();
    assert_eq!(m["status"], "passed");
    assert_eq!(
        m["inputs"][0]["files"][0]["sha256"].as_str().unwrap().len(),
        64
    );
    assert!(m["recipe"]["text"].as_str().unwrap().contains("Q4_K_M"));
    assert!(m["eval"]["kld"].as_f64().unwrap() > 0.0);
}

/// Two tiny random models × three GGUF mixes, evaluated: six quick jobs.
fn tiny_recipe(dir: &Path) -> PathBuf {
    for seed in [1, 2] {
        write_tiny_llama(&dir.join(format!("tiny{seed}.gguf")), 2, 64, seed, &|_| 1.0);
    }
    write_recipe(
        dir,
        &format!(
            r#"
output = "{out}"
[[model]]
path = "{m1}"
[[model]]
path = "{m2}"
[eval]
text = "{eval}"
ctx = 64
chunks = 1
[[variant]]
name = "q8_0"
stages = [{{ kind = "quantize", type = "Q8_0" }}]
[[variant]]
name = "q4_0"
stages = [{{ kind = "quantize", type = "Q4_0" }}]
[[variant]]
name = "q5_1"
stages = [{{ kind = "quantize", type = "Q5_1" }}]
"#,
            out = s(&dir.join("out")),
            m1 = s(&dir.join("tiny1.gguf")),
            m2 = s(&dir.join("tiny2.gguf")),
            eval = s(&eval_text()),
        ),
    )
}

#[test]
fn shards_cover_the_job_list_exactly_once_and_status_merges_them() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(dir.path());
    let out = dir.path().join("out");

    let mut listed = Vec::new();
    for i in 1..=3 {
        let o = compress(&[
            "run",
            &s(&recipe),
            "--shard",
            &format!("{i}/3"),
            "--list",
            "--json",
        ]);
        assert!(o.status.success(), "{}", output_text(&o));
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            listed.push((
                i,
                v["index"].as_u64().unwrap(),
                v["job"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let mut indices: Vec<u64> = listed.iter().map(|l| l.1).collect();
    indices.sort();
    assert_eq!(indices, (1..=6).collect::<Vec<_>>(), "{listed:?}");

    for i in 1..=2 {
        let o = compress(&["run", &s(&recipe), "--shard", &format!("{i}/3"), "--quiet"]);
        assert!(o.status.success(), "{}", output_text(&o));
        assert!(
            o.stdout.is_empty() && o.stderr.is_empty(),
            "--quiet printed:\n{}",
            output_text(&o)
        );
    }
    // Two shards done: status names the third shard's jobs as not run, exit 1.
    let partial = compress(&["status", &s(&out), "--recipe", &s(&recipe), "--json"]);
    assert_eq!(partial.status.code(), Some(1), "{}", output_text(&partial));
    let v: Value = serde_json::from_slice(&partial.stdout).unwrap();
    let mut missing: Vec<String> = v["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let mut third: Vec<String> = listed
        .iter()
        .filter(|l| l.0 == 3)
        .map(|l| l.2.clone())
        .collect();
    missing.sort();
    third.sort();
    assert_eq!(missing, third);

    let o = compress(&["run", &s(&recipe), "--shard", "3/3"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let full = compress(&["status", &s(&out), "--recipe", &s(&recipe), "--json"]);
    assert!(full.status.success(), "{}", output_text(&full));
    let v: Value = serde_json::from_slice(&full.stdout).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 6);
    assert!(v["missing"].as_array().unwrap().is_empty());
    for m in jobs {
        let name = m["job"]["name"].as_str().unwrap();
        let shard = listed.iter().find(|l| l.2 == name).unwrap().0;
        assert_eq!(m["shard"], format!("{shard}/3"), "{name}");
        assert_eq!(m["status"], "done");
        assert!(m["eval"]["ppl"].as_f64().unwrap().is_finite());
    }
    let table = compress(&["status", &s(&out)]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("6 manifests: 6 done"), "{text}");
    assert!(text.contains("tiny2/q5_1"), "{text}");
}

#[test]
fn a_bad_recipe_is_refused_with_every_problem_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let recipe = write_recipe(
        dir.path(),
        &format!(
            r#"output = "{out}"
[[model]]
name = "smollm2"
path = "{model}"
[[model]]
name = "missing"
path = "{dir}/no-such-model.gguf"
[eval]
chunks = "ten"
[gate]
max_kdl = 0.1
[[variant]]
name = "twice"
stages = [
  {{ kind = "quantize", type = "Q4_K_M" }},
  {{ kind = "quantize", type = "Q8_0" }},
]
[[variant]]
name = "typo"
stages = [{{ kind = "prune", sparsty = 0.5 }}]
[[variant]]
name = "later"
stages = [{{ kind = "distil" }}]
[[variant]]
name = "same"
path = "smollm2/twice.gguf"
stages = [{{ kind = "quantize", type = "Q5_K_M" }}]
"#,
            out = s(&out),
            model = s(&real_model()),
            dir = s(dir.path()),
        ),
    );
    for cmd in ["validate", "run"] {
        let o = compress(&[cmd, &s(&recipe)]);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        for (line, what) in [
            (7, "no such file"),
            (9, "must be an integer"),
            (11, "did you mean 'max_kld'"),
            (16, "quantize twice"),
            (20, "did you mean 'sparsity'"),
            (23, "did you mean 'distill'"),
            (26, "both write"),
        ] {
            let needle = format!("recipe.toml:{line}: ");
            assert!(
                text.lines()
                    .any(|l| l.contains(&needle) && l.contains(what)),
                "{cmd}: no '{what}' at line {line} in:\n{text}"
            );
        }
        assert!(
            !out.exists(),
            "{cmd} wrote {} for a bad recipe",
            out.display()
        );
    }
}

#[test]
fn the_example_recipes_validate() {
    for name in ["smollm2.toml", "batch.toml"] {
        let p = repo_root().join("examples").join(name);
        let o = compress(&["validate", &s(&p)]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("valid:"),
            "{}",
            output_text(&o)
        );
    }
}

#[test]
fn a_job_that_fails_is_recorded_and_the_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(&dir.path().join("tiny.gguf"), 2, 64, 3, &|_| 1.0);
    let out = dir.path().join("out");
    let recipe = write_recipe(
        dir.path(),
        &format!(
            r#"
output = "{out}"
[[model]]
path = "{model}"
[[variant]]
name = "bad"
stages = [{{ kind = "quantize", type = "Q8_0", tensor_type = ["no_such_tensor=Q4_0"] }}]
[[variant]]
name = "good"
stages = [{{ kind = "quantize", type = "Q8_0" }}]
"#,
            out = s(&out),
            model = s(&dir.path().join("tiny.gguf")),
        ),
    );
    let o = compress(&["run", &s(&recipe)]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("error: job tiny/bad"), "{text}");
    assert!(out.join("tiny/good.gguf").is_file(), "{text}");
    assert!(!out.join("tiny/bad.gguf").exists());
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("tiny/bad.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["status"], "failed");
    assert!(
        m["error"].as_str().unwrap().contains("no_such_tensor"),
        "{m}"
    );
    let st = compress(&["status", &s(&out)]);
    assert_eq!(st.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("1 done, 1 failed"),
        "{}",
        output_text(&st)
    );
    // No temporary folder of the failed stage is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(out.join(".stages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_distill_stage_trains_the_pruned_model_against_the_input_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, 2, 64, 4, &|_| 1.0);
    let out = dir.path().join("out");
    let recipe = write_recipe(
        dir.path(),
        &format!(
            r#"
output = "{out}"
[[model]]
path = "{model}"
[calib]
text = "{calib}"
[eval]
text = "{eval}"
ctx = 64
chunks = 4
[[variant]]
name = "pruned"
stages = [{{ kind = "prune", method = "magnitude", sparsity = 0.5 }}]
[[variant]]
name = "distilled"
stages = [
  {{ kind = "prune", method = "magnitude", sparsity = 0.5 }},
  {{ kind = "distill", tokens = 2048, seq = 64, batch = 2, lr = 3e-3 }},
  {{ kind = "quantize", type = "Q8_0" }},
]
"#,
            out = s(&out),
            model = s(&model),
            calib = s(&asset("calib.txt")),
            eval = s(&eval_text()),
        ),
    );
    let o = compress(&["run", &s(&recipe)]);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    let read = |name: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(out.join(format!("tiny/{name}.manifest.json"))).unwrap(),
        )
        .unwrap()
    };
    let (pruned, distilled) = (read("pruned"), read("distilled"));
    let stages = distilled["stages"].as_array().unwrap();
    assert!(
        stages[0]["cached"].as_bool().unwrap(),
        "the shared prune stage ran twice"
    );
    let cmd: Vec<&str> = stages[1]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cmd[1], "distill");
    assert!(
        cmd.windows(2)
            .any(|w| w[0] == "--teacher" && w[1] == s(&model)),
        "{cmd:?}"
    );
    // The distill stage's own report: the input model was its teacher, 16 steps ran.
    let folder = Path::new(stages[1]["folder"].as_str().unwrap());
    let report: Value =
        serde_json::from_slice(&std::fs::read(folder.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], 16);
    assert_eq!(report["teacher"], s(&model));
    assert!(pruned["eval"]["kld"].as_f64().unwrap() > 0.0);
    assert!(distilled["eval"]["kld"].as_f64().unwrap().is_finite());
    let keep: Vec<_> = std::fs::read_dir(out.join(".stages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".keep"))
        .collect();
    assert!(keep.is_empty(), "checkpoints left behind: {keep:?}");
}

/// One tiny model through two GGUF mixes that share one collected imatrix.
fn shared_imatrix_recipe(dir: &Path, name: &str) -> PathBuf {
    write_tiny_llama(&dir.join("tiny.gguf"), 2, 64, 3, &|_| 1.0);
    write_recipe(
        dir,
        &format!(
            r#"
name = "{name}"
output = "{out}"
[[model]]
path = "{model}"
[calib]
text = "{text}"
samples = 4
seq = 32
[eval]
text = "{text}"
ctx = 64
chunks = 1
[[variant]]
name = "q4_0"
stages = [{{ kind = "quantize", type = "Q4_0", imatrix = true }}]
[[variant]]
name = "q5_1"
stages = [{{ kind = "quantize", type = "Q5_1", imatrix = true }}]
"#,
            out = s(&dir.join("out")),
            model = s(&dir.join("tiny.gguf")),
            text = s(&eval_text()),
        ),
    )
}

/// The stage lease as another host's process would write it.
fn foreign_lease(beat: u64) -> String {
    serde_json::json!({"host": "elsewhere", "pid": 1, "shard": "9/9", "slurm": null,
        "job": "x/y", "stage": "stage 1a imatrix", "token": "elsewhere-1-0", "beat": beat})
    .to_string()
}

#[test]
fn shards_compute_a_shared_stage_once_and_take_over_a_silent_lease() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = shared_imatrix_recipe(dir.path(), "shared");
    let out = dir.path().join("out");

    // The plan: two jobs, two shards (one job each, from the recipe), one
    // imatrix both need.
    let o = compress(&["run", &s(&recipe), "--plan", "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["shards"], 2);
    let stages = plan["stages"].as_array().unwrap();
    let imatrix = stages.iter().find(|s| s["kind"] == "imatrix").unwrap();
    assert_eq!(imatrix["jobs"], serde_json::json!([1, 2]));
    assert_eq!(imatrix["races"], serde_json::json!([1, 2]));
    assert_eq!(
        stages.len(),
        5,
        "one imatrix, two quantize, two eval: {plan:#}"
    );
    let key = imatrix["key"].as_str().unwrap().to_owned();
    let text = compress(&["run", &s(&recipe), "--plan"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("2 jobs in 2 shards"), "{text}");
    assert!(text.contains("shards 1, 2 race for it"), "{text}");

    // Another host holds the imatrix's lease and beats: both shards wait.
    let stages_dir = out.join(".stages");
    std::fs::create_dir_all(&stages_dir).unwrap();
    let lease = stages_dir.join(format!("{key}.lease"));
    std::fs::write(&lease, foreign_lease(0)).unwrap();
    let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beater = {
        let (beating, lease) = (beating.clone(), lease.clone());
        std::thread::spawn(move || {
            let mut beat = 0;
            while beating.load(std::sync::atomic::Ordering::SeqCst) {
                beat += 1;
                std::fs::write(&lease, foreign_lease(beat)).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };
    let shard = |i: usize| {
        let log = std::fs::File::create(dir.path().join(format!("shard{i}.log"))).unwrap();
        Command::new(bin())
            .args(["run", &s(&recipe), "--shard", &i.to_string()])
            .env("COMPRESS_LEASE_BEAT_S", "0.1")
            .env("COMPRESS_LEASE_STALE_S", "1.5")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut children = [shard(1), shard(2)];
    let log = |i: usize| std::fs::read_to_string(dir.path().join(format!("shard{i}.log"))).unwrap();
    let start = std::time::Instant::now();
    while !(1..=2).all(|i| log(i).contains("being computed by shard 9/9 (host elsewhere, pid 1)")) {
        assert!(
            start.elapsed().as_secs() < 60,
            "the shards do not wait for the lease:\n{}\n{}",
            log(1),
            log(2)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Longer than the stale time: a beating holder is waited for, however long.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        !stages_dir.join(&key).exists(),
        "computed under a live lease"
    );
    for c in &mut children {
        assert!(c.try_wait().unwrap().is_none(), "a shard stopped waiting");
    }

    // The holder dies silently: one shard takes the lease over and computes the
    // imatrix, the other waits for that shard and reuses its output.
    beating.store(false, std::sync::atomic::Ordering::SeqCst);
    beater.join().unwrap();
    for c in &mut children {
        let status = c.wait().unwrap();
        assert!(status.success(), "{}\n{}", log(1), log(2));
    }
    let logs = [log(1), log(2)];
    let both = format!("{}\n{}", logs[0], logs[1]);
    // Either may clear the stale lease; the one that then takes it computes.
    assert!(
        both.contains("cleared the stale lease of shard 9/9 (host elsewhere, pid 1): no heartbeat"),
        "{both}"
    );
    let computing: Vec<usize> = (0..2)
        .filter(|&i| logs[i].contains("stage 1a imatrix: running"))
        .collect();
    assert_eq!(computing.len(), 1, "{both}");
    let (winner, waiter) = (computing[0] + 1, 2 - computing[0]);
    assert!(
        logs[waiter - 1].contains(&format!("stage 1a imatrix: computed by shard {winner}/2"))
            && logs[waiter - 1].contains("reused after waiting"),
        "{both}"
    );
    assert!(!lease.exists(), "the lease outlived its stage");
    let status = compress(&["status", &s(&out), "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).unwrap();
    let mut computed = 0;
    for m in v["jobs"].as_array().unwrap() {
        let rec = m["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key.as_str())
            .unwrap();
        assert_eq!(
            rec["computed_by"]["shard"],
            format!("{winner}/2"),
            "{rec:#}"
        );
        if rec["cached"] == false {
            computed += 1;
        } else {
            assert!(rec["waited_s"].as_f64().unwrap() > 0.0, "{rec:#}");
        }
    }
    assert_eq!(computed, 1, "the shared imatrix must be computed once");

    // The same bytes as one machine running the whole recipe.
    let single = tempfile::tempdir().unwrap();
    let recipe2 = shared_imatrix_recipe(single.path(), "shared");
    let o = compress(&["run", &s(&recipe2), "--quiet"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let names = |out: &Path| {
        let mut v: Vec<Vec<String>> = artifact_hashes(out)
            .into_iter()
            .map(|(job, files)| {
                std::iter::once(job)
                    .chain(files.into_iter().map(|f| f.1))
                    .collect()
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&out), names(&single.path().join("out")));

    // A shard beyond the recipe's count, and a second recipe into the same
    // folder, are refused before any work.
    let o = compress(&["run", &s(&recipe), "--shard", "3"]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("--shard 3: the recipe has 2 shards"),
        "{}",
        output_text(&o)
    );
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = shared_imatrix_recipe(&other_dir, "another");
    let o = compress(&["run", &s(&other), "--out", &s(&out)]);
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("holds the outputs of recipe 'shared'"),
        "{}",
        output_text(&o)
    );
}
