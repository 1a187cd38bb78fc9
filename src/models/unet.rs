//! diffusers' `UNet2DConditionModel`, the Stable Diffusion 1.x / 2.x subset, built from [`UNetConfig`].
//!
//! Owned rather than candle-transformers' `UNet2DConditionModel` because parity with diffusers needs:
//! the exact-erf GEGLU (see [`super::attention`]), the sinusoidal timestep embedding computed in f32
//! whatever the model dtype, the configured GroupNorm group count in every ResNet (candle's
//! `DownBlock2D` always uses 32), and diffusers' `upsample_size` path for latents whose sides are not
//! multiples of 2^(blocks-1). The ResNets are [`super::resnet`]'s (fused CPU kernels); the
//! time-embedding MLP is candle-transformers' own, which matches diffusers.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::TimestepEmbedding;

use super::attention::{SpatialTransformer, TransformerConfig};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::config::{UNetBlock, UNetConfig};
use crate::kernels::winograd::Largest;
use crate::kernels::{Conv2d, GroupNorm};

/// diffusers' `get_timestep_embedding`, always in f32, then cast to `dtype`.
fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)?
        * (-(10000f64.ln()) / (half as f64 - shift)))?;
    let freqs = exponent.exp()?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    let emb = if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)?
    } else {
        emb
    };
    emb.to_dtype(dtype)
}

fn conv3(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Conv2d::load(cin, cout, 3, cfg, vb)
}

struct Downsample {
    conv: Conv2d,
    pad_first: bool,
}

