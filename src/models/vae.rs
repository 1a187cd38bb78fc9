//! The decoding half of diffusers' `AutoencoderKL` (`post_quant_conv` + `decoder`).
//!
//! Owned blocks (mid block with its single-head attention, up blocks, ResNets) on the CPU kernels
//! of [`crate::kernels`] and the blocked attention of [`super::attention`]: candle-transformers'
//! VAE materialises the whole attention score matrix (1 GiB at 512x512 output, 16 GiB at 1024x1024)
//! and runs candle's conv2d and GroupNorm. Only the decoder is assembled (text-to-image never runs
//! the encoder), and every size comes from `vae/config.json`.

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
        let resnet = |out: usize| ResnetConfig {
            out_channels: out,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
            winograd: Largest::F4,
        };
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
        let m = d.pp("mid_block");
        let mid = MidBlock {
            resnets: [
                ResnetBlock2D::new(m.pp("resnets.0"), last, resnet(last))?,
                ResnetBlock2D::new(m.pp("resnets.1"), last, resnet(last))?,
            ],
            attention: VaeAttention::new(m.pp("attentions.0"), last, groups)?,
        };
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
        let xs = self.mid.resnets[0].forward(&xs, None)?;
        let xs = self.mid.attention.forward(&xs)?;
        let mut xs = self.mid.resnets[1].forward(&xs, None)?;
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
