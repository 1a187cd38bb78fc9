//! Serde structs for the checkpoint's own JSON files (`model_index.json`, `text_encoder/config.json`,
//! `unet/config.json`, `vae/config.json`, `scheduler/scheduler_config.json`,
//! `tokenizer/tokenizer_config.json`).
//!
//! Every architecture parameter comes from these files, so tiny test models and full-size ones go
//! through the same code. Fields that altdiff reads have diffusers' defaults; fields that change the
//! architecture in ways altdiff does not implement are checked against the values it supports, and
//! anything else is an [`Error::Config`] naming the file and the field, never a silent default.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Reads and parses a JSON file into `T`, keeping the raw value for checks of unsupported fields.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<(T, Value)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        file: path.to_path_buf(),
        source,
    })?;
    let parsed = serde_json::from_value(value.clone()).map_err(|source| Error::Json {
        file: path.to_path_buf(),
        source,
    })?;
    Ok((parsed, value))
}

/// Checks that each `(field, allowed values)` pair holds in `raw`: a field that is absent or null
/// is fine (the default is the supported behaviour); any other value must be one of `allowed`.
fn check_unsupported(file: &Path, raw: &Value, rules: &[(&str, &[Value])]) -> Result<()> {
    for (field, allowed) in rules {
        match raw.get(field) {
            None | Some(Value::Null) => {}
            Some(v) if allowed.contains(v) => {}
            Some(v) => {
                let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                let what = if allowed.is_empty() {
                    "only null is supported".to_string()
                } else {
                    format!("supported: {}", allowed.join(", "))
                };
                return Err(Error::config(
                    file,
                    *field,
                    format!("value {v} is not supported by altdiff ({what})"),
                ));
            }
        }
    }
    Ok(())
}

/// An integer, or one integer per block, as diffusers accepts for several UNet fields.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    /// One value for every block.
    One(usize),
    /// One value per down block.
    List(Vec<usize>),
}

impl PerBlock {
    /// The value per block, for `n` blocks; a list of the wrong length is a config error.
    pub fn expand(&self, n: usize, file: &Path, field: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::List(v) if v.len() == n => Ok(v.clone()),
            PerBlock::List(v) => Err(Error::config(
                file,
                field,
                format!("has {} entries but the model has {n} blocks", v.len()),
            )),
        }
    }
}

/// `model_index.json`: which component classes the pipeline uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline class, e.g. `AltDiffusionPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// `[library, class]` of the text encoder.
    pub text_encoder: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the scheduler.
    pub scheduler: Option<(Option<String>, Option<String>)>,
}

/// `text_encoder/config.json`: diffusers' `RobertaSeriesConfig` (an XLM-R config plus the projection).
#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size of XLM-R.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward size.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Number of position embeddings (514 for XLM-R: 512 tokens + padding offset).
    pub max_position_embeddings: usize,
    /// Number of token type embeddings.
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id, also XLM-R's position padding index.
    #[serde(default = "one")]
    pub pad_token_id: usize,
    /// Output size of the projection (the UNet's cross-attention size).
    #[serde(default = "default_project_dim")]
    pub project_dim: usize,
    /// m18: project the penultimate hidden state through `pre_LN` + `transformation_pre`.
    #[serde(default)]
    pub has_pre_transformation: bool,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn one() -> usize {
    1
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_project_dim() -> usize {
    512
}

impl TextEncoderConfig {
    /// Reads and validates `text_encoder/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let (cfg, raw): (Self, Value) = read_json(path)?;
        check_unsupported(
            path,
            &raw,
            &[
                ("position_embedding_type", &["absolute".into()]),
                ("is_decoder", &[false.into()]),
                ("add_cross_attention", &[false.into()]),
            ],
        )?;
        if !matches!(
            cfg.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(Error::config(
                path,
                "hidden_act",
                format!(
                    "`{}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)",
                    cfg.hidden_act
                ),
            ));
        }
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        if cfg.has_pre_transformation && cfg.num_hidden_layers < 2 {
            return Err(Error::config(
                path,
                "num_hidden_layers",
                "has_pre_transformation needs at least 2 layers (it reads the penultimate one)",
            ));
        }
        Ok(cfg)
    }
}

