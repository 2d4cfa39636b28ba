//! Renders a [`SensitivityReport`] for people to read: a Markdown summary (the
//! most sensitive units, the size/KLD mixes) and one self-contained HTML page
//! with inline SVG plots (a unit × setting heatmap, KLD against bits per weight
//! per tensor kind, the size/KLD plane) and the ranking table.
//!
//! The HTML page references nothing outside itself (no scripts, fonts,
//! stylesheets or URLs), so it can be archived or mailed as one file. Every
//! piece of text taken from the report is escaped, and every number placed in
//! an SVG coordinate is finite: zero or negative KLDs are clamped to
//! [`KLD_FLOOR`] on log scales, NaN measurements are drawn as "n/a".

use crate::sensitivity::{Cell, MixPoint, SensitivityReport, SettingKind, Unit};
use std::collections::HashMap;
use std::fmt::Write as _;

/// Smallest KLD placed on a log scale: exact zeros (and negative rounding
/// noise) are drawn here.
pub const KLD_FLOOR: f64 = 1e-7;

/// Ranked units listed in the HTML page's table.
const HTML_TOP: usize = 30;

/// `write!` into a `String`, which cannot fail.
macro_rules! put {
    ($dst:expr, $($arg:tt)*) => {{
        let _ = write!($dst, $($arg)*);
    }};
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// The report as Markdown: a heading, a paragraph saying what was measured
/// and how, a table of the `top` most sensitive units (KLD per setting, the
/// applied type in parentheses where it differs from the setting's), and a
/// table of the allocator's Pareto mixes and the uniform mixes when present.
pub fn markdown(r: &SensitivityReport, top: usize) -> String {
    let v = View::new(r);
    let mut s = String::new();
    put!(s, "# Per-layer sensitivity: {}\n\n", md_text(&r.model));
    s.push_str(&summary(r, &v, &md_code));
    s.push_str("\n\n");

    if r.units.is_empty() {
        s.push_str("No units were measured.\n");
    } else {
        let n = top.min(r.units.len());
        put!(
            s,
            "## Most sensitive units (top {n} of {})\n\n",
            r.units.len()
        );
        s.push_str(
            "KLD in nats added by changing only that unit; the applied type is in \
             parentheses where it differs from the setting; — = not measured.\n\n",
        );
        s.push_str("| rank | unit | params | mean KLD |");
        for st in &r.settings {
            put!(s, " {} |", md_text(&setting_header(&st.name, st.kind)));
        }
        s.push_str("\n|---:|:---|---:|---:|");
        for _ in &r.settings {
            s.push_str("---:|");
        }
        s.push('\n');
        for &u in v.ranked.iter().take(n) {
            let unit = &r.units[u];
            put!(
                s,
                "| {} | {} | {} | {} |",
                unit.rank,
                md_code(&unit.name),
                fmt_count(unit.params),
                fmt_kld(unit.score)
            );
            for (si, st) in r.settings.iter().enumerate() {
                match v.cell(u, si) {
                    None => s.push_str(" — |"),
                    Some(c) => {
                        put!(s, " {}", fmt_kld(c.shift.kld));
                        if let Some(a) = applied_note(&c.applied, &st.name) {
                            put!(s, " ({})", md_text(&a));
                        }
                        s.push_str(" |");
                    }
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }

    if !r.pareto.is_empty() || !r.uniform.is_empty() {
        s.push_str("## Mixes on the size/KLD plane\n\n");
        s.push_str("Predicted KLD is the sum of the measured single-unit KLDs of the mix.\n\n");
        s.push_str("| mix | kind | MB | bpw | predicted KLD |\n|:---|:---|---:|---:|---:|\n");
        for (kind, pts) in [("allocator", &r.pareto), ("uniform", &r.uniform)] {
            for p in sorted_by_bpw(pts) {
                put!(
                    s,
                    "| {} | {kind} | {} | {} | {} |\n",
                    md_text(&p.label),
                    fmt_mb(p.bytes),
                    fmt_bpw(p.bits_per_weight),
                    fmt_kld(p.predicted_kld)
                );
            }
        }
        s.push('\n');
    }
    s
}

/// Markdown text in a table or paragraph: pipes, backslashes and newlines
/// must not break the table.
fn md_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// A Markdown code span that survives backticks and pipes in the text.
fn md_code(s: &str) -> String {
    let t = s.replace('|', "\\|").replace(['\n', '\r'], " ");
    if t.contains('`') {
        format!("`` {t} ``")
    } else {
        format!("`{t}`")
    }
}

// ---------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------

/// Indexes over a report that both renderers need.
struct View<'a> {
    r: &'a SensitivityReport,
    /// (unit, setting) → cell; cells pointing outside `units`/`settings` are dropped.
    cells: HashMap<(usize, usize), &'a Cell>,
    /// Unit indices in model order: token_embd, blocks in order, then the rest.
    order: Vec<usize>,
    /// Unit indices, most sensitive first.
    ranked: Vec<usize>,
    /// Tensor kind of each unit (`ffn_down.weight`, `token_embd.weight`, `block`).
    kind: Vec<usize>,
    /// Distinct kinds, in model order of first appearance.
    kinds: Vec<String>,
    /// Colour scale over the measured KLDs.
    scale: Scale,
}

impl<'a> View<'a> {
    fn new(r: &'a SensitivityReport) -> Self {
        let mut cells = HashMap::new();
        for c in &r.cells {
            if c.unit < r.units.len() && c.setting < r.settings.len() {
                cells.entry((c.unit, c.setting)).or_insert(c);
            }
        }
        let order = model_order(&r.units);
        let mut ranked: Vec<usize> = (0..r.units.len()).collect();
        ranked.sort_by(|&a, &b| {
            let (ua, ub) = (&r.units[a], &r.units[b]);
            ua.rank
                .cmp(&ub.rank)
                .then(nan_low(ub.score).total_cmp(&nan_low(ua.score)))
        });
        let mut kinds: Vec<String> = Vec::new();
        let mut kind = vec![0; r.units.len()];
        for &u in &order {
            let k = kind_of(&r.units[u]);
            kind[u] = match kinds.iter().position(|x| *x == k) {
                Some(i) => i,
                None => {
                    kinds.push(k);
                    kinds.len() - 1
                }
            };
        }
        let scale = Scale::over(cells.values().map(|c| c.shift.kld));
        View {
            r,
            cells,
            order,
            ranked,
            kind,
            kinds,
            scale,
        }
    }

    fn cell(&self, unit: usize, setting: usize) -> Option<&'a Cell> {
        self.cells.get(&(unit, setting)).copied()
    }
}

/// NaN sorts below every number.
fn nan_low(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

/// Block index of a unit, from the field or from its canonical name.
fn block_of(u: &Unit) -> Option<usize> {
    u.block.or_else(|| model::names::block_index(&u.name))
}

/// The unit's name without its block prefix; `block` for a whole block.
fn kind_of(u: &Unit) -> String {
    match model::arch::split_block(&u.name) {
        Some((_, suffix)) => suffix.to_string(),
        None if block_of(u).is_some() => "block".to_string(),
        None => u.name.clone(),
    }
}

/// Whether a unit is the token embedding (GGUF's name for it in every
/// architecture; the report keeps names, not the model).
fn is_embedding(u: &Unit) -> bool {
    u.name.starts_with("token_embd")
}

/// The embedding first, then the blocks in order (a block's units in their
/// order in `units`), then everything else in its order.
fn model_order(units: &[Unit]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| match block_of(&units[i]) {
        _ if is_embedding(&units[i]) => (0, 0),
        Some(b) => (1, b),
        None => (2, 0),
    });
    order
}

/// The summary paragraph; `code` renders names (Markdown code span or HTML `<code>`).
fn summary(r: &SensitivityReport, v: &View, code: &dyn Fn(&str) -> String) -> String {
    let what = if r.granularity == "block" {
        "one whole block"
    } else {
        "one tensor"
    };
    let quant = r
        .settings
        .iter()
        .filter(|s| s.kind == SettingKind::Quant)
        .count();
    let weighting = match &r.imatrix {
        Some(m) => format!("weighted by the importance matrix from {}", code(m)),
        None => "unweighted (no importance matrix)".to_string(),
    };
    let mut s = format!(
        "Model {} ({} parameters). Each measurement quantizes or prunes {what} and \
         leaves the rest at base, then records the mean KL divergence (nats) of the \
         next-token distribution from the unchanged model's. Text: {}, {} chunks × {} \
         tokens, {} scored tokens per measurement. Granularity: {}. Quantization is \
         {weighting}",
        code(&r.model),
        fmt_count(r.model_params),
        code(&r.text),
        r.chunks,
        r.ctx,
        r.scored_tokens,
        code(&r.granularity),
    );
    if !r.calib.is_empty() && quant > 0 {
        put!(s, "; calibration text {}", code(&r.calib));
    }
    put!(
        s,
        ". {} units × {} settings: {} measurements in {} (base run {}).",
        r.units.len(),
        r.settings.len(),
        v.cells.len(),
        fmt_secs(r.seconds),
        fmt_secs(r.base_seconds)
    );
    s
}

/// The column header of a setting: the type, or `prune 0.5`.
fn setting_header(name: &str, kind: SettingKind) -> String {
    match kind {
        SettingKind::Quant => name.to_string(),
        SettingKind::Sparsity => format!("prune {name}"),
    }
}

/// The applied type(s) when they differ from the setting's name: distinct
/// types of a `+`-joined list, in order.
fn applied_note(applied: &str, setting: &str) -> Option<String> {
    if applied.is_empty() || applied == setting {
        return None;
    }
    let mut seen: Vec<&str> = Vec::new();
    for a in applied.split('+') {
        if !seen.contains(&a) {
            seen.push(a);
        }
    }
    if seen == [setting] {
        return None;
    }
    Some(seen.join("+"))
}

fn sorted_by_bpw(pts: &[MixPoint]) -> Vec<&MixPoint> {
    let mut v: Vec<&MixPoint> = pts.iter().collect();
    v.sort_by(|a, b| nan_low(a.bits_per_weight).total_cmp(&nan_low(b.bits_per_weight)));
    v
}

/// A KLD in a table: `0.0123`, `1.2e-5`, `0`, `n/a`.
fn fmt_kld(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_string();
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.4}")
    } else {
        format!("{x:.1e}")
    }
}

