//! Reading evaluation and calibration text: UTF-8, non-empty, with errors naming the file.

use anyhow::{bail, Context, Result};
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_non_utf8_files_are_named() {
        let dir = std::env::temp_dir().join(format!("eval-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, b"").unwrap();
        let err = read_text(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");
        let latin = dir.join("latin.txt");
        std::fs::write(&latin, b"caf\xe9").unwrap();
        let err = read_text(&latin).unwrap_err().to_string();
        assert!(
            err.contains("latin.txt") && err.contains("offset 3"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
