//! diffusers' `ResnetBlock2D` (UNet and VAE), on the fused kernels of [`crate::kernels`].
//!
//! Owned rather than candle-transformers' block so that GroupNorm and SiLU run as one pass and the
//! residual is added inside `conv2`'s gemm ([`Conv2d::forward_add`]); the arithmetic is diffusers':
//! `(x + conv2(silu(norm2(conv1(silu(norm1(x))) + temb_proj(silu(temb)))))) / output_scale_factor`,
//! with a 1x1 `conv_shortcut` on `x` when the channel count changes.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels::linear::{linear, Linear};

use crate::kernels::winograd::Largest;
use crate::kernels::{Conv2d, GroupNorm};

/// Sizes of one block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Output channels.
    pub out_channels: usize,
    /// Time-embedding size (`None` in the VAE).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The sum is divided by this (1 everywhere but some mid blocks).
    pub output_scale_factor: f64,
    /// The largest Winograd tile the 3x3 convolutions may use (F(2x2) in the UNet, whose output
    /// feeds back into the sampler; F(4x4) in the VAE decoder).
    pub winograd: Largest,
}

/// One ResNet block.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Loads `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut`.
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: ResnetConfig) -> candle_core::Result<Self> {
        let out = cfg.out_channels;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if in_channels != out {
            Some(Conv2d::load(
                in_channels,
                out,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, out, vb.pp("time_emb_proj"))?),
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::load(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?,
            conv1: Conv2d::load(in_channels, out, 3, pad1, vb.pp("conv1"))?
                .with_winograd(cfg.winograd),
            time_emb_proj,
            norm2: GroupNorm::load(cfg.groups, out, cfg.eps, vb.pp("norm2"))?,
            conv2: Conv2d::load(out, out, 3, pad1, vb.pp("conv2"))?.with_winograd(cfg.winograd),
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs` [B, C, H, W]; `temb` [B, T] when the block has a time projection.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        // The time embedding's [B, C] goes into the norm that reads `h` (no pass of its own).
        let h = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => {
                let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
                self.norm2.forward_silu_offset(&h, &t)?
            }
            _ => self.norm2.forward_silu(&h)?,
        };
        if self.output_scale_factor == 1.0 {
            self.conv2.forward_add(&h, &shortcut)
        } else {
            self.conv2.forward_add(&h, &shortcut)? / self.output_scale_factor
        }
    }
}
