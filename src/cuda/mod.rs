//! CUDA (feature `cuda`): finding a GPU at run time, and the kernels that fuse the members
//! on it (kernels/warm_average.cu, kernels/warm_member_sums.cu).
//!
//! The binary must start on a machine without a GPU, so nothing here links the driver:
//! [`driver_present`] opens `libcuda.so.1` itself before candle touches CUDA (candle's CUDA
//! libraries are loaded at run time, see scripts/build-cuda.sh).

pub mod check;
mod launch;

pub use launch::FusionKernels;

/// True when the CUDA driver library can be opened and reports at least one device.
pub fn driver_present() -> bool {
    // SAFETY: dlopen/dlclose with a constant, NUL-terminated name; the handle is only
    // compared with null and closed.
    let opened = unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            false
        } else {
            libc::dlclose(handle);
            true
        }
    };
    opened
        && candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .is_ok_and(|n| n > 0)
}
