//! Winograd convolution (Lavin & Gray 2015, F(4x4, 3x3) and F(2x2, 3x3)) for the f32 3x3,
//! stride-1, padding-1 convolutions that carry most of the UNet's and the VAE decoder's arithmetic.
//!
//! Each output tile of m x m pixels is `A^T [(G g G^T) . (B^T d B)] A` for the (m + 2)^2 input
//! patch `d` and the 3x3 kernel `g`: the sum over input channels becomes one gemm per transformed
//! position, `M_p[co, tile] = U_p[co, ci] x V_p[ci, tile]`, with (m + 2)^2 / (m^2 * 9) of the
//! direct convolution's multiplications: 4x fewer for F(4x4, 3x3), 2.25x for F(2x2, 3x3). The
//! transforms are additions of whole rows (vectorised at run time through pulp: AVX-512, AVX2 or
//! scalar), so their cost is small beside the gemms once a layer has enough tiles; small layers stay
//! on the im2col kernel (`choose`).
//!
//! F(2x2)'s input and output transforms are also written out as the sums and differences its
//! matrices amount to (rows split once into even and odd columns), with the same sums in the same
//! order as the table-driven path, so the same values (tested bit for bit): on rows of 16-32 tiles
//! the table-driven passes cost more than their arithmetic. Per call on a 2-vCPU Zen 4, 2 threads:
//! 320 channels at 64x64 (batch 2) 50.8 -> 46.1 ms, 640 at 32x32 46.5 -> 42.9 ms.
//!
//! Memory stays bounded whatever the image size (`Budget`): the tiles are taken in bands of tile
//! rows whose transformed input and output fit a budget, and the transformed weights are made for a
//! block of output channels at a time (no per-layer copy kept at load: it would be 1.8-4x the
//! weights). A layer that fits one band has its input transformed once for all its blocks (the
//! UNet's 16x16 and 8x8 levels); otherwise each block transforms the bands again, which costs
//! little where there are few blocks (the 64x64 and 32x32 levels).
//!
//! F(2x2)'s weight transform is written out too (`WeightTask::run_f2`): a kernel value or a halved
//! sum of three per position, made from 64 input channels at a time in L1. With the input
//! transformed once per layer, F(2x2) now beats im2col at 16x16 (`MIN_TILES_F2`): per call on
//! the 2-vCPU Zen 4, 1280 channels at 16x16, batch 2: weights 17 -> 9 ms, the call 64 -> 47 ms,
//! against im2col's 72-78 ms.
//!
//! F(4x4)'s input and output transforms are written out the same way (`InputTask::run_f4`:
//! input rows split once into the four column phases; `bt4_row` and `at_row`: the table's
//! products and sums in its order, tested bit for bit against it). 320 channels at 64x64, batch
//! 2: input 12 -> 6 ms, output 8 -> 5 ms, the call 42-51 -> 32-33 ms (Zen 4). So is its weight
//! transform (`WeightTask::run_f4`, as F(2x2)'s), which gains less: at 1280 channels and 16x16
//! it writes 36 x 1280 x 1280 f32 (236 MB) a call and is bound by that, 14 -> 12.5 ms of a 38 ms
//! call; which is also why F(4x4) only draws with bf16 im2col there.
//!
//! Precision: the transforms add and subtract values up to 8x (F(4x4)) larger than the result, so
//! F(4x4, 3x3) loses about three more bits than the direct sum. The `tests` below measure it against
//! an f64 direct convolution; the README's "Which precision on which CPU" and BENCHMARKS.md give
//! the figures on the full-size models and the parity suite.
//!
//! bf16 (`--dtype bf16`): F(4x4) runs in f32 on the widened bf16 input and weights, with the bias
//! and residual added and one rounding per output (`conv_bf16`: the same bits as the f32 kernel on
//! those values, rounded). Its 4x fewer products in f32 beat the im2col kernel's bf16 products,
//! which run at twice the f32 rate: on the VAE decoder's layers by 6-17 % with the table-driven
//! transforms, and with the written-out ones on the UNet's too, from 32 tiles (`choose_bf16`;
//! from 16, the 16x16 level without guidance, where the fused path multiplies in bf16), where the
//! f32 UNet cannot use F(4x4) (its parity). The bf16 result is rounded once from f32
//! sums, so it is no further from f32 than the bf16 products'. F(2x2) in f32 gains nothing over
//! bf16 products (2.25x fewer at half the rate). Tried and not kept: the transformed weights and
//! input rounded to bf16 for the bf16 kernel, which was slower and less precise on Zen 5 (m18
//! 512x512, 2 threads): UNet step 3.66 s against 3.32 s with im2col, VAE decode 6.43 s against
//! 6.28 s (F(2x2) everywhere: 4.51 s and 8.29 s), and the image's mean deviation from fp32 1.13
//! levels against 0.47.
//!
//! That was every level at once: the UNet's 16x16 level (the fused path's) now multiplies in bf16
//! on CPUs with AVX512-BF16, where its share of the error is small enough (see `fused`).
//!
//! F(4x4)'s input rows are split into their column phases 16 values at a time with AVX-512
//! (`split_phases_avx512`: one permutation, four stores of four) where a value at a time was
//! about 2 % of a bf16 UNet step; `winograd_speed` (Zen 4, 2 threads, bf16, min of 6 alternating
//! runs): 320 channels at 64x64 30.5 -> 28.4 ms, 640 at 32x32 31.1 -> 30.4 ms. The output
//! transform's phase merge and rounding written the same way gained nothing measurable (320 at
//! 64x64: 29.7 / 30.3 ms, min of 10) and were left scalar. The pass down the columns then takes
//! each row's four phases as one row (they lie side by side): `input_transform_speed` (min of
//! 30, three alternating runs) 64x64 2.77-3.02 -> 2.17-2.36 ms, 32x32 1.65-1.67 -> 1.22-1.31,
//! 16x16 1.48-1.51 -> 1.07-1.09.
//!
//! bf16 layers with few tiles done in one band (the UNet's 16x16 level: 32 tiles with guidance)
//! take `fused` where the CPU has AVX-512F: the weights of 16 output channels and 64 input
//! channels are transformed in L2 and multiplied at once, instead of 5.9 MB blocks of transformed
//! weights written, read back and the input repacked by gemm for each block (the weight transform
//! took as long as the products there). `winograd_speed` (Zen 4, 2 threads, batch 2, ms): 1280
//! channels at 16x16 33-35 -> 31-33, 2560 -> 1280 69-73 -> 61; batch 1 25-26 -> 20. Paired runs
//! of m18 bf16 (3 DDIM steps): UNet step min 5.14 / 4.51 / 4.40 -> 4.42 / 4.27 / 4.33 s.
//! F(2x2) in f32 takes it too for up to 64 tiles, which brings the f32 UNet's 8x8 level (32
//! tiles with guidance) from im2col to F(2x2): 1280 channels, batch 2, 18.3-20.7 -> 15.9-16.9 ms
//! a call; at 16x16 without guidance (64 tiles) 27.6-42.1 -> 24.0-27.9 ms. That is about 0.7 %
//! of an m9 fp32 step, below this VM's run-to-run spread (paired runs, 3 DDIM steps, min: 8.21 /
//! 7.43 / 7.35 / 7.46 s before, 7.33 / 7.42 / 7.42 / 7.34 s after).

use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::conv2d::Geometry;
use super::convert::Value;
use super::{vectorized, SendPtr, Vectorized};

#[cfg(target_arch = "x86_64")]
mod fused;

/// One Winograd variant: output tile `m` x `m`, input tile `a` = m + 2, and its matrices (row-major
/// `B^T` a x a, `G` a x 3, `A^T` m x a).
#[derive(Debug)]
pub(crate) struct Tiling {
    pub m: usize,
    a: usize,
    bt: &'static [f32],
    g: &'static [f32],
    at: &'static [f32],
    pub name: &'static str,
    /// F(2x2)'s input and output transforms as written-out sums and differences (`InputTask::run_f2`
    /// and the `m == 2` rows of `OutputTask`) instead of the table-driven general path, which the
    /// tests keep for comparison (the same values).
    written_out: bool,
}

/// F(2x2, 3x3), points 0, 1, -1 and infinity.
pub(crate) const F2: Tiling = Tiling {
    m: 2,
    a: 4,
    #[rustfmt::skip]
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
    name: "F(2x2,3x3)",
    written_out: true,
};

/// F(4x4, 3x3), points 0, 1, -1, 2, -2 and infinity.
pub(crate) const F4: Tiling = Tiling {
    m: 4,
    a: 6,
    #[rustfmt::skip]
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
    name: "F(4x4,3x3)",
    written_out: true,
};

/// The largest Winograd tile a layer allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Largest {
    /// F(2x2, 3x3): its error is that of the direct sum (the parity suite's worst case moves from
    /// 0.483 to 0.487 of the tolerance); for layers whose output feeds back into the sampler.
    F2,
    /// F(4x4, 3x3): about three more bits lost (the parity suite's worst latents reach 1.17x the
    /// tolerance when the UNet uses it); for the VAE decoder, whose output is the image.
    F4,
}

/// Which 3x3 kernel runs: `ALTDIFF_CONV3X3=auto|im2col|f2|f4` (read once; a diagnostic for
/// measuring precision and speed, `auto` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By layer size (see `choose`).
    Auto,
    /// Always the im2col kernel.
    Im2col,
    /// F(2x2, 3x3) for every eligible layer.
    F2,
    /// F(4x4, 3x3) for every eligible layer.
    F4,
}

impl Mode {
    /// Parses the variable's value (`None` for an unknown one).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Self::Auto),
            "im2col" | "direct" => Some(Self::Im2col),
            "f2" => Some(Self::F2),
            "f4" => Some(Self::F4),
            _ => None,
        }
    }

    /// The process's mode (an unknown value falls back to `auto` with a warning).
    pub fn get() -> Self {
        static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("ALTDIFF_CONV3X3") {
            Err(_) => Self::Auto,
            Ok(v) => Self::parse(&v).unwrap_or_else(|| {
                tracing::warn!("ALTDIFF_CONV3X3={v:?} is not auto, im2col, f2 or f4: using auto");
                Self::Auto
            }),
        })
    }
}

/// Tiles of `m` x `m` output pixels in the whole batch.
fn tiles(g: &Geometry, m: usize) -> usize {
    g.b * g.h.div_ceil(m) * g.w.div_ceil(m)
}

