//! Launching kernels/warm_average.cu: `out = sum_i w_i * x_i` over M device buffers.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

use crate::dtype::FloatDType;
use crate::kernels;

/// Threads per block; each thread moves one or two 16-byte vectors per input per step.
const THREADS: u32 = 256;
/// Enough blocks to fill an H100/H200 several times over; the kernel loops over the rest.
const MAX_BLOCKS: u64 = 8192;

pub struct DeviceAverager {
    device: CudaDevice,
}

impl DeviceAverager {
    pub fn new(device: CudaDevice) -> Self {
        Self { device }
    }

    /// Averages `n` elements: `inputs` holds M device addresses (one per member, each `n`
    /// elements of `input`), `weights` M f32 weights, `out` the device address of `n`
    /// elements of `output` to write. Runs on the device's stream.
    ///
    /// # Safety
    /// Every address in `inputs` and `out` must point to at least `n` live elements of its
    /// type on this device, valid until the kernel has run.
    pub unsafe fn launch(
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
        let name = kernels::warm_average_entry(input, output);
        let func =
            self.device
                .get_or_load_custom_func(name, "warm_average", kernels::WARM_AVERAGE_PTX)?;
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
            .clamp(1, MAX_BLOCKS) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(inputs);
        builder.arg(weights);
        builder.arg(&m);
        builder.arg(&out);
        builder.arg(&n);
        // SAFETY: the argument list matches the kernel's signature
        // (const TIn* const*, const float*, uint32_t, TOut*, uint64_t); the caller vouches
        // for the addresses.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
