//! Noise schedulers: one file each behind the [`Scheduler`] trait, built from `scheduler_config.json`.
//!
//! Owned rather than taken from candle-transformers: candle has no PNDM, and its DDIM rounds the
//! timesteps differently from diffusers. Every scheduler here reproduces diffusers 0.35.2 exactly
//! (timesteps and every update), checked against recorded values in `tests/fixtures/schedulers.json`.

mod common;
pub mod ddim;
pub mod ddpm;
pub mod dpm;
pub mod euler;
pub mod euler_a;
pub mod heun;
pub mod lms;
pub mod pndm;
pub mod unipc;

use std::path::Path;

use candle_core::Tensor;

use crate::config::SchedulerConfig;
use crate::error::Result;

/// Which scheduler algorithm to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// diffusers' `PNDMScheduler` (PLMS, Runge-Kutta warm-up unless `skip_prk_steps`).
    Pndm,
    /// diffusers' `DDIMScheduler` with eta 0.
    Ddim,
    /// diffusers' `EulerDiscreteScheduler` (deterministic).
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler` (noise added every step): webui's Euler a.
    EulerA,
    /// diffusers' `DPMSolverMultistepScheduler` (dpmsolver++, order 2): webui's DPM++ 2M.
    DpmPp2m,
    /// The same with `use_karras_sigmas`: webui's DPM++ 2M Karras.
    DpmPp2mKarras,
    /// diffusers' `HeunDiscreteScheduler` (two UNet evaluations per step).
    Heun,
    /// diffusers' `LMSDiscreteScheduler` (linear multistep, order 4).
    Lms,
    /// diffusers' `UniPCMultistepScheduler` (predictor-corrector, bh2, order 2): webui's UniPC.
    UniPc,
    /// diffusers' `DDPMScheduler` (ancestral sampling of the original DDPM, noise every step).
    Ddpm,
}

impl SchedulerKind {
    /// The kind for a diffusers class name (`_class_name` of `scheduler_config.json`).
    pub fn from_class_name(class: &str) -> Option<Self> {
        match class {
            "PNDMScheduler" => Some(SchedulerKind::Pndm),
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerA),
            "DDPMScheduler" => Some(SchedulerKind::Ddpm),
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            "HeunDiscreteScheduler" => Some(SchedulerKind::Heun),
            "LMSDiscreteScheduler" => Some(SchedulerKind::Lms),
            "UniPCMultistepScheduler" => Some(SchedulerKind::UniPc),
            _ => None,
        }
    }

    /// Every scheduler, in the order `altdiff schedulers` lists them.
    pub const ALL: [SchedulerKind; 10] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerA,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::UniPc,
        SchedulerKind::Ddpm,
    ];

    /// The kind for any of its names: altdiff's (`euler-a`), webui's (`Euler a`, `PLMS`,
    /// `DPM++ 2M Karras`) and webui's older k-diffusion aliases (`k_euler_a`, `k_dpmpp_2m_ka`).
    /// Case and surrounding or repeated whitespace do not matter. The one name table that
    /// `--scheduler`, batch files, PNG text and `altdiff schedulers` share.
    pub fn parse(name: &str) -> Option<Self> {
        let key = name
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        Self::ALL.into_iter().find(|k| {
            k.name() == key || k.webui_name().to_lowercase() == key || k.aliases().contains(&&*key)
        })
    }

    /// webui's sampler name (what its `Sampler:` text and API use).
    pub fn webui_name(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerA => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
            SchedulerKind::Heun => "Heun",
            SchedulerKind::Lms => "LMS",
            SchedulerKind::UniPc => "UniPC",
            SchedulerKind::Ddpm => "DDPM",
        }
    }

    /// webui 1.9+'s sampler name, its `Schedule type` apart (`DPM++ 2M` for both DPM++ 2M kinds).
    pub fn webui_sampler(&self) -> &'static str {
        match self {
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M",
            k => k.webui_name(),
        }
    }

    /// The `timestep_spacing` diffusers' class uses when the config names none: `leading` for
    /// the alpha-based PNDM, DDIM and DDPM, `linspace` for the sigma-based ones.
    pub fn default_spacing(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm | SchedulerKind::Ddim | SchedulerKind::Ddpm => "leading",
            _ => "linspace",
        }
    }

    /// Other spellings accepted by [`SchedulerKind::parse`] (lower case).
    fn aliases(&self) -> &'static [&'static str] {
        match self {
            SchedulerKind::Pndm => &[],
            SchedulerKind::Ddim => &[],
            SchedulerKind::Euler => &["k_euler"],
            SchedulerKind::EulerA => &[
                "euler_a",
                "euler ancestral",
                "k_euler_a",
                "k_euler_ancestral",
            ],
            SchedulerKind::DpmPp2m => &["dpmpp_2m", "k_dpmpp_2m"],
            SchedulerKind::DpmPp2mKarras => &["dpm++2m karras", "dpmpp_2m_karras", "k_dpmpp_2m_ka"],
            SchedulerKind::Heun => &["k_heun"],
            SchedulerKind::Lms => &["k_lms"],
            SchedulerKind::UniPc => &[],
            SchedulerKind::Ddpm => &[],
        }
    }

    /// The command-line name.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerA => "euler-a",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::DpmPp2mKarras => "dpm++2m-karras",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Lms => "lms",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    /// The diffusers class it reproduces.
    pub fn class_name(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerA => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
        }
    }

    /// One line on what it does.
    pub fn summary(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm => {
                "PLMS (pseudo linear multistep), AltDiffusion's own scheduler; the default"
            }
            SchedulerKind::Ddim => {
                "DDIM; deterministic unless --eta > 0 (step noise from the seed)"
            }
            SchedulerKind::Euler => {
                "Euler's method on the sigma schedule, deterministic (webui's Euler)"
            }
            SchedulerKind::DpmPp2m => "DPM-Solver++ multistep, second order, deterministic",
            SchedulerKind::DpmPp2mKarras => "dpm++2m on Karras sigmas (use_karras_sigmas)",
            SchedulerKind::Heun => "Heun's second-order method, two UNet evaluations per step",
            SchedulerKind::Lms => "linear multistep (order 4) on the Euler sigma schedule",
            SchedulerKind::UniPc => {
                "UniPC predictor-corrector multistep (bh2, order 2), deterministic"
            }
            SchedulerKind::EulerA => {
                "Euler ancestral: Euler steps plus fresh noise each step (webui's Euler a)"
            }
            SchedulerKind::Ddpm => {
                "the original DDPM sampler, fresh noise each step (needs many steps)"
            }
        }
    }

    /// The command-line names, comma-separated (for error messages).
    pub fn names() -> String {
        Self::ALL.map(|k| k.name()).join(", ")
    }
}

impl SchedulerKind {
    /// Whether the diffusers class has `use_karras_sigmas` (what `--karras` sets).
    pub fn supports_karras(&self) -> bool {
        match self {
            SchedulerKind::Euler
            | SchedulerKind::DpmPp2m
            | SchedulerKind::DpmPp2mKarras
            | SchedulerKind::Heun
            | SchedulerKind::Lms
            | SchedulerKind::UniPc => true,
            SchedulerKind::Pndm
            | SchedulerKind::Ddim
            | SchedulerKind::EulerA
            | SchedulerKind::Ddpm => false,
        }
    }

    /// Whether `step` draws noise (always, or with `eta` > 0 for DDIM).
    pub fn is_stochastic(&self, eta: f64) -> bool {
        match self {
            SchedulerKind::EulerA | SchedulerKind::Ddpm => true,
            SchedulerKind::Ddim => eta > 0.0,
            _ => false,
        }
    }
}

/// `timestep_spacing`, as `--timestep-spacing` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimestepSpacing {
    /// `arange(0, n) * (T // n) + steps_offset` (PNDM's, DDIM's and DDPM's default).
    Leading,
    /// `linspace(0, T - 1, n)` (the sigma-based schedulers' default).
    Linspace,
    /// `round(arange(T, 0, -T / n)) - 1` (ends at the last training timestep).
    Trailing,
}

