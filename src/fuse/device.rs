//! Fusion on a CUDA device (feature `cuda`): each tensor's M member slices go host ->
//! device through pinned staging buffers, two sets used in turn on a copy stream so that
//! copying one chunk overlaps the kernel averaging the previous one; the kernel writes
//! straight into the tensor's final device buffer, which becomes the candle tensor.
//!
//! Peak device memory: the model plus two staging sets of M x [`CHUNK_BYTES`] (tensors
//! larger than a chunk are averaged chunk by chunk; averaging is element-wise). The
//! members' stored bytes cross PCIe as they are; the kernel reads their type and writes
//! the output's (f32 checkpoints averaged straight into a bf16 model, say). Filling the
//! pinned buffers from the memory maps is a host copy, split over the CPU's cores.
//!
//! The shared-init statistics are summed on the device too (kernels/warm_member_sums.cu,
//! one f64 row of 4 x M per tensor, read back once at the end). A tensor whose sums are
//! not finite is scanned on the host exactly as the CPU pass does: NaN/Inf are named
//! there, an f32 overflow is summed again in f64.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, Storage, Tensor};
use half::{bf16, f16};

use super::plan::{FusionPlan, PlannedTensor};
use super::progress::FuseProgress;
use super::run::{copy_integer_tensor, missing, sums_from_rows, FusionReport, RunOptions};
use super::sink::{CandleSink, FusedData, TensorSink};
use super::FuseError;
use crate::checkpoint::Checkpoint;
use crate::cuda::FusionKernels;
use crate::dtype::FloatDType;

/// Bytes per member per staging set (a multiple of 16, so chunks stay 16-byte aligned).
pub const CHUNK_BYTES: usize = 32 << 20;

/// Where device fusion puts each fused tensor.
pub enum DeviceOutput<'a> {
    /// On the device, returned for the model (serving).
    Keep,
    /// Copied back to the host and handed to a sink in plan order, one tensor on the device
    /// at a time (`warm fuse --device cuda`).
    Sink(&'a mut dyn TensorSink),
}

/// Fuses the planned tensors on `device`. Integer tensors are checked for equality on the
/// host and copied once. With [`DeviceOutput::Sink`] the returned map is empty.
pub fn execute_on_device(
    members: &[Checkpoint],
    plan: &FusionPlan,
    device: &CudaDevice,
    progress: &mut FuseProgress,
    options: &RunOptions,
    mut output: DeviceOutput<'_>,
) -> Result<(HashMap<String, Tensor>, FusionReport), FuseError> {
    let started = Instant::now();
    let m = members.len();
    let keep = matches!(output, DeviceOutput::Keep);
    let (free, total) = device
        .cuda_stream()
        .context()
        .mem_get_info()
        .w()
        .map_err(setup)?;
    fits_on_device(plan, m, keep, free as u64, total as u64).map_err(FuseError::Device)?;
    let mut fuser =
        DeviceFuser::new(device, m, &plan.weights, plan.tensors.len()).map_err(setup)?;
    let mut tensors = HashMap::with_capacity(plan.tensors.len());
    let mut integers = CandleSink::new(candle_core::Device::Cuda(device.clone()));
    let mut problems = plan.problems.clone();
    let mut bytes_read = 0u64;
    for (index, tensor) in plan.tensors.iter().enumerate() {
        super::interrupt::check()?;
        let _span = tracing::debug_span!("fuse_tensor_on_device", name = %tensor.name).entered();
        let sources = members
            .iter()
            .map(|c| c.tensor(&tensor.name).ok_or_else(|| missing(tensor)))
            .collect::<Result<Vec<_>, _>>()?;
        let inputs: Vec<&[u8]> = sources
            .iter()
            .map(|(file, info)| file.bytes(info))
            .collect();
        match tensor.stored.as_fusable() {
            Some(stored) => {
                let fused =
                    fuser
                        .fuse(index, tensor, stored, &inputs)
                        .map_err(|e| FuseError::Load {
                            tensor: tensor.name.clone(),
                            reason: e.to_string(),
                        })?;
                match &mut output {
                    DeviceOutput::Keep => {
                        tensors.insert(tensor.name.clone(), fused);
                    }
                    DeviceOutput::Sink(sink) => sink.put(tensor, to_host(tensor, &fused)?)?,
                }
            }
            None => {
                let data = copy_integer_tensor(members, tensor, &inputs, &mut problems);
                match &mut output {
                    DeviceOutput::Keep => integers.put(tensor, data)?,
                    DeviceOutput::Sink(sink) => sink.put(tensor, data)?,
                }
            }
        }
        let read: u64 = inputs.iter().map(|b| b.len() as u64).sum();
        // Staged and copied (the copies are from pinned buffers): the mapped pages can go.
        for (file, info) in &sources {
            file.release(&info.range);
        }
        bytes_read += read;
        progress.advance(read);
    }
    let rows = fuser.read_sums().map_err(setup)?;
    progress.finish();
    tensors.extend(integers.into_tensors());
    let sums = sums_from_rows(members, plan, &rows, &mut problems)?;
    let report = FusionReport::finish(members, plan, &sums, options, bytes_read, started, problems);
    Ok((tensors, report))
}

