//! GroupNorm (diffusers' `nn.GroupNorm`), optionally followed by SiLU, in two passes on the CPU.
//!
//! candle-nn's GroupNorm is a chain of tensor ops (reshape, mean, subtract, square, mean, add,
//! sqrt, divide, scale, shift), each a full pass with its own allocation, and the ResNet blocks
//! follow it with a separate SiLU pass. Here each (image, group) is one task: one read for the
//! mean and variance (f64 sums, the variance taken around the mean), one pass writing
//! `(x - mean) * rstd * gamma + beta` with the SiLU applied in the same pass.
//!
//! A ResNet's time embedding (one value per image and channel) can be added as the values are read
//! ([`GroupNorm::forward_silu_offset`]) instead of in a broadcast pass before the norm.
//!
//! bf16 input is widened to f32 for the statistics and the arithmetic as it is read, and rounded
//! once when written. The pass runs at the CPU's vector width (the crate's pulp dispatch), SiLU
//! with the vectorised exponential of the softmax kernel.
//! gamma and beta are taken to f32 once, when the norm is built (`affine_f32`), not on every call.
//! Other devices and dtypes use candle-nn's GroupNorm (and `silu`), which the tests also use as
//! the reference.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::convert::{filled, Value};
use super::softmax::exp_neg;
use super::{vectorized, Vectorized};

/// GroupNorm with diffusers' weight names (`weight`, `bias`, one per channel).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// The weight and bias in f32 for the CPU kernel, made once (weights on the CPU only).
    affine: Option<(Vec<f32>, Vec<f32>)>,
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
            affine: affine_f32(&weight, &bias)?,
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

    /// `F.silu(norm(xs + offset[:, :, None, None]))` for `xs` [B, C, ...] and one `offset` per
    /// image and channel ([B, C]: a ResNet's time embedding). On the CPU kernel each value gets
    /// its offset as it is read, for the statistics and the output, instead of a pass of its own
    /// (candle's broadcast add, which in bf16 took 0.5 % of a UNet step): in f32 the same values
    /// as adding first; in bf16 the sum is not rounded before the norm (diffusers rounds it).
    pub fn forward_silu_offset(&self, xs: &Tensor, offset: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let fits = dims.len() >= 2 && offset.dims() == &dims[..2];
        if let (true, Some(mut op)) = (fits, self.op(xs, true, false)?) {
            op.offset = Some(offset.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?);
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        if offset.rank() != 2 || dims.len() < 2 {
            candle_core::bail!("group_norm: offset {:?} for input {dims:?}", offset.dims());
        }
        // [B or 1, C or 1] as [B, C, 1, ...], broadcast by candle (which refuses a mismatch).
        let mut shape = offset.dims().to_vec();
        shape.resize(dims.len(), 1);
        self.forward_silu(&xs.broadcast_add(&offset.reshape(shape)?)?)
    }

    /// GroupNorm of `xs` [B, C, H, W] as tokens [B, H*W, C], the layout a transformer's projection
    /// reads (`norm(x).permute(0, 2, 3, 1).reshape(B, H*W, C)`). On the CPU the kernel writes the
    /// tokens directly: the same values as [`Module::forward`], without candle's strided copy (one
    /// thread, one element at a time) of the whole feature map.
    pub fn forward_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        if let Some(op) = self.op(xs, false, true)? {
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        self.forward(xs)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))
    }

    /// The CPU kernel for `xs`, if it applies.
    fn op(&self, xs: &Tensor, silu: bool, tokens: bool) -> Result<Option<GroupNormOp<'_>>> {
        let channels = self.weight.dim(0)?;
        let applies = xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::BF16)
            && xs.rank() >= 2
            && xs.dim(1)? == channels;
        let (true, Some((gamma, beta))) = (applies, &self.affine) else {
            return Ok(None);
        };
        Ok(Some(GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            gamma,
            beta,
            silu,
            tokens,
            offset: None,
        }))
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        if let Some(op) = self.op(xs, silu, false)? {
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

/// A norm's weight and bias in f32 for the CPU kernels, made once when the norm is built (they
/// were converted on every call); None for weights elsewhere, which take candle's ops.
pub(super) fn affine_f32(weight: &Tensor, bias: &Tensor) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    if !weight.device().is_cpu() || !bias.device().is_cpu() {
        return Ok(None);
    }
    let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok(Some((f32s(weight)?, f32s(bias)?)))
}