/// `unet/config.json`: diffusers' `UNet2DConditionModel`, the subset Stable Diffusion 1.x / 2.x use.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    /// Latent size the model was trained at.
    pub sample_size: usize,
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Scale the input to [-1, 1] first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Timestep embedding: cos first.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block classes.
    pub down_block_types: Vec<String>,
    /// Mid block class.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Up block classes.
    pub up_block_types: Vec<String>,
    /// Channels per block.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock,
    /// Padding of the downsampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Group count of every GroupNorm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Size of the text features.
    pub cross_attention_dim: PerBlock,
    /// Transformer layers per attention.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    /// diffusers' misnamed head *count* when `num_attention_heads` is null.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock,
    /// Head count per block (newer configs).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Linear instead of 1x1-conv projections in the transformers (SD 2.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 (always done here).
    #[serde(default)]
    pub upcast_attention: bool,
}

fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_layers_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_transformer_layers() -> PerBlock {
    PerBlock::One(1)
}
fn default_attention_head_dim() -> PerBlock {
    PerBlock::One(8)
}

/// One down block of the UNet, as the model code needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlock {
    /// Output channels.
    pub out_channels: usize,
    /// ResNet layers in the down block (the up block has one more).
    pub layers: usize,
    /// Whether the block has cross-attention transformers (`CrossAttn*Block2D`).
    pub attention: bool,
    /// Transformer layers per attention (also used by the mid block for the last block).
    pub transformer_layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Text feature size.
    pub cross_attention_dim: usize,
}

/// The validated UNet architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent size the model was trained at.
    pub sample_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Scale the input to [-1, 1] first.
    pub center_input_sample: bool,
    /// Timestep embedding: cos first.
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    pub freq_shift: f64,
    /// Down blocks, in order (up blocks mirror them).
    pub blocks: Vec<UNetBlock>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block.
    pub mid_block_scale_factor: f64,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
    /// Linear projections in the transformers.
    pub use_linear_projection: bool,
}