/// A count of weights: `576`, `12.3K`, `4.72M`, `1.71B`.
fn fmt_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// Bytes as decimal megabytes.
fn fmt_mb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / 1e6)
}

fn fmt_bpw(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "n/a".to_string()
    }
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "? s".to_string();
    }
    if s < 120.0 {
        return format!("{s:.1} s");
    }
    let t = s.round() as u64;
    if t < 7200 {
        format!("{} min {} s", t / 60, t % 60)
    } else {
        format!("{} h {} min", t / 3600, (t % 3600) / 60)
    }
}

// ---------------------------------------------------------------------------
// Colours and scales
// ---------------------------------------------------------------------------

/// log10 of a KLD, clamped to the floor.
fn log_kld(k: f64) -> f64 {
    if k.is_finite() {
        k.max(KLD_FLOOR).log10()
    } else {
        KLD_FLOOR.log10()
    }
}

/// Sequential colour scale over log10(KLD).
#[derive(Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
}

impl Scale {
    fn over(klds: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for k in klds.filter(|k| k.is_finite()) {
            let l = log_kld(k);
            lo = lo.min(l);
            hi = hi.max(l);
        }
        if !lo.is_finite() || !hi.is_finite() {
            return Scale { lo: -6.0, hi: 0.0 };
        }
        if hi - lo < 1e-9 {
            return Scale {
                lo: lo - 0.5,
                hi: hi + 0.5,
            };
        }
        Scale { lo, hi }
    }

    /// 0 at the smallest KLD, 1 at the largest.
    fn t(&self, kld: f64) -> f64 {
        let t = (log_kld(kld) - self.lo) / (self.hi - self.lo);
        if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Light (yellow) for small KLD, dark (purple) for large.
    fn rgb(&self, kld: f64) -> [u8; 3] {
        viridis(1.0 - self.t(kld))
    }
}

/// Viridis, sampled at nine points.
const VIRIDIS: [[u8; 3]; 9] = [
    [0x44, 0x01, 0x54],
    [0x47, 0x2d, 0x7b],
    [0x3b, 0x52, 0x8b],
    [0x2c, 0x72, 0x8e],
    [0x21, 0x91, 0x8c],
    [0x28, 0xae, 0x80],
    [0x5e, 0xc9, 0x62],
    [0xad, 0xdc, 0x30],
    [0xfd, 0xe7, 0x25],
];

fn viridis(t: f64) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |k: usize| (a[k] as f64 + (b[k] as f64 - a[k] as f64) * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Text colour that reads on background `c`.
fn ink_on(c: [u8; 3]) -> &'static str {
    let l = 0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64;
    if l < 120.0 {
        "#ffffff"
    } else {
        "#1f2328"
    }
}

/// Categorical colours for tensor kinds (Tableau 10).
const KIND_COLOURS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

fn kind_colour(k: usize) -> &'static str {
    KIND_COLOURS[k % KIND_COLOURS.len()]
}

/// Grey of an unmeasured heatmap cell.
const MISSING: &str = "#d4d6da";
/// Grey of a measured cell whose KLD is not a number.
const NOT_A_NUMBER: &str = "#9a9ca1";

/// Escapes text for HTML, SVG and XML content and attributes.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// A coordinate for SVG: one decimal, never NaN or infinite.
fn n(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "0".to_string()
    }
}

/// `10⁻⁵`-style label of a power of ten.
fn decade(d: i32) -> String {
    match d {
        0 => "1".to_string(),
        1 => "10".to_string(),
        _ => {
            let sup: String = d
                .to_string()
                .chars()
                .map(|c| match c {
                    '-' => '⁻',
                    '0' => '⁰',
                    '1' => '¹',
                    '2' => '²',
                    '3' => '³',
                    '4' => '⁴',
                    '5' => '⁵',
                    '6' => '⁶',
                    '7' => '⁷',
                    '8' => '⁸',
                    _ => '⁹',
                })
                .collect();
            format!("10{sup}")
        }
    }
}

/// Approximate width of `s` in px at `size` px (proportional sans-serif).
fn text_w(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.58
}

/// Approximate width of `s` in px at `size` px (monospace).
fn mono_w(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.61
}

/// A log10 axis over whole decades.
#[derive(Clone, Copy)]
struct LogAxis {
    lo: i32,
    hi: i32,
}

impl LogAxis {
    fn over(values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            let l = log_kld(v);
            lo = lo.min(l);
            hi = hi.max(l);
        }
        if !lo.is_finite() {
            return LogAxis { lo: -4, hi: 0 };
        }
        let mut a = LogAxis {
            lo: lo.floor() as i32,
            hi: hi.ceil() as i32,
        };
        if a.hi <= a.lo {
            a.hi = a.lo + 1;
        }
        a
    }

    /// 0 at the bottom decade, 1 at the top.
    fn t(&self, v: f64) -> f64 {
        ((log_kld(v) - self.lo as f64) / (self.hi - self.lo) as f64).clamp(0.0, 1.0)
    }

    fn step(&self) -> i32 {
        ((self.hi - self.lo) + 7) / 8
    }
}

/// A linear axis with round ticks.
#[derive(Clone, Copy)]
struct LinAxis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl LinAxis {
    fn over(values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            return LinAxis {
                lo: 0.0,
                hi: 1.0,
                step: 0.2,
            };
        }
        if hi - lo < 1e-9 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = (hi - lo) * 0.04;
        let (lo, hi) = (lo - pad, hi + pad);
        let raw = (hi - lo) / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let m = raw / mag;
        let step = mag
            * if m <= 1.0 {
                1.0
            } else if m <= 2.0 {
                2.0
            } else if m <= 2.5 {
                2.5
            } else if m <= 5.0 {
                5.0
            } else {
                10.0
            };
        LinAxis {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            step,
        }
    }

    fn t(&self, v: f64) -> f64 {
        ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        let k = ((self.hi - self.lo) / self.step).round() as i64;
        (0..=k.clamp(0, 40))
            .map(|i| self.lo + i as f64 * self.step)
            .collect()
    }

    fn label(&self, v: f64) -> String {
        let decimals = if self.step >= 1.0 {
            0
        } else if self.step >= 0.1 {
            1
        } else {
            2
        };
        format!("{v:.decimals$}")
    }
}

/// The plot area of a chart, in px.
#[derive(Clone, Copy)]
struct Frame {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Frame {
    fn px(&self, t: f64) -> f64 {
        self.x + t * self.w
    }
    fn py(&self, t: f64) -> f64 {
        self.y + (1.0 - t) * self.h
    }
}

/// Grid, ticks and labels of a linear x axis and a log y axis.
fn axes(s: &mut String, f: Frame, x: LinAxis, y: LogAxis, x_title: &str, y_title: &str) {
    s.push_str("<g class=\"axes\">");
    let step = y.step();
    let mut d = y.lo;
    while d <= y.hi {
        let py = f.py(y.t(10f64.powi(d)));
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#e6e8eb\"/>",
            n(f.x),
            n(py),
            n(f.x + f.w),
            n(py)
        );
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"12\" fill=\"#57606a\">{}</text>",
            n(f.x - 8.0),
            n(py + 4.0),
            decade(d)
        );
        if step == 1 && y.hi - y.lo <= 6 && d < y.hi {
            for m in 2..10 {
                let my = f.py(y.t(m as f64 * 10f64.powi(d)));
                put!(
                    s,
                    "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#8c959f\"/>",
                    n(f.x - 3.0),
                    n(my),
                    n(f.x),
                    n(my)
                );
            }
        }
        d += step;
    }
    for v in x.ticks() {
        let px = f.px(x.t(v));
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#f0f1f3\"/>",
            n(px),
            n(f.y),
            n(px),
            n(f.y + f.h)
        );
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#8c959f\"/>",
            n(px),
            n(f.y + f.h),
            n(px),
            n(f.y + f.h + 4.0)
        );
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" fill=\"#57606a\">{}</text>",
            n(px),
            n(f.y + f.h + 18.0),
            x.label(v)
        );
    }
    put!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#8c959f\"/>",
        n(f.x),
        n(f.y),
        n(f.w),
        n(f.h)
    );
    put!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\" fill=\"#1f2328\">{}</text>",
        n(f.x + f.w / 2.0),
        n(f.y + f.h + 40.0),
        esc(x_title)
    );
    put!(
        s,
        "<text transform=\"translate({} {}) rotate(-90)\" text-anchor=\"middle\" font-size=\"13\" fill=\"#1f2328\">{}</text>",
        n(f.x - 52.0),
        n(f.y + f.h / 2.0),
        esc(y_title)
    );
    s.push_str("</g>");
}

