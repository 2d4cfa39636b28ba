//! AWQ's folding leaves the float model unchanged: with per-channel scales
//! folded into every block of the real SmolLM2 at every fold its architecture
//! description lists (norm gains divided, q/k/v, gate/up and down columns
//! multiplied, up's rows divided), the logits equal the
//! original model's to 1e-5 relative. The same on every architecture fixture:
//! the scales act on the projections' inputs, so biases and per-head norms on
//! their outputs (Qwen2, Qwen3), post-norms after o and down (Gemma 3), (1 + w)
//! norm gains (Gemma 3, stored as w + 1 like llama.cpp) and windows (Mistral,
//! Gemma 3) stay exact; OLMo 2, which has no pre-norms, folds only up into down.

use e2e::{real_model, repo_root};
use model::Model;
use quant::awq::{fold, Fold};

#[test]
fn folded_scales_give_the_same_logits() {
    folding_keeps_logits(&real_model());
    for arch in [
        "llama3", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "gemma3",
    ] {
        folding_keeps_logits(&repo_root().join("tests/fixtures/arch").join(arch));
    }
}

fn folding_keeps_logits(path: &std::path::Path) {
    let model = Model::open(path).unwrap();
    let c = &model.config;
    let text = "The jury said it did find that many of Georgia's registration and election laws are outmoded.";
    let tokens = model.tokenizer.encode(text).unwrap();
    let n = tokens.len();
    // Scales spread over [0.25, 4], different per channel and block.
    let scales = |len: usize, salt: usize| -> Vec<f32> {
        (0..len)
            .map(|j| 2f32.powf(((j * 7919 + salt * 104729) % 1000) as f32 / 250.0 - 2.0))
            .collect()
    };
    let mut x = model.embed(&tokens).unwrap();
    for l in 0..c.num_hidden_layers {
        let w = model.block_weights(l).unwrap();
        let per_fold: Vec<Vec<f32>> = c
            .arch
            .scale_folds
            .iter()
            .enumerate()
            .map(|(i, (_, to))| {
                let consumer = w.linear(to[0]).unwrap();
                scales(consumer.shape[1], 3 * l + i)
            })
            .collect();
        let plan: Vec<Fold> = c
            .arch
            .scale_folds
            .iter()
            .zip(&per_fold)
            .map(|(&(from, to), s)| Fold {
                from,
                to,
                scales: s,
            })
            .collect();
        let expected = if c.arch.slot(model::arch::Slot::AttnNorm).is_some() {
            3
        } else {
            1
        };
        assert_eq!(plan.len(), expected, "{}: folds", c.arch.name);
        let folded = fold(&w, &plan).unwrap();
        model.forward_block(&folded, &mut x, n).unwrap();
    }
    let got = model.head_logits(&x, 0).unwrap();
    let want = model.logits(&tokens, 0).unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "{}: largest difference {worst} of the largest logit",
        path.display()
    );
}
