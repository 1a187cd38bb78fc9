//! Command-line arguments (the "low-level arguments"): clap-derive structs and their conversion into
//! the validated option structs of [`crate::options`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::options::{
    DeviceChoice, GenerateOptions, ModelChoice, OutputTarget, Precision, Sampling,
};
use crate::schedulers::SchedulerKind;
use crate::source::ModelSource;

const EXAMPLES: &str = "\
Examples:
  altdiff generate --model tests/fixtures/models/tiny-m18 --prompt \"un renard roux dans la neige\" --seed 1
  altdiff generate --prompt \"一只在雪地里的红狐狸\" --steps 25 --output fox.png      (BAAI/AltDiffusion-m18 from the hub)
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
    /// Fetch a model from the hub into the cache ahead of time and verify it.
    Download(DownloadArgs),
    /// Write a diffusers-layout copy with safetensors weights and a tokenizer.json.
    Convert(ConvertArgs),
    /// Show how a prompt is tokenised: pieces, ids, the count against the limit.
    Tokenize(TokenizeArgs),
}

/// Which model to use.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A local directory in diffusers layout or a hub repository id (BAAI/AltDiffusion-m18,
    /// BAAI/AltDiffusion-m9, ...). Default: BAAI/AltDiffusion-m18.
    #[arg(long, short = 'm', value_name = "DIR|REPO")]
    pub model: Option<String>,
    /// Hub revision: branch, tag, commit or refs/pr/N (default main).
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Weight variant, e.g. fp16 for *.fp16.safetensors.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
}

impl ModelArgs {
    /// The validated model choice.
    pub fn into_choice(self) -> Result<ModelChoice> {
        Ok(ModelChoice {
            source: ModelSource::parse(self.model.as_deref(), self.revision.as_deref())?,
            variant: self.variant,
        })
    }
}

/// `altdiff download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Hub repository id.
    #[arg(value_name = "REPO", default_value = crate::source::DEFAULT_REPO)]
    pub repo: String,
    /// Branch, tag, commit or refs/pr/N.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Weight variant, e.g. fp16.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
}

/// `altdiff convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The model to convert.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The new model directory (must not exist yet).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Precision of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
}

/// `altdiff tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The model whose tokenizer to use.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token limit to check against (default as for generate).
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The text.
    #[arg(value_name = "TEXT")]
    pub text: String,
}

/// `altdiff generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
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
            model: self.model.into_choice()?,
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