/// An empty chart with a message in its middle.
fn empty_svg(w: f64, h: f64, msg: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">\
         <rect x=\"0.5\" y=\"0.5\" width=\"{}\" height=\"{}\" fill=\"#fafbfc\" stroke=\"#e3e6ea\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\" fill=\"#57606a\">{}</text></svg>",
        n(w - 1.0),
        n(h - 1.0),
        n(w / 2.0),
        n(h / 2.0),
        esc(msg)
    )
}

// ---------------------------------------------------------------------------
// SVG 1: heatmap
// ---------------------------------------------------------------------------

/// Units (rows, model order) × settings (columns), coloured by log10 KLD.
fn heatmap_svg(v: &View) -> String {
    let r = v.r;
    if r.units.is_empty() || r.settings.is_empty() {
        return empty_svg(720.0, 120.0, "No units or settings to show.");
    }
    let rows = v.order.len();
    let (row_h, every_row) = if rows <= 48 {
        (14.0, true)
    } else if rows <= 110 {
        (8.0, false)
    } else {
        (6.0, false)
    };
    // Group: the block, or the unit itself outside blocks.
    let group = |u: usize| match block_of(&r.units[u]) {
        Some(b) => (1, b),
        _ => (0, u),
    };
    let multi = v
        .order
        .windows(2)
        .any(|w| block_of(&r.units[w[0]]).is_some() && group(w[0]) == group(w[1]));
    let gap = if multi { 3.0 } else { 1.0 };

    // Row labels: every row, or one per block, thinned so none overlap.
    let mut offs = Vec::with_capacity(rows);
    let mut y = 0.0;
    for (i, &u) in v.order.iter().enumerate() {
        if i > 0 && group(u) != group(v.order[i - 1]) {
            y += gap;
        }
        offs.push(y);
        y += row_h;
    }
    let grid_h = y;
    let mut labels: Vec<(f64, String)> = Vec::new();
    if every_row {
        for (i, &u) in v.order.iter().enumerate() {
            labels.push((offs[i] + row_h / 2.0, r.units[u].name.clone()));
        }
    } else {
        let mut i = 0;
        while i < rows {
            let g = group(v.order[i]);
            let mut j = i;
            while j + 1 < rows && group(v.order[j + 1]) == g {
                j += 1;
            }
            let text = match (g, block_of(&r.units[v.order[i]])) {
                ((1, _), Some(b))
                    if j > i || r.units[v.order[i]].name == model::names::block_unit(b) =>
                {
                    model::names::block_unit(b)
                }
                _ => r.units[v.order[i]].name.clone(),
            };
            labels.push(((offs[i] + offs[j] + row_h) / 2.0, text));
            i = j + 1;
        }
    }
    let mut shown: Vec<(f64, String)> = Vec::new();
    for (y, t) in labels {
        let clear = match shown.last() {
            Some((py, _)) => y - py >= 12.0,
            None => true,
        };
        if clear {
            shown.push((y, t));
        }
    }
    let label_font = 11.0;
    let label_w = shown
        .iter()
        .map(|(_, t)| mono_w(t, label_font))
        .fold(40.0, f64::max)
        .min(260.0)
        + 14.0;

    // Columns, with a gap where the setting kind changes.
    let ns = r.settings.len();
    let col_w = (560.0 / ns as f64).clamp(26.0, 92.0);
    let kind_gap = 10.0;
    let strip_x = label_w;
    let strip_w = 6.0;
    let cells_x = strip_x + strip_w + 6.0;
    let mut col_x = Vec::with_capacity(ns);
    let mut x = cells_x;
    for (i, st) in r.settings.iter().enumerate() {
        if i > 0 && st.kind != r.settings[i - 1].kind {
            x += kind_gap;
        }
        col_x.push(x);
        x += col_w;
    }
    let cells_right = x;
    let col_font = 12.0;
    let rotate = r
        .settings
        .iter()
        .any(|s| text_w(&s.name, col_font) + 6.0 > col_w);
    let col_label_h = if rotate {
        r.settings
            .iter()
            .map(|s| text_w(&s.name, col_font) * 0.72 + 10.0)
            .fold(18.0, f64::max)
            .min(120.0)
    } else {
        20.0
    };
    let kinds_mixed = r.settings.iter().any(|s| s.kind != r.settings[0].kind);
    let group_h = if kinds_mixed { 20.0 } else { 0.0 };
    let top = 8.0 + group_h + col_label_h;
    let bottom_labels = grid_h > 520.0;
    let bottom = if bottom_labels { 28.0 } else { 8.0 };

    // Legend on the right.
    let lx = cells_right + 34.0;
    let bar_h = (grid_h * 0.6).clamp(110.0, 240.0);
    let legend_w = 230.0;
    let kinds_in_key = v.kinds.len() > 1 && v.kinds.len() <= 24;
    let legend_h = 22.0
        + bar_h
        + 46.0
        + if kinds_in_key {
            24.0 + 17.0 * v.kinds.len() as f64
        } else {
            0.0
        };
    let width = lx + legend_w;
    let height = (top + grid_h + bottom).max(top + legend_h + 10.0);

    let mut s = String::new();
    put!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"heatmap\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"KLD heatmap of units by settings\">",
        n(width),
        n(height),
        n(width),
        n(height)
    );
    put!(
        s,
        "<defs><linearGradient id=\"hm-ramp\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">"
    );
    for i in 0..=16 {
        let t = i as f64 / 16.0;
        put!(
            s,
            "<stop offset=\"{:.4}\" stop-color=\"{}\"/>",
            t,
            hex(viridis(1.0 - t))
        );
    }
    s.push_str("</linearGradient></defs>");

    // Setting group headers and column labels.
    if kinds_mixed {
        let mut i = 0;
        while i < ns {
            let k = r.settings[i].kind;
            let mut j = i;
            while j + 1 < ns && r.settings[j + 1].kind == k {
                j += 1;
            }
            let (x0, x1) = (col_x[i], col_x[j] + col_w);
            let long = match k {
                SettingKind::Quant => "quantization",
                SettingKind::Sparsity => "pruning",
            };
            let text = if text_w(long, 11.0) + 4.0 <= x1 - x0 {
                long
            } else {
                match k {
                    SettingKind::Quant => "quant",
                    SettingKind::Sparsity => "prune",
                }
            };
            put!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#57606a\">{}</text>",
                n((x0 + x1) / 2.0),
                n(8.0 + 11.0),
                text
            );
            put!(
                s,
                "<path d=\"M{} {}V{}H{}V{}\" fill=\"none\" stroke=\"#b6bcc4\"/>",
                n(x0 + 1.0),
                n(8.0 + group_h - 1.0),
                n(8.0 + group_h - 4.0),
                n(x1 - 2.0),
                n(8.0 + group_h - 1.0)
            );
            i = j + 1;
        }
    }
    let col_label = |s: &mut String, i: usize, y: f64, below: bool| {
        let name = &r.settings[i].name;
        let cx = col_x[i] + col_w / 2.0;
        if rotate && !below {
            put!(
                s,
                "<text transform=\"translate({} {}) rotate(-45)\" font-size=\"{col_font}\" fill=\"#1f2328\">{}</text>",
                n(cx - 2.0),
                n(y),
                esc(name)
            );
        } else {
            put!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"{}\" fill=\"#1f2328\">{}</text>",
                n(cx),
                n(y),
                if rotate { 9.0 } else { col_font },
                esc(name)
            );
        }
    };
    for i in 0..ns {
        col_label(&mut s, i, top - 6.0, false);
        if bottom_labels {
            col_label(&mut s, i, top + grid_h + 17.0, true);
        }
    }

    // Row labels and the tensor-kind strip.
    s.push_str("<g class=\"hm-rows\">");
    for (y, t) in &shown {
        put!(
            s,
            "<text class=\"mono\" x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"{label_font}\" fill=\"#1f2328\">{}</text>",
            n(label_w - 6.0),
            n(top + y + 3.8),
            esc(t)
        );
    }
    for (i, &u) in v.order.iter().enumerate() {
        put!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{strip_w}\" height=\"{}\" fill=\"{}\"><title>{}</title></rect>",
            n(strip_x),
            n(top + offs[i]),
            n(row_h),
            kind_colour(v.kind[u]),
            esc(&v.kinds[v.kind[u]])
        );
    }
    s.push_str("</g>");

    // The cells.
    let inset_y = if row_h >= 10.0 { 1.0 } else { 0.0 };
    s.push_str("<g class=\"hm-cells\">");
    for (i, &u) in v.order.iter().enumerate() {
        let unit = &r.units[u];
        for (si, st) in r.settings.iter().enumerate() {
            let (x, y) = (col_x[si], top + offs[i]);
            let (w, h) = (col_w - 1.0, row_h - inset_y);
            match v.cell(u, si) {
                Some(c) => {
                    let fill = if c.shift.kld.is_finite() {
                        hex(v.scale.rgb(c.shift.kld))
                    } else {
                        NOT_A_NUMBER.to_string()
                    };
                    put!(
                        s,
                        "<rect class=\"hm-cell\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"><title>{}</title></rect>",
                        n(x),
                        n(y),
                        n(w),
                        n(h),
                        esc(&cell_tooltip(unit, &st.name, c))
                    );
                }
                None => put!(
                    s,
                    "<rect class=\"hm-missing\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{MISSING}\"><title>{} × {}: not measured</title></rect>",
                    n(x),
                    n(y),
                    n(w),
                    n(h),
                    esc(&unit.name),
                    esc(&st.name)
                ),
            }
        }
    }
    s.push_str("</g>");

    // Legend: colour bar with decade ticks, the grey swatch, the kind key.
    s.push_str("<g class=\"hm-legend\">");
    let ly = top;
    put!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" font-weight=\"600\" fill=\"#1f2328\">KLD (nats, log scale)</text>",
        n(lx),
        n(ly + 2.0)
    );
    let (bx, by, bw) = (lx, ly + 14.0, 14.0);
    put!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{bw}\" height=\"{}\" fill=\"url(#hm-ramp)\" stroke=\"#8c959f\" stroke-width=\"0.5\"/>",
        n(bx),
        n(by),
        n(bar_h)
    );
    let sc = v.scale;
    let bar_y = |l: f64| by + (1.0 - (l - sc.lo) / (sc.hi - sc.lo)) * bar_h;
    let tick = |s: &mut String, y: f64, text: &str, strong: bool| {
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#57606a\"/>",
            n(bx + bw),
            n(y),
            n(bx + bw + 4.0),
            n(y)
        );
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{}\">{}</text>",
            n(bx + bw + 7.0),
            n(y + 3.8),
            if strong { "#1f2328" } else { "#57606a" },
            text
        );
    };
    let (y_max, y_min) = (bar_y(sc.hi), bar_y(sc.lo));
    tick(
        &mut s,
        y_max,
        &format!("max {}", fmt_kld(10f64.powf(sc.hi))),
        true,
    );
    tick(
        &mut s,
        y_min,
        &format!("min {}", fmt_kld(10f64.powf(sc.lo))),
        true,
    );
    let mut d = sc.lo.ceil() as i32;
    while (d as f64) <= sc.hi {
        let y = bar_y(d as f64);
        if (y - y_max).abs() >= 16.0 && (y - y_min).abs() >= 16.0 {
            tick(&mut s, y, &decade(d), false);
        }
        d += 1;
    }
    let gy = by + bar_h + 22.0;
    put!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{bw}\" height=\"12\" fill=\"{MISSING}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#57606a\">not measured</text>",
        n(bx),
        n(gy),
        n(bx + bw + 7.0),
        n(gy + 10.0)
    );
    put!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#57606a\">darker = more sensitive</text>",
        n(bx),
        n(gy + 30.0)
    );
    if kinds_in_key {
        let ky = gy + 56.0;
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" font-weight=\"600\" fill=\"#1f2328\">Tensor kind (left strip)</text>",
            n(lx),
            n(ky)
        );
        for (k, name) in v.kinds.iter().enumerate() {
            let y = ky + 10.0 + 17.0 * k as f64;
            put!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text class=\"mono\" x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#1f2328\">{}</text>",
                n(lx),
                n(y),
                kind_colour(k),
                n(lx + 16.0),
                n(y + 9.0),
                esc(name)
            );
        }
    }
    s.push_str("</g></svg>");
    s
}

