//! A model directory in diffusers layout -> the paths of every file generation needs -> parsed configs.
//!
//! This module only finds and validates files; [`crate::pipeline`] turns them into models.

use std::path::{Path, PathBuf};

use crate::config::{ModelIndex, SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;
use crate::weights::{find_weights, Weights};

/// Every file of a model directory that generation reads.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The model directory.
    pub root: PathBuf,
    /// `text_encoder/config.json`.
    pub text_encoder_config: PathBuf,
    /// Text encoder weights.
    pub text_encoder_weights: Weights,
    /// The `tokenizer/` folder.
    pub tokenizer_dir: PathBuf,
    /// `unet/config.json`.
    pub unet_config: PathBuf,
    /// UNet weights.
    pub unet_weights: Weights,
    /// `vae/config.json`.
    pub vae_config: PathBuf,
    /// VAE weights.
    pub vae_weights: Weights,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: PathBuf,
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Model {
            path,
            message: "missing from the model directory".into(),
        })
    }
}

fn component(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::Model {
            path: dir,
            message: format!("the model has no `{name}` folder"),
        })
    }
}

impl ModelFiles {
    /// Finds the files of a local model directory; `variant` selects e.g. `*.fp16.safetensors`.
    pub fn from_dir(root: &Path, variant: Option<&str>) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::Model {
                path: root.to_path_buf(),
                message: "model directory not found".into(),
            });
        }
        existing(root.join("model_index.json"))?;
        let te = component(root, "text_encoder")?;
        let unet = component(root, "unet")?;
        let vae = component(root, "vae")?;
        let scheduler = component(root, "scheduler")?;
        let tokenizer_dir = component(root, "tokenizer")?;
        Ok(Self {
            root: root.to_path_buf(),
            text_encoder_config: existing(te.join("config.json"))?,
            text_encoder_weights: find_weights(&te, variant)?,
            tokenizer_dir,
            unet_config: existing(unet.join("config.json"))?,
            unet_weights: find_weights(&unet, variant)?,
            vae_config: existing(vae.join("config.json"))?,
            vae_weights: find_weights(&vae, variant)?,
            scheduler_config: existing(scheduler.join("scheduler_config.json"))?,
        })
    }
}

/// The parsed, cross-checked configuration of a whole model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `model_index.json`.
    pub index: ModelIndex,
    /// The text encoder.
    pub text_encoder: TextEncoderConfig,
    /// The UNet.
    pub unet: UNetConfig,
    /// The VAE.
    pub vae: VaeConfig,
    /// The scheduler's JSON.
    pub scheduler: SchedulerConfig,
    /// The scheduler the model ships with, if altdiff implements it.
    pub default_scheduler: Option<SchedulerKind>,
}

impl ModelConfig {
    /// Reads every config file and checks that the components fit together.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let index_path = files.root.join("model_index.json");
        let (index, _): (ModelIndex, _) = crate::config::read_json(&index_path)?;
        let text_encoder = TextEncoderConfig::load(&files.text_encoder_config)?;
        let unet = UNetConfig::load(&files.unet_config)?;
        let vae = VaeConfig::load(&files.vae_config)?;
        let (scheduler, _) = SchedulerConfig::load(&files.scheduler_config)?;
        if text_encoder.project_dim != unet.cross_attention_dim() {
            return Err(Error::config(
                &files.text_encoder_config,
                "project_dim",
                format!(
                    "the text encoder outputs {} features but the UNet's cross_attention_dim is {} ({})",
                    text_encoder.project_dim,
                    unet.cross_attention_dim(),
                    files.unet_config.display()
                ),
            ));
        }
        if vae.latent_channels != unet.in_channels || vae.latent_channels != unet.out_channels {
            return Err(Error::config(
                &files.vae_config,
                "latent_channels",
                format!(
                    "{} latent channels, but the UNet takes {} and gives {}",
                    vae.latent_channels, unet.in_channels, unet.out_channels
                ),
            ));
        }
        let class = scheduler
            .class_name
            .clone()
            .or_else(|| index.scheduler.as_ref().and_then(|s| s.1.clone()))
            .unwrap_or_default();
        let default_scheduler = SchedulerKind::from_class_name(&class);
        Ok(Self {
            index,
            text_encoder,
            unet,
            vae,
            scheduler,
            default_scheduler,
        })
    }
}
