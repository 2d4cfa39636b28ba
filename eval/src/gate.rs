//! Quality gates: thresholds checked against an evaluation report (the JSON of
//! `compress eval --base`), with a verdict per threshold, JUnit XML for CI test
//! reporters and a Markdown summary for a pull-request comment.

use crate::report::esc;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// The thresholds a gate can check; `None` is not checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    /// Largest mean KL divergence (nats).
    pub max_kld: Option<f64>,
    /// Largest 99th-percentile KL divergence (nats).
    pub max_kld_p99: Option<f64>,
    /// Largest relative perplexity increase over the base (0.05 = 5%).
    pub max_ppl_increase: Option<f64>,
    /// Smallest top-1 agreement with the base (fraction).
    pub min_top1: Option<f64>,
    /// Smallest compression ratio (base bytes / artifact bytes).
    pub min_compression: Option<f64>,
}

/// Keys of a thresholds file (and the flag names without `--`).
pub const KEYS: [&str; 5] = [
    "max-kld",
    "max-kld-p99",
    "max-ppl-increase",
    "min-top1",
    "min-compression",
];

/// Parses a threshold value: a number, or a percentage like `5%` (= 0.05).
/// Fractions (`max-ppl-increase`, `min-top1`) must lie in [0, 1] (0–100%);
/// the others must be non-negative (`min-compression` positive).
pub fn parse_value(key: &str, text: &str) -> Result<f64> {
    let t = text.trim();
    let (num, percent) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (t, false),
    };
    let mut v: f64 = num
        .parse()
        .map_err(|_| anyhow!("{key}: '{text}' is not a number or a percentage like 5%"))?;
    if percent {
        v /= 100.0;
    }
    check_value(key, v, text)?;
    Ok(v)
}

fn check_value(key: &str, v: f64, shown: &str) -> Result<()> {
    if !v.is_finite() {
        bail!("{key}: '{shown}' is not a finite number");
    }
    match key.trim_start_matches('-') {
        "max-ppl-increase" | "min-top1" if !(0.0..=1.0).contains(&v) => bail!(
            "{key}: '{shown}' makes no sense: it is a fraction between 0 and 1 (or 0% to 100%)"
        ),
        "min-compression" if v <= 0.0 => {
            bail!("{key}: '{shown}' makes no sense: a compression ratio is positive")
        }
        _ if v < 0.0 => bail!("{key}: '{shown}' makes no sense: it cannot be negative"),
        _ => Ok(()),
    }
}

impl Thresholds {
    /// Sets one threshold by its key.
    pub fn set(&mut self, key: &str, v: f64) -> Result<()> {
        let slot = match key {
            "max-kld" => &mut self.max_kld,
            "max-kld-p99" => &mut self.max_kld_p99,
            "max-ppl-increase" => &mut self.max_ppl_increase,
            "min-top1" => &mut self.min_top1,
            "min-compression" => &mut self.min_compression,
            _ => bail!("unknown threshold '{key}' (known: {})", KEYS.join(", ")),
        };
        *slot = Some(v);
        Ok(())
    }

    /// Reads thresholds from TOML: top-level keys or a `[gate]` table, with
    /// `-` or `_` in the names, numbers or strings like `"5%"`. Every problem is
    /// reported with the file name.
    pub fn from_toml(text: &str, file: &str) -> Result<Self> {
        let doc: toml::Table = text
            .parse()
            .with_context(|| format!("{file} is not valid TOML"))?;
        let table = match doc.get("gate") {
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => bail!("{file}: [gate] must be a table"),
            None => doc,
        };
        let mut t = Thresholds::default();
        let mut problems = Vec::new();
        for (k, v) in &table {
            let key = k.replace('_', "-");
            if !KEYS.contains(&key.as_str()) {
                problems.push(format!("unknown key '{k}' (known: {})", KEYS.join(", ")));
                continue;
            }
            let parsed = match v {
                toml::Value::Float(f) => check_value(&key, *f, &f.to_string()).map(|_| *f),
                toml::Value::Integer(i) => {
                    check_value(&key, *i as f64, &i.to_string()).map(|_| *i as f64)
                }
                toml::Value::String(s) => parse_value(&key, s),
                other => Err(anyhow!(
                    "{key}: expected a number or a string like \"5%\", found {}",
                    other.type_str()
                )),
            };
            match parsed {
                Ok(x) => t.set(&key, x)?,
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            bail!("{file}: {}", problems.join("; "));
        }
        Ok(t)
    }

    /// `other`'s thresholds where set, else these.
    pub fn overridden_by(&self, other: &Thresholds) -> Thresholds {
        Thresholds {
            max_kld: other.max_kld.or(self.max_kld),
            max_kld_p99: other.max_kld_p99.or(self.max_kld_p99),
            max_ppl_increase: other.max_ppl_increase.or(self.max_ppl_increase),
            min_top1: other.min_top1.or(self.min_top1),
            min_compression: other.min_compression.or(self.min_compression),
        }
    }

    /// Whether no threshold is set.
    pub fn is_empty(&self) -> bool {
        *self == Thresholds::default()
    }
}

/// The verdict on one threshold for one artifact.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The evaluated artifact.
    pub artifact: String,
    /// Threshold key (`max-kld`, …).
    pub check: String,
    /// The report field compared.
    pub metric: String,
    /// The threshold.
    pub threshold: f64,
    /// The measured value.
    pub measured: f64,
    /// Whether the threshold holds.
    pub pass: bool,
}