fn cell_tooltip(unit: &Unit, setting: &str, c: &Cell) -> String {
    format!(
        "{} × {}\napplied: {}\nKLD: {} ± {} nats\n{} bpw · top-1 kept {:.1}% · weight error {}",
        unit.name,
        setting,
        c.applied,
        fmt_kld(c.shift.kld),
        fmt_kld(c.shift.kld_stderr),
        fmt_bpw(c.bits_per_weight),
        if c.shift.top1.is_finite() {
            c.shift.top1 * 100.0
        } else {
            0.0
        },
        fmt_kld(c.weight_error)
    )
}

// ---------------------------------------------------------------------------
// SVG 2: KLD against bits per weight, per tensor kind
// ---------------------------------------------------------------------------

/// One point of a kind's curve: a quantization setting averaged over the kind.
struct CurvePoint {
    setting: usize,
    bpw: f64,
    kld: f64,
    units: usize,
    applied: Vec<(String, usize)>,
}

fn kind_curves(v: &View) -> Vec<(usize, Vec<CurvePoint>)> {
    let r = v.r;
    let mut out = Vec::new();
    for k in 0..v.kinds.len() {
        let mut pts = Vec::new();
        for (si, st) in r.settings.iter().enumerate() {
            if st.kind != SettingKind::Quant {
                continue;
            }
            let (mut sk, mut sb, mut m) = (0.0, 0.0, 0usize);
            let mut applied: Vec<(String, usize)> = Vec::new();
            for &u in &v.order {
                if v.kind[u] != k {
                    continue;
                }
                let Some(c) = v.cell(u, si) else { continue };
                if !c.shift.kld.is_finite() || !c.bits_per_weight.is_finite() {
                    continue;
                }
                sk += c.shift.kld.max(0.0);
                sb += c.bits_per_weight;
                m += 1;
                match applied.iter_mut().find(|(a, _)| *a == c.applied) {
                    Some(e) => e.1 += 1,
                    None => applied.push((c.applied.clone(), 1)),
                }
            }
            if m > 0 {
                pts.push(CurvePoint {
                    setting: si,
                    bpw: sb / m as f64,
                    kld: sk / m as f64,
                    units: m,
                    applied,
                });
            }
        }
        pts.sort_by(|a, b| a.bpw.total_cmp(&b.bpw));
        if !pts.is_empty() {
            out.push((k, pts));
        }
    }
    out
}

fn curves_svg(v: &View) -> String {
    let r = v.r;
    let curves = kind_curves(v);
    let (width, height) = (1000.0, 470.0);
    if curves.is_empty() {
        return empty_svg(width, 120.0, "No quantization settings were measured.");
    }
    let f = Frame {
        x: 78.0,
        y: 48.0,
        w: width - 78.0 - 250.0,
        h: height - 48.0 - 62.0,
    };
    let all = || curves.iter().flat_map(|(_, p)| p.iter());
    let xa = LinAxis::over(all().map(|p| p.bpw));
    let ya = LogAxis::over(all().map(|p| p.kld));
    let mut s = String::new();
    put!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"curves\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"KLD against bits per weight per tensor kind\">"
    );
    axes(
        &mut s,
        f,
        xa,
        ya,
        "bits per weight (mean over the kind's tensors)",
        "mean KLD (nats)",
    );

    // A dashed guide at each quantization setting's mean bpw, labelled on top.
    let mut guides: Vec<(f64, &str)> = Vec::new();
    for (si, st) in r.settings.iter().enumerate() {
        if st.kind != SettingKind::Quant {
            continue;
        }
        let (mut sum, mut m) = (0.0, 0usize);
        for (_, pts) in &curves {
            for p in pts.iter().filter(|p| p.setting == si) {
                sum += p.bpw * p.units as f64;
                m += p.units;
            }
        }
        if m > 0 {
            guides.push((f.px(xa.t(sum / m as f64)), &st.name));
        }
    }
    guides.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut last = [f64::NEG_INFINITY; 2];
    for (x, name) in guides {
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#c3c8cf\" stroke-dasharray=\"3 4\"/>",
            n(x),
            n(f.y),
            n(x),
            n(f.y + f.h)
        );
        let half = text_w(name, 11.0) / 2.0 + 4.0;
        let row = (0..2).find(|&i| x - half >= last[i]);
        if let Some(i) = row {
            last[i] = x + half;
            put!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" font-weight=\"600\" fill=\"#57606a\">{}</text>",
                n(x),
                n(f.y - 8.0 - 14.0 * i as f64),
                esc(name)
            );
        }
    }

    // The curves, then the markers on top.
    for (k, pts) in &curves {
        let colour = kind_colour(*k);
        let dash = if *k >= KIND_COLOURS.len() {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{},{}", n(f.px(xa.t(p.bpw))), n(f.py(ya.t(p.kld)))))
            .collect();
        put!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-linejoin=\"round\"{dash}/>",
            path.join(" ")
        );
    }
    for (k, pts) in &curves {
        let colour = kind_colour(*k);
        for p in pts {
            let applied: Vec<String> = p.applied.iter().map(|(a, c)| format!("{a} ×{c}")).collect();
            put!(
                s,
                "<circle cx=\"{}\" cy=\"{}\" r=\"3.6\" fill=\"{colour}\" stroke=\"#ffffff\" stroke-width=\"1\"><title>{}</title></circle>",
                n(f.px(xa.t(p.bpw))),
                n(f.py(ya.t(p.kld))),
                esc(&format!(
                    "{} at {}\nmean KLD {} nats over {} unit(s)\nmean {} bpw\napplied: {}",
                    v.kinds[*k],
                    r.settings[p.setting].name,
                    fmt_kld(p.kld),
                    p.units,
                    fmt_bpw(p.bpw),
                    applied.join(", ")
                ))
            );
        }
    }

    // Legend, most sensitive kind first.
    let mut order: Vec<(usize, f64)> = curves
        .iter()
        .map(|(k, p)| {
            (
                *k,
                p.iter().map(|q| log_kld(q.kld)).sum::<f64>() / p.len() as f64,
            )
        })
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    let lx = f.x + f.w + 26.0;
    put!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" font-weight=\"600\" fill=\"#1f2328\">Tensor kind</text>",
        n(lx),
        n(f.y + 4.0)
    );
    let step = ((f.h - 20.0) / order.len() as f64).min(20.0);
    for (i, (k, _)) in order.iter().enumerate() {
        let y = f.y + 24.0 + step * i as f64;
        let colour = kind_colour(*k);
        put!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"2\"/><circle cx=\"{}\" cy=\"{}\" r=\"3.6\" fill=\"{colour}\" stroke=\"#ffffff\"/>",
            n(lx),
            n(y),
            n(lx + 22.0),
            n(y),
            n(lx + 11.0),
            n(y)
        );
        put!(
            s,
            "<text class=\"mono\" x=\"{}\" y=\"{}\" font-size=\"11.5\" fill=\"#1f2328\">{}</text>",
            n(lx + 30.0),
            n(y + 4.0),
            esc(&v.kinds[*k])
        );
    }
    s.push_str("</svg>");
    s
}

