//! Mixture-of-experts descriptions against an independent implementation: tiny
//! random-weight Qwen3-MoE, Mixtral and OLMoE models made by HF transformers
//! (`scripts/make-moe-fixtures.py`, committed under `tests/fixtures/moe/`), read
//! from their HF folders (one tensor per expert) and from the GGUF files
//! llama.cpp's own `convert_hf_to_gguf.py` made of them (experts stacked). Our
//! logits must match transformers' to 1e-4 of the largest logit on an input
//! that routes a token to every expert and on one that leaves some expert
//! without any, and the tokens we route to each expert must be the ones
//! transformers' router chose.

use e2e::{compress, output_text, rel_max_error, repo_root};
use model::safetensors_file::SafetensorsSet;
use model::Model;
use std::path::{Path, PathBuf};

const MOE: [&str; 3] = ["qwen3_moe", "mixtral", "olmoe"];

/// Every mixture-of-experts fixture we read: [`MOE`], Llama 4 (dense and
/// expert blocks interleaved, a shared expert, input-weighted routing, fused
/// HF experts) and DeepSeek-V3 (latent attention, a leading dense block,
/// group-limited sigmoid routing with a correction bias, a shared expert).
const ALL_MOE: [&str; 5] = ["qwen3_moe", "mixtral", "olmoe", "llama4", "deepseek_v3"];

/// The fixtures whose experts can be cut and that have GPTQ folders: all but
/// DeepSeek-V3, whose expert groups of 2 cannot lose an expert and whose
/// `kv_b_proj` HF fuses across heads (its calibration walk is checked by
/// `latent_attention_calibrates_per_head`).
const CALIBRATED: [&str; 4] = ["qwen3_moe", "mixtral", "olmoe", "llama4"];

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/moe").join(name)
}

/// Tensor `key` of fixture `name`'s reference file as 32-bit words.
fn reference_words(name: &str, key: &str) -> Vec<[u8; 4]> {
    let set = SafetensorsSet::open(&fixture(name).join("reference.safetensors")).unwrap();
    let (_, bytes) = set.get(key).unwrap_or_else(|| panic!("{name}: no '{key}'"));
    bytes
        .chunks_exact(4)
        .map(|b| b.try_into().unwrap())
        .collect()
}

fn reference_ints(name: &str, key: &str) -> Vec<usize> {
    reference_words(name, key)
        .into_iter()
        .map(|b| i32::from_le_bytes(b) as usize)
        .collect()
}

fn reference_floats(name: &str, key: &str) -> Vec<f32> {
    reference_words(name, key)
        .into_iter()
        .map(f32::from_le_bytes)
        .collect()
}

/// The two inputs: (tokens key, logits key, counts key).
const INPUTS: [(&str, &str, &str); 2] = [
    ("tokens", "logits", "expert_token_counts"),
    (
        "tokens_starved",
        "logits_starved",
        "expert_token_counts_starved",
    ),
];

