//! `warm gpu-check` (cuda builds): the checks of a lent or new GPU machine, one table.
//!
//! - kernel: warm_average against a CPU reference (f32 fused multiply-adds in member
//!   order, rounded once) on seeded random data, for each pair of input and output types,
//!   M in {2, 3, 8}, odd sizes, aligned and misaligned inputs, the output poisoned first;
//!   bit-exact expected.
//! - bandwidth: f32 and bf16.
//! - sums: warm_member_sums against the same four sums in f64 on the CPU.
//! - bandwidth: the kernel's bytes read + written per second against a device-to-device
//!   copy of the same traffic.
//! - fusion: `--members` fused on the device against reading the files and PCIe.
//! - device vs CPU fusion: `--members` and `--model` fused on the device and on the CPU:
//!   every tensor within four units of the output type's precision, the same statistics.
//! - parity: every fixture under `--fixtures` scored on the GPU (bf16) and the CPU (f32),
//!   step and objective rewards included;
//!   the decoders also with a prompt their inputs share, computed once on the GPU.
//! - throughput: `--model` and `--members` (when it has a tokenizer) scoring on the GPU.
//!
//! A check that errors or panics prints an ERROR row and the others still run.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Device, Tensor};
use half::{bf16, f16};

use super::FusionKernels;
use crate::config::MembersConfig;
use crate::dtype::FloatDType;
use crate::fuse::kernel::OutElem;
use crate::fuse::FusionReport;
use crate::model::Sequence;
use crate::scorer::{Combine, Score, Scorer};

type CheckResult<T> = Result<T, Box<dyn std::error::Error>>;

pub struct CheckArgs {
    pub ordinal: usize,
    pub fixtures: Option<PathBuf>,
    pub members: Vec<PathBuf>,
    pub model: Vec<PathBuf>,
}

/// Runs every check it has inputs for and prints one row per result. Returns false when a
/// correctness check failed.
pub fn run(args: &CheckArgs) -> CheckResult<bool> {
    if !super::driver_present() {
        return Err("no CUDA driver (libcuda.so.1) or no device on this machine".into());
    }
    let device = Device::new_cuda(args.ordinal)?;
    let cuda = device.as_cuda_device()?.clone();
    let context = cuda.cuda_stream().context().clone();
    println!("device {}: {}", args.ordinal, context.name().w()?);
    println!("| check | case | result | detail |");
    println!("|---|---|---|---|");
    let mut ok = section("kernel", || kernel_cases(&cuda));
    ok &= section("sums", || sums_cases(&cuda));
    ok &= section("bandwidth", || bandwidth(&cuda));
    if !args.members.is_empty() {
        ok &= section("fusion", || {
            fusion(&device, &cuda, &args.members).map(|()| true)
        });
        ok &= section("device vs CPU fusion", || {
            compare_fusion(&device, &args.members, FloatDType::BF16)
        });
    }
    if !args.model.is_empty() {
        for dtype in [FloatDType::F32, FloatDType::BF16] {
            ok &= section("device vs CPU fusion", || {
                compare_fusion(&device, &args.model, dtype)
            });
        }
    }
    if let Some(dir) = &args.fixtures {
        // One section per fixture: an op that fails on one architecture hides no other.
        match fixture_dirs(dir) {
            Ok(models) => {
                for model in models {
                    ok &= section("parity", || {
                        parity(&device, dir, &model)
                            .map_err(|e| format!("{}: {e}", model.display()).into())
                    });
                }
            }
            Err(e) => ok &= section("parity", || Err(e)),
        }
    }
    if !args.model.is_empty() {
        ok &= section("throughput", || {
            throughput(&device, &args.model).map(|()| true)
        });
    }
    let members_scorable = args
        .members
        .first()
        .is_some_and(|d| d.join("tokenizer.json").exists());
    if members_scorable {
        ok &= section("throughput", || {
            throughput(&device, &args.members).map(|()| true)
        });
    }
    Ok(ok)
}