impl TimestepSpacing {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Trailing => "trailing",
        }
    }
}

/// Command-line settings that change how a scheduler is built, on top of its config file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerOptions {
    /// DDIM's eta (diffusers' `eta=`): 0 is deterministic, 1 is DDPM-like.
    pub eta: f64,
    /// `--karras`: `use_karras_sigmas` for the classes that have it.
    pub karras: bool,
    /// `--timestep-spacing`: replaces the config's `timestep_spacing`.
    pub timestep_spacing: Option<TimestepSpacing>,
}

impl SchedulerOptions {
    /// Checks the options against `kind`: `--karras` and `--eta` where they do not apply are usage
    /// errors (diffusers would silently ignore them).
    pub fn check(&self, kind: SchedulerKind) -> Result<()> {
        if !(self.eta.is_finite() && (0.0..=1.0).contains(&self.eta)) {
            return Err(crate::error::Error::usage(format!(
                "--eta {} must be between 0 and 1",
                self.eta
            )));
        }
        if self.eta > 0.0 && kind != SchedulerKind::Ddim {
            return Err(crate::error::Error::usage(format!(
                "--eta applies to the ddim scheduler only, not {}",
                kind.name()
            )));
        }
        if self.karras && !kind.supports_karras() {
            let names: Vec<&str> = SchedulerKind::ALL
                .iter()
                .filter(|k| k.supports_karras())
                .map(|k| k.name())
                .collect();
            return Err(crate::error::Error::usage(format!(
                "--karras applies to {} (diffusers' use_karras_sigmas), not {}",
                names.join(", "),
                kind.name()
            )));
        }
        Ok(())
    }