/// The Winograd variant for this convolution, or `None` for the im2col kernel: only 3x3,
/// stride 1, padding 1, dilation 1; in `auto`, F(4x4) when the layer allows it and the batch has at
/// least `MIN_TILES_F4` 4x4 tiles, else F(2x2) when it has `MIN_TILES_F2` 2x2 tiles. Fewer tiles do
/// not pay for transforming the weights on every call: the weight transform's cost per pair of
/// channels is fixed, the products it saves grow with the tiles (`winograd_speed`, 2-vCPU Zen 4,
/// ms, im2col / F(2x2)): 1280 channels at 16x16, batch 2 (128 tiles) 72 / 47, batch 1 (64 tiles)
/// 38 / 28; at 8x8, batch 2 (32 tiles) 19-21 / 19-23, a draw, so im2col, unless the fused path
/// runs it (`min_tiles_f2`: 18.3-20.7 / 15.9-16.9).
pub(crate) fn choose(g: &Geometry, mode: Mode) -> Option<&'static Tiling> {
    let eligible = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding == 1 && g.dilation == 1;
    if !eligible || g.b * g.h * g.w == 0 || g.ci == 0 || g.co == 0 {
        return None;
    }
    match mode {
        Mode::Im2col => None,
        Mode::F2 => Some(&F2),
        Mode::F4 => Some(&F4),
        Mode::Auto if g.winograd == Largest::F4 && tiles(g, 4) >= MIN_TILES_F4 => Some(&F4),
        Mode::Auto if tiles(g, 2) >= min_tiles_f2() => Some(&F2),
        Mode::Auto => None,
    }
}

/// The fewest 4x4 tiles for which `auto` picks F(4x4) (its weights are 4x the kernel's: at 64
/// tiles it is slower than im2col).
pub(crate) const MIN_TILES_F4: usize = 256;
/// The fewest 2x2 tiles for which `auto` picks F(2x2).
pub(crate) const MIN_TILES_F2: usize = 64;
/// The same where the fused path runs F(2x2)'s smallest layers (AVX-512F).
pub(crate) const MIN_TILES_F2_FUSED: usize = 32;

/// The fewest 2x2 tiles for which `auto` picks F(2x2) on this CPU.
pub(crate) fn min_tiles_f2() -> usize {
    #[cfg(target_arch = "x86_64")]
    if fused::available() {
        return MIN_TILES_F2_FUSED;
    }
    MIN_TILES_F2
}

/// `dst += c * src`, elementwise (vectorised by the caller's pulp dispatch).
#[inline(always)]
fn axpy(dst: &mut [f32], src: &[f32], c: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += c * s;
    }
}

/// `dst[i] = f(a[i], b[i])` (vectorised by the caller's pulp dispatch).
#[inline(always)]
fn zip_with(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for (d, (&a, &b)) in dst.iter_mut().zip(a.iter().zip(b)) {
        *d = f(a, b);
    }
}

/// `dst[i] = f(a[i], b[i], c[i])` (vectorised by the caller's pulp dispatch).
#[inline(always)]
fn zip3_with(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for (d, ((&a, &b), &c)) in dst.iter_mut().zip(a.iter().zip(b).zip(c)) {
        *d = f(a, b, c);
    }
}

/// `dst[i] = f(a[i], b[i], c[i], d[i])` (vectorised by the caller's pulp dispatch).
#[inline(always)]
fn zip4_with(dst: &mut [f32], [a, b, c, d]: [&[f32]; 4], f: impl Fn(f32, f32, f32, f32) -> f32) {
    for (o, (((&a, &b), &c), &d)) in dst.iter_mut().zip(a.iter().zip(b).zip(c).zip(d)) {
        *o = f(a, b, c, d);
    }
}

/// `dst[i] = f(a[i], b[i], c[i], d[i], e[i])` (vectorised by the caller's pulp dispatch).
#[inline(always)]
fn zip5_with(
    dst: &mut [f32],
    [a, b, c, d, e]: [&[f32]; 5],
    f: impl Fn(f32, f32, f32, f32, f32) -> f32,
) {
    let rows = a.iter().zip(b).zip(c).zip(d).zip(e);
    for (o, ((((&a, &b), &c), &d), &e)) in dst.iter_mut().zip(rows) {
        *o = f(a, b, c, d, e);
    }
}

/// Row `r` of F(4x4)'s `B^T` applied to the six rows `x`, into `dst`: the table's products and
/// sums in the table's order (its zero coefficients left out), so the general path's values.
#[inline(always)]
fn bt4_row(r: usize, x: [&[f32]; 6], dst: &mut [f32]) {
    let [x0, x1, x2, x3, x4, x5] = x;
    match r {
        0 => zip3_with(dst, x0, x2, x4, |a, b, c| 4.0 * a - 5.0 * b + c),
        1 => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            -4.0 * a - 4.0 * b + c + d
        }),
        2 => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            4.0 * a - 4.0 * b - c + d
        }),
        3 => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            -2.0 * a - b + 2.0 * c + d
        }),
        4 => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            2.0 * a - b - 2.0 * c + d
        }),
        _ => zip3_with(dst, x1, x3, x5, |a, b, c| 4.0 * a - 5.0 * b + c),
    }
}

/// Row `r` of `A^T` (F(2x2): 2 x 4, F(4x4): 4 x 6) applied to the rows `x` (one per transformed
/// position; F(2x2) reads the first four), into `dst`: the table's products and sums in the
/// table's order, so the general path's values.
#[inline(always)]
fn at_row(m: usize, r: usize, x: [&[f32]; 6], dst: &mut [f32]) {
    let [x0, x1, x2, x3, x4, x5] = x;
    match (m, r) {
        (2, 0) => zip3_with(dst, x0, x1, x2, |a, b, c| a + b + c),
        (2, _) => zip3_with(dst, x1, x2, x3, |a, b, c| a - b - c),
        (_, 0) => zip5_with(dst, [x0, x1, x2, x3, x4], |a, b, c, d, e| a + b + c + d + e),
        (_, 1) => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            a - b + 2.0 * c - 2.0 * d
        }),
        (_, 2) => zip4_with(dst, [x1, x2, x3, x4], |a, b, c, d| {
            a + b + 4.0 * c + 4.0 * d
        }),
        _ => zip5_with(dst, [x1, x2, x3, x4, x5], |a, b, c, d, e| {
            a - b + 8.0 * c - 8.0 * d + e
        }),
    }
}

/// The shapes shared by the transforms of one convolution.
#[derive(Clone, Copy)]
struct Plan<'a> {
    t: &'a Tiling,
    g: &'a Geometry,
    /// Tiles per tile row, tile rows per image.
    ntx: usize,
    nty: usize,
}

impl<'a> Plan<'a> {
    fn new(t: &'a Tiling, g: &'a Geometry) -> Self {
        Self {
            t,
            g,
            ntx: g.w.div_ceil(t.m),
            nty: g.h.div_ceil(t.m),
        }
    }

    /// Whether the layer is done in one band under `budget` and takes the fused path there (on
    /// CPUs with AVX-512F): the one rule that both [`run_within`] and bf16's `auto` choice
    /// ([`choose_bf16_for`]) follow.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn fuses(&self, budget: &Budget) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let rows_total = self.g.b * self.nty;
            budget.cut(self).band_rows >= rows_total && fused::applies(self, rows_total * self.ntx)
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// The bf16 variant for this convolution (`--dtype bf16`), or `None` for the bf16 im2col kernel.
/// In `auto`: F(4x4) in f32 on the widened values (never F(2x2): see the module documentation)
/// from `MIN_TILES_BF16_F4` 4x4 tiles, in the UNet too, where the bf16 products run at most twice
/// the f32 rate (AVX512-BF16, or the portable kernel's f32 products); F(4x4)'s 4x fewer products
/// then win (the bf16 result is rounded once from f32 sums, so its precision is the bf16 kernel's).
/// With AMX, whose bf16 products run several times the f32 rate, only the VAE's large layers, as
/// before (not measured: no AMX machine yet).
pub(crate) fn choose_bf16(g: &Geometry, mode: Mode) -> Option<&'static Tiling> {
    static KERNEL: std::sync::OnceLock<super::gemm_bf16::Bf16Kernel> = std::sync::OnceLock::new();
    let kernel = *KERNEL.get_or_init(super::gemm_bf16::Bf16Kernel::detect);
    choose_bf16_for(g, mode, kernel, fused_bf16_products())
}

/// [`choose_bf16`] for this bf16 kernel; `paired`: whether the fused path multiplies bf16 layers
/// in bf16 (then F(4x4) from [`MIN_TILES_BF16_F4_PAIRED`] tiles for a layer that takes it).
fn choose_bf16_for(
    g: &Geometry,
    mode: Mode,
    kernel: super::gemm_bf16::Bf16Kernel,
    paired: bool,
) -> Option<&'static Tiling> {
    use super::gemm_bf16::Bf16Kernel;
    match mode {
        Mode::Auto if kernel == Bf16Kernel::Amx => choose(g, mode).filter(|t| t.m == 4),
        Mode::Auto => choose(g, Mode::F4).filter(|t| {
            let n = tiles(g, 4);
            n >= MIN_TILES_BF16_F4
                || (paired
                    && n >= MIN_TILES_BF16_F4_PAIRED
                    && Plan::new(t, g).fuses(budget::<bf16>()))
        }),
        _ => choose(g, mode),
    }
}

/// The fewest 4x4 tiles for which bf16's `auto` picks F(4x4) in f32 over the bf16 im2col kernel.
/// `winograd_speed`, 2-vCPU Zen 4, ms, bf16 im2col / F(4x4) in f32 (the fused path up to 32
/// tiles), two runs: 320 channels at 64x64, batch 2 (512 tiles) 38.9-39.7 / 30.7-31.2; 640 at
/// 32x32 (128) 38.0-38.3 / 32.0-32.9; 1280 at 16x16 (32) 38.3-39.1 / 30.7-32.1; 2560 -> 1280 at
/// 16x16 (32) 82.5-82.8 / 64.1-65.7; 1280 at 16x16, batch 1 (16) 20.4-23.5 / 20.1-20.2, a draw,
/// so not there. (Until 2026-12-07 the benchmark's "im2col" bf16 column ran `auto`, that is
/// F(4x4) from 32 tiles, so the figures first given here compared F(4x4) with itself there; the
/// 4 % the switch gained in whole runs of the bf16 UNet was measured on its own.)
pub(crate) const MIN_TILES_BF16_F4: usize = 32;

/// [`MIN_TILES_BF16_F4`] for a layer that takes the fused path ([`Plan::fuses`]) where its
/// products are bf16 (`vdpbf16ps`): the UNet's 16x16 level without guidance (batch 1, 16 tiles)
/// then takes F(4x4) too. `winograd_speed`,
/// 2-vCPU Zen 4, 2026-12-07: 1280 channels at 16x16, batch 1, bf16 im2col 20.6 ms, F(4x4) with
/// bf16 products 15.1 ms. Below 16 tiles (the 8x8 level) the transforms' share grows; not
/// measured there, so not taken.
pub(crate) const MIN_TILES_BF16_F4_PAIRED: usize = 16;

