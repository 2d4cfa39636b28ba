//! GGUF v3 reader: header, metadata of every value type, tensor infos, and the
//! tensor data as slices of a memory map (nothing is copied until a tensor is used).
//! A split GGUF (`NAME-00001-of-00003.gguf`, llama-gguf-split's layout: every key
//! in the first file, each file with `split.no`, `split.count` and
//! `split.tensors.count`) opens from its first file as one model; the writer
//! makes the same layout.
//!
//! Every malformed input (truncation, offsets past the end, unknown types, counts
//! that cannot fit in the file) is an error naming the file and the field.

use crate::io::AtomicFile;
use crate::io::FileBytes;
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The magic at the start of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Index (from 0) of this file among the files of a split GGUF (u16).
pub const SPLIT_NO: &str = "split.no";
/// Number of files of a split GGUF (u16; 0 in a file merged back by llama-gguf-split).
pub const SPLIT_COUNT: &str = "split.count";
/// Number of tensors in all files of a split GGUF together (i32).
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";
/// The keys a split writer sets in every file, in llama-gguf-split's order.
pub const SPLIT_KEYS: [&str; 3] = [SPLIT_NO, SPLIT_TENSORS_COUNT, SPLIT_COUNT];

/// The name llama.cpp gives file `index` (from 0) of `count`: `PREFIX-00001-of-00003.gguf`.
pub fn split_path(prefix: &str, index: usize, count: usize) -> PathBuf {
    PathBuf::from(format!("{prefix}{}", split_suffix(index, count)))
}

/// What llama.cpp appends to a split's prefix for file `index` (from 0) of `count`.
fn split_suffix(index: usize, count: usize) -> String {
    format!("-{:05}-of-{count:05}.gguf", index + 1)
}

/// The prefix of a path named as a file of a split GGUF (`PREFIX-00002-of-00003.gguf`
/// gives `PREFIX`), or `None` for any other name.
pub fn split_prefix(path: &str) -> Option<&str> {
    let (rest, count) = path.strip_suffix(".gguf")?.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let five_digits = |n: &str| n.len() == 5 && n.bytes().all(|c| c.is_ascii_digit());
    (five_digits(no) && five_digits(count)).then_some(prefix)
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: element type id and items (all of that type).
    Array(u32, Vec<MetaValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is an integer that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v as f64),
            MetaValue::I16(v) => Some(v as f64),
            MetaValue::I32(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items, if the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::String(s) if s.chars().count() > 60 => {
                write!(f, "{:?}…", s.chars().take(60).collect::<String>())
            }
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(_, items) => write!(f, "[{} items]", items.len()),
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
        }
    }
}

/// Where and how one tensor is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name as stored.
    pub name: String,
    /// Dimensions, innermost first (GGUF order).
    pub dims: Vec<u64>,
    /// Weight type.
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
    /// Which file of a split GGUF holds the data (0 for a single file).
    pub part: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape outermost first (`[rows, cols]` for a matrix), as safetensors and HF use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// One file of a GGUF: its bytes and where its data section starts.
struct GgufPart {
    path: PathBuf,
    bytes: FileBytes,
    data_offset: u64,
}

/// What one GGUF file's header says.
struct Header {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    data_offset: u64,
    alignment: u64,
}

impl Header {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A split key's value as an unsigned integer, or an error naming it.
    fn split_value(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("metadata key '{key}' of a split GGUF is missing"))?;
        v.as_u64()
            .ok_or_else(|| anyhow::anyhow!("metadata '{key}' is {v}, expected an unsigned integer"))
    }
}

