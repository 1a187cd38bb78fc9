//! webui's API shapes (`modules/api/models.py`, `modules/api/api.py` of AUTOMATIC1111 webui 1.10)
//! and their meaning in altdiff's terms: a txt2img / img2img body becomes engine jobs, or a 422
//! naming the field. Unknown fields are ignored, as webui's clients send many; webui's defaults for
//! fields altdiff does not use are accepted, a value that would change the image in a way altdiff
//! cannot honour is refused.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::plan::Job;
use crate::metadata::webui::resolve_sampler;
use crate::metadata::InitRecord;
use crate::options::{InitSpec, Sampling};
use crate::pipeline::Init;
use crate::schedulers::{SchedulerKind, SchedulerOptions, TimestepSpacing};
use crate::text::PromptSyntax;

/// A refused request: HTTP status, the field (webui's `loc`) and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// 422 (a bad value) or 413.
    pub status: u16,
    /// The field, if one is to blame.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Refusal {
    /// A 422 naming `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: 422,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// FastAPI's body: `{"detail": [{"loc": ["body", field], "msg": ..., "type": ...}]}`.
    pub fn body(&self) -> Value {
        let loc: Vec<Value> = match &self.field {
            Some(f) => vec!["body".into(), f.clone().into()],
            None => vec!["body".into()],
        };
        json!({"detail": [{"loc": loc, "msg": self.message, "type": "value_error"}]})
    }
}

/// The server's caps (`--max-pixels`, `--max-steps`, `--max-batch`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most pixels per image (width x height).
    pub max_pixels: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Most images per request (batch_size x n_iter).
    pub max_batch: usize,
}

fn default_seed() -> i64 {
    -1
}
fn default_steps() -> usize {
    50
}
fn default_cfg() -> f64 {
    7.0
}
fn default_size() -> usize {
    512
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// `StableDiffusionTxt2ImgProcessingAPI` / `StableDiffusionImg2ImgProcessingAPI`, the fields
/// altdiff reads (every other field is ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct GenerateBody {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    #[serde(default)]
    styles: Option<Vec<String>>,
    #[serde(default = "default_seed")]
    seed: i64,
    #[serde(default)]
    subseed_strength: Option<f64>,
    #[serde(default)]
    seed_resize_from_h: Option<i64>,
    #[serde(default)]
    seed_resize_from_w: Option<i64>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    sampler_index: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default = "default_one")]
    batch_size: usize,
    #[serde(default = "default_one")]
    n_iter: usize,
    #[serde(default = "default_steps")]
    steps: usize,
    #[serde(default = "default_cfg")]
    cfg_scale: f64,
    #[serde(default = "default_size")]
    width: usize,
    #[serde(default = "default_size")]
    height: usize,
    #[serde(default)]
    restore_faces: Option<bool>,
    #[serde(default)]
    tiling: Option<bool>,
    #[serde(default)]
    eta: Option<f64>,
    #[serde(default)]
    s_churn: Option<f64>,
    #[serde(default)]
    s_noise: Option<f64>,
    #[serde(default)]
    enable_hr: Option<bool>,
    #[serde(default)]
    script_name: Option<String>,
    #[serde(default)]
    override_settings: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    refiner_checkpoint: Option<String>,
    #[serde(default = "default_true")]
    pub(crate) send_images: bool,
    // img2img
    #[serde(default)]
    init_images: Option<Vec<String>>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    denoising_strength: Option<f64>,
    #[serde(default)]
    image_cfg_scale: Option<f64>,
    // altdiff's own
    #[serde(default)]
    prompt_syntax: Option<String>,
    #[serde(default)]
    lang: Option<String>,
}

/// Decodes a webui image field: base64, optionally as a `data:image/...;base64,` URL.
fn picture(field: &str, text: &str) -> Result<crate::picture::LoadedPicture, Refusal> {
    let data = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| Refusal::field(field, format!("not valid base64: {e}")))?;
    crate::picture::decode(&bytes).map_err(|m| Refusal::field(field, m))
}

/// What a request turns into.
pub struct Planned {
    /// One job per webui batch (`n_iter` of them), `batch_size` images each.
    pub jobs: Vec<Job>,
    /// img2img's input.
    pub init: Option<(Init, InitRecord)>,
    /// The seed of the first image (after `-1` was replaced).
    pub seed: u64,
}

fn seed_from(v: i64) -> u64 {
    if v < 0 {
        // webui: random.randrange(4294967294).
        crate::engine::plan::random_seed() % 4_294_967_294
    } else {
        v as u64
    }
}