#[test]
fn logits_match_transformers_from_hf_and_from_llama_cpp_gguf() {
    for name in ALL_MOE {
        for path in [fixture(name), fixture(name).join("model.gguf")] {
            let model = Model::open(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert_eq!(model.config.arch.name, name, "{}", path.display());
            for (tokens_key, logits_key, _) in INPUTS {
                let tokens: Vec<u32> = reference_ints(name, tokens_key)
                    .into_iter()
                    .map(|t| t as u32)
                    .collect();
                let got = model.logits(&tokens, 0).unwrap();
                let err = rel_max_error(&got, &reference_floats(name, logits_key));
                eprintln!(
                    "{} {tokens_key}: max error / max logit = {err:.2e}",
                    path.display()
                );
                assert!(err < 1e-4, "{} {tokens_key}: {err:e}", path.display());
            }
        }
    }
}

/// Tokens per expert of every expert block: the router run on the MLP's input as the
/// forward pass computes it, routed by the inference path's own
/// [`Model::expert_routes`].
fn expert_token_counts(model: &Model, tokens: &[u32]) -> Vec<Vec<usize>> {
    let c = &model.config;
    let m = c.moe.as_ref().expect("a mixture of experts");
    let n = tokens.len();
    let mut x = model.embed(tokens).unwrap();
    let mut counts = Vec::new();
    for layer in 0..c.num_hidden_layers {
        let w = model.block_weights(layer).unwrap();
        let mut cursor = model.block_start(&w, x, n);
        // Attention and its output projection: the cursor then holds the MLP input.
        model.block_step(&w, &mut cursor).unwrap();
        model.block_step(&w, &mut cursor).unwrap();
        // Dense blocks (Llama 4's) route nothing.
        if let Some(router) = &w.router {
            let routes = model
                .expert_routes(router, w.router_bias.as_deref(), cursor.input(), n)
                .unwrap();
            let mut per_expert = vec![0; m.experts];
            for (e, _) in routes {
                per_expert[e] += 1;
            }
            counts.push(per_expert);
        }
        model.block_step(&w, &mut cursor).unwrap();
        model.block_step(&w, &mut cursor).unwrap();
        x = cursor.into_residual();
    }
    counts
}

#[test]
fn every_expert_gets_the_tokens_transformers_routes_to_it() {
    for name in ALL_MOE {
        for path in [fixture(name), fixture(name).join("model.gguf")] {
            let model = Model::open(&path).unwrap();
            for (tokens_key, _, counts_key) in INPUTS {
                let tokens: Vec<u32> = reference_ints(name, tokens_key)
                    .into_iter()
                    .map(|t| t as u32)
                    .collect();
                let ours: Vec<usize> = expert_token_counts(&model, &tokens).concat();
                let theirs = reference_ints(name, counts_key);
                assert_eq!(ours, theirs, "{} {tokens_key}", path.display());
                if tokens_key == "tokens" {
                    assert!(
                        ours.iter().all(|&c| c > 0),
                        "{name}: an expert got no token"
                    );
                } else {
                    assert!(ours.contains(&0), "{name}: no expert was starved");
                }
            }
        }
    }
}

/// Fixture `name`'s HF folder with its config edited by `edit`.
fn with_config(name: &str, edit: &dyn Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    e2e::copy_with_config(&fixture(name), d.path(), edit);
    d
}

fn open_error(path: &Path) -> String {
    match Model::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn expert_counts_that_contradict_the_tensors_are_refused_by_name() {
    // A config with fewer or more experts than the router's rows.
    for (name, experts) in [("qwen3_moe", 5), ("mixtral", 5)] {
        let d = with_config(name, &|v| v["num_local_experts"] = experts.into());
        let e = open_error(d.path());
        assert!(
            e.contains("tensor 'blk.0.ffn_gate_inp.weight' has shape")
                && e.contains(&format!("the config implies [{experts}, 64]")),
            "{name}: {e}"
        );
    }
    // More experts used than there are.
    let d = with_config("olmoe", &|v| v["num_experts_per_tok"] = 7.into());
    let e = open_error(d.path());
    assert!(e.contains("7 of 6 experts"), "{e}");
    // Llama 4: expert blocks that contradict the tensors or the interleave, a
    // layer pattern that is not chunked-RoPE / full-NoPE.
    for (edit, says) in [
        (
            (|v: &mut serde_json::Value| v["interleave_moe_layer_step"] = 1.into())
                as fn(&mut serde_json::Value),
            "field 'moe_layers' is [1,3], but interleave_moe_layer_step 1 over 4 layers means [0, 1, 2, 3]",
        ),
        (
            |v| v["intermediate_size_mlp"] = 40.into(),
            "tensor 'blk.0.ffn_gate.weight' has shape [48, 64], the config implies [40, 64]",
        ),
        (
            |v| v["layer_types"][0] = "full_attention".into(),
            "field 'layer_types' entry 0 is \"full_attention\" but no_rope_layers says the layer has RoPE",
        ),
    ] {
        let d = with_config("llama4", &edit);
        let e = open_error(d.path());
        assert!(e.contains(says), "expected '{says}' in: {e}");
    }
    // DeepSeek-V3: groups that do not split the experts, a dense block the
    // tensors do not have, widths the latent attention's tensors contradict.
    for (edit, says) in [
        (
            (|v: &mut serde_json::Value| v["n_group"] = 3.into()) as fn(&mut serde_json::Value),
            "8 experts in 3 groups with 2 groups used per token",
        ),
        (
            |v| v["first_k_dense_replace"] = 0.into(),
            "tensor 'model.layers.0.mlp.gate.weight' is missing",
        ),
        (
            |v| v["qk_nope_head_dim"] = 10.into(),
            "tensor 'blk.0.attn_q_b.weight' has shape [80, 32], the config implies [72, 32]",
        ),
        (
            |v| v["q_lora_rank"] = serde_json::Value::Null,
            "field 'q_lora_rank' is null",
        ),
    ] {
        let d = with_config("deepseek_v3", &edit);
        let e = open_error(d.path());
        assert!(e.contains(says), "expected '{says}' in: {e}");
    }
    // A missing expert count.
    let d = with_config("olmoe", &|v| {
        v.as_object_mut().unwrap().remove("num_experts");
    });
    let e = open_error(d.path());
    assert!(e.contains("'num_experts'"), "{e}");
    // An expert tensor beyond the config's experts, and a missing one.
    use model::safetensors_file::SafetensorsWriter;
    let src = fixture("olmoe");
    let set = SafetensorsSet::open(&src.join("model.safetensors")).unwrap();
    let extra = "model.layers.1.mlp.experts.6.up_proj.weight";
    let dropped = "model.layers.1.mlp.experts.3.down_proj.weight";
    for (add, drop, says) in [
        (
            Some(extra),
            None,
            format!("tensor '{extra}' belongs to expert 6, but the config has 6 experts"),
        ),
        (
            None,
            Some(dropped),
            format!("tensor '{dropped}' is missing"),
        ),
    ] {
        let d = with_config("olmoe", &|_| {});
        let file = d.path().join("model.safetensors");
        std::fs::remove_file(&file).unwrap();
        let mut decls: Vec<_> = set
            .names()
            .filter(|n| Some(*n) != drop)
            .map(|n| {
                let (e, _) = set.get(n).unwrap();
                (n.to_owned(), e.dtype, e.shape.clone())
            })
            .collect();
        let template = "model.layers.1.mlp.experts.0.up_proj.weight";
        if let Some(add) = add {
            let (e, _) = set.get(template).unwrap();
            decls.push((add.to_owned(), e.dtype, e.shape.clone()));
        }
        let mut w = SafetensorsWriter::create(&file, &decls, &Default::default()).unwrap();
        for (n, ..) in &decls {
            let from = if Some(n.as_str()) == add {
                template
            } else {
                n.as_str()
            };
            w.write(n, set.get(from).unwrap().1).unwrap();
        }
        w.finish().unwrap();
        let e = open_error(d.path());
        assert!(e.contains(&says), "expected '{says}' in: {e}");
    }
}

#[test]
fn stages_without_expert_support_refuse_without_output() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("qwen3_moe");
    let b = base.to_str().unwrap();
    let llama4 = fixture("llama4");
    let deepseek = fixture("deepseek_v3");
    for (args, says) in [
        (
            vec![
                "quantize",
                deepseek.to_str().unwrap(),
                "--method",
                "awq",
                "--type",
                "Q8_0",
            ],
            "AWQ does not handle multi-head latent attention yet",
        ),
        (
            vec![
                "quantize",
                deepseek.to_str().unwrap(),
                "--method",
                "gptq",
                "--bits",
                "8",
                "--group",
                "4",
            ],
            "keys and values of every head",
        ),
        (
            vec![
                "quantize",
                llama4.to_str().unwrap(),
                "--method",
                "gptq",
                "--bits",
                "4",
                "--group",
                "32",
            ],
            "is stored by HF fused with other tensors",
        ),
        (
            vec!["prune", b, "--heads", "2"],
            "structured pruning of heads, FFN channels, blocks or width does not handle",
        ),
        (
            vec![
                "prune",
                b,
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--format",
                "compressed-tensors",
            ],
            "writing a compressed-tensors sparse folder does not handle",
        ),
    ] {
        let out = dir.path().join("out");
        let mut args = args.clone();
        args.extend([
            "-o",
            out.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
        ]);
        args.extend(["--samples", "2", "--seq", "32"]);
        let o = compress(&args);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

#[test]
fn gguf_writing_stacks_the_experts_and_keeps_the_router_in_float() {
    let dir = tempfile::tempdir().unwrap();
    for name in ALL_MOE {
        let tokens: Vec<u32> = reference_ints(name, "tokens")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let want = reference_floats(name, "logits");
        for ty in ["F32", "Q8_0"] {
            let out = dir.path().join(format!("{name}.{ty}.gguf"));
            let o = compress(&[
                "quantize",
                fixture(name).to_str().unwrap(),
                "--type",
                ty,
                "-o",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{name} {ty}: {}", output_text(&o));
            let model = Model::open(&out).unwrap();
            assert_eq!(model.config.arch.name, name);
            let model::checkpoint::Checkpoint::Gguf(g) = &model.checkpoint else {
                unreachable!("a GGUF file")
            };
            for t in &g.tensors {
                if t.name.ends_with("ffn_gate_inp.weight") {
                    assert_eq!(t.ty, kernels::GgmlType::F32, "{name}: {}", t.name);
                } else if t.name.contains("_exps.") {
                    assert_eq!(t.ty.to_string(), ty, "{name}: {}", t.name);
                    assert_eq!(t.shape().len(), 3, "{name}: {}", t.name);
                }
            }
            let got = model.logits(&tokens, 0).unwrap();
            let err = rel_max_error(&got, &want);
            let vocab = model.config.vocab_size;
            let argmax = |row: &[f32]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
            let same = got
                .chunks(vocab)
                .zip(want.chunks(vocab))
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count() as f64
                / tokens.len() as f64;
            eprintln!("{name} {ty}: max error / max logit = {err:.2e}, same top-1 {same:.3}");
            if ty == "F32" {
                assert!(err < 1e-4, "{name} {ty}: {err:e}");
            } else {
                // Q8_0's rounding may move a token to another expert, which
                // changes that token's logits by far more than 8 bits do.
                assert!(same >= 0.75, "{name} {ty}: same top-1 on {same}");
            }
        }
    }
}

/// llama-quantize's MXFP4_MOE mix: the stacked experts in MXFP4, every other
/// matrix (the output and embedding included) in Q8_0, file type 38; the result
/// evaluates near the float model. (On the qwen3_moe fixture the tensor types
/// equal llama-quantize's own MXFP4_MOE file, and llama-perplexity runs ours:
/// README, "MXFP4".)
#[test]
fn mxfp4_moe_puts_the_stacked_experts_in_mxfp4_and_the_rest_in_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    for name in ALL_MOE {
        let out = dir.path().join(format!("{name}.mxfp4.gguf"));
        let o = compress(&[
            "quantize",
            fixture(name).to_str().unwrap(),
            "--type",
            "MXFP4_MOE",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        let model = Model::open(&out).unwrap();
        let model::checkpoint::Checkpoint::Gguf(g) = &model.checkpoint else {
            unreachable!("a GGUF file")
        };
        let mut experts = 0;
        for t in &g.tensors {
            let want = if t.name.contains("_exps.") {
                experts += 1;
                kernels::GgmlType::MXFP4
            } else if t.shape().len() == 1 || t.name.ends_with("ffn_gate_inp.weight") {
                continue; // norms, biases and the router stay in float
            } else if t.shape().last().is_some_and(|c| c % 32 != 0) {
                kernels::GgmlType::F16 // rows that no 32-block divides
            } else {
                kernels::GgmlType::Q8_0
            };
            assert_eq!(t.ty, want, "{name}: {}", t.name);
        }
        assert!(experts > 0, "{name}: no stacked experts");
        let file_type = g.get("general.file_type").and_then(|v| v.as_u64());
        assert_eq!(file_type, Some(38), "{name}");
        let kld = kld_against(&out, &fixture(name));
        eprintln!("{name} MXFP4_MOE: KLD {kld:.4}");
        assert!(kld.is_finite() && kld < 0.5, "{name}: KLD {kld}");
    }
}

#[test]
fn imatrix_has_one_matrix_per_expert_from_the_tokens_routed_to_it() {
    use model::calib::Imatrix;
    for name in ALL_MOE {
        let model = Model::open(&fixture(name)).unwrap();
        let tokens: Vec<u32> = reference_ints(name, "tokens_starved")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let n = tokens.len();
        let m = Imatrix::collect(&model, &tokens, n, Some(1), "reference", &mut |_, _| {}).unwrap();
        let counts = reference_ints(name, "expert_token_counts_starved");
        let experts = model.config.moe.as_ref().unwrap().experts;
        let layers = reference_ints(name, "moe_layers");
        for (&l, want) in layers.iter().zip(counts.chunks(experts)) {
            for kind in ["gate", "up", "down"] {
                let e = &m.entries[&format!("blk.{l}.ffn_{kind}_exps.weight")];
                let got: Vec<usize> = e.counts.iter().map(|&c| c as usize).collect();
                assert_eq!(got, want, "{name} blk.{l} {kind}");
                // A starved expert is quantized with its experts' pooled statistics.
                let starved = e.starved();
                assert_eq!(
                    starved,
                    (0..experts).filter(|&x| want[x] == 0).collect::<Vec<_>>()
                );
                let imp = m
                    .importance(&format!("blk.{l}.ffn_{kind}_exps.weight"))
                    .unwrap();
                assert!(
                    imp.iter().all(|v| v.is_finite() && *v > 0.0),
                    "{name} blk.{l} {kind}"
                );
            }
            assert_eq!(
                m.entries[&format!("blk.{l}.attn_output.weight")].counts,
                [n as u64]
            );
        }
    }
}

#[test]
fn llama_cpp_moe_imatrix_is_read_and_ours_agrees_with_it() {
    use model::calib::Imatrix;
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    for name in ALL_MOE {
        // What llama-imatrix computed on the fixture's GGUF (see the fixtures' README).
        let theirs = Imatrix::load(&fixture(name).join("llama-imatrix.gguf")).unwrap();
        let ours_path = dir.path().join(format!("{name}.imatrix.gguf"));
        let gguf = fixture(name).join("model.gguf");
        let o = compress(&[
            "imatrix",
            gguf.to_str().unwrap(),
            "--text",
            calib.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "4",
            "-o",
            ours_path.to_str().unwrap(),
        ]);
        let text = output_text(&o);
        assert!(o.status.success(), "{name}: {text}");
        // The coverage report: tokens per expert, as llama.cpp counted them.
        let counts: Vec<String> = theirs.entries["blk.1.ffn_gate_exps.weight"]
            .counts
            .iter()
            .map(u64::to_string)
            .collect();
        let line = format!("blk.1 tokens per expert: {}", counts.join(" "));
        assert!(text.contains(&line), "{name}: expected '{line}' in {text}");
        let ours = Imatrix::load(&ours_path).unwrap();
        for (weight, e) in &ours.entries {
            let t = &theirs.entries[weight];
            assert_eq!(e.counts, t.counts, "{name} {weight}: tokens per expert");
            let worst = e
                .sum_sq
                .iter()
                .zip(&t.sum_sq)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
                .fold(0f64, f64::max);
            // llama.cpp's activations pass through f16 (its KV cache): 4e-3 at
            // most here; DeepSeek's cache holds the f16 latent every head's
            // keys and values come from (1.2e-2 on one expert's sum).
            let tolerance = if name == "deepseek_v3" { 2e-2 } else { 1e-2 };
            assert!(
                worst < tolerance,
                "{name} {weight}: sums differ by {worst:e}"
            );
        }
        // Both quantize the model; an imatrix of another model is refused by name.
        for (imatrix, ok) in [
            (fixture(name).join("llama-imatrix.gguf"), true),
            (ours_path.clone(), true),
            (
                // One with another expert count in a block both have experts in.
                fixture(match name {
                    "mixtral" => "olmoe",
                    "llama4" => "qwen3_moe",
                    _ => "mixtral",
                })
                .join("llama-imatrix.gguf"),
                false,
            ),
        ] {
            let out = dir.path().join(format!("{name}.q4km.gguf"));
            let o = compress(&[
                "quantize",
                gguf.to_str().unwrap(),
                "--type",
                "Q4_K_M",
                "--imatrix",
                imatrix.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ]);
            let text = output_text(&o);
            if ok {
                assert!(
                    o.status.success(),
                    "{name} with {}: {text}",
                    imatrix.display()
                );
                std::fs::remove_file(&out).unwrap();
            } else {
                assert_eq!(o.status.code(), Some(2), "{name}: {text}");
                assert!(text.contains("made for another model"), "{name}: {text}");
                // Mixtral, OLMoE and DeepSeek's blocks differ from the other
                // file's first in their expert count.
                if !matches!(name, "qwen3_moe" | "llama4") {
                    assert!(text.contains("_exps.weight' has"), "{name}: {text}");
                }
                assert!(!out.exists());
            }
        }
    }
}

#[test]
fn eval_and_convert_run_from_hf_and_gguf() {
    let eval = e2e::eval_text();
    let dir = tempfile::tempdir().unwrap();
    for name in ALL_MOE {
        // GGUF → HF (experts split per expert) and HF → HF read back to
        // transformers' logits; `eval` runs on all four.
        let from_gguf = dir.path().join(format!("{name}-from-gguf"));
        let from_hf = dir.path().join(format!("{name}-from-hf"));
        let gguf = fixture(name).join("model.gguf");
        for (src, out) in [(&gguf, &from_gguf), (&fixture(name), &from_hf)] {
            let o = compress(&[
                "convert",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{name}: {}", output_text(&o));
            let model = Model::open(out).unwrap();
            assert_eq!(
                model.config.moe,
                Model::open(&fixture(name)).unwrap().config.moe
            );
            let tokens: Vec<u32> = reference_ints(name, "tokens")
                .into_iter()
                .map(|t| t as u32)
                .collect();
            let err = rel_max_error(
                &model.logits(&tokens, 0).unwrap(),
                &reference_floats(name, "logits"),
            );
            assert!(err < 1e-4, "{}: {err:e}", out.display());
        }
        let paths = [fixture(name), gguf, from_gguf, from_hf];
        let mut args = vec![
            "eval",
            "--text",
            eval.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "2",
        ];
        args.extend(paths.iter().map(|p| p.to_str().unwrap()));
        let o = compress(&args);
        let text = output_text(&o);
        assert!(o.status.success(), "{name}: {text}");
        assert_eq!(text.matches("PPL = ").count(), 4, "{name}: {text}");
    }
}

#[test]
fn expert_pruning_keeps_the_most_salient_experts_in_both_formats() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    // DeepSeek's fixture has groups of 2 experts, none of which may go (below).
    for name in CALIBRATED {
        let base = Model::open(&fixture(name)).unwrap();
        let experts = base.config.moe.as_ref().unwrap().experts;
        let hidden = base.config.hidden_size;
        let half = (experts / 2).to_string();
        let report = dir.path().join(format!("{name}.json"));
        let (hf, gguf) = (
            dir.path().join(format!("{name}-half")),
            dir.path().join(format!("{name}-half.gguf")),
        );
        for out in [&hf, &gguf] {
            let o = compress(&[
                "prune",
                fixture(name).to_str().unwrap(),
                "--experts",
                &half,
                "--calib",
                calib.to_str().unwrap(),
                "--samples",
                "4",
                "--seq",
                "64",
                "--report",
                report.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{name}: {}", output_text(&o));
            assert!(
                output_text(&o).contains("blk.1: removed experts "),
                "{name}"
            );
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let (hf, gguf) = (Model::open(&hf).unwrap(), Model::open(&gguf).unwrap());
        for (l, kept) in r["kept_experts"].as_array().unwrap().iter().enumerate() {
            let kept: Vec<usize> = serde_json::from_value(kept.clone()).unwrap();
            let scores: Vec<f64> = serde_json::from_value(r["expert_scores"][l].clone()).unwrap();
            if !base.config.is_moe_block(l) {
                // A dense block (Llama 4's) has no experts to score or cut.
                assert!(kept.is_empty() && scores.is_empty(), "{name} blk.{l}");
                continue;
            }
            assert_eq!(kept.len(), experts - experts / 2, "{name} blk.{l}");
            // No removed expert is more salient than a kept one.
            let lowest_kept = kept.iter().map(|&e| scores[e]).fold(f64::MAX, f64::min);
            assert!(
                (0..experts)
                    .filter(|e| !kept.contains(e))
                    .all(|e| scores[e] <= lowest_kept),
                "{name} blk.{l}: {scores:?} kept {kept:?}"
            );
            // The router and every expert matrix keep exactly the kept experts' rows.
            let router = |m: &Model, layer: usize| {
                m.tensor(&format!("blk.{layer}.ffn_gate_inp.weight"))
                    .unwrap()
                    .to_f32()
                    .unwrap()
            };
            let original = router(&base, l);
            let want: Vec<f32> = kept
                .iter()
                .flat_map(|&e| original[e * hidden..(e + 1) * hidden].to_vec())
                .collect();
            assert_eq!(router(&hf, l), want, "{name} blk.{l}");
            let down = base
                .tensor(&format!("blk.{l}.ffn_down_exps.weight"))
                .unwrap();
            let cut = gguf
                .tensor(&format!("blk.{l}.ffn_down_exps.weight"))
                .unwrap();
            for (i, &e) in kept.iter().enumerate() {
                assert_eq!(
                    cut.expert(i).unwrap().to_f32().unwrap(),
                    down.expert(e).unwrap().to_f32().unwrap(),
                    "{name} blk.{l} expert {e}"
                );
            }
        }
        assert_eq!(
            hf.config.moe.as_ref().unwrap().experts,
            experts - experts / 2
        );
        assert_eq!(gguf.config.moe, hf.config.moe);
        let tokens: Vec<u32> = reference_ints(name, "tokens")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let err = rel_max_error(
            &gguf.logits(&tokens, 0).unwrap(),
            &hf.logits(&tokens, 0).unwrap(),
        );
        assert!(err < 1e-5, "{name}: GGUF and HF halves differ by {err:e}");
    }
    // A dense model has no experts to cut; a cut that leaves too few is refused.
    let d = tempfile::tempdir().unwrap();
    for (model, experts, says) in [
        (
            repo_root().join("tests/fixtures/arch/qwen3"),
            "1",
            "a 'qwen3' model has none",
        ),
        (
            fixture("mixtral"),
            "3",
            "leaves 1 of 4 experts, but every token runs through 2",
        ),
        (
            fixture("deepseek_v3"),
            "4",
            "--experts 4 cannot come evenly out of 4 expert groups of 2 leaving at least 2 in each",
        ),
    ] {
        let out = d.path().join("out");
        let o = compress(&[
            "prune",
            model.to_str().unwrap(),
            "--experts",
            experts,
            "--calib",
            calib.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{text}");
        assert!(text.contains(says), "expected '{says}' in {text}");
        assert!(!out.exists());
    }
}

/// GPTQ over each fixture with `tokens_starved` as the only calibration
/// sample: the walk's per-expert token counts are transformers' (every block:
/// 8-bit GPTQ moves no routing decision, whose margins are ≥ 1e-3), the starved
/// expert takes every token's statistics and is named so, and every expert of
/// every stacked tensor is quantized to finite values.
#[test]
fn gptq_counts_each_experts_tokens_and_calibrates_the_starved_ones_on_every_token() {
    use model::calib::walk::{ExpertCalibration, ExpertStatistics};
    use quant::calibrated::gptq_model;
    use quant::gptq::{GptqOptions, Grid};
    for name in CALIBRATED {
        let model = Model::open(&fixture(name)).unwrap();
        let m = model.config.moe.clone().unwrap();
        let tokens: Vec<u32> = reference_ints(name, "tokens_starved")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let theirs = reference_ints(name, "expert_token_counts_starved");
        for all_experts in [false, true] {
            let opts = GptqOptions {
                experts: ExpertCalibration {
                    all_experts,
                    min_tokens: 1,
                },
                ..Default::default()
            };
            let grid = Grid::Int {
                bits: 8,
                group: 32,
                sym: true,
                clip: false,
            };
            let mut stacked = 0;
            let (reports, _) = gptq_model(
                &model,
                std::slice::from_ref(&tokens),
                &|_| grid,
                &|_| false,
                &opts,
                true,
                &mut |n, item| {
                    if let quant::calibrated::Item::Experts(qs) = item {
                        assert_eq!(qs.len(), m.experts, "{name} {n}");
                        for q in &qs {
                            assert!(q.values.iter().all(|v| v.is_finite()), "{name} {n}");
                        }
                        stacked += 1;
                    }
                    Ok(())
                },
                &mut |_, _| {},
            )
            .unwrap();
            let moe_layers = reference_ints(name, "moe_layers");
            let layers = moe_layers.len();
            assert_eq!(stacked, 3 * layers, "{name}");
            // One entry per expert and kind; gate's carries the routing.
            let mut ours = vec![0; layers * m.experts];
            for r in reports.iter().filter(|r| r.name.contains("ffn_gate_exps")) {
                let e = r.expert.expect("an expert's report");
                let block = model::names::block_index(&r.name).unwrap();
                let l = moe_layers.iter().position(|&x| x == block).unwrap();
                ours[l * m.experts + e.expert] = e.routed_tokens;
                let expected = match (all_experts, e.routed_tokens) {
                    (true, _) => ExpertStatistics::AllTokensRequested,
                    (false, 0) => ExpertStatistics::AllTokensStarved,
                    (false, _) => ExpertStatistics::Routed,
                };
                assert_eq!(
                    e.statistics, expected,
                    "{name} {} expert {}",
                    r.name, e.expert
                );
                assert!(r.rel_error.is_finite(), "{name} {}", r.name);
            }
            assert_eq!(ours, theirs, "{name}: per-expert token counts");
            assert_eq!(
                reports.iter().filter(|r| r.expert.is_some()).count(),
                3 * layers * m.experts
            );
        }
    }
}

/// `compress quantize --method gptq` on each fixture into a GPTQ folder (one
/// packed linear per expert under HF's per-expert names, the router in f16)
/// and into a Q4_0 GGUF (stacked experts): numpy unpacks every expert to
/// exactly what we read back, gguf-py reads the GGUF as we do, both load and
/// evaluate, and the report names the starved experts.
#[test]
fn gptq_writes_every_expert_to_gptq_folders_and_gguf() {
    use model::safetensors_file::{Dtype, SafetensorsWriter};
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    for name in MOE {
        let src = fixture(name);
        let folder = dir.path().join(format!("{name}-gptq"));
        let gguf = dir.path().join(format!("{name}-q4_0.gguf"));
        let report = dir.path().join(format!("{name}.json"));
        for (out, extra) in [(&folder, ["--bits", "4"]), (&gguf, ["--type", "Q4_0"])] {
            let o = compress(&[
                "quantize",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--method",
                "gptq",
                extra[0],
                extra[1],
                "--group",
                "32",
                "--calib",
                calib.to_str().unwrap(),
                "--samples",
                "2",
                "--seq",
                "32",
                "--min-expert-tokens",
                "12",
                "--report",
                report.to_str().unwrap(),
            ]);
            let text = output_text(&o);
            assert!(o.status.success(), "{name}: {text}");
            assert!(text.contains("experts: "), "{name}: {text}");
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            let layers = r["layers"].as_array().unwrap();
            let experts: Vec<&serde_json::Value> =
                layers.iter().filter(|l| !l["expert"].is_null()).collect();
            let m = Model::open(&src).unwrap().config.moe.unwrap();
            assert_eq!(experts.len(), 3 * 2 * m.experts, "{name}");
            for e in &experts {
                let tokens = e["expert"]["routed_tokens"].as_u64().unwrap();
                let stats = e["expert"]["statistics"].as_str().unwrap();
                let want = if tokens < 12 {
                    "all_tokens_starved"
                } else {
                    "routed"
                };
                assert_eq!(stats, want, "{name}: {e}");
                if stats == "all_tokens_starved" {
                    assert!(
                        text.contains(&format!(" ({tokens} tokens)")),
                        "{name}: starved expert not named: {text}"
                    );
                }
            }
        }

        // The same in compressed-tensors' layout, every expert calibrated on
        // every token.
        let ct = dir.path().join(format!("{name}-ct"));
        let o = compress(&[
            "quantize",
            src.to_str().unwrap(),
            "-o",
            ct.to_str().unwrap(),
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group",
            "32",
            "--format",
            "compressed-tensors",
            "--calibrate-all-experts",
            "--calib",
            calib.to_str().unwrap(),
            "--samples",
            "2",
            "--seq",
            "32",
            "--report",
            report.to_str().unwrap(),
        ]);
        let text = output_text(&o);
        assert!(o.status.success(), "{name}: {text}");
        let m = Model::open(&src).unwrap().config.moe.unwrap();
        let said = format!(
            "experts: 0 calibrated on their routed tokens, {} on every token (--calibrate-all-experts)",
            2 * m.experts
        );
        assert!(text.contains(&said), "{name}: expected '{said}' in {text}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert!(r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| !l["expert"].is_null())
            .all(|l| l["expert"]["statistics"] == "all_tokens_requested"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ct.join("config.json")).unwrap())
                .unwrap();
        let ignore = config["quantization_config"]["ignore"].to_string();
        assert!(
            ignore.contains("gate"),
            "{name}: the router is not ignored: {ignore}"
        );
        for folder in [&folder, &ct] {
            // numpy's unpacking of every expert equals our reading of the folder.
            let back = Model::open(folder).unwrap();
            let q = back.quantized.as_ref().expect("a quantized folder");
            let c = &back.config;
            let mut decl = Vec::new();
            let mut data = Vec::new();
            for n in model::names::all(c) {
                if !model::hf_quant::is_block_linear(c.arch, &n) {
                    continue;
                }
                let shape = q
                    .shape(&n)
                    .unwrap_or_else(|| panic!("{name}: '{n}' not quantized"));
                let values = back.tensor(&n).unwrap().to_f32().unwrap();
                assert!(values.iter().all(|v| v.is_finite()), "{name} {n}");
                let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                let hf_names = c
                    .arch
                    .hf_expert_names(&n, m_experts(c))
                    .unwrap_or_else(|| vec![c.arch.hf_from_canonical(&n).unwrap()]);
                for (hf, part) in hf_names.into_iter().zip(values.chunks(rows * cols)) {
                    decl.push((hf, Dtype::F32, vec![rows, cols]));
                    data.push(
                        part.iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    );
                }
            }
            let reference = dir.path().join(format!("{name}-reference.safetensors"));
            let mut w =
                SafetensorsWriter::create(&reference, &decl, &std::collections::BTreeMap::new())
                    .unwrap();
            for ((hf, _, _), bytes) in decl.iter().zip(&data) {
                w.write(hf, bytes).unwrap();
            }
            w.finish().unwrap();
            let n = decl.len();
            assert_eq!(n, 2 * (4 + 3 * m_experts(c)), "{name}");
            let said = e2e::run_python("check_gptq.py", &[folder, &reference]);
            assert!(
                said.contains(&format!(": {n} of {n} linears equal REFERENCE exactly")),
                "{name} {}: {said}",
                folder.display()
            );
            let router = c.arch.router().unwrap().hf;
            let set = SafetensorsSet::open(&folder.join("model.safetensors")).unwrap();
            let (entry, _) = set
                .get(&format!("model.layers.0.{router}"))
                .unwrap_or_else(|| panic!("{name}: no router"));
            assert_eq!(entry.dtype, Dtype::F16, "{name}: the router stays in float");
        }

        // gguf-py reads the GGUF's stacked experts as we do.
        e2e::check_gguf_with_gguf_py(
            &gguf,
            &[
                "blk.0.ffn_gate_exps.weight",
                "blk.1.ffn_down_exps.weight",
                "blk.1.ffn_gate_inp.weight",
            ],
            &dir.path().join(format!("{name}-dump")),
        );

        let eval = e2e::eval_text();
        let o = compress(&[
            "eval",
            "--text",
            eval.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "2",
            "--base",
            src.to_str().unwrap(),
            folder.to_str().unwrap(),
            gguf.to_str().unwrap(),
        ]);
        let text = output_text(&o);
        assert!(o.status.success(), "{name}: {text}");
        assert_eq!(text.matches("KLD mean").count(), 2, "{name}: {text}");

        // Per-layer fidelity, per expert on the tokens the base routes to it.
        let o = compress(&[
            "eval",
            "--text",
            eval.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "1",
            "--base",
            src.to_str().unwrap(),
            gguf.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--calib-tokens",
            "128",
            "--json",
        ]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let m = Model::open(&src).unwrap().config.moe.unwrap();
        for row in r["tensors"].as_array().unwrap() {
            let tensor = row["name"].as_str().unwrap();
            if !tensor.contains("_exps") {
                continue;
            }
            let experts = row["output_experts"].as_array().unwrap();
            assert_eq!(experts.len(), m.experts, "{name} {tensor}");
            let tokens: u64 = experts.iter().map(|e| e["tokens"].as_u64().unwrap()).sum();
            assert_eq!(tokens, 128 * m.used as u64, "{name} {tensor}");
            assert!(
                row["output_rel_error"].as_f64().unwrap() > 0.0,
                "{name} {tensor}"
            );
        }
    }
}

fn m_experts(c: &model::ModelConfig) -> usize {
    c.moe.as_ref().map_or(0, |m| m.experts)
}

/// Wanda (unstructured) and SparseGPT (2:4) prune each expert on its own
/// tokens (the starved ones on every token) to the asked sparsity, and the
/// pruned model loads.
#[test]
fn wanda_and_sparsegpt_prune_every_expert() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    for name in CALIBRATED {
        for method in ["wanda", "sparsegpt"] {
            let out = dir.path().join(format!("{name}-{method}"));
            let report = dir.path().join(format!("{name}-{method}.json"));
            let o = compress(&[
                "prune",
                fixture(name).to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--method",
                method,
                // Wanda unstructured, SparseGPT 2:4.
                if method == "wanda" {
                    "--sparsity"
                } else {
                    "--nm"
                },
                if method == "wanda" { "0.5" } else { "2:4" },
                "--calib",
                calib.to_str().unwrap(),
                "--samples",
                "2",
                "--seq",
                "32",
                "--report",
                report.to_str().unwrap(),
            ]);
            let text = output_text(&o);
            assert!(o.status.success(), "{name} {method}: {text}");
            let back = Model::open(&out).unwrap();
            let c = &back.config;
            for l in (0..c.num_hidden_layers).filter(|&l| c.is_moe_block(l)) {
                let n = model::names::block(l, "ffn_down_exps.weight");
                let t = back.tensor(&n).unwrap();
                let e = m_experts(c);
                let values = t.to_f32().unwrap();
                for (i, part) in values.chunks(values.len() / e).enumerate() {
                    let zeros = part.iter().filter(|v| **v == 0.0).count();
                    assert_eq!(zeros * 2, part.len(), "{name} {method} {n} expert {i}");
                    if method == "sparsegpt" {
                        assert!(
                            part.chunks(4)
                                .all(|g| g.iter().filter(|v| **v == 0.0).count() >= 2),
                            "{name} {n} expert {i}: not 2:4"
                        );
                    }
                }
            }
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            let per_expert = r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| !l["expert"].is_null())
                .count();
            let moe_blocks = reference_ints(name, "moe_layers").len();
            assert_eq!(per_expert, 3 * moe_blocks * m_experts(c), "{name}");
            let tokens: Vec<u32> = reference_ints(name, "tokens")
                .into_iter()
                .map(|t| t as u32)
                .collect();
            assert!(back
                .logits(&tokens, 0)
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}

/// Sensitivity measures each expert block's stacked experts as one unit per
/// kind (with each expert's own imatrix row), the shared expert and latent
/// attention's matrices as tensors, and never the router; its report
/// allocates bits for a mixture of experts.
#[test]
fn sensitivity_measures_expert_groups_and_shared_experts_and_allocates_from_them() {
    let calib = e2e::asset("calib.txt");
    let eval = e2e::eval_text();
    let dir = tempfile::tempdir().unwrap();
    for name in ["llama4", "deepseek_v3"] {
        let report = dir.path().join(format!("{name}.json"));
        let o = compress(&[
            "sensitivity",
            fixture(name).to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--text",
            eval.to_str().unwrap(),
            "--types",
            "Q4_0,Q8_0",
            "--sparsity",
            "0.5",
            "-o",
            report.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let units: Vec<&str> = r["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap())
            .collect();
        let block = reference_ints(name, "moe_layers")[0];
        for kind in [
            "gate_exps",
            "up_exps",
            "down_exps",
            "gate_shexp",
            "down_shexp",
        ] {
            let unit = format!("blk.{block}.ffn_{kind}.weight");
            assert!(units.contains(&unit.as_str()), "{name}: no unit {unit}");
        }
        assert!(
            !units
                .iter()
                .any(|u| u.contains("ffn_gate_inp") || u.contains("exp_probs_b")),
            "{name}: the router is never measured: {units:?}"
        );
        if name == "deepseek_v3" {
            assert!(units.contains(&"blk.1.attn_kv_a_mqa.weight"), "{units:?}");
        }
        // Every Q4_0 cell of an expert unit moved the model.
        for c in r["cells"].as_array().unwrap() {
            let unit = units[c["unit"].as_u64().unwrap() as usize];
            if unit.contains("_exps") && c["applied"] == "Q4_0" {
                assert!(c["shift"]["kld"].as_f64().unwrap() > 0.0, "{name} {unit}");
            }
        }
        let out = dir.path().join(format!("{name}.gguf"));
        let o = compress(&[
            "quantize",
            fixture(name).to_str().unwrap(),
            "--sensitivity",
            report.to_str().unwrap(),
            "--target-bpw",
            "6",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        let tokens: Vec<u32> = reference_ints(name, "tokens")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let logits = Model::open(&out).unwrap().logits(&tokens, 0).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "{name}");
    }
}

/// AWQ on a mixture of experts: the attention's scales fold into its norm,
/// each expert is rounded weighted by the inputs routed to it (one no token
/// reached, by its block's pooled statistics), the GGUF and GPTQ-layout
/// folder load and every expert is finite.
#[test]
fn awq_rounds_every_expert_on_its_routed_inputs() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    for name in MOE {
        let m = Model::open(&fixture(name)).unwrap().config.moe.unwrap();
        for (out, extra) in [
            (dir.path().join(format!("{name}.gguf")), ["--type", "Q4_0"]),
            (dir.path().join(format!("{name}-awq")), ["--bits", "4"]),
        ] {
            let report = dir.path().join(format!("{name}.json"));
            let o = compress(&[
                "quantize",
                fixture(name).to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--method",
                "awq",
                extra[0],
                extra[1],
                "--group",
                "32",
                "--calib",
                calib.to_str().unwrap(),
                "--samples",
                "1",
                "--seq",
                "16",
                "--report",
                report.to_str().unwrap(),
            ]);
            let text = output_text(&o);
            assert!(o.status.success(), "{name}: {text}");
            assert!(
                text.contains("folds the input scales of attn_q, attn_k, attn_v"),
                "{text}"
            );
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
            let experts: Vec<&serde_json::Value> = r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| l.get("expert").filter(|e| !e.is_null()))
                .collect();
            assert_eq!(experts.len(), 3 * 2 * m.experts, "{name}");
            // 16 tokens leave some expert without any (the fixtures' starved input
            // does; this text need not): each such expert is named as pooled.
            for e in &experts {
                let pooled = e["statistics"] == "pooled_starved";
                assert_eq!(pooled, e["routed_tokens"] == 0, "{name}: {e}");
            }
            let back = Model::open(&out).unwrap();
            for l in 0..2 {
                let t = back
                    .tensor(&format!("blk.{l}.ffn_down_exps.weight"))
                    .unwrap();
                assert!(t.to_f32().unwrap().iter().all(|v| v.is_finite()), "{name}");
            }
            let tokens: Vec<u32> = reference_ints(name, "tokens")
                .into_iter()
                .map(|t| t as u32)
                .collect();
            assert!(back
                .logits(&tokens, 0)
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}

/// `compress eval --base` mean KLD of `model` against `base` on the evaluation
/// text.
fn kld_against(model: &Path, base: &Path) -> f64 {
    let eval = e2e::eval_text();
    let o = compress(&[
        "eval",
        "--text",
        eval.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "4",
        "--base",
        base.to_str().unwrap(),
        model.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["kld"]["mean"].as_f64().unwrap()
}

#[test]
fn distillation_trains_the_experts_and_leaves_the_router_alone() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    let distill = |teacher: &Path, student: &Path, out: &Path, train: &[&str]| {
        let mut args = vec![
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--student",
            student.to_str().unwrap(),
            "--text",
            calib.to_str().unwrap(),
            "--tokens",
            "4096",
            "--seq",
            "64",
            "--batch",
            "2",
            "--lr",
            "3e-3",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(train);
        compress(&args)
    };
    for name in MOE {
        let teacher = fixture(name);
        let student = dir.path().join(format!("{name}-pruned"));
        let o = compress(&[
            "prune",
            teacher.to_str().unwrap(),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            student.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", output_text(&o));
        let before = kld_against(&student, &teacher);
        // Adapters learn less from this budget than the weights themselves.
        for (train, bar) in [("all", 0.8), ("lora", 0.9)] {
            let out = dir.path().join(format!("{name}-{train}"));
            let report = dir.path().join(format!("{name}-{train}.json"));
            let o = distill(
                &teacher,
                &student,
                &out,
                &[
                    "--train",
                    train,
                    "--lora-rank",
                    "8",
                    "--report",
                    report.to_str().unwrap(),
                ],
            );
            assert!(o.status.success(), "{name} {train}: {}", output_text(&o));
            let after = kld_against(&out, &teacher);
            eprintln!("{name} --train {train}: held-out KLD {before:.4} → {after:.4}");
            assert!(
                after < bar * before,
                "{name} {train}: KLD {before} → {after}"
            );

            let (s, t) = (Model::open(&student).unwrap(), Model::open(&out).unwrap());
            let m = s.config.moe.clone().unwrap();
            if train == "lora" {
                // Rank 8 on q, k, v, o and one adapter per expert on each of
                // the three stacks: 8·(in + out) values per matrix.
                let c = &s.config;
                let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), m.expert_ffn);
                let per_block = 8 * (2 * (h + q) + 2 * (h + kv) + 3 * m.experts * (h + f));
                let r: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
                assert_eq!(
                    r["trained_values"].as_u64().unwrap() as usize,
                    c.num_hidden_layers * per_block,
                    "{name}"
                );
            }
            for l in 0..s.config.num_hidden_layers {
                let tensor = |model: &Model, suffix: &str| {
                    let name = model::names::block(l, suffix);
                    model.tensor(&name).unwrap().to_f32().unwrap()
                };
                // The router is the student's, bit for bit, under any --train.
                let (r0, r1) = (
                    tensor(&s, "ffn_gate_inp.weight"),
                    tensor(&t, "ffn_gate_inp.weight"),
                );
                assert!(
                    r0.iter().zip(&r1).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {train}: block {l}'s router changed"
                );
                // Every expert trained (a token reached each on 4096 tokens),
                // and its pruned zeros stayed zero.
                for suffix in ["ffn_gate_exps.weight", "ffn_down_exps.weight"] {
                    let (w0, w1) = (tensor(&s, suffix), tensor(&t, suffix));
                    let per = w0.len() / m.experts;
                    for e in 0..m.experts {
                        let range = e * per..(e + 1) * per;
                        let (a, b) = (&w0[range.clone()], &w1[range]);
                        assert!(
                            a != b,
                            "{name} {train}: expert {e} of {suffix} block {l} unchanged"
                        );
                        assert!(
                            a.iter().zip(b).all(|(x, y)| *x != 0.0 || *y == 0.0),
                            "{name} {train}: a pruned weight of expert {e} came back"
                        );
                    }
                }
            }
        }
    }
    // The models whose attention or routing the training forward lacks are
    // refused by name, with no output.
    for (name, says) in [
        ("llama4", "chunked attention"),
        ("deepseek_v3", "latent attention"),
    ] {
        let out = dir.path().join(format!("{name}-never"));
        let o = distill(&fixture(name), &fixture(name), &out, &[]);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {text}");
        assert!(text.contains(says), "{name}: {text}");
        assert!(!out.exists(), "{name}: left {}", out.display());
    }
}

#[test]
fn a_quantized_moe_student_trains_through_its_codec_and_keeps_its_types() {
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    let teacher = fixture("qwen3_moe");
    let student = dir.path().join("q4_0.gguf");
    let out = dir.path().join("distilled.gguf");
    let o = compress(&[
        "quantize",
        teacher.to_str().unwrap(),
        "--type",
        "Q4_0",
        "-o",
        student.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let o = compress(&[
        "distill",
        "--teacher",
        teacher.to_str().unwrap(),
        "--student",
        student.to_str().unwrap(),
        "--text",
        calib.to_str().unwrap(),
        "--tokens",
        "4096",
        "--seq",
        "64",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--train",
        "blocks",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let (before, after) = (kld_against(&student, &teacher), kld_against(&out, &teacher));
    eprintln!("qwen3_moe Q4_0 student: held-out KLD {before:.4} → {after:.4}");
    assert!(after < 0.9 * before, "KLD {before} → {after}");
    let (s, t) = (Model::open(&student).unwrap(), Model::open(&out).unwrap());
    for name in s.tensor_names() {
        let (ty, _) = s.tensor_meta(&name).unwrap();
        assert_eq!(t.tensor_meta(&name).unwrap().0, ty, "{name}");
        if name.ends_with("ffn_gate_inp.weight") {
            let (a, b) = (s.tensor(&name).unwrap(), t.tensor(&name).unwrap());
            assert_eq!(a.to_f32().unwrap(), b.to_f32().unwrap(), "{name} changed");
        }
    }
    e2e::check_gguf_with_gguf_py(
        &out,
        &["blk.0.ffn_down_exps.weight", "blk.1.ffn_gate_inp.weight"],
        &dir.path().join("dump"),
    );
}

#[test]
fn latent_attention_calibrates_per_head() {
    // DeepSeek-V3's latent attention through the calibration walk: GPTQ into
    // GGUF types, Wanda and SparseGPT, each head of `attn_k_b` / `attn_v_b` on
    // its own inputs (`calib::walk`'s unit test checks they are the ones those
    // matrices multiply).
    let calib = e2e::asset("calib.txt");
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("deepseek_v3");
    let c = Model::open(&src).unwrap().config;
    let heads = c.num_attention_heads;
    let gguf = dir.path().join("gptq.gguf");
    let report = dir.path().join("gptq.json");
    let common = [
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "4",
        "--seq",
        "64",
    ];
    let mut args = vec![
        "quantize",
        src.to_str().unwrap(),
        "--method",
        "gptq",
        "--type",
        "Q8_0",
        "-o",
        gguf.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(common);
    let o = compress(&args);
    assert!(o.status.success(), "{}", output_text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let layers = r["layers"].as_array().unwrap();
    for suffix in ["attn_q_a.weight", "attn_q_b.weight", "attn_kv_a_mqa.weight"] {
        for l in 0..c.num_hidden_layers {
            let name = format!("blk.{l}.{suffix}");
            let row = layers.iter().find(|x| x["name"] == name.as_str());
            let row = row.unwrap_or_else(|| panic!("no GPTQ report for {name}"));
            assert!(
                row["rel_error"].as_f64().unwrap() <= row["rtn_rel_error"].as_f64().unwrap(),
                "{name}: GPTQ worse than rounding"
            );
        }
    }
    e2e::check_gguf_with_gguf_py(
        &gguf,
        &["blk.0.attn_q_b.weight", "blk.1.attn_kv_a_mqa.weight"],
        &dir.path().join("dump"),
    );
    let m = Model::open(&gguf).unwrap();
    for name in m.tensor_names() {
        let v = m.tensor(&name).unwrap().to_f32().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }

    for method in ["wanda", "sparsegpt"] {
        let out = dir.path().join(method);
        let report = dir.path().join(format!("{method}.json"));
        let mut args = vec![
            "prune",
            src.to_str().unwrap(),
            "--method",
            method,
            "--sparsity",
            "0.5",
            "-o",
            out.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend(common);
        let o = compress(&args);
        assert!(o.status.success(), "{method}: {}", output_text(&o));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let layers = r["layers"].as_array().unwrap();
        let pruned = Model::open(&out).unwrap();
        for l in 0..c.num_hidden_layers {
            for suffix in ["attn_k_b.weight", "attn_v_b.weight"] {
                let name = format!("blk.{l}.{suffix}");
                let rows: Vec<_> = layers
                    .iter()
                    .filter(|x| x["name"] == name.as_str())
                    .collect();
                let listed: Vec<u64> = rows.iter().map(|x| x["head"].as_u64().unwrap()).collect();
                assert_eq!(
                    listed,
                    (0..heads as u64).collect::<Vec<_>>(),
                    "{method} {name}"
                );
                // Every head half zero (the folder merges them into kv_b_proj
                // and splits them back on reading).
                let w = pruned.tensor(&name).unwrap().to_f32().unwrap();
                for (h, head) in w.chunks(w.len() / heads).enumerate() {
                    let zeros = head.iter().filter(|&&x| x == 0.0).count();
                    assert_eq!(zeros * 2, head.len(), "{method} {name} head {h}");
                }
            }
        }
        assert!(
            (r["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9,
            "{method}"
        );
    }
}
