//! safetensors reader (memory-mapped, single file or sharded through
//! `model.safetensors.index.json`) and a streaming writer.
//!
//! The header is parsed and validated here (lengths, offsets, dtype sizes) so that a
//! file that lies about its layout gets an error naming the tensor, never a panic.

use crate::io::AtomicFile;
use crate::io::FileBytes;
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// A safetensors dtype, by its name in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed.
    I64,
    /// 32-bit signed.
    I32,
    /// 16-bit signed.
    I16,
    /// 8-bit signed.
    I8,
    /// 8-bit unsigned.
    U8,
    /// bool (one byte).
    Bool,
}

impl Dtype {
    /// Parses a header dtype name.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// The header name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The weight type with the same bytes, for the float dtypes the kernels take.
    pub fn as_ggml(self) -> Option<GgmlType> {
        match self {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }

    /// The dtype holding a float weight type's bytes.
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::F32 => Some(Dtype::F32),
            GgmlType::F16 => Some(Dtype::F16),
            GgmlType::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Byte range in the data section.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: FileBytes,
    data_start: usize,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` map, if any.
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Opens and validates a safetensors file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(path, FileBytes::map(path)?)
    }

    /// [`SafetensorsFile::open`] on bytes already in hand (`path` names them in
    /// errors).
    pub fn from_bytes(path: &Path, mmap: FileBytes) -> Result<Self> {
        let (data_start, tensors, metadata) = parse_header(&mmap)
            .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// The bytes of a tensor (validated at open to lie inside the file).
    pub fn data(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + entry.start..self.data_start + entry.end]
    }
}

type Header = (
    usize,
    BTreeMap<String, TensorEntry>,
    BTreeMap<String, String>,
);

fn parse_header(buf: &[u8]) -> Result<Header> {
    if buf.len() < 8 {
        bail!(
            "truncated: {} bytes, the 8-byte header length is missing",
            buf.len()
        );
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || 8 + n > buf.len() as u64 {
        bail!(
            "header length {n} does not fit in the file ({} bytes)",
            buf.len()
        );
    }
    let data_start = 8 + n as usize;
    let header: Value =
        serde_json::from_slice(&buf[8..data_start]).context("header is not valid JSON")?;
    let obj = header.as_object().context("header is not a JSON object")?;
    let data_len = buf.len() - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            for (k, mv) in v.as_object().context("__metadata__ is not an object")? {
                let s = mv
                    .as_str()
                    .with_context(|| format!("__metadata__ '{k}' is not a string"))?;
                metadata.insert(k.clone(), s.to_owned());
            }
            continue;
        }
        let dtype_name = v
            .get("dtype")
            .and_then(Value::as_str)
            .with_context(|| format!("tensor '{name}' has no dtype"))?;
        let dtype = Dtype::from_name(dtype_name)
            .with_context(|| format!("tensor '{name}' has unsupported dtype '{dtype_name}'"))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .with_context(|| format!("tensor '{name}' has no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("tensor '{name}' shape is not a list of sizes"))?;
        let offsets = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
            .with_context(|| format!("tensor '{name}' data_offsets is not [begin, end]"))?;
        let (start, end) = offsets;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .with_context(|| format!("tensor '{name}' shape {shape:?} overflows"))?;
        let expected = numel
            .checked_mul(dtype.size())
            .with_context(|| format!("tensor '{name}' size overflows"))?;
        if end < start || end - start != expected {
            bail!(
                "tensor '{name}' ({dtype_name} {shape:?}) needs {expected} bytes but data_offsets [{start}, {end}] span {}",
                end.saturating_sub(start)
            );
        }
        if end > data_len {
            bail!(
                "tensor '{name}' data_offsets [{start}, {end}] run past the end of the data ({data_len} bytes)"
            );
        }
        tensors.insert(
            name.clone(),
            TensorEntry {
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    Ok((data_start, tensors, metadata))
}

/// A checkpoint made of one or more safetensors files.
pub struct SafetensorsSet {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsSet {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    /// `path` is either of those files.
    pub fn open(path: &Path) -> Result<Self> {
        let is_index = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"));
        let files = if is_index {
            let v: Value = crate::io::read_json(path)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| format!("{}: no weight_map object", path.display()))?;
            let mut shards: Vec<String> = map
                .values()
                .map(|f| f.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .with_context(|| {
                    format!("{}: weight_map values must be file names", path.display())
                })?;
            shards.sort();
            shards.dedup();
            // A shard is a file beside the index: no absolute path, no `..`,
            // no folder (HF writes plain names), so an index cannot point the
            // reader anywhere else on the machine.
            if let Some(bad) = shards.iter().find(|s| {
                let p = Path::new(s.as_str());
                p.components().count() != 1
                    || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
            }) {
                bail!(
                    "{}: weight_map names shard {bad:?}, which is not a file name in the model's folder",
                    path.display()
                );
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            let files = shards
                .iter()
                .map(|s| SafetensorsFile::open(&dir.join(s)))
                .collect::<Result<Vec<_>>>()?;
            for (name, shard) in map {
                let shard = shard.as_str().unwrap_or_default();
                let i = shards.iter().position(|s| s == shard).expect("listed");
                if !files[i].tensors.contains_key(name) {
                    bail!(
                        "{}: weight_map puts '{name}' in {shard}, which does not hold it",
                        path.display()
                    );
                }
            }
            files
        } else {
            vec![SafetensorsFile::open(path)?]
        };
        let mut by_name = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if by_name.insert(name.clone(), i).is_some() {
                    bail!("tensor '{name}' appears in more than one shard");
                }
            }
        }
        Ok(SafetensorsSet { files, by_name })
    }

    /// Total bytes of every tensor whose name starts with `prefix`.
    pub fn bytes_under(&self, prefix: &str) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.tensors.iter())
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, e)| (e.end - e.start) as u64)
            .sum()
    }

    /// The files of the set, in shard order.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(SafetensorsFile::path).collect()
    }

    /// The entry and bytes of tensor `name`.
    pub fn get(&self, name: &str) -> Option<(&TensorEntry, &[u8])> {
        let f = &self.files[*self.by_name.get(name)?];
        let e = &f.tensors[name];
        Some((e, f.data(e)))
    }

    /// Names of every tensor in the set.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Total size of the files in bytes.
    pub fn file_size(&self) -> u64 {
        self.files.iter().map(SafetensorsFile::file_size).sum()
    }

    /// The first file (for error messages).
    pub fn path(&self) -> &Path {
        self.files[0].path()
    }
}

/// Streams a safetensors file: the header is fixed up front from the declared
/// tensors, then each tensor's bytes are written in declaration order, so only one
/// tensor needs to be in memory at a time.
pub struct SafetensorsWriter {
    out: AtomicFile,
    entries: Vec<(String, TensorEntry)>,
    next: usize,
    /// Bytes of the next tensor already written by [`SafetensorsWriter::write_part`].
    partial: usize,
}

impl SafetensorsWriter {
    /// Declares every tensor (name, dtype, shape) in the order they will be written.
    pub fn create(
        dest: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        let mut header = String::from("{");
        if !metadata.is_empty() {
            header.push_str("\"__metadata__\":");
            header.push_str(&serde_json::to_string(metadata)?);
            header.push(',');
        }
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * dtype.size();
            let e = TensorEntry {
                dtype: *dtype,
                shape: shape.clone(),
                start: offset,
                end: offset + bytes,
            };
            header.push_str(&format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}},",
                serde_json::to_string(name)?,
                dtype.name(),
                serde_json::to_string(shape)?,
                e.start,
                e.end
            ));
            offset = e.end;
            entries.push((name.clone(), e));
        }
        if header.ends_with(',') {
            header.pop();
        }
        header.push('}');
        // Pad with spaces so the data section starts 8-byte aligned, as the
        // reference writer does.
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut out = AtomicFile::create(dest)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        Ok(SafetensorsWriter {
            out,
            entries,
            next: 0,
            partial: 0,
        })
    }

    /// Writes the next declared tensor's bytes.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        if self.partial != 0 {
            bail!("tensor '{name}' written whole while another is half written");
        }
        if let Some((expected, e)) = self.entries.get(self.next) {
            if expected == name && bytes.len() != e.end - e.start {
                bail!(
                    "tensor '{name}' has {} bytes, declared {}",
                    bytes.len(),
                    e.end - e.start
                );
            }
        }
        self.write_part(name, bytes)
    }

    /// Writes the next part (whole elements) of the next declared tensor's
    /// bytes; the tensor is complete when its declared size is reached.
    pub fn write_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some((expected, e)) = self.entries.get(self.next) else {
            bail!("tensor '{name}' written but all declared tensors are already written");
        };
        if expected != name {
            bail!("tensor '{name}' written where '{expected}' was declared next");
        }
        let size = e.end - e.start;
        if self.partial + bytes.len() > size {
            bail!(
                "tensor '{name}' has {} bytes, declared {size}",
                self.partial + bytes.len()
            );
        }
        let float = match e.dtype {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        };
        if let Some(ty) = float {
            crate::gguf::refuse_nonfinite(name, ty, bytes, &self.out.dest().display().to_string())?;
        }
        self.out
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.out.dest().display()))?;
        self.partial += bytes.len();
        if self.partial == size {
            self.partial = 0;
            self.next += 1;
        }
        Ok(())
    }

    /// Checks every declared tensor was written and moves the file into place.
    pub fn finish(self) -> Result<()> {
        if self.next != self.entries.len() {
            bail!(
                "{}: only {} of {} declared tensors were written",
                self.out.dest().display(),
                self.next,
                self.entries.len()
            );
        }
        self.out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(dir: &Path) -> PathBuf {
        let path = dir.join("model.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        let mut w = SafetensorsWriter::create(
            &path,
            &[
                ("a".into(), Dtype::F32, vec![2, 3]),
                ("b".into(), Dtype::F16, vec![5]),
            ],
            &meta,
        )
        .unwrap();
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write("a", &a).unwrap();
        w.write("b", &[1u8; 10]).unwrap();
        w.finish().unwrap();
        path
    }

    #[test]
    fn writer_output_is_read_by_the_reference_crate_and_by_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let reference = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let a = reference.tensor("a").unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(&a.data()[4..8], &1f32.to_le_bytes());
        let ours = SafetensorsFile::open(&path).unwrap();
        assert_eq!(ours.metadata["format"], "pt");
        let b = &ours.tensors["b"];
        assert_eq!((b.dtype, b.shape.clone()), (Dtype::F16, vec![5]));
        assert_eq!(ours.data(b), &[1u8; 10]);
    }

    #[test]
    fn header_that_lies_about_lengths_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        // Shorten the file: tensor 'b' now runs past the end.
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let err = format!("{:#}", SafetensorsFile::open(&cut).err().unwrap());
        assert!(
            err.contains("tensor 'b'") && err.contains("past the end"),
            "{err}"
        );
        // A header length larger than the file.
        let mut lying = bytes.clone();
        lying[..8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        std::fs::write(&cut, &lying).unwrap();
        let err = format!("{:#}", SafetensorsFile::open(&cut).err().unwrap());
        assert!(err.contains("header length"), "{err}");
        // Offsets inconsistent with the shape.
        let mut reshaped = bytes.clone();
        let at = reshaped.windows(5).position(|w| w == b"[2,3]").unwrap();
        reshaped[at + 3] = b'4';
        std::fs::write(&cut, &reshaped).unwrap();
        let err = format!("{:#}", SafetensorsFile::open(&cut).err().unwrap());
        assert!(
            err.contains("tensor 'a'") && err.contains("needs 32 bytes"),
            "{err}"
        );
    }

    #[test]
    fn sharded_set_reads_every_shard_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        for (file, name, value) in [("a.safetensors", "x", 1f32), ("b.safetensors", "y", 2f32)] {
            let mut w = SafetensorsWriter::create(
                &dir.path().join(file),
                &[(name.to_owned(), Dtype::F32, vec![1])],
                &BTreeMap::new(),
            )
            .unwrap();
            w.write(name, &value.to_le_bytes()).unwrap();
            w.finish().unwrap();
        }
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
        )
        .unwrap();
        let set = SafetensorsSet::open(&index).unwrap();
        assert_eq!(set.get("y").unwrap().1, &2f32.to_le_bytes());
        assert_eq!(set.get("x").unwrap().1, &1f32.to_le_bytes());
        assert_eq!(set.names().count(), 2);
        // An index that puts a tensor in the wrong shard is named.
        std::fs::write(
            &index,
            r#"{"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}"#,
        )
        .unwrap();
        let err = format!("{:#}", SafetensorsSet::open(&index).err().unwrap());
        assert!(
            err.contains("'x'") && err.contains("b.safetensors"),
            "{err}"
        );
        // Shards outside the folder are refused before anything is opened
        // (once followed: an absolute path, `..`).
        let outside = dir.path().join("a.safetensors");
        for shard in [
            outside.to_str().unwrap(),
            "../a.safetensors",
            "sub/a.safetensors",
        ] {
            let v = serde_json::json!({"weight_map": {"x": shard, "y": "b.safetensors"}});
            std::fs::write(&index, v.to_string()).unwrap();
            let err = format!("{:#}", SafetensorsSet::open(&index).err().unwrap());
            assert!(
                err.contains("not a file name in the model's folder"),
                "{shard}: {err}"
            );
        }
    }

    #[test]
    fn writer_refuses_out_of_order_or_missing_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let decl = [
            ("a".to_owned(), Dtype::F32, vec![1]),
            ("b".to_owned(), Dtype::F32, vec![1]),
        ];
        let mut w = SafetensorsWriter::create(&path, &decl, &BTreeMap::new()).unwrap();
        assert!(w.write("b", &[0; 4]).is_err());
        w.write("a", &[0; 4]).unwrap();
        assert!(w.finish().is_err());
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