/// An open, memory-mapped GGUF model: one file, or every file of a split GGUF.
pub struct GgufFile {
    path: PathBuf,
    parts: Vec<GgufPart>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset of the data section in the (first) file.
    pub data_offset: u64,
    /// Alignment of tensor data.
    pub alignment: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// How deep metadata arrays may nest (llama.cpp writes no nested arrays; a
/// crafted file nested millions deep would otherwise overflow the stack).
const MAX_ARRAY_DEPTH: usize = 4;

/// Metadata array items the reader holds in all (each becomes a [`MetaValue`]
/// of 32 bytes, so this bounds the parsed metadata near 512 MiB whatever a
/// count says; the largest real vocabularies need about a million).
const MAX_ARRAY_ITEMS: u64 = 16 << 20;

/// A bounds-checked little-endian cursor over the header bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array items read so far (see [`MAX_ARRAY_ITEMS`]).
    array_items: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "truncated: {} needs {} bytes at offset {} but the file has {} bytes",
                what(),
                n,
                self.pos,
                self.buf.len()
            ),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be satisfiable by the remaining bytes (each item at
    /// least `min_item_bytes`), so a corrupt count cannot trigger a huge allocation.
    fn count(&mut self, min_item_bytes: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > remaining {
            bail!(
                "{} is {} but only {} bytes remain in the file at offset {} (truncated or corrupt)",
                what(),
                n,
                remaining,
                self.pos
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.count(1, &|| format!("length of {}", what()))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow::anyhow!("{} is not valid UTF-8", what()))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String) -> Result<MetaValue> {
        self.value_at(ty, what, 0)
    }

    /// A value inside `depth` enclosing arrays.
    fn value_at(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("{} is a bool with invalid byte {b}", what()),
            },
            8 => MetaValue::String(self.string(what)?),
            9 => {
                let item_ty = self.u32(&|| format!("array type of {}", what()))?;
                if item_ty > 12 {
                    bail!("{} is an array of unknown value type {item_ty}", what());
                }
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                if item_ty == 9 && depth + 1 >= MAX_ARRAY_DEPTH {
                    bail!(
                        "{} nests arrays more than {MAX_ARRAY_DEPTH} deep (at offset {})",
                        what(),
                        self.pos
                    );
                }
                let n = self.count(min, &|| format!("item count of {}", what()))?;
                self.array_items += n as u64;
                if self.array_items > MAX_ARRAY_ITEMS {
                    bail!(
                        "{} holds {n} items, which takes the file's metadata arrays past {MAX_ARRAY_ITEMS} items in all (offset {}): more than any model's metadata",
                        what(),
                        self.pos
                    );
                }
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value_at(
                        item_ty,
                        &|| format!("{}[{i}]", what()),
                        depth + 1,
                    )?);
                }
                MetaValue::Array(item_ty, items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => bail!("{} has unknown value type {t}", what()),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor infos, and that
    /// every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(path, FileBytes::map(path)?)
    }

    /// [`GgufFile::open`] on bytes already in hand (`path` names them in errors).
    /// When they are the first file of a split GGUF, the other files are opened
    /// beside `path`.
    pub fn from_bytes(path: &Path, bytes: FileBytes) -> Result<Self> {
        let header = Self::parse(&bytes)
            .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        let first = GgufPart {
            path: path.to_path_buf(),
            bytes,
            data_offset: header.data_offset,
        };
        let Header {
            version,
            metadata,
            meta_index,
            tensors,
            data_offset,
            alignment,
        } = header;
        let mut file = GgufFile {
            path: path.to_path_buf(),
            parts: vec![first],
            version,
            metadata,
            meta_index,
            tensor_index: HashMap::with_capacity(tensors.len()),
            tensors: Vec::new(),
            data_offset,
            alignment,
        };
        file.add_tensors(tensors)?;
        file.open_other_parts()?;
        Ok(file)
    }

    /// Adds one file's tensors, refusing a name another file already holds.
    fn add_tensors(&mut self, tensors: Vec<TensorInfo>) -> Result<()> {
        for t in tensors {
            if let Some(&i) = self.tensor_index.get(&t.name) {
                bail!(
                    "tensor '{}' is in both {} and {} of a split GGUF: a duplicated part?",
                    t.name,
                    self.parts[self.tensors[i].part].path.display(),
                    self.parts[t.part].path.display()
                );
            }
            self.tensor_index.insert(t.name.clone(), self.tensors.len());
            self.tensors.push(t);
        }
        Ok(())
    }

    /// For the first file of a split GGUF, opens and checks the others, named
    /// as llama.cpp names them.
    fn open_other_parts(&mut self) -> Result<()> {
        let first = self.path.display().to_string();
        let split_count = match self.get(SPLIT_COUNT) {
            None => return Ok(()),
            Some(v) => match v.as_u64() {
                Some(0 | 1) => return Ok(()),
                Some(n) if n <= u16::MAX as u64 => n as usize,
                _ => bail!("{first}: metadata '{SPLIT_COUNT}' is {v}, expected a file count (u16)"),
            },
        };
        let no = self.require_u64(SPLIT_NO)?;
        let expected_tensors = self.require_u64(SPLIT_TENSORS_COUNT)?;
        let suffix = |i: usize| split_suffix(i, split_count);
        if no != 0 {
            let hint = first
                .strip_suffix(&suffix(no as usize))
                .map(|prefix| split_path(prefix, 0, split_count).display().to_string())
                .unwrap_or_else(|| format!("the file with {SPLIT_NO} = 0"));
            bail!(
                "{first} is file {} of {split_count} of a split GGUF; pass the first file, {hint}",
                no + 1
            );
        }
        let Some(prefix) = first.strip_suffix(&suffix(0)) else {
            bail!(
                "{first} is the first file of a GGUF split into {split_count}, but its name does not end in {}, so the other files cannot be found (llama.cpp looks for the same names)",
                suffix(0)
            );
        };
        for i in 1..split_count {
            let path = split_path(prefix, i, split_count);
            let what = format!(
                "split GGUF {first}: file {} of {split_count}, {}",
                i + 1,
                path.display()
            );
            if !path.exists() {
                bail!("{what}, is missing");
            }
            let bytes = FileBytes::map(&path)?;
            let header =
                Self::parse(&bytes).with_context(|| format!("{what}: not a valid GGUF file"))?;
            let check = |key: &str, expected: u64, why: &str| -> Result<()> {
                let got = header.split_value(key).with_context(|| what.clone())?;
                if got != expected {
                    bail!("{what}: {key} is {got}, expected {expected} ({why})");
                }
                Ok(())
            };
            check(
                SPLIT_NO,
                i as u64,
                "a part copied or renamed from another position?",
            )?;
            check(
                SPLIT_COUNT,
                split_count as u64,
                "a part of another split of the model?",
            )?;
            check(
                SPLIT_TENSORS_COUNT,
                expected_tensors,
                "a part of another model?",
            )?;
            let part = self.parts.len();
            let tensors = header
                .tensors
                .into_iter()
                .map(|t| TensorInfo { part, ..t })
                .collect();
            self.parts.push(GgufPart {
                path,
                bytes,
                data_offset: header.data_offset,
            });
            self.add_tensors(tensors)?;
        }
        if self.tensors.len() as u64 != expected_tensors {
            bail!(
                "split GGUF {first}: its {split_count} files hold {} tensors, {SPLIT_TENSORS_COUNT} says {expected_tensors}",
                self.tensors.len()
            );
        }
        Ok(())
    }

    fn parse(mmap: &[u8]) -> Result<Header> {
        let mut c = Cursor {
            buf: mmap,
            pos: 0,
            array_items: 0,
        };
        let magic = c.take(4, &|| "magic".into())?;
        if magic != GGUF_MAGIC {
            bail!(
                "bad magic {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(magic)
            );
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (supported: 2, 3)");
        }
        let n_tensors = c.count(24, &|| "tensor count".into())?;
        let n_kv = c.count(13, &|| "metadata count".into())?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let ty = c.u32(&|| format!("value type of metadata '{key}'"))?;
            let value = c.value(ty, &|| format!("metadata '{key}'"))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                bail!("metadata key '{key}' appears twice");
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    bail!(
                        "general.alignment is {}, expected a power of two",
                        metadata[i].1
                    );
                }
                a
            }
            None => DEFAULT_ALIGNMENT,
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let what = |field: &str| format!("{field} of tensor '{name}'");
            let n_dims = c.u32(&|| what("dimension count"))?;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor '{name}' has {n_dims} dimensions, expected 1 to 4");
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| what(&format!("dimension {d}")))?);
            }
            let type_id = c.u32(&|| what("type"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                anyhow::anyhow!("tensor '{name}' has unknown or unsupported type id {type_id}")
            })?;
            let offset = c.u64(&|| what("offset"))?;
            if offset % alignment != 0 {
                bail!("tensor '{name}' offset {offset} is not aligned to {alignment}");
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| anyhow::anyhow!("tensor '{name}' dimensions {dims:?} overflow"))?;
            if dims[0] % ty.block_elems() as u64 != 0 {
                bail!(
                    "tensor '{name}' rows of {} elements are not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_elems()
                );
            }
            let n_bytes = n_elements / ty.block_elems() as u64 * ty.block_bytes() as u64;
            if !names.insert(name.clone()) {
                bail!("tensor '{name}' appears twice");
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
                part: 0,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => bail!(
                    "tensor '{}' data (offset {} + {} bytes after the data section at {}) lies past the end of the file ({} bytes)",
                    t.name, t.offset, t.n_bytes, data_offset, file_len
                ),
            }
        }

        Ok(Header {
            version,
            metadata,
            meta_index,
            tensors,
            data_offset,
            alignment,
        })
    }

    /// The file this was read from (the first file of a split GGUF).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file of the model: one, or each file of a split GGUF in order.
    pub fn paths(&self) -> Vec<&Path> {
        self.parts.iter().map(|p| p.path.as_path()).collect()
    }

    /// Size of the model's files in bytes, all files of a split GGUF together.
    pub fn file_size(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes.len() as u64).sum()
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The metadata value of `key`, or an error naming the key and the file.
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| {
            anyhow::anyhow!("{}: metadata key '{key}' is missing", self.path.display())
        })
    }

    /// An unsigned integer metadata value, or an error naming the key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: metadata '{key}' is {v}, expected an unsigned integer",
                self.path.display()
            )
        })
    }

    /// A float metadata value, or an error naming the key.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: metadata '{key}' is {v}, expected a number",
                self.path.display()
            )
        })
    }

    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor (validated at open to lie inside the file).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let part = &self.parts[info.part];
        let start = (part.data_offset + info.offset) as usize;
        &part.bytes[start..start + info.n_bytes as usize]
    }

    /// A metadata array of strings, or an error naming the key.
    pub fn string_array(&self, key: &str) -> Result<Vec<String>> {
        let items = self.require(key)?.as_array().ok_or_else(|| {
            anyhow::anyhow!("{}: metadata '{key}' is not an array", self.path.display())
        })?;
        items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: metadata '{key}' holds a non-string item",
                        self.path.display()
                    )
                })
            })
            .collect()
    }

    /// A metadata array of numbers converted to `f64`, if present.
    pub fn number_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v.as_array().ok_or_else(|| {
            anyhow::anyhow!("{}: metadata '{key}' is not an array", self.path.display())
        })?;
        items
            .iter()
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: metadata '{key}' holds a non-numeric item",
                        self.path.display()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// A tensor to be written: name, GGUF dims (innermost first) and type.