/// Runs one check; an error or a panic becomes an ERROR row (and a failed run) instead of
/// ending the run, so one call on a lent machine reports everything it can.
fn section(name: &str, check: impl FnOnce() -> CheckResult<bool>) -> bool {
    let why = match catch_unwind(AssertUnwindSafe(check)) {
        Ok(Ok(passed)) => return passed,
        Ok(Err(e)) => e.to_string(),
        Err(panic) => crate::server::panic_message(&*panic)
            .map_or_else(|| "panicked".to_string(), |m| format!("panicked: {m}")),
    };
    println!("| {name} | - | ERROR | {} |", why.replace(['\n', '|'], " "));
    false
}

fn seeded(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Never zero: magnitudes in [0.5, 2), either sign, like trained weights scaled.
            let unit = (s >> 40) as f32 / (1u64 << 24) as f32;
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            sign * (0.5 + 1.5 * unit) * 0.05
        })
        .collect()
}

/// A device element type: the fusion pass's (type, widening) plus rounding from f32 and a
/// NaN pattern to poison outputs with.
trait Elem: OutElem + DeviceRepr {
    fn from_f32(x: f32) -> Self;
    fn poison() -> Self;
}

impl Elem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn poison() -> Self {
        f32::from_bits(0x7fc0_dead)
    }
}

impl Elem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn poison() -> Self {
        f16::from_bits(0x7e5a)
    }
}

impl Elem for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn poison() -> Self {
        bf16::from_bits(0x7fda)
    }
}

/// An element's bits, for the bit-exact comparison.
fn bits<T: Elem>(x: T) -> u32 {
    let mut word = [0u8; 4];
    let bytes = bytemuck::bytes_of(&x);
    word[..bytes.len()].copy_from_slice(bytes);
    u32::from_le_bytes(word)
}

/// Every pair of input and output types; one row per pair, over M in {2, 3, 8}, five
/// sizes, aligned and misaligned pointers.
fn kernel_cases(cuda: &CudaDevice) -> CheckResult<bool> {
    let mut ok = true;
    ok &= kernel_pair::<f32, f32>(cuda)?;
    ok &= kernel_pair::<f32, f16>(cuda)?;
    ok &= kernel_pair::<f32, bf16>(cuda)?;
    ok &= kernel_pair::<f16, f32>(cuda)?;
    ok &= kernel_pair::<f16, f16>(cuda)?;
    ok &= kernel_pair::<f16, bf16>(cuda)?;
    ok &= kernel_pair::<bf16, f32>(cuda)?;
    ok &= kernel_pair::<bf16, f16>(cuda)?;
    ok &= kernel_pair::<bf16, bf16>(cuda)?;
    Ok(ok)
}

fn kernel_pair<I: Elem, O: Elem>(cuda: &CudaDevice) -> CheckResult<bool> {
    let mut cases = 0;
    let mut failures = Vec::new();
    for m in [2usize, 3, 8] {
        for n in [1usize, 7, 1023, 4099, 1_000_003] {
            for misaligned in [false, true] {
                cases += 1;
                if let Some(why) = kernel_case::<I, O>(cuda, m, n, misaligned)? {
                    failures.push(format!(
                        "M={m} n={n}{}: {why}",
                        if misaligned { " misaligned" } else { "" }
                    ));
                }
            }
        }
    }
    let passed = failures.is_empty();
    println!(
        "| kernel | {} -> {}, M 2/3/8, n 1/7/1023/4099/1000003, aligned and misaligned | {} | {} |",
        I::DTYPE,
        O::DTYPE,
        if passed { "ok" } else { "FAIL" },
        if passed {
            format!("{cases} cases bit-exact, output poisoned first")
        } else {
            format!("{} of {cases} cases wrong; {}", failures.len(), failures[0])
        }
    );
    Ok(passed)
}

