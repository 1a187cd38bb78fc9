//! LayerNorm over the last dimension (diffusers' and transformers' `nn.LayerNorm`: the UNet's
//! transformer blocks and the text encoder) on the CPU, in f32 and in bf16.
//!
//! candle-nn's layer-norm op sums each row one value at a time (an f32 sum is a chain the compiler
//! may not reorder, so it stays scalar), widens and rounds bf16 one value at a time through
//! `half`'s scalar conversions, and zeroes its output before it writes it: in a bf16 m18 UNet
//! step's profile (2-vCPU Zen 4) that was 1.4 % of the step. Here each task is a block of rows:
//! the mean and variance of a row as [`super::group_norm`] takes them (f64 sums over eight lanes,
//! the variance around the mean, as PyTorch's Welford moments give it, rather than candle's
//! `E[x^2] - mean^2`), then `(x - mean) * rstd * gamma + beta` in one pass at the CPU's vector
//! width (the crate's pulp dispatch), bf16 widened as it is read and rounded once when written.
//! `layer_norm_speed` (Zen 4, 2 threads), m18's 64x64 token rows with guidance (8192 x 320): bf16
//! 2.49 -> 0.72 ms a call, f32 1.58 -> 0.58 ms.
//! The weight and bias are taken to f32 once, when the norm is built (`group_norm::affine_f32`).
//!
//! Other devices and dtypes use candle-nn's LayerNorm, which the tests also use as the reference.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::convert::{filled, Value};
use super::group_norm::{affine_f32, moments};
use super::{vectorized, Vectorized};

/// Rows per task (m18's 64x64 level has 8,192 token rows of 320 with guidance).
const ROWS: usize = 16;

/// LayerNorm with a weight and a bias (`weight`, `bias`) over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// candle-nn's, for other devices and dtypes.
    inner: candle_nn::LayerNorm,
    eps: f64,
    /// The weight and bias in f32 for the CPU kernel, made once (with a bias, on the CPU).
    affine: Option<(Vec<f32>, Vec<f32>)>,
}

/// Loads a LayerNorm of `size` features (`weight` and `bias`, or their old names `gamma` and
/// `beta`, as candle-nn's `layer_norm` finds them).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    LayerNorm::new(candle_nn::layer_norm(size, eps, vb)?, eps)
}

impl LayerNorm {
    /// Wraps candle-nn's LayerNorm (whose `eps` it does not expose).
    pub fn new(inner: candle_nn::LayerNorm, eps: f64) -> Result<Self> {
        let affine = match inner.bias() {
            Some(bias) => affine_f32(inner.weight(), bias)?,
            None => None,
        };
        Ok(Self { inner, eps, affine })
    }

    /// The CPU kernel for `xs`, if it applies.
    fn op(&self, xs: &Tensor) -> Option<LayerNormOp<'_>> {
        let applies = xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::BF16)
            && xs.rank() >= 1;
        let (true, Some((gamma, beta))) = (applies, &self.affine) else {
            return None;
        };
        Some(LayerNormOp {
            gamma,
            beta,
            eps: self.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.op(xs) {
            Some(op) => xs.contiguous()?.apply_op1_no_bwd(&op),
            None => self.inner.forward(xs),
        }
    }
}

struct LayerNormOp<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f64,
}

impl CustomOp1 for LayerNormOp<'_> {
    fn name(&self) -> &'static str {
        "altdiff-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("layer_norm: input must be contiguous");
        };
        let width = l.shape().dims().last().copied().unwrap_or(0);
        if width != self.gamma.len() || self.beta.len() != width {
            candle_core::bail!(
                "layer_norm: {width} features for a norm of {}",
                self.gamma.len()
            );
        }
        let affine = (self.gamma, self.beta);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(layer_norm_rows(&v[a..b], affine, self.eps)),
            // bf16: statistics and arithmetic in f32 (PyTorch's CPU autocast runs LayerNorm in
            // f32), each value widened as it is read and rounded once when written.
            CpuStorage::BF16(v) => CpuStorage::BF16(layer_norm_rows(&v[a..b], affine, self.eps)),
            _ => candle_core::bail!("layer_norm: input must be f32 or bf16"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// A block of rows: each row's statistics, then its normalised values.
struct Rows<'a, T> {
    x: &'a [T],
    out: &'a mut [MaybeUninit<T>],
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f64,
}

impl<T: Value> Vectorized for Rows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let width = self.gamma.len().max(1);
        for (x, out) in self.x.chunks(width).zip(self.out.chunks_mut(width)) {
            let (mean, var) = moments(x);
            let rstd = (1.0 / (var + self.eps).sqrt()) as f32;
            let mean = mean as f32;
            let affine = self.gamma.iter().zip(self.beta);
            for ((o, &v), (&gamma, &beta)) in out.iter_mut().zip(x).zip(affine) {
                o.write(T::put((v.get() - mean) * rstd * gamma + beta));
            }
        }
    }
}