/// Where the output transform puts each output row.
#[derive(Clone, Copy)]
enum Sink<'a> {
    /// Added into an f32 output that already holds the starting values.
    Add(SendPtr<f32>),
    /// Written once into a bf16 output: `bias[co] + residual + conv`, rounded.
    Bf16 {
        out: SendPtr<MaybeUninit<bf16>>,
        bias: Option<&'a [f32]>,
        residual: Option<&'a [bf16]>,
    },
}

/// `out += conv3x3(x, w)` with padding 1 (NCHW `x`, [co, ci, 3, 3] `w`, NCHW `out` already holding
/// the bias and residual, or zeros); layers with few tiles through the fused path where the CPU
/// has it.
pub(crate) fn accumulate(t: &Tiling, x: &[f32], w: &[f32], out: &mut [f32], g: &Geometry) {
    assert_eq!(out.len(), g.b * g.co * g.h * g.w, "winograd: output size");
    run(
        t,
        x,
        w,
        Sink::Add(SendPtr(out.as_mut_ptr())),
        g,
        Fusion::Best,
    );
}

/// `bias + residual + conv3x3(x, w)` for bf16 `x`, `w` and `residual`: the transforms, products and
/// sums in f32 on the widened values (as f32 Winograd; but for the fused path's bf16 products,
/// see `fused`), each output rounded once to bf16. With
/// `fuse` ([`Fusion::Best`] but in the tests that compare them), layers with few tiles take the
/// fused path (`fused`) where the CPU has it.
pub(crate) fn conv_bf16(
    t: &Tiling,
    x: &[bf16],
    w: &[bf16],
    bias: Option<&[f32]>,
    residual: Option<&[bf16]>,
    g: &Geometry,
    fuse: Fusion,
) -> Vec<bf16> {
    let len = g.b * g.co * g.h * g.w;
    if let Some(r) = residual {
        assert_eq!(r.len(), len, "winograd: residual size");
    }
    let fill = |out: &mut [MaybeUninit<bf16>]| {
        let out = SendPtr(out.as_mut_ptr());
        run(
            t,
            x,
            w,
            Sink::Bf16 {
                out,
                bias,
                residual,
            },
            g,
            fuse,
        );
    };
    // SAFETY: the output transform writes every (image, channel, row) of the output once: each
    // output channel's task covers all of its rows, band after band, and all of each row.
    unsafe { super::convert::filled(len, fill) }
}

/// Whether a layer with few tiles done in one band takes the fused path (`fused`, where the CPU
/// has AVX-512F), and how it multiplies there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fusion {
    /// Never: the blocked path (the tests' reference).
    Off,
    /// With f32 products, bf16 layers too (their values widened): the tests' comparison.
    #[cfg_attr(not(test), allow(dead_code))]
    F32,
    /// With bf16 products for bf16 layers where the CPU has AVX512-BF16 (see `fused`), else f32.
    Best,
}

/// The most tiles for which F(4x4) and F(2x2) layers done in one band take the fused path, if this
/// CPU has it (AVX-512F).
pub(crate) fn fused_tiles() -> Option<(usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    if fused::available() {
        return Some((fused::MAX_TILES, fused::MAX_TILES_F2));
    }
    None
}

/// Whether bf16 layers on the fused path multiply in bf16 on this CPU (AVX512-BF16).
pub(crate) fn fused_bf16_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    if fused::bf16_available() {
        return true;
    }
    false
}

/// The convolution into `sink`; `x` and `w` are widened to f32 as they are read. As `fuse` says, a
/// layer done in one band with few tiles takes the fused path where the CPU has it (`fused`).
fn run<X: Value>(t: &Tiling, x: &[X], w: &[X], sink: Sink, g: &Geometry, fuse: Fusion) {
    run_within(t, x, w, sink, g, budget::<X>(), fuse)
}

/// How much transformed data one convolution may hold (floats), which sets its blocks of output
/// channels and its bands of tile rows.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// Transformed weights per block of output channels.
    weights: usize,
    /// Transformed input and output per band of tile rows.
    band: usize,
    /// A layer whose transformed input and output fit `one_band` with blocks of `one_band_weights`
    /// is done in one band: its input transformed once for all its blocks, which are small enough
    /// to stay in cache from their transform to their products. The UNet's 2560 -> 1280 channel
    /// layers at 16x16 (batch 2) otherwise take two bands and seven blocks: 132-135 ms per call
    /// against 91-124 ms in one band (Zen 4, `winograd_speed`).
    one_band_weights: usize,
    one_band: usize,
}

/// 32 MiB of weights per block, 16 MiB per band; 8 MiB blocks in bands of up to 24 MiB.
const BUDGET: Budget = Budget {
    weights: 1 << 23,
    band: 1 << 22,
    one_band_weights: 1 << 21,
    one_band: 6 << 20,
};

/// bf16 layers' budget: 48 MiB of weights per block, 40 MiB per band (the one-band rule as
/// [`BUDGET`]'s). With [`BUDGET`] the UNet's widest layers took many blocks and bands, each block
/// transforming every band's input again: 1920 -> 640 channels at 32x32 (batch 2) 6 blocks x 3
/// bands, and F(4x4) no faster than the bf16 im2col kernel (118.8 against 116.4 ms, where 1280 ->
/// 640 in one band takes 57.0); 960 -> 320 at 64x64 2 blocks x 5 bands (100.3 ms, where 640 ->
/// 320 takes 54.8). bf16 runs have the memory to spare (peak RSS about 0.26x of PyTorch fp32's
/// against a 0.3x target), f32 runs not (0.49-0.50x against 0.5x), so f32 keeps [`BUDGET`].
/// `winograd_speed` (Zen 4, 2 threads, bf16, ms): 1920 -> 640 at 32x32 118.8 -> 81.4, 960 -> 320
/// at 64x64 100.3 -> 87.1; the other layers' cuts hardly change. Peak RSS of an m18 bf16 run
/// 1.84 -> 1.87 GiB; its UNet step min, seven alternating pairs, 3.99 s on average either way (the
/// VM's noise is larger than the 50 ms a step these two layers gain).
const BUDGET_BF16: Budget = Budget {
    weights: 12 << 20,
    band: 10 << 20,
    ..BUDGET
};

/// The budget for convolutions of `X` values.
fn budget<X: Value>() -> &'static Budget {
    if X::BF16 {
        &BUDGET_BF16
    } else {
        &BUDGET
    }
}

/// A convolution's output channels per block of transformed weights (a multiple of 16, gemm's row
/// blocking) and tile rows per band.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cut {
    cob: usize,
    band_rows: usize,
}

impl Budget {
    fn cut(&self, plan: &Plan) -> Cut {
        let g = plan.g;
        let a2 = plan.t.a * plan.t.a;
        let rows_total = g.b * plan.nty;
        let cob = |floats: usize| {
            ((floats / (a2 * g.ci)) / 16 * 16)
                .clamp(16, g.co.next_multiple_of(16))
                .min(g.co)
        };
        let small = cob(self.one_band_weights);
        if a2 * plan.ntx * rows_total * (g.ci + small) <= self.one_band {
            return Cut {
                cob: small,
                band_rows: rows_total,
            };
        }
        let cob = cob(self.weights);
        let band_rows = (self.band / (a2 * plan.ntx * (g.ci + cob))).clamp(1, rows_total);
        Cut { cob, band_rows }
    }
}