/// One launch against the CPU reference; `Some(why)` when it differs.
fn kernel_case<I: Elem, O: Elem>(
    cuda: &CudaDevice,
    m: usize,
    n: usize,
    misaligned: bool,
) -> CheckResult<Option<String>> {
    let stream = cuda.cuda_stream();
    let shift = usize::from(misaligned);
    let raw_weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
    let total: f32 = raw_weights.iter().sum();
    let weights: Vec<f32> = raw_weights.iter().map(|w| w / total).collect();
    let inputs: Vec<Vec<I>> = (0..m)
        .map(|i| {
            seeded(n + shift, 11 + i as u64)
                .into_iter()
                .map(I::from_f32)
                .collect()
        })
        .collect();
    let device_inputs = upload_members(&stream, &inputs)?;
    let out_size = std::mem::size_of::<O>() as u64;
    let addresses = member_addresses(&stream, &device_inputs, shift)?;
    let device_weights = stream.clone_htod(&weights).w()?;
    let out: CudaSlice<O> = stream.clone_htod(&vec![O::poison(); n + shift]).w()?;
    let out_address = out.device_ptr(&stream).0 + shift as u64 * out_size;
    // SAFETY: every address has n elements after it (n + shift allocated, shift skipped).
    unsafe {
        FusionKernels::new(cuda.clone()).average(
            I::DTYPE,
            O::DTYPE,
            &addresses,
            &device_weights,
            out_address,
            n as u64,
        )?;
    }
    let got = stream.clone_dtoh(&out).w()?;
    let mut mismatches = 0usize;
    let mut first = None;
    for j in 0..n {
        let mut acc = 0.0f32;
        for (w, x) in weights.iter().zip(&inputs) {
            acc = w.mul_add(x[j + shift].to_f32(), acc);
        }
        let want = O::from_f32(acc);
        if bits(got[j + shift]) != bits(want) {
            mismatches += 1;
            first.get_or_insert((j, got[j + shift].to_f32(), want.to_f32()));
        }
    }
    let untouched = shift == 0 || bits(got[0]) == bits(O::poison());
    Ok(match first {
        None if untouched => None,
        None => Some("wrote before the output".to_string()),
        Some((j, g, w)) => Some(format!("{mismatches} differ; first at {j}: {g} vs {w}")),
    })
}

/// Each member's values copied to the device.
fn upload_members<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    members: &[Vec<T>],
) -> CheckResult<Vec<CudaSlice<T>>> {
    Ok(members
        .iter()
        .map(|x| stream.clone_htod(x))
        .collect::<Result<_, _>>()
        .w()?)
}

/// The kernels' pointer array: each member's device address `offset` elements in.
fn member_addresses<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    members: &[CudaSlice<T>],
    offset: usize,
) -> CheckResult<CudaSlice<u64>> {
    let step = (offset * std::mem::size_of::<T>()) as u64;
    let addresses: Vec<u64> = members
        .iter()
        .map(|x| x.device_ptr(stream).0 + step)
        .collect();
    Ok(stream.clone_htod(&addresses).w()?)
}

fn sums_cases(cuda: &CudaDevice) -> CheckResult<bool> {
    let mut ok = true;
    for m in [2usize, 3, 8] {
        for n in [1usize, 7, 4099, 1_000_003] {
            ok &= sums_case::<f32>(cuda, m, n)?;
            ok &= sums_case::<f16>(cuda, m, n)?;
            ok &= sums_case::<bf16>(cuda, m, n)?;
        }
    }
    Ok(ok)
}

