//! The streaming pass: tensor by tensor, read each member's bytes from the memory maps,
//! average them, hand the result to a sink, release the input pages; gather the shared-init
//! statistics and any NaN/Inf on the way.

use std::path::PathBuf;
use std::time::Instant;

use half::{bf16, f16};

use super::interrupt;
use super::kernel::{self, MemberSums, OutElem};
use super::plan::{member_ref, FusionPlan, PlannedTensor};
use super::problem::Problem;
use super::progress::FuseProgress;
use super::sink::{FusedData, TensorSink};
use super::FuseError;
use crate::checkpoint::{Checkpoint, SafetensorsFile, TensorInfo};
use crate::dtype::{DType, FloatDType};

/// Members fine-tuned from one init sit far above this; unrelated models far below.
pub const MIN_SHARED_INIT_COSINE: f64 = 0.9;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberReport {
    pub dir: PathBuf,
    pub architecture: Option<String>,
    pub parameters: usize,
    pub dtype: Option<String>,
    pub weight: f32,
    /// Cosine of this member's flattened float weights to the mean of the other members.
    pub cosine_to_rest: Option<f64>,
    /// |x - mean of others| / |mean of others|.
    pub distance_to_rest: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FusionReport {
    pub members: Vec<MemberReport>,
    pub tensors: usize,
    pub parameters: usize,
    pub bytes_read: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub problem_list: Vec<Problem>,
}

impl FusionReport {
    pub fn read_gb_per_s(&self) -> f64 {
        self.bytes_read as f64 / self.seconds.max(1e-9) / 1e9
    }

    /// An error listing every problem, or the report when there is none.
    pub fn into_result(self) -> Result<Self, FuseError> {
        if self.problem_list.is_empty() {
            Ok(self)
        } else {
            Err(FuseError::Incompatible(self.problem_list))
        }
    }
}

pub struct RunOptions {
    /// Refuse members below this cosine (None: report only).
    pub min_cosine: Option<f64>,
}

/// Streams every planned tensor through the kernel into `sink`. Problems found on the way
/// (NaN/Inf, differing integer tensors, unrelated members) are in the report, together with
/// the plan's own.
pub fn execute(
    members: &[Checkpoint],
    plan: &FusionPlan,
    sink: &mut dyn TensorSink,
    progress: &mut FuseProgress,
    options: &RunOptions,
) -> Result<FusionReport, FuseError> {
    let started = Instant::now();
    let m = members.len();
    let mut problems = plan.problems.clone();
    let mut sums = vec![MemberSums::default(); m];
    let mut bytes_read = 0u64;
    for tensor in &plan.tensors {
        interrupt::check()?;
        let _span = tracing::debug_span!("fuse_tensor", name = %tensor.name).entered();
        let sources: Vec<(&SafetensorsFile, &TensorInfo)> = members
            .iter()
            .map(|c| c.tensor(&tensor.name).ok_or_else(|| missing(tensor)))
            .collect::<Result<_, _>>()?;
        let inputs: Vec<&[u8]> = sources.iter().map(|(f, t)| f.bytes(t)).collect();
        let read: u64 = inputs.iter().map(|b| b.len() as u64).sum();
        let data = match tensor.stored.as_fusable() {
            Some(in_dtype) => {
                let (data, tensor_sums) =
                    average_tensor(tensor, &sources, in_dtype, plan, sink, progress)?;
                if tensor_sums.suspect.iter().any(|&s| s) {
                    // One member's NaN spoils every member's sums through their shared
                    // total: find the culprits, or redo the sums exactly after an overflow.
                    let exact = check_non_finite(members, tensor, &inputs, in_dtype, &mut problems);
                    for (total, s) in sums.iter_mut().zip(exact) {
                        *total += s;
                    }
                } else {
                    for (total, s) in sums.iter_mut().zip(&tensor_sums.members) {
                        *total += *s;
                    }
                }
                data
            }
            None => {
                progress.advance(read);
                Some(copy_integer_tensor(members, tensor, &inputs, &mut problems))
            }
        };
        for (file, info) in &sources {
            file.release(&info.range);
        }
        if let Some(data) = data {
            sink.put(tensor, data)?;
        }
        bytes_read += read;
    }
    progress.finish();
    Ok(FusionReport::finish(
        members, plan, &sums, options, bytes_read, started, problems,
    ))
}

/// A member whose cosine to the others is under the threshold was not fine-tuned from
/// their init: a problem, unless the options allow it.
fn flag_unrelated(
    members: &[Checkpoint],
    reports: &[MemberReport],
    options: &RunOptions,
    problems: &mut Vec<Problem>,
) {
    let Some(threshold) = options.min_cosine else {
        return;
    };
    for (i, r) in reports.iter().enumerate() {
        if let Some(cosine) = r.cosine_to_rest.filter(|c| *c < threshold) {
            problems.push(Problem::Unrelated {
                member: member_ref(members, i),
                cosine,
                threshold,
            });
        }
    }
}

impl FusionReport {
    /// The report of a finished pass over `plan` (on the CPU or a device), given the
    /// members' summed statistics: the unrelated-member check is applied here.
    pub(super) fn finish(
        checkpoints: &[Checkpoint],
        plan: &FusionPlan,
        sums: &[MemberSums],
        options: &RunOptions,
        bytes_read: u64,
        started: Instant,
        mut problems: Vec<Problem>,
    ) -> Self {
        let members = member_reports(checkpoints, plan, sums);
        flag_unrelated(checkpoints, &members, options, &mut problems);
        Self {
            members,
            tensors: plan.tensors.len(),
            parameters: plan.tensors.iter().map(PlannedTensor::numel).sum(),
            bytes_read,
            bytes_out: plan.output_bytes(),
            seconds: started.elapsed().as_secs_f64(),
            problems: problems.iter().map(ToString::to_string).collect(),
            warnings: plan.warnings.clone(),
            problem_list: problems,
        }
    }
}

pub(super) fn missing(tensor: &PlannedTensor) -> FuseError {
    FuseError::Load {
        tensor: tensor.name.clone(),
        reason: "planned but not found in a member".into(),
    }
}

/// Elements averaged between two page releases: keeps the mapped input of a huge tensor
/// (an embedding matrix) to M slabs instead of M whole tensors.
const SLAB: usize = 4 << 20;
/// Elements per part for a sink that takes parts (the writer): each part is averaged, its
/// pages released and handed over on its own. 4M-element parts were no faster and held
/// twice the memory (docs/benchmarks.md).
const PART: usize = 1 << 20;

/// Averages one tensor slab by slab (part by part for a sink that takes parts), counting
/// each one's input bytes in `progress` (an embedding matrix can take seconds). A sink that
/// takes parts has been given all of them when this returns (no data); otherwise the whole
/// tensor is returned for `put`.
fn average_tensor(
    tensor: &PlannedTensor,
    sources: &[(&SafetensorsFile, &TensorInfo)],
    in_dtype: FloatDType,
    plan: &FusionPlan,
    sink: &mut dyn TensorSink,
    progress: &mut FuseProgress,
) -> Result<(Option<FusedData>, kernel::TensorSums), FuseError> {
    fn run<O: OutElem>(
        tensor: &PlannedTensor,
        sources: &[(&SafetensorsFile, &TensorInfo)],
        in_dtype: FloatDType,
        plan: &FusionPlan,
        sink: &mut dyn TensorSink,
        progress: &mut FuseProgress,
    ) -> Result<(Option<FusedData>, kernel::TensorSums), FuseError> {
        let n = tensor.numel();
        let size = in_dtype.size_in_bytes();
        let mut sums = kernel::TensorSums::zero(sources.len());
        let mut average_slab = |start: usize, out: &mut [O]| {
            let ranges: Vec<std::ops::Range<usize>> = sources
                .iter()
                .map(|(_, t)| {
                    let from = t.range.start + start * size;
                    from..from + out.len() * size
                })
                .collect();
            let inputs: Vec<&[u8]> = sources
                .iter()
                .zip(&ranges)
                .map(|((file, _), range)| file.bytes_at(range.clone()))
                .collect();
            let slab_sums = kernel::average(&inputs, in_dtype, &plan.weights, plan.base, out);
            for ((file, _), range) in sources.iter().zip(&ranges) {
                file.release(range);
            }
            progress.advance(ranges.iter().map(|r| r.len() as u64).sum());
            slab_sums
        };
        if sink.takes_parts() {
            let mut start = 0;
            loop {
                interrupt::check()?;
                let len = PART.min(n - start);
                let mut out = reused_buffer::<O>(sink.spare(), len);
                sums = sums.merge(average_slab(start, &mut out));
                start += len;
                let last = start == n;
                sink.put_part(tensor, O::wrap(out), last)?;
                if last {
                    return Ok((None, sums));
                }
            }
        }
        let mut out = reused_buffer::<O>(sink.spare(), n);
        for (slab, out) in out.chunks_mut(SLAB).enumerate() {
            sums = sums.merge(average_slab(slab * SLAB, out));
        }
        Ok((Some(O::wrap(out)), sums))
    }
    match tensor.output {
        DType::F32 => run::<f32>(tensor, sources, in_dtype, plan, sink, progress),
        DType::F16 => run::<f16>(tensor, sources, in_dtype, plan, sink, progress),
        DType::BF16 => run::<bf16>(tensor, sources, in_dtype, plan, sink, progress),
        other => Err(FuseError::Load {
            tensor: tensor.name.clone(),
            reason: format!("cannot average into {other}"),
        }),
    }
}

/// A buffer of `n` elements: a spare one from the sink when it has the right type, else
/// fresh zeroed pages (calloc, not a loop over the elements).
fn reused_buffer<O: OutElem>(spare: Option<FusedData>, n: usize) -> Vec<O> {
    match spare.and_then(O::unwrap) {
        Some(mut v) => {
            v.clear();
            v.resize(n, O::default());
            v
        }
        None => bytemuck::allocation::zeroed_vec(n),
    }
}

/// A non-finite block sum means NaN/Inf in the data, or squares that overflowed f32: report
/// every member holding non-finite values, or else return the statistics computed exactly.
fn check_non_finite(
    members: &[Checkpoint],
    tensor: &PlannedTensor,
    inputs: &[&[u8]],
    in_dtype: FloatDType,
    problems: &mut Vec<Problem>,
) -> Vec<MemberSums> {
    let mut found = false;
    for (member, bytes) in inputs.iter().enumerate() {
        if let Some((first_index, value, count)) = kernel::find_non_finite(bytes, in_dtype) {
            found = true;
            problems.push(Problem::NonFinite {
                member: member_ref(members, member),
                tensor: tensor.name.clone(),
                count,
                first_index,
                value,
            });
        }
    }
    if found {
        // The statistics are meaningless now and the fusion is refused anyway.
        return vec![MemberSums::default(); inputs.len()];
    }
    tracing::debug!(tensor = %tensor.name, "recomputing statistics in f64 after an f32 overflow");
    kernel::exact_sums(inputs, in_dtype)
}

/// The members' statistics from per-tensor rows of 4 x M sums (the device pass's
/// kernels/warm_member_sums.cu output, in plan order). A row that is not finite is redone
/// from the files as the CPU pass does: NaN/Inf become problems naming member, tensor and
/// index; an f32 overflow is summed again in f64.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn sums_from_rows(
    members: &[Checkpoint],
    plan: &FusionPlan,
    rows: &[f64],
    problems: &mut Vec<Problem>,
) -> Result<Vec<MemberSums>, FuseError> {
    let m = members.len();
    let mut sums = vec![MemberSums::default(); m];
    for (tensor, row) in plan.tensors.iter().zip(rows.chunks_exact(4 * m)) {
        let Some(stored) = tensor.stored.as_fusable() else {
            continue;
        };
        let row: Vec<MemberSums> = row
            .chunks_exact(4)
            .map(|q| MemberSums {
                sq: q[0],
                dot_rest: q[1],
                rest_sq: q[2],
                dev_sq: q[3],
            })
            .collect();
        let finite = row.iter().all(MemberSums::is_finite);
        let row = if finite {
            row
        } else {
            // One member's NaN spoils every member's sums through their shared total.
            let inputs = members
                .iter()
                .map(|c| c.tensor(&tensor.name).map(|(file, info)| file.bytes(info)))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| missing(tensor))?;
            check_non_finite(members, tensor, &inputs, stored, problems)
        };
        for (total, s) in sums.iter_mut().zip(row) {
            *total += s;
        }
    }
    Ok(sums)
}

