//! `compress gate`: checks an evaluation report against quality thresholds for
//! CI. Exit code 0 when every threshold holds, 1 when one fails, 2 on bad input;
//! JUnit XML and a Markdown summary on request.

use anyhow::{bail, Context, Result};
use clap::Parser;
use eval::gate::{self, Thresholds};
use serde_json::Value;
use std::path::PathBuf;

/// Arguments of `compress gate`.
#[derive(Parser)]
pub struct Args {
    /// Evaluation report: the JSON of `compress eval ARTIFACT --base BASE --text FILE --json`
    /// (an array of reports gates every artifact in it).
    report: PathBuf,
    /// Largest mean KL divergence against the base (nats).
    #[arg(long, allow_hyphen_values = true)]
    max_kld: Option<String>,
    /// Largest 99th-percentile KL divergence (nats).
    #[arg(long, allow_hyphen_values = true)]
    max_kld_p99: Option<String>,
    /// Largest perplexity increase over the base: `5%` or `0.05`.
    #[arg(long, allow_hyphen_values = true)]
    max_ppl_increase: Option<String>,
    /// Smallest top-1 agreement with the base: `0.9` or `90%`.
    #[arg(long, allow_hyphen_values = true)]
    min_top1: Option<String>,
    /// Smallest compression ratio (base bytes / artifact bytes).
    #[arg(long, allow_hyphen_values = true)]
    min_compression: Option<String>,
    /// Thresholds from a TOML file (keys as the flags, `-` or `_`; top level or a
    /// `[gate]` table); flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write JUnit XML (one test case per threshold) here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Write the Markdown summary (for a pull-request comment) here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The base model the report must have been made against (checked by sha256).
    #[arg(long)]
    base: Option<String>,
}

/// Runs the gate; `Ok(true)` when every threshold holds.
pub fn run(a: Args) -> Result<bool> {
    let mut flags = Thresholds::default();
    for (key, v) in [
        ("max-kld", &a.max_kld),
        ("max-kld-p99", &a.max_kld_p99),
        ("max-ppl-increase", &a.max_ppl_increase),
        ("min-top1", &a.min_top1),
        ("min-compression", &a.min_compression),
    ] {
        if let Some(v) = v {
            flags.set(key, gate::parse_value(&format!("--{key}"), v)?)?;
        }
    }
    let thresholds = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Thresholds::from_toml(&text, &p.display().to_string())?.overridden_by(&flags)
        }
        None => flags,
    };
    if thresholds.is_empty() {
        bail!(
            "no thresholds: give at least one of --{} or --config FILE",
            gate::KEYS.join(", --")
        );
    }
    let text = std::fs::read_to_string(&a.report)
        .with_context(|| format!("cannot read {}", a.report.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", a.report.display()))?;
    let reports = match value {
        Value::Array(v) if v.is_empty() => bail!("{} holds no reports", a.report.display()),
        Value::Array(v) => v,
        v => vec![v],
    };
    let base_sha = match &a.base {
        Some(b) => {
            let path = crate::resolve(b)?;
            Some(model::io::model_sha256(&model::Model::open(&path)?)?)
        }
        None => None,
    };
    let mut outcomes = Vec::new();
    for r in &reports {
        if let Some(want) = &base_sha {
            let got = r
                .get("base_sha256")
                .and_then(Value::as_str)
                .unwrap_or("none");
            if got != want {
                bail!(
                    "{} was evaluated against another base (sha256 {got}); --base has sha256 {want}",
                    a.report.display()
                );
            }
        }
        outcomes
            .extend(gate::check(r, &thresholds).with_context(|| a.report.display().to_string())?);
    }
    let md = gate::markdown(&outcomes);
    if let Some(p) = &a.junit {
        model::io::write_atomic(p, gate::junit_xml(&outcomes).as_bytes())?;
    }
    if let Some(p) = &a.markdown {
        model::io::write_atomic(p, md.as_bytes())?;
    }
    println!("{md}");
    Ok(outcomes.iter().all(|o| o.pass))
}