/// warm_member_sums over a range split in two launches (as fusion adds chunk by chunk),
/// on members that share an init (a common part plus member noise), against f64 sums.
fn sums_case<T: Elem>(cuda: &CudaDevice, m: usize, n: usize) -> CheckResult<bool> {
    let stream = cuda.cuda_stream();
    let init = seeded(n, 7);
    let inputs: Vec<Vec<T>> = (0..m)
        .map(|i| {
            init.iter()
                .zip(seeded(n, 11 + i as u64))
                .map(|(a, b)| T::from_f32(a + 0.1 * b))
                .collect()
        })
        .collect();
    let device_inputs = upload_members(&stream, &inputs)?;
    let half = n / 2;
    let sums = stream.alloc_zeros::<f64>(4 * m).w()?;
    let sums_address = sums.device_ptr(&stream).0;
    let kernels = FusionKernels::new(cuda.clone());
    for (from, len) in [(0, half), (half, n - half)] {
        let addresses = member_addresses(&stream, &device_inputs, from)?;
        // SAFETY: each address has n - from >= len elements after it; sums holds 4m f64.
        unsafe { kernels.member_sums(T::DTYPE, &addresses, len as u64, sums_address)? };
        stream.synchronize().w()?;
    }
    let got = stream.clone_dtoh(&sums).w()?;
    let mut want = vec![[0f64; 4]; m];
    // Per member, the sum of ((M-1)|x| + |r|)^2: the scale of d's terms before they cancel.
    let mut d_scale = vec![0f64; m];
    for j in 0..n {
        let total: f64 = inputs.iter().map(|x| f64::from(x[j].to_f32())).sum();
        for (k, w) in want.iter_mut().enumerate() {
            let x = f64::from(inputs[k][j].to_f32());
            let r = total - x;
            let d = (m - 1) as f64 * x - r;
            w[0] += x * x;
            w[1] += x * r;
            w[2] += r * r;
            w[3] += d * d;
            d_scale[k] += ((m - 1) as f64 * x.abs() + r.abs()).powi(2);
        }
    }
    // Relative to each sum's natural scale: x.r against |x||r| (it can cancel), and d.d
    // against its terms' scale, since the kernel forms d in f32 (as the CPU pass does) and
    // members near each other leave d far smaller than the rounding of (M-1)x and r.
    let mut worst = 0f64;
    for (k, w) in want.iter().enumerate() {
        let g = &got[4 * k..4 * k + 4];
        let scales = [w[0], (w[0] * w[2]).sqrt(), w[2], d_scale[k]];
        for q in 0..4 {
            let err = (g[q] - w[q]).abs() / scales[q].max(f64::MIN_POSITIVE);
            worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
        }
    }
    let passed = worst <= 1e-5;
    println!(
        "| sums | {} M={m} n={n} | {} | max relative error {worst:.1e} (tolerance 1e-5) |",
        T::DTYPE,
        if passed { "ok" } else { "FAIL" }
    );
    Ok(passed)
}

fn timed_event(stream: &CudaStream) -> CheckResult<CudaEvent> {
    Ok(stream
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .w()?)
}

fn bandwidth(cuda: &CudaDevice) -> CheckResult<bool> {
    bandwidth_of::<f32>(cuda)?;
    bandwidth_of::<bf16>(cuda)?;
    Ok(true)
}

