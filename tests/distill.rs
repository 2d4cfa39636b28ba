//! `compress distill` on a small random teacher and its 50%-magnitude-pruned
//! student: the held-out KL divergence against the teacher falls, every pruned
//! weight is still exactly zero, a run killed with SIGKILL after a checkpoint
//! resumes to the same bytes as an uninterrupted run, and bad input (zero
//! learning rate or budget, a quantized student without a GGUF output, a loss
//! that diverges, unmappable hidden states) is an error that leaves no output.
//! Also: low-rank adapters merged at the end, a Q4_0 student trained through
//! its codec and written back in its types (read by gguf-py), and the
//! hidden-state loss on a depth-pruned student with its automatic block map.

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

    // A quantized student is written back in its types: a folder cannot hold it.
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
    assert!(text.contains(".gguf output"), "{text}");
    assert!(!out.exists());

    // Adapters on a quantized student are refused.
    let out_gguf = p.root.join("never.gguf");
    let mut args = distill_args(&p, &out_gguf, &["--train", "lora"]);
    let i = args.iter().position(|a| a == "--student").unwrap();
    args[i + 1] = s(&q8);
    let o = run(&args);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("adapters on a quantized student"), "{text}");
    assert!(!out_gguf.exists());

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

#[test]
fn adapters_train_merge_into_the_weights_and_keep_the_zeros() {
    let p = pair();
    let out = p.root.join("lora");
    let report = p.root.join("lora.json");
    let o = run(&distill_args(
        &p,
        &out,
        &[
            "--train",
            "lora",
            "--lora-rank",
            "4",
            "--report",
            &s(&report),
        ],
    ));
    assert!(o.status.success(), "{}", output_text(&o));
    let (before, after) = (kld(&p.student, &p.teacher), kld(&out, &p.teacher));
    println!("held-out KLD: student {before:.4}, adapters merged {after:.4}");
    assert!(after < 0.9 * before, "KLD {before} -> {after}");
    let (zeros, changed) = zeros_kept(&p.student, &out);
    assert!(zeros > 0 && changed > 0, "{zeros} zeros, {changed} changed");
    // Rank 4 on the 7 linears of 2 blocks of width 64 (FFN 128, 4 heads of 16
    // sharing 2 K/V heads): r·(in + out) values each.
    let per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3);
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(
        r["trained_values"].as_u64().unwrap() as usize,
        2 * per_block
    );
    // The embedding and norms did not train.
    let (a, b) = (
        model::Model::open(&p.student).unwrap(),
        model::Model::open(&out).unwrap(),
    );
    for name in [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "output_norm.weight",
    ] {
        assert_eq!(
            a.tensor(name).unwrap().to_f32().unwrap(),
            b.tensor(name).unwrap().to_f32().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn a_quantized_student_trains_through_its_codec_and_keeps_its_types() {
    // The 50%-pruned student quantized to Q4_0 (whose zeros stay exact zeros).
    let p = pair();
    let q4 = p.root.join("q4.gguf");
    let o = compress(&["quantize", &s(&p.student), "--type", "Q4_0", "-o", &s(&q4)]);
    assert!(o.status.success(), "{}", output_text(&o));
    let out = p.root.join("q4-distilled.gguf");
    let report = p.root.join("q4.json");
    // The codec re-encodes every tensor after each update, so a step that moves
    // the masters too far reshuffles the grid: a low learning rate.
    let mut args = distill_args(&p, &out, &["--train", "blocks", "--report", &s(&report)]);
    let i = args.iter().position(|a| a == "--student").unwrap();
    args[i + 1] = s(&q4);
    let i = args.iter().position(|a| a == "--lr").unwrap();
    args[i + 1] = "1e-3".into();
    let o = run(&args);
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("through their codecs"), "{text}");
    let (before, after) = (kld(&q4, &p.teacher), kld(&out, &p.teacher));
    println!("held-out KLD: Q4_0 student {before:.4}, distilled through its codec {after:.4}");
    assert!(after < 0.95 * before, "KLD {before} -> {after}");
    let (zeros, changed) = zeros_kept(&q4, &out);
    assert!(zeros > 0 && changed > 0, "{zeros} zeros, {changed} changed");

    let (a, b) = (
        model::Model::open(&q4).unwrap(),
        model::Model::open(&out).unwrap(),
    );
    let mut retrained = 0;
    for name in a.tensor_names() {
        let (ta, tb) = (a.tensor(&name).unwrap(), b.tensor(&name).unwrap());
        assert_eq!((ta.ty, &ta.shape), (tb.ty, &tb.shape), "{name}");
        if name.starts_with("blk.") {
            retrained += usize::from(ta.data != tb.data);
        } else if name != "output_norm.weight" {
            assert_eq!(ta.data, tb.data, "{name} did not train but changed");
        }
    }
    assert!(retrained >= 14, "only {retrained} block tensors changed");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(r["quantized_tensors"].as_u64().unwrap() >= 14);
    check_gguf_with_gguf_py(
        &out,
        &["blk.0.attn_q.weight", "blk.1.ffn_down.weight"],
        &p.root.join("dump"),
    );
}

#[test]
fn the_hidden_state_loss_maps_a_depth_pruned_students_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let teacher = root.join("teacher.gguf");
    write_tiny_llama(&teacher, 4, 64, 12, &|_| 1.0);
    let student = root.join("student");
    let o = compress(&["prune", &s(&teacher), "--layers", "1", "-o", &s(&student)]);
    assert!(o.status.success(), "{}", output_text(&o));
    let p = Pair {
        _dir: dir,
        root: root.clone(),
        teacher: teacher.clone(),
        student: student.clone(),
    };
    let out = root.join("hidden");
    let report = root.join("hidden.json");
    let o = run(&distill_args(
        &p,
        &out,
        &["--hidden", "1", "--report", &s(&report)],
    ));
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("hidden-state loss on student:teacher blocks"),
        "{text}"
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let map: Vec<(usize, usize)> = r["layer_map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    // Each student block is a copy of one teacher block: the automatic map
    // pairs it with that block.
    let (tm, sm) = (
        model::Model::open(&teacher).unwrap(),
        model::Model::open(&student).unwrap(),
    );
    let source = |s: usize| {
        let w = sm
            .tensor(&format!("blk.{s}.attn_q.weight"))
            .unwrap()
            .to_f32()
            .unwrap();
        (0..4)
            .find(|t| {
                tm.tensor(&format!("blk.{t}.attn_q.weight"))
                    .unwrap()
                    .to_f32()
                    .unwrap()
                    == w
            })
            .expect("a source block")
    };
    assert_eq!(map, (0..3).map(|s| (s, source(s))).collect::<Vec<_>>());
    assert!(r["history"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["hidden"].as_f64().is_some()));
    let (before, after) = (kld(&student, &teacher), kld(&out, &teacher));
    println!("held-out KLD: 3-of-4-block student {before:.4}, with hidden-state loss {after:.4}");
    assert!(after < before, "KLD {before} -> {after}");

    // The hidden-state loss alone falls (the 50%-pruned student of the same
    // depth, last block against last block).
    let pruned = pair();
    let out = root.join("hidden-only");
    let o = run(&distill_args(
        &pruned,
        &out,
        &[
            "--kl",
            "0",
            "--hidden",
            "1",
            "--layer-map",
            "1:1",
            "--report",
            &s(&report),
        ],
    ));
    assert!(o.status.success(), "{}", output_text(&o));
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let h = r["history"].as_array().unwrap();
    let (first, last) = (
        h[0]["hidden"].as_f64().unwrap(),
        h[h.len() - 1]["hidden"].as_f64().unwrap(),
    );
    println!("hidden-state loss after the last block: {first:.4} -> {last:.4}");
    assert!(
        first > 0.0 && last < 0.8 * first,
        "hidden-state loss {first} -> {last}"
    );

    // An explicit map out of range, and hidden states of another width.
    let never = root.join("never");
    let o = run(&distill_args(
        &p,
        &never,
        &["--hidden", "1", "--layer-map", "0:0,3:3"],
    ));
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("the student has 3 blocks"), "{text}");
    let narrow = root.join("narrow");
    let o = compress(&["prune", &s(&teacher), "--width", "0.25", "-o", &s(&narrow)]);
    assert!(o.status.success(), "{}", output_text(&o));
    let p2 = Pair {
        _dir: tempfile::tempdir().unwrap(),
        root: root.clone(),
        teacher,
        student: narrow,
    };
    let o = run(&distill_args(&p2, &never, &["--hidden", "1"]));
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("hidden size"), "{text}");
    assert!(!never.exists());
}
