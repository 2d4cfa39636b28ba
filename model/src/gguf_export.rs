//! What a GGUF artifact of a model carries besides its tensors: the metadata
//! (architecture hyperparameters, tokenizer, file type) and the GGUF names,
//! shapes and row layout of each tensor.

use crate::checkpoint::{permute_qk_rows, Checkpoint, Model};
use crate::config::{ModelConfig, RopeScaling};
use crate::gguf::{GgufSplit, GgufWriter, MetaValue, TensorDecl, SPLIT_KEYS};
use anyhow::{bail, Result};
use kernels::GgmlType;
use std::path::PathBuf;

/// Keys the writer sets itself and never copies from a source file.
const OWN_KEYS: [&str; 6] = [
    "split.no",
    "split.count",
    "split.tensors.count",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
];

/// Where a GGUF artifact goes and what its files carry besides the model's own
/// metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufOutput {
    /// Destination (split files are named from it without `.gguf`).
    pub path: PathBuf,
    /// How the tensors are divided into files.
    pub split: GgufSplit,
    /// Metadata set over the model's, in order (`--override-kv`).
    pub kv_overrides: Vec<(String, MetaValue)>,
}

impl GgufOutput {
    /// One file at `path`, the model's metadata as it is.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        GgufOutput {
            path: path.into(),
            ..Default::default()
        }
    }

    /// Starts the artifact of `model` with `general.file_type = file_type` and
    /// these tensors: the model's metadata with the overrides applied.
    pub fn create(
        &self,
        model: &Model,
        file_type: u32,
        decls: &[TensorDecl],
    ) -> Result<GgufWriter> {
        GgufWriter::create_split(
            &self.path,
            &self.metadata(model, file_type)?,
            decls,
            &self.split,
        )
    }

    /// The files [`GgufOutput::create`] would write and the size of each in
    /// bytes, writing nothing (`quantize --dry-run`).
    pub fn planned_sizes(
        &self,
        model: &Model,
        file_type: u32,
        decls: &[TensorDecl],
    ) -> Result<Vec<(PathBuf, u64)>> {
        GgufWriter::planned_sizes(
            &self.path,
            &self.metadata(model, file_type)?,
            decls,
            &self.split,
        )
    }

    fn metadata(&self, model: &Model, file_type: u32) -> Result<Vec<(String, MetaValue)>> {
        let mut kv = metadata(model, file_type)?;
        apply_kv_overrides(&mut kv, &self.kv_overrides)?;
        Ok(kv)
    }
}

/// Parses llama.cpp's `--override-kv KEY=TYPE:VALUE`, TYPE one of `int` (written
/// as u32, as llama-quantize writes it), `float` (f32), `bool` (`true` or
/// `false`) and `str`.
pub fn parse_kv_override(text: &str) -> Result<(String, MetaValue)> {
    let Some((key, typed)) = text.split_once('=') else {
        bail!("--override-kv '{text}' is not KEY=TYPE:VALUE (e.g. general.name=str:mine)");
    };
    if key.is_empty() {
        bail!("--override-kv '{text}' has no key");
    }
    if SPLIT_KEYS.contains(&key) {
        bail!(
            "--override-kv '{text}': the split keys are set by --split-max-size and --keep-split"
        );
    }
    let Some((ty, value)) = typed.split_once(':') else {
        bail!("--override-kv '{text}' has no TYPE: int, float, bool or str before the value");
    };
    let bad = |what: &str| anyhow::anyhow!("--override-kv '{text}': '{value}' is not {what}");
    let value = match ty {
        "int" => MetaValue::U32(
            value
                .parse::<i64>()
                .ok()
                .and_then(|v| u32::try_from(v.unsigned_abs()).ok())
                .ok_or_else(|| bad("an integer that fits in 32 bits"))?,
        ),
        "float" => MetaValue::F32(
            value
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad("a finite number"))?,
        ),
        "bool" => MetaValue::Bool(match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad("true or false")),
        }),
        "str" => MetaValue::String(value.to_owned()),
        other => bail!("--override-kv '{text}': type '{other}' is not int, float, bool or str"),
    };
    Ok((key.to_owned(), value))
}