impl UNetConfig {
    /// Reads and validates `unet/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let (f, raw): (UNetConfigFile, Value) = read_json(path)?;
        let no: &[Value] = &[false.into()];
        let null: &[Value] = &[];
        check_unsupported(
            path,
            &raw,
            &[
                ("only_cross_attention", no),
                ("dual_cross_attention", no),
                ("class_embed_type", null),
                ("addition_embed_type", null),
                ("num_class_embeds", null),
                ("encoder_hid_dim", null),
                ("encoder_hid_dim_type", null),
                ("time_embedding_dim", null),
                ("time_embedding_act_fn", null),
                ("timestep_post_act", null),
                ("time_cond_proj_dim", null),
                ("projection_class_embeddings_input_dim", null),
                ("cross_attention_norm", null),
                ("addition_time_embed_dim", null),
                ("reverse_transformer_layers_per_block", null),
                ("act_fn", &["silu".into(), "swish".into()]),
                ("resnet_time_scale_shift", &["default".into()]),
                ("resnet_skip_time_act", no),
                ("resnet_out_scale_factor", &[1.into(), 1.0.into()]),
                ("time_embedding_type", &["positional".into()]),
                ("conv_in_kernel", &[3.into()]),
                ("conv_out_kernel", &[3.into()]),
                ("attention_type", &["default".into()]),
                ("class_embeddings_concat", no),
                ("mid_block_only_cross_attention", no),
            ],
        )?;
        let n = f.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(path, "block_out_channels", "is empty"));
        }
        if f.down_block_types.len() != n {
            return Err(Error::config(
                path,
                "down_block_types",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    f.down_block_types.len()
                ),
            ));
        }
        if f.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "up_block_types",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    f.up_block_types.len()
                ),
            ));
        }
        match f.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(Error::config(
                    path,
                    "mid_block_type",
                    format!("{other:?} is not supported (supported: UNetMidBlock2DCrossAttn)"),
                ))
            }
        }
        let layers = f.layers_per_block.expand(n, path, "layers_per_block")?;
        let cross = f
            .cross_attention_dim
            .expand(n, path, "cross_attention_dim")?;
        let tlayers =
            f.transformer_layers_per_block
                .expand(n, path, "transformer_layers_per_block")?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a naming
        // quirk kept for old configs): the "head dim" field is the head count.
        let heads = match &f.num_attention_heads {
            Some(h) => h.expand(n, path, "num_attention_heads")?,
            None => f.attention_head_dim.expand(n, path, "attention_head_dim")?,
        };
        if f.norm_num_groups == 0 {
            return Err(Error::config(path, "norm_num_groups", "must be positive"));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let down = f.down_block_types[i].as_str();
            let up = f.up_block_types[n - 1 - i].as_str();
            let attn = match down {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(Error::config(
                        path,
                        format!("down_block_types[{i}]"),
                        format!(
                        "`{other}` is not supported (supported: CrossAttnDownBlock2D, DownBlock2D)"
                    ),
                    ))
                }
            };
            let expected_up = if attn {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            };
            if up != expected_up {
                return Err(Error::config(
                    path,
                    format!("up_block_types[{}]", n - 1 - i),
                    format!(
                        "`{up}` does not mirror down block `{down}` (expected `{expected_up}`)"
                    ),
                ));
            }
            let out = f.block_out_channels[i];
            if out % f.norm_num_groups != 0 {
                return Err(Error::config(
                    path,
                    "norm_num_groups",
                    format!(
                        "{} does not divide block_out_channels[{i}] = {out}",
                        f.norm_num_groups
                    ),
                ));
            }
            if heads[i] == 0 || out % heads[i] != 0 {
                return Err(Error::config(
                    path,
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{i}] = {out}",
                        heads[i]
                    ),
                ));
            }
            if layers[i] == 0 {
                return Err(Error::config(path, "layers_per_block", "must be positive"));
            }
            blocks.push(UNetBlock {
                out_channels: out,
                layers: layers[i],
                attention: attn,
                transformer_layers: tlayers[i],
                heads: heads[i],
                cross_attention_dim: cross[i],
            });
        }
        if cross.iter().any(|&c| c != cross[0]) {
            return Err(Error::config(
                path,
                "cross_attention_dim",
                "different sizes per block are not supported",
            ));
        }
        Ok(UNetConfig {
            sample_size: f.sample_size,
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            center_input_sample: f.center_input_sample,
            flip_sin_to_cos: f.flip_sin_to_cos,
            freq_shift: f.freq_shift,
            blocks,
            downsample_padding: f.downsample_padding,
            mid_block_scale_factor: f.mid_block_scale_factor,
            norm_num_groups: f.norm_num_groups,
            norm_eps: f.norm_eps,
            use_linear_projection: f.use_linear_projection,
        })
    }

    /// The text feature size the UNet's cross-attention expects.
    pub fn cross_attention_dim(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.cross_attention_dim)
    }
}

/// `vae/config.json`: diffusers' `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Encoder block classes.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block classes.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per block.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per block.
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// 1x1 convolution after the encoder.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// 1x1 convolution before the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn three() -> usize {
    3
}

