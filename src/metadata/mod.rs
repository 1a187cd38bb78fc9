//! What is stored with each image: webui's `parameters` text (so webui, ComfyUI and image viewers
//! show it, and webui's "PNG Info" reads back the prompt, sampler, schedule, CFG, seed and size)
//! and an `altdiff` JSON record with everything needed to regenerate the image.
//!
//! Both go into UTF-8 iTXt chunks. `altdiff info` prints them; `altdiff generate --from-image`
//! rebuilds a generation from the JSON record or, for a PNG made by webui, from its text
//! ([`webui::import`]). The text's format is [`infotext`]'s.

pub mod infotext;
pub mod webui;

use std::io::{BufRead, BufReader, Seek};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;
use crate::text::PromptSyntax;

/// The iTXt keyword of the webui-style parameters.
pub const PARAMETERS_KEY: &str = "parameters";
/// The iTXt keyword of the JSON record.
pub const RECORD_KEY: &str = "altdiff";

/// Where an image's initial noise came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NoiseRecord {
    /// `torch.randn` over `batch` images from a CPU generator seeded with `seed`; this image is
    /// number `index` of them (diffusers' layout for several images in one call).
    Seed {
        /// The generator seed.
        seed: u64,
        /// Images drawn in the one randn call.
        batch: usize,
        /// This image's position among them.
        index: usize,
    },
    /// A `--latents` file (not stored, so the image cannot be regenerated from its metadata alone).
    LatentsFile,
}

/// The model an image was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Hub repository id or local path.
    pub source: String,
    /// Hub revision asked for (None for local models).
    pub revision: Option<String>,
    /// The commit it resolved to (None for local models).
    pub commit: Option<String>,
    /// Weight variant.
    pub variant: Option<String>,
}

/// The picture(s) an image-to-image or inpainting result started from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRecord {
    /// The init image's path, as it was read.
    pub image: String,
    /// SHA-256 of the init image file (lower-case hex).
    pub image_sha256: String,
    /// The mask's path (inpainting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// SHA-256 of the mask file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
    /// diffusers' `strength` (webui's "Denoising strength").
    pub strength: f64,
}

/// Everything needed to regenerate one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// altdiff's version that wrote it.
    pub altdiff: String,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: Option<String>,
    /// ISO 639-1 code of the prompt's language (given or detected).
    pub lang: Option<String>,
    /// The initial noise.
    pub noise: NoiseRecord,
    /// Inference steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// altdiff's scheduler name.
    pub scheduler: String,
    /// The model's scheduler_config.json as used (with `--karras` / `--timestep-spacing` applied).
    pub scheduler_config: serde_json::Value,
    /// DDIM's `--eta`, when above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// `--karras`, when given.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub karras: bool,
    /// `--timestep-spacing`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Token length.
    pub max_length: usize,
    /// The model.
    pub model: ModelRecord,
    /// Compute precision.
    pub dtype: String,
    /// Image-to-image / inpainting input, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitRecord>,
    /// How the prompts were read (`plain` for records written before there was a choice).
    #[serde(default)]
    pub prompt_syntax: PromptSyntax,
}

impl ImageRecord {
    /// The seed, when the noise came from one.
    pub fn seed(&self) -> Option<u64> {
        match self.noise {
            NoiseRecord::Seed { seed, .. } => Some(seed),
            NoiseRecord::LatentsFile => None,
        }
    }