impl GenerateBody {
    /// webui's `batch_size`: images per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Parses a body; a syntax or type error is a 422 naming where it is.
    pub fn parse(bytes: &[u8]) -> Result<Self, Refusal> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Refusal {
            status: 422,
            field: None,
            message: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(map) = &value else {
            return Err(Refusal {
                status: 422,
                field: None,
                message: "the body must be a JSON object".into(),
            });
        };
        serde_json::from_value(value.clone()).map_err(|e| {
            // Which field: the one that fails on its own (every other field has a default).
            let field = map.iter().find_map(|(k, v)| {
                let one = Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<GenerateBody>(one)
                    .is_err()
                    .then(|| k.clone())
            });
            Refusal {
                status: 422,
                message: match &field {
                    Some(f) => format!("`{f}`: {e}"),
                    None => format!("invalid request body: {e}"),
                },
                field,
            }
        })
    }

    /// The jobs of this request, or the field that cannot be honoured.
    pub fn plan(&self, limits: &Limits, img2img: bool) -> Result<Planned, Refusal> {
        if self.prompt.trim().is_empty() {
            return Err(Refusal::field("prompt", "the prompt is empty"));
        }
        crate::options::check_prompt(&self.prompt).map_err(|m| Refusal::field("prompt", m))?;
        if !self.negative_prompt.trim().is_empty() {
            crate::options::check_prompt(&self.negative_prompt)
                .map_err(|m| Refusal::field("negative_prompt", m))?;
        }
        let refuse = |field: &str, what: &str| {
            Err(Refusal::field(
                field,
                format!("{what} is not supported by altdiff"),
            ))
        };
        if self.enable_hr == Some(true) {
            return refuse("enable_hr", "hires fix");
        }
        if self.restore_faces == Some(true) {
            return refuse("restore_faces", "face restoration");
        }
        if self.tiling == Some(true) {
            return refuse("tiling", "tiling");
        }
        if self.styles.as_ref().is_some_and(|s| !s.is_empty()) {
            return refuse("styles", "webui's saved styles");
        }
        if self.subseed_strength.is_some_and(|s| s != 0.0) {
            return refuse("subseed_strength", "a variation seed");
        }
        if self.seed_resize_from_h.is_some_and(|v| v > 0)
            || self.seed_resize_from_w.is_some_and(|v| v > 0)
        {
            return refuse("seed_resize_from_w", "seed resizing");
        }
        if self.script_name.as_deref().is_some_and(|s| !s.is_empty()) {
            return refuse("script_name", "a webui script");
        }
        if self
            .refiner_checkpoint
            .as_deref()
            .is_some_and(|s| !s.is_empty() && s != "None")
        {
            return refuse("refiner_checkpoint", "a refiner");
        }
        if self.s_churn.is_some_and(|v| v != 0.0) {
            return refuse("s_churn", "s_churn other than 0");
        }
        if self.s_noise.is_some_and(|v| v != 1.0) {
            return refuse("s_noise", "s_noise other than 1");
        }
        if img2img && self.image_cfg_scale.is_some_and(|v| v != 0.0 && v != 1.5) {
            // (instruct-pix2pix's; 1.5 is webui's default.)
            return refuse("image_cfg_scale", "image CFG scale");
        }
        if let Some(o) = &self.override_settings {
            for (k, v) in o {
                let harmless = match k.as_str() {
                    "CLIP_stop_at_last_layers" => v.as_f64() == Some(1.0),
                    "sd_vae" => matches!(v.as_str(), Some("Automatic" | "None" | "")),
                    "samples_format" => v.as_str() == Some("png"),
                    "sd_model_checkpoint" | "save_images" | "samples_save" => true,
                    _ => false,
                };
                if !harmless {
                    return Err(Refusal::field(
                        "override_settings",
                        format!("the setting `{k}` = {v} cannot be honoured by altdiff"),
                    ));
                }
            }
        }
        let sampler_name = self
            .sampler_name
            .clone()
            .or_else(|| self.sampler_index.clone())
            .unwrap_or_else(|| "Euler".into());
        let sampler = resolve_sampler(
            &sampler_name,
            self.scheduler.as_deref().unwrap_or("Automatic"),
        )
        .map_err(|m| Refusal::field("sampler_name", m))?;
        if let Some(w) = sampler.warning {
            return Err(Refusal::field("scheduler", w));
        }
        let eta = match (sampler.kind, self.eta) {
            (SchedulerKind::Ddim, Some(e)) => {
                if !(0.0..=1.0).contains(&e) {
                    return Err(Refusal::field("eta", "eta must be from 0 to 1"));
                }
                e
            }
            (SchedulerKind::EulerA, Some(e)) if e != 1.0 => {
                return Err(Refusal::field(
                    "eta",
                    "Euler a's eta other than 1 is not supported by altdiff",
                ))
            }
            _ => 0.0,
        };
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 || v > 4096 {
                return Err(Refusal::field(
                    field,
                    format!("{field} {v} must be a multiple of 8 from 8 to 4096"),
                ));
            }
        }
        if self.width * self.height > limits.max_pixels {
            return Err(Refusal::field(
                "width",
                format!(
                    "{}x{} is {} pixels, more than this server's limit of {} (--max-pixels)",
                    self.width,
                    self.height,
                    self.width * self.height,
                    limits.max_pixels
                ),
            ));
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            return Err(Refusal::field(
                "steps",
                format!(
                    "steps {} must be from 1 to {} (--max-steps)",
                    self.steps, limits.max_steps
                ),
            ));
        }
        if self.batch_size == 0 || self.n_iter == 0 {
            return Err(Refusal::field(
                "batch_size",
                "batch_size and n_iter must be at least 1",
            ));
        }
        let images = self.batch_size.saturating_mul(self.n_iter);
        if images > limits.max_batch {
            return Err(Refusal::field(
                "batch_size",
                format!(
                    "batch_size x n_iter = {images} images, more than this server's limit of {} (--max-batch)",
                    limits.max_batch
                ),
            ));
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            return Err(Refusal::field(
                "cfg_scale",
                "cfg_scale must be a number >= 0",
            ));
        }
        let syntax = match self.prompt_syntax.as_deref() {
            None => PromptSyntax::Webui,
            Some(s) => PromptSyntax::parse(s).ok_or_else(|| {
                Refusal::field(
                    "prompt_syntax",
                    format!("`{s}` is not one of: plain, webui"),
                )
            })?,
        };
        if syntax == PromptSyntax::Webui {
            for (field, text) in [
                ("prompt", &self.prompt),
                ("negative_prompt", &self.negative_prompt),
            ] {
                crate::text::webui::check(text).map_err(|m| Refusal::field(field, m))?;
            }
        }
        let lang = self
            .lang
            .as_deref()
            .map(crate::lang::parse)
            .transpose()
            .map_err(|e| Refusal::field("lang", e.to_string()))?;
        let init = if img2img {
            let images = self.init_images.as_deref().unwrap_or_default();
            let Some(first) = images.first() else {
                return Err(Refusal::field(
                    "init_images",
                    "img2img needs one init image",
                ));
            };
            if images.len() > 1 {
                return Err(Refusal::field(
                    "init_images",
                    "altdiff takes one init image per request",
                ));
            }
            let image = picture("init_images", first)?;
            let mask = self
                .mask
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| picture("mask", m))
                .transpose()?;
            let strength = self.denoising_strength.unwrap_or(0.75);
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(Refusal::field(
                    "denoising_strength",
                    "denoising_strength must be more than 0 and at most 1",
                ));
            }
            if (self.steps as f64 * strength) < 1.0 {
                return Err(Refusal::field(
                    "denoising_strength",
                    format!(
                        "steps x denoising_strength = {} leaves no step to run",
                        self.steps as f64 * strength
                    ),
                ));
            }
            let record = InitRecord {
                image: "(request)".into(),
                image_sha256: image.sha256.clone(),
                mask: mask.as_ref().map(|_| "(request)".to_string()),
                mask_sha256: mask.as_ref().map(|m| m.sha256.clone()),
                strength,
            };
            Some((
                Init {
                    image: image.picture,
                    mask: mask.map(|m| m.picture),
                    strength,
                },
                record,
            ))
        } else {
            None
        };
        let sampling = Sampling {
            negative_prompt: Some(self.negative_prompt.clone()),
            steps: self.steps,
            guidance: self.cfg_scale,
            scheduler: Some(sampler.kind),
            height: Some(self.height),
            width: Some(self.width),
            num_images: self.batch_size,
            max_length: None,
            schedule: SchedulerOptions {
                eta,
                karras: sampler.karras,
                timestep_spacing: sampler.spacing.map(|s| match s {
                    "leading" => TimestepSpacing::Leading,
                    "trailing" => TimestepSpacing::Trailing,
                    _ => TimestepSpacing::Linspace,
                }),
            },
            // The pictures travel in `Planned::init`; the spec only says there is one.
            init: init.as_ref().map(|(_, r)| InitSpec {
                image: "(request)".into(),
                mask: r.mask.as_ref().map(Into::into),
                strength: r.strength,
            }),
            prompt_syntax: syntax,
        };
        sampling
            .validate()
            .map_err(|e| Refusal::field("steps", e.to_string()))?;
        let seed = seed_from(self.seed);
        let jobs = (0..self.n_iter)
            .map(|k| Job {
                index: k,
                line: None,
                prompt: self.prompt.clone(),
                sampling: sampling.clone(),
                // webui: all_seeds = seed + i, image by image.
                seed: seed.wrapping_add((k * self.batch_size) as u64),
                lang,
                output: None,
            })
            .collect();
        Ok(Planned { jobs, init, seed })
    }

    /// The request as webui echoes it in `parameters` (the body's own fields, as sent).
    pub fn echo(raw: &[u8]) -> Value {
        let mut v: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            // The pictures are not sent back.
            for k in ["init_images", "mask"] {
                if o.contains_key(k) {
                    o.insert(k.into(), Value::Null);
                }
            }
        }
        v
    }
}

