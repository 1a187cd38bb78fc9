//! GroupNorm (diffusers' `nn.GroupNorm`), optionally followed by SiLU, in two passes on the CPU.
//!
//! candle-nn's GroupNorm is a chain of tensor ops (reshape, mean, subtract, square, mean, add,
//! sqrt, divide, scale, shift), each a full pass with its own allocation, and the ResNet blocks
//! follow it with a separate SiLU pass. Here each (image, group) is one task: one read for the
//! mean and variance (f64 sums, the variance taken around the mean), one pass writing
//! `(x - mean) * rstd * gamma + beta` with the SiLU applied in the same pass.
//!
//! bf16 input is widened to f32 for the statistics and the arithmetic and rounded once at the end.
//! Other devices and dtypes use candle-nn's GroupNorm (and `silu`), which the tests also use as
//! the reference.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// GroupNorm with diffusers' weight names (`weight`, `bias`, one per channel).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` for `channels` channels in `groups` groups.
    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Self::new(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    /// Wraps loaded tensors; `channels` must be a multiple of `groups`.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// GroupNorm followed by SiLU (`F.silu(norm(x))`).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        if xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::BF16)
            && xs.rank() >= 2
            && xs.dim(1)? == channels
        {
            let op = GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                gamma: self.weight.to_dtype(DType::F32)?.to_vec1()?,
                beta: self.bias.to_dtype(DType::F32)?.to_vec1()?,
                silu,
            };
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        let norm = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.groups,
            self.eps,
        )?;
        let ys = norm.forward(xs)?;
        if silu {
            candle_nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    silu: bool,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "altdiff-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("group_norm: input must be contiguous");
        };
        let dims = l.shape().dims();
        let spatial: usize = dims[2..].iter().product();
        let run = |x: &[f32]| {
            group_norm_f32(
                x,
                dims[1],
                spatial,
                self.groups,
                &self.gamma,
                &self.beta,
                self.eps,
                self.silu,
            )
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(run(&v[a..b])),
            // bf16 (`--dtype bf16`): statistics and arithmetic in f32, as PyTorch's CPU autocast
            // does for GroupNorm; rounded to bf16 once.
            CpuStorage::BF16(v) => {
                let x = super::convert::to_f32(&v[a..b]);
                CpuStorage::BF16(super::convert::to_bf16(&run(&x)))
            }
            _ => candle_core::bail!("group_norm: input must be f32 or bf16"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// The mean and variance of `xs`, accumulated in f64 over eight lanes.
fn moments(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v as f64;
        }
    }
    let mean = (acc.iter().sum::<f64>() + tail) / n;
    let m = mean as f32;
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| ((v - m) as f64).powi(2))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = (v - m) as f64;
            *a += d * d;
        }
    }
    (mean, (acc.iter().sum::<f64>() + tail) / n)
}

/// GroupNorm over [B, C, spatial] data (contiguous), SiLU after it when `silu`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_f32(
    x: &[f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    let cg = channels / groups;
    let chunk = (cg * spatial).max(1);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(i, (o, xi))| {
            let g = i % groups;
            let (mean, var) = moments(xi);
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            for cc in 0..cg {
                let ch = g * cg + cc;
                let scale = gamma[ch] * rstd;
                let shift = beta[ch];
                let range = cc * spatial..(cc + 1) * spatial;
                for (o, &v) in o[range.clone()].iter_mut().zip(&xi[range]) {
                    let y = (v - mean) * scale + shift;
                    *o = if silu { y / (1.0 + (-y).exp()) } else { y };
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(n: usize, shape: &[usize], phase: f32, offset: f32) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.731 + phase).sin() * 2.5 + offset)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::test_support::max_abs_diff(a, b)
    }

    #[test]
    fn matches_candle_group_norm_and_silu() {
        // [B, C, H, W] as in the ResNets, [B, C, N] as a sequence, a large offset (cancellation),
        // one channel per group, odd sizes.
        for (shape, groups, offset) in [
            (vec![2, 8, 5, 7], 4, 0.0),
            (vec![1, 6, 13], 3, 40.0),
            (vec![2, 4, 3, 3], 4, -3.0),
            (vec![1, 32, 9, 9], 32, 0.5),
        ] {
            let n: usize = shape.iter().product();
            let c = shape[1];
            let x = t(n, &shape, 0.2, offset);
            let w = t(c, &[c], 1.0, 1.0);
            let b = t(c, &[c], 2.0, 0.0);
            for eps in [1e-5, 1e-6] {
                let ours = GroupNorm::new(w.clone(), b.clone(), groups, eps).unwrap();
                let theirs = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)
                    .unwrap()
                    .forward(&x)
                    .unwrap();
                let plain = ours.forward(&x).unwrap();
                assert!(max_diff(&plain, &theirs) < 2e-5, "{shape:?} {groups}");
                let fused = ours.forward_silu(&x).unwrap();
                let want = candle_nn::ops::silu(&theirs).unwrap();
                assert!(max_diff(&fused, &want) < 2e-5, "{shape:?} {groups} silu");
            }
        }
    }

    /// bf16 input: the f32 kernel on the same (bf16) values, rounded once to bf16.
    #[test]
    fn bf16_matches_f32_of_the_same_values() {
        let x = t(2 * 8 * 25, &[2, 8, 5, 5], 0.4, 1.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let (w, b) = (t(8, &[8], 1.0, 1.0), t(8, &[8], 2.0, 0.0));
        let norm = GroupNorm::new(w, b, 4, 1e-5).unwrap();
        for silu in [false, true] {
            let got = norm.run(&x, silu).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let want = norm.run(&x.to_dtype(DType::F32).unwrap(), silu).unwrap();
            let got = got.to_dtype(DType::F32).unwrap();
            let rel = max_diff(&got, &want)
                / want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
            assert!(rel < 1.0 / 128.0, "silu {silu}: {rel}");
        }
    }

    #[test]
    fn bad_group_count_is_an_error() {
        let w = t(6, &[6], 0.0, 1.0);
        assert!(GroupNorm::new(w.clone(), w.clone(), 4, 1e-5).is_err());
        assert!(GroupNorm::new(w.clone(), w, 0, 1e-5).is_err());
    }
}
