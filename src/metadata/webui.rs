//! altdiff's settings in webui's words and back: sampler names, schedule types, and reading a PNG
//! that only webui's `parameters` text describes into the settings of a regeneration.
//!
//! Sampler and schedule: webui 1.9+ splits the old `DPM++ 2M Karras` into `Sampler: DPM++ 2M` and
//! `Schedule type: Karras`, and reads a missing schedule as `Automatic`, the sampler's own default
//! (Karras for DPM++ 2M). altdiff therefore always writes the schedule that matches its timesteps:
//!
//! | altdiff | webui `Schedule type` |
//! | --- | --- |
//! | Karras sigmas (`dpm++2m-karras`, `--karras`) | `Karras` |
//! | `timestep_spacing` `linspace` (the sigma schedulers' default) | `Uniform` (k-diffusion's `get_sigmas`) |
//! | `leading` (PNDM, DDIM, DDPM) | `DDIM` (webui 1.10's schedule of the same timesteps) |
//! | `trailing` | `SGM Uniform` |
//!
//! Reading webui's text back maps the other way; webui's PLMS, DDIM and UniPC ignore the
//! schedule (they always take `leading` timesteps), as altdiff then does. webui's samplers are
//! k-diffusion's, not diffusers', so a webui image is approximated, never reproduced bit for bit.

use std::path::Path;

use super::infotext::Infotext;
use super::{ImageRecord, ModelRecord, NoiseRecord};
use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;
use crate::text::PromptSyntax;

/// webui's `Schedule type` for a scheduler with Karras sigmas or not and its effective
/// `timestep_spacing`.
pub fn schedule_type(kind: SchedulerKind, karras: bool, spacing: &str) -> &'static str {
    if karras || kind == SchedulerKind::DpmPp2mKarras {
        return "Karras";
    }
    match spacing {
        "leading" => "DDIM",
        "trailing" => "SGM Uniform",
        _ => "Uniform",
    }
}

/// webui's schedule labels (`modules/sd_schedulers.py`), which old infotexts also append to the
/// sampler name (`DPM++ 2M Karras`).
const SCHEDULE_LABELS: [&str; 12] = [
    "Automatic",
    "Uniform",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGM Uniform",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
];

/// Keys that describe the image without changing how it is made (or that are read elsewhere).
const INFORMATIONAL: [&str; 14] = [
    "Model hash",
    "Model",
    "VAE hash",
    "Version",
    "User",
    "Init image hash",
    "Clip skip",
    "Schedule max sigma",
    "Schedule min sigma",
    "Schedule rho",
    "Mask mode",
    "Masked content",
    "Inpaint area",
    "Masked area padding",
];

/// A generation read from webui's `parameters` text.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The settings, as a record (model, dtype and language are not webui's to give: empty).
    pub record: ImageRecord,
    /// Whether the text gave a seed (without one the seed is random).
    pub has_seed: bool,
    /// webui's `Denoising strength`, for an image-to-image run given `--init-image` (webui's text
    /// does not say where its init image was).
    pub strength: Option<f64>,
    /// One line per key that altdiff cannot honour or honours only approximately.
    pub warnings: Vec<String>,
}

fn number<T: std::str::FromStr>(info: &Infotext, key: &str, path: &Path) -> Result<Option<T>> {
    info.get(key)
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| {
                Error::usage(format!(
                    "{}: webui's `{key}: {v}` is not a number",
                    path.display()
                ))
            })
        })
        .transpose()
}

/// The sampler and schedule type of webui's text (a schedule appended to the sampler name, as
/// webui before 1.9 wrote it, wins: [`resolve_sampler`]).
fn sampler_and_schedule(info: &Infotext) -> (String, String) {
    (
        info.get("Sampler").unwrap_or("Euler").trim().to_string(),
        info.get("Schedule type")
            .unwrap_or("Automatic")
            .trim()
            .to_string(),
    )
}

