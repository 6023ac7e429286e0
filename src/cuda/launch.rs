//! Launching the fusion kernels on a candle CUDA device's stream:
//! kernels/warm_average.cu (`out = sum_i w_i * x_i` over M device buffers) and
//! kernels/warm_member_sums.cu (the shared-init sums of M device buffers).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

use crate::dtype::FloatDType;
use crate::kernels;

/// Threads per block: each averaging thread moves one or two 16-byte vectors per input per
/// step; the sums kernel's reduction is written for this count (`THREADS` there).
const THREADS: u32 = 256;
/// Averaging blocks: enough to fill an H100/H200 several times over; the kernel loops over
/// the rest.
const MAX_AVERAGE_BLOCKS: u64 = 8192;
/// Sums blocks per member: enough to fill the GPU; each thread loops over the rest.
const MAX_SUMS_BLOCKS: u64 = 1024;

pub struct FusionKernels {
    device: CudaDevice,
}

impl FusionKernels {
    pub fn new(device: CudaDevice) -> Self {
        Self { device }
    }

    /// Averages `n` elements: `inputs` holds M device addresses (one per member, each `n`
    /// elements of `input`), `weights` M f32 weights, `out` the device address of `n`
    /// elements of `output` to write.
    ///
    /// # Safety
    /// Every address in `inputs` and `out` must point to at least `n` live elements of its
    /// type on this device, valid until the kernel has run.
    pub unsafe fn average(
        &self,
        input: FloatDType,
        output: FloatDType,
        inputs: &CudaSlice<u64>,
        weights: &CudaSlice<f32>,
        out: u64,
        n: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let func = self.device.get_or_load_custom_func(
            kernels::warm_average_entry(input, output),
            "warm_average",
            kernels::WARM_AVERAGE_PTX,
        )?;
        let m = inputs.len() as u32;
        // Elements per thread and step, as the kernel's LANES.
        let lanes = if input == FloatDType::F32 && output == FloatDType::F32 {
            4
        } else {
            8
        };
        let blocks = n
            .div_ceil(lanes)
            .div_ceil(THREADS as u64)
            .clamp(1, MAX_AVERAGE_BLOCKS) as u32;
        let mut builder = func.builder();
        builder.arg(inputs);
        builder.arg(weights);
        builder.arg(&m);
        builder.arg(&out);
        builder.arg(&n);
        // SAFETY: the argument list matches the kernel's signature
        // (const TIn* const*, const float*, uint32_t, TOut*, uint64_t); the caller vouches
        // for the addresses.
        unsafe { builder.launch(config((blocks, 1, 1))) }.w()?;
        Ok(())
    }

    /// Adds, for each of the M members in `inputs` (device addresses of `n` elements of
    /// `dtype`), the sums of x*x, x*r, r*r and d*d (see the kernel) to the f64
    /// `sums[4k..4k + 4]` (`sums` is a device address).
    ///
    /// # Safety
    /// Every address in `inputs` must point to at least `n` live elements of `dtype`, and
    /// `sums` to 4 * M f64, on this device, valid until the kernel has run.
    pub unsafe fn member_sums(
        &self,
        dtype: FloatDType,
        inputs: &CudaSlice<u64>,
        n: u64,
        sums: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name = match dtype {
            FloatDType::F32 => kernels::WARM_MEMBER_SUMS_F32,
            FloatDType::F16 => kernels::WARM_MEMBER_SUMS_F16,
            FloatDType::BF16 => kernels::WARM_MEMBER_SUMS_BF16,
        };
        let func = self.device.get_or_load_custom_func(
            name,
            "warm_member_sums",
            kernels::WARM_MEMBER_SUMS_PTX,
        )?;
        let m = inputs.len() as u32;
        let blocks = n.div_ceil(THREADS as u64).clamp(1, MAX_SUMS_BLOCKS) as u32;
        let mut builder = func.builder();
        builder.arg(inputs);
        builder.arg(&m);
        builder.arg(&n);
        builder.arg(&sums);
        // SAFETY: the argument list matches the kernel's signature
        // (const T* const*, uint32_t, uint64_t, double*); the caller vouches for the
        // addresses.
        unsafe { builder.launch(config((blocks, m, 1))) }.w()?;
        Ok(())
    }
}

fn config(grid_dim: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