    /// `config` with the overrides applied.
    pub fn apply(&self, config: &SchedulerConfig) -> SchedulerConfig {
        let mut c = config.clone();
        if self.karras {
            c.use_karras_sigmas = Some(true);
        }
        if let Some(s) = self.timestep_spacing {
            c.timestep_spacing = Some(s.name().to_string());
        }
        c
    }

    /// The overrides as scheduler-config JSON entries (what an image's record stores).
    pub fn apply_json(&self, config: &mut serde_json::Value) {
        if let Some(map) = config.as_object_mut() {
            if self.karras {
                map.insert("use_karras_sigmas".into(), true.into());
            }
            if let Some(s) = self.timestep_spacing {
                map.insert("timestep_spacing".into(), s.name().into());
            }
        }
    }
}

/// Builds the scheduler `kind` from the checkpoint's scheduler config (with `options` applied) for
/// `steps` inference steps, as diffusers' `XScheduler.from_config(config)` then
/// `set_timesteps(steps)`. Unsupported or inconsistent values are [`crate::Error::Config`] errors
/// naming `config_path` and the field; a step count of zero (or above `num_train_timesteps`), and
/// options that do not apply to `kind`, are [`crate::Error::Usage`] errors.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    config_path: &Path,
    steps: usize,
    options: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    options.check(kind)?;
    let config = &options.apply(config);
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(pndm::PndmScheduler::new(config, config_path, steps)?),
        SchedulerKind::Ddim => Box::new(
            ddim::DdimScheduler::new(config, config_path, steps)?.with_eta(options.eta as f32),
        ),
        SchedulerKind::EulerA => Box::new(euler_a::EulerAncestralScheduler::new(
            config,
            config_path,
            steps,
        )?),
        SchedulerKind::Ddpm => Box::new(ddpm::DdpmScheduler::new(config, config_path, steps)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(config, config_path, steps)?),
        SchedulerKind::DpmPp2m => {
            Box::new(dpm::DpmSolverScheduler::new(config, config_path, steps)?)
        }
        SchedulerKind::DpmPp2mKarras => {
            let config = SchedulerConfig {
                use_karras_sigmas: Some(true),
                ..config.clone()
            };
            Box::new(dpm::DpmSolverScheduler::new(&config, config_path, steps)?)
        }
        SchedulerKind::Heun => Box::new(heun::HeunScheduler::new(config, config_path, steps)?),
        SchedulerKind::Lms => Box::new(lms::LmsScheduler::new(config, config_path, steps)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPcScheduler::new(config, config_path, steps)?),
    })
}