/// A webui sampler and schedule type in altdiff's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct WebuiSampler {
    /// The scheduler.
    pub kind: SchedulerKind,
    /// `--karras`.
    pub karras: bool,
    /// `--timestep-spacing`, when it differs from the scheduler's default.
    pub spacing: Option<&'static str>,
    /// A schedule type altdiff does not have (the nearest is used).
    pub warning: Option<String>,
}

/// webui's sampler (`DPM++ 2M`, `Euler a`, `PLMS`, old names such as `DPM++ 2M Karras` or
/// `k_euler_a`) and schedule type (label or name: `Karras` / `karras`, `Automatic`, `Uniform`,
/// `DDIM`, `SGM Uniform`) as altdiff's scheduler, Karras flag and timestep spacing. A sampler
/// altdiff does not have is an error naming it and listing those it has.
pub fn resolve_sampler(sampler: &str, schedule: &str) -> std::result::Result<WebuiSampler, String> {
    let mut name = sampler.trim().to_string();
    let mut schedule = normalise_schedule(schedule);
    for label in SCHEDULE_LABELS {
        if let Some(stem) = name.strip_suffix(&format!(" {label}")) {
            schedule = label.to_string();
            name = stem.to_string();
            break;
        }
    }
    let mut kind = match SchedulerKind::parse(&name) {
        Some(k) if k != SchedulerKind::Ddpm => k,
        _ => {
            let known: Vec<&str> = SchedulerKind::ALL
                .iter()
                .filter(|k| **k != SchedulerKind::Ddpm && **k != SchedulerKind::DpmPp2mKarras)
                .map(|k| k.webui_sampler())
                .collect();
            return Err(format!(
                "webui's sampler `{sampler}` has no altdiff scheduler (altdiff has webui's {})",
                known.join(", ")
            ));
        }
    };
    let mut karras = false;
    let mut spacing = None;
    let mut warning = None;
    if ["PLMS", "DDIM", "UniPC"].contains(&kind.webui_name()) {
        // webui's own PLMS, DDIM and UniPC: `range(0, 1000, 1000 // steps) + 1` whatever the
        // schedule says.
        spacing = (kind.default_spacing() != "leading").then_some("leading");
    } else {
        let schedule = match schedule.as_str() {
            "Automatic" if kind == SchedulerKind::DpmPp2m => "Karras",
            "Automatic" => "Uniform",
            s => s,
        };
        match schedule {
            "Karras" if kind == SchedulerKind::DpmPp2m => kind = SchedulerKind::DpmPp2mKarras,
            "Karras" if kind.supports_karras() => karras = true,
            "Uniform" => spacing = Some("linspace"),
            "DDIM" => spacing = Some("leading"),
            "SGM Uniform" => spacing = Some("trailing"),
            other => {
                warning = Some(format!(
                    "webui's schedule type `{other}` is not available for {sampler}: using {}",
                    if other == "Karras" {
                        "its own sigmas"
                    } else {
                        "Uniform (linspace) timesteps"
                    }
                ))
            }
        }
        if kind == SchedulerKind::DpmPp2mKarras || karras {
            spacing = None;
        } else if spacing.is_none() {
            spacing = Some("linspace");
        }
        if spacing == Some(kind.default_spacing()) {
            spacing = None;
        }
    }
    Ok(WebuiSampler {
        kind,
        karras,
        spacing,
        warning,
    })
}

/// A schedule type by label or name (`Karras`, `karras`, `sgm_uniform`, `SGMUniform`).
fn normalise_schedule(s: &str) -> String {
    let key: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '_'))
        .flat_map(char::to_lowercase)
        .collect();
    SCHEDULE_LABELS
        .iter()
        .find(|l| l.replace(' ', "").to_lowercase() == key)
        .map_or_else(|| s.trim().to_string(), |l| l.to_string())
}