struct GroupNormOp<'a> {
    groups: usize,
    eps: f64,
    gamma: &'a [f32],
    beta: &'a [f32],
    silu: bool,
    /// Written as tokens [B, spatial, C] (without SiLU).
    tokens: bool,
    /// Added to every value of (image, channel) before the norm ([B, C]; not with `tokens`).
    offset: Option<Vec<f32>>,
}

impl GroupNormOp<'_> {
    /// The op on `x` ([B, C, spatial]: `shape` is (channels, spatial, groups)).
    fn apply<T: Value>(&self, x: &[T], shape: (usize, usize, usize)) -> Vec<T> {
        if self.tokens {
            return group_norm_tokens(x, shape, self.gamma, self.beta, self.eps);
        }
        let affine = (self.gamma, self.beta);
        group_norm(
            x,
            shape,
            affine,
            self.offset.as_deref(),
            self.eps,
            self.silu,
        )
    }
}

impl CustomOp1 for GroupNormOp<'_> {
    fn name(&self) -> &'static str {
        "altdiff-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("group_norm: input must be contiguous");
        };
        let dims = l.shape().dims();
        let spatial: usize = dims[2..].iter().product();
        if let Some(o) = self
            .offset
            .as_ref()
            .filter(|o| o.len() != dims[0] * dims[1])
        {
            candle_core::bail!("group_norm: {} offsets for {:?}", o.len(), &dims[..2]);
        }
        let shape = (dims[1], spatial, self.groups);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&v[a..b], shape)),
            // bf16 (`--dtype bf16`): statistics and arithmetic in f32, as PyTorch's CPU autocast
            // does for GroupNorm; each value widened as it is read and rounded once when written.
            CpuStorage::BF16(v) => CpuStorage::BF16(self.apply(&v[a..b], shape)),
            _ => candle_core::bail!("group_norm: input must be f32 or bf16"),
        };
        if self.tokens {
            return Ok((out, Shape::from((dims[0], spatial, dims[1]))));
        }
        Ok((out, l.shape().clone()))
    }
}

/// The mean and variance of `xs` plus an offset per channel (`spatial` values each), accumulated
/// in f64 over eight lanes: [`moments`] of the sums (the same order where `spatial` is a
/// multiple of 8, so the same values).
#[inline(always)]
fn moments_offset<T: Value>(xs: &[T], spatial: usize, offsets: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = offset_sum(xs, spatial, offsets, |x| x as f64) / n;
    let m = mean as f32;
    let var = offset_sum(xs, spatial, offsets, |x| ((x - m) as f64).powi(2)) / n;
    (mean, var)
}

/// The sum of `f(value + offset)` over `xs` (an offset per `spatial` values), in [`moments`]'
/// eight lanes and order.
#[inline(always)]
fn offset_sum<T: Value>(xs: &[T], spatial: usize, offsets: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut tail = 0f64;
    for (c, &o) in xs.chunks(spatial.max(1)).zip(offsets) {
        let chunks = c.chunks_exact(8);
        tail += chunks
            .remainder()
            .iter()
            .map(|&v| f(v.get() + o))
            .sum::<f64>();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v.get() + o);
            }
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The mean and variance of `xs`, accumulated in f64 over eight lanes (LayerNorm's too).
#[inline(always)]
pub(super) fn moments<T: Value>(xs: &[T]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v.get() as f64).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v.get() as f64;
        }
    }
    let mean = (acc.iter().sum::<f64>() + tail) / n;
    let m = mean as f32;
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| ((v.get() - m) as f64).powi(2))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = (v.get() - m) as f64;
            *a += d * d;
        }
    }
    (mean, (acc.iter().sum::<f64>() + tail) / n)
}