#[derive(Debug, Clone)]
pub struct TensorDecl {
    /// Tensor name.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Serialises a metadata value (without its type id).
fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(x) => put_string(out, x),
        MetaValue::Array(item, items) => {
            out.extend(item.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Refuses tensor `name`'s bytes (of type `ty`) when any value decodes to NaN
/// or Inf: the check every writer runs before a file gets its final name, so
/// no artifact carries a NaN scale an engine would choke on.
pub fn refuse_nonfinite(name: &str, ty: GgmlType, bytes: &[u8], dest: &str) -> Result<()> {
    if let Some(i) = kernels::quants::first_nonfinite(ty, bytes)
        .with_context(|| format!("checking tensor '{name}' for {dest}"))?
    {
        bail!("tensor '{name}' ({ty}) holds NaN or Inf at element {i}: refusing to write {dest}");
    }
    Ok(())
}

/// How an artifact is divided into GGUF files. Split files follow
/// llama-gguf-split: every key in the first file, [`SPLIT_KEYS`] in each, files
/// named by [`split_path`] from the destination without its `.gguf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum GgufSplit {
    /// One file under the destination's name.
    #[default]
    Single,
    /// A new file whenever the next tensor (its size padded to 32 bytes) would
    /// take the tensor data of the current one past this many bytes
    /// (`llama-gguf-split --split-max-size`); a tensor larger than the limit gets
    /// a file of its own.
    MaxBytes(u64),
    /// The file (from 0) of each tensor by name, as the input's split put it
    /// (`llama-quantize --keep-split`); a tensor the map lacks goes with the one
    /// declared before it.
    ByName(HashMap<String, usize>),
}

impl GgufSplit {
    /// Parses llama-gguf-split's `--split-max-size` value: a positive whole
    /// number of megabytes (`M`, 10^6 bytes) or gigabytes (`G`, 10^9 bytes).
    pub fn parse_max_size(text: &str) -> Result<u64> {
        let (digits, unit) = match text.strip_suffix('M') {
            Some(d) => (d, 1_000_000u64),
            None => match text.strip_suffix('G') {
                Some(d) => (d, 1_000_000_000),
                None => bail!(
                    "split size '{text}' needs a unit: M (megabytes) or G (gigabytes), e.g. 2G"
                ),
            },
        };
        digits
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .and_then(|n| n.checked_mul(unit))
            .ok_or_else(|| {
                anyhow::anyhow!("split size '{text}' is not a positive whole number of M or G")
            })
    }

    /// The file of each tensor (`names` and their sizes in bytes, in
    /// declaration order).
    fn assign(&self, names: &[&str], sizes: &[u64]) -> Vec<usize> {
        match self {
            GgufSplit::Single => vec![0; sizes.len()],
            GgufSplit::MaxBytes(max) => {
                let (mut part, mut used, mut files) =
                    (0usize, 0u64, Vec::with_capacity(sizes.len()));
                for &n in sizes {
                    let n = n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
                    if used > 0 && used + n > *max {
                        part += 1;
                        used = 0;
                    }
                    used += n;
                    files.push(part);
                }
                files
            }
            GgufSplit::ByName(files) => {
                let mut last = 0;
                names
                    .iter()
                    .map(|n| {
                        last = files.get(*n).copied().unwrap_or(last);
                        last
                    })
                    .collect()
            }
        }
    }
}

/// The header of one GGUF file (magic to the end of the tensor infos, padded to
/// `alignment`), with each tensor's offset in its data section.
fn gguf_header(
    metadata: &[(String, MetaValue)],
    tensors: &[&(TensorDecl, u64, usize)],
    alignment: u64,
) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    head.extend(GGUF_MAGIC);
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in metadata {
        if !seen.insert(k.as_str()) {
            bail!("metadata key '{k}' given twice");
        }
        put_string(&mut head, k);
        head.extend(v.type_id().to_le_bytes());
        put_value(&mut head, v);
    }
    let mut offset = 0u64;
    for (t, n_bytes, _) in tensors {
        put_string(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| head.extend(d.to_le_bytes()));
        head.extend(t.ty.id().to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset = (offset + n_bytes).div_ceil(alignment) * alignment;
    }
    head.resize(
        (head.len() as u64).div_ceil(alignment) as usize * alignment as usize,
        0,
    );
    Ok(head)
}

/// One file of an artifact: its name, header and data alignment.
struct FilePlan {
    path: PathBuf,
    head: Vec<u8>,
    alignment: u64,
}

/// Lays out an artifact: each file with its header, and each declared tensor
/// with its size in bytes and its file.
#[allow(clippy::type_complexity)]
fn plan_files(
    dest: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorDecl],
    split: &GgufSplit,
) -> Result<(Vec<FilePlan>, Vec<(TensorDecl, u64, usize)>)> {
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| anyhow::anyhow!("general.alignment is {v}, expected a power of two"))?,
        None => DEFAULT_ALIGNMENT,
    };
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n: u64 = t.dims.iter().product();
        let n_bytes = t.ty.bytes_for(n as usize).ok_or_else(|| {
            anyhow::anyhow!(
                "tensor '{}' has {} elements, not a multiple of the {} block size {}",
                t.name,
                n,
                t.ty,
                t.ty.block_elems()
            )
        })? as u64;
        if t.dims[0] % t.ty.block_elems() as u64 != 0 {
            bail!(
                "tensor '{}' rows of {} are not whole {} blocks",
                t.name,
                t.dims[0],
                t.ty
            );
        }
        sizes.push(n_bytes);
    }
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let file_of = split.assign(&names, &sizes);
    let decls: Vec<_> = tensors
        .iter()
        .zip(sizes)
        .zip(&file_of)
        .map(|((t, n), &f)| (t.clone(), n, f))
        .collect();
    if *split == GgufSplit::Single {
        let head = gguf_header(metadata, &decls.iter().collect::<Vec<_>>(), alignment)?;
        let plan = FilePlan {
            path: dest.to_path_buf(),
            head,
            alignment,
        };
        return Ok((vec![plan], decls));
    }
    let count = file_of.iter().max().map_or(1, |&f| f + 1);
    if count > u16::MAX as usize {
        bail!("{count} split files: GGUF allows at most {}", u16::MAX);
    }
    let dest_text = dest.display().to_string();
    let prefix = dest_text.strip_suffix(".gguf").unwrap_or(&dest_text);
    let split_keys = |no: usize| {
        [
            (SPLIT_NO.to_owned(), MetaValue::U16(no as u16)),
            (
                SPLIT_TENSORS_COUNT.to_owned(),
                MetaValue::I32(tensors.len() as i32),
            ),
            (SPLIT_COUNT.to_owned(), MetaValue::U16(count as u16)),
        ]
    };
    let mut plans = Vec::with_capacity(count);
    for no in 0..count {
        // As llama-gguf-split: the first file carries every key (split keys
        // already there are replaced at the end), the others only the split
        // keys and so the default alignment.
        let (keys, file_alignment) = if no == 0 {
            let mut keys: Vec<_> = metadata
                .iter()
                .filter(|(k, _)| !SPLIT_KEYS.contains(&k.as_str()))
                .cloned()
                .collect();
            keys.extend(split_keys(no));
            (keys, alignment)
        } else {
            (split_keys(no).to_vec(), DEFAULT_ALIGNMENT)
        };
        let mine: Vec<_> = decls.iter().filter(|d| d.2 == no).collect();
        plans.push(FilePlan {
            path: split_path(prefix, no, count),
            head: gguf_header(&keys, &mine, file_alignment)?,
            alignment: file_alignment,
        });
    }
    Ok((plans, decls))
}