pub(super) fn copy_integer_tensor(
    members: &[Checkpoint],
    tensor: &PlannedTensor,
    inputs: &[&[u8]],
    problems: &mut Vec<Problem>,
) -> FusedData {
    for (i, bytes) in inputs.iter().enumerate().skip(1) {
        if *bytes != inputs[0] {
            problems.push(Problem::IntegerTensorDiffers {
                member: member_ref(members, i),
                base: member_ref(members, 0),
                tensor: tensor.name.clone(),
            });
        }
    }
    FusedData::Raw(inputs[0].to_vec())
}

fn member_reports(
    members: &[Checkpoint],
    plan: &FusionPlan,
    sums: &[MemberSums],
) -> Vec<MemberReport> {
    members
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = sums[i];
            let related = members.len() > 1 && s.sq > 0.0 && s.rest_sq > 0.0;
            MemberReport {
                dir: c.dir().to_path_buf(),
                architecture: c.config().architecture().map(str::to_string),
                parameters: c.parameter_count(),
                dtype: c.main_dtype().map(|d| d.to_string()),
                weight: plan.weights[i],
                cosine_to_rest: related.then(|| s.dot_rest / (s.sq * s.rest_sq).sqrt()),
                distance_to_rest: related.then(|| (s.dev_sq / s.rest_sq).sqrt()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::fuse::{open_members, plan as make_plan, SafetensorsWriter};

    /// A member with one f32 tensor per entry of `tensors`.
    fn member(root: &Path, name: &str, tensors: &[(&str, Vec<f32>)]) -> PathBuf {
        let dir = root.join(name);
        let planned: Vec<PlannedTensor> = tensors
            .iter()
            .map(|(n, v)| PlannedTensor {
                name: n.to_string(),
                shape: vec![v.len()],
                stored: DType::F32,
                output: DType::F32,
            })
            .collect();
        let mut writer =
            SafetensorsWriter::create(&dir, &planned, u64::MAX, 0, &Default::default()).unwrap();
        for (t, (_, v)) in planned.iter().zip(tensors) {
            writer.put(t, FusedData::F32(v.clone())).unwrap();
        }
        writer.finish().unwrap();
        let config =
            r#"{"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        dir
    }

    /// Keeps whole tensors as bytes, as a sink that does not take parts.
    #[derive(Default)]
    struct WholeTensors(Vec<(String, Vec<u8>)>);

    impl TensorSink for WholeTensors {
        fn put(&mut self, tensor: &PlannedTensor, data: FusedData) -> Result<(), FuseError> {
            self.0.push((tensor.name.clone(), data.as_bytes().to_vec()));
            Ok(())
        }
    }

    #[test]
    fn a_writer_fed_in_parts_writes_the_bytes_of_the_whole_tensors() {
        let root = tempfile::tempdir().unwrap();
        // Two whole parts and a short one, an empty tensor and a one-part tensor.
        let big = PART * 2 + 123;
        let values = |phase: f32| -> Vec<f32> {
            (0..big).map(|i| (i as f32 * 0.37 + phase).sin()).collect()
        };
        let dirs: Vec<PathBuf> = [0.0, 0.01, 0.02]
            .iter()
            .enumerate()
            .map(|(i, &phase)| {
                let tensors = [
                    ("big", values(phase)),
                    ("empty", vec![]),
                    ("small", vec![1.0 + phase, 2.0, 3.0]),
                ];
                member(root.path(), &format!("m{i}"), &tensors)
            })
            .collect();
        let members = open_members(&dirs).unwrap();
        let plan = make_plan(&members, None, None);
        let options = RunOptions { min_cosine: None };
        let mut progress = FuseProgress::new(0, false);

        let mut whole = WholeTensors::default();
        assert!(!whole.takes_parts());
        execute(&members, &plan, &mut whole, &mut progress, &options).unwrap();
        // Every input byte counted once, part by part.
        let input_bytes = 3 * 4 * (big + 3) as u64;
        assert_eq!(progress.done(), input_bytes);

        let out = root.path().join("fused");
        let mut writer =
            SafetensorsWriter::create(&out, &plan.tensors, u64::MAX, 0, &Default::default())
                .unwrap();
        assert!(writer.takes_parts());
        execute(&members, &plan, &mut writer, &mut progress, &options).unwrap();
        assert_eq!(progress.done(), 2 * input_bytes);
        writer.finish().unwrap();
        std::fs::copy(dirs[0].join("config.json"), out.join("config.json")).unwrap();

        let fused = open_members(&[out]).unwrap();
        assert_eq!(whole.0.len(), 3);
        for (name, bytes) in &whole.0 {
            let (file, info) = fused[0].tensor(name).unwrap();
            assert!(
                file.bytes(info) == bytes.as_slice(),
                "tensor {name} differs"
            );
        }
        assert_eq!(
            whole.0.iter().find(|(n, _)| n == "big").unwrap().1.len(),
            big * 4
        );
    }

    #[test]
    fn device_rows_add_up_and_non_finite_rows_are_redone_from_the_files() {
        let root = tempfile::tempdir().unwrap();
        let a = member(
            root.path(),
            "a",
            &[("x", vec![1.0, 2.0, 3.0]), ("y", vec![4.0, 5.0])],
        );
        let b = member(
            root.path(),
            "b",
            &[("x", vec![1.5, 2.0, 2.5]), ("y", vec![4.0, f32::NAN])],
        );
        let members = open_members(&[a, b]).unwrap();
        let plan = make_plan(&members, None, None);
        let names: Vec<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
        // Row x as the kernel would give it; row y spoilt by b's NaN.
        let row_x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut rows = row_x.to_vec();
        rows.extend([f64::NAN; 8]);
        let mut problems = Vec::new();
        let sums = sums_from_rows(&members, &plan, &rows, &mut problems).unwrap();
        assert_eq!((sums[0].sq, sums[0].dev_sq), (1.0, 4.0));
        assert_eq!((sums[1].sq, sums[1].dev_sq), (5.0, 8.0));
        let described: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 1, "{described:?}");
        assert!(
            described[0]
                .contains("tensor 'y' holds 1 non-finite value(s), the first NaN at flat index 1"),
            "{described:?}"
        );

        // A non-finite row over finite data (an f32 overflow on the device) is summed
        // again exactly from the files.
        let c = member(root.path(), "c", &[("x", vec![1.0, 2.0, 3.0])]);
        let d = member(root.path(), "d", &[("x", vec![3.0, 2.0, 1.0])]);
        let members = open_members(&[c, d]).unwrap();
        let plan = make_plan(&members, None, None);
        let mut problems = Vec::new();
        let sums = sums_from_rows(&members, &plan, &[f64::INFINITY; 8], &mut problems).unwrap();
        assert!(problems.is_empty());
        // x.x = 14 for both; x.r = 1*3 + 2*2 + 3*1 = 10; d = x - r.
        assert_eq!(
            (
                sums[0].sq,
                sums[0].dot_rest,
                sums[0].rest_sq,
                sums[0].dev_sq
            ),
            (14.0, 10.0, 14.0, 8.0)
        );
    }
}