/// One denoising run's scheduler state.
pub trait Scheduler {
    /// The timesteps in the order the UNet sees them (PNDM with `skip_prk_steps` repeats its second
    /// one: 801, 601, 601, 401, 201, 1).
    fn timesteps(&self) -> &[f64];
    /// The factor the initial noise is multiplied by (1 unless the scheduler works in sigmas).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the UNet input for `timestep` (identity unless the scheduler works in sigmas).
    fn scale_model_input(&self, sample: Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample)
    }
    /// The sigma schedule (one per timestep, then the final one) of sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// Starts the run at evaluation `index` of [`timesteps`](Self::timesteps), as image-to-image
    /// does when it skips the first ones (diffusers' `set_begin_index`, or the `index_for_timestep`
    /// its `step` falls back to: [`index_for_timestep`]). The schedulers that find their place
    /// from the timestep value (PNDM, DDIM, DDPM) have nothing to set.
    fn begin_at(&mut self, _index: usize) {}
    /// UNet evaluations per step (diffusers' `scheduler.order`): 2 for Heun, else 1.
    fn order(&self) -> usize {
        1
    }
    /// diffusers' `add_noise`: `original` noised to the level of evaluation `index` of the
    /// schedule (`sqrt(a) x + sqrt(1 - a) n` with `a = alphas_cumprod[t]` for PNDM, DDIM and DDPM;
    /// `x + sigma n` for the Euler family; `alpha_t x + sigma_t n` for DPM-Solver and UniPC).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
    /// Advances one step: the UNet's output at `timestep` for `sample` gives the next sample.
    /// Stochastic schedulers (ancestral, DDIM with eta > 0, DDPM) draw their noise from `noise`,
    /// as diffusers' `step(..., generator=generator)` does; the others never touch it.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor>;
}

/// diffusers' `get_timesteps` for image-to-image and inpainting: the evaluation index the run
/// starts at for `steps` steps at `strength` with a scheduler of `order` evaluations per step
/// (`t_start * order`, `t_start = steps - min(int(steps * strength), steps)`), or a usage error
/// for a strength outside (0, 1] or one that leaves no step.
pub fn img2img_start(steps: usize, strength: f64, order: usize) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(crate::error::Error::usage(format!(
            "--strength {strength} is out of range: it must be more than 0 and at most 1"
        )));
    }
    let init = ((steps as f64 * strength) as usize).min(steps);
    if init == 0 {
        return Err(crate::error::Error::usage(format!(
            "--steps {steps} with --strength {strength} leaves no denoising step \
             (int(steps x strength) = 0); raise --steps or --strength"
        )));
    }
    Ok((steps - init) * order)
}

/// diffusers' `index_for_timestep`: where `timestep` lies in `timesteps`, its second occurrence if
/// it occurs more than once (so a schedule that repeats a timestep, as Heun's does, starts on the
/// second of the pair); `None` if it does not occur.
pub fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Option<usize> {
    let mut found = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = found.next()?;
    Some(found.next().unwrap_or(first))
}

