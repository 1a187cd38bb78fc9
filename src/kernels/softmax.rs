//! `softmax(x * scale)` over the last dimension, in place, with a vectorised exponential.
//!
//! Attention scores are the largest tensors of a UNet step (168 M per self-attention at 512x512
//! for m18's first blocks with guidance). candle multiplies them by the scale in one pass and its
//! softmax calls the scalar `expf` of libm for each score; that took about as long as the two
//! attention matmuls together. Here each row is done in three passes over data that stays in cache
//! (max, exponentials, normalisation), in place on the matmul's output, with the scale folded into
//! the exponent and `exp` computed as `2^n * p(f)` (Cody-Waite reduction, degree-7 Taylor polynomial:
//! relative error below 3e-7, i.e. a few ulps), written so that the compiler vectorises it at the
//! CPU's width (AVX-512, AVX2 + FMA or portable, through the crate's pulp dispatch). bf16
//! attention takes its unnormalised probabilities rounded to bf16 from the exponential pass (a
//! shorter polynomial, degree 4, minimax: the values are rounded anyway) and scales its output by
//! their sum; with AVX512-BF16 that pass rounds each exponential in its register instead of
//! writing it back, and fuses the exponential's products and sums (`avx512`: the generic rows'
//! sums to 1e-6 and their bf16 values, tested; m18's 64x64 self-attention 145-162 -> 142-152 ms
//! for the one pass, then 141-149 -> 127-128 ms for the fused degree-4 exponential, Zen 4). f32
//! attention's rows (unnormalised, as bf16's) fuse the degree-7 polynomial's products and sums
//! with AVX-512F too (`avx512::row_f32`: within a few ulps of the portable rows, tested; m9's
//! 64x64 self-attention 300-303 -> 281-283 ms, Zen 4).
//!
//! Other devices and dtypes use candle's ops, which the tests also use as the reference.

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::convert::round;
use super::{vectorized, Vectorized};

/// `softmax(xs * scale)` over the last dimension. On the CPU in f32 the work is done in place on
/// `xs`, which must not be shared (e.g. a matmul's fresh output).
pub fn softmax_scaled_last_dim(xs: Tensor, scale: f64) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 && xs.is_contiguous() {
        xs.inplace_op1(&SoftmaxOp {
            scale: scale as f32,
        })?;
        return Ok(xs);
    }
    candle_nn::ops::softmax_last_dim(&(xs * scale)?)
}

struct SoftmaxOp {
    scale: f32,
}

impl InplaceOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "altdiff-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("softmax: input must be f32");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: input must be contiguous");
        };
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        softmax_rows(&mut v[a..b], cols, self.scale);
        Ok(())
    }
}

/// Softmax of `scale * row` for every row of `cols` values.
pub(crate) fn softmax_rows(data: &mut [f32], cols: usize, scale: f32) {
    data.par_chunks_mut(cols * 64)
        .for_each(|rows| rows.chunks_mut(cols).for_each(|r| softmax_row(r, scale)));
}

/// Softmax of `scale * row`, in place, vectorised for this CPU.
pub(crate) fn softmax_row(row: &mut [f32], scale: f32) {
    vectorized(Row { row, scale })
}

/// `exp(scale * (row - max))` in place, vectorised for this CPU, and the reciprocal of their sum
/// (NaN for a row of -inf or one holding NaN / +inf), for f32 attention, which divides its product
/// with `v` by the sum instead of normalising every probability.
pub(crate) fn softmax_row_unnormalised(row: &mut [f32], scale: f32) -> f32 {
    // `avx512::row_f32`: the exponential's products and sums fused, 17 operations per 16 values
    // where the portable row's took 30. `attention_speed` (f32, 2 x heads x 4096 x 4096, Zen 4, 2
    // threads, three alternating runs): m18's 5 heads of 64 232.6-234.1 -> 219.7-221.0 ms, m9's 8
    // heads of 40 300.5-303.3 -> 281.4-283.3 ms. (std caches the feature check.)
    #[cfg(target_arch = "x86_64")]
    if avx512::available_f32() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { avx512::row_f32(row, scale) };
    }
    let mut inv = f32::NAN;
    vectorized(Unnormalised {
        row,
        scale,
        inv: &mut inv,
    });
    inv
}

