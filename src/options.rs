//! Validated option structs that the library takes (the "high-level arguments"): pure Rust, built
//! from the clap structs in [`crate::cli`], checked once so the rest of the code can trust them.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::schedulers::{SchedulerKind, SchedulerOptions};
use crate::source::ModelSource;

/// Which compute device to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA if built in and present, then Metal, then CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// The Metal GPU.
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}` (expected auto, cpu, cuda, cuda:N or metal)"
                )),
            },
        }
    }
}

/// When the model's components are loaded and freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadPolicy {
    /// `per-stage` for a run of one batch, `keep` for several.
    #[default]
    Auto,
    /// Load all three at start-up and keep them (no reloading between batches; most memory).
    Keep,
    /// Load each component when its stage starts and free it after (text encoder freed before the
    /// UNet runs, UNet before the VAE decodes): least memory; each batch reloads them.
    PerStage,
}

/// Floating-point precision of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats (the default on CPU; the precision parity is measured in).
    F32,
    /// 16-bit floats (the default on GPUs).
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The command-line name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Self> {
        [Precision::F32, Precision::F16, Precision::Bf16]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// Where images go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// Exactly this file (one image only).
    File(PathBuf),
    /// A directory, created if needed; file names are picked so nothing is overwritten.
    Dir(PathBuf),
}

/// Extensions (lower case) of image formats altdiff does not write: `--output x.jpg` is a mistake, not a
/// directory name.
pub const OTHER_IMAGE_EXTENSIONS: [&str; 12] = [
    "jpg", "jpeg", "jpe", "jfif", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "jxl",
];

impl OutputTarget {
    /// A path ending in `.png` is a file, anything else a directory; a path ending in another
    /// image format's extension (`.jpg`, `.webp`, ...) is an error, since altdiff writes PNG only.
    pub fn from_path(path: PathBuf) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Self::File(path)),
            Some(e) if OTHER_IMAGE_EXTENSIONS.contains(&e) => Err(Error::usage(format!(
                "--output {}: altdiff writes PNG images only (with their metadata); name a .png file or a directory",
                path.display()
            ))),
            _ => Ok(Self::Dir(path)),
        }
    }
}

/// The settings of one generation (everything a batch line could override).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Negative prompt for every prompt (`""` when `None`).
    pub negative_prompt: Option<String>,
    /// Inference steps (1 to [`MAX_STEPS`]).
    pub steps: usize,
    /// Classifier-free guidance scale (finite, >= 0); no guidance when <= 1.
    pub guidance: f64,
    /// Scheduler; the model's own when `None`.
    pub scheduler: Option<SchedulerKind>,
    /// Image height in pixels; the model's default when `None`.
    pub height: Option<usize>,
    /// Image width in pixels; the model's default when `None`.
    pub width: Option<usize>,
    /// Images per prompt (>= 1).
    pub num_images: usize,
    /// Token length; 77 or the tokenizer's limit if smaller when `None`.
    pub max_length: Option<usize>,
    /// `--eta`, `--karras`, `--timestep-spacing`.
    pub schedule: SchedulerOptions,
    /// Image-to-image or inpainting (`--init-image`, `--mask`, `--strength`).
    pub init: Option<InitSpec>,
    /// How the prompt and negative prompt are read (`--prompt-syntax`).
    pub prompt_syntax: crate::text::PromptSyntax,
}

/// diffusers' default `strength` for image-to-image.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// Where image-to-image starts from: files, read when their batch runs.
#[derive(Debug, Clone, PartialEq)]
pub struct InitSpec {
    /// The init image (PNG, JPEG or WebP).
    pub image: PathBuf,
    /// Inpainting: white = repaint, black = keep.
    pub mask: Option<PathBuf>,
    /// 0 < strength <= 1.
    pub strength: f64,
}

impl Default for Sampling {
    /// diffusers' defaults: 50 steps, guidance 7.5, one image.
    fn default() -> Self {
        Self {
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            height: None,
            width: None,
            num_images: 1,
            max_length: None,
            schedule: SchedulerOptions::default(),
            init: None,
            prompt_syntax: crate::text::PromptSyntax::Plain,
        }
    }
}

/// A model and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// Local directory or hub repository.
    pub source: ModelSource,
    /// Weight variant (`fp16` for `*.fp16.safetensors`).
    pub variant: Option<String>,
}

/// `--shard K/N`: keep the prompts whose global position mod N is K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, 0-based.
    pub index: usize,
    /// The number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("invalid shard `{s}`: expected K/N with 0 <= K < N, e.g. 0/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// What `--seed` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeedChoice {
    /// No `--seed`: the image's seed with `--from-image`, 0 with `--latents`, else a random seed
    /// (reported).
    #[default]
    Unset,
    /// `--seed -1` (webui's "random"): a fresh random seed (reported), even with `--from-image`.
    Random,
    /// `--seed N`.
    Value(u64),
}

impl std::str::FromStr for SeedChoice {
    type Err = String;
    /// A whole number 0 to 2^64 - 1, or `-1` / `random` for a random seed.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "-1" | "random" => Ok(Self::Random),
            t => t.parse::<u64>().map(Self::Value).map_err(|_| {
                format!("invalid seed `{s}`: expected a whole number from 0 to 18446744073709551615, or -1 for a random seed")
            }),
        }
    }
}

/// How output files are named and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputOptions {
    /// Where images go.
    pub target: OutputTarget,
    /// File name template for directories (see [`crate::output::NameTemplate`]).
    pub name_template: String,
    /// Replace existing files instead of picking the next free name.
    pub overwrite: bool,
    /// Skip jobs whose files already exist (resuming a batch).
    pub skip_existing: bool,
    /// Also write a contact sheet of all images.
    pub grid: bool,
    /// Print one JSON object per written image on stdout.
    pub json: bool,
}

/// Everything `altdiff generate` needs, validated.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The model.
    pub model: ModelChoice,
    /// Prompts given with `--prompt`, in order.
    pub prompts: Vec<String>,
    /// `--prompt-file` (`-` for stdin).
    pub prompt_file: Option<PathBuf>,
    /// `--lang`: a language code or English name for every prompt without its own.
    pub lang: Option<String>,
    /// Prompts sharing settings that go through the UNet together.
    pub batch_size: usize,
    /// `--shard K/N`.
    pub shard: Option<Shard>,
    /// Generation settings.
    pub sampling: Sampling,
    /// `--seed`. With `--latents` it seeds the step noise only (0 when unset).
    pub seed: SeedChoice,
    /// `--strength`: for `--init-image`, and the default of batch lines that give `init_image`.
    pub strength: Option<f64>,
    /// Whether `--prompt-syntax` was given (else webui-style batch lines read their prompts with
    /// webui's syntax, the rest with `sampling.prompt_syntax`).
    pub prompt_syntax_given: bool,
    /// `--per-image-seeds`: one generator per image, seeded seed + i (diffusers' list of
    /// generators), so each image can be regenerated alone.
    pub per_image_seeds: bool,
    /// The record of the image given with `--from-image` (its seed and noise position are reused
    /// unless `--seed` overrides them).
    pub from_image: Option<crate::metadata::ImageRecord>,
    /// Initial latents file.
    pub latents: Option<PathBuf>,
    /// Where to dump intermediate tensors.
    pub dump_tensors: Option<PathBuf>,
    /// Outputs.
    pub output: OutputOptions,
    /// Compute device.
    pub device: DeviceChoice,
    /// Precision; f32 on CPU and f16 on GPUs when `None`.
    pub dtype: Option<Precision>,
    /// When components are loaded and freed.
    pub load_policy: LoadPolicy,
}

/// Checks a prompt's text: not empty or blank, and no control characters other than tab and line
/// breaks (a stray escape or bell, or a binary file read as prompts). The message says what and where.
pub fn check_prompt(text: &str) -> std::result::Result<(), String> {
    if text.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    match text
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        Some((i, c)) => Err(format!(
            "the prompt contains the control character U+{:04X} at character {}; remove it",
            c as u32,
            i + 1
        )),
        None => Ok(()),
    }
}

/// The largest step count accepted (diffusers' schedulers train on 1000 timesteps).
pub const MAX_STEPS: usize = 1000;

impl Sampling {
    /// Checks the values that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::usage(format!(
                "--steps {} is out of range (1 to {MAX_STEPS})",
                self.steps
            )));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::usage(format!(
                "--guidance {} must be a finite number >= 0 (values <= 1 turn guidance off)",
                self.guidance
            )));
        }
        if self.num_images == 0 {
            return Err(Error::usage("--num-images must be at least 1"));
        }
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if let Some(v) = v {
                if v == 0 || v % 8 != 0 || v > 4096 {
                    return Err(Error::usage(format!(
                        "--{name} {v} must be a multiple of 8 between 8 and 4096"
                    )));
                }
            }
        }
        if let Some(kind) = self.scheduler {
            self.schedule.check(kind)?;
        }
        if let Some(init) = &self.init {
            crate::schedulers::img2img_start(self.steps, init.strength, 1)?;
        }
        if let Some(m) = self.max_length {
            if !(2..=512).contains(&m) {
                return Err(Error::usage(format!(
                    "--max-length {m} is out of range (2 to 512, XLM-R's limit)"
                )));
            }
        }
        Ok(())
    }
}

impl GenerateOptions {
    /// Checks values that do not need the model.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() && self.prompt_file.is_none() {
            return Err(Error::usage(
                "give at least one --prompt or a --prompt-file",
            ));
        }
        for (i, p) in self.prompts.iter().enumerate() {
            check_prompt(p).map_err(|m| {
                Error::usage(format!(
                    "prompt {}{}",
                    i + 1,
                    m.trim_start_matches("the prompt")
                ))
            })?;
        }
        // An empty negative prompt is the default; control characters are not.
        if let Some(neg) = self.sampling.negative_prompt.as_deref() {
            if !neg.trim().is_empty() {
                check_prompt(neg).map_err(|m| {
                    Error::usage(format!(
                        "--negative-prompt{}",
                        m.trim_start_matches("the prompt")
                    ))
                })?;
            }
        }
        if self.sampling.prompt_syntax == crate::text::PromptSyntax::Webui {
            let negative = self.sampling.negative_prompt.iter();
            for p in self.prompts.iter().chain(negative) {
                crate::text::webui::check(p).map_err(Error::Usage)?;
            }
        }
        self.sampling.validate()?;
        if let Some(s) = self.strength {
            if self.sampling.init.is_none() && self.prompt_file.is_none() {
                return Err(Error::usage(format!(
                    "--strength {s} needs --init-image (or a batch file whose lines give init_image)"
                )));
            }
            crate::schedulers::img2img_start(self.sampling.steps, s, 1)?;
        }
        if self.batch_size == 0 {
            return Err(Error::usage("--batch-size must be at least 1"));
        }
        if self.output.overwrite && self.output.skip_existing {
            return Err(Error::usage(
                "--overwrite and --skip-existing contradict each other; give one",
            ));
        }
        let total = self.prompts.len() * self.sampling.num_images;
        if let OutputTarget::File(p) = &self.output.target {
            if self.prompt_file.is_some() {
                return Err(Error::usage(format!(
                    "--output {} names one file but --prompt-file makes one image per line; give a directory",
                    p.display()
                )));
            }
            if total > 1 {
                return Err(Error::usage(format!(
                    "--output {} names one file but this run makes {total} images; give a directory",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}
