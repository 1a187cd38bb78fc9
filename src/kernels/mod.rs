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
//! - [`winograd`]: F(2x2, 3x3) and F(4x4, 3x3) Winograd convolution for the large f32 3x3 layers
//!   (2.25-4x fewer multiplications than im2col), chosen per layer by size and allowed error.
//! - [`attention`]: attention fused per block of query rows (scores, softmax and the product with
//!   `v` while the block is in cache), f32 and bf16.
//! - [`gemm_bf16`]: bf16 x bf16 -> f32 matrix multiply (AVX512-BF16 `vdpbf16ps`, or a portable
//!   path through f32), for `--dtype bf16` on the CPU, and the [`linear`] layers that use it.
//! - [`geglu`]: the feed-forward's GEGLU in one pass with a vectorised erf.
//! - [`convert`]: f32 <-> bf16 conversion of whole buffers, vectorised.
//! - [`tokens`]: a transformer's tokens back into the NCHW feature map with the residual added,
//!   in one blocked pass (the way in is fused into [`GroupNorm::forward_tokens`]).
//!
//! The crate's own loops (softmax, GEGLU, GroupNorm, conversions, Winograd transforms) are
//! compiled for the CPU's best instruction set at run time through one pulp dispatch
//! (`vectorized`).

pub mod attention;
pub mod conv2d;
pub mod convert;
pub mod geglu;
pub mod gemm_bf16;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod softmax;
pub mod tokens;
pub mod winograd;

pub use conv2d::Conv2d;
pub use group_norm::GroupNorm;
pub use softmax::softmax_scaled_last_dim;

/// The CPU kernels this machine runs, for `generate -v` and benchmarks: gemm's f32 kernel family
/// (it picks AVX-512, AVX2 + FMA or a generic one at run time), the bf16 kernel, and the width the
/// crate's own vectorised loops (softmax, GEGLU, conversions, Winograd transforms) run at.
pub fn describe_cpu_kernels() -> String {
    #[cfg(target_arch = "x86_64")]
    let (f32_kernel, simd) = {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        (
            if avx512 {
                "avx512f"
            } else if avx2 {
                "avx2+fma"
            } else {
                "generic"
            },
            if pulp::x86::V4::try_new().is_some() {
                "avx512"
            } else if pulp::x86::V3::try_new().is_some() {
                "avx2+fma"
            } else {
                "generic"
            },
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (f32_kernel, simd) = ("gemm's (neon / generic)", "generic");
    let amx = gemm_bf16::Bf16Kernel::detect() == gemm_bf16::Bf16Kernel::Amx;
    let conv3x3 = match winograd::Mode::get() {
        winograd::Mode::Auto => format!(
            "f32: Winograd {} (UNet) from {} tiles / {} (VAE) from {} tiles; bf16: {} in f32 \
             from {} tiles{}{}; else im2col",
            winograd::F2.name,
            winograd::min_tiles_f2(),
            winograd::F4.name,
            winograd::MIN_TILES_F4,
            winograd::F4.name,
            if amx {
                winograd::MIN_TILES_F4
            } else {
                winograd::MIN_TILES_BF16_F4
            },
            if amx {
                " (VAE)".to_string()
            } else if winograd::fused_bf16_products() {
                format!(
                    " ({} where the fused path takes the layer)",
                    winograd::MIN_TILES_BF16_F4_PAIRED
                )
            } else {
                String::new()
            },
            match winograd::fused_tiles() {
                Some((f4, f2)) => format!(
                    "; weight transforms fused into the products up to {f4} tiles (F(4x4)) and \
                     {f2} (F(2x2)){}",
                    if winograd::fused_bf16_products() {
                        ", bf16 layers' products there in bf16 (vdpbf16ps)"
                    } else {
                        ""
                    }
                ),
                None => String::new(),
            }
        ),
        winograd::Mode::Im2col => "im2col (ALTDIFF_CONV3X3)".to_string(),
        winograd::Mode::F2 => format!("Winograd {} (ALTDIFF_CONV3X3)", winograd::F2.name),
        winograd::Mode::F4 => format!("Winograd {} (ALTDIFF_CONV3X3)", winograd::F4.name),
    };
    let bf16 = gemm_bf16::Bf16Kernel::detect();
    // `linear::Linear` packs bf16 weights at load for this kernel only (`linear::GegluLinear`
    // too, with the activation in its tiles).
    let packed = if bf16 == gemm_bf16::Bf16Kernel::Avx512Bf16 {
        ", linear weights packed at load, GEGLU in the feed-forward's tiles"
    } else {
        ""
    };
    format!(
        "CPU kernels: f32 gemm {f32_kernel}, 3x3 conv {conv3x3}, f32 attention {}; bf16 {}{packed}; \
         softmax, GEGLU and conversions {simd}",
        attention::f32_kernel(),
        bf16.name()
    )
}

/// A hint for f32 runs on CPUs with bf16 instructions, once per run.
pub fn bf16_hint() -> Option<&'static str> {
    (gemm_bf16::Bf16Kernel::detect() != gemm_bf16::Bf16Kernel::Portable).then_some(
        "this CPU has bf16 instructions (AVX512-BF16 or AMX): --dtype bf16 needs about half \
         the memory of f32 and runs the UNet about 1.5x faster and the VAE decode a little faster, at bf16 precision (see the \
         README's \"Which precision on which CPU\")",
    )
}

/// Work compiled for the best SIMD instructions of the CPU it runs on (pulp's run-time dispatch:
/// AVX-512, AVX2 + FMA or portable code). `run` must be `#[inline(always)]`, and so must
/// everything it calls, so that it is compiled inside the dispatcher's `target_feature` function;
/// plain loops over slices are then vectorised by the compiler at that width.
pub(crate) trait Vectorized {
    fn run(self);
}

/// Adapts a [`Vectorized`] task to pulp (a closure would be compiled outside the target features).
struct Dispatch<K>(K);

impl<K: Vectorized> pulp::WithSimd for Dispatch<K> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        self.0.run()
    }
}

/// The lanes of 16 that hold real values when `n` of them are left (`n` >= 16: all): the mask of
/// an AVX-512 load or store at the end of a row (the kernels' `avx512` modules).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as std::arch::x86_64::__mmask16
    }
}

/// Runs `task` with the best SIMD instructions of this CPU.
#[inline]
pub(crate) fn vectorized<K: Vectorized>(task: K) {
    pulp::Arch::new().dispatch(Dispatch(task))
}

/// An output pointer shared by parallel tasks that each write their own disjoint part of it (a
/// convolution's tiles, a gemm's blocks, attention's row blocks). Creating one is safe; every write
/// through it is the caller's `unsafe` promise that the parts do not overlap.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only dereferenced by tasks writing disjoint regions (see each user).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// The elements of a contiguous operand of a custom op; `what` names it in the error.
pub(crate) fn contiguous<'a, T>(
    v: &'a [T],
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// `dst` (m x n, row stride `ldd`) = `dst` (when `accumulate`) + a x b, in f32 through gemm's
/// kernel, for a (m x k) and b (k x n) at any (row, column) strides. The slices are checked to hold
/// every element the strides reach.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &[f32],
    (brs, bcs): (usize, usize),
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        ldd >= n && dst.len() > reach(m, n, ldd, 1),
        "sgemm: dst too short"
    );
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(ldd).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    assert!(a.len() > reach(m, k, ars, acs), "sgemm: a too short");
    assert!(b.len() > reach(k, n, brs, bcs), "sgemm: b too short");
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices, and
    // `dst` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The gemm parallelism candle itself uses for its matmuls.
fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
