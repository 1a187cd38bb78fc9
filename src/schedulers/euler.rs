//! diffusers' `EulerDiscreteScheduler` (Karras et al.'s Euler method on the sigma schedule,
//! deterministic: `s_churn = 0`, as diffusers' pipelines call it).
//!
//! Owned rather than taken from candle-transformers because candle's Euler-ancestral is the only
//! Euler it has; this follows diffusers 0.35.2 `set_timesteps`, `scale_model_input` and `step`
//! operation by operation: timesteps as numpy builds them (float32, unrounded for `linspace`),
//! training sigmas `sqrt((1 - alphas_cumprod) / alphas_cumprod)` in float32, `np.interp` in float64
//! at the timesteps, then float32 scalars in every update as torch uses them.

use std::path::Path;

use candle_core::Tensor;

use super::common::{
    add, div, karras_sigmas, mul, numpy_linspace, sigma_to_t, sub, NoiseSchedule, Prediction,
    Spacing,
};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// diffusers' `EulerDiscreteScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct EulerScheduler {
    prediction: Prediction,
    steps: SigmaSteps,
}

/// What the Euler family (Euler, Heun) keeps of its schedule and where it is in it.
#[derive(Debug)]
pub(super) struct SigmaSteps {
    /// The timesteps (float32 values), in the order the UNet sees them.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma.
    pub sigmas: Vec<f32>,
    /// Leading spacing scales the initial noise by `sqrt(max_sigma^2 + 1)`, the others by `max_sigma`.
    pub leading: bool,
    /// Index of the sigma of the next UNet evaluation.
    pub step_index: usize,
}

impl SigmaSteps {
    /// Starts at the first timestep, or (diffusers' `index_for_timestep`) at its second occurrence
    /// if it repeats.
    pub fn new(timesteps: Vec<f64>, sigmas: Vec<f32>, leading: bool) -> Self {
        let first = timesteps.first().copied();
        let step_index = usize::from(timesteps.iter().filter(|&&t| Some(t) == first).count() > 1);
        Self {
            timesteps,
            sigmas,
            leading,
            step_index,
        }
    }

    /// Sigma `i`, or a usage error past the end of the schedule.
    pub fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas.get(i).copied().ok_or_else(|| {
            Error::usage(format!(
                "scheduler: sigma {} of a {}-evaluation schedule",
                i + 1,
                self.timesteps.len()
            ))
        })
    }

    /// The sigma of the coming evaluation and the one after it.
    pub fn current(&self) -> Result<(f32, f32)> {
        Ok((
            self.sigma(self.step_index)?,
            self.sigma(self.step_index + 1)?,
        ))
    }

    /// `init_noise_sigma`: the largest sigma, or `sqrt(max^2 + 1)` for leading spacing (float32).
    pub fn init_noise_sigma(&self) -> f32 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        if self.leading {
            (max * max + 1.0).sqrt()
        } else {
            max
        }
    }

    /// `add_noise`: `original + noise * sigma` with the sigma of evaluation `index`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add(original, &mul(noise, self.sigma(index)?)?)
    }

    /// `scale_model_input`: `sample / sqrt(sigma^2 + 1)` with the sigma of the coming evaluation.
    pub fn scale(&self, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        div(sample, (sigma * sigma + 1.0).sqrt())
    }
}

/// The `Scheduler` methods that the Euler family (Euler, Heun, LMS) delegates to its `steps`
/// ([`SigmaSteps`]) field: timesteps, sigmas, `init_noise_sigma` and `scale_model_input`.
macro_rules! sigma_steps_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.steps.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            self.steps.init_noise_sigma() as f64
        }

        fn sigmas(&self) -> Option<&[f32]> {
            Some(&self.steps.sigmas)
        }

        fn scale_model_input(
            &self,
            sample: candle_core::Tensor,
            _timestep: f64,
        ) -> crate::error::Result<candle_core::Tensor> {
            self.steps.scale(&sample)
        }

        fn begin_at(&mut self, index: usize) {
            self.steps.step_index = index;
        }

        fn add_noise(
            &self,
            original: &candle_core::Tensor,
            noise: &candle_core::Tensor,
            index: usize,
        ) -> crate::error::Result<candle_core::Tensor> {
            self.steps.add_noise(original, noise, index)
        }
    };
}
pub(super) use sigma_steps_methods;

/// The Euler family's x0 prediction from the model output at `sigma`.
pub(super) fn predict_x0(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    match prediction {
        Prediction::Sample => Ok(model_output.clone()),
        Prediction::Epsilon => sub(sample, &mul(model_output, sigma)?),
        Prediction::Velocity => {
            let s2 = sigma * sigma + 1.0;
            add(&mul(model_output, -sigma / s2.sqrt())?, &div(sample, s2)?)
        }
    }
}

/// An Euler step from `sigma` to `target`: `sample + (sample - x0) / sigma * (target - sigma)`.
pub(super) fn euler_update(
    sample: &Tensor,
    pred_original: &Tensor,
    sigma: f32,
    target: f32,
) -> Result<Tensor> {
    let derivative = div(&sub(sample, pred_original)?, sigma)?;
    add(sample, &mul(&derivative, target - sigma)?)
}

/// `np.interp(x, arange(len(fp)), fp)` in float64 (numpy's formula: `slope * (x - j) + fp[j]`).
fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// What the Euler family's `set_timesteps` computes before its own final sigma: the timesteps
/// (float32), one sigma per timestep, and whether the spacing is `leading` (which sets
/// `init_noise_sigma`).
pub(super) struct DiscreteSigmas {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub leading: bool,
}