/// One row's exponentials and the reciprocal of their sum.
struct Unnormalised<'a> {
    row: &'a mut [f32],
    scale: f32,
    inv: &'a mut f32,
}

impl Vectorized for Unnormalised<'_> {
    #[inline(always)]
    fn run(self) {
        *self.inv = exponentials(self.row, self.scale);
    }
}

/// The unnormalised softmax of `scale * row` for bf16 attention: `exp(scale * (row - max))`
/// rounded to bf16 into `out` (as long as `row`; `row` is left holding them in f32, or as it was
/// with AVX512-BF16: its values afterwards are not to be relied on), and the
/// reciprocal of their (f32) sum, by which
/// the caller scales the product with `v` (as PyTorch's CPU flash attention does): one pass fewer
/// than normalising every probability. NaN for a row of -inf or one holding NaN / +inf (`out` is
/// then zeros).
pub(crate) fn softmax_row_bf16(row: &mut [f32], scale: f32, out: &mut [bf16]) -> f32 {
    assert_eq!(row.len(), out.len(), "softmax: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the features (checked); row and out have the same length.
        return unsafe { avx512::row_bf16(row, scale, out) };
    }
    row_bf16_generic(row, scale, out)
}

/// [`softmax_row_bf16`] through the crate's pulp dispatch (any CPU; the tests compare).
fn row_bf16_generic(row: &mut [f32], scale: f32, out: &mut [bf16]) -> f32 {
    let mut inv = f32::NAN;
    vectorized(Bf16Row {
        row,
        scale,
        out,
        inv: &mut inv,
    });
    inv
}

/// One row's softmax, in place.
struct Row<'a> {
    row: &'a mut [f32],
    scale: f32,
}

impl Vectorized for Row<'_> {
    #[inline(always)]
    fn run(self) {
        let inv = exponentials(self.row, self.scale);
        self.row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One row's unnormalised bf16 probabilities and the reciprocal of their sum.
struct Bf16Row<'a> {
    row: &'a mut [f32],
    scale: f32,
    out: &'a mut [bf16],
    inv: &'a mut f32,
}

impl Vectorized for Bf16Row<'_> {
    #[inline(always)]
    fn run(self) {
        // The exponentials (the shorter polynomial: they are rounded to bf16) and their sum in
        // place, then rounded into `out`: two simple loops vectorise better than one that does both.
        let inv = exponentials_to::<true>(self.row, self.scale);
        if inv.is_nan() {
            self.out.fill(bf16::ZERO);
        } else {
            for (o, v) in self.out.iter_mut().zip(self.row.iter()) {
                *o = round(*v);
            }
        }
        *self.inv = inv;
    }
}

/// `exp(x)` for `x <= 0` (clamped below at -87, where it is ~1.6e-38 and no longer matters in a
/// softmax row whose largest term is 1).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    // n (in [-126, 0]) sits in the low mantissa bits of t: integer arithmetic on the bits gives
    // 2^n without a float-to-int conversion, which Rust's saturating `as` would leave scalar.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    f32::from_bits(((n_int + 127) as u32) << 23) * p
}

/// The coefficients of f, f^2, f^3 and f^4 in the `SHORT` polynomial `1 + f (c1 + f (c2 + ...))`:
/// a relative-error minimax fit of e^f on [-ln 2 / 2, ln 2 / 2] (reweighted least squares in f64,
/// rounded to f32), which comes within 3.2e-6 of e^x once evaluated in f32, where the degree-5
/// Taylor polynomial it replaced came within 4e-6.
const SHORT_POLY: [f32; 4] = [0.999_964_24, 0.500_032_66, 0.167_922_42, 0.041_507_09];