/// Sets each override over `kv`: a key that is there keeps its place and must
/// hold the same kind of value (an integer for `int`, a float for `float`, …);
/// a new key goes at the end.
pub fn apply_kv_overrides(
    kv: &mut Vec<(String, MetaValue)>,
    overrides: &[(String, MetaValue)],
) -> Result<()> {
    let kind = |v: &MetaValue| match v {
        MetaValue::F32(_) | MetaValue::F64(_) => "float",
        MetaValue::Bool(_) => "bool",
        MetaValue::String(_) => "str",
        MetaValue::Array(..) => "array",
        _ => "int",
    };
    for (k, v) in overrides {
        match kv.iter_mut().find(|(key, _)| key == k) {
            Some(slot) if kind(&slot.1) != kind(v) => bail!(
                "--override-kv {k}: the model holds {} of kind {}, the override is of kind {}",
                slot.1,
                kind(&slot.1),
                kind(v)
            ),
            Some(slot) => slot.1 = v.clone(),
            None => kv.push((k.clone(), v.clone())),
        }
    }
    Ok(())
}

fn strings(v: &[String]) -> MetaValue {
    MetaValue::Array(8, v.iter().map(|s| MetaValue::String(s.clone())).collect())
}

/// Metadata for a GGUF of `model` with `general.file_type = file_type`: a GGUF
/// source's keys are copied through (tokenizer, chat template, names); a
/// safetensors source's are built from its config and tokenizer.
pub fn metadata(model: &Model, file_type: u32) -> Result<Vec<(String, MetaValue)>> {
    let mut kv: Vec<(String, MetaValue)> = match &model.checkpoint {
        Checkpoint::Gguf(g) => {
            let mut kv: Vec<(String, MetaValue)> = g
                .metadata
                .iter()
                .filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()))
                .cloned()
                .collect();
            if let Some(map) = &model.layer_map {
                reindex_layers(&mut kv, model.config.arch.gguf_name, map);
            }
            kv
        }
        Checkpoint::Safetensors(_) => {
            let c = &model.config;
            let arch = c.arch.gguf_name;
            let key = |k: &str| format!("{arch}.{k}");
            let name = model
                .path
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let mut kv = vec![
                (
                    "general.architecture".to_owned(),
                    MetaValue::String(arch.into()),
                ),
                ("general.name".to_owned(), MetaValue::String(name)),
                (
                    key("context_length"),
                    MetaValue::U32(c.max_position_embeddings as u32),
                ),
                (
                    key("embedding_length"),
                    MetaValue::U32(c.hidden_size as u32),
                ),
                (
                    key("block_count"),
                    MetaValue::U32(c.num_hidden_layers as u32),
                ),
                (
                    key("feed_forward_length"),
                    MetaValue::U32(c.intermediate_size as u32),
                ),
                (
                    key("rope.dimension_count"),
                    MetaValue::U32(c.head_dim as u32),
                ),
                (
                    key("attention.head_count"),
                    MetaValue::U32(c.num_attention_heads as u32),
                ),
                (
                    key("attention.head_count_kv"),
                    MetaValue::U32(c.num_key_value_heads as u32),
                ),
                (
                    key("attention.layer_norm_rms_epsilon"),
                    MetaValue::F32(c.rms_norm_eps as f32),
                ),
                (key("rope.freq_base"), MetaValue::F32(c.rope_theta as f32)),
                (key("vocab_size"), MetaValue::U32(c.vocab_size as u32)),
            ];
            match &c.rope_scaling {
                Some(RopeScaling::Linear { factor }) => {
                    kv.push((key("rope.scaling.type"), MetaValue::String("linear".into())));
                    kv.push((key("rope.scaling.factor"), MetaValue::F32(*factor as f32)));
                }
                Some(RopeScaling::Yarn(y)) => kv.extend(yarn_keys(y, arch)),
                _ => {}
            }
            if c.head_dim * c.num_attention_heads != c.hidden_size {
                kv.push((
                    key("attention.key_length"),
                    MetaValue::U32(c.head_dim as u32),
                ));
                kv.push((
                    key("attention.value_length"),
                    MetaValue::U32(c.head_dim as u32),
                ));
            }
            // The family's keys replace shared ones of the same name.
            for (k, v) in (c.arch.gguf_extra)(c) {
                match kv.iter_mut().find(|(x, _)| *x == k) {
                    Some(slot) => slot.1 = v,
                    None => kv.push((k, v)),
                }
            }
            if let Some(caveat) = (c.arch.gguf_caveat)(c) {
                eprintln!("note: {caveat}");
            }
            let v = model.tokenizer.to_gguf_vocab()?;
            kv.push((
                "tokenizer.ggml.model".to_owned(),
                MetaValue::String(v.model.clone()),
            ));
            if let Some(pre) = &v.pre {
                kv.push((
                    "tokenizer.ggml.pre".to_owned(),
                    MetaValue::String(pre.clone()),
                ));
            }
            kv.push(("tokenizer.ggml.tokens".to_owned(), strings(&v.tokens)));
            if let Some(scores) = &v.scores {
                kv.push((
                    "tokenizer.ggml.scores".to_owned(),
                    MetaValue::Array(6, scores.iter().map(|&s| MetaValue::F32(s)).collect()),
                ));
            }
            if let Some(types) = &v.token_types {
                kv.push((
                    "tokenizer.ggml.token_type".to_owned(),
                    MetaValue::Array(5, types.iter().map(|&t| MetaValue::I32(t)).collect()),
                ));
            }
            if let Some(merges) = &v.merges {
                kv.push(("tokenizer.ggml.merges".to_owned(), strings(merges)));
            }
            let ids = [
                ("tokenizer.ggml.bos_token_id", v.bos),
                ("tokenizer.ggml.eos_token_id", v.eos),
                ("tokenizer.ggml.unknown_token_id", v.unk),
                ("tokenizer.ggml.padding_token_id", v.pad),
            ];
            for (k, id) in ids {
                if let Some(id) = id {
                    kv.push((k.to_owned(), MetaValue::U32(id)));
                }
            }
            for (k, b) in [
                ("tokenizer.ggml.add_bos_token", v.add_bos),
                ("tokenizer.ggml.add_eos_token", v.add_eos),
            ] {
                if let Some(b) = b {
                    kv.push((k.to_owned(), MetaValue::Bool(b)));
                }
            }
            kv
        }
    };
    kv.push(("general.quantization_version".to_owned(), MetaValue::U32(2)));
    kv.push(("general.file_type".to_owned(), MetaValue::U32(file_type)));
    Ok(kv)
}