    /// The `timestep_spacing` the scheduler ran with: the recorded config's, else the class's
    /// default.
    pub fn spacing(&self) -> String {
        let kind = SchedulerKind::parse(&self.scheduler);
        self.timestep_spacing
            .clone()
            .or_else(|| {
                self.scheduler_config
                    .get("timestep_spacing")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| kind.map_or("leading", |k| k.default_spacing()).to_string())
    }

    /// The model's name as webui shows it: the hub repository id, or a local model's directory
    /// name (never the absolute path).
    pub fn model_name(&self) -> String {
        let hub = self.model.commit.is_some() || self.model.revision.is_some();
        let source = self.model.source.trim_end_matches(['/', '\\']);
        match Path::new(source).file_name() {
            Some(name) if !hub => name.to_string_lossy().into_owned(),
            _ => source.to_string(),
        }
    }

    /// webui's `parameters` text as webui 1.9+'s `create_infotext` writes it: the prompt,
    /// `Negative prompt: ...`, then webui's keys in webui's order (`Sampler` and `Schedule type`
    /// apart, `RNG: CPU` since the seeds are PyTorch's CPU generator's, `Emphasis: None` for
    /// plain-syntax prompts with brackets, which webui would otherwise read as emphasis), then
    /// altdiff's own keys and `Version`.
    pub fn webui_parameters(&self) -> String {
        let kind = SchedulerKind::parse(&self.scheduler);
        let mut p: Vec<(&str, String)> = vec![("Steps", self.steps.to_string())];
        match kind {
            Some(k) => {
                p.push(("Sampler", k.webui_sampler().into()));
                p.push((
                    "Schedule type",
                    webui::schedule_type(k, self.karras, &self.spacing()).into(),
                ));
            }
            None => p.push(("Sampler", self.scheduler.clone())),
        }
        p.push(("CFG scale", python_float(self.guidance)));
        p.push((
            "Seed",
            self.seed()
                .map_or_else(|| "latents file".to_string(), |s| s.to_string()),
        ));
        p.push(("Size", format!("{}x{}", self.width, self.height)));
        p.push(("Model", self.model_name()));
        if let Some(init) = &self.init {
            p.push(("Denoising strength", python_float(init.strength)));
        }
        if self.seed().is_some() {
            p.push(("RNG", "CPU".into()));
        }
        if let Some(eta) = self.eta {
            p.push(("Eta DDIM", python_float(eta)));
        }
        let negative = self.negative_prompt.as_deref().unwrap_or("");
        let brackets = |t: &str| t.contains(['(', '[']);
        if self.prompt_syntax == PromptSyntax::Plain
            && (brackets(&self.prompt) || brackets(negative))
        {
            p.push(("Emphasis", "None".into()));
        }
        // altdiff's own keys.
        if let Some(commit) = &self.model.commit {
            p.push(("Model commit", commit.chars().take(10).collect()));
        }
        if let NoiseRecord::Seed { batch, index, .. } = self.noise {
            if batch > 1 {
                p.push(("Noise batch", batch.to_string()));
                p.push(("Noise batch pos", index.to_string()));
            }
        }
        if let Some(spacing) = &self.timestep_spacing {
            p.push(("Timestep spacing", spacing.clone()));
        }
        if let Some(lang) = &self.lang {
            p.push(("Lang", lang.clone()));
        }
        p.push(("Prompt syntax", self.prompt_syntax.name().into()));
        if self.prompt_syntax == PromptSyntax::Plain {
            p.push(("Max length", self.max_length.to_string()));
        }
        p.push(("Version", format!("altdiff {}", self.altdiff)));
        infotext::format(&self.prompt, negative, &p)
    }

    /// The two text chunks to store.
    pub fn chunks(&self) -> Result<Vec<(&'static str, String)>> {
        let json =
            serde_json::to_string(self).map_err(|e| Error::usage(format!("metadata: {e}")))?;
        Ok(vec![
            (PARAMETERS_KEY, self.webui_parameters()),
            (RECORD_KEY, json),
        ])
    }
}

/// A number as Python's `str(float)` writes it for the values webui's text holds (`1.0`, `0.75`):
/// a whole number keeps its `.0`.
pub fn python_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// The most bytes of text that the compressed (zTXt, compressed iTXt) chunks of one PNG may inflate
/// to, all chunks together. A deflate stream expands up to about 1000 times, so without a bound a small
/// hostile file could make [`read_png_text`] allocate gigabytes; a compressed chunk that would go past
/// what is left of this budget is skipped, as one that does not inflate is. (altdiff and webui write
/// their text uncompressed, a few kilobytes.)
pub const MAX_INFLATED_TEXT: usize = 8 << 20;

/// Every text chunk (tEXt, zTXt, iTXt) of a PNG file, as (keyword, text).
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    // A directory opens on Unix and fails on the first read: check it here for a clear message.
    let file = std::fs::File::open(path)
        .and_then(|f| {
            if f.metadata()?.is_dir() {
                Err(std::io::Error::from(std::io::ErrorKind::IsADirectory))
            } else {
                Ok(f)
            }
        })
        .map_err(|e| Error::input("", path, &e))?;
    read_png_text_from(BufReader::new(file), path)
}