impl DiscreteSigmas {
    /// The schedule with `final_sigma` appended, one UNet evaluation per timestep.
    pub fn into_steps(mut self, final_sigma: f32) -> SigmaSteps {
        self.sigmas.push(final_sigma);
        SigmaSteps::new(
            self.timesteps.into_iter().map(f64::from).collect(),
            self.sigmas,
            self.leading,
        )
    }
}

/// The timesteps of `timestep_spacing` (default `linspace`) and the training sigmas interpolated at
/// them, or with `use_karras_sigmas` Karras sigmas over `range` (`sigma_min`, `sigma_max`; each
/// defaulting to the interpolated ends) and the timesteps `_sigma_to_t` gives for them. Checks the
/// step count and rejects the sigma schedules altdiff does not implement.
pub(super) fn discrete_sigmas(
    cfg: &SchedulerConfig,
    path: &Path,
    schedule: &NoiseSchedule,
    steps: usize,
    range: (Option<f64>, Option<f64>),
) -> Result<DiscreteSigmas> {
    for (field, on) in [
        ("use_exponential_sigmas", cfg.use_exponential_sigmas),
        ("use_beta_sigmas", cfg.use_beta_sigmas),
    ] {
        if on.unwrap_or(false) {
            return Err(Error::config(
                path,
                field,
                "not supported by altdiff (supported: false)",
            ));
        }
    }
    schedule.check_steps(steps)?;
    let train = schedule.train_steps;
    let spacing = cfg.timestep_spacing.as_deref().unwrap_or("linspace");
    let mut timesteps: Vec<f32> = match spacing {
        "linspace" => numpy_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        "leading" | "trailing" => {
            let spacing = if spacing == "leading" {
                Spacing::Leading
            } else {
                Spacing::Trailing
            };
            spacing
                .timesteps(train, steps, cfg.steps_offset.unwrap_or(0))
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect()
        }
        other => {
            return Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{other}` is not supported (supported: linspace, leading, trailing)"),
            ))
        }
    };
    let ac = &schedule.alphas_cumprod;
    let train_sigmas: Vec<f32> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    let interpolated: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp(t as f64, &train_sigmas))
        .collect();
    let sigmas: Vec<f32> = if cfg.use_karras_sigmas.unwrap_or(false) {
        let n = interpolated.len();
        let karras = karras_sigmas(
            range.0.unwrap_or(interpolated[n - 1]),
            range.1.unwrap_or(interpolated[0]),
            steps,
        );
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        timesteps = karras
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
            .collect();
        karras.into_iter().map(|s| s as f32).collect()
    } else {
        interpolated.into_iter().map(|s| s as f32).collect()
    };
    Ok(DiscreteSigmas {
        timesteps,
        sigmas,
        leading: spacing == "leading",
    })
}

impl EulerScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `EulerDiscreteScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let unsupported =
            |field: &str, what: &str| Err(Error::config(path, field, what.to_string()));
        match cfg.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => {}
            other => {
                return unsupported(
                    "interpolation_type",
                    &format!("`{other}` is not supported by altdiff's Euler (supported: linear)"),
                )
            }
        }
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        match cfg.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => {}
            "continuous" if prediction != Prediction::Velocity => {}
            other => {
                return unsupported(
                    "timestep_type",
                    &format!(
                        "`{other}` (with v_prediction) is not supported by altdiff's Euler (supported: discrete)"
                    ),
                )
            }
        }
        let mut schedule = NoiseSchedule::from_config(cfg, path, false, true)?;
        schedule.pin_zero_snr_end(cfg);
        let schedule_sigmas =
            discrete_sigmas(cfg, path, &schedule, steps, (cfg.sigma_min, cfg.sigma_max))?;
        let ac = &schedule.alphas_cumprod;
        let last = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => 0.0,
            "sigma_min" => ((1.0 - ac[0]) / ac[0]).sqrt(),
            other => {
                return unsupported(
                    "final_sigmas_type",
                    &format!("`{other}` is not supported (supported: zero, sigma_min)"),
                )
            }
        };
        Ok(Self {
            prediction,
            steps: schedule_sigmas.into_steps(last),
        })
    }
}

impl Scheduler for EulerScheduler {
    sigma_steps_methods!();

    /// diffusers' `EulerDiscreteScheduler.step` with `s_churn = 0` (no noise).
    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let (sigma, next) = self.steps.current()?;
        let pred_original = predict_x0(self.prediction, model_output, sample, sigma)?;
        self.steps.step_index += 1;
        euler_update(sample, &pred_original, sigma, next)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;

    #[test]
    fn euler_config_errors() {
        let cases = [
            (
                SchedulerConfig {
                    interpolation_type: Some("log_linear".into()),
                    ..Default::default()
                },
                "interpolation_type",
            ),
            (
                SchedulerConfig {
                    use_beta_sigmas: Some(true),
                    ..Default::default()
                },
                "use_beta_sigmas",
            ),
            (
                SchedulerConfig {
                    final_sigmas_type: Some("one".into()),
                    ..Default::default()
                },
                "final_sigmas_type",
            ),
            (
                SchedulerConfig {
                    timestep_type: Some("continuous".into()),
                    prediction_type: Some("v_prediction".into()),
                    ..Default::default()
                },
                "timestep_type",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(
                config_error_field(SchedulerKind::Euler, cfg).as_deref(),
                Some(field)
            );
        }
    }
}
