//! GEGLU, the transformer feed-forward's activation (diffusers' `GEGLU`: the projection's output
//! is `[value, gate]` along the last dimension, the result `value * gelu(gate)` with the exact,
//! erf-based GELU), in one pass on the CPU for f32 and bf16; and that GELU alone ([`gelu_erf`],
//! the text encoder's feed-forward activation: candle's scalar `erff` per value was 4 % of the f32
//! text encoding, Zen 4, `perf`).
//!
//! candle does it as narrow + `gelu_erf` + mul, three passes over the UNet's largest activations,
//! with a scalar erf per value; in bf16 its `gelu_erf` goes through f64 for every value. That was
//! 8 % of a bf16 UNet step (Zen 5, `perf`). Here erf is the rational approximation of Eigen's
//! vectorised f32 erf (no exponential; |error| below 5e-7 against an f64 erf, 2-4 ulps of f32
//! near 1, tested; PyTorch's CPU GELU uses Abramowitz & Stegun 7.1.26, 1.5e-7 before f32
//! rounding, so both sides are that far from the exact erf), the loop
//! runs at the CPU's vector width through the crate's pulp dispatch, and bf16 is widened,
//! computed in f32 and rounded once (PyTorch rounds after the GELU and again after the product).
//!
//! The bf16 UNet on CPUs with AVX512-BF16 does not take this pass: its projection's tiles apply
//! GEGLU to their own sums ([`super::linear::GegluLinear`], with `avx512::gelu16`, the same
//! operations as `gelu` in registers, the same bits). That saves writing the projection's output
//! (twice the activation's width) and reading it back, and one rounding. Paired m18 bf16 runs (3
//! DDIM steps, Zen 4, 2 threads, three pairs): UNet step min 3.89 / 4.13 / 3.96 -> 3.88 / 4.12 /
//! 3.92 s, median 4.22 / 4.38 / 4.33 -> 4.06 / 4.17 / 3.98 s.
//!
//! Other devices and dtypes take candle's ops, which the tests also use as the reference.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::convert::Value;
use super::{contiguous, vectorized, Vectorized};

/// Rows per parallel task.
const ROWS: usize = 64;

/// `value * gelu_erf(gate)` for `h` = `[.., 2n]` = `[value (n), gate (n)]`: a `[.., n]` tensor.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::BF16) {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let half = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, half)?;
    let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
    value * gate
}

/// The exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`, elementwise: on the CPU in one vectorised pass
/// (bf16 widened, computed in f32 and rounded once), elsewhere candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return x.contiguous()?.apply_op1_no_bwd(&Gelu);
    }
    x.gelu_erf()
}

/// The numerator of [`erf`]'s rational function, in powers of x^2 from the highest.
const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
/// Its denominator.
const ERF_Q: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329_3e-3,
    -1.426_474e-2,
];

/// erf(x) as Eigen's (and XLA's) vectorised f32 erf: a rational function of x on [-4, 4]
/// (erf(4) is 1 in f32), no exponential.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ERF_P[1..].iter().fold(ERF_P[0], |acc, &c| acc * x2 + c);
    let q = ERF_Q[1..].iter().fold(ERF_Q[0], |acc, &c| acc * x2 + c);
    x * p / q
}

/// The exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
pub(super) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// [`gelu`] in AVX-512 registers, for kernels that apply it to their results where they are
/// computed (the bf16 feed-forward's GEGLU in [`super::gemm_bf16`]'s tiles).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{ERF_P, ERF_Q};
    use std::arch::x86_64::*;

    /// [`super::gelu`] of 16 values: the same operations in the same order (a multiply and an
    /// add where the scalar code has `acc * x2 + c`, no fused multiply-add), so the same bits
    /// (tested); NaN stays NaN as `f32::clamp` leaves it.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::kernels) unsafe fn gelu16(x: __m512) -> __m512 {
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        // min / max return their second operand when either is NaN: a NaN passes through.
        let t = _mm512_max_ps(_mm512_set1_ps(-4.0), _mm512_min_ps(_mm512_set1_ps(4.0), t));
        let t2 = _mm512_mul_ps(t, t);
        let mut p = _mm512_set1_ps(ERF_P[0]);
        for &c in &ERF_P[1..] {
            p = _mm512_add_ps(_mm512_mul_ps(p, t2), _mm512_set1_ps(c));
        }
        let mut q = _mm512_set1_ps(ERF_Q[0]);
        for &c in &ERF_Q[1..] {
            q = _mm512_add_ps(_mm512_mul_ps(q, t2), _mm512_set1_ps(c));
        }
        let erf = _mm512_div_ps(_mm512_mul_ps(t, p), q);
        let half_x = _mm512_mul_ps(_mm512_set1_ps(0.5), x);
        _mm512_mul_ps(half_x, _mm512_add_ps(_mm512_set1_ps(1.0), erf))
    }
}