fn field(report: &Value, path: &[&str], what: &str) -> Result<f64> {
    let mut v = report;
    for p in path {
        v = v.get(p).ok_or_else(|| {
            anyhow!(
                "the report has no '{}' ({what}): make it with `compress eval ARTIFACT --base BASE --text FILE --json`",
                path.join(".")
            )
        })?;
    }
    v.as_f64()
        .ok_or_else(|| anyhow!("report field '{}' is not a number", path.join(".")))
}

/// Checks `t` against one evaluation report (a JSON object).
pub fn check(report: &Value, t: &Thresholds) -> Result<Vec<Outcome>> {
    if !report.is_object() {
        bail!("an evaluation report is a JSON object");
    }
    let artifact = report
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("artifact")
        .to_owned();
    let mut out = Vec::new();
    let mut push = |check: &str, metric: &str, threshold: f64, measured: f64, pass: bool| {
        out.push(Outcome {
            artifact: artifact.clone(),
            check: check.into(),
            metric: metric.into(),
            threshold,
            measured,
            pass,
        })
    };
    if let Some(x) = t.max_kld {
        let m = field(report, &["kld", "mean"], "mean KL divergence")?;
        push("max-kld", "kld.mean", x, m, m <= x);
    }
    if let Some(x) = t.max_kld_p99 {
        let m = field(report, &["kld", "p99"], "99th-percentile KL divergence")?;
        push("max-kld-p99", "kld.p99", x, m, m <= x);
    }
    if let Some(x) = t.max_ppl_increase {
        let p = field(report, &["perplexity", "perplexity"], "perplexity")?;
        let b = field(
            report,
            &["base_perplexity", "perplexity"],
            "base perplexity",
        )?;
        let m = p / b - 1.0;
        push(
            "max-ppl-increase",
            "perplexity / base_perplexity − 1",
            x,
            m,
            m <= x,
        );
    }
    if let Some(x) = t.min_top1 {
        let m = field(report, &["top1_agreement"], "top-1 agreement")?;
        push("min-top1", "top1_agreement", x, m, m >= x);
    }
    if let Some(x) = t.min_compression {
        let m = field(report, &["compression_ratio"], "compression ratio")?;
        push("min-compression", "compression_ratio", x, m, m >= x);
    }
    Ok(out)
}

fn describe(o: &Outcome) -> String {
    let op = if o.check.starts_with("max") {
        "≤"
    } else {
        "≥"
    };
    format!(
        "{} = {} (threshold {op} {})",
        o.metric,
        fmt(&o.check, o.measured),
        fmt(&o.check, o.threshold)
    )
}

fn fmt(check: &str, v: f64) -> String {
    match check {
        "max-ppl-increase" | "min-top1" => format!("{:.2}%", 100.0 * v),
        "min-compression" => format!("{v:.3}x"),
        _ => format!("{v:.6}"),
    }
}

/// JUnit XML: one test suite per artifact, one test case per threshold.
pub fn junit_xml(outcomes: &[Outcome]) -> String {
    let failures = outcomes.iter().filter(|o| !o.pass).count();
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"compress gate\" tests=\"{}\" failures=\"{failures}\">\n",
        outcomes.len()
    );
    let mut artifacts: Vec<&str> = outcomes.iter().map(|o| o.artifact.as_str()).collect();
    artifacts.dedup();
    for a in artifacts {
        let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.artifact == a).collect();
        s += &format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\">\n",
            esc(a),
            mine.len(),
            mine.iter().filter(|o| !o.pass).count()
        );
        for o in mine {
            s += &format!(
                "    <testcase classname=\"compress.gate\" name=\"{}\">",
                esc(&o.check)
            );
            if o.pass {
                s += &format!("<system-out>{}</system-out>", esc(&describe(o)));
            } else {
                s += &format!(
                    "<failure message=\"{}\" type=\"threshold\"/>",
                    esc(&describe(o))
                );
            }
            s += "</testcase>\n";
        }
        s += "  </testsuite>\n";
    }
    s + "</testsuites>\n"
}