/// LayerNorm of every row (`gamma.len()` values) of contiguous `x` with `gamma` and `beta`.
fn layer_norm_rows<T: Value>(x: &[T], (gamma, beta): (&[f32], &[f32]), eps: f64) -> Vec<T> {
    let chunk = (ROWS * gamma.len()).max(1);
    let fill = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out, x)| {
                vectorized(Rows {
                    x,
                    out,
                    gamma,
                    beta,
                    eps,
                })
            })
    };
    // SAFETY: the chunks cover the output, and each task writes every element of its chunk (its
    // rows of `x`, of the same length: whole rows, as the caller checked the width).
    unsafe { filled(x.len(), fill) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(width: usize, dtype: DType) -> LayerNorm {
        let w = crate::test_support::sine(&[width], 0.3, 0.8);
        let b = crate::test_support::sine(&[width], 1.1, 0.5);
        let (w, b) = ((w + 1.0).unwrap(), b);
        let inner =
            candle_nn::LayerNorm::new(w.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap(), 1e-5);
        LayerNorm::new(inner, 1e-5).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let f = crate::test_support::flat_f32;
        f(a).iter()
            .zip(f(b))
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    /// Against candle-nn's LayerNorm in f32 (rows of a few values, of a register and more, with an
    /// offset that makes `E[x^2] - mean^2` lose digits; more rows than a task).
    #[test]
    fn matches_candle_layer_norm() {
        for (rows, width, offset) in [(1, 1, 0.0), (3, 7, 0.5), (40, 320, 3.0), (17, 33, -2.0)] {
            let n = norm(width, DType::F32);
            let xs = (crate::test_support::sine(&[rows, width], 0.7, 1.3) + offset).unwrap();
            let got = n.forward(&xs).unwrap();
            let want = n.inner.forward(&xs).unwrap();
            assert_eq!(got.dims(), xs.dims());
            let diff = max_rel(&got, &want);
            assert!(diff < 2e-5, "{rows}x{width}: {diff}");
        }
    }

    /// bf16: the f32 norm of the same values, rounded once (within one bf16 rounding).
    #[test]
    fn bf16_matches_f32_of_the_same_values() {
        let xs = crate::test_support::sine(&[2, 19, 80], 0.2, 2.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let got = norm(80, DType::BF16).forward(&xs).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let n32 = norm(80, DType::BF16);
        let inner = candle_nn::LayerNorm::new(
            f32(n32.inner.weight()),
            f32(n32.inner.bias().unwrap()),
            1e-5,
        );
        let n32 = LayerNorm::new(inner, 1e-5).unwrap();
        let want = n32.forward(&f32(&xs)).unwrap();
        let diff = max_rel(&got, &want);
        assert!(diff <= 1.0 / 256.0, "{diff}");
        // And not the f32 values themselves (the output is bf16, rounded).
        assert!(diff > 0.0);
    }

    /// A transposed (not contiguous) input is made contiguous first; a width that is not the
    /// norm's is an error, not a panic.
    #[test]
    fn strided_input_and_wrong_width() {
        let n = norm(6, DType::F32);
        let xs = crate::test_support::sine(&[6, 4], 0.1, 1.0);
        let t = xs.t().unwrap();
        let got = n.forward(&t).unwrap();
        let want = n.inner.forward(&t.contiguous().unwrap()).unwrap();
        assert!(max_rel(&got, &want) < 2e-5);
        let op = n.op(&xs).unwrap();
        assert!(xs.apply_op1_no_bwd(&op).is_err());
    }

    /// `cargo test --release --lib layer_norm_speed -- --ignored --nocapture`: m18's 64x64 and
    /// 16x16 token rows with guidance, this kernel against candle-nn's op.
    #[test]
    #[ignore]
    fn layer_norm_speed() {
        for (rows, width) in [(8192, 320), (512, 1280)] {
            for dtype in [DType::BF16, DType::F32] {
                let n = norm(width, dtype);
                let xs = crate::test_support::sine(&[2, rows / 2, width], 0.7, 1.3)
                    .to_dtype(dtype)
                    .unwrap();
                let time = crate::test_support::best_time;
                let own = time(20, &mut || drop(n.forward(&xs).unwrap()));
                let candle = time(20, &mut || drop(n.inner.forward(&xs).unwrap()));
                println!(
                    "{rows}x{width} {dtype:?}: {:.2} ms, candle-nn {:.2} ms",
                    own * 1e3,
                    candle * 1e3
                );
            }
        }
    }
}
