//! `compress distill` on a small random teacher and its 50%-magnitude-pruned
//! student: the held-out KL divergence against the teacher falls, every pruned
//! weight is still exactly zero, a run killed with SIGKILL after a checkpoint
//! resumes to the same bytes as an uninterrupted run, and bad input (zero
//! learning rate or budget, a quantized student, a loss that diverges) is an
//! error that leaves no output.

use e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Pair {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    student: PathBuf,
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let teacher = root.join("teacher.gguf");
    write_tiny_llama(&teacher, 2, 64, 11, &|_| 1.0);
    let student = root.join("student");
    let o = compress(&[
        "prune",
        &s(&teacher),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-o",
        &s(&student),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    Pair {
        _dir: dir,
        root,
        teacher,
        student,
    }
}

fn distill_args(p: &Pair, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "distill",
        "--teacher",
        &s(&p.teacher),
        "--student",
        &s(&p.student),
        "--text",
        &s(&asset("calib.txt")),
        "--tokens",
        "3072",
        "--seq",
        "64",
        "--batch",
        "2",
        "--lr",
        "3e-3",
        "-o",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    compress(&refs)
}

fn kld(model: &Path, base: &Path) -> f64 {
    let o = compress(&[
        "eval",
        &s(model),
        "--base",
        &s(base),
        "--text",
        &s(&eval_text()),
        "--ctx",
        "64",
        "--chunks",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["kld"]["mean"].as_f64().unwrap()
}

/// Every block linear of `a` is zero wherever `b`'s is.
fn zeros_kept(student: &Path, trained: &Path) -> (usize, usize) {
    let s = model::Model::open(student).unwrap();
    let t = model::Model::open(trained).unwrap();
    let (mut zeros, mut changed) = (0, 0);
    for name in s.tensor_names() {
        if !name.starts_with("blk.") || s.tensor_meta(&name).unwrap().1.len() != 2 {
            continue;
        }
        let a = s.tensor(&name).unwrap().to_f32().unwrap();
        let b = t.tensor(&name).unwrap().to_f32().unwrap();
        for (x, y) in a.iter().zip(&b) {
            if *x == 0.0 {
                assert_eq!(*y, 0.0, "{name}: a pruned weight came back");
                zeros += 1;
            } else if x != y {
                changed += 1;
            }
        }
    }
    (zeros, changed)
}

#[test]
fn distillation_lowers_the_kld_keeps_the_zeros_and_resumes_to_the_same_bytes() {
    let p = pair();
    let out = p.root.join("trained");
    let report = p.root.join("report.json");
    let o = run(&distill_args(&p, &out, &["--report", &s(&report)]));
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        !p.root.join("trained.ckpt").exists(),
        "checkpoints left behind"
    );

    let (before, after) = (kld(&p.student, &p.teacher), kld(&out, &p.teacher));
    println!("held-out KLD: student {before:.4}, distilled {after:.4}");
    assert!(after < 0.8 * before, "KLD {before} -> {after}");
    let (zeros, changed) = zeros_kept(&p.student, &out);
    assert!(zeros > 0 && changed > 0, "{zeros} zeros, {changed} changed");

    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let h = r["history"].as_array().unwrap();
    assert_eq!(h.len(), 24);
    assert!(r["masked_zeros"].as_u64().unwrap() as usize == zeros);
    assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);

    // The same run, killed with SIGKILL after its second checkpoint, then rerun.
    let out2 = p.root.join("resumed");
    let ckpt = p.root.join("resumed.ckpt");
    let args = distill_args(&p, &out2, &["--checkpoint-every", "4"]);
    let mut child = Command::new(bin()).args(&args).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let step = std::fs::read(ckpt.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["step"].as_u64());
        if step.is_some_and(|s| s >= 8) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out2.exists(),
        "an output appeared although the run was killed"
    );
    let o = run(&args);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("resuming from step"), "{text}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap(),
        "a resumed run wrote other weights than an uninterrupted one"
    );
}

#[test]
fn bad_distillation_input_is_refused_without_output() {
    let p = pair();
    let out = p.root.join("never");
    for (extra, want) in [
        (vec!["--lr", "0"], "--lr"),
        (vec!["--lr", "-0.001"], "--lr"),
        (vec!["--tokens", "0"], "--tokens"),
        (vec!["--reverse-kl", "1"], "--top-k 0"),
    ] {
        let mut args = distill_args(&p, &out, &[]);
        for pair in extra.chunks(2) {
            let i = args.iter().position(|a| a == pair[0]);
            match i {
                Some(i) => args[i + 1] = pair[1].to_owned(),
                None => args.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        let o = run(&args);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {text}");
        assert!(text.contains(want), "{extra:?}: {text}");
        assert!(!out.exists());
    }

    // A quantized student cannot be trained.
    let q8 = p.root.join("q8.gguf");
    let o = compress(&["quantize", &s(&p.teacher), "--type", "Q8_0", "-o", &s(&q8)]);
    assert!(o.status.success(), "{}", output_text(&o));
    let mut args = distill_args(&p, &out, &[]);
    let i = args.iter().position(|a| a == "--student").unwrap();
    args[i + 1] = s(&q8);
    let o = run(&args);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("quantized student"), "{text}");
    assert!(!out.exists());

    // A learning rate that blows the weights up: the loss becomes NaN, the step is
    // named, nothing is written.
    let mut args = distill_args(&p, &out, &["--clip", "0"]);
    let i = args.iter().position(|a| a == "--lr").unwrap();
    args[i + 1] = "1e30".into();
    let o = run(&args);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("at step"), "{text}");
    assert!(!out.exists(), "a diverged run wrote its output");
}