/// [`SHORT_POLY`] for 2^f on [-1/2, 1/2] (e^(f ln 2)): c_k (ln 2)^k. Evaluated in f32 it comes
/// within 4e-6 of 2^x (tested: `short_exp_is_within_its_bound`).
const SHORT_POLY2: [f32; 4] = {
    const LN2: f32 = std::f32::consts::LN_2;
    let [c1, c2, c3, c4] = SHORT_POLY;
    [
        c1 * LN2,
        c2 * LN2 * LN2,
        c3 * LN2 * LN2 * LN2,
        c4 * LN2 * LN2 * LN2 * LN2,
    ]
};

/// The factor by which the bf16 rows' `SHORT` exponential takes its argument: it computes
/// `2^x`, so `e^x` is `2^(x log2 e)`, with `log2 e` folded into the row's scale.
const SHORT_BASE: f32 = std::f32::consts::LOG2_E;

/// The rows' exponential: [`exp_neg`] (e^x), or with `SHORT` [`exp2_short`] (2^x: the caller's
/// scale holds [`SHORT_BASE`]) for results that are rounded to bf16.
#[inline(always)]
fn row_exp<const SHORT: bool>(x: f32) -> f32 {
    if SHORT {
        exp2_short(x)
    } else {
        exp_neg(x)
    }
}

/// `2^x` for `x` in [-126, 0] (clamped; NaN kept) by the degree-4 [`SHORT_POLY2`] (relative error
/// below 4e-6, far inside a bf16 rounding). In base 2 the argument is split as `n + f` by one
/// rounding, with no two-part reduction by ln 2, and the rounding leaves `n + 127`, 2^n's exponent
/// field, in the low bits of its sum: 11 operations a vector with AVX-512's fused multiply-adds,
/// where e^x took 14 (the bf16 softmax was 3-4 % of a bf16 m18 UNet step on Zen 4).
#[inline(always)]
fn exp2_short(x: f32) -> f32 {
    // 1.5 * 2^23 + 127: adding it rounds x to the nearest integer n, and its bits are then those
    // of 1.5 * 2^23 plus n + 127 (in 1..=127), which a shift by 23 leaves alone in the exponent.
    const ROUND: f32 = 12_582_912.0 + 127.0;
    // Written as comparisons (not `clamp`) so that NaN passes, as the AVX-512 kernel's max / min.
    let x = if x < -126.0 { -126.0 } else { x };
    let x = if x > 0.0 { 0.0 } else { x };
    let t = x + ROUND;
    let f = x - (t - ROUND);
    let [c1, c2, c3, c4] = SHORT_POLY2;
    let p = 1.0 + f * (c1 + f * (c2 + f * (c3 + f * c4)));
    f32::from_bits(t.to_bits() << 23) * p
}

/// The largest value of `row` (-inf for an empty row).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Replaces `row` by `exp(scale * (row - max))` and returns the reciprocal of their sum: NaN for a
/// row of -inf (fully masked) or one holding NaN / +inf, which candle's arithmetic makes all NaN.
#[inline(always)]
fn exponentials(row: &mut [f32], scale: f32) -> f32 {
    exponentials_to::<false>(row, scale)
}

/// [`exponentials`] with [`row_exp`]'s choice of exponential.
#[inline(always)]
fn exponentials_to<const SHORT: bool>(row: &mut [f32], scale: f32) -> f32 {
    let max = row_max(row);
    if !max.is_finite() {
        return f32::NAN;
    }
    let scale = if SHORT { scale * SHORT_BASE } else { scale };
    // The exponentials and their sum in one pass (sixteen lanes of partial sums).
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = row_exp::<SHORT>((*v - max) * scale);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = row_exp::<SHORT>((*v - max) * scale);
        tail += *v;
    }
    1.0 / (acc.iter().sum::<f32>() + tail)
}

