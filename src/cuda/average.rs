//! Launching kernels/warm_average.cu: `out = sum_i w_i * x_i` over M device buffers.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

use crate::dtype::FloatDType;
use crate::kernels;

/// Threads per block; each thread moves 16 bytes per input per step.
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

    /// Averages `n` elements of `dtype`: `inputs` holds M device addresses (one per member,
    /// each `n` elements), `weights` M f32 weights, `out` the device address to write. Runs
    /// on the device's stream.
    ///
    /// # Safety
    /// Every address in `inputs` and `out` must point to at least `n` live elements of
    /// `dtype` on this device, valid until the kernel has run.
    pub unsafe fn launch(
        &self,
        dtype: FloatDType,
        inputs: &CudaSlice<u64>,
        weights: &CudaSlice<f32>,
        out: u64,
        n: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name = match dtype {
            FloatDType::F32 => kernels::WARM_AVERAGE_F32,
            FloatDType::F16 => kernels::WARM_AVERAGE_F16,
            FloatDType::BF16 => kernels::WARM_AVERAGE_BF16,
        };
        let func =
            self.device
                .get_or_load_custom_func(name, "warm_average", kernels::WARM_AVERAGE_PTX)?;
        let m = inputs.len() as u32;
        let lanes = (16 / dtype.size_in_bytes()) as u64;
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
        // (const T* const*, const float*, uint32_t, T*, uint64_t); the caller vouches for
        // the addresses.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