/// Streams a GGUF v3 artifact, one file or split: each header, metadata and
/// tensor infos are fixed up front from the declarations, then each tensor's
/// bytes are written in declaration order (so only one tensor need be in
/// memory) to its file, each aligned to that file's alignment. The files
/// appear under their names only on [`GgufWriter::finish`].
pub struct GgufWriter {
    files: Vec<(AtomicFile, u64)>,
    /// Declaration, size in bytes, file.
    decls: Vec<(TensorDecl, u64, usize)>,
    next: usize,
    /// Bytes of the next tensor already written by [`GgufWriter::write_tensor_part`].
    partial: u64,
}

impl GgufWriter {
    /// Writes the header of `dest` with `metadata` (in order) and the tensor infos.
    pub fn create(
        dest: &Path,
        metadata: &[(String, MetaValue)],
        tensors: &[TensorDecl],
    ) -> Result<Self> {
        Self::create_split(dest, metadata, tensors, &GgufSplit::Single)
    }

    /// [`GgufWriter::create`] dividing the tensors into files by `split`.
    pub fn create_split(
        dest: &Path,
        metadata: &[(String, MetaValue)],
        tensors: &[TensorDecl],
        split: &GgufSplit,
    ) -> Result<Self> {
        let (plans, decls) = plan_files(dest, metadata, tensors, split)?;
        let files = plans
            .into_iter()
            .map(|f| Ok((Self::start_file(&f.path, &f.head)?, f.alignment)))
            .collect::<Result<_>>()?;
        Ok(GgufWriter {
            files,
            decls,
            next: 0,
            partial: 0,
        })
    }