fn run_within<X: Value>(
    t: &Tiling,
    x: &[X],
    w: &[X],
    sink: Sink,
    g: &Geometry,
    budget: &Budget,
    fuse: Fusion,
) {
    assert_eq!(x.len(), g.b * g.ci * g.h * g.w, "winograd: input size");
    assert_eq!(w.len(), g.co * g.ci * 9, "winograd: weight size");
    let a = t.a;
    let plan = Plan::new(t, g);
    let rows_total = g.b * plan.nty;
    let Cut { cob, band_rows } = budget.cut(&plan);
    let bands: Vec<_> = (0..rows_total)
        .step_by(band_rows)
        .map(|r0| r0..(r0 + band_rows).min(rows_total))
        .collect();
    let mut buffers = Scratch::take();
    let [v, mv, u] = &mut buffers.0;
    // One band: its input is transformed once, before the first block.
    let once = bands.len() == 1;
    if once {
        transform_input(plan, x, &bands[0], v);
        #[cfg(target_arch = "x86_64")]
        if fuse != Fusion::Off && plan.fuses(budget) {
            let bf16 = fuse == Fusion::Best && X::BF16 && fused::bf16_available();
            fused::run(plan, w, v, &bands[0], sink, bf16);
            buffers.give_back();
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fuse;
    for co0 in (0..g.co).step_by(cob) {
        let nco = cob.min(g.co - co0);
        // U[p][col][ci]: every element is written.
        let u = grow(u, a * a * nco * g.ci);
        let up = SendPtr(u.as_mut_ptr());
        (0..nco)
            .into_par_iter()
            .for_each_init(Vec::new, |scratch, col| {
                vectorized(WeightTask {
                    plan,
                    w,
                    co: co0 + col,
                    col,
                    nco,
                    u: up,
                    scratch,
                })
            });
        for rows in &bands {
            if !once {
                transform_input(plan, x, rows, v);
            }
            let nt = rows.len() * plan.ntx;
            let mv = grow(mv, a * a * nco * nt);
            let (u, v) = (&*u, &v[..a * a * g.ci * nt]);
            // M_p = U_p (nco x ci) x V_p (ci x nt), one position per task.
            mv.par_chunks_mut(nco * nt)
                .enumerate()
                .for_each(|(p, m_p)| {
                    let u_p = &u[p * nco * g.ci..][..nco * g.ci];
                    let v_p = &v[p * g.ci * nt..][..g.ci * nt];
                    let none = gemm::Parallelism::None;
                    super::sgemm(
                        (nco, nt, g.ci),
                        m_p,
                        nt,
                        false,
                        u_p,
                        (g.ci, 1),
                        v_p,
                        (nt, 1),
                        none,
                    );
                });
            let mv = &*mv;
            (0..nco)
                .into_par_iter()
                .for_each_init(Vec::new, |scratch, col| {
                    vectorized(OutputTask {
                        band: Band::new(plan, rows, scratch),
                        mv,
                        co: co0 + col,
                        col,
                        nco,
                        sink,
                    })
                });
        }
    }
    buffers.give_back();
}

/// V[p][ci][tile] for a band's tile rows, into `v` (grown to fit; every element is written).
fn transform_input<X: Value>(plan: Plan, x: &[X], rows: &std::ops::Range<usize>, v: &mut Vec<f32>) {
    let g = plan.g;
    let nt = rows.len() * plan.ntx;
    let v = grow(v, plan.t.a * plan.t.a * g.ci * nt);
    let vp = SendPtr(v.as_mut_ptr());
    (0..g.ci)
        .into_par_iter()
        .for_each_init(Vec::new, |scratch, ci| {
            vectorized(InputTask {
                band: Band::new(plan, rows, scratch),
                x,
                ci,
                v: vp,
            })
        });
}

/// `buf`'s first `n` elements, growing it (with zeros) when it is shorter: the callers write every
/// element they read, so old values are never seen, and a grown buffer is emptied first so that
/// they are not copied either (that copy was 10 % of the single-threaded time in a bf16 m18
/// step's profile, the other thread idle meanwhile).
fn grow(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.clear();
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The transformed input, output and weights, kept between convolutions: fresh buffers of this size
/// for every layer cost page faults and TLB flushes that took as long as the transforms themselves.
/// They are bounded by [`BUDGET`] (80 MiB in all at most; [`BUDGET_BF16`] 88 MiB) and freed by
/// [`release_scratch`].
struct Scratch([Vec<f32>; 3]);

static POOL: std::sync::Mutex<Option<Scratch>> = std::sync::Mutex::new(None);

impl Scratch {
    fn take() -> Self {
        let pooled = POOL.lock().ok().and_then(|mut p| p.take());
        pooled.unwrap_or(Scratch([Vec::new(), Vec::new(), Vec::new()]))
    }
}

impl Scratch {
    fn give_back(self) {
        if let Ok(mut p) = POOL.lock() {
            *p = Some(self);
        }
    }
}

/// Frees the buffers kept between convolutions (when a model is unloaded).
pub fn release_scratch() {
    drop(POOL.lock().ok().and_then(|mut p| p.take()));
    #[cfg(target_arch = "x86_64")]
    fused::release_scratch();
}

/// A band's tile rows as one transform task sees them, with the task's scratch.
struct Band<'a> {
    plan: Plan<'a>,
    rows: std::ops::Range<usize>,
    /// Tiles in the band (its columns in V and M).
    nt: usize,
    scratch: &'a mut Vec<f32>,
    /// Whether the CPU has AVX-512F ([`split_phases`]), asked once per task.
    avx512: bool,
}

impl<'a> Band<'a> {
    fn new(plan: Plan<'a>, rows: &std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> Self {
        Self {
            plan,
            rows: rows.clone(),
            nt: rows.len() * plan.ntx,
            scratch,
            #[cfg(target_arch = "x86_64")]
            avx512: fused::available(),
            #[cfg(not(target_arch = "x86_64"))]
            avx512: false,
        }
    }
}

/// The input transform of channel `ci` for a band's tile rows into V[p][ci][..].
struct InputTask<'a, X> {
    band: Band<'a>,
    x: &'a [X],
    ci: usize,
    v: SendPtr<f32>,
}

impl<X: Value> Vectorized for InputTask<'_, X> {
    #[inline(always)]
    fn run(self) {
        match self.band.plan.t {
            t if t.written_out && t.m == 2 => return self.run_f2(),
            t if t.written_out => return self.run_f4(),
            _ => {}
        }
        let Plan { t, g, ntx, nty } = self.band.plan;
        let (rows, nt, scratch) = (self.band.rows, self.band.nt, self.band.scratch);
        let (m, a, ci) = (t.m, t.a, self.ci);
        // tmp: a rows over the padded input columns (-1 .. m*ntx + m - 1); ph: one tmp row split
        // by column phase mod m, so that each tile's k-th column is ph[k % m][tile + k / m]; wide:
        // an input row widened to f32 (bf16 input only).
        let tl = m * (ntx + 1);
        let pl = ntx + 1;
        scratch.clear();
        scratch.resize(a * tl + m * pl + g.w, 0.0);
        let (tmp, rest) = scratch.split_at_mut(a * tl);
        let (ph, wide) = rest.split_at_mut(m * pl);
        for (ri, r) in rows.enumerate() {
            let (b, ty) = (r / nty, r % nty);
            let plane = &self.x[(b * g.ci + ci) * g.h * g.w..][..g.h * g.w];
            tmp.fill(0.0);
            // B^T d down the columns: each input row of the tile row is added into the rows it feeds.
            for k in 0..a {
                let y = (ty * m + k) as isize - 1;
                if y < 0 || y >= g.h as isize {
                    continue;
                }
                let src = X::widen(&plane[y as usize * g.w..][..g.w], wide);
                for i in 0..a {
                    let c = t.bt[i * a + k];
                    if c != 0.0 {
                        axpy(&mut tmp[i * tl + 1..][..g.w], src, c);
                    }
                }
            }
            // (B^T d) B along the rows, for all tiles of the row at once.
            for i in 0..a {
                let row = &tmp[i * tl..][..tl];
                for q in 0..m {
                    for (s, d) in ph[q * pl..][..pl].iter_mut().enumerate() {
                        *d = row[s * m + q];
                    }
                }
                for j in 0..a {
                    // SAFETY: row ((i*a + j) * ci_total + ci) of V, tiles ri*ntx .. +ntx: this
                    // channel's task alone writes it, and it lies inside V (a*a*ci rows of nt).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.v.get().add(((i * a + j) * g.ci + ci) * nt + ri * ntx),
                            ntx,
                        )
                    };
                    dst.fill(0.0);
                    for k in 0..a {
                        let c = t.bt[j * a + k];
                        if c != 0.0 {
                            axpy(dst, &ph[(k % m) * pl + k / m..][..ntx], c);
                        }
                    }
                }
            }
        }
    }
}

impl<X: Value> InputTask<'_, X> {
    /// F(2x2, 3x3)'s input transform written out (`B^T` has only 0 and ±1): each tile row's four
    /// input rows are split once into even and odd padded columns, combined down the tile (`B^T d`)
    /// and then across it (`(B^T d) B`) as whole-row sums and differences. The general path's
    /// table-driven passes over rows of 16-32 tiles (a fill and up to three multiply-adds for each
    /// of the 16 outputs) took longer than the arithmetic. The same sums in the same order as the
    /// general path: the same values.
    #[inline(always)]
    fn run_f2(self) {
        let Plan { g, ntx, nty, .. } = self.band.plan;
        let (rows, nt, scratch) = (self.band.rows, self.band.nt, self.band.scratch);
        let ci = self.ci;
        // Padded column X = x + 1 (X = 0 and X > w are the zero padding); tile tx reads X = 2 tx
        // .. 2 tx + 3, i.e. even[tx], odd[tx], even[tx + 1], odd[tx + 1].
        let pl = ntx + 1;
        scratch.clear();
        scratch.resize(16 * pl + g.w, 0.0);
        let (parts, wide) = scratch.split_at_mut(16 * pl);
        let (rows4, comb) = parts.split_at_mut(8 * pl);
        let half = g.w / 2;
        for (ri, r) in rows.enumerate() {
            let (b, ty) = (r / nty, r % nty);
            let plane = &self.x[(b * g.ci + ci) * g.h * g.w..][..g.h * g.w];
            // rows4[2k] / rows4[2k + 1]: input row k of the tile row, even / odd padded columns.
            for k in 0..4 {
                let (even, odd) = rows4[2 * k * pl..(2 * k + 2) * pl].split_at_mut(pl);
                let y = (ty * 2 + k) as isize - 1;
                if y < 0 || y >= g.h as isize {
                    even.fill(0.0);
                    odd.fill(0.0);
                    continue;
                }
                let src = X::widen(&plane[y as usize * g.w..][..g.w], wide);
                // even[s] = x[2s - 1] (s >= 1), odd[s] = x[2s].
                even[0] = 0.0;
                for ((e, o), pair) in even[1..=half]
                    .iter_mut()
                    .zip(odd[..half].iter_mut())
                    .zip(src.chunks_exact(2))
                {
                    *o = pair[0];
                    *e = pair[1];
                }
                let mut next = half;
                if g.w % 2 == 1 {
                    odd[half] = src[g.w - 1];
                    next += 1;
                }
                even[half + 1..].fill(0.0);
                odd[next..].fill(0.0);
            }
            // comb[2i + h] = (B^T d)[i] for phase h: r0 - r2, r1 + r2, r2 - r1, r1 - r3.
            for h in 0..2 {
                let row = |k: usize| &rows4[(2 * k + h) * pl..][..pl];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let at = |i: usize| (2 * i + h) * pl;
                zip_with(&mut comb[at(0)..][..pl], r0, r2, |a, b| a - b);
                zip_with(&mut comb[at(1)..][..pl], r1, r2, |a, b| a + b);
                zip_with(&mut comb[at(2)..][..pl], r2, r1, |a, b| a - b);
                zip_with(&mut comb[at(3)..][..pl], r1, r3, |a, b| a - b);
            }
            for i in 0..4 {
                let e = &comb[2 * i * pl..][..pl];
                let o = &comb[(2 * i + 1) * pl..][..pl];
                // SAFETY: row ((i*4 + j) * ci_total + ci) of V, tiles ri*ntx .. +ntx: this
                // channel's task alone writes it, and it lies inside V (16*ci rows of nt).
                let dst = |j: usize| unsafe {
                    std::slice::from_raw_parts_mut(
                        self.v.get().add(((i * 4 + j) * g.ci + ci) * nt + ri * ntx),
                        ntx,
                    )
                };
                let (e0, e1, o0, o1) = (&e[..ntx], &e[1..], &o[..ntx], &o[1..]);
                zip_with(dst(0), e0, e1, |a, b| a - b);
                zip_with(dst(1), o0, e1, |a, b| a + b);
                zip_with(dst(2), e1, o0, |a, b| a - b);
                zip_with(dst(3), o0, o1, |a, b| a - b);
            }
        }
    }
}

impl<X: Value> InputTask<'_, X> {
    /// F(4x4, 3x3)'s input transform written out: each tile row's six input rows are split once
    /// into the four column phases (padded column 4 s + q in phase q at s), combined down the tile
    /// (`B^T d`, [`bt4_row`]) phase by phase and then across it (`(B^T d) B`): a tile's six
    /// columns are phases 0-3 at its index and phases 0-1 one further. The general path made each
    /// of the 36 outputs with a fill and up to four multiply-adds over rows of 16-32 tiles. The
    /// same products and sums in the same order: the same values.
    #[inline(always)]
    fn run_f4(self) {
        let Plan { g, ntx, nty, .. } = self.band.plan;
        let (rows, nt, scratch) = (self.band.rows, self.band.nt, self.band.scratch);
        let (ci, avx512) = (self.ci, self.band.avx512);
        let pl = ntx + 1;
        scratch.clear();
        scratch.resize(48 * pl + g.w, 0.0);
        // inp[(k * 4 + q) * pl + s]: input row k, padded column 4 s + q; comb: (B^T d) likewise.
        let (inp, rest) = scratch.split_at_mut(24 * pl);
        let (comb, wide) = rest.split_at_mut(24 * pl);
        for (ri, r) in rows.enumerate() {
            let (b, ty) = (r / nty, r % nty);
            let plane = &self.x[(b * g.ci + ci) * g.h * g.w..][..g.h * g.w];
            for k in 0..6 {
                let phases = &mut inp[k * 4 * pl..][..4 * pl];
                phases.fill(0.0);
                let y = (ty * 4 + k) as isize - 1;
                if y < 0 || y >= g.h as isize {
                    continue;
                }
                split_phases(&plane[y as usize * g.w..][..g.w], phases, pl, avx512, wide);
            }
            // Down the columns, all four phases of a row at once (they lie side by side): rows of
            // 4 (ntx + 1) values, where rows of ntx + 1 (5 and 9 at 16x16 and 32x32) were
            // shorter than a register.
            let x = std::array::from_fn(|k| &inp[k * 4 * pl..][..4 * pl]);
            for i in 0..6 {
                bt4_row(i, x, &mut comb[i * 4 * pl..][..4 * pl]);
            }
            for i in 0..6 {
                let ph = |q: usize, shift: usize| &comb[(i * 4 + q) * pl + shift..][..ntx];
                let x = [ph(0, 0), ph(1, 0), ph(2, 0), ph(3, 0), ph(0, 1), ph(1, 1)];
                for j in 0..6 {
                    // SAFETY: row ((i*6 + j) * ci_total + ci) of V, tiles ri*ntx .. +ntx: this
                    // channel's task alone writes it, and it lies inside V (36*ci rows of nt).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.v.get().add(((i * 6 + j) * g.ci + ci) * nt + ri * ntx),
                            ntx,
                        )
                    };
                    bt4_row(j, x, dst);
                }
            }
        }
    }
}