/// A Markdown summary: verdict line and a table of every threshold.
pub fn markdown(outcomes: &[Outcome]) -> String {
    let failed = outcomes.iter().filter(|o| !o.pass).count();
    let mut s = if failed == 0 {
        format!("### ✅ Quality gate passed ({} checks)\n\n", outcomes.len())
    } else {
        format!(
            "### ❌ Quality gate failed ({failed} of {} checks)\n\n",
            outcomes.len()
        )
    };
    s += "| artifact | check | measured | threshold | result |\n|---|---|---|---|---|\n";
    for o in outcomes {
        let op = if o.check.starts_with("max") {
            "≤"
        } else {
            "≥"
        };
        s += &format!(
            "| `{}` | {} | {} | {op} {} | {} |\n",
            o.artifact.replace('|', "\\|"),
            o.check,
            fmt(&o.check, o.measured),
            fmt(&o.check, o.threshold),
            if o.pass { "pass" } else { "**FAIL**" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(kld: f64, top1: f64, ppl: f64, ratio: f64) -> Value {
        json!({
            "model": "m.gguf", "kld": {"mean": kld, "p99": kld * 5.0},
            "perplexity": {"perplexity": ppl}, "base_perplexity": {"perplexity": 40.0},
            "top1_agreement": top1, "compression_ratio": ratio,
        })
    }

    #[test]
    fn values_and_nonsense() {
        assert_eq!(parse_value("max-ppl-increase", "5%").unwrap(), 0.05);
        assert_eq!(parse_value("min-top1", "0.9").unwrap(), 0.9);
        assert!(parse_value("--min-top1", "150%").is_err());
        assert_eq!(parse_value("min-compression", "3").unwrap(), 3.0);
        for (k, v) in [
            ("max-kld", "-0.1"),
            ("min-top1", "150%"),
            ("min-top1", "1.5"),
            ("max-ppl-increase", "-5%"),
            ("min-compression", "0"),
            ("max-kld", "lots"),
            ("max-kld", "NaN"),
        ] {
            assert!(parse_value(k, v).is_err(), "{k} {v}");
        }
    }

    #[test]
    fn verdicts() {
        let t = Thresholds {
            max_kld: Some(0.05),
            max_ppl_increase: Some(0.05),
            min_top1: Some(0.9),
            min_compression: Some(3.0),
            max_kld_p99: None,
        };
        let good = check(&report(0.01, 0.95, 41.0, 3.7), &t).unwrap();
        assert!(good.iter().all(|o| o.pass) && good.len() == 4);
        let bad = check(&report(0.2, 0.7, 50.0, 6.0), &t).unwrap();
        let failed: Vec<_> = bad
            .iter()
            .filter(|o| !o.pass)
            .map(|o| &o.check[..])
            .collect();
        assert_eq!(failed, ["max-kld", "max-ppl-increase", "min-top1"]);
        let xml = junit_xml(&bad);
        assert_eq!(xml.matches("<testcase").count(), 4);
        assert_eq!(xml.matches("<failure").count(), 3);
        assert!(markdown(&bad).contains("failed (3 of 4"));
        // A threshold whose field is missing is an error, not a pass.
        let mut no_base = report(0.01, 0.95, 41.0, 3.7);
        no_base.as_object_mut().unwrap().remove("kld");
        assert!(check(&no_base, &t).is_err());
    }

    #[test]
    fn toml_thresholds() {
        let t = Thresholds::from_toml(
            "[gate]\nmax_kld = 0.05\nmax-ppl-increase = \"5%\"\nmin_top1 = 0.9\nmin_compression = 3\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(t.max_kld, Some(0.05));
        assert_eq!(t.max_ppl_increase, Some(0.05));
        assert_eq!(t.min_compression, Some(3.0));
        let e = Thresholds::from_toml("max_kdl = 1\nmin_top1 = 2\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_kdl") && e.contains("min-top1") && e.contains("g.toml"),
            "{e}"
        );
        let example = Thresholds::from_toml(
            include_str!("../../examples/gates.toml"),
            "examples/gates.toml",
        )
        .unwrap();
        assert_eq!(example.min_top1, Some(0.85));
        assert_eq!(example.max_ppl_increase, Some(0.05));
        let flags = Thresholds {
            max_kld: Some(0.01),
            ..Default::default()
        };
        assert_eq!(t.overridden_by(&flags).max_kld, Some(0.01));
    }
}
