//! End-to-end on the real SmolLM2 model: round-to-nearest integer quantization of
//! every block linear, written with `HfQuantWriter` as GPTQ and as
//! compressed-tensors pack-quantized, checked by an independent numpy reader
//! (`scripts/check_gptq.py`) against the expected dequantized weights, and read
//! back through `Model::open` bit for bit.

use e2e::*;
use model::hf_quant::{HfQuantFormat, HfQuantWriter, IntLinear, IntQuantConfig};
use model::safetensors_file::{Dtype, SafetensorsFile, SafetensorsWriter};
use model::Model;
use std::collections::BTreeMap;
use std::path::Path;

/// Round-to-nearest of an HF-layout `out × inp` weight, GPTQ's min-max rule:
/// symmetric scale 2·max|x| / (2^b − 1) with zero 2^(b−1); asymmetric over
/// [min(x, 0), max(x, 0)] with zero round(−min/scale) kept in 1..2^b − 1 (GPTQ v1
/// cannot store 0). `order` puts column order[j] in group j / group_size (act-order).
fn rtn(
    w: &[f32],
    (out, inp): (usize, usize),
    bits: u32,
    group_size: usize,
    sym: bool,
    order: Option<&[usize]>,
) -> IntLinear {
    let maxq = (1u32 << bits) - 1;
    let ng = inp.div_ceil(group_size);
    let mut g_idx: Vec<u32> = (0..inp).map(|i| (i / group_size) as u32).collect();
    if let Some(order) = order {
        for (j, &col) in order.iter().enumerate() {
            g_idx[col] = (j / group_size) as u32;
        }
    }
    let mut members = vec![Vec::new(); ng];
    for (i, &g) in g_idx.iter().enumerate() {
        members[g as usize].push(i);
    }
    let mut q = IntLinear {
        out_features: out,
        in_features: inp,
        bits,
        group_size,
        codes: vec![0; out * inp],
        scales: vec![half::f16::ZERO; out * ng],
        zeros: vec![0; out * ng],
        g_idx,
    };
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        for (g, cols) in members.iter().enumerate() {
            let lo = cols.iter().map(|&i| row[i]).fold(0f32, f32::min);
            let hi = cols.iter().map(|&i| row[i]).fold(0f32, f32::max);
            let (scale, zero) = if sym {
                let m = lo.abs().max(hi);
                (2.0 * m / maxq as f32, maxq.div_ceil(2))
            } else {
                let s = (hi - lo) / maxq as f32;
                let z = if s > 0.0 { (-lo / s).round() } else { 1.0 };
                (s, (z as u32).clamp(1, maxq))
            };
            let s16 = half::f16::from_f32(if scale > 0.0 { scale } else { 1.0 });
            let s = s16.to_f32();
            q.scales[o * ng + g] = s16;
            q.zeros[o * ng + g] = zero as u8;
            for &i in cols {
                let c = (row[i] / s).round() + zero as f32;
                q.codes[o * inp + i] = c.clamp(0.0, maxq as f32) as u8;
            }
        }
    }
    q
}

/// One quantization to write and check.
struct Case {
    format: HfQuantFormat,
    cfg: IntQuantConfig,
    /// Blocks of the real model to keep (all 30 when None): the first ones, so the
    /// cheaper cases still use real weights and shapes.
    layers: Option<usize>,
}

impl Case {
    fn new(format: HfQuantFormat, bits: u32, group_size: Option<usize>, sym: bool) -> Self {
        Case {
            format,
            cfg: IntQuantConfig {
                bits,
                group_size: group_size.unwrap_or(0),
                per_channel: group_size.is_none(),
                sym,
                desc_act: false,
                static_groups: false,
                damp_percent: 0.01,
                true_sequential: true,
                method: "rtn".into(),
            },
            layers: None,
        }
    }

    fn act_order(mut self, static_groups: bool) -> Self {
        self.cfg.desc_act = true;
        self.cfg.static_groups = static_groups;
        self
    }

    fn layers(mut self, n: usize) -> Self {
        self.layers = Some(n);
        self
    }
}