/// Input row `src` split into the four column phases of its padded columns (F(4x4)'s input
/// transform): `phases[q * pl + s]` = padded column 4 s + q, where padded column x + 1 is
/// `src[x]` (the other places are left as they are: the zero padding). `avx512`: the task's
/// [`Band::avx512`].
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn split_phases<X: Value>(
    src: &[X],
    phases: &mut [f32],
    pl: usize,
    avx512: bool,
    wide: &mut [f32],
) {
    assert!(
        phases.len() >= 4 * pl && pl > src.len() / 4,
        "winograd: phase rows"
    );
    #[cfg(target_arch = "x86_64")]
    let done = if avx512 {
        // SAFETY: AVX-512F; the phase rows hold the columns of `src` (asserted above).
        unsafe { split_phases_avx512(src, phases, pl) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let src = X::widen(&src[done..], wide);
    for (x, &v) in src.iter().enumerate() {
        let col = done + x + 1;
        phases[(col % 4) * pl + col / 4] = v;
    }
}

/// [`split_phases`] for `src`'s whole groups of 16 values (their number times 16 is returned):
/// each group read (and, for bf16, widened) in one register, its four phases gathered into its
/// four quarters by one permutation and stored as four runs of four. The scalar loop stored each
/// value at a computed place; on the UNet's bf16 layers it was about 2 % of a step (Zen 4).
///
/// # Safety
/// The CPU has AVX-512F; `phases` holds four rows of `pl` > `src.len() / 4` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_phases_avx512<X: Value>(src: &[X], phases: &mut [f32], pl: usize) -> usize {
    use std::arch::x86_64::*;
    // Value u of a group (padded column 16 t + u + 1) is in phase (u + 1) % 4 at 4 t + (u + 1) /
    // 4: u = 0, 4, 8, 12 in phase 1 at 4 t.., 1, 5, 9, 13 in phase 2, 2, 6, 10, 14 in phase 3,
    // and 3, 7, 11, 15 in phase 0 at 4 t + 1...
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let groups = src.len() / 16;
    let out = phases.as_mut_ptr();
    for t in 0..groups {
        // SAFETY: values 16 t .. 16 t + 16 of `src`; phase rows q at 4 t .. 4 t + 5 <= src.len()
        // / 4 + 1 <= pl (the caller's promise).
        unsafe {
            let v = _mm512_permutexvar_ps(idx, X::load16(src.as_ptr().add(16 * t)));
            _mm_storeu_ps(out.add(pl + 4 * t), _mm512_extractf32x4_ps::<0>(v));
            _mm_storeu_ps(out.add(2 * pl + 4 * t), _mm512_extractf32x4_ps::<1>(v));
            _mm_storeu_ps(out.add(3 * pl + 4 * t), _mm512_extractf32x4_ps::<2>(v));
            _mm_storeu_ps(out.add(4 * t + 1), _mm512_extractf32x4_ps::<3>(v));
        }
    }
    groups * 16
}

/// U[p][col][ci] = (G g G^T)[p] for one output channel and every input channel at once.
struct WeightTask<'a, X> {
    plan: Plan<'a>,
    w: &'a [X],
    co: usize,
    col: usize,
    nco: usize,
    u: SendPtr<f32>,
    scratch: &'a mut Vec<f32>,
}

impl<X: Value> Vectorized for WeightTask<'_, X> {
    #[inline(always)]
    fn run(self) {
        if self.plan.t.written_out && self.plan.t.m == 2 {
            return self.run_f2();
        }
        if self.plan.t.written_out && self.plan.t.m == 4 {
            return self.run_f4();
        }
        let Plan { t, g, .. } = self.plan;
        let (a, n) = (t.a, g.ci);
        // k[l]: kernel element l of every input channel; gg[i*3 + c]: (G g)[i][c] of every one.
        self.scratch.clear();
        self.scratch.resize((9 + 3 * a) * n, 0.0);
        let (k, gg) = self.scratch.split_at_mut(9 * n);
        let wk = &self.w[self.co * n * 9..][..n * 9];
        for (ci, kernel) in wk.chunks_exact(9).enumerate() {
            for (l, v) in kernel.iter().enumerate() {
                k[l * n + ci] = v.get();
            }
        }
        for i in 0..a {
            for c in 0..3 {
                let d = &mut gg[(i * 3 + c) * n..][..n];
                for l in 0..3 {
                    let coef = t.g[i * 3 + l];
                    if coef != 0.0 {
                        axpy(d, &k[(l * 3 + c) * n..][..n], coef);
                    }
                }
            }
        }
        for i in 0..a {
            for j in 0..a {
                // SAFETY: row `col` of U_(i*a + j) (nco x ci): written by this channel's task
                // alone, inside U (a*a x nco x ci).
                let d = unsafe {
                    std::slice::from_raw_parts_mut(
                        self.u.get().add(((i * a + j) * self.nco + self.col) * n),
                        n,
                    )
                };
                d.fill(0.0);
                for c in 0..3 {
                    let coef = t.g[j * 3 + c];
                    if coef != 0.0 {
                        axpy(d, &gg[(i * 3 + c) * n..][..n], coef);
                    }
                }
            }
        }
    }
}

impl<X: Value> WeightTask<'_, X> {
    /// F(2x2, 3x3)'s weight transform written out: `G`'s rows are (1, 0, 0), (1/2, 1/2, 1/2),
    /// (1/2, -1/2, 1/2) and (0, 0, 1), so each of the 16 positions is a kernel value or a halved sum
    /// of three. The input channels are taken `CH` at a time: their kernels transposed into nine
    /// rows that stay in L1, then combined as whole rows straight into the 16 rows of U. The general
    /// path made nine channel-long rows and twelve more of `G g`, passes that each went out of L1 at
    /// 1280 channels, and a fill and up to three multiply-adds per row of U. The same products and
    /// sums in the same order as the general path: the same values.
    #[inline(always)]
    fn run_f2(self) {
        const CH: usize = 64;
        let n = self.plan.g.ci;
        self.scratch.clear();
        self.scratch.resize(21 * CH, 0.0);
        let (k, gg) = self.scratch.split_at_mut(9 * CH);
        let wk = &self.w[self.co * n * 9..][..n * 9];
        // SAFETY: row `col` of U_p (nco x ci), p < 16: written by this channel's task alone,
        // inside U (16 x nco x ci); the 16 rows are disjoint.
        let mut u: [&mut [f32]; 16] = std::array::from_fn(|p| unsafe {
            std::slice::from_raw_parts_mut(self.u.get().add((p * self.nco + self.col) * n), n)
        });
        let h = 0.5f32;
        let sum = move |a: f32, b: f32, c: f32| (h * a + h * b) + h * c;
        let alt = move |a: f32, b: f32, c: f32| (h * a - h * b) + h * c;
        for c0 in (0..n).step_by(CH) {
            let len = CH.min(n - c0);
            // k[l * CH + i]: kernel element l of input channel c0 + i.
            for (i, kernel) in wk[c0 * 9..(c0 + len) * 9].chunks_exact(9).enumerate() {
                for (l, v) in kernel.iter().enumerate() {
                    k[l * CH + i] = v.get();
                }
            }
            // gg[(r * 3 + c) * CH..]: (G g)[r][c], from kernel rows 0, 1 and 2 of column c.
            for c in 0..3 {
                let krow = |l: usize| &k[(l * 3 + c) * CH..][..len];
                let (k0, k1, k2) = (krow(0), krow(1), krow(2));
                let at = |r: usize| (r * 3 + c) * CH..(r * 3 + c) * CH + len;
                gg[at(0)].copy_from_slice(k0);
                zip3_with(&mut gg[at(1)], k0, k1, k2, sum);
                zip3_with(&mut gg[at(2)], k0, k1, k2, alt);
                gg[at(3)].copy_from_slice(k2);
            }
            // U[r * 4 + j] = ((G g) G^T)[r][j], from columns 0, 1 and 2 of row r.
            for (r, ur) in u.chunks_exact_mut(4).enumerate() {
                let col = |c: usize| &gg[(r * 3 + c) * CH..][..len];
                let (g0, g1, g2) = (col(0), col(1), col(2));
                ur[0][c0..][..len].copy_from_slice(g0);
                zip3_with(&mut ur[1][c0..][..len], g0, g1, g2, sum);
                zip3_with(&mut ur[2][c0..][..len], g0, g1, g2, alt);
                ur[3][c0..][..len].copy_from_slice(g2);
            }
        }
    }
}

/// Row `R` of F(4x4)'s `G` applied to (x0, x1, x2): the table's products and sums in its order,
/// its zero coefficients left out (so the general path's values).
#[inline(always)]
fn g4_row<const R: usize>(x0: f32, x1: f32, x2: f32) -> f32 {
    const G: &[f32] = F4.g;
    let c = |l: usize| G[R * 3 + l];
    match R {
        0 => c(0) * x0,
        5 => c(2) * x2,
        _ => (c(0) * x0 + c(1) * x1) + c(2) * x2,
    }
}