/// `y * sigmoid(y)`, with the crate's vectorised exponential of `-|y|` (relative error below
/// 3e-7; libm's scalar `expf` per value was 2-4 % of a generation).
#[inline(always)]
fn silu(y: f32) -> f32 {
    let e = exp_neg(-y.abs());
    let num = if y >= 0.0 { 1.0 } else { e };
    y * (num / (1.0 + e))
}

/// One (image, group): its statistics, then the normalised (and SiLU'd) values.
struct Group<'a, T> {
    x: &'a [T],
    out: &'a mut [MaybeUninit<T>],
    /// The group's gamma and beta (one per channel), values per channel.
    gamma: &'a [f32],
    beta: &'a [f32],
    /// The group's offsets (one per channel), added to its values first.
    offset: Option<&'a [f32]>,
    spatial: usize,
    eps: f64,
    silu: bool,
}

impl<T: Value> Vectorized for Group<'_, T> {
    #[inline(always)]
    fn run(self) {
        let (mean, var) = match self.offset {
            Some(o) => moments_offset(self.x, self.spatial, o),
            None => moments(self.x),
        };
        let rstd = (1.0 / (var + self.eps).sqrt()) as f32;
        let mean = mean as f32;
        let channels = self
            .x
            .chunks(self.spatial)
            .zip(self.out.chunks_mut(self.spatial));
        let affine = self.gamma.iter().zip(self.beta);
        for (c, ((xc, oc), (&gamma, &shift))) in channels.zip(affine).enumerate() {
            let scale = gamma * rstd;
            match self.offset {
                Some(o) => {
                    let o = o[c];
                    for (o_, &v) in oc.iter_mut().zip(xc) {
                        let y = (v.get() + o - mean) * scale + shift;
                        o_.write(T::put(if self.silu { silu(y) } else { y }));
                    }
                }
                None => {
                    for (o, &v) in oc.iter_mut().zip(xc) {
                        let y = (v.get() - mean) * scale + shift;
                        o.write(T::put(if self.silu { silu(y) } else { y }));
                    }
                }
            }
        }
    }
}

/// GroupNorm over [B, C, spatial] data (contiguous) with gamma and beta (`affine`), each value
/// plus its (image, channel)'s `offset` first ([B, C], when given), SiLU after it when `silu`.
pub(crate) fn group_norm<T: Value>(
    x: &[T],
    (channels, spatial, groups): (usize, usize, usize),
    (gamma, beta): (&[f32], &[f32]),
    offset: Option<&[f32]>,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    let cg = channels / groups;
    let chunk = (cg * spatial).max(1);
    let fill = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let g = i % groups;
                // Task i is image i / groups, channels g * cg.. of it.
                let first = (i / groups) * channels + g * cg;
                vectorized(Group {
                    x,
                    out,
                    gamma: &gamma[g * cg..(g + 1) * cg],
                    beta: &beta[g * cg..(g + 1) * cg],
                    offset: offset.map(|o| &o[first..first + cg]),
                    spatial: spatial.max(1),
                    eps,
                    silu,
                })
            })
    };
    // SAFETY: the chunks cover the output, and each task writes every element of its chunk (the
    // chunk of cg channels of `spatial` values that it reads from `x`, of the same length).
    unsafe { filled(x.len(), fill) }
}

/// One (image, group)'s mean and `1 / sqrt(var + eps)`, as [`Group`] computes them.
struct Stats<'a, T> {
    x: &'a [T],
    eps: f64,
    out: &'a mut (f32, f32),
}

impl<T: Value> Vectorized for Stats<'_, T> {
    #[inline(always)]
    fn run(self) {
        let (mean, var) = moments(self.x);
        *self.out = (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32);
    }
}