/// bf16 rows in one pass with AVX512-BF16: each exponential is summed and rounded to bf16 while
/// it is in a register (`vcvtneps2bf16`), instead of written back as f32 and rounded in a pass
/// of its own. The operations of [`row_bf16_generic`] in the same order, but for the
/// exponential's fused multiply-adds, so nearly the same bits (tested: sums within 1e-6, bf16
/// values at most one step apart, none of 23,097 in the test): the exponentials are at least
/// `exp(-87)`, normal numbers, where `vcvtneps2bf16` rounds as [`round`] does (it differs only on
/// denormals); a row with NaN is zeroed as there.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{bf16, round, row_exp, SHORT_BASE, SHORT_POLY2};
    use std::arch::x86_64::*;

    /// Whether this CPU runs [`row_bf16`].
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// Whether this CPU runs [`row_f32`].
    pub(super) fn available_f32() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// [`super::row_exp`]`::<SHORT>` of 16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_exp16<const SHORT: bool>(x: __m512) -> __m512 {
        // SAFETY: AVX-512F (this function's).
        unsafe {
            if SHORT {
                exp2_16(x)
            } else {
                exp16(x)
            }
        }
    }

    /// [`super::exp_neg`] of 16 values, its products and sums fused (`vfmadd`): the degree-7
    /// polynomial in 17 operations where it took 30, within the same few ulps (tested).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        const ROUND: f32 = 12_582_912.0;
        let c = _mm512_set1_ps;
        // clamp(x, -87, 0), NaN kept: max/min return their second operand when one is NaN.
        let x = _mm512_min_ps(c(0.0), _mm512_max_ps(c(-87.0), x));
        let t = _mm512_fmadd_ps(x, c(LOG2E), c(ROUND));
        let n = _mm512_sub_ps(t, c(ROUND));
        let f = _mm512_fnmadd_ps(n, c(LN2_LO), _mm512_fnmadd_ps(n, c(LN2_HI), x));
        let step = |k: f32, p: __m512| _mm512_fmadd_ps(f, p, c(k));
        let p = step(1.0 / 120.0, step(1.0 / 720.0, c(1.0 / 5040.0)));
        let p = step(
            1.0,
            step(1.0, step(0.5, step(1.0 / 6.0, step(1.0 / 24.0, p)))),
        );
        let n_int = _mm512_sub_epi32(
            _mm512_castps_si512(t),
            _mm512_set1_epi32(ROUND.to_bits() as i32),
        );
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(n_int, _mm512_set1_epi32(127)));
        _mm512_mul_ps(_mm512_castsi512_ps(two_n), p)
    }

    /// [`super::exp2_short`] of 16 values, the polynomial's products and sums fused: 11
    /// operations (e^x by the same polynomial took 14, and the degree-5 Taylor one, one by one,
    /// 23), within the same error bound (tested).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp2_16(x: __m512) -> __m512 {
        const ROUND: f32 = 12_582_912.0 + 127.0;
        let c = _mm512_set1_ps;
        // clamp(x, -126, 0), NaN kept: max/min return their second operand when one is NaN.
        let x = _mm512_min_ps(c(0.0), _mm512_max_ps(c(-126.0), x));
        let t = _mm512_add_ps(x, c(ROUND));
        let f = _mm512_sub_ps(x, _mm512_sub_ps(t, c(ROUND)));
        let step = |k: f32, p: __m512| _mm512_fmadd_ps(f, p, c(k));
        let [c1, c2, c3, c4] = SHORT_POLY2;
        let p = step(1.0, step(c1, step(c2, step(c3, c(c4)))));
        let two_n = _mm512_slli_epi32::<23>(_mm512_castps_si512(t));
        _mm512_mul_ps(_mm512_castsi512_ps(two_n), p)
    }

    /// [`row_exp16`] of one value (for the tests).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp1<const SHORT: bool>(x: f32) -> f32 {
        _mm512_cvtss_f32(row_exp16::<SHORT>(_mm512_set1_ps(x)))
    }

    /// The largest value of `row` as [`super::row_max`] finds it (lanes of 16, then the tail and
    /// the lanes), NaN skipped.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_max(row: &[f32]) -> f32 {
        let whole = row.len() / 16 * 16;
        let (body, tail) = row.split_at(whole);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(16) {
            // (v, m): m unless v is larger, NaN skipped, as `if v > m { v } else { m }`.
            m = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), m);
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), m);
        tail.iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
    }

    /// `exp(scale * (row[i] - max))` by [`row_exp16`] (the `SHORT` exponential or not) for every
    /// value, each handed to `store` (16 at a time, with their index) and summed; returns the
    /// reciprocal of the sum. `row` is read through a pointer because `store` may write over the
    /// values already read (f32 rows are done in place).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `row` points to `len` values; `store` writes nothing at or beyond
    /// the index it is given plus 16 (its own chunk) and only there.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exponentials<const SHORT: bool>(
        row: *const f32,
        len: usize,
        max: f32,
        scale: f32,
        mut store: impl FnMut(usize, __m512),
        mut store_one: impl FnMut(usize, f32),
    ) -> f32 {
        let whole = len / 16 * 16;
        // The short exponential is 2^x (see `row_exp`).
        let scale = if SHORT { scale * SHORT_BASE } else { scale };
        let (vmax, vscale) = (_mm512_set1_ps(max), _mm512_set1_ps(scale));
        let mut acc = _mm512_setzero_ps();
        for i in (0..whole).step_by(16) {
            let x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row.add(i)), vmax), vscale);
            let e = row_exp16::<SHORT>(x);
            acc = _mm512_add_ps(acc, e);
            store(i, e);
        }
        let mut rest = 0f32;
        for i in whole..len {
            let e = row_exp::<SHORT>((*row.add(i) - max) * scale);
            rest += e;
            store_one(i, e);
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        1.0 / (lanes.iter().sum::<f32>() + rest)
    }

    /// [`super::exponentials`] with [`exp16`]'s fused products and sums: the same operations in
    /// the same order but for the fusing, so within a few ulps of the portable row (tested).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_f32(row: &mut [f32], scale: f32) -> f32 {
        let max = row_max(row);
        if !max.is_finite() {
            return f32::NAN;
        }
        let (len, p) = (row.len(), row.as_mut_ptr());
        // Each value is overwritten by its own exponential, after it was read.
        let store = |i: usize, e: __m512| _mm512_storeu_ps(p.add(i), e);
        exponentials::<false>(p, len, max, scale, store, |i, e| *p.add(i) = e)
    }

    /// See [`super::softmax_row_bf16`]; `row` is left as it was.
    ///
    /// # Safety
    /// The CPU has [`available`]'s features; `out` is as long as `row`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn row_bf16(row: &[f32], scale: f32, out: &mut [bf16]) -> f32 {
        debug_assert_eq!(row.len(), out.len());
        let max = row_max(row);
        if !max.is_finite() {
            out.fill(bf16::ZERO);
            return f32::NAN;
        }
        let o = out.as_mut_ptr();
        let store = |i: usize, e: __m512| {
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(o.add(i).cast(), b);
        };
        let inv = exponentials::<true>(row.as_ptr(), row.len(), max, scale, store, |i, e| {
            *o.add(i) = round(e)
        });
        if inv.is_nan() {
            out.fill(bf16::ZERO);
        }
        inv
    }
}