impl<X: Value> WeightTask<'_, X> {
    /// F(4x4, 3x3)'s weight transform written out as [`Self::run_f2`] is: `CH` input channels at
    /// a time, their kernels transposed into nine rows in L1, `G g` made from them with each row
    /// of `G` as one expression ([`g4_row`]), and the 36 rows of U from that. The general path
    /// made 27 rows as long as the input channels (5 KiB each at 1280 channels: out of L1) and
    /// filled and added to each of U's 36 rows up to three times. The same products and sums
    /// in the same order: the same values.
    #[inline(always)]
    fn run_f4(self) {
        const CH: usize = 64;
        let n = self.plan.g.ci;
        self.scratch.clear();
        self.scratch.resize(27 * CH, 0.0);
        // gg[(c * 6 + r) * CH..]: (G g)[r][c] (the six rows of a column together).
        let (k, gg) = self.scratch.split_at_mut(9 * CH);
        let wk = &self.w[self.co * n * 9..][..n * 9];
        // SAFETY: row `col` of U_p (nco x ci), p < 36: written by this channel's task alone,
        // inside U (36 x nco x ci); the 36 rows are disjoint.
        let mut u: [&mut [f32]; 36] = std::array::from_fn(|p| unsafe {
            std::slice::from_raw_parts_mut(self.u.get().add((p * self.nco + self.col) * n), n)
        });
        // Rows 0 to 5 of `G` applied to the rows x, each into the next of six rows.
        #[inline(always)]
        fn rows<'d>(mut next: impl FnMut() -> &'d mut [f32], x: [&[f32]; 3]) {
            zip3_with(next(), x[0], x[1], x[2], g4_row::<0>);
            zip3_with(next(), x[0], x[1], x[2], g4_row::<1>);
            zip3_with(next(), x[0], x[1], x[2], g4_row::<2>);
            zip3_with(next(), x[0], x[1], x[2], g4_row::<3>);
            zip3_with(next(), x[0], x[1], x[2], g4_row::<4>);
            zip3_with(next(), x[0], x[1], x[2], g4_row::<5>);
        }
        for c0 in (0..n).step_by(CH) {
            let len = CH.min(n - c0);
            // k[l * CH + i]: kernel element l of input channel c0 + i.
            for (i, kernel) in wk[c0 * 9..(c0 + len) * 9].chunks_exact(9).enumerate() {
                for (l, v) in kernel.iter().enumerate() {
                    k[l * CH + i] = v.get();
                }
            }
            // (G g)[r][c] from kernel rows 0, 1 and 2 of column c.
            for (c, ggc) in gg.chunks_exact_mut(6 * CH).enumerate() {
                let x = std::array::from_fn(|l| &k[(l * 3 + c) * CH..][..len]);
                let mut ggc = ggc.chunks_exact_mut(CH);
                rows(|| ggc.next().map_or(&mut [], |d| &mut d[..len]), x);
            }
            // U[r * 6 + j] = ((G g) G^T)[r][j], from columns 0, 1 and 2 of row r.
            for (r, ur) in u.chunks_exact_mut(6).enumerate() {
                let x = std::array::from_fn(|c| &gg[(c * 6 + r) * CH..][..len]);
                let mut ur = ur.iter_mut();
                rows(|| ur.next().map_or(&mut [], |d| &mut d[c0..][..len]), x);
            }
        }
    }
}

/// The output transform of one output channel for a band's tile rows, into `sink`.
struct OutputTask<'a> {
    band: Band<'a>,
    mv: &'a [f32],
    co: usize,
    col: usize,
    nco: usize,
    sink: Sink<'a>,
}

impl Vectorized for OutputTask<'_> {
    #[inline(always)]
    fn run(self) {
        let Plan { t, g, ntx, nty } = self.band.plan;
        let (rows, nt, scratch) = (self.band.rows, self.band.nt, self.band.scratch);
        let (m, a, written_out) = (t.m, t.a, t.written_out);
        let (oh, ow) = (g.h, g.w);
        scratch.clear();
        scratch.resize(a * m * ntx + m * ntx + ow, 0.0);
        let (s, rest) = scratch.split_at_mut(a * m * ntx);
        let (y, line) = rest.split_at_mut(m * ntx);
        for (ri, r) in rows.enumerate() {
            let (b, ty) = (r / nty, r % nty);
            // s[i][c] = sum_j M[i*a + j] A^T[c][j]: the row transform of every tile at once,
            // written out for F(2x2) and F(4x4) ([`at_row`]: the same sums in the same order).
            let m_row = |p: usize| &self.mv[(p * self.nco + self.col) * nt + ri * ntx..][..ntx];
            for i in 0..a {
                for c in 0..m {
                    let d = &mut s[(i * m + c) * ntx..][..ntx];
                    if written_out {
                        let x = std::array::from_fn(|j| m_row(i * a + j.min(a - 1)));
                        at_row(m, c, x, d);
                        continue;
                    }
                    d.fill(0.0);
                    for j in 0..a {
                        let coef = t.at[c * a + j];
                        if coef != 0.0 {
                            axpy(d, m_row(i * a + j), coef);
                        }
                    }
                }
            }
            for rr in 0..m {
                let oy = ty * m + rr;
                if oy >= oh {
                    break;
                }
                // y[c] = sum_i A^T[rr][i] s[i][c].
                for c in 0..m {
                    let row = |i: usize| &s[(i * m + c) * ntx..][..ntx];
                    let d = &mut y[c * ntx..][..ntx];
                    if written_out {
                        let x = std::array::from_fn(|i| row(i.min(a - 1)));
                        at_row(m, rr, x, d);
                        continue;
                    }
                    d.fill(0.0);
                    for i in 0..a {
                        let coef = t.at[rr * a + i];
                        if coef != 0.0 {
                            axpy(d, row(i), coef);
                        }
                    }
                }
                let at = ((b * g.co + self.co) * oh + oy) * ow;
                // SAFETY (both arms): output row oy of channel `co` of image b, written by this
                // channel's task alone (bands run one after another), inside the output
                // (b x co x oh x ow).
                match self.sink {
                    Sink::Add(out) => {
                        let orow = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), ow) };
                        interleave(orow, y, m, ntx);
                    }
                    Sink::Bf16 {
                        out,
                        bias,
                        residual,
                    } => {
                        let bias = bias.map_or(0.0, |b| b[self.co]);
                        match residual {
                            Some(r) => {
                                for (l, r) in line.iter_mut().zip(&r[at..at + ow]) {
                                    *l = r.get() + bias;
                                }
                            }
                            None => line.fill(bias),
                        }
                        interleave(line, y, m, ntx);
                        let orow = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), ow) };
                        for (o, l) in orow.iter_mut().zip(&*line) {
                            o.write(bf16::put(*l));
                        }
                    }
                }
            }
        }
    }
}