/// Device bytes fusion takes: the whole fused model when it stays on the device (else its
/// largest tensor), plus the two staging sets.
fn device_bytes_needed(plan: &FusionPlan, m: usize, keep: bool) -> (u64, u64) {
    let sizes = plan
        .tensors
        .iter()
        .map(|t| (t.numel() * t.output.size_in_bytes()) as u64);
    let tensors = if keep {
        sizes.sum()
    } else {
        sizes.max().unwrap_or(0)
    };
    (tensors, (2 * m * CHUNK_BYTES) as u64)
}

/// Refuses before anything is read when the device has too little free memory, with the
/// numbers, rather than failing on an allocation halfway through.
fn fits_on_device(
    plan: &FusionPlan,
    m: usize,
    keep: bool,
    free: u64,
    total: u64,
) -> Result<(), String> {
    let (tensors, staging) = device_bytes_needed(plan, m, keep);
    if tensors + staging <= free {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    let what = if keep {
        "the fused model"
    } else {
        "the largest fused tensor"
    };
    Err(format!(
        "not enough GPU memory to fuse: {what} takes {:.2} GB and staging for {m} members {:.2} GB, \
         but {:.2} GB of the device's {:.2} GB are free",
        gb(tensors),
        gb(staging),
        gb(free),
        gb(total)
    ))
}

/// A fused device tensor as host data for a sink (waits for its kernels).
fn to_host(tensor: &PlannedTensor, fused: &Tensor) -> Result<FusedData, FuseError> {
    let flat = |t: &Tensor| t.flatten_all();
    let data = match fused.dtype() {
        candle_core::DType::F32 => flat(fused)
            .and_then(|t| t.to_vec1::<f32>())
            .map(FusedData::F32),
        candle_core::DType::F16 => flat(fused)
            .and_then(|t| t.to_vec1::<f16>())
            .map(FusedData::F16),
        candle_core::DType::BF16 => flat(fused)
            .and_then(|t| t.to_vec1::<bf16>())
            .map(FusedData::BF16),
        other => Err(candle_core::Error::Msg(format!(
            "unexpected fused type {other:?}"
        ))),
    };
    data.map_err(|e| FuseError::Load {
        tensor: tensor.name.clone(),
        reason: format!("copying the fused tensor back from the device: {e}"),
    })
}

fn setup(e: candle_core::Error) -> FuseError {
    FuseError::Load {
        tensor: "(device set-up)".into(),
        reason: e.to_string(),
    }
}

/// One staging set: M pinned host buffers, M device buffers and the device array of
/// their addresses, with the events that say when each side may be refilled.
struct StagingSet {
    host: Vec<PinnedHostSlice<u8>>,
    device: Vec<CudaSlice<u8>>,
    addresses: CudaSlice<u64>,
    /// Recorded on the copy stream after this set's host -> device copies.
    copied: Option<CudaEvent>,
    /// Recorded on the compute stream after the kernel that read this set.
    consumed: Option<CudaEvent>,
}

pub struct DeviceFuser {
    device: CudaDevice,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    kernels: FusionKernels,
    weights: CudaSlice<f32>,
    /// Per tensor, 4 f64 sums per member (zeroed, added to by the sums kernel).
    sums: CudaSlice<f64>,
    members: usize,
    sets: [StagingSet; 2],
    next: usize,
    /// Threads that fill a staging set from the memory maps.
    copy_threads: usize,
    /// Not `Send`: `compute` is candle's stream, which is the calling thread's default
    /// stream (`Device::new_cuda`), so the waits and kernels of another thread would
    /// land on a different stream, unordered with this one's.
    _one_thread: PhantomData<*const ()>,
}

impl DeviceFuser {
    /// Staging for `m` members and statistics rows for `tensors` tensors.
    pub fn new(
        device: &CudaDevice,
        m: usize,
        weights: &[f32],
        tensors: usize,
    ) -> candle_core::Result<Self> {
        let compute = device.cuda_stream();
        let context = compute.context().clone();
        let copy = context.new_stream().w()?;
        let set = || -> candle_core::Result<StagingSet> {
            let mut host = Vec::with_capacity(m);
            let mut staged = Vec::with_capacity(m);
            for _ in 0..m {
                // SAFETY: pinned allocations of plain bytes; written before they are read.
                host.push(unsafe { context.alloc_pinned::<u8>(CHUNK_BYTES) }.w()?);
                staged.push(unsafe { copy.alloc::<u8>(CHUNK_BYTES) }.w()?);
            }
            let addresses: Vec<u64> = staged.iter().map(|b| b.device_ptr(&copy).0).collect();
            let addresses = compute.clone_htod(&addresses).w()?;
            Ok(StagingSet {
                host,
                device: staged,
                addresses,
                copied: None,
                consumed: None,
            })
        };
        let sets = [set()?, set()?];
        let weights = compute.clone_htod(weights).w()?;
        let sums = compute.alloc_zeros::<f64>((tensors * 4 * m).max(1)).w()?;
        Ok(Self {
            device: device.clone(),
            kernels: FusionKernels::new(device.clone()),
            compute,
            copy,
            weights,
            sums,
            members: m,
            sets,
            next: 0,
            copy_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            _one_thread: PhantomData,
        })
    }

    /// Averages one float tensor whose members are stored as `stored` into a device
    /// tensor of the planned output type, adding its statistics to row `index`.
    pub fn fuse(
        &mut self,
        index: usize,
        tensor: &PlannedTensor,
        stored: FloatDType,
        inputs: &[&[u8]],
    ) -> candle_core::Result<Tensor> {
        let n = tensor.numel();
        let output = tensor.output.as_fusable().ok_or_else(|| {
            candle_core::Error::Msg(format!("cannot average into {}", tensor.output))
        })?;
        // One element at least: the driver refuses empty allocations; a storage longer
        // than its tensor's shape is fine for candle.
        let out = DeviceBuffer::alloc(&self.compute, output, n.max(1))?;
        let row = 4 * self.members * index;
        if row + 4 * self.members > self.sums.len() {
            candle_core::bail!(
                "statistics row {index} beyond the {} planned",
                self.sums.len()
            );
        }
        let row_address = self.sums.device_ptr(&self.compute).0 + (row * 8) as u64;
        let out_size = output.size_in_bytes();
        let chunk = CHUNK_BYTES / stored.size_in_bytes();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            self.stage(inputs, stored, start, len)?;
            let set = &mut self.sets[self.next];
            let copied = set.copied.as_ref().expect("stage records the copy");
            self.compute.wait(copied).w()?;
            let out_address = out.address(&self.compute) + (start * out_size) as u64;
            // SAFETY: the set's device buffers hold `len` staged elements of `stored` for
            // every member (ordered by the wait above), `out` has n - start >= len
            // elements of `output` left from `out_address` and `row_address` has 4 x M
            // f64 (checked above); all stay alive until the device synchronizes.
            unsafe {
                self.kernels.average(
                    stored,
                    output,
                    &set.addresses,
                    &self.weights,
                    out_address,
                    len as u64,
                )?;
                self.kernels
                    .member_sums(stored, &set.addresses, len as u64, row_address)?;
            }
            set.consumed = Some(self.compute.record_event(None).w()?);
            self.next = 1 - self.next;
            start += len;
        }
        Ok(out.into_tensor(tensor.shape.as_slice(), &self.device))
    }

    /// Waits for every queued kernel and returns the statistics rows, 4 x M f64 per tensor.
    pub fn read_sums(&self) -> candle_core::Result<Vec<f64>> {
        self.compute.synchronize().w()?;
        self.compute.clone_dtoh(&self.sums).w()
    }

    /// Fills the next staging set with elements `start..start + len` of every member and
    /// queues their copies to the device.
    fn stage(
        &mut self,
        inputs: &[&[u8]],
        stored: FloatDType,
        start: usize,
        len: usize,
    ) -> candle_core::Result<()> {
        let set = &mut self.sets[self.next];
        // The host buffers are free once their previous copies have run.
        if let Some(copied) = set.copied.take() {
            copied.synchronize().w()?;
        }
        let size = stored.size_in_bytes();
        let bytes = len * size;
        let mut pieces: Vec<(&mut [u8], &[u8])> = Vec::with_capacity(inputs.len());
        for (host, input) in set.host.iter_mut().zip(inputs) {
            let target = &mut host.as_mut_slice().w()?[..bytes];
            pieces.push((target, &input[start * size..start * size + bytes]));
        }
        copy_in_parallel(pieces, self.copy_threads);
        // The device buffers are free once the kernel that read them has run.
        if let Some(consumed) = &set.consumed {
            self.copy.wait(consumed).w()?;
        }
        for (host, device) in set.host.iter().zip(&set.device) {
            let address = device.device_ptr(&self.copy).0;
            let source = &host.as_slice().w()?[..bytes];
            // SAFETY: `address` holds CHUNK_BYTES >= bytes; the pinned source stays
            // untouched until `copied` (recorded below) has completed.
            unsafe { result::memcpy_htod_async(address, source, self.copy.cu_stream()) }.w()?;
        }
        set.copied = Some(self.copy.record_event(None).w()?);
        Ok(())
    }
}