    /// The files [`GgufWriter::create_split`] would write and the size of each
    /// in bytes, writing nothing (`quantize --dry-run`).
    pub fn planned_sizes(
        dest: &Path,
        metadata: &[(String, MetaValue)],
        tensors: &[TensorDecl],
        split: &GgufSplit,
    ) -> Result<Vec<(PathBuf, u64)>> {
        let (plans, decls) = plan_files(dest, metadata, tensors, split)?;
        Ok(plans
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let data: u64 = decls
                    .iter()
                    .filter(|d| d.2 == i)
                    .map(|d| d.1.div_ceil(f.alignment) * f.alignment)
                    .sum();
                (f.path, f.head.len() as u64 + data)
            })
            .collect())
    }

    fn start_file(path: &Path, head: &[u8]) -> Result<AtomicFile> {
        let mut out = AtomicFile::create(path)?;
        out.write_all(head)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(out)
    }

    /// The files this writer makes, in order (one unless split).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .map(|(f, _)| f.dest().to_path_buf())
            .collect()
    }

    /// Writes the next declared tensor's bytes.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        if self.partial != 0 {
            bail!("tensor '{name}' written whole while another is half written");
        }
        if let Some((decl, n_bytes, _)) = self.decls.get(self.next) {
            if decl.name == name && bytes.len() as u64 != *n_bytes {
                bail!(
                    "tensor '{name}' has {} bytes, its declaration needs {n_bytes}",
                    bytes.len()
                );
            }
        }
        self.write_tensor_part(name, bytes)
    }

    /// Writes the next part (whole blocks) of the next declared tensor's bytes;
    /// the tensor is complete when its declared size is reached. Lets a writer
    /// stream a tensor larger than it wants in memory.
    pub fn write_tensor_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some((decl, n_bytes, file)) = self.decls.get(self.next) else {
            bail!("tensor '{name}' written but every declared tensor is already written");
        };
        if decl.name != name {
            bail!(
                "tensor '{name}' written where '{}' was declared next",
                decl.name
            );
        }
        if self.partial + bytes.len() as u64 > *n_bytes {
            bail!(
                "tensor '{name}' has {} bytes, its declaration needs {n_bytes}",
                self.partial + bytes.len() as u64
            );
        }
        let (out, alignment) = &mut self.files[*file];
        let dest = out.dest().display().to_string();
        refuse_nonfinite(name, decl.ty, bytes, &dest)?;
        out.write_all(bytes)
            .with_context(|| format!("cannot write {dest}"))?;
        self.partial += bytes.len() as u64;
        if self.partial < *n_bytes {
            return Ok(());
        }
        // Every tensor, the last one too, is padded to the alignment: llama.cpp
        // reads the data section as one blob of the padded sizes.
        let padded = (*n_bytes).div_ceil(*alignment) * *alignment;
        let pad = vec![0u8; (padded - n_bytes) as usize];
        out.write_all(&pad)
            .with_context(|| format!("cannot write {dest}"))?;
        self.partial = 0;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written and moves the files into place;
    /// returns their paths.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        let paths = self.paths();
        if self.next != self.decls.len() {
            bail!(
                "{}: only {} of {} declared tensors were written",
                paths[0].display(),
                self.next,
                self.decls.len()
            );
        }
        for (out, _) in self.files {
            out.commit()?;
        }
        Ok(paths)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Builds GGUF bytes by hand (test-only; the real writer belongs to the GGUF
    /// artifacts issue).
    pub(crate) struct RawGguf {
        pub kv: Vec<(String, u32, Vec<u8>)>,
        pub tensors: Vec<(String, Vec<u64>, u32, u64)>,
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl RawGguf {
        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(b"GGUF");
            out.extend(3u32.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            for (k, ty, v) in &self.kv {
                put_str(&mut out, k);
                out.extend(ty.to_le_bytes());
                out.extend(v);
            }
            for (name, dims, ty, off) in &self.tensors {
                put_str(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend(off.to_le_bytes());
            }
            while out.len() % 32 != 0 {
                out.push(0);
            }
            out.extend(&self.data);
            out
        }
    }

    fn string_value(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        put_str(&mut v, s);
        v
    }

    fn sample() -> RawGguf {
        let mut arr = Vec::new();
        arr.extend(8u32.to_le_bytes());
        arr.extend(2u64.to_le_bytes());
        put_str(&mut arr, "a");
        put_str(&mut arr, "bc");
        RawGguf {
            kv: vec![
                ("general.architecture".into(), 8, string_value("llama")),
                ("x.u8".into(), 0, vec![7]),
                ("x.i8".into(), 1, vec![0xff]),
                ("x.u16".into(), 2, 300u16.to_le_bytes().to_vec()),
                ("x.i16".into(), 3, (-300i16).to_le_bytes().to_vec()),
                ("x.u32".into(), 4, 70000u32.to_le_bytes().to_vec()),
                ("x.i32".into(), 5, (-70000i32).to_le_bytes().to_vec()),
                ("x.f32".into(), 6, 1.5f32.to_le_bytes().to_vec()),
                ("x.bool".into(), 7, vec![1]),
                ("x.arr".into(), 9, arr),
                ("x.u64".into(), 10, (1u64 << 40).to_le_bytes().to_vec()),
                ("x.i64".into(), 11, (-5i64).to_le_bytes().to_vec()),
                ("x.f64".into(), 12, 2.25f64.to_le_bytes().to_vec()),
            ],
            tensors: vec![("w".into(), vec![4, 2], 0, 0)],
            data: (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect(),
        }
    }

    #[test]
    fn deeply_nested_and_huge_metadata_arrays_are_refused_not_followed() {
        // An array nested two million deep (once a stack overflow that aborted
        // the process): refused at the fourth level.
        let mut nested = Vec::new();
        for _ in 0..2_000_000 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(0u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
        nested.push(0);
        let raw = RawGguf {
            kv: vec![("x.deep".into(), 9, nested)],
            tensors: vec![],
            data: vec![],
        };
        let f = write(&raw.bytes());
        let e = format!("{:#}", GgufFile::open(f.path()).unwrap_err());
        assert!(
            e.contains("metadata 'x.deep'") && e.contains("nests arrays"),
            "{e}"
        );
        // One u8 array of 17 million items (once 32 bytes of memory per byte of
        // file): refused by count, before the items are read.
        let n = (MAX_ARRAY_ITEMS + 1) as usize;
        let mut big = Vec::with_capacity(12 + n);
        big.extend(0u32.to_le_bytes());
        big.extend((n as u64).to_le_bytes());
        big.resize(12 + n, 1);
        let raw = RawGguf {
            kv: vec![("x.big".into(), 9, big)],
            tensors: vec![],
            data: vec![],
        };
        let f = write(&raw.bytes());
        let e = format!("{:#}", GgufFile::open(f.path()).unwrap_err());
        assert!(
            e.contains("metadata 'x.big'") && e.contains("items in all"),
            "{e}"
        );
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn open_err(bytes: &[u8]) -> String {
        let f = write(bytes);
        format!("{:#}", GgufFile::open(f.path()).unwrap_err())
    }

    #[test]
    fn reads_every_value_type_and_tensor_data() {
        let f = write(&sample().bytes());
        let g = GgufFile::open(f.path()).unwrap();
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(g.get("x.u8"), Some(&MetaValue::U8(7)));
        assert_eq!(g.get("x.i8"), Some(&MetaValue::I8(-1)));
        assert_eq!(g.get("x.u16"), Some(&MetaValue::U16(300)));
        assert_eq!(g.get("x.i16"), Some(&MetaValue::I16(-300)));
        assert_eq!(g.get("x.u32"), Some(&MetaValue::U32(70000)));
        assert_eq!(g.get("x.i32"), Some(&MetaValue::I32(-70000)));
        assert_eq!(g.get("x.f32"), Some(&MetaValue::F32(1.5)));
        assert_eq!(g.get("x.bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(g.string_array("x.arr").unwrap(), vec!["a", "bc"]);
        assert_eq!(g.get("x.u64").unwrap().as_u64(), Some(1 << 40));
        assert_eq!(g.get("x.i64"), Some(&MetaValue::I64(-5)));
        assert_eq!(g.get("x.f64").unwrap().as_f64(), Some(2.25));
        let t = g.tensor("w").unwrap();
        assert_eq!(t.shape(), vec![2, 4]);
        let data = g.tensor_data(t);
        assert_eq!(f32::from_le_bytes(data[28..32].try_into().unwrap()), 7.0);
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let bytes = sample().bytes();
        for cut in [3, 10, 30, 100, bytes.len() - 1] {
            let err = open_err(&bytes[..cut]);
            assert!(
                err.contains("truncated") || err.contains("past the end") || err.contains("remain"),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn tensor_past_end_of_file_is_named() {
        let mut raw = sample();
        raw.tensors[0].3 = 4096;
        let err = open_err(&raw.bytes());
        assert!(
            err.contains("tensor 'w'") && err.contains("past the end"),
            "{err}"
        );
    }

    #[test]
    fn unknown_tensor_type_is_named() {
        let mut raw = sample();
        raw.tensors[0].2 = 77;
        let err = open_err(&raw.bytes());
        assert!(
            err.contains("tensor 'w'") && err.contains("unknown"),
            "{err}"
        );
    }

    #[test]
    fn bad_magic_and_huge_counts_are_rejected() {
        let mut bytes = sample().bytes();
        bytes[0] = b'X';
        assert!(open_err(&bytes).contains("bad magic"));
        let mut bytes = sample().bytes();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(open_err(&bytes).contains("metadata count"));
    }

    /// Writes `n` f32 tensors of 100 values (tensor k all k) split by `split`
    /// into `dir/m.gguf`; returns the files written.
    fn write_split(dir: &Path, n: usize, split: &GgufSplit) -> Vec<PathBuf> {
        let decls: Vec<_> = (0..n)
            .map(|k| TensorDecl {
                name: format!("t{k}"),
                dims: vec![100],
                ty: GgmlType::F32,
            })
            .collect();
        let meta = [(
            "general.architecture".to_owned(),
            MetaValue::String("llama".into()),
        )];
        let planned = GgufWriter::planned_sizes(&dir.join("m.gguf"), &meta, &decls, split).unwrap();
        let mut w = GgufWriter::create_split(&dir.join("m.gguf"), &meta, &decls, split).unwrap();
        for k in 0..n {
            let bytes: Vec<u8> = [k as f32; 100]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            w.write_tensor(&format!("t{k}"), &bytes).unwrap();
        }
        let paths = w.finish().unwrap();
        // The dry run's sizes are the real files'.
        let sizes: Vec<_> = paths
            .iter()
            .map(|p| (p.clone(), std::fs::metadata(p).unwrap().len()))
            .collect();
        assert_eq!(planned, sizes);
        paths
    }

    #[test]
    fn a_split_gguf_is_written_as_llama_gguf_split_lays_it_out_and_reads_as_one_model() {
        let dir = tempfile::tempdir().unwrap();
        // 400 data bytes (416 padded) per tensor, at most 900 per file: 2 + 2 + 1.
        let paths = write_split(dir.path(), 5, &GgufSplit::MaxBytes(900));
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "m-00001-of-00003.gguf",
                "m-00002-of-00003.gguf",
                "m-00003-of-00003.gguf"
            ]
        );
        let second = GgufFile::from_bytes(
            &paths[1],
            FileBytes::Owned(std::fs::read(&paths[1]).unwrap()),
        );
        // Each file alone is a GGUF; only the first carries the model's keys.
        let keys = |p: &Path| {
            let raw = std::fs::read(p).unwrap();
            let head = GgufFile::parse(&raw).unwrap();
            head.metadata
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&paths[0]),
            [
                "general.architecture",
                SPLIT_NO,
                SPLIT_TENSORS_COUNT,
                SPLIT_COUNT
            ]
        );
        assert_eq!(keys(&paths[2]), SPLIT_KEYS);
        let err = format!("{:#}", second.err().unwrap());
        assert!(
            err.contains("file 2 of 3") && err.contains("m-00001-of-00003.gguf"),
            "{err}"
        );

        let g = GgufFile::open(&paths[0]).unwrap();
        assert_eq!(
            g.paths(),
            paths.iter().map(PathBuf::as_path).collect::<Vec<_>>()
        );
        assert_eq!(g.tensors.len(), 5);
        for k in 0..5 {
            let t = g.tensor(&format!("t{k}")).unwrap();
            assert_eq!(t.part, k / 2);
            let data = g.tensor_data(t);
            assert!(data
                .chunks(4)
                .all(|c| f32::from_le_bytes(c.try_into().unwrap()) == k as f32));
        }
        let total: u64 = paths
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(g.file_size(), total);

        // A tensor bigger than the limit gets a file of its own; one file is
        // still named as a split, as llama-gguf-split does.
        let one = tempfile::tempdir().unwrap();
        let paths = write_split(one.path(), 2, &GgufSplit::MaxBytes(1_000_000));
        assert_eq!(paths[0].file_name().unwrap(), "m-00001-of-00001.gguf");
        assert_eq!(GgufFile::open(&paths[0]).unwrap().tensors.len(), 2);
        let paths = write_split(one.path(), 2, &GgufSplit::MaxBytes(10));
        assert_eq!(paths.len(), 2);
        // Kept from an input split: any order; an unknown name follows its predecessor.
        let files = HashMap::from([("t0".to_owned(), 1), ("t1".to_owned(), 0)]);
        let paths = write_split(one.path(), 3, &GgufSplit::ByName(files));
        let g = GgufFile::open(&paths[0]).unwrap();
        let parts: Vec<_> = (0..3)
            .map(|k| g.tensor(&format!("t{k}")).unwrap().part)
            .collect();
        assert_eq!(parts, [1, 0, 0]);
        assert!(g
            .tensor_data(g.tensor("t0").unwrap())
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn a_missing_duplicated_or_foreign_split_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_split(dir.path(), 5, &GgufSplit::MaxBytes(900));
        let open_err = |p: &Path| format!("{:#}", GgufFile::open(p).expect_err("an error"));

        // Missing.
        let saved = std::fs::read(&paths[2]).unwrap();
        std::fs::remove_file(&paths[2]).unwrap();
        let err = open_err(&paths[0]);
        assert!(
            err.contains("file 3 of 3") && err.contains("is missing"),
            "{err}"
        );
        // Duplicated: the second file copied over the third.
        std::fs::copy(&paths[1], &paths[2]).unwrap();
        let err = open_err(&paths[0]);
        assert!(
            err.contains("m-00003-of-00003.gguf") && err.contains("split.no is 1, expected 2"),
            "{err}"
        );
        std::fs::write(&paths[2], &saved).unwrap();
        GgufFile::open(&paths[0]).unwrap();

        // From another model: a split of four tensors written under the same name.
        let other = tempfile::tempdir().unwrap();
        let foreign = write_split(other.path(), 4, &GgufSplit::MaxBytes(900));
        std::fs::copy(&foreign[1], &paths[1]).unwrap();
        let err = open_err(&paths[0]);
        assert!(err.contains("split.count is 2, expected 3"), "{err}");
        let foreign = write_split(other.path(), 6, &GgufSplit::MaxBytes(900));
        std::fs::copy(&foreign[1], &paths[1]).unwrap();
        let err = open_err(&paths[0]);
        assert!(
            err.contains("split.tensors.count is 6, expected 5"),
            "{err}"
        );

        // A first file whose name lost the pattern.
        let renamed = dir.path().join("m.gguf");
        std::fs::copy(&paths[0], &renamed).unwrap();
        let err = open_err(&renamed);
        assert!(err.contains("-00001-of-00003.gguf"), "{err}");
    }

    #[test]
    fn split_names_are_made_and_read_back_as_llama_cpp_names_them() {
        let p = split_path("/m/Model-Q4", 1, 3);
        assert_eq!(p, Path::new("/m/Model-Q4-00002-of-00003.gguf"));
        assert_eq!(split_prefix(p.to_str().unwrap()), Some("/m/Model-Q4"));
        for other in [
            "/m/Model-Q4.gguf",
            "/m/a-0002-of-00003.gguf",
            "/m/a-00002-of-0000x.gguf",
            "/m/a-00002-of-00003.bin",
        ] {
            assert_eq!(split_prefix(other), None, "{other}");
        }
    }

    #[test]
    fn split_sizes_parse_as_llama_gguf_split_reads_them() {
        assert_eq!(GgufSplit::parse_max_size("300M").unwrap(), 300_000_000);
        assert_eq!(GgufSplit::parse_max_size("2G").unwrap(), 2_000_000_000);
        for bad in ["2", "0G", "-1M", "1.5G", "G", "99999999999999999G"] {
            assert!(GgufSplit::parse_max_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writer_round_trips_every_value_type_through_the_reader() {
        let f = write(&sample().bytes());
        let g = GgufFile::open(f.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let decls: Vec<TensorDecl> = g
            .tensors
            .iter()
            .map(|t| TensorDecl {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })
            .chain([TensorDecl {
                name: "q".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            }])
            .collect();
        let mut w = GgufWriter::create(&dest, &g.metadata, &decls).unwrap();
        w.write_tensor("w", g.tensor_data(g.tensor("w").unwrap()))
            .unwrap();
        assert!(w.write_tensor("q", &[0u8; 67]).is_err());
        w.write_tensor("q", &[7u8; 68]).unwrap();
        w.finish().unwrap();
        let back = GgufFile::open(&dest).unwrap();
        assert_eq!(back.metadata, g.metadata);
        assert_eq!(
            back.tensor_data(back.tensor("w").unwrap()),
            g.tensor_data(g.tensor("w").unwrap())
        );
        let q = back.tensor("q").unwrap();
        assert_eq!(
            (q.ty, q.offset % 32, back.tensor_data(q)),
            (GgmlType::Q8_0, 0, &[7u8; 68][..])
        );
        // The data section ends padded to the alignment, as llama.cpp reads it.
        assert_eq!(back.file_size(), back.data_offset + q.offset + 96);
    }

    #[test]
    fn unfinished_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let decls = [TensorDecl {
            name: "a".into(),
            dims: vec![4],
            ty: GgmlType::F32,
        }];
        let w = GgufWriter::create(&dest, &[], &decls).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let bad = [TensorDecl {
            name: "b".into(),
            dims: vec![33],
            ty: GgmlType::Q4_0,
        }];
        assert!(GgufWriter::create(&dest, &[], &bad).is_err());
    }

    #[test]
    fn a_nan_scale_or_value_is_refused_before_the_file_appears() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let decls = [
            TensorDecl {
                name: "ok".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
            TensorDecl {
                name: "bad".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let mut w = GgufWriter::create(&dest, &[], &decls).unwrap();
        w.write_tensor("ok", &[7u8; 68]).unwrap();
        // The second block's f16 scale is NaN (0x7e00).
        let mut bad = [7u8; 68];
        bad[34..36].copy_from_slice(&[0x00, 0x7e]);
        let err = format!("{:#}", w.write_tensor("bad", &bad).unwrap_err());
        assert!(err.contains("'bad'") && err.contains("element 32"), "{err}");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
