//! File I/O shared by the readers and writers. Atomic output: every artifact is
//! written to a temporary file beside its destination, synced, and renamed into
//! place, so a crash never leaves a half-written artifact under the final name.
//! JSON and text input with errors that name the file, and the sha256 of a
//! model's weight files.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written; it appears under its final name only on [`AtomicFile::commit`].
/// Dropping it without committing removes the temporary file.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `dest` (through `dest.tmp-<pid>` in the same folder),
    /// first removing what a killed writer of `dest` left (see
    /// [`remove_stale_temporaries`]).
    pub fn create(dest: &Path) -> Result<Self> {
        remove_stale_temporaries(dest);
        let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs the data and renames the temporary file to the final name.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer present until commit");
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })
    }
}

/// Removes `dest.tmp-<pid>` files and folders beside `dest` whose writing
/// process is gone (a run killed with SIGKILL cannot clean up after itself).
/// Only on systems with `/proc`, where a process's liveness can be told; a
/// live writer's temporary is never touched.
pub fn remove_stale_temporaries(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let _ = remove_dead_writers_entries(dir, &[prefix]);
}

/// Removes the entries of `dir` (files or folders) named `PREFIX` + PID, for
/// any of `prefixes`, whose process is gone. The PID is this host's, so a
/// prefix for a shared folder should name the host. Does nothing without
/// `/proc`, where liveness cannot be told; a removal that fails does not stop
/// the others, and the first such error is returned.
pub fn remove_dead_writers_entries(dir: &Path, prefixes: &[String]) -> std::io::Result<()> {
    if !Path::new("/proc/self").exists() {
        return Ok(());
    }
    let mut failed = None;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = prefixes
            .iter()
            .find_map(|prefix| file.strip_prefix(prefix.as_str()))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_running(pid) {
            let removed = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(e.path()),
                _ => std::fs::remove_file(e.path()),
            };
            if let Err(err) = removed {
                failed.get_or_insert(err);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Whether process `pid` is running: it has a `/proc` entry and is not a
/// zombie (a killed writer stays one until its parent, or PID 1 for an
/// orphan, reaps it, and a zombie writes nothing).
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X' | 'x')
        ),
        Err(_) => false,
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer
            .as_mut()
            .expect("writer present until commit")
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer
            .as_mut()
            .expect("writer present until commit")
            .flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes sure the folder that will hold output `dest` exists before a command
/// starts its work (creating it, as the folder writers do), so a missing or
/// unwritable folder is an error in the first second, not after the compute.
pub fn prepare_output(dest: &Path) -> Result<()> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if parent.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create {}, the folder of output {}",
            parent.display(),
            dest.display()
        )
    })
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    f.commit()
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Reads `path` as UTF-8 text; an empty file or invalid UTF-8 is an error naming
/// the file (and the byte offset of the first invalid sequence).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read text file {}", path.display()))?;
    if bytes.is_empty() {
        bail!("text file {} is empty", path.display());
    }
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            "text file {} is not UTF-8 (invalid byte sequence at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    }
}

/// sha256 over a model's weight files, in order: the identity reports are tied to.
pub fn model_sha256(model: &crate::Model) -> Result<String> {
    let mut hasher = Sha256::new();
    for p in model.weight_files() {
        let mut f =
            std::fs::File::open(&p).with_context(|| format!("cannot read {}", p.display()))?;
        std::io::copy(&mut f, &mut hasher).with_context(|| format!("reading {}", p.display()))?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The bytes of an input file: memory-mapped when read from disk, owned when a
/// caller (the fuzzing harness, a test) hands them over.
pub enum FileBytes {
    /// A read-only map of a file we do not modify.
    Mapped(memmap2::Mmap),
    /// Bytes in memory.
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only.
    pub fn map(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath us can give
        // wrong numbers but not memory unsafety beyond what every mmap reader
        // accepts.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Ok(FileBytes::Mapped(mmap))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.bin");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&dest, b"whole").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_zombie_writers_temporary_is_stale_and_a_live_ones_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        // A child that has exited but is not yet reaped: a zombie.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        while !stat(dead.id()).contains(") Z") {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let zombie_tmp = dir.path().join(format!("out.gguf.tmp-{}", dead.id()));
        let live_tmp = dir.path().join(format!("out.gguf.tmp-{}", live.id()));
        std::fs::write(&zombie_tmp, b"half").unwrap();
        std::fs::write(&live_tmp, b"writing").unwrap();
        remove_stale_temporaries(&dest);
        assert!(
            !zombie_tmp.exists(),
            "a zombie writes nothing: its temporary is stale"
        );
        assert!(live_tmp.exists(), "a running writer's temporary is kept");
        live.kill().unwrap();
        live.wait().unwrap();
        dead.wait().unwrap();
    }

    #[test]
    fn empty_and_non_utf8_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, b"").unwrap();
        let err = read_text(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");
        let latin = dir.path().join("latin.txt");
        std::fs::write(&latin, b"caf\xe9").unwrap();
        let err = read_text(&latin).unwrap_err().to_string();
        assert!(
            err.contains("latin.txt") && err.contains("offset 3"),
            "{err}"
        );
    }
}
