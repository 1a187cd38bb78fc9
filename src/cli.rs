//! Command-line arguments (the "low-level arguments"): clap-derive structs and their conversion into
//! the validated option structs of [`crate::options`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::metadata::Settings;
use crate::options::{
    DeviceChoice, GenerateOptions, InitSpec, LoadPolicy, ModelChoice, OutputOptions, OutputTarget,
    Precision, Sampling, SeedChoice, Shard, DEFAULT_STRENGTH,
};
use crate::schedulers::{SchedulerKind, SchedulerOptions, TimestepSpacing};
use crate::source::ModelSource;
use crate::text::PromptSyntax;

/// Each example fits in 80 columns; a continued command ends its line with `\`.
pub const EXAMPLES: &str = "\
Examples:
  altdiff generate -m tests/fixtures/models/tiny-m18 -p \"un renard roux\" -s 1
  # without --model: BAAI/AltDiffusion-m18 from the hub
  altdiff generate -p \"一只在雪地里的红狐狸\" --steps 25 -o fox.png
  altdiff generate -m BAAI/AltDiffusion-m9 -p \"a lighthouse\" \\
      -p \"ein Leuchtturm\" --num-images 2 --scheduler \"Euler a\" -o out/
  altdiff generate -f prompts.jsonl --seed 1000 --shard 0/8 --skip-existing \\
      --json -o out/
  altdiff generate --from-image out/00003-0-fr-1003-un-renard.png --steps 50
  altdiff info out/*.png";

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
    Generate(Box<GenerateArgs>),
    /// Fetch a model from the hub into the cache ahead of time and verify it.
    Download(DownloadArgs),
    /// Write a diffusers-layout copy with safetensors weights and a tokenizer.json.
    Convert(ConvertArgs),
    /// Show how a prompt is tokenised: pieces, ids, the count against the limit.
    Tokenize(TokenizeArgs),
    /// Print the generation parameters stored in PNGs.
    Info(InfoArgs),
    /// List the languages AltDiffusion m9 and m18 were trained on.
    Languages(LanguagesArgs),
    /// List the schedulers (samplers) that --scheduler accepts, one line each.
    Schedulers(SchedulersArgs),
    /// Serve webui's HTTP API (and a web page) with the model loaded once.
    Serve(Box<ServeArgs>),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

/// `altdiff serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Precision; default f32 on CPU, f16 on GPUs.
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// keep (the default: every component stays loaded) or per-stage (least memory, reloaded for
    /// every request).
    #[arg(long, value_enum, default_value = "keep")]
    pub load_policy: LoadPolicy,
    /// The address to listen on (a non-loopback one without --api-auth or --token-file gets a
    /// warning).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port, as webui's (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// HTTP Basic credentials, as webui's flag: USER:PASS, several separated by commas.
    #[arg(long, value_name = "USER:PASS[,USER:PASS]")]
    pub api_auth: Option<String>,
    /// A file of bearer tokens (one per line) accepted in `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Requests that may wait behind the running one; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_queue: usize,
    /// Most pixels per image (width x height); more is a 422.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "N")]
    pub max_pixels: usize,
    /// Most denoising steps per request.
    #[arg(long, default_value_t = 150, value_name = "N")]
    pub max_steps: usize,
    /// Most images per request (batch_size x n_iter).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_batch: usize,
    /// Also save every image with its metadata in this directory, as generate does.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Allow browser pages from this origin to call the API (Access-Control-Allow-Origin).
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
    /// One JSON access-log line per request on stdout (method, path, status, duration, task).
    #[arg(long)]
    pub json: bool,
}

impl ServeArgs {
    /// Converts and validates.
    pub fn into_options(self) -> Result<crate::serve::ServeOptions> {
        let users = self
            .api_auth
            .as_deref()
            .map(crate::serve::parse_users)
            .transpose()?
            .unwrap_or_default();
        let tokens = self
            .token_file
            .as_deref()
            .map(crate::serve::read_tokens)
            .transpose()?
            .unwrap_or_default();
        for (flag, v) in [
            ("--max-pixels", self.max_pixels),
            ("--max-steps", self.max_steps),
            ("--max-batch", self.max_batch),
        ] {
            if v == 0 {
                return Err(Error::usage(format!("{flag} must be at least 1")));
            }
        }
        Ok(crate::serve::ServeOptions {
            model: self.model.into_choice()?,
            device: self.device,
            dtype: self.dtype,
            load_policy: self.load_policy,
            host: self.host,
            port: self.port,
            users,
            tokens,
            max_queue: self.max_queue,
            limits: crate::serve::api::Limits {
                max_pixels: self.max_pixels,
                max_steps: self.max_steps.min(crate::options::MAX_STEPS),
                max_batch: self.max_batch,
            },
            output: self.output,
            cors_origin: self.cors_origin,
            json_log: self.json,
        })
    }
}

/// `altdiff info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// PNGs written by altdiff (or by webui).
    #[arg(value_name = "IMAGE.png", required = true)]
    pub images: Vec<PathBuf>,
    /// Print one JSON object per file, one per line.
    #[arg(long)]
    pub json: bool,
}

/// `altdiff languages`.
#[derive(Debug, Args)]
pub struct LanguagesArgs {
    /// Only this model's languages: m9 or m18 (or a model directory / hub repo, whose text encoder
    /// config decides).
    #[arg(long, short = 'm', value_name = "m9|m18|DIR|REPO")]
    pub model: Option<String>,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// `altdiff schedulers`.
#[derive(Debug, Args)]
pub struct SchedulersArgs {
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// `altdiff completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
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
    /// Token limit to check against (default as for generate; plain syntax only).
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// plain (default) or webui: with webui, the weighted fragments and the 77-token chunks webui's
    /// syntax makes of the text.
    #[arg(long, value_enum, value_name = "SYNTAX", default_value = "plain")]
    pub prompt_syntax: PromptSyntax,
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
    #[arg(long, short = 'p', value_name = "TEXT", required_unless_present_any = ["prompt_file", "from_image"])]
    pub prompt: Vec<String>,
    /// A batch file (- for stdin): plain lines, JSON Lines or webui "prompts from file" lines; per-line
    /// settings override the command line.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Regenerate the image described by an altdiff PNG's metadata; other flags override it.
    #[arg(long, value_name = "IMAGE.png", conflicts_with_all = ["prompt_file", "latents"])]
    pub from_image: Option<PathBuf>,
    /// What the images should not show (used with guidance > 1; default "").
    #[arg(long, short = 'n', value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// How prompts are read: plain (diffusers: the text as it is, cut at --max-length tokens) or
    /// webui (emphasis such as (word:1.3), BREAK, any length in 75-token chunks) [default: plain;
    /// webui for webui-style batch lines and webui PNGs given to --from-image].
    #[arg(long, value_enum, value_name = "SYNTAX")]
    pub prompt_syntax: Option<PromptSyntax>,
    /// Language of the prompts (ISO 639-1 code or English name); default: detected per prompt.
    #[arg(long, short = 'l', value_name = "LANG")]
    pub lang: Option<String>,
    /// Denoising steps [default: 50] (PNDM runs one more UNet evaluation, as diffusers does).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale [default: 7.5]; 1 or less turns guidance off.
    #[arg(long, short = 'g', allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Scheduler: pndm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras, heun, lms, ddpm or unipc (`altdiff schedulers` lists them); default: the model's own (scheduler/scheduler_config.json).
    #[arg(long, value_name = "NAME", value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta: the weight of the fresh noise added each step, 0 (deterministic, the default) to 1.
    #[arg(long, value_name = "ETA")]
    pub eta: Option<f64>,
    /// Karras sigmas (diffusers' use_karras_sigmas) for the schedulers that have them.
    #[arg(long)]
    pub karras: bool,
    /// Replace the scheduler config's timestep_spacing.
    #[arg(long, value_enum, value_name = "SPACING")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Image height in pixels (a multiple of 8, 8 to 4096); default: the UNet's sample_size x the
    /// VAE factor.
    #[arg(long, short = 'H', value_name = "PX", allow_negative_numbers = true, value_parser = parse_size)]
    pub height: Option<usize>,
    /// Image width in pixels (a multiple of 8, 8 to 4096); default as height.
    #[arg(long, short = 'W', value_name = "PX", allow_negative_numbers = true, value_parser = parse_size)]
    pub width: Option<usize>,
    /// Seed of the noise (PyTorch's CPU generator: the same seed gives diffusers' latents and, for
    /// euler-a, ddpm and ddim --eta, its step noise). Batch-file line i without its own seed gets
    /// SEED + i. With --latents it seeds the step noise only (default 0). Default: random, reported
    /// on stderr; -1 (webui's "random") picks a random one even with --from-image.
    #[arg(long, short = 's', allow_negative_numbers = true, value_name = "N")]
    pub seed: Option<SeedChoice>,
    /// One generator per image, seeded SEED + i for image i (diffusers' list of generators), so any
    /// image can be regenerated alone; default: one generator over the batch, as diffusers does.
    #[arg(long)]
    pub per_image_seeds: bool,
    /// Images per prompt [default: 1].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub num_images: Option<usize>,
    /// Batch-file prompts sharing their settings that go through the UNet together.
    #[arg(long, default_value_t = 1, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub batch_size: usize,
    /// Token length prompts are padded / truncated to (2-512); default 77, or the tokenizer's limit if smaller.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Initial noise: a safetensors file with one f32 tensor `latents` [B, 4, H/8, W/8], as diffusers' `latents=`.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    /// Image-to-image: start from this picture (PNG, JPEG or WebP) instead of pure noise, resized to
    /// --width x --height (default: its own size rounded down to a multiple of 8).
    #[arg(long, value_name = "FILE", conflicts_with = "latents")]
    pub init_image: Option<PathBuf>,
    /// Inpainting (with --init-image): repaint where this picture is white, keep where it is black
    /// (grey is binarised at 0.5); resized to the image size if it differs.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// How much of the init image is repainted, more than 0 to 1 [default: 0.8]: the last
    /// int(steps x strength) steps of the schedule run, from the image noised to that level.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Write the intermediate tensors (diffusers' names) to this safetensors file.
    #[arg(long, value_name = "FILE")]
    pub dump_tensors: Option<PathBuf>,
    /// A .png file name for a single image, else a directory (created).
    #[arg(long, short = 'o', value_name = "PATH", default_value = "altdiff-out")]
    pub output: PathBuf,
    /// File names in the output directory: {index} {image} {lang} {seed} {slug} {steps} {scheduler}
    /// {width} {height} {line}, numbers optionally padded like {index:05}.
    #[arg(long, value_name = "TEMPLATE", default_value = crate::output::DEFAULT_TEMPLATE)]
    pub name_template: String,
    /// Replace existing files (default: pick the next free name).
    #[arg(long)]
    pub overwrite: bool,
    /// Skip prompts whose images already exist (resume an interrupted batch).
    #[arg(long)]
    pub skip_existing: bool,
    /// Also write a contact sheet (grid.png) of all images.
    #[arg(long)]
    pub grid: bool,
    /// Print one JSON object per written image on stdout (path, prompt, lang, seed, ...).
    #[arg(long)]
    pub json: bool,
    /// Only the prompts whose position mod N is K (0-based), e.g. 0/4, keeping their indexes and seeds.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Precision; default f32 on CPU, f16 on GPUs.
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// When to load and free the text encoder, UNet and VAE: per-stage (least memory), keep (no reloading between batches), auto (per-stage for one batch).
    #[arg(long, value_enum, default_value = "auto")]
    pub load_policy: LoadPolicy,
}

/// The `--init-image` / `--mask` / `--strength` of a run, or the image-to-image input recorded in
/// a `--from-image` PNG (the flags override it; `--init-image` points at a moved file).
fn init_spec(
    image: Option<PathBuf>,
    mask: Option<PathBuf>,
    strength: Option<f64>,
    rec: Option<&crate::metadata::ImageRecord>,
) -> Result<Option<InitSpec>> {
    let recorded = rec.and_then(|r| r.init.as_ref());
    let image = image.or_else(|| recorded.map(|i| PathBuf::from(&i.image)));
    let Some(image) = image else {
        if mask.is_some() {
            return Err(Error::usage(
                "--mask needs --init-image: inpainting repaints part of an init image",
            ));
        }
        return Ok(None);
    };
    Ok(Some(InitSpec {
        image,
        mask: mask.or_else(|| recorded.and_then(|i| i.mask.as_ref().map(PathBuf::from))),
        strength: strength
            .or(recorded.map(|i| i.strength))
            .unwrap_or(DEFAULT_STRENGTH),
    }))
}

/// A count (steps, images, batch size): a whole number; a negative one gets a range message
/// rather than being taken for a flag (the ranges themselves are checked with the options).
fn parse_count(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<i128>() {
        Ok(v) if v >= 0 => usize::try_from(v).map_err(|_| format!("{s} is too large")),
        Ok(_) => Err(format!("must be at least 1, not {s}")),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// A height or width: the range check itself is [`crate::options::Sampling::validate`]'s; here a
/// negative number gets the same message instead of being taken for a flag.
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<i128>() {
        Ok(v) if (1..=i128::from(u32::MAX)).contains(&v) => Ok(v as usize),
        Ok(_) => Err(format!("{s} must be a multiple of 8 between 8 and 4096")),
        Err(_) => Err(format!("`{s}` is not a whole number of pixels")),
    }
}

fn parse_scheduler(s: &str) -> std::result::Result<SchedulerKind, String> {
    SchedulerKind::parse(s).ok_or_else(|| {
        format!(
            "unknown scheduler `{s}` (expected one of: {})",
            SchedulerKind::names()
        )
    })
}

impl GenerateArgs {
    /// Converts and validates; with `--from-image`, the image's record gives every setting that no
    /// flag overrides.
    pub fn into_options(self) -> Result<GenerateOptions> {
        let from_image = |e: Error| match e {
            Error::Usage(m) => Error::Usage(format!("--from-image {m}")),
            e => e,
        };
        // A webui PNG gives the generation settings only: the model, precision, language and
        // token length stay this run's.
        let (record, webui) = match &self.from_image {
            None => (None, None),
            Some(path) => match crate::metadata::read_settings(path).map_err(from_image)? {
                Settings::Altdiff(r) => (Some(r), None),
                Settings::Webui(imported) => {
                    for w in &imported.warnings {
                        tracing::warn!("--from-image {}: {w}", path.display());
                    }
                    (Some(imported.record.clone()), Some(imported))
                }
            },
        };
        let altdiff_rec = record.as_ref().filter(|_| webui.is_none());
        let rec = record.as_ref();
        let defaults = Sampling::default();
        let scheduler = match (self.scheduler, rec) {
            (Some(s), _) => Some(s),
            (None, Some(r)) => Some(SchedulerKind::parse(&r.scheduler).ok_or_else(|| {
                Error::usage(format!(
                    "the image's scheduler `{}` is not supported by this altdiff",
                    r.scheduler
                ))
            })?),
            (None, None) => None,
        };
        let model = match (&self.model.model, altdiff_rec) {
            (None, Some(r)) => ModelArgs {
                model: Some(r.model.source.clone()),
                revision: self
                    .model
                    .revision
                    .clone()
                    .or_else(|| r.model.commit.clone().or(r.model.revision.clone())),
                variant: self.model.variant.clone().or(r.model.variant.clone()),
            },
            _ => self.model,
        };
        let prompts = match (self.prompt.is_empty(), rec) {
            (true, Some(r)) => vec![r.prompt.clone()],
            _ => self.prompt,
        };
        let opts = GenerateOptions {
            model: model.into_choice()?,
            prompts,
            prompt_file: self.prompt_file,
            lang: self.lang.or_else(|| altdiff_rec.and_then(|r| r.lang.clone())),
            batch_size: self.batch_size,
            shard: self.shard,
            sampling: Sampling {
                negative_prompt: self
                    .negative_prompt
                    .or_else(|| rec.and_then(|r| r.negative_prompt.clone())),
                steps: self
                    .steps
                    .or(rec.map(|r| r.steps))
                    .unwrap_or(defaults.steps),
                guidance: self
                    .guidance
                    .or(rec.map(|r| r.guidance))
                    .unwrap_or(defaults.guidance),
                scheduler,
                height: self.height.or(rec.map(|r| r.height)),
                width: self.width.or(rec.map(|r| r.width)),
                num_images: self.num_images.unwrap_or(defaults.num_images),
                max_length: self.max_length.or(altdiff_rec.map(|r| r.max_length)),
                schedule: SchedulerOptions {
                    eta: self.eta.or(rec.and_then(|r| r.eta)).unwrap_or(0.0),
                    karras: self.karras || rec.is_some_and(|r| r.karras),
                    timestep_spacing: match (self.timestep_spacing, rec) {
                        (Some(s), _) => Some(s),
                        (None, Some(r)) => r
                            .timestep_spacing
                            .as_deref()
                            .map(|s| {
                                TimestepSpacing::from_str(s, false).map_err(|_| {
                                    Error::usage(format!(
                                        "the image's timestep spacing `{s}` is not supported by this altdiff"
                                    ))
                                })
                            })
                            .transpose()?,
                        (None, None) => None,
                    },
                },
                init: init_spec(
                    self.init_image,
                    self.mask,
                    self.strength
                        .or(webui.as_ref().and_then(|w| w.strength)),
                    altdiff_rec,
                )?,
                prompt_syntax: self
                    .prompt_syntax
                    .or(rec.map(|r| r.prompt_syntax))
                    .unwrap_or_default(),
            },
            seed: match (self.seed, &webui) {
                (None, Some(w)) if !w.has_seed => SeedChoice::Random,
                (s, _) => s.unwrap_or_default(),
            },
            strength: self.strength,
            prompt_syntax_given: self.prompt_syntax.is_some(),
            per_image_seeds: self.per_image_seeds,
            from_image: record.clone(),
            latents: self.latents,
            dump_tensors: self.dump_tensors,
            output: OutputOptions {
                target: OutputTarget::from_path(self.output)?,
                name_template: self.name_template,
                overwrite: self.overwrite,
                skip_existing: self.skip_existing,
                grid: self.grid,
                json: self.json,
            },
            device: self.device,
            dtype: self
                .dtype
                .or_else(|| altdiff_rec.and_then(|r| Precision::from_name(&r.dtype))),
            load_policy: self.load_policy,
        };
        opts.validate()?;
        if self.max_length.is_some() && opts.sampling.prompt_syntax == PromptSyntax::Webui {
            return Err(Error::usage(
                "--max-length applies to --prompt-syntax plain only: webui's syntax has no length limit (75-token chunks)",
            ));
        }
        if opts.per_image_seeds && opts.latents.is_some() {
            return Err(Error::usage(
                "--per-image-seeds and --latents do not go together: --latents gives the initial noise and --seed the step noise",
            ));
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` at 80 columns: every example line fits, so none is wrapped mid-command, and a
    /// continuation line follows a line ending in `\`.
    #[test]
    fn help_examples_fit_80_columns() {
        for sub in [None, Some("generate")] {
            let mut cmd = Cli::command().term_width(80);
            let help = match sub {
                None => cmd.render_help().to_string(),
                Some(name) => cmd
                    .find_subcommand_mut(name)
                    .expect("subcommand")
                    .render_help()
                    .to_string(),
            };
            let examples = help
                .split("Examples:\n")
                .nth(1)
                .expect("an Examples section");
            let lines: Vec<&str> = examples.lines().collect();
            assert!(lines.len() >= 6, "{help}");
            for (i, line) in lines.iter().enumerate() {
                let width = crate::term::display_width(line);
                assert!(width <= 80, "{width} columns: {line:?}");
                if i > 0 && !line.trim_start().starts_with(['a', '#']) {
                    assert!(
                        lines[i - 1].ends_with('\\'),
                        "a wrapped example line: {:?} after {:?}",
                        line,
                        lines[i - 1]
                    );
                }
                let t = line.trim_start();
                assert!(
                    t.starts_with("altdiff ") || t.starts_with(['#', '-']),
                    "{line:?}"
                );
            }
        }
    }
}
