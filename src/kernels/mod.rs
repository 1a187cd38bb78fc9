//! CPU kernels for the operations where candle 0.11's generic CPU code loses most of the time, as
//! candle custom ops with the plain candle op as the fallback (other devices and dtypes, grouped
//! convolutions) and as the reference in every test.
//!
//! Profiling a full-size m18 generation at 512x512 (2-core Zen 3, `perf record`) put about a third
//! of the time in candle's tiled conv2d data movement (an NCHW -> NHWC copy on one thread, then a
//! scalar im2col gather and a scalar scatter of every output tile), and GroupNorm is eight or so
//! separate tensor passes in candle-nn. The kernels here:
//! - [`conv2d`]: im2col straight from NCHW into row tiles (contiguous row copies), one gemm per tile
//!   writing the NCHW output in place with the bias as its starting value; 1x1 convolutions are a
//!   single gemm on the input with no copy.
//! - [`group_norm`]: GroupNorm with an optional fused SiLU in one read for the statistics (f64
//!   sums) and one pass that writes the result.
//! - [`softmax_scaled_last_dim`]: the attention softmax with its scale, in place, with a
//!   vectorised exponential (candle calls libm's scalar `expf` per score).
//! - [`gemm_bf16`]: bf16 x bf16 -> f32 matrix multiply (AVX512-BF16 `vdpbf16ps`, or a portable
//!   path through f32), for `--dtype bf16` on the CPU, and the [`linear`] layers and the
//!   [`attention_bf16`] that use it.

pub mod attention_bf16;
pub mod conv2d;
pub mod gemm_bf16;
pub mod group_norm;
pub mod linear;
pub mod softmax;

pub use conv2d::Conv2d;
pub use group_norm::GroupNorm;
pub use softmax::softmax_scaled_last_dim;

/// The gemm parallelism candle itself uses for its matmuls.
fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