/// Sets the `{arch}.*` keys that follow from the shapes, and the family's own
/// keys (a layer pattern), to `c`'s values, replacing the source's (a
/// structured cut changes them).
pub fn set_shape_keys(kv: &mut Vec<(String, MetaValue)>, c: &ModelConfig) {
    let extra = (c.arch.gguf_extra)(c);
    kv.retain(|(k, _)| !extra.iter().any(|(name, _)| name == k));
    kv.extend(extra);
    let arch = c.arch.gguf_name;
    let keys = [
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_hidden_layers),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
    ]
    .map(|(k, v)| (format!("{arch}.{k}"), v));
    kv.retain(|(k, _)| !keys.iter().any(|(name, _)| name == k));
    kv.extend(
        keys.iter()
            .map(|(k, v)| (k.clone(), MetaValue::U32(*v as u32))),
    );
}

/// The GGUF declaration of canonical tensor `name` (HF shape outermost first)
/// stored as `ty`.
pub fn tensor_decl(name: &str, shape: &[usize], ty: GgmlType) -> TensorDecl {
    TensorDecl {
        name: name.to_owned(),
        dims: shape.iter().rev().map(|&d| d as u64).collect(),
        ty,
    }
}

/// The metadata of a GGUF whose blocks were pruned ([`Model::prune_layers`]):
/// `{arch}.block_count` is the kept count, and every `{arch}.*` array with one
/// entry per block of the source (per-layer head counts, FFN widths, window
/// flags) keeps the kept blocks' entries in order.
fn reindex_layers(kv: &mut [(String, MetaValue)], arch: &str, map: &crate::checkpoint::LayerMap) {
    let prefix = format!("{arch}.");
    for (k, v) in kv.iter_mut() {
        if !k.starts_with(&prefix) {
            continue;
        }
        if k == &format!("{arch}.block_count") {
            *v = MetaValue::U32(map.kept.len() as u32);
        } else if let MetaValue::Array(ty, items) = v {
            if items.len() == map.source_layers {
                *v = MetaValue::Array(*ty, map.kept.iter().map(|&l| items[l].clone()).collect());
            }
        }
    }
}