/// Quantizes every block linear of the real model with `case`, writes the folder
/// and the reference, runs the numpy checker, re-opens the folder and compares.
/// Returns the checker's report.
fn run(case: &Case, dir: &Path) -> String {
    let mut model = Model::open(&real_model()).unwrap();
    if let Some(n) = case.layers {
        model.config.num_hidden_layers = n;
    }
    let out_dir = dir.join("model");
    let mut writer = HfQuantWriter::create(&out_dir, &model, case.format, &case.cfg).unwrap();
    let order = writer.order().to_vec();
    let mut linears = BTreeMap::new();
    for name in &order {
        let t = model.tensor(name).unwrap();
        let w = t.to_f32().unwrap();
        if model::hf_quant::is_block_linear(model.config.arch, name) {
            let (out, inp) = (t.shape[0], t.shape[1]);
            let gs = if case.cfg.per_channel {
                inp
            } else {
                case.cfg.group_size
            };
            // Act-order stand-in: columns by decreasing energy (groups follow
            // that order unless they are static).
            let permuted = case.cfg.desc_act && !case.cfg.static_groups;
            let act_order: Option<Vec<usize>> = permuted.then(|| {
                let energy: Vec<f32> = (0..inp)
                    .map(|i| (0..out).map(|o| w[o * inp + i].powi(2)).sum())
                    .collect();
                let mut cols: Vec<usize> = (0..inp).collect();
                cols.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]));
                cols
            });
            let q = rtn(
                &w,
                (out, inp),
                case.cfg.bits,
                gs,
                case.cfg.sym,
                act_order.as_deref(),
            );
            writer.write_linear(name, &q).unwrap();
            linears.insert(name.clone(), q);
        } else {
            writer.write_dense(name, &w).unwrap();
        }
    }
    writer.finish().unwrap();

    // The expected dequantized weights, f32 under the HF names.
    let reference = dir.join("reference.safetensors");
    let decl: Vec<_> = linears
        .iter()
        .map(|(n, q)| {
            let hf = model.config.arch.hf_from_canonical(n).unwrap();
            (hf, Dtype::F32, vec![q.out_features, q.in_features])
        })
        .collect();
    let mut w = SafetensorsWriter::create(&reference, &decl, &BTreeMap::new()).unwrap();
    for ((hf, _, _), q) in decl.iter().zip(linears.values()) {
        let bytes: Vec<u8> = q
            .dequantize()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write(hf, &bytes).unwrap();
    }
    w.finish().unwrap();
    let report = run_python("check_gptq.py", &[&out_dir, &reference]);
    let n = linears.len();
    assert_eq!(n, 7 * model.config.num_hidden_layers);
    assert!(
        report.contains("OK")
            && report.contains(&format!(" bits={} ", case.cfg.bits))
            && report.contains(&format!(
                " sym={}",
                if case.cfg.sym { "True" } else { "False" }
            ))
            && report.contains(&format!(": {n} of {n} linears equal REFERENCE exactly")),
        "{report}"
    );

    // Read back: dequantized linears equal the layers written, bit for bit; dense
    // tensors are the f16 rounding of the source.
    let back = Model::open(&out_dir).unwrap();
    let hq = back
        .quantized
        .as_ref()
        .expect("quantized linears recognised");
    assert_eq!(hq.format(), case.format);
    assert_eq!(hq.bits(), case.cfg.bits);
    assert_eq!(back.tensor_names(), model.tensor_names());
    assert_eq!(back.n_params().unwrap(), model.n_params().unwrap());
    assert_eq!(
        back.file_size(),
        std::fs::metadata(out_dir.join("model.safetensors"))
            .unwrap()
            .len()
    );
    for name in &order {
        let t = back.tensor(name).unwrap();
        assert_eq!(Some(t.shape.clone()), model.expected_shape(name), "{name}");
        let got = t.to_f32().unwrap();
        let want: Vec<f32> = match linears.get(name) {
            Some(q) => {
                assert_eq!(t.ty, kernels::GgmlType::F32, "{name}");
                assert_eq!(back.tensor_meta(name).unwrap().0, kernels::GgmlType::F32);
                assert_eq!(hq.linear(back_set(&back), name).unwrap().as_ref(), Some(q));
                q.dequantize()
            }
            None => model
                .tensor(name)
                .unwrap()
                .to_f32()
                .unwrap()
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
        };
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} differs after reading back"
        );
    }
    report
}