impl Downsample {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_first {
            // diffusers: padding 0 means pad (0, 1, 0, 1) then a stride-2 conv.
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

fn resnet_config(cfg: &UNetConfig, out: usize, temb: usize, scale: f64) -> ResnetConfig {
    ResnetConfig {
        out_channels: out,
        temb_channels: Some(temb),
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        output_scale_factor: scale,
        winograd: Largest::F2,
    }
}

fn transformers(
    vb: &VarBuilder,
    n: usize,
    block: &UNetBlock,
    cfg: &UNetConfig,
) -> candle_core::Result<Vec<SpatialTransformer>> {
    let tcfg = TransformerConfig {
        channels: block.out_channels,
        heads: block.heads,
        depth: block.transformer_layers,
        context_dim: block.cross_attention_dim,
        groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
    };
    (0..n)
        .map(|i| SpatialTransformer::new(vb.pp(format!("attentions.{i}")), tcfg))
        .collect()
}

/// One resolution level of the down or up path: ResNets, each followed by a transformer in
/// cross-attention blocks.
struct Level {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
}

impl Level {
    /// `in_channels(i)` gives ResNet `i`'s input channels.
    fn new(
        vb: &VarBuilder,
        in_channels: &dyn Fn(usize) -> usize,
        n: usize,
        block: &UNetBlock,
        cfg: &UNetConfig,
        temb: usize,
    ) -> candle_core::Result<Self> {
        let rcfg = resnet_config(cfg, block.out_channels, temb, 1.0);
        let resnets = (0..n)
            .map(|i| ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), in_channels(i), rcfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attentions = if block.attention {
            transformers(vb, n, block, cfg)?
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// ResNet `i`, then transformer `i` if the level has them.
    fn layer(
        &self,
        i: usize,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let xs = self.resnets[i].forward(xs, Some(temb))?;
        match self.attentions.get(i) {
            Some(attn) => attn.forward(&xs, ctx),
            None => Ok(xs),
        }
    }
}

struct DownBlock {
    level: Level,
    downsample: Option<Downsample>,
}

struct UpBlock {
    level: Level,
    upsample: Option<Conv2d>,
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then (`attentions.i`, `resnets.i+1`) pairs.
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
}

impl MidBlock {
    fn new(
        vb: &VarBuilder,
        block: &UNetBlock,
        cfg: &UNetConfig,
        temb: usize,
    ) -> candle_core::Result<Self> {
        let c = block.out_channels;
        let rcfg = resnet_config(cfg, c, temb, cfg.mid_block_scale_factor);
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), c, rcfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions: transformers(vb, 1, block, cfg)?,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attn.forward(&xs, ctx)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// The denoising UNet.
pub struct UNet {
    config: UNetConfig,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet from `unet/` weights.
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> candle_core::Result<Self> {
        let cfg = config;
        let ch: Vec<usize> = cfg.blocks.iter().map(|b| b.out_channels).collect();
        let n = ch.len();
        let temb = ch[0] * 4;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;
        let conv_in = conv3(vb.pp("conv_in"), cfg.in_channels, ch[0], 1, 1)?;

        let mut down = Vec::with_capacity(n);
        for (i, block) in cfg.blocks.iter().enumerate() {
            let vbd = vb.pp(format!("down_blocks.{i}"));
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let out = block.out_channels;
            let level = Level::new(
                &vbd,
                &|j| if j == 0 { cin } else { out },
                block.layers,
                block,
                cfg,
                temb,
            )?;
            let downsample = if i + 1 < n {
                let p = cfg.downsample_padding;
                Some(Downsample {
                    conv: conv3(vbd.pp("downsamplers.0.conv"), out, out, 2, p)?,
                    pad_first: p == 0,
                })
            } else {
                None
            };
            down.push(DownBlock { level, downsample });
        }

        let mid = MidBlock::new(&vb.pp("mid_block"), &cfg.blocks[n - 1], cfg, temb)?;

        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let block = &cfg.blocks[n - 1 - i];
            let vbu = vb.pp(format!("up_blocks.{i}"));
            let out = block.out_channels;
            let prev = if i == 0 { ch[n - 1] } else { ch[n - i] };
            // diffusers' input_channel: reversed channels[min(i + 1, n - 1)].
            let skip_in = ch[(n - 1 - i).saturating_sub(1)];
            let layers = block.layers + 1;
            let in_ch = move |j: usize| {
                let res_skip = if j + 1 == layers { skip_in } else { out };
                let res_in = if j == 0 { prev } else { out };
                res_in + res_skip
            };
            let level = Level::new(&vbu, &in_ch, layers, block, cfg, temb)?;
            let upsample = if i + 1 < n {
                Some(conv3(vbu.pp("upsamplers.0.conv"), out, out, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock { level, upsample });
        }

        Ok(Self {
            config: cfg.clone(),
            time_embedding,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3(vb.pp("conv_out"), ch[0], cfg.out_channels, 1, 1)?,
        })
    }

    /// Predicts the noise (or v) for `sample` [B, C, h, w] at `timestep`, conditioned on
    /// `context` [B, L, D].
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let t = Tensor::full(timestep as f32, b, sample.device())?;
        let t_emb = timestep_embedding(
            &t,
            cfg.blocks[0].out_channels,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
            dtype,
        )?;
        let emb = self.time_embedding.forward(&t_emb)?;

        let sample = if cfg.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for i in 0..block.level.resnets.len() {
                xs = block.level.layer(i, &xs, &emb, context)?;
                skips.push(xs.clone());
            }
            if let Some(ds) = &block.downsample {
                xs = ds.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid.forward(&xs, &emb, context)?;

        // diffusers: when a latent side is not a multiple of 2^(number of upsamplers), each
        // upsampler resizes to the matching skip connection instead of doubling.
        let factor = 1usize << (self.up.len() - 1);
        let (_, _, h, w) = sample.dims4()?;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        for block in &self.up {
            for i in 0..block.level.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = block.level.layer(i, &xs, &emb, context)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, xh, xw) = xs.dims4()?;
                let (th, tw) = match (forward_upsample_size, skips.last()) {
                    (true, Some(s)) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        (sh, sw)
                    }
                    _ => (2 * xh, 2 * xw),
                };
                xs = conv.forward(&xs.upsample_nearest2d(th, tw)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_matches_diffusers_formula() {
        // diffusers get_timestep_embedding(t=[10], dim=4, flip_sin_to_cos=True, shift=1):
        // freqs = exp(-ln(1e4) * [0, 1] / (2 - 1)) = [1, 1e-4]; emb = [cos(10), cos(1e-3), sin(10), sin(1e-3)].
        let t = Tensor::new(&[10f32], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 4, true, 1.0, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = [10f32.cos(), 1e-3f32.cos(), 10f32.sin(), 1e-3f32.sin()];
        for (a, b) in e[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
