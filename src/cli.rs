//! Command-line arguments (the "low-level arguments"): clap-derive structs and their conversion into
//! the validated option structs of [`crate::options`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::options::{DeviceChoice, GenerateOptions, OutputTarget, Precision, Sampling};
use crate::schedulers::SchedulerKind;

const EXAMPLES: &str = "\
Examples:
  altdiff generate --model tests/fixtures/models/tiny-m18 --prompt \"un renard roux dans la neige\" --seed 1
  altdiff generate --model ./AltDiffusion-m9 --prompt \"一只在雪地里的红狐狸\" --steps 25 --output fox.png
  altdiff generate --model ./AltDiffusion-m18 --prompt \"a lighthouse\" --prompt \"ein Leuchtturm\" \\
      --num-images 2 --scheduler ddim --output out/";

/// Multilingual text-to-image with BAAI's AltDiffusion (m9, m18), matching diffusers.
#[derive(Debug, Parser)]
#[command(name = "altdiff", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from text prompts.
    #[command(after_help = EXAMPLES)]
    Generate(GenerateArgs),
}

/// `altdiff generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory in diffusers layout (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A prompt; repeat for several. Each prompt gets --num-images images.
    #[arg(long, short = 'p', value_name = "TEXT", required = true)]
    pub prompt: Vec<String>,
    /// What the images should not show (used with guidance > 1; default "").
    #[arg(long, short = 'n', value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// Denoising steps (PNDM runs one more UNet evaluation than this, as diffusers does).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[arg(
        long,
        short = 'g',
        default_value_t = 7.5,
        allow_negative_numbers = true
    )]
    pub guidance: f64,
    /// Scheduler; default: the model's own (scheduler/scheduler_config.json).
    #[arg(long, value_name = "NAME", value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Image height in pixels (a multiple of 8); default: the UNet's sample_size x the VAE factor.
    #[arg(long, short = 'H')]
    pub height: Option<usize>,
    /// Image width in pixels (a multiple of 8); default as height.
    #[arg(long, short = 'W')]
    pub width: Option<usize>,
    /// Seed of the initial noise (PyTorch's CPU generator: the same seed gives diffusers' latents).
    /// Default: a random seed, reported on stderr.
    #[arg(long, short = 's')]
    pub seed: Option<u64>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Token length prompts are padded / truncated to (2-512); default 77, or the tokenizer's limit if smaller.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Initial noise: a safetensors file with one f32 tensor `latents` [B, 4, H/8, W/8], as diffusers' `latents=`.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    /// Write the intermediate tensors (diffusers' names) to this safetensors file.
    #[arg(long, value_name = "FILE")]
    pub dump_tensors: Option<PathBuf>,
    /// A .png file name for a single image, else a directory (created).
    #[arg(long, short = 'o', value_name = "PATH", default_value = "altdiff-out")]
    pub output: PathBuf,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Precision; default f32 on CPU, f16 on GPUs.
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
}

fn parse_scheduler(s: &str) -> std::result::Result<SchedulerKind, String> {
    SchedulerKind::parse(s)
        .ok_or_else(|| format!("unknown scheduler `{s}` (expected pndm or ddim)"))
}

impl GenerateArgs {
    /// Converts and validates.
    pub fn into_options(self) -> Result<GenerateOptions> {
        let opts = GenerateOptions {
            model: self.model,
            prompts: self.prompt,
            sampling: Sampling {
                negative_prompt: self.negative_prompt,
                steps: self.steps,
                guidance: self.guidance,
                scheduler: self.scheduler,
                height: self.height,
                width: self.width,
                num_images: self.num_images,
                max_length: self.max_length,
            },
            seed: self.seed,
            latents: self.latents,
            dump_tensors: self.dump_tensors,
            output: OutputTarget::from_path(self.output),
            device: self.device,
            dtype: self.dtype,
        };
        opts.validate()?;
        if opts.seed.is_some() && opts.latents.is_some() {
            return Err(Error::usage(
                "--seed and --latents both set the initial noise; give one",
            ));
        }
        Ok(opts)
    }
}