/// The settings of a PNG that has webui's text only. Samplers altdiff does not have are an error
/// naming them; keys that would change the image in a way altdiff cannot follow are warnings.
pub fn import(info: &Infotext, path: &Path) -> Result<Imported> {
    let at = || path.display().to_string();
    if info.prompt.trim().is_empty() {
        return Err(Error::usage(format!(
            "{}: webui's parameters text has no prompt",
            at()
        )));
    }
    let mut warnings: Vec<String> = Vec::new();
    let (sampler, schedule) = sampler_and_schedule(info);
    let WebuiSampler {
        kind,
        karras,
        spacing,
        warning,
    } = resolve_sampler(&sampler, &schedule).map_err(|m| Error::usage(format!("{}: {m}", at())))?;
    warnings.extend(warning);
    let seed = number::<u64>(info, "Seed", path)?;
    let steps = number::<usize>(info, "Steps", path)?.unwrap_or(20);
    let guidance = number::<f64>(info, "CFG scale", path)?.unwrap_or(7.0);
    let width = number::<usize>(info, "Size-1", path)?.unwrap_or(512);
    let height = number::<usize>(info, "Size-2", path)?.unwrap_or(512);
    let hires = info.params.iter().any(|(k, _)| k.starts_with("Hires"));
    let strength = if hires {
        None
    } else {
        number::<f64>(info, "Denoising strength", path)?
    };
    let eta = match kind {
        SchedulerKind::Ddim => number::<f64>(info, "Eta DDIM", path)?.filter(|e| *e > 0.0),
        _ => None,
    };
    match info.get("RNG").unwrap_or("GPU") {
        "CPU" => {}
        other => warnings.push(format!(
            "webui drew this image's noise with its {other} generator (RNG: {other}); altdiff's seeds are PyTorch's CPU generator, so the same seed gives different noise"
        )),
    }
    if let Some(c) = info.get("Clip skip").filter(|c| c.trim() != "1") {
        warnings.push(format!(
            "Clip skip: {c} is not honoured (AltDiffusion's XLM-R encoder has no clip skip)"
        ));
    }
    if kind == SchedulerKind::EulerA {
        if let Some(e) = info
            .get("Eta")
            .filter(|e| e.trim().parse::<f64>() != Ok(1.0))
        {
            warnings.push(format!(
                "Eta: {e} (ancestral eta) is not honoured: altdiff uses 1"
            ));
        }
    }
    let syntax = match info.get("Emphasis") {
        None | Some("Original") => PromptSyntax::Webui,
        Some("None") => PromptSyntax::Plain,
        Some(other) => {
            warnings.push(format!(
                "Emphasis: {other} is not honoured: webui's Original emphasis is used"
            ));
            PromptSyntax::Webui
        }
    };
    let handled = [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size-1",
        "Size-2",
        "Denoising strength",
        "RNG",
        "Eta DDIM",
        "Eta",
        "Emphasis",
    ];
    let ignored: Vec<&str> = info
        .params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !handled.contains(k) && !INFORMATIONAL.contains(k))
        .collect();
    if !ignored.is_empty() {
        let mut keys: Vec<&str> = Vec::new();
        for k in ignored {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        warnings.push(format!(
            "webui settings altdiff cannot honour, ignored: {}",
            keys.join(", ")
        ));
    }
    let record = ImageRecord {
        altdiff: format!("webui {}", info.get("Version").unwrap_or(""))
            .trim()
            .into(),
        prompt: info.prompt.clone(),
        negative_prompt: Some(info.negative_prompt.clone()).filter(|n| !n.is_empty()),
        lang: None,
        noise: match seed {
            Some(seed) => NoiseRecord::Seed {
                seed,
                batch: 1,
                index: 0,
            },
            None => NoiseRecord::LatentsFile,
        },
        steps,
        guidance,
        scheduler: kind.name().into(),
        scheduler_config: serde_json::Value::Null,
        eta,
        karras,
        timestep_spacing: spacing.map(str::to_string),
        width,
        height,
        max_length: crate::pipeline::DEFAULT_MAX_LENGTH,
        model: ModelRecord {
            source: info.get("Model").unwrap_or("").to_string(),
            revision: None,
            commit: None,
            variant: None,
        },
        dtype: String::new(),
        init: None,
        prompt_syntax: syntax,
    };
    Ok(Imported {
        record,
        has_seed: seed.is_some(),
        strength,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::super::infotext::parse;
    use super::*;

    fn import_text(text: &str) -> Result<Imported> {
        import(&parse(text), Path::new("w.png"))
    }

    #[test]
    fn maps_samplers_and_schedules() {
        let case = |sampler: &str, schedule: Option<&str>| {
            let sched = schedule.map_or(String::new(), |s| format!(", Schedule type: {s}"));
            let text = format!(
                "a fox\nSteps: 20, Sampler: {sampler}{sched}, CFG scale: 7, Seed: 5, Size: 512x768, RNG: CPU"
            );
            let r = import_text(&text).unwrap().record;
            (r.scheduler, r.karras, r.timestep_spacing)
        };
        let s = |k: &str| k.to_string();
        assert_eq!(case("DPM++ 2M", None), (s("dpm++2m-karras"), false, None));
        assert_eq!(
            case("DPM++ 2M", Some("Karras")),
            (s("dpm++2m-karras"), false, None)
        );
        assert_eq!(
            case("DPM++ 2M", Some("Uniform")),
            (s("dpm++2m"), false, None)
        );
        assert_eq!(
            case("DPM++ 2M", Some("DDIM")),
            (s("dpm++2m"), false, Some(s("leading")))
        );
        assert_eq!(
            case("DPM++ 2M Karras", Some("Automatic")),
            (s("dpm++2m-karras"), false, None)
        );
        assert_eq!(case("Euler a", None), (s("euler-a"), false, None));
        assert_eq!(case("Euler", Some("Karras")), (s("euler"), true, None));
        assert_eq!(
            case("Heun", Some("SGM Uniform")),
            (s("heun"), false, Some(s("trailing")))
        );
        assert_eq!(case("PLMS", Some("Karras")), (s("pndm"), false, None));
        assert_eq!(case("UniPC", None), (s("unipc"), false, Some(s("leading"))));
        assert_eq!(case("DDIM", None), (s("ddim"), false, None));
        for bad in ["DPM++ SDE", "Restart", "DDIM CFG++", "LCM"] {
            let e = import_text(&format!("x\nSteps: 2, Sampler: {bad}, Seed: 1")).unwrap_err();
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn reads_the_settings_and_warns_about_the_rest() {
        let text = "(red:1.3) fox\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 123, Size: 640x512, Model hash: abc, Model: sd15, Denoising strength: 0.4, Clip skip: 2, Hires upscale: 2, ENSD: 31337, Version: v1.10.1";
        let i = import_text(text).unwrap();
        let r = &i.record;
        assert_eq!(r.prompt, "(red:1.3) fox");
        assert_eq!(r.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(
            (r.steps, r.guidance, r.width, r.height),
            (30, 6.5, 640, 512)
        );
        assert_eq!(r.seed(), Some(123));
        assert_eq!(r.prompt_syntax, PromptSyntax::Webui);
        // Hires fix on: its denoising strength is not an image-to-image strength.
        assert_eq!(i.strength, None);
        let w = i.warnings.join("\n");
        assert!(w.contains("RNG: GPU"), "{w}");
        assert!(w.contains("Clip skip: 2"), "{w}");
        assert!(w.contains("Hires upscale, ENSD"), "{w}");
        assert!(!w.contains("Model hash"), "{w}");
        let plain = import_text(
            "a\nSteps: 3, Sampler: DDIM, Seed: 9, Denoising strength: 0.6, Emphasis: None, Eta DDIM: 0.5, RNG: CPU",
        )
        .unwrap();
        assert_eq!(plain.strength, Some(0.6));
        assert_eq!(plain.record.prompt_syntax, PromptSyntax::Plain);
        assert_eq!(plain.record.eta, Some(0.5));
        assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);
        let e = import_text("a\nSteps: x, Sampler: Euler, Seed: 1").unwrap_err();
        assert!(e.to_string().contains("`Steps: x`"), "{e}");
    }
}