/// Rows of `[value, gate]` (2n each) into rows of n.
struct Rows<'a, T> {
    src: &'a [T],
    dst: &'a mut [T],
    n: usize,
}

impl<T: Value> Vectorized for Rows<'_, T> {
    #[inline(always)]
    fn run(self) {
        for (row, out) in self
            .src
            .chunks_exact(2 * self.n)
            .zip(self.dst.chunks_mut(self.n))
        {
            let (value, gate) = row.split_at(self.n);
            for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
                *o = T::put(v.get() * gelu(g.get()));
            }
        }
    }
}

fn run<T: Value>(src: &[T], n: usize) -> Vec<T> {
    let rows = src.len() / (2 * n);
    let mut out = vec![T::default(); rows * n];
    out.par_chunks_mut(ROWS * n)
        .zip(src.par_chunks(ROWS * 2 * n))
        .for_each(|(dst, src)| vectorized(Rows { src, dst, n }));
    out
}

/// Values per parallel task of [`gelu_erf`].
const CHUNK: usize = 1 << 14;

/// `gelu` of every value of `src` into `dst` (the same length).
struct Values<'a, T> {
    src: &'a [T],
    dst: &'a mut [std::mem::MaybeUninit<T>],
}

impl<T: Value> Vectorized for Values<'_, T> {
    #[inline(always)]
    fn run(self) {
        for (o, v) in self.dst.iter_mut().zip(self.src) {
            o.write(T::put(gelu(v.get())));
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "altdiff-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn all<T: Value>(src: &[T]) -> Vec<T> {
            let fill = |dst: &mut [std::mem::MaybeUninit<T>]| {
                dst.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(dst, src)| vectorized(Values { src, dst }))
            };
            // SAFETY: the chunks cover `dst`, and `Values` writes every element of each.
            unsafe { super::convert::filled(src.len(), fill) }
        }
        let storage = match s {
            CpuStorage::F32(v) => CpuStorage::F32(all(contiguous(v, l, "gelu: input")?)),
            CpuStorage::BF16(v) => CpuStorage::BF16(all(contiguous(v, l, "gelu: input")?)),
            _ => candle_core::bail!("gelu: input must be f32 or bf16"),
        };
        Ok((storage, l.shape().clone()))
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "altdiff-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let Some(last) = dims.last_mut().filter(|d| **d != 0 && d.is_multiple_of(2)) else {
            let last = l.dims().last().copied().unwrap_or(0);
            candle_core::bail!("geglu: the last dimension ({last}) must be even and not zero");
        };
        *last /= 2;
        let n = *last;
        let storage = match s {
            CpuStorage::F32(v) => CpuStorage::F32(run(contiguous(v, l, "geglu: input")?, n)),
            CpuStorage::BF16(v) => CpuStorage::BF16(run(contiguous(v, l, "geglu: input")?, n)),
            _ => candle_core::bail!("geglu: input must be f32 or bf16"),
        };
        Ok((storage, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use half::bf16;

    fn input(rows: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * 2 * n)
            .map(|i| (i as f32 * 0.731).sin() * 4.0 + (i % 5) as f32 * 0.3 - 0.6)
            .collect();
        Tensor::from_vec(v, (1, rows, 2 * n), &Device::Cpu).unwrap()
    }

    /// candle's narrow + gelu_erf + mul, the reference.
    fn reference(h: &Tensor) -> Tensor {
        let half = h.dim(D::Minus1).unwrap() / 2;
        let value = h.narrow(D::Minus1, 0, half).unwrap();
        let gate = h.narrow(D::Minus1, half, half).unwrap().gelu_erf().unwrap();
        (value * gate).unwrap()
    }

    #[test]
    fn erf_is_within_its_bound() {
        let mut worst = [0f64; 9];
        for i in -90_000..=90_000 {
            let x = i as f64 / 10_000.0;
            let e = (erf(x as f32) as f64 - candle_core::cpu::erf::erf_f64(x)).abs();
            let b = (x.abs() as usize).min(8);
            worst[b] = worst[b].max(e);
        }
        println!("worst |erf error| per unit of |x|: {worst:?}");
        let worst = worst.iter().fold(0f64, |a, &b| a.max(b));
        assert!(worst < 5e-7, "worst |error| {worst}");
    }

    /// The AVX-512 GELU is the scalar one, bit for bit: across erf's clamp, at its ends, on
    /// zeros, tiny and huge values, infinities and NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gelu16_is_gelu() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F (avx512f), which gelu16 needs");
            return;
        }
        let mut xs: Vec<f32> = (-80_000..=80_000).map(|i| i as f32 * 1e-4).collect();
        let s2 = std::f32::consts::SQRT_2;
        xs.extend([4.0 * s2, -4.0 * s2, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38]);
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: this CPU has AVX-512F; chunk and got hold 16 values.
            unsafe {
                use std::arch::x86_64::*;
                let y = avx512::gelu16(_mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), y);
            }
            for (g, &x) in got.iter().zip(chunk) {
                let want = gelu(x);
                let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
                assert!(same, "gelu({x:e}): {g:e} against {want:e}");
            }
        }
    }

    #[test]
    fn f32_matches_candle() {
        // 130 rows: more than one task and a partial last one.
        for (rows, n) in [(1, 1), (7, 33), (130, 64)] {
            let h = input(rows, n);
            let got = geglu(&h).unwrap();
            assert_eq!(got.dims(), &[1, rows, n]);
            let d = crate::test_support::max_abs_diff(&got, &reference(&h));
            // |value|, |gate| <= 5.2: |gelu error| <= 5.2 * 5e-7 / 2, times |value|, plus rounding.
            assert!(d < 8e-6, "{rows}x{n}: {d}");
        }
    }

    #[test]
    fn bf16_rounds_the_f32_result_once() {
        let h = input(70, 48).to_dtype(DType::BF16).unwrap();
        let got = geglu(&h).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = geglu(&h.to_dtype(DType::F32).unwrap()).unwrap();
        let (got, want) = (
            got.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            want.flatten_all().unwrap(),
        );
        for (g, w) in got
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(want.to_vec1::<f32>().unwrap())
        {
            assert_eq!(*g, bf16::from_f32(w).to_f32(), "{g} vs {w}");
        }
    }

    #[test]
    fn gelu_matches_candle_and_rounds_bf16_once() {
        // More than one task and a partial last one; a transposed input is made contiguous.
        let x = input(300, 100).squeeze(0).unwrap();
        for x in [x.clone(), x.t().unwrap()] {
            let got = gelu_erf(&x).unwrap();
            assert_eq!(got.dims(), x.dims());
            let d = crate::test_support::max_abs_diff(&got, &x.gelu_erf().unwrap());
            // |x| <= 5.2: |gelu error| <= 5.2 * 5e-7 / 2, plus rounding.
            assert!(d < 4e-6, "{d}");
        }
        let b = x.to_dtype(DType::BF16).unwrap();
        let got = gelu_erf(&b).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = gelu_erf(&b.to_dtype(DType::F32).unwrap()).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = bits(&got.to_dtype(DType::F32).unwrap());
        for (g, w) in got.iter().zip(bits(&want)) {
            assert_eq!(*g, bf16::from_f32(w).to_f32(), "{g} vs {w}");
        }
    }

    #[test]
    fn odd_width_is_an_error_and_strided_input_works() {
        let h = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(geglu(&h).is_err());
        // A transposed (non-contiguous) input is made contiguous first.
        let h = input(6, 4).squeeze(0).unwrap().t().unwrap();
        let got = geglu(&h).unwrap();
        let d = crate::test_support::max_abs_diff(&got, &reference(&h));
        assert!(d < 8e-6, "{d}");
    }
}