/// Where stochastic schedulers draw their step noise (diffusers' `generator=`).
pub trait StepNoise {
    /// Standard normal noise shaped like `like`, on its device and in its dtype (diffusers'
    /// `randn_tensor(like.shape, generator=generator)`).
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// A noise source for deterministic use: asking it for noise is an error.
pub struct NoNoise;

impl StepNoise for NoNoise {
    fn randn_like(&mut self, _like: &Tensor) -> Result<Tensor> {
        Err(crate::error::Error::Numerics(
            "this scheduler needs step noise but was given no generator".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    //! Fixture checks shared by the PNDM and DDIM tests: every case of `tests/fixtures/schedulers.json`
    //! (recorded from diffusers by `tools/fixtures/schedulers.py`) is rebuilt from its config dict.

    use std::path::{Path, PathBuf};

    use candle_core::{Device, Tensor};
    use serde_json::Value;

    use super::*;
    use crate::error::{Error, TensorContext};

    /// Absolute tolerance of every recorded sample.
    pub(super) const ATOL: f32 = 1e-5;
    /// Relative tolerance of every recorded sample.
    pub(super) const RTOL: f32 = 1e-4;

    /// The command-line options a case was recorded with (DDIM's `eta`).
    pub(super) fn case_options(case: &Value) -> SchedulerOptions {
        SchedulerOptions {
            eta: case.get("eta").and_then(Value::as_f64).unwrap_or(0.0),
            ..Default::default()
        }
    }

    /// The step-noise generator of a recorded loop (`noise_seed`: diffusers' `generator=`), or none
    /// for deterministic schedulers (which then fail if they ask for noise).
    pub(super) fn loop_noise(lp: &Value) -> Box<dyn StepNoise> {
        match lp.get("noise_seed").and_then(Value::as_u64) {
            Some(seed) => Box::new(crate::noise::NoiseStreams::shared(seed, 1)),
            None => Box::new(NoNoise),
        }
    }

    fn fixture() -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers.json");
        let text = std::fs::read_to_string(&path).expect("read tests/fixtures/schedulers.json");
        serde_json::from_str(&text).expect("parse schedulers.json")
    }

    /// The fixture's cases for one scheduler kind (`pndm` / `ddim`).
    pub(super) fn fixture_cases(kind: &str) -> Vec<Value> {
        let doc = fixture();
        assert_eq!(
            doc["diffusers_version"], "0.35.2",
            "fixture recorded from another diffusers"
        );
        doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .filter(|c| c["kind"] == kind)
            .cloned()
            .collect()
    }

    pub(super) fn floats(v: &Value) -> Vec<f32> {
        v.as_array()
            .expect("float array")
            .iter()
            .map(|x| x.as_f64().expect("float") as f32)
            .collect()
    }

    pub(super) fn tensor(v: &Value) -> Tensor {
        Tensor::from_vec(floats(v), (1, 2, 3, 3), &Device::Cpu).expect("fixture tensor")
    }

    /// Checks one fixture case: timesteps exactly, rejected step counts, the schedule bit for bit,
    /// and each loop's every step within `ATOL + RTOL * |expected|`. Returns the largest deviation.
    pub(super) fn check_case(case: &Value) -> Result<f32> {
        let name = case["name"].as_str().expect("name");
        let kind = SchedulerKind::parse(case["kind"].as_str().expect("kind")).expect("known kind");
        let cfg: SchedulerConfig = serde_json::from_value(case["config"].clone()).expect("config");
        let path = PathBuf::from(format!("{name}/scheduler_config.json"));
        if let Some(class) = &cfg.class_name {
            assert!(
                SchedulerKind::from_class_name(class).is_some(),
                "{name}: class {class}"
            );
        }

        let recorded = case["timesteps"].as_object().expect("timesteps");
        assert!(recorded.len() >= 6, "{name}: too few step counts");
        for (n, expected) in recorded {
            let steps: usize = n.parse().expect("step count");
            let s = build(kind, &cfg, &path, steps, &case_options(case))?;
            let expected: Vec<f64> = expected
                .as_array()
                .expect("timestep list")
                .iter()
                .map(|t| t.as_i64().expect("integer timestep") as f64)
                .collect();
            assert_eq!(
                s.timesteps(),
                expected.as_slice(),
                "{name}: timesteps for {steps} steps"
            );
        }
        for n in case["errors"].as_array().expect("errors") {
            let steps = n.as_u64().expect("step count") as usize;
            assert!(
                build(kind, &cfg, &path, steps, &case_options(case)).is_err(),
                "{name}: {steps} steps should fail"
            );
        }

        let schedule = match kind {
            SchedulerKind::Pndm => pndm::PndmScheduler::new(&cfg, &path, 5)?.schedule,
            SchedulerKind::Ddim => ddim::DdimScheduler::new(&cfg, &path, 5)?.schedule,
            SchedulerKind::Ddpm => ddpm::DdpmScheduler::new(&cfg, &path, 5)?.schedule,
            other => panic!("{name}: {other:?} cases go through check_sigma_case"),
        };
        // DDPM has no final_alpha_cumprod (it steps to alpha 1).
        if let Some(final_alpha) = case.get("final_alpha_cumprod") {
            let final_alpha = final_alpha.as_f64().expect("final alpha") as f32;
            assert_eq!(
                schedule.final_alpha_cumprod, final_alpha,
                "{name}: final_alpha_cumprod"
            );
        }
        if let Some(ac) = case.get("alphas_cumprod") {
            let ac = floats(ac);
            let rtol = case["alphas_cumprod_rtol"].as_f64().expect("alphas rtol") as f32;
            assert_eq!(
                schedule.alphas_cumprod.len(),
                ac.len(),
                "{name}: alphas_cumprod length"
            );
            let mut worst = 0f32;
            for (i, (a, b)) in schedule.alphas_cumprod.iter().zip(&ac).enumerate() {
                let dev = (a - b).abs();
                // rtol 0 means bit-exact.
                assert!(
                    dev <= rtol * b.abs(),
                    "{name}: alphas_cumprod[{i}] {a} != {b}"
                );
                worst = worst.max(dev / b.abs().max(f32::MIN_POSITIVE));
            }
            eprintln!("{name}: alphas_cumprod max relative deviation {worst:e}");
        }

        let mut max_dev = 0f32;
        let loops = case["loops"].as_array().expect("loops");
        assert!(loops.len() >= 2, "{name}: too few loops");
        for lp in loops {
            let steps = lp["steps"].as_u64().expect("steps") as usize;
            let mut s = build(kind, &cfg, &path, steps, &case_options(case))?;
            let mut noise = loop_noise(lp);
            let outputs = lp["model_outputs"].as_array().expect("model outputs");
            let expected = lp["prev_samples"].as_array().expect("prev samples");
            let timesteps = s.timesteps().to_vec();
            assert_eq!(
                timesteps.len(),
                outputs.len(),
                "{name}: loop length for {steps} steps"
            );
            let mut sample = tensor(&lp["sample"]);
            for (i, &t) in timesteps.iter().enumerate() {
                sample = s.step(&tensor(&outputs[i]), t, &sample, noise.as_mut())?;
                let got = sample
                    .flatten_all()
                    .and_then(|x| x.to_vec1::<f32>())
                    .context(|| "read".into())?;
                let want = floats(&expected[i]);
                assert_eq!(got.len(), want.len());
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    let dev = (g - w).abs();
                    assert!(
                        dev <= ATOL + RTOL * w.abs(),
                        "{name}: {steps} steps, step {i} (t = {t}), element {j}: {g} vs diffusers {w}"
                    );
                    max_dev = max_dev.max(dev / (1.0 + w.abs()));
                }
            }
        }
        eprintln!("{name}: max |deviation| / (1 + |expected|) = {max_dev:e}");
        Ok(max_dev)
    }

    /// Checks a sigma-based scheduler's fixture case (Euler, DPM-Solver): timesteps exactly, sigmas
    /// and `init_noise_sigma` to `sigmas_rtol` (torch's sqrt is MKL's, not correctly rounded), and
    /// closed loops of `scale_model_input` + `step` within `ATOL + RTOL * |expected|`.
    pub(super) fn check_sigma_case(case: &Value) -> Result<()> {
        let name = case["name"].as_str().expect("name");
        let kind = SchedulerKind::parse(case["kind"].as_str().expect("kind")).expect("known kind");
        let cfg: SchedulerConfig = serde_json::from_value(case["config"].clone()).expect("config");
        let path = PathBuf::from(format!("{name}/scheduler_config.json"));
        let rtol = case["sigmas_rtol"].as_f64().expect("sigmas_rtol") as f32;
        for (n, rec) in case["schedules"].as_object().expect("schedules") {
            let steps: usize = n.parse().expect("step count");
            let s = build(kind, &cfg, &path, steps, &case_options(case))?;
            let got_t: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
            let t_rtol = case["timesteps_rtol"].as_f64().expect("timesteps_rtol") as f32;
            let want_t = floats(&rec["timesteps"]);
            assert_eq!(
                got_t.len(),
                want_t.len(),
                "{name}: timesteps for {steps} steps"
            );
            for (g, w) in got_t.iter().zip(&want_t) {
                // 0 means exact.
                assert!(
                    (g - w).abs() <= t_rtol * w.abs(),
                    "{name}: timesteps for {steps} steps: {got_t:?} vs diffusers {want_t:?}"
                );
            }
            let want_s = floats(&rec["sigmas"]);
            let got_s = s.sigmas().expect("sigma-based scheduler");
            assert_eq!(got_s.len(), want_s.len(), "{name}: {steps} steps");
            let want_init = rec["init_noise_sigma"].as_f64().expect("init") as f32;
            let got_init = s.init_noise_sigma() as f32;
            for (g, w) in got_s
                .iter()
                .chain([&got_init])
                .zip(want_s.iter().chain([&want_init]))
            {
                assert!(
                    (g - w).abs() <= rtol * w.abs(),
                    "{name}: sigma / init_noise_sigma for {steps} steps: {g} vs diffusers {w}"
                );
            }
        }
        for lp in case["loops"].as_array().expect("loops") {
            let steps = lp["steps"].as_u64().expect("steps") as usize;
            let mut s = build(kind, &cfg, &path, steps, &case_options(case))?;
            let mut sample = tensor(&lp["sample"]);
            let mut noise = loop_noise(lp);
            let outputs = lp["model_outputs"].as_array().expect("outputs");
            let scaled = lp["scaled"].as_array().expect("scaled");
            let prev = lp["prev_samples"].as_array().expect("prev");
            let ts = s.timesteps().to_vec();
            assert_eq!(ts.len(), outputs.len(), "{name}: loop length");
            for (i, &t) in ts.iter().enumerate() {
                let check = |got: &Tensor, want: &Value, what: &str| {
                    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                    for (g, w) in got.iter().zip(floats(want)) {
                        assert!(
                            (g - w).abs() <= ATOL + RTOL * w.abs(),
                            "{name}: {steps} steps, step {i}, {what}: {g} vs diffusers {w}"
                        );
                    }
                };
                check(
                    &s.scale_model_input(sample.clone(), t)?,
                    &scaled[i],
                    "scaled input",
                );
                sample = s.step(&tensor(&outputs[i]), t, &sample, noise.as_mut())?;
                check(&sample, &prev[i], "prev sample");
            }
        }
        Ok(())
    }

    /// The config field `kind` rejects `cfg` for (5 steps), if it does.
    pub(super) fn config_error_field(kind: SchedulerKind, cfg: SchedulerConfig) -> Option<String> {
        match build(
            kind,
            &cfg,
            Path::new("scheduler/scheduler_config.json"),
            5,
            &SchedulerOptions::default(),
        ) {
            Err(Error::Config { field, .. }) => Some(field),
            _ => None,
        }
    }

    /// Every recorded case of the alpha-based schedulers (PNDM, DDIM with and without eta, DDPM).
    #[test]
    fn alpha_schedulers_match_diffusers() -> Result<()> {
        for (kind, least) in [("pndm", 10), ("ddim", 13), ("ddpm", 8)] {
            let cases = fixture_cases(kind);
            assert!(cases.len() >= least, "fixture has too few {kind} cases");
            for case in &cases {
                check_case(case)?;
            }
        }
        Ok(())
    }

    /// Every recorded case of the sigma-based schedulers (Euler, Euler ancestral, DPM-Solver++, Heun,
    /// LMS, UniPC).
    #[test]
    fn sigma_schedulers_match_diffusers() -> Result<()> {
        for kind in ["euler", "euler-a", "dpm++2m", "heun", "lms", "unipc"] {
            let cases = fixture_cases(kind);
            assert!(cases.len() >= 5, "fixture has too few {kind} cases");
            for case in &cases {
                check_sigma_case(case)?;
            }
        }
        Ok(())
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in [SchedulerKind::Pndm, SchedulerKind::Ddim] {
            assert_eq!(SchedulerKind::parse(kind.name()), Some(kind));
        }
        assert_eq!(SchedulerKind::parse("DDIM"), Some(SchedulerKind::Ddim));
        assert_eq!(SchedulerKind::parse("Euler"), Some(SchedulerKind::Euler));
        assert_eq!(SchedulerKind::parse("UniPC"), Some(SchedulerKind::UniPc));
        for kind in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::parse(kind.name()), Some(kind));
            let class = SchedulerKind::from_class_name(kind.class_name()).expect("class");
            assert_eq!(class.class_name(), kind.class_name());
        }
        assert_eq!(
            SchedulerKind::from_class_name("PNDMScheduler"),
            Some(SchedulerKind::Pndm)
        );
        assert_eq!(
            SchedulerKind::from_class_name("DDIMScheduler"),
            Some(SchedulerKind::Ddim)
        );
        assert_eq!(
            SchedulerKind::from_class_name("UniPCMultistepScheduler"),
            Some(SchedulerKind::UniPc)
        );
    }

    #[test]
    fn build_rejects_zero_steps() {
        let path = Path::new("scheduler/scheduler_config.json");
        for kind in SchedulerKind::ALL {
            let r = build(
                kind,
                &SchedulerConfig::default(),
                path,
                0,
                &SchedulerOptions::default(),
            );
            assert!(matches!(r, Err(Error::Usage(_))), "{kind:?}");
        }
    }

    #[test]
    fn build_names_config_path_and_field() {
        let path = Path::new("ckpt/scheduler/scheduler_config.json");
        let cfg = SchedulerConfig {
            beta_schedule: Some("cubic".into()),
            ..Default::default()
        };
        for kind in SchedulerKind::ALL {
            let err = build(kind, &cfg, path, 10, &SchedulerOptions::default())
                .err()
                .expect("config error");
            let msg = err.to_string();
            assert!(
                msg.contains("ckpt/scheduler/scheduler_config.json"),
                "{msg}"
            );
            assert!(msg.contains("beta_schedule"), "{msg}");
        }
    }
}