/// `/sdapi/v1/samplers`: webui's names of altdiff's schedulers (DDPM is not a webui sampler).
pub fn samplers() -> Value {
    let list: Vec<Value> = SchedulerKind::ALL
        .iter()
        .filter(|k| !matches!(k, SchedulerKind::Ddpm | SchedulerKind::DpmPp2mKarras))
        .map(|k| {
            json!({
                "name": k.webui_sampler(),
                "aliases": [k.name()],
                "options": if *k == SchedulerKind::DpmPp2m { json!({"scheduler": "karras"}) } else { json!({}) },
            })
        })
        .collect();
    Value::Array(list)
}

/// `/sdapi/v1/schedulers`: the schedule types altdiff follows.
pub fn schedulers() -> Value {
    let one = |name: &str, label: &str, rho: f64, inner: bool| json!({"name": name, "label": label, "aliases": null, "default_rho": rho, "need_inner_model": inner});
    json!([
        one("automatic", "Automatic", -1.0, false),
        one("uniform", "Uniform", -1.0, true),
        one("karras", "Karras", 7.0, false),
        one("sgm_uniform", "SGM Uniform", -1.0, true),
        one("ddim", "DDIM", -1.0, true),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_pixels: 512 * 512,
            max_steps: 100,
            max_batch: 4,
        }
    }

    fn plan(body: &str) -> Result<Planned, Refusal> {
        GenerateBody::parse(body.as_bytes())?.plan(&limits(), false)
    }

    #[test]
    fn webui_defaults_are_accepted_and_mapped() {
        let p = plan(r#"{"prompt": "a fox", "eta": 1.0, "scheduler": "automatic", "s_noise": 1.0, "enable_hr": false, "styles": [], "restore_faces": false, "override_settings": {}, "alwayson_scripts": {}, "unknown_field": 3, "seed": 7, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M"}"#).unwrap();
        assert_eq!(p.jobs.len(), 2);
        assert_eq!(p.jobs[0].seed, 7);
        assert_eq!(p.jobs[1].seed, 9);
        assert_eq!(p.jobs[0].sampling.num_images, 2);
        assert_eq!(
            p.jobs[0].sampling.scheduler,
            Some(SchedulerKind::DpmPp2mKarras)
        );
        assert_eq!(p.jobs[0].sampling.steps, 50);
        assert_eq!(p.jobs[0].sampling.prompt_syntax, PromptSyntax::Webui);
        let random = plan(r#"{"prompt": "a"}"#).unwrap();
        assert!(random.seed < 4_294_967_294);
    }

    #[test]
    fn what_cannot_be_honoured_is_a_422_naming_the_field() {
        for (body, field) in [
            (r#"{"prompt": "a", "enable_hr": true}"#, "enable_hr"),
            (r#"{"prompt": "a", "restore_faces": true}"#, "restore_faces"),
            (r#"{"prompt": "a", "styles": ["x"]}"#, "styles"),
            (
                r#"{"prompt": "a", "sampler_name": "DPM++ SDE"}"#,
                "sampler_name",
            ),
            (r#"{"prompt": "a", "width": 1024, "height": 1024}"#, "width"),
            (r#"{"prompt": "a", "width": 100}"#, "width"),
            (r#"{"prompt": "a", "steps": 500}"#, "steps"),
            (
                r#"{"prompt": "a", "batch_size": 3, "n_iter": 2}"#,
                "batch_size",
            ),
            (
                r#"{"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 2}}"#,
                "override_settings",
            ),
            (
                r#"{"prompt": "a", "sampler_name": "Euler a", "eta": 0.5}"#,
                "eta",
            ),
            (r#"{"prompt": ""}"#, "prompt"),
            (r#"{"prompt": "[a:b:0.5]"}"#, "prompt"),
            (
                r#"{"prompt": "a", "prompt_syntax": "fancy"}"#,
                "prompt_syntax",
            ),
        ] {
            let r = plan(body)
                .err()
                .unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(r.status, 422, "{body}");
            assert_eq!(r.field.as_deref(), Some(field), "{body}: {}", r.message);
        }
        let bad = GenerateBody::parse(b"{not json").err().unwrap();
        assert_eq!(bad.status, 422);
        assert_eq!(bad.body()["detail"][0]["loc"][0], "body");
        let typed = GenerateBody::parse(br#"{"prompt": "a", "steps": "many"}"#)
            .err()
            .unwrap();
        assert!(
            typed.message.contains("steps") || typed.message.contains("integer"),
            "{}",
            typed.message
        );
    }
}