/// The kernel averaging four 256 MiB inputs of `T` into a fifth, against a device copy of
/// the same bytes.
fn bandwidth_of<T: Elem + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
    cuda: &CudaDevice,
) -> CheckResult<()> {
    let stream = cuda.cuda_stream();
    let m = 4usize;
    let size = std::mem::size_of::<T>();
    let n = (256usize << 20) / size;
    let reps = 10;
    let inputs: Vec<CudaSlice<T>> = (0..m)
        .map(|i| {
            let values: Vec<T> = seeded(n, 100 + i as u64)
                .into_iter()
                .map(T::from_f32)
                .collect();
            stream.clone_htod(&values)
        })
        .collect::<Result<_, _>>()
        .w()?;
    let addresses: Vec<u64> = inputs.iter().map(|x| x.device_ptr(&stream).0).collect();
    let addresses = stream.clone_htod(&addresses).w()?;
    let weights = stream.clone_htod(&vec![1.0f32 / m as f32; m]).w()?;
    let out = stream.alloc_zeros::<T>(n).w()?;
    let out_address = out.device_ptr(&stream).0;
    let kernels = FusionKernels::new(cuda.clone());
    let launch = || -> CheckResult<()> {
        // SAFETY: all buffers hold n elements of T.
        unsafe {
            kernels.average(
                T::DTYPE,
                T::DTYPE,
                &addresses,
                &weights,
                out_address,
                n as u64,
            )?
        };
        Ok(())
    };
    launch()?;
    let start = timed_event(&stream)?;
    for _ in 0..reps {
        launch()?;
    }
    let end = timed_event(&stream)?;
    end.synchronize().w()?;
    let kernel_s = start.elapsed_ms(&end).w()? as f64 / 1e3 / reps as f64;
    let kernel_bytes = ((m + 1) * n * size) as f64;
    // A copy moving the same bytes: read + write of (m + 1) / 2 inputs' worth.
    let copy_bytes_each = (m + 1) * n * size / 2;
    let src = stream.alloc_zeros::<u8>(copy_bytes_each).w()?;
    let mut dst = stream.alloc_zeros::<u8>(copy_bytes_each).w()?;
    stream.memcpy_dtod(&src, &mut dst).w()?;
    let start = timed_event(&stream)?;
    for _ in 0..reps {
        stream.memcpy_dtod(&src, &mut dst).w()?;
    }
    let end = timed_event(&stream)?;
    end.synchronize().w()?;
    let copy_s = start.elapsed_ms(&end).w()? as f64 / 1e3 / reps as f64;
    let kernel_gbs = kernel_bytes / kernel_s / 1e9;
    let copy_gbs = (2 * copy_bytes_each) as f64 / copy_s / 1e9;
    let ratio = kernel_gbs / copy_gbs;
    println!(
        "| bandwidth | {} M=4, 256 MiB each | {} | kernel {kernel_gbs:.0} GB/s, device copy {copy_gbs:.0} GB/s: {:.0}% (target 80%) |",
        T::DTYPE,
        if ratio >= 0.8 { "ok" } else { "below" },
        ratio * 100.0
    );
    Ok(())
}

fn fusion(device: &Device, cuda: &CudaDevice, members: &[PathBuf]) -> CheckResult<()> {
    // Reading the files once (the page cache warmed by a first read) bounds the host side.
    let files: Vec<PathBuf> = members
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    let read = |files: &[PathBuf]| -> CheckResult<(u64, f64)> {
        let started = Instant::now();
        let mut bytes = 0u64;
        for f in files {
            bytes += std::fs::read(f)?.len() as u64;
        }
        Ok((bytes, started.elapsed().as_secs_f64()))
    };
    read(&files)?;
    let (bytes, read_s) = read(&files)?;
    let pcie_gbs = pcie_bandwidth(cuda)?;
    let config = MembersConfig {
        dirs: members.to_vec(),
        weights: None,
        allow_unrelated_members: false,
    };
    let dtype = FloatDType::BF16;
    let started = Instant::now();
    let (tensors, _) = crate::fuse::fuse_to_tensors(&config, dtype, device)?;
    device.synchronize()?;
    let fuse_s = started.elapsed().as_secs_f64();
    drop(tensors);
    let gb = bytes as f64 / 1e9;
    println!(
        "| fusion | {} members, {gb:.2} GB, to bf16 | {fuse_s:.2} s | {:.1} GB/s; read files {:.1} GB/s ({read_s:.2} s); pinned host->device {pcie_gbs:.1} GB/s |",
        members.len(),
        gb / fuse_s,
        gb / read_s
    );
    Ok(())
}