/// The most VAE blocks [`VaeConfig::load`] accepts: a scale factor of 2^15 (Stable Diffusion's VAE has
/// 4 blocks, 2^3).
const MAX_VAE_BLOCKS: usize = 16;
fn default_scaling_factor() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let (cfg, raw): (Self, Value) = read_json(path)?;
        let null: &[Value] = &[];
        check_unsupported(
            path,
            &raw,
            &[
                ("act_fn", &["silu".into(), "swish".into()]),
                ("shift_factor", null),
                ("latents_mean", null),
                ("latents_std", null),
                ("mid_block_add_attention", &[true.into()]),
            ],
        )?;
        let n = cfg.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(path, "block_out_channels", "is empty"));
        }
        if n > MAX_VAE_BLOCKS {
            return Err(Error::config(
                path,
                "block_out_channels",
                format!(
                    "has {n} entries; at most {MAX_VAE_BLOCKS} are supported (each block after the \
                     first halves the latent size)"
                ),
            ));
        }
        for (field, types, expected) in [
            (
                "down_block_types",
                &cfg.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &cfg.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !types.is_empty() && types.len() != n {
                return Err(Error::config(
                    path,
                    field,
                    format!("has {} entries, block_out_channels has {n}", types.len()),
                ));
            }
            if let Some(t) = types.iter().find(|t| t.as_str() != expected) {
                return Err(Error::config(
                    path,
                    field,
                    format!("`{t}` is not supported (supported: {expected})"),
                ));
            }
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| c % cfg.norm_num_groups.max(1) != 0)
        {
            return Err(Error::config(
                path,
                "norm_num_groups",
                format!(
                    "{} does not divide block_out_channels entry {c}",
                    cfg.norm_num_groups
                ),
            ));
        }
        if !(cfg.scaling_factor.is_finite() && cfg.scaling_factor > 0.0) {
            return Err(Error::config(
                path,
                "scaling_factor",
                "must be a positive number",
            ));
        }
        Ok(cfg)
    }

    /// Pixels per latent along each side: 2^(number of blocks - 1). ([`VaeConfig::load`] bounds the
    /// number of blocks; for a config that did not go through it, an empty list gives 1 and the
    /// result saturates at 2^(usize::BITS - 1) instead of overflowing.)
    pub fn scale_factor(&self) -> usize {
        let shift = self.block_out_channels.len().saturating_sub(1);
        1 << shift.min(usize::BITS as usize - 1)
    }
}

/// `scheduler/scheduler_config.json`. Options are `None` when absent so that each scheduler class
/// applies its own defaults, exactly as diffusers' `XScheduler.from_config(json)` does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// The class that wrote the file (`PNDMScheduler`, `DDIMScheduler`, ...).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Training timesteps (default 1000).
    pub num_train_timesteps: Option<usize>,
    /// First beta (default 0.0001).
    pub beta_start: Option<f64>,
    /// Last beta (default 0.02).
    pub beta_end: Option<f64>,
    /// `linear` or `scaled_linear` (default `linear`).
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Alpha-cumprod used past the last step (PNDM default false, DDIM default true).
    pub set_alpha_to_one: Option<bool>,
    /// Added to every inference timestep (default 0).
    pub steps_offset: Option<usize>,
    /// PNDM: skip the Runge-Kutta warm-up (default false).
    pub skip_prk_steps: Option<bool>,
    /// `epsilon` or `v_prediction` (default `epsilon`).
    pub prediction_type: Option<String>,
    /// DDIM: clip the predicted x0 (default true).
    pub clip_sample: Option<bool>,
    /// DDIM: the clip range (default 1.0).
    pub clip_sample_range: Option<f64>,
    /// Dynamic thresholding (unsupported when true).
    pub thresholding: Option<bool>,
    /// `leading`, `linspace` or `trailing` (default `leading`).
    pub timestep_spacing: Option<String>,
    /// Rescale betas to zero terminal SNR (unsupported when true).
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: how sigmas are interpolated at the timesteps (`linear`; `log_linear` unsupported).
    pub interpolation_type: Option<String>,
    /// Sigma-based schedulers: Karras sigmas (default false).
    pub use_karras_sigmas: Option<bool>,
    /// Sigma-based schedulers: exponential sigmas (unsupported when true).
    pub use_exponential_sigmas: Option<bool>,
    /// Sigma-based schedulers: beta sigmas (unsupported when true).
    pub use_beta_sigmas: Option<bool>,
    /// Sigma-based schedulers: the smallest sigma of a Karras schedule.
    pub sigma_min: Option<f64>,
    /// Sigma-based schedulers: the largest sigma of a Karras schedule.
    pub sigma_max: Option<f64>,
    /// Euler: `discrete` or `continuous` timesteps.
    pub timestep_type: Option<String>,
    /// Sigma-based schedulers: the last sigma, `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: `dpmsolver++` (others unsupported).
    pub algorithm_type: Option<String>,
    /// DPM-Solver (1 or 2) and UniPC (1 to 3): multistep order (default 2).
    pub solver_order: Option<usize>,
    /// DPM-Solver: second-order formula, `midpoint` (default) or `heun`; UniPC: `bh2` (default) or `bh1`.
    pub solver_type: Option<String>,
    /// DPM-Solver: first-order final steps below 15 steps; UniPC: lower orders at the end (default true).
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: a first-order (Euler) final step (default false).
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: uniform log-SNR steps (unsupported when true).
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching sigmas (unsupported when true).
    pub use_flow_sigmas: Option<bool>,
    /// Resolution-dependent timestep shifting (unsupported when true).
    pub use_dynamic_shifting: Option<bool>,
    /// DPM-Solver: clipping of lambda (only the default, -inf, is supported).
    pub lambda_min_clipped: Option<f64>,
    /// Learned variance outputs (`learned`, `learned_range`: unsupported).
    pub variance_type: Option<String>,
    /// UniPC: predict x0 (data prediction, default true) rather than the noise.
    pub predict_x0: Option<bool>,
    /// UniPC: the steps (indices) whose corrector is skipped (default none).
    pub disable_corrector: Option<Vec<i64>>,
    /// UniPC: another scheduler as the predictor (only none, the default, is supported).
    pub solver_p: Option<serde_json::Value>,
}

