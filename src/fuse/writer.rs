//! Writes fused tensors as a Hugging Face safetensors checkpoint, streaming: each tensor, or
//! each part of a large one, is written as it arrives, on a thread of its own so that
//! writing overlaps the averaging of what follows (at most one part waits in between).
//! Above the shard size the weights are split into `model-0000k-of-0000N.safetensors` with
//! `model.safetensors.index.json`, as transformers' `save_pretrained` does. Files are written
//! under temporary names and renamed at the end, so a failed fusion leaves no half-written
//! checkpoint behind. A value head that came in a file of its own (LLaMA-Factory's
//! value_head.safetensors, where its loader looks) goes out in one too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::plan::PlannedTensor;
use super::sink::{FusedData, TensorSink};
use super::FuseError;
use crate::checkpoint::{INDEX_FILE, SINGLE_WEIGHTS_FILE, VALUE_HEAD_FILE};

#[derive(Clone)]
struct Shard {
    file_name: String,
    temp_path: PathBuf,
    /// Indices into the plan's tensor list.
    tensors: std::ops::Range<usize>,
    header: Vec<u8>,
}

/// Data for the writing thread: a whole tensor, or one part of it (`last` on the part that
/// completes it).
struct Part {
    data: FusedData,
    last: bool,
}

pub struct SafetensorsWriter {
    dir: PathBuf,
    /// Whether `create` made the folder: a failed fusion then removes it too (when empty).
    created_dir: bool,
    shards: Vec<Shard>,
    names: Vec<String>,
    /// Each tensor's size in the output, in plan order.
    sizes: Vec<u64>,
    next_tensor: usize,
    /// Bytes of `next_tensor` already sent in parts.
    received: u64,
    sender: Option<SyncSender<Part>>,
    /// Buffers the thread has written, handed back for reuse.
    returned: Receiver<FusedData>,
    thread: Option<JoinHandle<Result<(), FuseError>>>,
    finished: bool,
}

impl SafetensorsWriter {
    /// Lays out the shards for `tensors` (in the order they will be put) under
    /// `max_shard_bytes` each, the last `value_head_tensors` of them in VALUE_HEAD_FILE,
    /// with `metadata` stored in every header besides `format: pt` (which transformers
    /// requires), and starts the writing thread.
    pub fn create(
        dir: &Path,
        tensors: &[PlannedTensor],
        max_shard_bytes: u64,
        value_head_tensors: usize,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, FuseError> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| FuseError::output(dir, e))?;
        let head_start = tensors.len().saturating_sub(value_head_tensors);
        let groups = group_into_shards(&tensors[..head_start], max_shard_bytes);
        let count = groups.len();
        let head = (head_start < tensors.len()).then(|| Shard {
            file_name: VALUE_HEAD_FILE.to_string(),
            temp_path: dir.join(format!(".{VALUE_HEAD_FILE}.partial")),
            header: header_bytes(&tensors[head_start..], metadata),
            tensors: head_start..tensors.len(),
        });
        let shards: Vec<Shard> = groups
            .into_iter()
            .enumerate()
            .map(|(k, range)| {
                let file_name = if count == 1 {
                    SINGLE_WEIGHTS_FILE.to_string()
                } else {
                    format!("model-{:05}-of-{count:05}.safetensors", k + 1)
                };
                Shard {
                    temp_path: dir.join(format!(".{file_name}.partial")),
                    file_name,
                    header: header_bytes(&tensors[range.clone()], metadata),
                    tensors: range,
                }
            })
            .chain(head)
            .collect();
        let (sender, receiver) = sync_channel(1);
        let (give_back, returned) = sync_channel(1);
        let thread_shards = shards.clone();
        let thread = std::thread::Builder::new()
            .name("warm-writer".into())
            .spawn(move || write_shards(&thread_shards, &receiver, &give_back))
            .map_err(|e| FuseError::output(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            created_dir,
            shards,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            sizes: tensors.iter().map(PlannedTensor::output_bytes).collect(),
            next_tensor: 0,
            received: 0,
            sender: Some(sender),
            returned,
            thread: Some(thread),
            finished: false,
        })
    }

    /// Waits for the writing thread and returns its outcome.
    fn join(&mut self) -> Result<(), FuseError> {
        self.sender = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(FuseError::output(
                &self.dir,
                std::io::Error::other("the writing thread panicked"),
            )),
            None => Ok(()),
        }
    }

    /// Renames the shards into place and writes the index for a sharded checkpoint.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, FuseError> {
        if self.next_tensor != self.names.len() {
            return Err(FuseError::Load {
                tensor: self
                    .names
                    .get(self.next_tensor)
                    .cloned()
                    .unwrap_or_default(),
                reason: "fusion ended before every tensor was written".into(),
            });
        }
        self.join()?;
        let mut written = Vec::new();
        for shard in &self.shards {
            let target = self.dir.join(&shard.file_name);
            std::fs::rename(&shard.temp_path, &target)
                .map_err(|e| FuseError::output(&target, e))?;
            written.push(target);
        }
        let index_path = self.dir.join(INDEX_FILE);
        // The index lists the model's shards; a value head's file is found by its name.
        let model_shards: Vec<&Shard> = self
            .shards
            .iter()
            .filter(|s| s.file_name != VALUE_HEAD_FILE)
            .collect();
        if model_shards.len() > 1 {
            let mut weight_map = serde_json::Map::new();
            let mut total_size = 0;
            for shard in &model_shards {
                for name in &self.names[shard.tensors.clone()] {
                    weight_map.insert(name.clone(), shard.file_name.clone().into());
                }
                total_size += self.sizes[shard.tensors.clone()].iter().sum::<u64>();
            }
            let index = serde_json::json!({
                "metadata": {"total_size": total_size},
                "weight_map": weight_map,
            });
            write_json(&index_path, &index)?;
            written.push(index_path);
        } else if index_path.exists() {
            // A stale index from an earlier sharded run would point at missing shards.
            std::fs::remove_file(&index_path).map_err(|e| FuseError::output(&index_path, e))?;
        }
        self.finished = true;
        Ok(written)
    }
}