// ---------------------------------------------------------------------------
// SVG 3: the size/KLD plane
// ---------------------------------------------------------------------------

fn plane_svg(r: &SensitivityReport) -> String {
    let (width, height) = (1000.0, 500.0);
    let ok = |p: &&MixPoint| p.bits_per_weight.is_finite() && p.predicted_kld.is_finite();
    let pareto: Vec<&MixPoint> = sorted_by_bpw(&r.pareto).into_iter().filter(ok).collect();
    let uniform: Vec<&MixPoint> = sorted_by_bpw(&r.uniform).into_iter().filter(ok).collect();
    if pareto.is_empty() && uniform.is_empty() {
        return empty_svg(width, 120.0, "No mixes in this report.");
    }
    let f = Frame {
        x: 78.0,
        y: 64.0,
        w: width - 78.0 - 40.0,
        h: height - 64.0 - 62.0,
    };
    let all = || pareto.iter().chain(uniform.iter());
    let xa = LinAxis::over(all().map(|p| p.bits_per_weight));
    let ya = LogAxis::over(all().map(|p| p.predicted_kld));
    let at = |p: &MixPoint| (f.px(xa.t(p.bits_per_weight)), f.py(ya.t(p.predicted_kld)));
    let mut s = String::new();
    put!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plane\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"Predicted KLD against size\">"
    );
    axes(
        &mut s,
        f,
        xa,
        ya,
        "bits per weight (all tensors)",
        "predicted KLD (nats)",
    );

    // Top axis in MB when bytes and bits per weight are proportional.
    let ratios: Vec<f64> = all()
        .filter(|p| p.bits_per_weight > 0.0 && p.bytes > 0)
        .map(|p| p.bytes as f64 / p.bits_per_weight)
        .collect();
    let (rmin, rmax) = ratios
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    if !ratios.is_empty() && rmax <= rmin * 1.02 {
        let per_bpw = (rmin + rmax) / 2.0 / 1e6;
        // Round MB ticks of their own, placed on the bpw scale.
        let (mb_lo, mb_hi) = (xa.lo * per_bpw, xa.hi * per_bpw);
        let mb = LinAxis::over([mb_lo, mb_hi].into_iter());
        let eps = (mb_hi - mb_lo).abs() * 1e-9;
        for t in mb.ticks() {
            if t < mb_lo - eps || t > mb_hi + eps {
                continue;
            }
            let px = f.px(xa.t(t / per_bpw));
            put!(
                s,
                "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#8c959f\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" fill=\"#57606a\">{}</text>",
                n(px),
                n(f.y),
                n(px),
                n(f.y - 4.0),
                n(px),
                n(f.y - 9.0),
                mb.label(t)
            );
        }
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\" fill=\"#1f2328\">size of the tensors (MB)</text>",
            n(f.x + f.w / 2.0),
            n(f.y - 30.0)
        );
    }

    let front = "#2f6fd6";
    let uni = "#d9480f";
    if !pareto.is_empty() {
        let pts: Vec<String> = pareto
            .iter()
            .map(|p| {
                let (x, y) = at(p);
                format!("{},{}", n(x), n(y))
            })
            .collect();
        put!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{front}\" stroke-width=\"2.2\" stroke-linejoin=\"round\"/>",
            pts.join(" ")
        );
        for p in &pareto {
            let (x, y) = at(p);
            put!(
                s,
                "<circle cx=\"{}\" cy=\"{}\" r=\"3.8\" fill=\"{front}\" stroke=\"#ffffff\"><title>{}</title></circle>",
                n(x),
                n(y),
                esc(&mix_tooltip(p))
            );
        }
    }
    // Uniform points: diamonds with labels placed where they collide least.
    let mut boxes: Vec<[f64; 4]> = pareto
        .iter()
        .map(|p| {
            let (x, y) = at(p);
            [x - 4.0, y - 4.0, x + 4.0, y + 4.0]
        })
        .collect();
    let legend_box = [f.x + f.w - 250.0, f.y, f.x + f.w, f.y + 52.0];
    boxes.push(legend_box);
    for p in &uniform {
        let (x, y) = at(p);
        boxes.push([x - 6.0, y - 6.0, x + 6.0, y + 6.0]);
    }
    for p in &uniform {
        let (x, y) = at(p);
        put!(
            s,
            "<path d=\"M{} {}L{} {}L{} {}L{} {}Z\" fill=\"{uni}\" stroke=\"#ffffff\"><title>{}</title></path>",
            n(x),
            n(y - 6.0),
            n(x + 6.0),
            n(y),
            n(x),
            n(y + 6.0),
            n(x - 6.0),
            n(y),
            esc(&mix_tooltip(p))
        );
        let tw = text_w(&p.label, 12.0);
        let candidates = [
            (x + 9.0, y - 7.0, "start"),
            (x + 9.0, y + 15.0, "start"),
            (x - 9.0, y - 7.0, "end"),
            (x - 9.0, y + 15.0, "end"),
            (x, y - 12.0, "middle"),
            (x, y + 20.0, "middle"),
        ];
        let bbox = |(tx, ty, anchor): (f64, f64, &str)| {
            let x0 = match anchor {
                "start" => tx,
                "end" => tx - tw,
                _ => tx - tw / 2.0,
            };
            [x0, ty - 11.0, x0 + tw, ty + 3.0]
        };
        let inside = |b: [f64; 4]| b[0] >= f.x + 2.0 && b[2] <= f.x + f.w - 2.0 && b[1] >= f.y;
        let overlaps = |b: [f64; 4], boxes: &[[f64; 4]]| {
            boxes
                .iter()
                .any(|o| b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3])
        };
        let choice = candidates
            .iter()
            .copied()
            .find(|&c| inside(bbox(c)) && !overlaps(bbox(c), &boxes))
            .or_else(|| candidates.iter().copied().find(|&c| inside(bbox(c))))
            .unwrap_or(candidates[0]);
        boxes.push(bbox(choice));
        put!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"{}\" font-size=\"12\" fill=\"#1f2328\" stroke=\"#ffffff\" stroke-width=\"3\" paint-order=\"stroke\">{}</text>",
            n(choice.0),
            n(choice.1),
            choice.2,
            esc(&p.label)
        );
    }

    // Legend, top right inside the plot.
    let (lx, ly) = (legend_box[0] + 12.0, legend_box[1] + 18.0);
    put!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#ffffff\" fill-opacity=\"0.9\" stroke=\"#e3e6ea\"/>",
        n(legend_box[0]),
        n(legend_box[1] + 1.0),
        n(legend_box[2] - legend_box[0] - 1.0),
        n(legend_box[3] - legend_box[1])
    );
    put!(
        s,
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{front}\" stroke-width=\"2.2\"/><circle cx=\"{}\" cy=\"{}\" r=\"3.8\" fill=\"{front}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#1f2328\">allocator mixes (Pareto front)</text>",
        n(lx),
        n(ly),
        n(lx + 24.0),
        n(ly),
        n(lx + 12.0),
        n(ly),
        n(lx + 34.0),
        n(ly + 4.0)
    );
    let ly2 = ly + 20.0;
    put!(
        s,
        "<path d=\"M{} {}L{} {}L{} {}L{} {}Z\" fill=\"{uni}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#1f2328\">one type everywhere (uniform)</text>",
        n(lx + 12.0),
        n(ly2 - 6.0),
        n(lx + 18.0),
        n(ly2),
        n(lx + 12.0),
        n(ly2 + 6.0),
        n(lx + 6.0),
        n(ly2),
        n(lx + 34.0),
        n(ly2 + 4.0)
    );
    s.push_str("</svg>");
    s
}

fn mix_tooltip(p: &MixPoint) -> String {
    format!(
        "{}\n{} MB · {} bpw\npredicted KLD {} nats",
        p.label,
        fmt_mb(p.bytes),
        fmt_bpw(p.bits_per_weight),
        fmt_kld(p.predicted_kld)
    )
}

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