/// Fuses `dirs` on the device and on the CPU into `dtype` and compares every tensor and
/// the members' statistics. The two passes sum in different orders (the CPU around one
/// member, the kernel in member order), so a float element may differ in its last units:
/// four units of the output type's precision, relative to the tensor's largest value.
fn compare_fusion(device: &Device, dirs: &[PathBuf], dtype: FloatDType) -> CheckResult<bool> {
    let config = MembersConfig {
        dirs: dirs.to_vec(),
        weights: None,
        allow_unrelated_members: dirs.len() == 1,
    };
    let (gpu, gpu_report) = crate::fuse::fuse_to_tensors(&config, dtype, device)?;
    let (cpu, cpu_report) = crate::fuse::fuse_to_tensors(&config, dtype, &Device::Cpu)?;
    let epsilon = match dtype {
        FloatDType::F32 => f32::EPSILON,
        FloatDType::F16 => f32::from(half::f16::EPSILON),
        FloatDType::BF16 => f32::from(half::bf16::EPSILON),
    };
    let (differ, elements, worst, worst_name) = compare_tensors(&gpu, &cpu)?;
    let tensors_ok = gpu.len() == cpu.len() && worst <= 4.0 * epsilon;
    let (cosine_gap, distance_gap) = statistics_gap(&gpu_report, &cpu_report);
    let statistics_ok = cosine_gap <= 1e-5 && distance_gap <= 1e-4;
    let cosines: Vec<String> = gpu_report
        .members
        .iter()
        .map(|r| r.cosine_to_rest.map_or("-".into(), |c| format!("{c:.6}")))
        .collect();
    println!(
        "| device vs CPU fusion | {} member(s) of {}, to {dtype} | {} | {} tensors: {differ} of {elements} elements differ, largest gap {worst:.1e} of the tensor's max ({worst_name}), tolerance {:.1e}; cosines {} (gap {cosine_gap:.1e}), distance gap {distance_gap:.1e} |",
        dirs.len(),
        dirs[0].parent().map_or_else(|| dirs[0].display().to_string(), |p| p.display().to_string()),
        if tensors_ok && statistics_ok { "ok" } else { "FAIL" },
        gpu.len(),
        4.0 * epsilon,
        cosines.join(", "),
    );
    Ok(tensors_ok && statistics_ok)
}

/// Elements that differ, elements compared, and the largest gap relative to its tensor's
/// largest magnitude (integer tensors must match exactly: any gap counts as infinite).
fn compare_tensors(
    gpu: &HashMap<String, Tensor>,
    cpu: &HashMap<String, Tensor>,
) -> CheckResult<(usize, usize, f32, String)> {
    let (mut differ, mut elements, mut worst, mut worst_name) = (0, 0, 0f32, String::new());
    for (name, c) in cpu {
        let g = gpu
            .get(name)
            .ok_or_else(|| format!("{name} missing from the device's tensors"))?;
        if g.dtype() != c.dtype() || g.dims() != c.dims() {
            return Err(format!(
                "{name}: device {:?} {:?}, CPU {:?} {:?}",
                g.dtype(),
                g.dims(),
                c.dtype(),
                c.dims()
            )
            .into());
        }
        let wide = if c.dtype().is_float() {
            DType::F32
        } else {
            DType::F64
        };
        let flat = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
            let t = t.to_device(&Device::Cpu)?.to_dtype(wide)?.flatten_all()?;
            Ok(match wide {
                DType::F32 => t.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
                _ => t.to_vec1::<f64>()?,
            })
        };
        let (g, c_values) = (flat(g)?, flat(c)?);
        let largest = c_values.iter().fold(0f64, |a, v| a.max(v.abs()));
        let mut gap = 0f64;
        for (a, b) in g.iter().zip(&c_values) {
            if a.to_bits() != b.to_bits() {
                differ += 1;
                gap = gap.max((a - b).abs());
            }
        }
        elements += c_values.len();
        let relative = if gap == 0.0 {
            0.0
        } else if wide == DType::F64 || largest == 0.0 {
            f32::INFINITY
        } else {
            (gap / largest) as f32
        };
        if relative > worst || worst_name.is_empty() {
            worst = worst.max(relative);
            worst_name = name.clone();
        }
    }
    Ok((differ, elements, worst, worst_name))
}

