//! The decoding half of diffusers' `AutoencoderKL` (`post_quant_conv` + `decoder`).
//!
//! Built from candle-transformers' `UNetMidBlock2D` and `UpDecoderBlock2D`, which match diffusers;
//! only the decoder is assembled here (candle's `AutoEncoderKL` would also load the encoder, which
//! text-to-image never runs), and every size comes from `vae/config.json`.

use candle_core::{Module, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};

use crate::config::VaeConfig;

/// Latents -> image in [-1, 1].
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: UNetMidBlock2D,
    up: Vec<UpDecoderBlock2D>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads `post_quant_conv.*` and `decoder.*` from `vae/` weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let last = ch[n - 1];
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(
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
        let conv_in = conv2d(cfg.latent_channels, last, 3, pad1, d.pp("conv_in"))?;
        let mid_cfg = UNetMidBlock2DConfig {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: Some(cfg.norm_num_groups),
            attn_num_head_channels: None,
            output_scale_factor: 1.0,
        };
        let mid = UNetMidBlock2D::new(d.pp("mid_block"), last, None, mid_cfg)?;
        let up = (0..n)
            .map(|i| {
                let out = ch[n - 1 - i];
                let cin = if i == 0 { last } else { ch[n - i] };
                let ucfg = UpDecoderBlock2DConfig {
                    num_layers: cfg.layers_per_block + 1,
                    resnet_eps: 1e-6,
                    resnet_groups: cfg.norm_num_groups,
                    output_scale_factor: 1.0,
                    add_upsample: i + 1 < n,
                };
                UpDecoderBlock2D::new(d.pp(format!("up_blocks.{i}")), cin, out, ucfg)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid,
            up,
            norm_out: group_norm(cfg.norm_num_groups, ch[0], 1e-6, d.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, pad1, d.pp("conv_out"))?,
        })
    }

    /// Decodes latents that were already divided by the scaling factor.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(c) => c.forward(latents)?,
            None => latents.clone(),
        };
        let mut xs = self.mid.forward(&self.conv_in.forward(&xs)?, None)?;
        for block in &self.up {
            xs = block.forward(&xs)?;
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