/// `row += y`, with the m column phases of `y` (m rows of `ntx` tiles) interleaved back.
#[inline(always)]
fn interleave(row: &mut [f32], y: &[f32], m: usize, ntx: usize) {
    let full = row.len() / m;
    for (tx, o) in row[..full * m].chunks_exact_mut(m).enumerate() {
        for (c, o) in o.iter_mut().enumerate() {
            *o += y[c * ntx + tx];
        }
    }
    for (c, o) in row[full * m..].iter_mut().enumerate() {
        *o += y[c * ntx + full];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, phase: f64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f64 * 0.731 + phase).sin() * 1.3 + 0.05) as f32)
            .collect()
    }

    /// Direct 3x3 padding-1 convolution in f64, and the sum of |products| per output (the scale
    /// that rounding errors are measured against).
    fn direct(x: &[f32], w: &[f32], g: &Geometry) -> (Vec<f64>, Vec<f64>) {
        let (h, wd) = (g.h, g.w);
        let mut y = vec![0f64; g.b * g.co * h * wd];
        let mut s = vec![0f64; y.len()];
        for b in 0..g.b {
            for co in 0..g.co {
                for oy in 0..h {
                    for ox in 0..wd {
                        let (mut acc, mut mag) = (0f64, 0f64);
                        for ci in 0..g.ci {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy == 0 || ix == 0 || iy > h || ix > wd {
                                        continue;
                                    }
                                    let xv = x[((b * g.ci + ci) * h + iy - 1) * wd + ix - 1] as f64;
                                    let wv = w[((co * g.ci + ci) * 3 + ky) * 3 + kx] as f64;
                                    acc += xv * wv;
                                    mag += (xv * wv).abs();
                                }
                            }
                        }
                        let o = ((b * g.co + co) * h + oy) * wd + ox;
                        y[o] = acc;
                        s[o] = mag;
                    }
                }
            }
        }
        (y, s)
    }

    fn geom(b: usize, ci: usize, h: usize, w: usize, co: usize) -> Geometry {
        Geometry {
            b,
            ci,
            h,
            w,
            co,
            kh: 3,
            kw: 3,
            padding: 1,
            stride: 1,
            dilation: 1,
            winograd: Largest::F4,
        }
    }

    /// Largest error relative to the sum of |products|, for `out` started at `start`.
    fn worst_error(t: &Tiling, g: &Geometry) -> f64 {
        worst_error_within(t, g, &BUDGET)
    }

    fn worst_error_within(t: &Tiling, g: &Geometry, budget: &Budget) -> f64 {
        let x = values(g.b * g.ci * g.h * g.w, 0.2);
        let w = values(g.co * g.ci * 9, 1.7);
        let start = values(g.b * g.co * g.h * g.w, 3.1);
        let mut out = start.clone();
        let sink = Sink::Add(SendPtr(out.as_mut_ptr()));
        run_within(t, &x, &w, sink, g, budget, Fusion::Off);
        let (want, mag) = direct(&x, &w, g);
        out.iter()
            .zip(&start)
            .zip(want.iter().zip(&mag))
            .map(|((o, s), (y, m))| ((*o as f64 - *s as f64) - y).abs() / (m + 1.0))
            .fold(0.0, f64::max)
    }

    /// The fused path against the blocked one, for F(4x4) and F(2x2), on layers with a partial
    /// panel of output channels, partial chunks of input channels and partial groups of tiles
    /// (masked): the same values but for the order of the sums (f32, against the scale of the
    /// direct convolution's products), and bf16 outputs at most one step apart, nearly all equal.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_matches_the_blocked_path() {
        use crate::kernels::convert::to_bf16;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F (avx512f); the blocked path is tested");
            return;
        }
        let (mut apart, mut total) = (0, 0);
        // Few enough tiles for both; then F(4x4)'s and F(2x2)'s own.
        let both = [
            geom(1, 130, 12, 12, 16),
            geom(2, 64, 8, 8, 33),
            geom(1, 17, 16, 15, 50),
        ];
        let f4 = [geom(2, 70, 16, 16, 40)];
        let f2 = [geom(1, 70, 16, 16, 40), geom(2, 9, 7, 9, 20)];
        let cases = (both.iter().chain(&f4).map(|g| (&F4, g)))
            .chain(both.iter().chain(&f2).map(|g| (&F2, g)));
        for (t, g) in cases {
            let plan = Plan {
                t,
                g,
                ntx: g.w.div_ceil(t.m),
                nty: g.h.div_ceil(t.m),
            };
            let tiles = g.b * plan.nty * plan.ntx;
            assert!(fused::applies(&plan, tiles), "{} {g:?}", t.name);
            let x = values(g.b * g.ci * g.h * g.w, 0.2);
            let w = values(g.co * g.ci * 9, 1.7);
            let start = values(g.b * g.co * g.h * g.w, 3.1);
            let conv = |fuse| {
                let mut out = start.clone();
                let sink = Sink::Add(SendPtr(out.as_mut_ptr()));
                run_within(t, &x, &w, sink, g, &BUDGET, fuse);
                out
            };
            let (blocked, fused) = (conv(Fusion::Off), conv(Fusion::Best));
            let (_, mag) = direct(&x, &w, g);
            let worst = blocked
                .iter()
                .zip(&fused)
                .zip(&mag)
                .map(|((a, b), m)| (a - b).abs() as f64 / (m + 1.0))
                .fold(0.0, f64::max);
            assert!(worst < 1e-6, "{} {g:?}: {worst}", t.name);
            let (xb, wb, bias) = (to_bf16(&x), to_bf16(&w), values(g.co, 0.9));
            let residual = to_bf16(&start);
            let bf16_conv = |fuse| conv_bf16(t, &xb, &wb, Some(&bias), Some(&residual), g, fuse);
            let (blocked, fused) = (bf16_conv(Fusion::Off), bf16_conv(Fusion::F32));
            for (a, b) in blocked.iter().zip(&fused) {
                assert!(
                    a.to_bits().abs_diff(b.to_bits()) <= 1,
                    "{} {g:?}: {a} vs {b}",
                    t.name
                );
            }
            apart += blocked.iter().zip(&fused).filter(|(a, b)| a != b).count();
            total += blocked.len();
            // bf16 products (F(4x4) on AVX512-BF16): the transformed input and weights rounded
            // to bf16 (about 2^-9 each, times F(4x4)'s growth of the terms), against the scale
            // of the direct convolution's products.
            if t.m == 4 && fused::bf16_available() {
                let best = bf16_conv(Fusion::Best);
                let worst = blocked
                    .iter()
                    .zip(&best)
                    .zip(&mag)
                    .map(|((a, b), m)| (a.to_f32() - b.to_f32()).abs() as f64 / (m + 1.0))
                    .fold(0.0, f64::max);
                // 0.011-0.029 here (Zen 4); channels paired the wrong way round gave 0.13.
                assert!(worst < 0.06, "{g:?} bf16 products: {worst}");
            }
        }
        assert!(
            apart * 50 < total,
            "{apart} of {total} bf16 outputs one step apart"
        );
    }

    /// Sizes that are and are not multiples of the tile, one pixel wide, batches, more output
    /// channels than one weight block, and bands of a single tile row (a wide, many-channel layer).
    fn edge_shapes() -> [Geometry; 8] {
        [
            geom(1, 1, 1, 1, 1),
            geom(2, 3, 7, 5, 4),
            geom(1, 8, 9, 12, 6),
            geom(1, 5, 8, 8, 3),
            geom(3, 2, 1, 9, 2),
            geom(1, 4, 13, 1, 5),
            geom(1, 3, 6, 6, 40),
            geom(1, 300, 5, 70, 2),
        ]
    }

    /// Both variants against the f64 direct convolution on [`edge_shapes`].
    #[test]
    fn matches_direct_convolution() {
        for t in [&F2, &F4] {
            for g in edge_shapes() {
                let err = worst_error(t, &g);
                // f32 rounding of the transforms: about 2^-24 x (the transforms' gain).
                let bound = if t.m == 4 { 2e-6 } else { 5e-7 };
                assert!(err < bound, "{} {g:?}: relative error {err:e}", t.name);
            }
        }
    }

    fn plan_of<'a>(t: &'a Tiling, g: &'a Geometry) -> Plan<'a> {
        Plan {
            t,
            g,
            ntx: g.w.div_ceil(t.m),
            nty: g.h.div_ceil(t.m),
        }
    }

    /// Every way of cutting a layer gives the direct convolution's values: blocks of 16 output
    /// channels in bands of one tile row (the input transformed again for every block), the same
    /// blocks in one band (transformed once), and the default budget; and the default budget cuts
    /// the UNet's layers as intended.
    #[test]
    fn every_cut_matches_direct_convolution() {
        let many = Budget {
            weights: 1,
            band: 1,
            one_band_weights: 1,
            one_band: 0,
        };
        let one_band = Budget {
            one_band: usize::MAX,
            ..many
        };
        let g = geom(2, 3, 6, 6, 40);
        let cut = |t, g, b: &Budget| b.cut(&plan_of(t, g));
        let (cob, band_rows) = (16, 1);
        assert_eq!(cut(&F2, &g, &many), Cut { cob, band_rows });
        let band_rows = 2 * 3;
        assert_eq!(cut(&F2, &g, &one_band), Cut { cob, band_rows });
        for t in [&F2, &F4] {
            for g in edge_shapes().iter().chain([&g]) {
                for budget in [&many, &one_band, &BUDGET] {
                    let err = worst_error_within(t, g, budget);
                    let bound = if t.m == 4 { 2e-6 } else { 5e-7 };
                    assert!(err < bound, "{} {g:?} {budget:?}: {err:e}", t.name);
                }
            }
        }
        // The UNet at 512x512 (batch 2): 1280 and 2560 channels at 16x16 in one band of small
        // blocks, 320 at 64x64 in bands of one block.
        let one = |g: Geometry, cob| Cut {
            cob,
            band_rows: g.b * g.h / 2,
        };
        let g = geom(2, 1280, 16, 16, 1280);
        assert_eq!(cut(&F2, &g, &BUDGET), one(g, 96));
        let g = geom(2, 2560, 16, 16, 1280);
        assert_eq!(cut(&F2, &g, &BUDGET), one(g, 48));
        let c = cut(&F2, &geom(2, 320, 64, 64, 320), &BUDGET);
        assert!(c.cob == 320 && c.band_rows < 64, "{c:?}");
        // bf16 (F(4x4)): the widest layers at 32x32 and 64x64 transform their input once, in one
        // band of 4 blocks and in one block of 3 bands; the budget's bands still give the direct
        // convolution's values.
        assert_eq!(budget::<bf16>().band, BUDGET_BF16.band);
        assert_eq!(budget::<f32>().band, BUDGET.band);
        let bf16_cut = |g: &Geometry| BUDGET_BF16.cut(&plan_of(&F4, g));
        let (cob, band_rows) = (176, 16);
        assert_eq!(
            bf16_cut(&geom(2, 1920, 32, 32, 640)),
            Cut { cob, band_rows }
        );
        let c = bf16_cut(&geom(2, 960, 64, 64, 320));
        assert_eq!((c.cob, 32usize.div_ceil(c.band_rows)), (320, 3), "{c:?}");
        for g in edge_shapes() {
            let err = worst_error_within(&F4, &g, &BUDGET_BF16);
            assert!(err < 2e-6, "{g:?} bf16 budget: {err:e}");
        }
    }

    /// The written-out transforms (input, weights and output of F(2x2) and of F(4x4))
    /// give exactly the values of the table-driven general path (the same products and sums in the
    /// same order), in f32 and in bf16 with bias and residual, on [`edge_shapes`] (odd widths and
    /// heights, one-pixel rows and columns, single-row bands).
    #[test]
    fn written_out_transforms_are_the_table_driven_ones_bit_for_bit() {
        use crate::kernels::convert::to_bf16;
        const TABLES2: Tiling = Tiling {
            written_out: false,
            ..F2
        };
        const TABLES4: Tiling = Tiling {
            written_out: false,
            ..F4
        };
        const { assert!(F2.written_out && F4.written_out) };
        for (fast_t, tables_t) in [(&F2, &TABLES2), (&F4, &TABLES4)] {
            for g in edge_shapes() {
                let x = values(g.b * g.ci * g.h * g.w, 0.2);
                let w = values(g.co * g.ci * 9, 1.7);
                let start = values(g.b * g.co * g.h * g.w, 3.1);
                let (fast, tables) = (
                    blocked(fast_t, &x, &w, &start, &g),
                    blocked(tables_t, &x, &w, &start, &g),
                );
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&tables), "f32 {} {g:?}", fast_t.name);
                let (xb, wb, rb) = (to_bf16(&x), to_bf16(&w), to_bf16(&start));
                let bias = values(g.co, 0.4);
                let fast = conv_bf16(fast_t, &xb, &wb, Some(&bias), Some(&rb), &g, Fusion::Off);
                let tables = conv_bf16(tables_t, &xb, &wb, Some(&bias), Some(&rb), &g, Fusion::Off);
                assert_eq!(fast, tables, "bf16 {} {g:?}", fast_t.name);
            }
        }
    }

    /// `start + conv3x3(x, w)` through the blocked path (the fused one sums in another order:
    /// `fused_matches_the_blocked_path`).
    fn blocked(t: &Tiling, x: &[f32], w: &[f32], start: &[f32], g: &Geometry) -> Vec<f32> {
        let mut out = start.to_vec();
        run(
            t,
            x,
            w,
            Sink::Add(SendPtr(out.as_mut_ptr())),
            g,
            Fusion::Off,
        );
        out
    }

    /// bf16 input, weights and residual: the same bits as the f32 kernel on the widened values
    /// with the bias and residual as its starting value, rounded once; with and without either,
    /// both variants, on [`edge_shapes`]. The blocked path, in both.
    #[test]
    fn bf16_matches_f32_on_the_same_values_bit_for_bit() {
        use crate::kernels::conv2d::initial_output;
        use crate::kernels::convert::{to_bf16, to_f32};
        for t in [&F2, &F4] {
            for g in edge_shapes() {
                let x = to_bf16(&values(g.b * g.ci * g.h * g.w, 0.2));
                let w = to_bf16(&values(g.co * g.ci * 9, 1.7));
                let res = to_bf16(&values(g.b * g.co * g.h * g.w, 3.1));
                let bias = values(g.co, 0.4);
                for (b, r) in [
                    (None, None),
                    (Some(&bias[..]), None),
                    (Some(&bias[..]), Some(&res[..])),
                    (None, Some(&res[..])),
                ] {
                    let got = conv_bf16(t, &x, &w, b, r, &g, Fusion::Off);
                    let r32 = r.map(to_f32);
                    let start = initial_output(b, r32.as_deref(), g.b * g.co, g.h * g.w);
                    let want = to_bf16(&blocked(t, &to_f32(&x), &to_f32(&w), &start, &g));
                    assert_eq!(got.len(), want.len());
                    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    let what = (t.name, b.is_some(), r.is_some());
                    assert_eq!(differ, 0, "{g:?} (variant, bias, residual) {what:?}");
                }
            }
        }
    }

    #[test]
    fn auto_picks_by_tile_count_and_only_eligible_layers() {
        // UNet at 64x64 latents (batch 2): F(4x4) where allowed, else F(2x2); 32x32 and 16x16
        // (also batch 1): F(2x2); 8x8: F(2x2) where the fused path runs it (32 tiles), else
        // im2col. F(4x4) from 256 4x4 tiles only.
        assert_eq!(choose(&geom(2, 320, 64, 64, 320), Mode::Auto).unwrap().m, 4);
        assert_eq!(choose(&geom(1, 512, 32, 32, 512), Mode::Auto).unwrap().m, 2);
        let only_f2 = Geometry {
            winograd: Largest::F2,
            ..geom(2, 320, 64, 64, 320)
        };
        assert_eq!(choose(&only_f2, Mode::Auto).unwrap().m, 2);
        assert_eq!(choose(&geom(2, 640, 32, 32, 640), Mode::Auto).unwrap().m, 2);
        assert_eq!(
            choose(&geom(2, 1280, 16, 16, 1280), Mode::Auto).unwrap().m,
            2
        );
        assert_eq!(
            choose(&geom(1, 1280, 16, 16, 1280), Mode::Auto).unwrap().m,
            2
        );
        let fused_f2 = fused_tiles().is_some_and(|(_, f2)| f2 >= 32);
        assert_eq!(min_tiles_f2(), if fused_f2 { 32 } else { 64 });
        let unet8 = choose(&geom(2, 1280, 8, 8, 1280), Mode::Auto);
        assert_eq!(unet8.map(|t| t.m), fused_f2.then_some(2));
        assert!(choose(&geom(1, 1280, 8, 8, 1280), Mode::Auto).is_none());
        let between = choose(&geom(1, 1280, 14, 14, 1280), Mode::Auto);
        assert_eq!(between.map(|t| t.m), fused_f2.then_some(2));
        assert!(choose(&geom(1, 1280, 10, 10, 1280), Mode::Auto).is_none());
        assert!(choose(&geom(2, 320, 64, 64, 320), Mode::Im2col).is_none());
        assert_eq!(choose(&geom(1, 2, 3, 3, 1), Mode::F4).unwrap().m, 4);
        let strided = Geometry {
            stride: 2,
            ..geom(2, 320, 64, 64, 320)
        };
        let one_by_one = Geometry {
            kh: 1,
            kw: 1,
            padding: 0,
            ..geom(2, 320, 64, 64, 320)
        };
        for g in [strided, one_by_one] {
            assert!(choose(&g, Mode::F4).is_none(), "{g:?}");
        }
        // bf16: F(4x4) only, from 32 tiles (the UNet's too) with AVX512-BF16 or the portable
        // kernel, and only the VAE's large layers with AMX; unless a variant is forced.
        use crate::kernels::gemm_bf16::Bf16Kernel::{Amx, Avx512Bf16, Portable};
        let vae = geom(1, 128, 512, 512, 128);
        let unet16 = Geometry {
            winograd: Largest::F2,
            ..geom(2, 1280, 16, 16, 1280)
        };
        let unet16_b1 = Geometry { b: 1, ..unet16 };
        for kernel in [Amx, Avx512Bf16, Portable] {
            let pick = |g: &Geometry, mode| choose_bf16_for(g, mode, kernel, false).map(|t| t.m);
            assert_eq!(pick(&vae, Mode::Auto), Some(4));
            let unet = if kernel == Amx { None } else { Some(4) };
            assert_eq!(pick(&only_f2, Mode::Auto), unet, "{kernel:?}");
            assert_eq!(pick(&unet16, Mode::Auto), unet, "{kernel:?}");
            assert_eq!(pick(&unet16_b1, Mode::Auto), None, "{kernel:?}");
            // Where the fused path's products are bf16, from 16 tiles for a layer the fused path
            // takes (AVX-512F): batch 1 at 16x16 too, not the 8x8 level, nor a layer of 16 tiles
            // too wide for one band (it would run blocked, in f32).
            let paired = |g: &Geometry| choose_bf16_for(g, Mode::Auto, kernel, true).map(|t| t.m);
            let fuses = fused_tiles().is_some();
            assert_eq!(paired(&unet16_b1), unet.filter(|_| fuses), "{kernel:?}");
            assert_eq!(paired(&unet16), unet, "{kernel:?}");
            let unet8 = Geometry {
                winograd: Largest::F2,
                ..geom(2, 1280, 8, 8, 1280)
            };
            assert_eq!(paired(&unet8), None, "{kernel:?}");
            let wide = geom(1, 24_000, 16, 16, 16);
            assert!(!Plan::new(&F4, &wide).fuses(&BUDGET_BF16));
            assert_eq!(paired(&wide), None, "{kernel:?}");
            assert_eq!(pick(&geom(2, 320, 64, 64, 320), Mode::Im2col), None);
            assert_eq!(pick(&only_f2, Mode::F2), Some(2));
            assert_eq!(pick(&strided, Mode::Auto), None);
        }
        assert_eq!(Mode::parse(" F4 "), Some(Mode::F4));
        assert_eq!(Mode::parse("winograd"), None);
    }

    /// Per-layer times of im2col, F(2x2) and F(4x4) on the UNet's and VAE decoder's shapes:
    /// `cargo test --release --lib winograd_speed -- --ignored --nocapture` (the figures in
    /// [`choose`] and the module documentation).
    #[test]
    #[ignore]
    fn winograd_speed() {
        use crate::kernels::conv2d::{conv2d_bf16, im2col_conv, initial_output};
        use crate::kernels::convert::to_bf16;
        let shapes = [
            geom(2, 320, 64, 64, 320),
            geom(2, 640, 64, 64, 320),
            geom(2, 960, 64, 64, 320),
            geom(2, 640, 32, 32, 640),
            geom(2, 1280, 32, 32, 640),
            geom(2, 1920, 32, 32, 640),
            geom(2, 1280, 16, 16, 1280),
            geom(2, 1280, 8, 8, 1280),
            geom(2, 2560, 16, 16, 1280),
            geom(1, 1280, 16, 16, 1280),
            geom(1, 512, 64, 64, 512),
            geom(1, 512, 128, 128, 512),
            geom(1, 512, 256, 256, 256),
            geom(1, 256, 256, 256, 256),
            geom(1, 128, 512, 512, 128),
        ];
        // `WINOGRAD_SHAPES=1280-1280-16,2560-1280-16` (ci-co-size) runs only those.
        let only = std::env::var("WINOGRAD_SHAPES").ok();
        for g in shapes {
            let name = format!("{}-{}-{}", g.ci, g.co, g.h);
            if only
                .as_ref()
                .is_some_and(|o| !o.split(',').any(|s| s == name))
            {
                continue;
            }
            let x = values(g.b * g.ci * g.h * g.w, 0.2);
            let w = values(g.co * g.ci * 9, 1.7);
            let flop = 2.0 * (g.b * g.co * g.ci * 9 * g.h * g.w) as f64;
            let mut line = format!("b{} {}->{} {}x{}:", g.b, g.ci, g.co, g.h, g.w);
            let (xb, wb) = (to_bf16(&x), to_bf16(&w));
            for mode in [Mode::Im2col, Mode::F2, Mode::F4] {
                let best = crate::test_support::best_time(3, &mut || {
                    let mut out = initial_output(None, None, g.b * g.co, g.h * g.w);
                    match choose(&g, mode) {
                        Some(t) => accumulate(t, &x, &w, &mut out, &g),
                        None => im2col_conv(&x, &w, &mut out, &g, 1 << 21, false),
                    }
                    std::hint::black_box(&out);
                });
                // bf16 in and out: its im2col kernel (forced: `auto` would pick F(4x4) from 32
                // tiles), or the f32 Winograd on widened values.
                let best_bf16 = crate::test_support::best_time(3, &mut || {
                    let out = match choose(&g, mode) {
                        Some(t) => conv_bf16(t, &xb, &wb, None, None, &g, Fusion::Best),
                        None => conv2d_bf16(&xb, &wb, None, None, &g, 1 << 21, Mode::Im2col),
                    };
                    std::hint::black_box(&out);
                });
                line += &format!(
                    "  {mode:?} {:.1} ms ({:.0} GFLOP/s direct-equivalent), bf16 {:.1} ms",
                    best * 1e3,
                    flop / best / 1e9,
                    best_bf16 * 1e3
                );
            }
            println!("{line}");
        }
    }

    /// The fused path's bf16 products against its f32 products on the UNet's 16x16 layers (bf16,
    /// F(4x4)), alternating in one process, min and median of 15 calls each
    /// (`cargo test --release --lib fused_bf16_speed -- --ignored --nocapture`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn fused_bf16_speed() {
        use crate::kernels::convert::to_bf16;
        if !fused::bf16_available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16 (avx512bf16)");
            return;
        }
        for g in [
            geom(2, 1280, 16, 16, 1280),
            geom(2, 2560, 16, 16, 1280),
            geom(1, 1280, 16, 16, 1280),
        ] {
            let x = to_bf16(&values(g.b * g.ci * g.h * g.w, 0.2));
            let w = to_bf16(&values(g.co * g.ci * 9, 1.7));
            let mut times = [Vec::new(), Vec::new()];
            for _ in 0..16 {
                for (fuse, times) in [Fusion::F32, Fusion::Best].into_iter().zip(&mut times) {
                    let start = std::time::Instant::now();
                    std::hint::black_box(conv_bf16(&F4, &x, &w, None, None, &g, fuse));
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let [f32_products, bf16_products] = times.map(|mut t| {
                t.remove(0);
                t.sort_by(f64::total_cmp);
                (t[0], t[t.len() / 2])
            });
            println!(
                "b{} {}->{} {}x{}: f32 products min {:.1} / median {:.1} ms, bf16 products {:.1} / {:.1} ms",
                g.b, g.ci, g.co, g.h, g.w, f32_products.0, f32_products.1, bf16_products.0,
                bf16_products.1
            );
        }
    }

    /// The F(4x4) input transform alone on the UNet's bf16 layers (batch 2, one band), min and
    /// median of 30 calls (`cargo test --release --lib input_transform_speed -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn input_transform_speed() {
        use crate::kernels::convert::to_bf16;
        for g in [
            geom(2, 320, 64, 64, 320),
            geom(2, 640, 32, 32, 640),
            geom(2, 1280, 16, 16, 1280),
        ] {
            let plan = Plan {
                t: &F4,
                g: &g,
                ntx: g.w.div_ceil(4),
                nty: g.h.div_ceil(4),
            };
            let x = to_bf16(&values(g.b * g.ci * g.h * g.w, 0.2));
            let rows = 0..g.b * plan.nty;
            let mut v = Vec::new();
            let mut times: Vec<f64> = (0..31)
                .map(|_| {
                    let start = std::time::Instant::now();
                    transform_input(plan, &x, &rows, &mut v);
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.remove(0);
            times.sort_by(f64::total_cmp);
            println!(
                "b{} {} channels {}x{}: input transform min {:.2} / median {:.2} ms",
                g.b, g.ci, g.h, g.w, times[0], times[15]
            );
        }
    }
}