/// The largest gaps between two reports' cosines and relative distances.
fn statistics_gap(a: &FusionReport, b: &FusionReport) -> (f64, f64) {
    let mut cosine = 0f64;
    let mut distance = 0f64;
    for (x, y) in a.members.iter().zip(&b.members) {
        match (x.cosine_to_rest, y.cosine_to_rest) {
            (Some(p), Some(q)) => cosine = cosine.max((p - q).abs()),
            (None, None) => {}
            _ => cosine = f64::INFINITY,
        }
        match (x.distance_to_rest, y.distance_to_rest) {
            (Some(p), Some(q)) => distance = distance.max((p - q).abs() / q.abs().max(1e-12)),
            (None, None) => {}
            _ => distance = f64::INFINITY,
        }
    }
    (cosine, distance)
}

fn pcie_bandwidth(cuda: &CudaDevice) -> CheckResult<f64> {
    let stream = cuda.cuda_stream();
    let context = stream.context().clone();
    let bytes = 256usize << 20;
    // SAFETY: plain bytes, filled before use.
    let mut host = unsafe { context.alloc_pinned::<u8>(bytes) }.w()?;
    host.as_mut_slice().w()?.fill(1);
    let mut dev = stream.alloc_zeros::<u8>(bytes).w()?;
    stream.memcpy_htod(&host, &mut dev).w()?;
    let reps = 8;
    let start = timed_event(&stream)?;
    for _ in 0..reps {
        stream.memcpy_htod(&host, &mut dev).w()?;
    }
    let end = timed_event(&stream)?;
    end.synchronize().w()?;
    let s = start.elapsed_ms(&end).w()? as f64 / 1e3;
    Ok((bytes * reps) as f64 / s / 1e9)
}

/// The parity fixtures' model directories, in name order.
fn fixture_dirs(fixtures: &Path) -> CheckResult<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures.join("models"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// GPU against CPU scores on one parity fixture (and, for decoders, behind a shared
/// prompt).
fn parity(device: &Device, fixtures: &Path, dir: &Path) -> CheckResult<bool> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(
        fixtures.join("expected").join(format!("{name}.json")),
    )?)?;
    let sequences: Vec<Sequence> = expected["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|case| {
            let numbers = |key: &str| -> Vec<u32> {
                case[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_u64().map(|v| v as u32))
                    .collect()
            };
            let ids = numbers("ids");
            // Encoders' pairs carry token types (absent: all 0).
            let mut type_ids = numbers("type_ids");
            type_ids.resize(ids.len(), 0);
            // Separated steps (TRL's layout) carry the positions their rewards are read at.
            let read_at = case
                .get("read_at")
                .map(|_| numbers("read_at").into_iter().map(|p| p as usize).collect());
            Sequence {
                type_ids,
                ids,
                read_at,
            }
        })
        .collect();
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let members = MembersConfig::single(dir);
    let cpu = Scorer::load(
        &members,
        Combine::Weights,
        FloatDType::F32,
        &Device::Cpu,
        None,
    )?;
    let dtype = FloatDType::BF16;
    let gpu = Scorer::load(&members, Combine::Weights, dtype, device, None)?;
    let cpu_scores = cpu.score(&refs)?;
    let gpu_scores = gpu.score(&refs)?;
    let mut worst = 0.0f32;
    let mut scale = 0.0f32;
    for (c, g) in cpu_scores.iter().zip(&gpu_scores) {
        for (c, g) in every_value(c).zip(every_value(g)) {
            worst = worst.max((c - g).abs());
            scale = scale.max(c.abs());
        }
    }
    // bf16 keeps 8 bits of mantissa: a few percent of the largest score.
    let tolerance = 0.05 * scale.max(1.0);
    let passed = worst <= tolerance;
    println!(
        "| parity | {name} ({dtype}, {} inputs) | {} | max |GPU - CPU| {worst:.2e}, largest |score| {scale:.2}, tolerance {tolerance:.2e} |",
        refs.len(),
        if passed { "ok" } else { "FAIL" }
    );
    if gpu.batch_layout().shares() {
        return Ok(shared_prompt(&name, &cpu, &gpu, &sequences)? && passed);
    }
    Ok(passed)
}

