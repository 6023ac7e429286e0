//! A memory-mapped safetensors file: header parsing with precise validation, zero-copy
//! tensor views, and releasing pages once a tensor has been consumed.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use super::CheckpointError;
use crate::dtype::DType;

/// Headers larger than this are refused: real ones are a few MB at most, and a corrupt
/// length field must not make us allocate gigabytes.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: Vec<TensorInfo>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| CheckpointError::io(path, e))?
            .len();
        if len < 8 {
            return Err(CheckpointError::invalid(
                path,
                format!("truncated safetensors file: {len} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only; a file changed by another process while we run
        // is outside what any model loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        let _ = mmap.advise(memmap2::Advice::Sequential);
        let tensors = parse_header(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn bytes(&self, tensor: &TensorInfo) -> &[u8] {
        &self.mmap[tensor.range.clone()]
    }

    /// Bytes of an absolute range inside one tensor's data.
    pub fn bytes_at(&self, range: Range<usize>) -> &[u8] {
        &self.mmap[range]
    }

    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }

    /// Drops this process's mapping of a consumed range so that resident memory stays
    /// bounded while streaming a large file (the page cache keeps the data).
    pub fn release(&self, range: &Range<usize>) {
        let (start, end) = page_bounds(range, self.mmap.len());
        if end > start {
            // SAFETY: the map is read-only and file-backed: dropping pages only means they
            // are faulted in again from the page cache if read later.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

/// The page-aligned span covering `range`, clipped to the map.
fn page_bounds(range: &Range<usize>, len: usize) -> (usize, usize) {
    const PAGE: usize = 4096;
    let start = range.start / PAGE * PAGE;
    let end = (range.end.div_ceil(PAGE) * PAGE).min(len);
    (start, end)
}

fn parse_header(path: &Path, data: &[u8]) -> Result<Vec<TensorInfo>, CheckpointError> {
    let file_len = data.len() as u64;
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes checked"));
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(CheckpointError::invalid(
            path,
            format!(
                "corrupt safetensors header: header length {header_len} but the file has {file_len} bytes"
            ),
        ));
    }
    let header_end = 8 + header_len as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&data[8..header_end]).map_err(|e| {
            CheckpointError::invalid(path, format!("corrupt safetensors header: {e}"))
        })?;
    let data_len = data.len() - header_end;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |reason: String| CheckpointError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| bad(format!("malformed header entry: {e}")))?;
        let dtype = DType::from_safetensors(&entry.dtype)
            .ok_or_else(|| bad(format!("unsupported dtype {}", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        let numel = entry
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {:?} overflows", entry.shape)))?;
        let expected = numel
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| bad(format!("shape {:?} overflows", entry.shape)))?;
        if end < begin || end - begin != expected {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] hold {} bytes but shape {:?} of {dtype} needs {expected}",
                end.saturating_sub(begin),
                entry.shape
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] point outside the file (its data section has {data_len} bytes: truncated?)"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: entry.shape,
            range: header_end + begin..header_end + end,
        });
    }
    tensors.sort_by_key(|t| t.range.start);
    for pair in tensors.windows(2) {
        if pair[1].range.start < pair[0].range.end {
            return Err(CheckpointError::BadTensor {
                path: path.to_path_buf(),
                tensor: pair[1].name.clone(),
                reason: format!("its data overlaps tensor '{}'", pair[0].name),
            });
        }
    }
    Ok(tensors)
}