const CSS: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1f2328;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 64px; }
h1 { font-size: 26px; line-height: 1.25; margin: 0 0 4px; letter-spacing: -0.01em; }
h1 .model { font-weight: 400; color: #57606a; }
h2 { font-size: 18px; margin: 0 0 4px; }
p { margin: 0 0 10px; }
.summary { max-width: 880px; color: #31363c; }
.facts { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 22px; padding: 0; list-style: none; }
.facts li { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 8px 14px; min-width: 128px; }
.facts b { display: block; font-size: 18px; font-variant-numeric: tabular-nums; }
.facts b.mono { font-size: 15px; line-height: 27px; }
.facts span { font-size: 12px; color: #57606a; }
section.card { background: #fff; border: 1px solid #e1e4e8; border-radius: 10px; padding: 18px 20px 20px; margin: 0 0 22px; }
.note { color: #57606a; font-size: 13.5px; margin: 0 0 12px; max-width: 900px; }
.scroll { overflow-x: auto; }
svg { display: block; max-width: 100%; height: auto; font-family: inherit; }
svg text { font-family: inherit; }
code, .mono, svg .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace; }
code { font-size: 0.9em; background: #f0f2f4; padding: 1px 4px; border-radius: 4px;
  -webkit-box-decoration-break: clone; box-decoration-break: clone; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 9px; border-bottom: 1px solid #eaecef; text-align: right; white-space: nowrap; }
th { font-weight: 600; background: #f6f8fa; color: #31363c; }
th.l, td.l { text-align: left; }
td.unit { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
td.k { border-left: 2px solid #fff; }
td.k small { opacity: 0.85; font-size: 11px; }
td.miss { color: #8c959f; background: #f0f1f3; }
tbody tr:hover td.l, tbody tr:hover td.r { background: #f6f8fa; }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 6px; vertical-align: 0; }
footer { color: #8c959f; font-size: 12px; margin-top: 8px; }
"#;

/// The report as one self-contained HTML5 page: the summary, a heatmap of
/// every unit × setting (colour = log10 KLD, grey = not measured, tooltips
/// with the details), KLD against bits per weight per tensor kind, the
/// allocator's Pareto front and the uniform mixes on the size/KLD plane, and
/// the ranking table of the 30 most sensitive units. Inline SVG and CSS only.
pub fn html(r: &SensitivityReport) -> String {
    let v = View::new(r);
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    s.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    put!(
        s,
        "<title>Sensitivity report — {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        esc(&short_model(&r.model))
    );
    put!(
        s,
        "<h1>Per-layer sensitivity <span class=\"model\">· {}</span></h1>\n",
        esc(&short_model(&r.model))
    );
    let code = |t: &str| format!("<code>{}</code>", esc(t));
    put!(s, "<p class=\"summary\">{}</p>\n", summary(r, &v, &code));
    facts(&mut s, &v);

    put!(
        s,
        "<section class=\"card\"><h2>KLD of every unit × setting</h2><p class=\"note\">Each cell is one measurement: \
         only that {} changed, the rest at base. Colour is log<sub>10</sub> of the KLD; grey cells were not measured. \
         Rows follow the model from the token embedding down through the blocks; the strip left of the cells marks the \
         tensor kind. Hover a cell for the applied type, KLD, bits per weight and top-1 agreement.</p>\
         <div class=\"scroll\">{}</div></section>\n",
        if r.granularity == "block" {
            "block"
        } else {
            "tensor"
        },
        heatmap_svg(&v)
    );
    put!(
        s,
        "<section class=\"card\"><h2>KLD against bits per weight, per tensor kind</h2><p class=\"note\">For each \
         quantization setting, the mean KLD over all units of a kind (log scale) against their mean bits per weight. \
         Dashed lines mark each setting's mean bits per weight; where a type did not fit a tensor, the fallback's size \
         moves that kind's point along the axis. Pruning settings are left out (pruned tensors stay dense).</p>\
         <div class=\"scroll\">{}</div></section>\n",
        curves_svg(&v)
    );
    put!(
        s,
        "<section class=\"card\"><h2>Size against predicted KLD</h2><p class=\"note\">Whole-model mixes, KLD predicted \
         as the sum of the measured single-unit KLDs. The line is the allocator's front at several budgets; diamonds \
         put one type on every tensor. Lower and further left is better.</p><div class=\"scroll\">{}</div>{}</section>\n",
        plane_svg(r),
        mix_table(r)
    );
    put!(
        s,
        "<section class=\"card\"><h2>Most sensitive units</h2>{}</section>\n",
        rank_table(&v, HTML_TOP)
    );
    put!(
        s,
        "<footer>Model sha256 <code>{}</code> · {} · rendered by <code>eval::report</code></footer>\n",
        esc(&r.model_sha256),
        esc(&format!("{} parameters", fmt_count(r.model_params)))
    );
    s.push_str("</main>\n</body>\n</html>\n");
    s
}

/// The last path component of the model, for titles.
fn short_model(m: &str) -> String {
    let t = m.trim_end_matches(['/', '\\']);
    let base = t.rsplit(['/', '\\']).next().unwrap_or(t);
    if base.is_empty() {
        m.to_string()
    } else {
        base.to_string()
    }
}

/// A row of key numbers under the summary.
fn facts(s: &mut String, v: &View) {
    let r = v.r;
    let items: Vec<(String, String)> = vec![
        (
            r.units.len().to_string(),
            format!("{} units", r.granularity),
        ),
        (r.settings.len().to_string(), "settings".to_string()),
        (v.cells.len().to_string(), "measurements".to_string()),
        (
            r.scored_tokens.to_string(),
            "scored tokens each".to_string(),
        ),
        (fmt_secs(r.seconds), "total time".to_string()),
    ];
    s.push_str("<ul class=\"facts\">");
    for (value, what) in items {
        put!(
            s,
            "<li><b>{}</b><span>{}</span></li>",
            esc(&value),
            esc(&what)
        );
    }
    if let Some(&u) = v.ranked.first() {
        let unit = &r.units[u];
        put!(
            s,
            "<li><b class=\"mono\">{}</b><span>most sensitive · mean KLD {}</span></li>",
            esc(&unit.name),
            fmt_kld(unit.score)
        );
    }
    s.push_str("</ul>\n");
}

fn mix_table(r: &SensitivityReport) -> String {
    if r.pareto.is_empty() && r.uniform.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "<div class=\"scroll\" style=\"margin-top:14px\"><table><thead><tr><th class=\"l\">mix</th><th class=\"l\">kind</th>\
         <th>MB</th><th>bpw</th><th>predicted KLD</th></tr></thead><tbody>",
    );
    for (kind, pts) in [("allocator", &r.pareto), ("uniform", &r.uniform)] {
        for p in sorted_by_bpw(pts) {
            put!(
                s,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{kind}</td><td class=\"r\">{}</td><td class=\"r\">{}</td><td class=\"r\">{}</td></tr>",
                esc(&p.label),
                fmt_mb(p.bytes),
                fmt_bpw(p.bits_per_weight),
                fmt_kld(p.predicted_kld)
            );
        }
    }
    s.push_str("</tbody></table></div>");
    s
}

fn rank_table(v: &View, top: usize) -> String {
    let r = v.r;
    if r.units.is_empty() {
        return "<p class=\"note\">No units were measured.</p>".to_string();
    }
    let n = top.min(r.units.len());
    let mut s = format!(
        "<p class=\"note\">The {n} most sensitive of {} units, ranked by mean KLD over their measured settings. \
         Cells are KLD in nats, coloured as in the heatmap; the applied type is shown where it differs from the setting.</p>\
         <div class=\"scroll\"><table><thead><tr><th>rank</th><th class=\"l\">unit</th><th>params</th><th>mean KLD</th>",
        r.units.len()
    );
    for st in &r.settings {
        put!(s, "<th>{}</th>", esc(&setting_header(&st.name, st.kind)));
    }
    s.push_str("</tr></thead><tbody>");
    for &u in v.ranked.iter().take(n) {
        let unit = &r.units[u];
        put!(
            s,
            "<tr><td class=\"r\">{}</td><td class=\"l unit\"><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td class=\"r\">{}</td><td class=\"r\"><b>{}</b></td>",
            unit.rank,
            kind_colour(v.kind[u]),
            esc(&unit.name),
            fmt_count(unit.params),
            fmt_kld(unit.score)
        );
        for (si, st) in r.settings.iter().enumerate() {
            match v.cell(u, si) {
                None => s.push_str("<td class=\"k miss\">—</td>"),
                Some(c) => {
                    let (bg, ink) = if c.shift.kld.is_finite() {
                        let rgb = v.scale.rgb(c.shift.kld);
                        (hex(rgb), ink_on(rgb))
                    } else {
                        (NOT_A_NUMBER.to_string(), "#1f2328")
                    };
                    put!(
                        s,
                        "<td class=\"k\" style=\"background:{bg};color:{ink}\">{}",
                        fmt_kld(c.shift.kld)
                    );
                    if let Some(a) = applied_note(&c.applied, &st.name) {
                        put!(s, " <small>({})</small>", esc(&a));
                    }
                    s.push_str("</td>");
                }
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensitivity::{Setting, Shift};

    /// Tiny deterministic noise in [0, 1).
    fn noise(seed: u64) -> f64 {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    const KINDS: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];

    fn cell(unit: usize, setting: usize, applied: &str, bpw: f64, params: u64, kld: f64) -> Cell {
        Cell {
            unit,
            setting,
            applied: applied.to_string(),
            bytes: (bpw * params as f64 / 8.0) as u64,
            bits_per_weight: bpw,
            weight_error: 0.01,
            shift: Shift {
                kld,
                kld_stderr: kld * 0.05,
                top1: 0.97,
            },
        }
    }

    fn setting(name: &str, kind: SettingKind) -> Setting {
        Setting {
            name: name.to_string(),
            kind,
        }
    }

    fn empty_report() -> SensitivityReport {
        SensitivityReport {
            model: "models/tiny.gguf".into(),
            model_sha256: "ab".repeat(32),
            model_params: 0,
            calib: "calib.txt".into(),
            text: "eval.txt".into(),
            ctx: 128,
            chunks: 2,
            scored_tokens: 128,
            granularity: "tensor".into(),
            imatrix: None,
            settings: vec![],
            units: vec![],
            cells: vec![],
            pareto: vec![],
            uniform: vec![],
            seconds: 0.0,
            base_seconds: 0.0,
        }
    }

    /// `blocks` blocks × 7 tensors + token_embd, with the given settings; KLD
    /// larger for early and late blocks, ffn_down and attn_v.
    fn fake_report(blocks: usize, settings: &[(&str, SettingKind)]) -> SensitivityReport {
        let (hidden, ffn, kv) = (2048u64, 5632u64, 256u64);
        let mut units = vec![Unit {
            name: "token_embd.weight".into(),
            block: None,
            params: 32000 * hidden,
            base_bytes: 32000 * hidden * 2,
            score: 0.0,
            rank: 0,
        }];
        for b in 0..blocks {
            for k in KINDS {
                let params = match k {
                    "attn_q" | "attn_output" => hidden * hidden,
                    "attn_k" | "attn_v" => hidden * kv,
                    _ => hidden * ffn,
                };
                units.push(Unit {
                    name: format!("blk.{b}.{k}.weight"),
                    block: Some(b),
                    params,
                    base_bytes: params * 2,
                    score: 0.0,
                    rank: 0,
                });
            }
        }
        let mut cells = Vec::new();
        for (u, unit) in units.iter().enumerate() {
            let kind = kind_of(unit);
            let kind_mul = match kind.as_str() {
                "ffn_down.weight" => 3.0,
                "attn_v.weight" => 2.4,
                "attn_output.weight" => 1.2,
                "ffn_up.weight" => 1.0,
                "ffn_gate.weight" => 0.9,
                "attn_q.weight" => 0.35,
                "attn_k.weight" => 0.3,
                _ => 0.6,
            };
            let block_mul = match unit.block {
                Some(b) => {
                    let last = blocks.saturating_sub(1) as f64;
                    1.0 + 5.0 * (-(b as f64) / 2.0).exp() + 2.5 * (-(last - b as f64) / 2.5).exp()
                }
                None => 1.5,
            };
            for (s, (name, _)) in settings.iter().enumerate() {
                let (base, bpw, applied) = match *name {
                    "Q2_K" => (0.012, 2.625, "Q2_K"),
                    "Q3_K" => (0.0035, 3.4375, "Q3_K"),
                    "Q4_K" => (0.0009, 4.5, "Q4_K"),
                    "Q5_K" => (0.0003, 5.5, "Q5_K"),
                    "Q6_K" => (0.00006, 6.5625, "Q6_K"),
                    "0.5" => (0.02, 16.0, "0.5"),
                    "2:4" => (0.045, 16.0, "2:4"),
                    _ => (0.001, 8.5, *name),
                };
                // token_embd: Q2_K does not "fit" and falls back; 2:4 not measured.
                let (applied, bpw) = match (unit.block, *name) {
                    (None, "Q2_K") => ("Q3_K", 3.4375),
                    (None, "2:4") => continue,
                    _ => (applied, bpw),
                };
                let jitter = (0.7 * (noise((u * 31 + s) as u64) - 0.5)).exp();
                let raw = base * kind_mul * block_mul * jitter;
                // Saturates softly below 0.5 nats.
                let kld = 0.5 * (1.0 - (-raw / 0.5).exp());
                cells.push(cell(u, s, applied, bpw, unit.params, kld));
            }
        }
        let mut r = empty_report();
        r.model = "models/TinyLlama-1.1B-30L-Q8_0.gguf".into();
        r.model_params = units.iter().map(|u| u.params).sum();
        r.text = "brown-corpus.txt".into();
        r.calib = "wiki-calib.txt".into();
        r.ctx = 512;
        r.chunks = 16;
        r.scored_tokens = 16 * 255;
        r.imatrix = Some("imatrix.dat (64 × 512 tokens)".into());
        r.settings = settings.iter().map(|(n, k)| setting(n, *k)).collect();
        r.units = units;
        r.cells = cells;
        r.seconds = 1843.2;
        r.base_seconds = 21.7;
        r.rank_units();
        r.uniform = uniform_mixes(&r);
        r.pareto = greedy_front(&r);
        r
    }

    fn uniform_mixes(r: &SensitivityReport) -> Vec<MixPoint> {
        let total: u64 = r.units.iter().map(|u| u.params).sum();
        let mut out = Vec::new();
        for (s, st) in r.settings.iter().enumerate() {
            if st.kind != SettingKind::Quant {
                continue;
            }
            let cs: Vec<&Cell> = r.cells.iter().filter(|c| c.setting == s).collect();
            let bytes: u64 = cs.iter().map(|c| c.bytes).sum();
            out.push(MixPoint {
                label: format!("all {}", st.name),
                bytes,
                bits_per_weight: bytes as f64 * 8.0 / total as f64,
                predicted_kld: cs.iter().map(|c| c.shift.kld).sum(),
            });
        }
        out
    }

    /// Greedy upgrades by ΔKLD/Δbytes from the cheapest setting: the front.
    fn greedy_front(r: &SensitivityReport) -> Vec<MixPoint> {
        let quant: Vec<usize> = (0..r.settings.len())
            .filter(|&s| r.settings[s].kind == SettingKind::Quant)
            .collect();
        if quant.is_empty() {
            return vec![];
        }
        let total: u64 = r.units.iter().map(|u| u.params).sum();
        let opts: Vec<Vec<&Cell>> = (0..r.units.len())
            .map(|u| {
                let mut v: Vec<&Cell> = quant.iter().filter_map(|&s| r.cell(u, s)).collect();
                v.sort_by_key(|a| a.bytes);
                v
            })
            .collect();
        let mut at = vec![0usize; r.units.len()];
        let mut out = Vec::new();
        let mut next_bpw = 3.0;
        loop {
            let best = (0..at.len())
                .filter(|&u| at[u] + 1 < opts[u].len())
                .max_by(|&a, &b| {
                    let gain = |u: usize| {
                        let (c, d) = (opts[u][at[u]], opts[u][at[u] + 1]);
                        (c.shift.kld - d.shift.kld) / (d.bytes - c.bytes).max(1) as f64
                    };
                    gain(a).total_cmp(&gain(b))
                });
            let bytes: u64 = (0..at.len()).map(|u| opts[u][at[u]].bytes).sum();
            let bpw = bytes as f64 * 8.0 / total as f64;
            if bpw >= next_bpw || out.is_empty() || best.is_none() {
                out.push(MixPoint {
                    label: format!("alloc {bpw:.2} bpw"),
                    bytes,
                    bits_per_weight: bpw,
                    predicted_kld: (0..at.len()).map(|u| opts[u][at[u]].shift.kld).sum(),
                });
                while next_bpw <= bpw {
                    next_bpw += 0.5;
                }
            }
            match best {
                Some(u) => at[u] += 1,
                None => break,
            }
        }
        out
    }

    const FOUR: [(&str, SettingKind); 4] = [
        ("Q2_K", SettingKind::Quant),
        ("Q4_K", SettingKind::Quant),
        ("Q6_K", SettingKind::Quant),
        ("0.5", SettingKind::Sparsity),
    ];

    /// 3 blocks × 7 tensors + token_embd, 4 settings, one cell removed.
    fn small_report() -> SensitivityReport {
        let mut r = fake_report(3, &FOUR);
        let gone = r
            .cells
            .iter()
            .position(|c| c.unit == 5 && c.setting == 1)
            .unwrap();
        r.cells.remove(gone);
        r.rank_units();
        r
    }

    /// No non-finite numbers, no scripts, no URLs but the SVG namespace.
    fn assert_clean(h: &str) {
        for bad in [
            "NaN", "\"inf", "\"-inf", "inf\"", ",inf", "<script", "url(http",
        ] {
            assert!(!h.contains(bad), "{bad} in html");
        }
        assert_eq!(
            h.matches("http").count(),
            h.matches("http://www.w3.org/2000/svg").count(),
            "external URL in html"
        );
    }

    fn heatmap_group(h: &str) -> &str {
        let start = h.find("<g class=\"hm-cells\">").expect("heatmap group");
        let end = start + h[start..].find("</g>").expect("group end");
        &h[start..end]
    }

    #[test]
    fn heatmap_has_a_rect_per_cell_and_grey_for_missing() {
        let r = small_report();
        assert_eq!(r.units.len(), 22);
        assert_eq!(r.cells.len(), 22 * 4 - 1);
        let h = html(&r);
        let g = heatmap_group(&h);
        assert_eq!(g.matches("<rect class=\"hm-cell\"").count(), r.cells.len());
        assert_eq!(g.matches("<rect class=\"hm-missing\"").count(), 1);
        assert_eq!(g.matches("<rect").count(), 22 * 4);
        assert!(g.contains(&format!("fill=\"{MISSING}\"")));
        assert!(g.contains("blk.0.ffn_gate.weight × Q4_K: not measured"));
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.contains("<meta charset=\"utf-8\">"));
        assert!(h.contains("<title>"));
        assert_clean(&h);
    }

    #[test]
    fn heatmap_rows_follow_the_model() {
        let mut r = small_report();
        // Shuffle the units' storage order: token_embd last, blocks reversed.
        r.units.reverse();
        let n = r.units.len();
        for c in &mut r.cells {
            c.unit = n - 1 - c.unit;
        }
        let h = html(&r);
        let g = heatmap_group(&h);
        let pos = |name: &str| g.find(&format!("<title>{name} × Q2_K")).unwrap();
        assert!(pos("token_embd.weight") < pos("blk.0.ffn_down.weight"));
        assert!(pos("blk.0.attn_q.weight") < pos("blk.1.ffn_down.weight"));
        assert!(pos("blk.1.ffn_down.weight") < pos("blk.2.ffn_down.weight"));
        // Within a block: the order of appearance in `units` (reversed here).
        assert!(pos("blk.2.ffn_down.weight") < pos("blk.2.attn_q.weight"));
    }

    #[test]
    fn text_is_escaped() {
        let mut r = small_report();
        r.units[3].name = "blk.0.<odd&\"name\">.weight".into();
        r.model = "a<b>&c".into();
        r.uniform[0].label = "all <Q2_K> & more".into();
        let h = html(&r);
        assert!(!h.contains("<odd"));
        assert!(!h.contains("a<b>"));
        assert!(!h.contains("<Q2_K>"));
        assert!(h.contains("blk.0.&lt;odd&amp;&quot;name&quot;&gt;.weight"));
        assert!(h.contains("a&lt;b&gt;&amp;c"));
        assert!(h.contains("all &lt;Q2_K&gt; &amp; more"));
        let m = markdown(&r, 100);
        assert!(m.contains("`blk.0.<odd&\"name\">.weight`"));
    }

    #[test]
    fn markdown_lists_units_in_rank_order() {
        let r = small_report();
        let m = markdown(&r, 10);
        let ranked = r.ranked();
        let mut last = 0;
        for u in ranked.iter().take(10) {
            let at = m
                .find(&format!("| {} | `{}` |", u.rank, u.name))
                .unwrap_or_else(|| panic!("{} missing", u.name));
            assert!(at > last, "{} out of order", u.name);
            last = at;
        }
        let eleventh = ranked[10];
        assert!(!m.contains(&format!("`{}`", eleventh.name)));
        // The most sensitive are early/last blocks' ffn_down / attn_v.
        assert!(ranked[0].name.ends_with("ffn_down.weight"));
        // The missing cell and the applied fallback.
        assert!(m.contains(" — |"));
        assert!(markdown(&r, 100).contains("(Q3_K)"));
        assert!(m.contains("| rank | unit | params | mean KLD | Q2_K | Q4_K | Q6_K | prune 0.5 |"));
        assert!(m.contains("## Mixes on the size/KLD plane"));
        assert!(m.contains("| all Q4_K | uniform |"));
    }

    #[test]
    fn kld_formatting() {
        assert_eq!(fmt_kld(0.0123), "0.0123");
        assert_eq!(fmt_kld(1.23e-5), "1.2e-5");
        assert_eq!(fmt_kld(0.0), "0");
        assert_eq!(fmt_kld(f64::NAN), "n/a");
        assert_eq!(applied_note("Q5_0", "Q4_K").as_deref(), Some("Q5_0"));
        assert_eq!(applied_note("Q4_K", "Q4_K"), None);
        assert_eq!(
            applied_note("Q4_K+Q5_0+Q4_K", "Q4_K").as_deref(),
            Some("Q4_K+Q5_0")
        );
        assert_eq!(decade(-5), "10⁻⁵");
    }

    #[test]
    fn degenerate_inputs_render_without_nan() {
        let check = |r: &SensitivityReport| {
            let h = html(r);
            assert!(h.ends_with("</html>\n"));
            assert_clean(&h);
            let m = markdown(r, 5);
            assert!(m.starts_with("# "));
        };
        // Nothing at all.
        check(&empty_report());
        // Units but no cells.
        let mut r = small_report();
        r.cells.clear();
        r.pareto.clear();
        r.uniform.clear();
        r.rank_units();
        check(&r);
        assert_eq!(heatmap_group(&html(&r)).matches("hm-missing").count(), 88);
        // One setting, KLD exactly zero everywhere, one NaN, an infinite mix.
        let mut r = fake_report(2, &FOUR[..1]);
        for c in &mut r.cells {
            c.shift.kld = 0.0;
        }
        r.cells[3].shift.kld = f64::NAN;
        r.cells[4].bits_per_weight = f64::NAN;
        r.pareto[0].predicted_kld = f64::INFINITY;
        r.uniform[0].bits_per_weight = f64::NAN;
        r.rank_units();
        check(&r);
        // Pruning only: no curves, no mixes.
        let mut r = fake_report(2, &FOUR[3..]);
        r.granularity = "block".into();
        check(&r);
        // Whole blocks as units.
        let mut r = small_report();
        r.granularity = "block".into();
        r.units.truncate(1);
        for b in 0..3 {
            r.units.push(Unit {
                name: format!("blk.{b}"),
                block: Some(b),
                params: 1000,
                base_bytes: 2000,
                score: 0.0,
                rank: 0,
            });
        }
        r.cells.retain(|c| c.unit < 4);
        r.rank_units();
        let h = html(&r);
        assert!(h.contains(">block<"));
        check(&r);
    }

    #[test]
    fn full_size_report_renders() {
        let r = fake_report(30, &SIX);
        let h = html(&r);
        let g = heatmap_group(&h);
        assert_eq!(g.matches("<rect").count(), 211 * 6);
        assert_eq!(g.matches("hm-missing").count(), 1);
        assert_clean(&h);
        // Block labels, not 211 unit names, at 6 px rows.
        assert!(h.contains(">blk.29</text>"));
    }

    const SIX: [(&str, SettingKind); 6] = [
        ("Q2_K", SettingKind::Quant),
        ("Q3_K", SettingKind::Quant),
        ("Q4_K", SettingKind::Quant),
        ("Q6_K", SettingKind::Quant),
        ("0.5", SettingKind::Sparsity),
        ("2:4", SettingKind::Sparsity),
    ];

    /// Writes a realistic 30-block report to the temp dir for a look in a
    /// browser: `cargo test --release -p eval report::tests::demo -- --ignored`.
    #[test]
    #[ignore]
    fn demo() {
        let r = fake_report(30, &SIX);
        let dir = std::env::temp_dir();
        std::fs::write(dir.join("sens.html"), html(&r)).unwrap();
        std::fs::write(dir.join("sens.md"), markdown(&r, 20)).unwrap();
        std::fs::write(dir.join("sens_blocks.html"), html(&block_report(&r))).unwrap();
        std::fs::write(dir.join("sens_small.html"), html(&small_report())).unwrap();
    }

    /// The tensor report folded into whole blocks (KLDs and bytes summed).
    fn block_report(t: &SensitivityReport) -> SensitivityReport {
        let mut r = t.clone();
        r.granularity = "block".into();
        r.units = t
            .units
            .iter()
            .filter(|u| u.block.is_none())
            .cloned()
            .collect();
        let blocks = t
            .units
            .iter()
            .filter_map(|u| u.block)
            .max()
            .map_or(0, |b| b + 1);
        for b in 0..blocks {
            r.units.push(Unit {
                name: format!("blk.{b}"),
                block: Some(b),
                params: t
                    .units
                    .iter()
                    .filter(|u| u.block == Some(b))
                    .map(|u| u.params)
                    .sum(),
                base_bytes: 0,
                score: 0.0,
                rank: 0,
            });
        }
        let index = |u: &Unit| match u.block {
            Some(b) => r.units.iter().position(|x| x.name == format!("blk.{b}")),
            None => r.units.iter().position(|x| x.name == u.name),
        };
        let mut cells: Vec<Cell> = Vec::new();
        for c in &t.cells {
            let Some(u) = index(&t.units[c.unit]) else {
                continue;
            };
            match cells
                .iter_mut()
                .find(|x| x.unit == u && x.setting == c.setting)
            {
                Some(x) => {
                    x.shift.kld += c.shift.kld;
                    x.bytes += c.bytes;
                }
                None => {
                    let mut c = c.clone();
                    c.unit = u;
                    cells.push(c);
                }
            }
        }
        for c in &mut cells {
            c.bits_per_weight = c.bytes as f64 * 8.0 / r.units[c.unit].params as f64;
        }
        r.cells = cells;
        r.rank_units();
        r
    }
}
