//! Picking the compute device and the default precision.

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::options::{DeviceChoice, Precision};

/// Opens the chosen device. Asking for a backend this build lacks names the cargo feature to build with.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    // One line whatever the backend's error says: without candle's backtrace (captured when
    // RUST_BACKTRACE is set).
    let line = |e: &candle_core::Error| {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = inner;
        }
        // A backtrace, if any, starts on the next line.
        let text = e.to_string();
        text.lines().next().unwrap_or_default().trim().to_string()
    };
    let fail = |what: &str, e: candle_core::Error| {
        Error::usage(format!("cannot open {what}: {}", line(&e)))
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            // `*_is_available` only says whether the backend was compiled in; a build with CUDA on a
            // machine without a GPU falls through to the next choice.
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    // A CUDA build on a machine without a GPU or driver: say so once.
                    Err(e) => tracing::warn!(
                        "no usable CUDA device ({}); falling back to {}",
                        line(&e),
                        if candle_core::utils::metal_is_available() {
                            "Metal or the CPU"
                        } else {
                            "the CPU"
                        }
                    ),
                }
            }
            if candle_core::utils::metal_is_available() {
                match Device::new_metal(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::info!("no usable Metal device ({e}); using the CPU"),
                }
            }
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::usage(
                    "this altdiff was built without CUDA support; rebuild with `--features cuda` (or `cudnn`)",
                ));
            }
            Device::new_cuda(n).map_err(|e| fail(&format!("CUDA device {n}"), e))
        }
        DeviceChoice::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(Error::usage(
                    "this altdiff was built without Metal support; rebuild with `--features metal`",
                ));
            }
            Device::new_metal(0).map_err(|e| fail("the Metal device", e))
        }
    }
}

/// The dtype for `precision`, defaulting to f32 on CPU and f16 on GPUs. bf16 works everywhere; on
/// the CPU its convolutions and matrix products run in [`crate::kernels::gemm_bf16`].
pub fn dtype(precision: Option<Precision>, device: &Device) -> Result<DType> {
    Ok(match precision {
        Some(Precision::F32) => DType::F32,
        Some(Precision::F16) => DType::F16,
        Some(Precision::Bf16) => DType::BF16,
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
    })
}
