//! `--device`: which candle device a command runs on.

use candle_core::{Device, DeviceLocation};

use crate::config::DeviceChoice;

/// Without the `cuda` feature every choice but `cuda[:N]` is the CPU.
#[cfg(not(feature = "cuda"))]
pub fn select(choice: DeviceChoice) -> Result<Device, String> {
    match choice {
        DeviceChoice::Auto | DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => Err(format!(
            "--device cuda:{n}: this build of warm has no CUDA support (build with --features cuda)"
        )),
    }
}

/// `auto` takes GPU 0 when a CUDA driver and device are there, else the CPU: a CUDA build
/// still starts and runs on a machine without a GPU.
#[cfg(feature = "cuda")]
pub fn select(choice: DeviceChoice) -> Result<Device, String> {
    let present = crate::cuda::driver_present;
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !present() => {
            tracing::info!("no CUDA driver or device found: running on the CPU");
            Ok(Device::Cpu)
        }
        DeviceChoice::Auto => {
            let device =
                Device::new_cuda(0).map_err(|e| format!("--device auto: opening GPU 0: {e}"))?;
            tracing::info!("running on CUDA GPU 0");
            Ok(device)
        }
        DeviceChoice::Cuda(n) if !present() => Err(format!(
            "--device cuda:{n}: no CUDA driver (libcuda.so.1) or no device on this machine"
        )),
        DeviceChoice::Cuda(n) => {
            let device = Device::new_cuda(n)
                .map_err(|e| format!("--device cuda:{n}: opening the GPU: {e}"))?;
            tracing::info!("running on CUDA GPU {n}");
            Ok(device)
        }
    }
}

/// How `/info` and the metrics name a device: `cpu`, `cuda:N`.
pub fn label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_chosen_and_named_without_a_gpu() {
        let device = select(DeviceChoice::Cpu).unwrap();
        assert_eq!(label(&device), "cpu");
        // `auto` is the CPU whenever no GPU is usable.
        #[cfg(feature = "cuda")]
        let gpu = crate::cuda::driver_present();
        #[cfg(not(feature = "cuda"))]
        let gpu = false;
        if !gpu {
            assert_eq!(label(&select(DeviceChoice::Auto).unwrap()), "cpu");
        }
    }
}