/// Positions per block of [`group_norm_tokens`] (a block of all channels stays in L2).
const TOKEN_BLOCK: usize = 64;
/// Channels normalised together before they are written across the block's token rows.
const CHANNEL_BLOCK: usize = 16;

/// One block of positions of one image, written as token rows of all channels.
struct TokenBlock<'a, T> {
    /// The image's [C, spatial] values.
    x: &'a [T],
    /// Token rows `p0..p0 + n` of the image ([n, C]).
    out: &'a mut [MaybeUninit<T>],
    p0: usize,
    spatial: usize,
    /// Per channel: its group's mean, `gamma * rstd` and beta.
    mean: &'a [f32],
    scale: &'a [f32],
    beta: &'a [f32],
}

impl<T: Value> Vectorized for TokenBlock<'_, T> {
    #[inline(always)]
    fn run(self) {
        let channels = self.mean.len();
        let n = self.out.len() / channels.max(1);
        let mut tile = [[0f32; TOKEN_BLOCK]; CHANNEL_BLOCK];
        for c0 in (0..channels).step_by(CHANNEL_BLOCK) {
            let cb = CHANNEL_BLOCK.min(channels - c0);
            for (i, row) in tile.iter_mut().enumerate().take(cb) {
                let c = c0 + i;
                let (mean, scale, shift) = (self.mean[c], self.scale[c], self.beta[c]);
                let xs = &self.x[c * self.spatial + self.p0..][..n];
                for (y, &v) in row.iter_mut().zip(xs) {
                    // The same expression as `Group`: bit-identical values.
                    *y = (v.get() - mean) * scale + shift;
                }
            }
            for (j, token) in self.out.chunks_exact_mut(channels).enumerate() {
                for (i, o) in token[c0..c0 + cb].iter_mut().enumerate() {
                    o.write(T::put(tile[i][j]));
                }
            }
        }
    }
}