/// The writing thread: shard by shard, the header then each tensor's parts as they arrive.
/// No fsync, as transformers' save_pretrained: the final rename is what keeps a crashed run
/// from leaving a half-written file under the real name.
fn write_shards(
    shards: &[Shard],
    receiver: &Receiver<Part>,
    give_back: &SyncSender<FusedData>,
) -> Result<(), FuseError> {
    for shard in shards {
        let path = &shard.temp_path;
        let io = |e| FuseError::output(path, e);
        let mut file = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        file.write_all(&shard.header).map_err(io)?;
        for _ in shard.tensors.clone() {
            loop {
                let Ok(part) = receiver.recv() else {
                    // The producer stopped early: the fusion failed and this output is
                    // dropped.
                    return Ok(());
                };
                file.write_all(part.data.as_bytes()).map_err(io)?;
                // Offer the buffer for reuse; if one is already waiting, this one is freed.
                let _ = give_back.try_send(part.data);
                if part.last {
                    break;
                }
            }
        }
        file.flush().map_err(io)?;
    }
    Ok(())
}

impl TensorSink for SafetensorsWriter {
    fn put(&mut self, tensor: &PlannedTensor, data: FusedData) -> Result<(), FuseError> {
        if self.received != 0 {
            return Err(refused(tensor, "a whole tensor arrived after a part of it"));
        }
        self.put_part(tensor, data, true)
    }

    fn takes_parts(&self) -> bool {
        true
    }

    fn put_part(
        &mut self,
        tensor: &PlannedTensor,
        data: FusedData,
        last: bool,
    ) -> Result<(), FuseError> {
        if self.names.get(self.next_tensor) != Some(&tensor.name) {
            return Err(refused(tensor, "tensors arrived out of plan order"));
        }
        // The header promised this many bytes: more or fewer would shift every later tensor.
        let expected = self.sizes[self.next_tensor];
        let received = self.received + data.as_bytes().len() as u64;
        if received > expected || (last && received != expected) {
            return Err(refused(
                tensor,
                &format!("{received} bytes arrived for a tensor of {expected}"),
            ));
        }
        let sent = self.sender.as_ref().map(|s| s.send(Part { data, last }));
        if !matches!(sent, Some(Ok(()))) {
            // The thread stopped: it has the error.
            self.join()?;
            return Err(FuseError::output(
                &self.dir,
                std::io::Error::other("the writing thread stopped"),
            ));
        }
        if last {
            self.next_tensor += 1;
            self.received = 0;
        } else {
            self.received = received;
        }
        Ok(())
    }

