//! Launching kernels/warm_member_sums.cu: the shared-init sums of M device buffers.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

use crate::dtype::FloatDType;
use crate::kernels;

/// Threads per block: fixed by the kernel's reduction (`THREADS` there).
const THREADS: u32 = 256;
/// Blocks per member: enough to fill the GPU; each thread loops over the rest.
const MAX_BLOCKS: u64 = 1024;

pub struct DeviceMemberSums {
    device: CudaDevice,
}

impl DeviceMemberSums {
    pub fn new(device: CudaDevice) -> Self {
        Self { device }
    }

    /// Adds, for each of the M members in `inputs` (device addresses of `n` elements of
    /// `dtype`), the sums of x*x, x*r, r*r and d*d (see the kernel) to the f64
    /// `sums[4k..4k + 4]` (`sums` is a device address). Runs on the device's stream.
    ///
    /// # Safety
    /// Every address in `inputs` must point to at least `n` live elements of `dtype`, and
    /// `sums` to 4 * M f64, on this device, valid until the kernel has run.
    pub unsafe fn launch(
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
        let blocks = n.div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, m, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(inputs);
        builder.arg(&m);
        builder.arg(&n);
        builder.arg(&sums);
        // SAFETY: the argument list matches the kernel's signature
        // (const T* const*, uint32_t, uint64_t, double*); the caller vouches for the
        // addresses.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