fn back_set(m: &Model) -> &model::safetensors_file::SafetensorsSet {
    match &m.checkpoint {
        model::checkpoint::Checkpoint::Safetensors(s) => s,
        _ => panic!("a safetensors checkpoint"),
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hf_quant")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

#[test]
fn gptq_whole_model_4bit_g128_act_order_agrees_with_the_numpy_reader_and_reads_back() {
    let dir = scratch();
    // 576 inputs are 4.5 groups of 128: the last group is short.
    let case = Case::new(HfQuantFormat::Gptq, 4, Some(128), true).act_order(false);
    let report = run(&case, dir.path());
    assert!(
        report.contains(
            "format=gptq bits=4 group_size=128 sym=True desc_act=True permuted_g_idx=True: 210 of 210"
        ),
        "{report}"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model/config.json")).unwrap())
            .unwrap();
    let qc = &cfg["quantization_config"];
    for (key, want) in [
        ("quant_method", serde_json::json!("gptq")),
        ("bits", 4.into()),
        ("group_size", 128.into()),
        ("desc_act", true.into()),
        ("sym", true.into()),
        ("static_groups", false.into()),
        ("checkpoint_format", "gptq".into()),
    ] {
        assert_eq!(qc[key], want, "{key}");
    }

    // A g_idx pointing past the groups is refused when the folder opens, naming the tensor.
    let st = dir.path().join("model/model.safetensors");
    let file = SafetensorsFile::open(&st).unwrap();
    let entry = file.tensors["model.layers.3.mlp.down_proj.g_idx"].clone();
    drop(file);
    let mut bytes = std::fs::read(&st).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = data_start + entry.start + 4 * 5;
    bytes[at..at + 4].copy_from_slice(&99i32.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let err = format!("{:#}", Model::open(st.parent().unwrap()).err().unwrap());
    assert!(
        err.contains("'model.layers.3.mlp.down_proj.g_idx' entry 5 is 99, outside the 12 groups"),
        "{err}"
    );
}

#[test]
fn gptq_3bit_8bit_2bit_layouts_agree_with_the_numpy_reader_and_read_back() {
    let dir = scratch();
    let cases = [
        Case::new(HfQuantFormat::Gptq, 3, None, false).layers(3),
        Case::new(HfQuantFormat::Gptq, 8, Some(32), false)
            .act_order(true)
            .layers(2),
        Case::new(HfQuantFormat::Gptq, 2, Some(64), true).layers(2),
    ];
    let lines = [
        "format=gptq bits=3 group_size=-1 sym=False desc_act=False permuted_g_idx=False: 21 of 21",
        "format=gptq bits=8 group_size=32 sym=False desc_act=True permuted_g_idx=False: 14 of 14",
        "format=gptq bits=2 group_size=64 sym=True desc_act=False permuted_g_idx=False: 14 of 14",
    ];
    for (i, (case, line)) in cases.iter().zip(lines).enumerate() {
        let report = run(case, &dir.path().join(i.to_string()));
        assert!(report.contains(line), "{report}");
    }

    // The checker does notice a wrong value: flip the lowest mantissa bit of the
    // last reference value.
    let reference = dir.path().join("0/reference.safetensors");
    let mut bytes = std::fs::read(&reference).unwrap();
    let last = bytes.len() - 4;
    bytes[last] ^= 1;
    std::fs::write(&reference, &bytes).unwrap();
    let out = std::process::Command::new(venv_python())
        .arg(repo_root().join("scripts/check_gptq.py"))
        .arg(dir.path().join("0/model"))
        .arg(&reference)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("FAIL") && text.contains("1 values differ"),
        "{text}"
    );
}

#[test]
fn compressed_tensors_layouts_agree_with_the_numpy_reader_and_read_back() {
    let dir = scratch();
    let cases = [
        Case::new(HfQuantFormat::CompressedTensors, 4, Some(64), false)
            .act_order(false)
            .layers(3),
        Case::new(HfQuantFormat::CompressedTensors, 8, None, true).layers(2),
        Case::new(HfQuantFormat::CompressedTensors, 2, Some(128), false).layers(2),
    ];
    let lines = [
        "format=compressed-tensors bits=4 group_size=64 sym=False desc_act=True permuted_g_idx=True: 21 of 21",
        "format=compressed-tensors bits=8 group_size=None sym=True desc_act=False permuted_g_idx=False: 14 of 14",
        "format=compressed-tensors bits=2 group_size=128 sym=False desc_act=False permuted_g_idx=False: 14 of 14",
    ];
    for (i, (case, line)) in cases.iter().zip(lines).enumerate() {
        let report = run(case, &dir.path().join(i.to_string()));
        assert!(report.contains(line), "{report}");
    }
    // The config the loaders read.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("0/model/config.json")).unwrap())
            .unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "pack-quantized");
    let w = &qc["config_groups"]["group_0"]["weights"];
    assert_eq!(
        (
            &w["num_bits"],
            &w["strategy"],
            &w["group_size"],
            &w["actorder"]
        ),
        (&4.into(), &"group".into(), &64.into(), &"group".into())
    );
    assert_eq!(cfg["num_hidden_layers"], 3);

    // 3-bit has no unambiguous pack-quantized layout: refused before anything is written.
    let model = Model::open(&real_model()).unwrap();
    let mut three = Case::new(HfQuantFormat::CompressedTensors, 3, Some(128), true);
    three.cfg.method = "gptq".into();
    let err = HfQuantWriter::create(&dir.path().join("c"), &model, three.format, &three.cfg)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("3-bit cannot be written"),
        "{err:#}"
    );
    assert!(!dir.path().join("c/model.safetensors").exists());
}
