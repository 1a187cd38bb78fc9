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
    add, div, karras_sigmas, mul, numpy_arange, numpy_linspace, sigma_to_t, sub, NoiseSchedule,
    Prediction,
};
use super::Scheduler;
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// diffusers' `EulerDiscreteScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct EulerScheduler {
    prediction: Prediction,
    /// The inference timesteps (float32 values), in the order the UNet sees them.
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma (0, or `sigma_min`).
    sigmas: Vec<f32>,
    /// Leading spacing scales the initial noise by `sqrt(max_sigma^2 + 1)`, the others by `max_sigma`.
    leading: bool,
    /// Index of the sigma of the next step.
    step_index: usize,
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

/// The timesteps of `timestep_spacing` (default `linspace`) and the training sigmas interpolated at
/// them, or with `use_karras_sigmas` Karras sigmas over `range` (`sigma_min`, `sigma_max`; each
/// defaulting to the interpolated ends) and the timesteps `_sigma_to_t` gives for them.
pub(super) fn discrete_sigmas(
    cfg: &SchedulerConfig,
    path: &Path,
    schedule: &NoiseSchedule,
    steps: usize,
    range: (Option<f64>, Option<f64>),
) -> Result<DiscreteSigmas> {
    let train = schedule.train_steps;
    let spacing = cfg.timestep_spacing.as_deref().unwrap_or("linspace");
    let mut timesteps: Vec<f32> = match spacing {
        "linspace" => numpy_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        "leading" => {
            let ratio = train / steps;
            let offset = cfg.steps_offset.unwrap_or(0) as f32;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + offset)
                .collect()
        }
        "trailing" => numpy_arange(train as f64, 0.0, -(train as f64 / steps as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
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
        for (field, on) in [
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ] {
            if on.unwrap_or(false) {
                return unsupported(field, "not supported by altdiff's Euler (supported: false)");
            }
        }
        let prediction = Prediction::parse(
            cfg,
            path,
            &[
                Prediction::Epsilon,
                Prediction::Velocity,
                Prediction::Sample,
            ],
        )?;
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
        if cfg.rescale_betas_zero_snr.unwrap_or(false) {
            // diffusers: close to 0 without being 0, so that the first sigma is not infinite.
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        schedule.check_steps(steps)?;
        let DiscreteSigmas {
            timesteps,
            mut sigmas,
            leading,
        } = discrete_sigmas(cfg, path, &schedule, steps, (cfg.sigma_min, cfg.sigma_max))?;
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
        sigmas.push(last);
        // diffusers starts at the second occurrence of the first timestep if it repeats.
        let step_index = usize::from(timesteps.iter().filter(|&&t| t == timesteps[0]).count() > 1);
        Ok(Self {
            prediction,
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            leading,
            step_index,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas.get(i).copied().ok_or_else(|| {
            Error::usage(format!(
                "Euler: step {} of a {}-step schedule",
                i + 1,
                self.timesteps.len()
            ))
        })
    }

    fn init_sigma(&self) -> f32 {
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
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma() as f64
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// `sample / sqrt(sigma^2 + 1)` with the sigma of the coming step.
    fn scale_model_input(&self, sample: Tensor, _timestep: f64) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        div(&sample, (sigma * sigma + 1.0).sqrt())
    }

    /// diffusers' `EulerDiscreteScheduler.step` with `s_churn = 0` (no noise).
    fn step(&mut self, model_output: &Tensor, _timestep: f64, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        let next = self.sigma(self.step_index + 1)?;
        let pred_original = match self.prediction {
            Prediction::Sample => model_output.clone(),
            Prediction::Epsilon => sub(sample, &mul(model_output, sigma)?)?,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                add(&mul(model_output, -sigma / s2.sqrt())?, &div(sample, s2)?)?
            }
        };
        let derivative = div(&sub(sample, &pred_original)?, sigma)?;
        let dt = next - sigma;
        self.step_index += 1;
        add(sample, &mul(&derivative, dt)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check_sigma_case, fixture_cases};
    use super::*;

    #[test]
    fn euler_matches_diffusers() -> Result<()> {
        let cases = fixture_cases("euler");
        assert!(cases.len() >= 5, "fixture has too few Euler cases");
        for case in &cases {
            check_sigma_case(case)?;
        }
        Ok(())
    }

    #[test]
    fn euler_config_errors() {
        let path = Path::new("scheduler/scheduler_config.json");
        let field_of = |cfg: SchedulerConfig| match EulerScheduler::new(&cfg, path, 5) {
            Err(Error::Config { field, .. }) => Some(field),
            _ => None,
        };
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
            assert_eq!(field_of(cfg).as_deref(), Some(field));
        }
        assert!(matches!(
            EulerScheduler::new(&SchedulerConfig::default(), path, 0),
            Err(Error::Usage(_))
        ));
    }
}