/// A score's reward, then its step rewards (a process reward model) or objectives' rewards
/// (ArmoRM): all that parity compares.
fn every_value(score: &Score) -> impl Iterator<Item = f32> + '_ {
    std::iter::once(score.value)
        .chain(score.steps.iter().flatten().copied())
        .chain(score.objectives.iter().flatten().copied())
}

/// A decoder fixture's inputs behind one 24-token prompt: on the GPU the prompt is computed
/// once (padded layout, src/model/shared_padding.rs), on the CPU each input is scored whole.
fn shared_prompt(name: &str, cpu: &Scorer, gpu: &Scorer, cases: &[Sequence]) -> CheckResult<bool> {
    let all: Vec<u32> = cases.iter().flat_map(|s| s.ids.iter().copied()).collect();
    if all.is_empty() {
        return Ok(true);
    }
    let prompt: Vec<u32> = (0..24).map(|i| all[i % all.len()]).collect();
    let sequences: Vec<Sequence> = cases
        .iter()
        .map(|s| Sequence {
            ids: prompt.iter().chain(&s.ids).copied().collect(),
            type_ids: vec![0; prompt.len() + s.ids.len()],
            read_at: s
                .read_at
                .as_ref()
                .map(|at| at.iter().map(|p| p + prompt.len()).collect()),
        })
        .collect();
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let (gpu_scores, work) = gpu.score_batch(&refs)?;
    let mut worst = 0.0f32;
    let mut scale = 0.0f32;
    for (s, g) in refs.iter().zip(&gpu_scores) {
        let alone = cpu.score(&[s])?.remove(0);
        for (c, g) in every_value(&alone).zip(every_value(g)) {
            worst = worst.max((c - g).abs());
            scale = scale.max(c.abs());
        }
    }
    let tolerance = 0.05 * scale.max(1.0);
    let passed = worst <= tolerance && work.shared > 0;
    println!(
        "| parity | {name} (bf16, {} inputs, a 24-token prompt shared: {} tokens computed once) | {} | max |GPU - CPU| {worst:.2e}, largest |score| {scale:.2}, tolerance {tolerance:.2e} |",
        refs.len(),
        work.shared,
        if passed { "ok" } else { "FAIL" }
    );
    Ok(passed)
}

fn throughput(device: &Device, model: &[PathBuf]) -> CheckResult<()> {
    let config = MembersConfig {
        dirs: model.to_vec(),
        weights: None,
        allow_unrelated_members: model.len() == 1,
    };
    let started = Instant::now();
    let scorer = Scorer::load(&config, Combine::Weights, FloatDType::BF16, device, None)?;
    let load_s = started.elapsed().as_secs_f64();
    let (batch, seq_len, iters) = (64usize, 128usize, 20usize);
    let limit = scorer.max_input_length().min(seq_len);
    let sequences = Sequence::synthetic_batch(batch, limit, 1000..2500);
    let refs: Vec<&Sequence> = sequences.iter().collect();
    scorer.score(&refs)?;
    device.synchronize()?;
    let started = Instant::now();
    for _ in 0..iters {
        scorer.score(&refs)?;
    }
    device.synchronize()?;
    let s = started.elapsed().as_secs_f64();
    println!(
        "| throughput | {} member(s), batch {batch} x {limit} tokens, bf16 | {:.0} sequences/s | {:.0} tokens/s; loaded (fused on the device) in {load_s:.2} s |",
        model.len(),
        (batch * iters) as f64 / s,
        (batch * iters * limit) as f64 / s
    );
    Ok(())
}