/// [`read_png_text`] of a PNG read from `reader`; `path` only names it in errors. Reads only the
/// chunks before the image data; memory use is bounded by the size of those chunks plus
/// [`MAX_INFLATED_TEXT`].
pub fn read_png_text_from<R: BufRead + Seek>(
    reader: R,
    path: &Path,
) -> Result<Vec<(String, String)>> {
    let bad = |e: png::DecodingError| {
        Error::usage(format!("{}: not a readable PNG ({e})", path.display()))
    };
    let mut decoder = png::Decoder::new(reader);
    decoder.set_ignore_text_chunk(false);
    // Only the chunks before the image data are read (altdiff and webui write their text there), so a
    // hostile file cannot make this allocate an image buffer.
    let reader = decoder.read_info().map_err(bad)?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    // `get_text` inflates without a bound: inflate a copy with the budget that is left instead.
    let mut budget = MAX_INFLATED_TEXT;
    for c in &info.compressed_latin1_text {
        let mut c = c.clone();
        if c.decompress_text_with_limit(budget).is_ok() {
            if let Ok(t) = c.get_text() {
                budget = budget.saturating_sub(t.len());
                out.push((c.keyword, t));
            }
        }
    }
    for c in &info.utf8_text {
        let mut c = c.clone();
        // (A no-op for uncompressed text, which the decoder's own limits already bound.)
        if c.decompress_text_with_limit(budget).is_err() {
            continue;
        }
        if let Ok(t) = c.get_text() {
            if c.compressed {
                budget = budget.saturating_sub(t.len());
            }
            out.push((c.keyword, t));
        }
    }
    Ok(out)
}

/// What `--from-image` regenerates from.
#[derive(Debug, Clone)]
pub enum Settings {
    /// altdiff's own record: every setting, the image reproduced exactly.
    Altdiff(ImageRecord),
    /// A PNG with webui's `parameters` text only (made by webui or another tool that writes it).
    Webui(webui::Imported),
}

/// The settings stored in a PNG: altdiff's record if it has one, else webui's text.
pub fn read_settings(path: &Path) -> Result<Settings> {
    let chunks = read_png_text(path)?;
    if chunks.iter().any(|(k, _)| k == RECORD_KEY) {
        return record_from_chunks(&chunks, path).map(Settings::Altdiff);
    }
    match chunks.iter().find(|(k, _)| k == PARAMETERS_KEY) {
        Some((_, text)) => webui::import(&infotext::parse(text), path).map(Settings::Webui),
        None => Err(Error::usage(format!(
            "{}: no generation parameters (neither altdiff's record nor webui's `parameters` text)",
            path.display()
        ))),
    }
}

/// The altdiff record of a PNG written by altdiff.
pub fn read_record(path: &Path) -> Result<ImageRecord> {
    record_from_chunks(&read_png_text(path)?, path)
}

/// [`read_record`] of a PNG read from `reader`; `path` only names it in errors.
pub fn read_record_from<R: BufRead + Seek>(reader: R, path: &Path) -> Result<ImageRecord> {
    record_from_chunks(&read_png_text_from(reader, path)?, path)
}

fn record_from_chunks(chunks: &[(String, String)], path: &Path) -> Result<ImageRecord> {
    let json = chunks
        .iter()
        .find(|(k, _)| k == RECORD_KEY)
        .map(|(_, v)| v)
        .ok_or_else(|| {
            Error::usage(format!(
                "{}: no altdiff metadata (only images written by altdiff can be regenerated)",
                path.display()
            ))
        })?;
    serde_json::from_str(json).map_err(|e| {
        Error::usage(format!(
            "{}: unreadable altdiff metadata: {e}",
            path.display()
        ))
    })
}