/// The portable (not dispatched) build of a row, for the tests.
#[cfg(test)]
fn row_generic(row: &mut [f32], scale: f32) {
    let inv = exponentials(row, scale);
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The largest relative error of `exp` over [-87, 0] against f64.
    fn worst_exp_error(exp: fn(f32) -> f32) -> f64 {
        worst_error(exp, -87.0, f64::exp)
    }

    /// The largest relative error of the short exponential (2^x) over [-126, 0] against f64.
    fn worst_exp2_error(exp2: fn(f32) -> f32) -> f64 {
        worst_error(exp2, -126.0, f64::exp2)
    }

    fn worst_error(f: fn(f32) -> f32, from: f32, want: fn(f64) -> f64) -> f64 {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = from * i as f32 / 200_000.0;
            let want = want(x as f64);
            worst = worst.max(((f(x) as f64 - want) / want).abs());
        }
        worst
    }

    #[test]
    fn exp_is_within_a_few_ulps() {
        let worst = worst_exp_error(exp_neg);
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37);
    }

    #[test]
    fn matches_candle_softmax() {
        let dev = Device::Cpu;
        for (shape, scale) in [
            (vec![2usize, 3, 37, 29], 0.125f64),
            (vec![5, 8], 1.0),
            (vec![3, 1], 0.5),
            (vec![4, 1000], 0.044),
        ] {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.61).sin() * 30.0) + (i % 7) as f32)
                .collect();
            let x = Tensor::from_vec(v, shape.as_slice(), &dev).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&(&x * scale).unwrap()).unwrap();
            let got = softmax_scaled_last_dim(x.copy().unwrap(), scale).unwrap();
            let d = crate::test_support::max_abs_diff(&got, &want);
            assert!(d < 1e-6, "{shape:?}: {d}");
        }
    }

    /// The portable row kernel and the one picked for this CPU agree.
    #[test]
    fn generic_and_dispatched_rows_agree() {
        let row: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).cos() * 12.0).collect();
        let (mut a, mut b) = (row.clone(), row);
        row_generic(&mut a, 0.3);
        softmax_row(&mut b, 0.3);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-7 + 1e-6 * y.abs(), "{x} vs {y}");
        }
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    /// The short exponential of bf16 rows is within its bound, exactly 1 at 0, 2^-126 below and
    /// NaN for NaN.
    #[test]
    fn short_exp_is_within_its_bound() {
        let worst = worst_exp2_error(exp2_short);
        assert!(worst < 4e-6, "worst relative error {worst}");
        assert_eq!(exp2_short(0.0), 1.0);
        assert_eq!(exp2_short(-1000.0), f32::MIN_POSITIVE);
        assert!(exp2_short(f32::NAN).is_nan());
    }

    /// The bf16 probabilities are the f32 ones rounded once, but for the shorter exponential: at
    /// most one bf16 step apart, and nearly always equal.
    #[test]
    fn bf16_rows_are_the_f32_rows_rounded() {
        let row: Vec<f32> = (0..1077).map(|i| (i as f32 * 0.53).sin() * 9.0).collect();
        let mut f32_row = row.clone();
        softmax_row(&mut f32_row, 0.7);
        let mut out = vec![bf16::ZERO; 1077];
        let inv = softmax_row_bf16(&mut row.clone(), 0.7, &mut out);
        for (o, p) in out.iter().zip(&f32_row) {
            // One bf16 rounding of the exponential (2^-8 relative at most), the short
            // polynomial, f32 sums.
            let got = o.to_f32() * inv;
            assert!((got - p).abs() <= 4e-3 * p + 1e-12, "{got} vs {p}");
        }
        // The largest term is exactly 1 before scaling.
        assert!(out.iter().any(|o| o.to_f32() == 1.0));
        let mut masked = [f32::NEG_INFINITY; 3];
        let mut out = [bf16::ONE; 3];
        assert!(softmax_row_bf16(&mut masked, 1.0, &mut out).is_nan());
        assert!(out.iter().all(|v| *v == bf16::ZERO));
    }

    /// Rows of every tail length, long rows, large and tiny values, and rows with -inf, +inf and
    /// NaN.
    fn test_rows() -> Vec<Vec<f32>> {
        let mut rows: Vec<Vec<f32>> = (0..70)
            .chain([1077, 4096])
            .map(|n| {
                (0..n)
                    .map(|i| (i as f32 * 0.53 + n as f32).sin() * 40.0)
                    .collect()
            })
            .collect();
        let special = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -1e30, 1e-40];
        for (i, v) in special.iter().enumerate() {
            let mut r: Vec<f32> = (0..37).map(|j| (j as f32 * 0.3).cos() * 5.0).collect();
            r[(7 * i) % 37] = *v;
            rows.push(r);
        }
        rows.push(vec![f32::NEG_INFINITY; 20]);
        rows
    }

    /// The fused full exponential of the AVX-512F f32 rows is within the generic one's bound.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_is_within_a_few_ulps() {
        if !avx512::available_f32() {
            eprintln!("skipped: this CPU lacks AVX-512F (avx512f); the generic exp is tested");
            return;
        }
        // SAFETY: the CPU has AVX-512F (checked above).
        let exp = |x| unsafe { avx512::exp1::<false>(x) };
        let worst = worst_exp_error(exp);
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    /// The AVX-512F f32 rows are the portable rows but for the fused exponential: the same
    /// values and sums within a few ulps, and NaN where they give NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_f32_rows_are_the_generic_rows() {
        if !avx512::available_f32() {
            eprintln!("skipped: this CPU lacks AVX-512F (avx512f); the generic rows are tested");
            return;
        }
        for row in test_rows() {
            for scale in [0.125f32, 0.7, 3.0] {
                let (mut fast, mut generic) = (row.clone(), row.clone());
                // SAFETY: checked above.
                let inv_fast = unsafe { avx512::row_f32(&mut fast, scale) };
                let inv_generic = exponentials(&mut generic, scale);
                let what = format!("{} values, scale {scale}", row.len());
                if inv_generic.is_nan() {
                    assert!(inv_fast.is_nan(), "{what}");
                } else {
                    assert!(
                        (inv_fast - inv_generic).abs() <= 1e-6 * inv_generic,
                        "{what}: {inv_fast} vs {inv_generic}"
                    );
                }
                for (f, g) in fast.iter().zip(&generic) {
                    let close = (f - g).abs() <= 1e-6 * g.abs() + 1e-37;
                    assert!(close || f.to_bits() == g.to_bits(), "{what}: {f} vs {g}");
                }
            }
        }
    }

    /// The fused exponential of the AVX512-BF16 rows is as close to e^x as the generic one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_short_exp_is_within_its_bound() {
        if !avx512::available() {
            eprintln!(
                "skipped: this CPU lacks AVX512-BF16 (avx512bf16); the generic exp is tested"
            );
            return;
        }
        // SAFETY: the CPU has the features (checked above).
        let worst = worst_exp2_error(|x| unsafe { avx512::exp1::<true>(x) });
        assert!(worst < 4e-6, "worst relative error {worst}");
        // SAFETY: as above.
        unsafe {
            assert_eq!(avx512::exp1::<true>(0.0), 1.0);
            assert_eq!(avx512::exp1::<true>(-1000.0), f32::MIN_POSITIVE);
            assert!(avx512::exp1::<true>(f32::NAN).is_nan());
        }
    }

    /// The one-pass AVX512-BF16 rows are the generic rows but for the fused exponential: the
    /// same sum to 1e-6 and the same bf16 values or one step apart (rarely), on every tail
    /// length, long rows, large and tiny values, and rows with -inf, +inf and NaN (the same bits).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_rows_are_the_generic_rows() {
        if !avx512::available() {
            eprintln!(
                "skipped: this CPU lacks AVX512-BF16 (avx512bf16); the generic rows are tested"
            );
            return;
        }
        let (mut flips, mut values) = (0, 0);
        for row in test_rows() {
            for scale in [0.125f32, 0.7, 3.0] {
                let mut fast = vec![bf16::ONE; row.len()];
                let mut generic = vec![bf16::ONE; row.len()];
                // SAFETY: checked above; the lengths match.
                let inv_fast = unsafe { avx512::row_bf16(&row, scale, &mut fast) };
                let inv_generic = row_bf16_generic(&mut row.clone(), scale, &mut generic);
                let what = format!("{} values, scale {scale}", row.len());
                if inv_generic.is_nan() {
                    assert!(inv_fast.is_nan(), "{what}");
                    assert_eq!(fast, generic, "{what}");
                    continue;
                }
                assert!(
                    (inv_fast - inv_generic).abs() <= 1e-6 * inv_generic,
                    "{what}: {inv_fast} vs {inv_generic}"
                );
                for (f, g) in fast.iter().zip(&generic) {
                    assert!(f.to_bits().abs_diff(g.to_bits()) <= 1, "{what}: {f} vs {g}");
                }
                let apart = fast.iter().zip(&generic).filter(|(f, g)| f != g).count();
                flips += apart;
                values += row.len();
            }
        }
        assert!(
            flips * 100 < values,
            "{flips} of {values} values one step apart"
        );
    }

    #[test]
    fn non_finite_rows_give_nan_like_candle() {
        let x = Tensor::new(
            &[[f32::NEG_INFINITY, f32::NEG_INFINITY], [1.0, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let got = softmax_scaled_last_dim(x, 1.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(got[0].iter().all(|v| v.is_nan()));
        assert!((got[1][0] + got[1][1] - 1.0).abs() < 1e-6);
    }
}