/// The most training timesteps [`SchedulerConfig::load`] accepts (Stable Diffusion has 1000): the
/// schedulers build tables of this size and search them at every step.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl SchedulerConfig {
    /// Reads `scheduler/scheduler_config.json`, checked with [`SchedulerConfig::check_ranges`] so a
    /// broken file is found before any work (the class-specific checks are the schedulers').
    pub fn load(path: &Path) -> Result<(Self, PathBuf)> {
        let (cfg, _raw): (Self, Value) = read_json(path)?;
        cfg.check_ranges(path)?;
        Ok((cfg, path.to_path_buf()))
    }

    /// The limits every scheduler relies on: `num_train_timesteps` from 2 (one training timestep
    /// leaves the sigma-based schedulers nothing to interpolate between) to [`MAX_TRAIN_TIMESTEPS`],
    /// and `steps_offset` at most [`MAX_TRAIN_TIMESTEPS`]. Errors name `path` and the field.
    pub fn check_ranges(&self, path: &Path) -> Result<()> {
        if let Some(n) = self
            .num_train_timesteps
            .filter(|n| !(2..=MAX_TRAIN_TIMESTEPS).contains(n))
        {
            return Err(Error::config(
                path,
                "num_train_timesteps",
                format!("{n} is not supported (2 to {MAX_TRAIN_TIMESTEPS})"),
            ));
        }
        if let Some(n) = self.steps_offset.filter(|&n| n > MAX_TRAIN_TIMESTEPS) {
            return Err(Error::config(
                path,
                "steps_offset",
                format!("{n} is more than altdiff supports ({MAX_TRAIN_TIMESTEPS})"),
            ));
        }
        Ok(())
    }
}

/// `tokenizer/tokenizer_config.json`: the fields altdiff uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizerConfig {
    /// Longest input the tokenizer is configured for (absent or huge means unlimited).
    pub model_max_length: Option<f64>,
}

impl TokenizerConfig {
    /// Reads `tokenizer/tokenizer_config.json`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        Ok(read_json::<Self>(path)?.0)
    }

    /// `model_max_length` as a token count, ignoring transformers' "unlimited" sentinel (1e30), and
    /// values below one token (0, or a fraction that would truncate to 0).
    pub fn max_length(&self) -> Option<usize> {
        self.model_max_length
            .filter(|m| (1.0..1e9).contains(m))
            .map(|m| m as usize)
    }
}