    fn spare(&mut self) -> Option<FusedData> {
        self.returned.try_recv().ok()
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.join();
            for shard in &self.shards {
                let _ = std::fs::remove_file(&shard.temp_path);
            }
            if self.created_dir {
                // remove_dir only removes an empty folder: nothing else is lost.
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// A part or tensor the writer cannot take where it stands in the output.
fn refused(tensor: &PlannedTensor, reason: &str) -> FuseError {
    FuseError::Load {
        tensor: tensor.name.clone(),
        reason: reason.into(),
    }
}

/// Greedy grouping in order, as transformers shards: a new shard starts when the next
/// tensor would push the current one past the limit (a single larger tensor gets a shard
/// of its own).
fn group_into_shards(tensors: &[PlannedTensor], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.output_bytes();
        if i > start && size + bytes > max_bytes {
            groups.push(start..i);
            start = i;
            size = 0;
        }
        size += bytes;
    }
    groups.push(start..tensors.len());
    groups
}

/// The 8-byte length plus the JSON header, padded with spaces to a multiple of 8 so that
/// the data that follows is aligned.
fn header_bytes(tensors: &[PlannedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut meta: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.output_bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.output.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap_or_default();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), FuseError> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    std::fs::write(path, text).map_err(|e| FuseError::output(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn t(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            shape: vec![n],
            stored: DType::F32,
            output: DType::F32,
        }
    }

    #[test]
    fn shards_group_greedily_under_the_limit() {
        let ts = [t("a", 10), t("b", 10), t("c", 30), t("d", 5)];
        assert_eq!(group_into_shards(&ts, 80), vec![0..2, 2..3, 3..4]);
        assert_eq!(group_into_shards(&ts, 1000), vec![0..4]);
        assert_eq!(group_into_shards(&ts, 1), vec![0..1, 1..2, 2..3, 3..4]);
    }

    #[test]
    fn parts_must_add_up_to_each_tensor_in_plan_order() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [t("a", 4), t("b", 2)];
        let part = |v: &[f32]| FusedData::F32(v.to_vec());
        let mut w =
            SafetensorsWriter::create(dir.path(), &tensors, u64::MAX, 0, &BTreeMap::new()).unwrap();
        let err = w.put_part(&tensors[1], part(&[1.0]), false).unwrap_err();
        assert!(err.to_string().contains("out of plan order"), "{err}");
        w.put_part(&tensors[0], part(&[1.0, 2.0]), false).unwrap();
        let err = w.put(&tensors[0], part(&[3.0, 4.0])).unwrap_err();
        assert!(err.to_string().contains("after a part"), "{err}");
        let err = w.put_part(&tensors[0], part(&[3.0]), true).unwrap_err();
        assert!(
            err.to_string()
                .contains("12 bytes arrived for a tensor of 16"),
            "{err}"
        );
        let err = w.put_part(&tensors[0], part(&[3.0; 3]), false).unwrap_err();
        assert!(err.to_string().contains("20 bytes arrived"), "{err}");
        w.put_part(&tensors[0], part(&[3.0, 4.0]), true).unwrap();
        assert!(w.put(&tensors[1], part(&[5.0])).is_err());
        w.put(&tensors[1], part(&[5.0, 6.0])).unwrap();
        w.finish().unwrap();

        let bytes = std::fs::read(dir.path().join(SINGLE_WEIGHTS_FILE)).unwrap();
        let data: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[bytes.len() - 24..]);
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn header_is_aligned_and_names_format_pt() {
        let h = header_bytes(&[t("x", 3)], &BTreeMap::new());
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(h.len(), 8 + n);
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["__metadata__"]["format"], "pt");
        assert_eq!(v["x"]["data_offsets"], serde_json::json!([0, 12]));
    }
}
