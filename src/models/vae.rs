//! diffusers' `AutoencoderKL`: the decoder (`post_quant_conv` + `decoder`) and, for image-to-image
//! and inpainting, the encoder (`encoder` + `quant_conv` + `DiagonalGaussianDistribution`).
//!
//! Owned blocks (mid block with its single-head attention, up and down blocks, ResNets) on the CPU
//! kernels of [`crate::kernels`] and the blocked attention of [`super::attention`]:
//! candle-transformers' VAE materialises the whole attention score matrix (1 GiB at 512x512 output,
//! 16 GiB at 1024x1024) and runs candle's conv2d and GroupNorm. The two halves are separate
//! networks, so text-to-image never loads the encoder; every size comes from `vae/config.json`.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels::linear::Linear;

use super::attention::attend;
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::config::VaeConfig;
use crate::kernels::winograd::Largest;
use crate::kernels::{Conv2d, GroupNorm};

const EPS: f64 = 1e-6;

fn pad1() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

/// A `channels x channels` projection saved either as a linear layer or (old checkpoints) as a
/// 1x1 convolution.
fn projection(channels: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Linear::new(candle_nn::Linear::new(
        weight,
        Some(vb.get(channels, "bias")?),
    ))
}

/// The mid block's self-attention over all pixels: one head of `channels` dimensions (diffusers'
/// decoder sets `attention_head_dim` to the channel count), residual added.
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: GroupNorm::load(groups, channels, EPS, vb.pp("group_norm"))?,
            to_q: projection(channels, vb.pp(q))?,
            to_k: projection(channels, vb.pp(k))?,
            to_v: projection(channels, vb.pp(v))?,
            to_out: projection(channels, vb.pp(o))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |l: &Linear| -> candle_core::Result<Tensor> {
            l.forward(&tokens)?.unsqueeze(1)?.contiguous()
        };
        let out = attend(
            &heads(&self.to_q)?,
            &heads(&self.to_k)?,
            &heads(&self.to_v)?,
            1.0 / (c as f64).sqrt(),
            super::attention::MAX_SCORE_ELEMENTS,
        )?
        .squeeze(1)?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D`: ResNet, attention, ResNet.
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: VaeAttention,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let cfg = resnet_config(channels, groups);
        Ok(Self {
            resnets: [
                ResnetBlock2D::new(vb.pp("resnets.0"), channels, cfg)?,
                ResnetBlock2D::new(vb.pp("resnets.1"), channels, cfg)?,
            ],
            attention: VaeAttention::new(vb.pp("attentions.0"), channels, groups)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.resnets[0].forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.resnets[1].forward(&xs, None)
    }
}

/// The VAE's ResNets: no time embedding, eps 1e-6, no output scaling.
fn resnet_config(out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        out_channels,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
        winograd: Largest::F4,
    }
}

/// `UpDecoderBlock2D`: ResNets, then nearest x2 upsampling and a 3x3 convolution.
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

/// Latents -> image in [-1, 1].
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads `post_quant_conv.*` and `decoder.*` from `vae/` weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let last = ch[n - 1];
        let groups = cfg.norm_num_groups;
        let resnet = |out: usize| resnet_config(out, groups);
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::load(
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let mid = MidBlock::new(d.pp("mid_block"), last, groups)?;
        let up = (0..n)
            .map(|i| {
                let out = ch[n - 1 - i];
                let cin = if i == 0 { last } else { ch[n - i] };
                let u = d.pp(format!("up_blocks.{i}"));
                let resnets = (0..cfg.layers_per_block + 1)
                    .map(|j| {
                        let c = if j == 0 { cin } else { out };
                        ResnetBlock2D::new(u.pp(format!("resnets.{j}")), c, resnet(out))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let upsample = if i + 1 < n {
                    Some(
                        Conv2d::load(out, out, 3, pad1(), u.pp("upsamplers.0.conv"))?
                            .with_winograd(Largest::F4),
                    )
                } else {
                    None
                };
                Ok(UpBlock { resnets, upsample })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            post_quant_conv,
            conv_in: Conv2d::load(cfg.latent_channels, last, 3, pad1(), d.pp("conv_in"))?
                .with_winograd(Largest::F4),
            mid,
            up,
            norm_out: GroupNorm::load(groups, ch[0], EPS, d.pp("conv_norm_out"))?,
            conv_out: Conv2d::load(ch[0], cfg.out_channels, 3, pad1(), d.pp("conv_out"))?
                .with_winograd(Largest::F4),
        })
    }

    /// Decodes latents that were already divided by the scaling factor.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(c) => c.forward(latents)?,
            None => latents.clone(),
        };
        let xs = self.conv_in.forward(&xs)?;
        let mut xs = self.mid.forward(&xs)?;
        for block in &self.up {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// `DownEncoderBlock2D`: ResNets, then (all but the last block) a 3x3 stride-2 convolution after
/// padding the right and bottom by one (diffusers' `Downsample2D` with `padding=0`).
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

/// What the encoder makes of an image: diffusers' `DiagonalGaussianDistribution`, [B, latent
/// channels, h, w] each, before the scaling factor.
pub struct LatentDist {
    /// `mean`.
    pub mean: Tensor,
    /// `std = exp(0.5 * clamp(logvar, -30, 20))`.
    pub std: Tensor,
}

impl LatentDist {
    /// `latent_dist.sample(generator)`: `mean + std * noise`, the noise standard normal drawn as
    /// diffusers draws it (`randn_tensor(mean.shape, generator)`).
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        self.mean.add(&self.std.mul(noise)?)
    }
}

/// Image in [-1, 1] -> latent distribution: the encoding half of `AutoencoderKL`.
pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// Loads `encoder.*` and `quant_conv.*` from `vae/` weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let last = ch[n - 1];
        let groups = cfg.norm_num_groups;
        let e = vb.pp("encoder");
        let down = (0..n)
            .map(|i| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let out = ch[i];
                let b = e.pp(format!("down_blocks.{i}"));
                let resnets = (0..cfg.layers_per_block)
                    .map(|j| {
                        let c = if j == 0 { cin } else { out };
                        let r = resnet_config(out, groups);
                        ResnetBlock2D::new(b.pp(format!("resnets.{j}")), c, r)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let downsample = if i + 1 < n {
                    let stride2 = Conv2dConfig {
                        stride: 2,
                        ..Default::default()
                    };
                    Some(Conv2d::load(
                        out,
                        out,
                        3,
                        stride2,
                        b.pp("downsamplers.0.conv"),
                    )?)
                } else {
                    None
                };
                Ok(DownBlock {
                    resnets,
                    downsample,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::load(
                moments,
                moments,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv_in: Conv2d::load(cfg.in_channels, ch[0], 3, pad1(), e.pp("conv_in"))?
                .with_winograd(Largest::F4),
            down,
            mid: MidBlock::new(e.pp("mid_block"), last, groups)?,
            norm_out: GroupNorm::load(groups, last, EPS, e.pp("conv_norm_out"))?,
            conv_out: Conv2d::load(last, moments, 3, pad1(), e.pp("conv_out"))?
                .with_winograd(Largest::F4),
            quant_conv,
            latent_channels: cfg.latent_channels,
        })
    }

    /// `vae.encode(image).latent_dist` for an image [B, 3, H, W] in [-1, 1] (H and W multiples of
    /// the scale factor).
    pub fn encode(&self, image: &Tensor) -> candle_core::Result<LatentDist> {
        let mut xs = self.conv_in.forward(image)?;
        for block in &self.down {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = &block.downsample {
                // F.pad(x, (0, 1, 0, 1)): one zero column on the right, one zero row below.
                xs = conv.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        let xs = self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&xs)?,
            None => xs,
        };
        let c = self.latent_channels;
        let mean = moments.narrow(1, 0, c)?.contiguous()?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }
}