/// Whether llama.cpp (0c1e570) multiplies the output of weight `name` by a
/// `NAME.scale` tensor in this architecture's graph. Its loader reads such a
/// tensor for every projection of every architecture, but only some graphs
/// apply it (Qwen2's, Gemma 3's and OLMo 2's MLPs pass no scale); a scale the
/// graph ignores would change what the file computes, so only these get one:
/// the output head everywhere; Q, K, V and the attention output where the graph
/// builds them with `build_qkv` and passes `wo_s` (checked for llama, qwen2,
/// qwen3, gemma3, olmo2, smollm3, qwen3moe, olmoe); the MLP of llama and qwen3;
/// the routed experts of llama (Mixtral) and qwen3moe.
pub fn llama_cpp_applies_scale(cfg: &ModelConfig, name: &str) -> bool {
    use crate::arch::{Role, Slot};
    let arch = cfg.arch;
    if arch.role(name) == Some(Role::Head) {
        return true;
    }
    let Some(slot) = arch.spec(name).and_then(|s| s.slot) else {
        return false;
    };
    let g = arch.gguf_name;
    let attention = [
        "llama", "qwen2", "qwen3", "gemma3", "olmo2", "smollm3", "qwen3moe", "olmoe",
    ];
    match slot {
        Slot::Q | Slot::K | Slot::V | Slot::O => attention.contains(&g),
        Slot::Gate | Slot::Up | Slot::Down if name.contains("_exps") => {
            ["llama", "qwen3moe"].contains(&g)
        }
        Slot::Gate | Slot::Up | Slot::Down => ["llama", "qwen3"].contains(&g),
        _ => false,
    }
}

/// Rows of an HF-layout tensor (any storage, whole rows; a vector's rows are its
/// elements) in GGUF order: where the architecture says so (llama's Q and K),
/// permuted for llama.cpp's interleaved RoPE; everything else is unchanged.
pub fn to_gguf_rows(model: &Model, name: &str, rows: usize, data: Vec<u8>) -> Vec<u8> {
    match model.config.arch.gguf_permuted_heads(name, &model.config) {
        Some(heads) => {
            // A bias is permuted element by element.
            let rows = match model.expected_shape(name).as_deref() {
                Some(&[n]) => n,
                _ => rows,
            };
            permute_qk_rows(&data, rows, heads)
        }
        None => data,
    }
}

/// The `{arch}.rope.scaling.*` keys of YaRN as llama.cpp's converter writes
/// them and llama.cpp reads them back (see `config::yarn_from_gguf`): for
/// `deepseek2` `yarn_log_multiplier = 0.1·mscale_all_dim`; an explicit
/// attention factor divided by llama.cpp's default, which it multiplies in.
fn yarn_keys(y: &crate::config::Yarn, arch: &str) -> Vec<(String, MetaValue)> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let mut kv = vec![
        (key("type"), MetaValue::String("yarn".into())),
        (key("factor"), MetaValue::F32(y.factor as f32)),
        (
            key("original_context_length"),
            MetaValue::U32(y.original_max_position_embeddings as u32),
        ),
        (key("yarn_beta_fast"), MetaValue::F32(y.beta_fast as f32)),
        (key("yarn_beta_slow"), MetaValue::F32(y.beta_slow as f32)),
    ];
    if let (Some(all), "deepseek2") = (y.mscale_all_dim, arch) {
        kv.push((
            key("yarn_log_multiplier"),
            MetaValue::F32((0.1 * all) as f32),
        ));
    }
    if let Some(a) = y.explicit_attention_factor {
        let default = 0.1 * y.factor.ln() + 1.0;
        kv.push((
            key("yarn_attn_factor"),
            MetaValue::F32((a / default) as f32),
        ));
    }
    kv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_overrides_parse_as_llama_cpp_writes_them_and_bad_ones_are_refused() {
        assert_eq!(
            parse_kv_override("llama.context_length=int:-4096").unwrap(),
            ("llama.context_length".into(), MetaValue::U32(4096))
        );
        assert_eq!(
            parse_kv_override("a.b=float:0.5").unwrap().1,
            MetaValue::F32(0.5)
        );
        assert_eq!(
            parse_kv_override("general.name=str:x=y:z").unwrap().1,
            MetaValue::String("x=y:z".into())
        );
        assert_eq!(
            parse_kv_override("a=bool:true").unwrap().1,
            MetaValue::Bool(true)
        );
        for bad in [
            "a",
            "=int:1",
            "a=1",
            "a=int:x",
            "a=int:5000000000",
            "a=float:nan",
            "a=bool:yes",
            "a=u8:1",
            "split.count=int:2",
        ] {
            assert!(parse_kv_override(bad).is_err(), "{bad}");
        }
        let mut kv = vec![
            ("n".to_owned(), MetaValue::U32(1)),
            ("s".to_owned(), MetaValue::String("a".into())),
        ];
        apply_kv_overrides(
            &mut kv,
            &[
                ("s".into(), MetaValue::String("b".into())),
                ("new".into(), MetaValue::Bool(false)),
            ],
        )
        .unwrap();
        assert_eq!(kv[1].1, MetaValue::String("b".into()));
        assert_eq!(kv[2].0, "new");
        let err = apply_kv_overrides(&mut kv, &[("n".into(), MetaValue::String("x".into()))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kind int, the override is of kind str"),
            "{err}"
        );
    }
}