/// GroupNorm over [B, C, spatial] data (contiguous), written as tokens [B, spatial, C]: the values
/// of [`group_norm`] without SiLU, transposed in cache-sized blocks on all threads.
pub(crate) fn group_norm_tokens<T: Value>(
    x: &[T],
    (channels, spatial, groups): (usize, usize, usize),
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Vec<T> {
    let cg = channels / groups.max(1);
    let chunk = (cg * spatial).max(1);
    let mut stats = vec![(0f32, 0f32); x.len() / chunk];
    stats
        .par_iter_mut()
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| vectorized(Stats { x, eps, out }));
    let image = (channels * spatial).max(1);
    let fill = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(image)
            .zip(x.par_chunks(image))
            .enumerate()
            .for_each(|(b, (out, x))| {
                // Per channel: its group's mean, gamma * rstd (as `Group`), and beta.
                let per_channel = |f: &dyn Fn(usize, (f32, f32)) -> f32| -> Vec<f32> {
                    (0..channels)
                        .map(|c| f(c, stats[b * groups + c / cg]))
                        .collect()
                };
                let mean = per_channel(&|_, (m, _)| m);
                let scale = per_channel(&|c, (_, r)| gamma[c] * r);
                out.par_chunks_mut(TOKEN_BLOCK * channels)
                    .enumerate()
                    .for_each(|(blk, out)| {
                        vectorized(TokenBlock {
                            x,
                            out,
                            p0: blk * TOKEN_BLOCK,
                            spatial,
                            mean: &mean,
                            scale: &scale,
                            beta,
                        })
                    })
            })
    };
    // SAFETY: the images' chunks cover the output; each block task writes every channel of each
    // of its token rows (`TokenBlock` covers all channel blocks).
    unsafe { filled(x.len(), fill) }
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

    /// The time embedding's offset read into the norm: in f32 the values of adding it first
    /// (bit for bit where the spatial size is a multiple of 8, the lanes' order), in bf16 those
    /// of the f32 kernel on the same values within a rounding; a [1, C] offset is broadcast by
    /// candle first, and other shapes are errors.
    #[test]
    fn offset_is_the_broadcast_add_first() {
        for (shape, groups) in [
            (vec![2, 8, 4, 4], 4),
            (vec![2, 6, 5, 7], 3),
            (vec![1, 4, 9], 2),
        ] {
            let n: usize = shape.iter().product();
            let (b, c) = (shape[0], shape[1]);
            let x = t(n, &shape, 0.2, 1.5);
            let offset = (t(b * c, &[b, c], 3.0, 0.0) * 7.0).unwrap();
            let norm =
                GroupNorm::new(t(c, &[c], 1.0, 1.0), t(c, &[c], 2.0, 0.0), groups, 1e-5).unwrap();
            let mut bc = vec![b, c];
            bc.resize(shape.len(), 1);
            let added = x.broadcast_add(&offset.reshape(bc).unwrap()).unwrap();
            let want = norm.forward_silu(&added).unwrap();
            let got = norm.forward_silu_offset(&x, &offset).unwrap();
            assert_eq!(got.dims(), want.dims());
            let spatial: usize = shape[2..].iter().product();
            if spatial.is_multiple_of(8) {
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{shape:?}"
                );
            } else {
                assert!(max_diff(&got, &want) < 1e-5, "{shape:?}");
            }
            // bf16: the f32 kernel on the same values (the offset not rounded), rounded once.
            let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let norm16 = GroupNorm::new(
                bf(&t(c, &[c], 1.0, 1.0)),
                bf(&t(c, &[c], 2.0, 0.0)),
                groups,
                1e-5,
            )
            .unwrap();
            let got = norm16.forward_silu_offset(&bf(&x), &bf(&offset)).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = norm
                .forward_silu_offset(&wide(&bf(&x)), &wide(&bf(&offset)))
                .unwrap();
            let d = max_diff(&wide(&got), &want);
            assert!(d < 2f32.powi(-7) * 3.0, "bf16 {shape:?}: {d}");
            // A [1, C] offset broadcasts over the images; other shapes are errors.
            let row = offset.narrow(0, 0, 1).unwrap();
            let got = norm.forward_silu_offset(&x, &row).unwrap();
            let want = norm
                .forward_silu_offset(&x, &row.broadcast_as((b, c)).unwrap().contiguous().unwrap())
                .unwrap();
            assert!(max_diff(&got, &want) < 1e-6);
            assert!(norm
                .forward_silu_offset(&x, &t(c + 1, &[c + 1], 0.0, 0.0))
                .is_err());
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

    /// Tokens [B, H*W, C]: exactly the values of the NCHW kernel, transposed, in f32 and bf16, on
    /// sizes that end off the position and channel blocks.
    #[test]
    fn tokens_are_the_transposed_values() {
        for (shape, groups) in [
            (vec![2, 40, 9, 11], 8),
            (vec![1, 16, 8, 8], 16),
            (vec![2, 6, 1, 130], 3),
            (vec![1, 33, 3, 5], 11),
        ] {
            let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            let n: usize = shape.iter().product();
            let norm =
                GroupNorm::new(t(c, &[c], 1.0, 1.0), t(c, &[c], 2.0, 0.0), groups, 1e-5).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let x = t(n, &shape, 0.2, 0.7).to_dtype(dtype).unwrap();
                let got = norm.forward_tokens(&x).unwrap();
                let want = norm
                    .forward(&x)
                    .unwrap()
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .reshape((b, h * w, c))
                    .unwrap();
                assert_eq!(got.dims(), [b, h * w, c]);
                assert_eq!(got.dtype(), dtype);
                let flat = crate::test_support::flat_f32;
                assert_eq!(flat(&got), flat(&want), "{shape:?} {dtype:?}");
            }
        }
    }

    #[test]
    fn bad_group_count_is_an_error() {
        let w = t(6, &[6], 0.0, 1.0);
        assert!(GroupNorm::new(w.clone(), w.clone(), 4, 1e-5).is_err());
        assert!(GroupNorm::new(w.clone(), w, 0, 1e-5).is_err());
    }
}