/// Fusion that stops early (an error, an interrupt) drops the fuser with copies and
/// kernels still queued: the staging buffers are freed on the copy stream, which never
/// waits for the last kernels that read them, and a pinned buffer must not be freed under
/// a copy. Waiting for both streams first orders the frees after all of it.
impl Drop for DeviceFuser {
    fn drop(&mut self) {
        // Errors here mean the context is already broken; the fusion's own error says why.
        let _ = self.compute.synchronize();
        let _ = self.copy.synchronize();
    }
}

/// Copies each source into its target, the work split into about `threads` parts: reading
/// the members' pages from the page cache is the host side of device fusion, and one core
/// copies far slower than PCIe moves.
fn copy_in_parallel(pieces: Vec<(&mut [u8], &[u8])>, threads: usize) {
    let total: usize = pieces.iter().map(|(t, _)| t.len()).sum();
    // Parts of at least 1 MiB: smaller ones cost more to hand out than to copy.
    let part = total.div_ceil(threads.max(1)).max(1 << 20);
    std::thread::scope(|scope| {
        for (target, source) in pieces {
            for (t, s) in target.chunks_mut(part).zip(source.chunks(part)) {
                scope.spawn(move || t.copy_from_slice(s));
            }
        }
    });
}

/// A tensor's final device buffer, in the type the kernel writes.
enum DeviceBuffer {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl DeviceBuffer {
    fn alloc(stream: &Arc<CudaStream>, dtype: FloatDType, n: usize) -> candle_core::Result<Self> {
        // SAFETY: every element is written by the kernel before the tensor is used (the
        // chunks cover 0..n and run on the stream the tensor's users run on).
        unsafe {
            Ok(match dtype {
                FloatDType::F32 => Self::F32(stream.alloc::<f32>(n).w()?),
                FloatDType::F16 => Self::F16(stream.alloc::<f16>(n).w()?),
                FloatDType::BF16 => Self::BF16(stream.alloc::<bf16>(n).w()?),
            })
        }
    }

    fn address(&self, stream: &CudaStream) -> u64 {
        match self {
            Self::F32(s) => s.device_ptr(stream).0,
            Self::F16(s) => s.device_ptr(stream).0,
            Self::BF16(s) => s.device_ptr(stream).0,
        }
    }

    fn into_tensor(self, shape: &[usize], device: &CudaDevice) -> Tensor {
        let storage = match self {
            Self::F32(s) => CudaStorage::wrap_cuda_slice(s, device.clone()),
            Self::F16(s) => CudaStorage::wrap_cuda_slice(s, device.clone()),
            Self::BF16(s) => CudaStorage::wrap_cuda_slice(s, device.clone()),
        };
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_in_parallel, fits_on_device, FusionPlan, PlannedTensor, CHUNK_BYTES};
    use crate::dtype::DType;

    #[test]
    fn fusion_is_refused_with_numbers_when_the_device_is_too_small() {
        let tensor = |name: &str, numel: usize| PlannedTensor {
            name: name.into(),
            shape: vec![numel],
            stored: DType::F32,
            output: DType::BF16,
        };
        let plan = FusionPlan {
            weights: vec![0.5, 0.5],
            base: 0,
            tensors: vec![tensor("a", 1_000_000_000), tensor("b", 500_000_000)],
            problems: vec![],
            warnings: vec![],
        };
        let staging = (2 * 2 * CHUNK_BYTES) as u64;
        // Kept on the device: 3 GB of bf16; streamed to a sink: the largest tensor, 2 GB.
        assert!(fits_on_device(&plan, 2, true, 3_000_000_000 + staging, 80_000_000_000).is_ok());
        let err = fits_on_device(&plan, 2, true, 3_000_000_000, 80_000_000_000).unwrap_err();
        assert!(err.contains("the fused model takes 3.00 GB"), "{err}");
        assert!(err.contains("staging for 2 members 0.13 GB"), "{err}");
        assert!(
            err.contains("3.00 GB of the device's 80.00 GB are free"),
            "{err}"
        );
        assert!(fits_on_device(&plan, 2, false, 2_000_000_000 + staging, 80_000_000_000).is_ok());
        let err = fits_on_device(&plan, 2, false, 2_000_000_000, 80_000_000_000).unwrap_err();
        assert!(
            err.contains("the largest fused tensor takes 2.00 GB"),
            "{err}"
        );
    }

    #[test]
    fn parallel_copy_moves_every_byte_of_every_member() {
        let sources: Vec<Vec<u8>> = (0..3u8)
            .map(|m| (0..(3 << 20) + 17).map(|i| (i % 251) as u8 ^ m).collect())
            .collect();
        for threads in [1, 2, 16] {
            let mut targets: Vec<Vec<u8>> = sources.iter().map(|s| vec![0; s.len()]).collect();
            let pieces = targets
                .iter_mut()
                .zip(&sources)
                .map(|(t, s)| (t.as_mut_slice(), s.as_slice()))
                .collect();
            copy_in_parallel(pieces, threads);
            assert_eq!(targets, sources, "{threads} threads");
        }
    }
}
