//! diffusers' `DDPMScheduler`: the original DDPM ancestral sampler (posterior mean plus fresh noise
//! of the posterior variance at every step but timestep 0).
//!
//! Owned rather than candle-transformers' DDPM because that one spaces its timesteps differently
//! (no `timestep_spacing` / `steps_offset`) and draws noise from candle's generator; this follows
//! diffusers 0.35.2 `set_timesteps`, `previous_timestep`, `_get_variance` and `step` operation by
//! operation in float32, drawing `randn_tensor(model_output.shape, generator=generator)` when
//! `t > 0`, as diffusers does.

use std::path::Path;

use candle_core::Tensor;

use super::common::{
    add, alpha_x0, clip_range, mul, train_timestep, NoiseSchedule, Prediction, Spacing,
};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// How the step noise is scaled (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// The posterior variance (default).
    Small,
    /// The same through `exp(0.5 * log(v))` (already a standard deviation).
    SmallLog,
    /// The step's beta.
    Large,
}

/// diffusers' `DDPMScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct DdpmScheduler {
    pub(super) schedule: NoiseSchedule,
    prediction: Prediction,
    variance: Variance,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `DDPMScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        if cfg.thresholding.unwrap_or(false) {
            return Err(Error::config(
                path,
                "thresholding",
                "dynamic thresholding is not supported by altdiff's DDPM (supported: false)",
            ));
        }
        let variance = match cfg.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            other => {
                return Err(Error::config(
                    path,
                    "variance_type",
                    format!("`{other}` is not supported by altdiff's DDPM (supported: fixed_small, fixed_small_log, fixed_large)"),
                ))
            }
        };
        let schedule = NoiseSchedule::from_config(cfg, path, false, true)?;
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        let spacing = Spacing::parse(cfg, path)?;
        let clip = clip_range(cfg, path)?;
        schedule.check_steps(steps)?;
        let mut ts = spacing.timesteps(schedule.train_steps, steps, cfg.steps_offset.unwrap_or(0));
        ts.reverse();
        Ok(Self {
            schedule,
            prediction,
            variance,
            clip,
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
        })
    }

    /// `previous_timestep`: the next timestep of the schedule, -1 after the last.
    fn previous(&self, t: i64) -> Result<i64> {
        let i = self
            .timesteps
            .iter()
            .position(|&x| x == t as f64)
            .ok_or_else(|| {
                Error::usage(format!(
                    "scheduler timestep {t} is not in the DDPM schedule"
                ))
            })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&p| p as i64))
    }

    /// `alphas_cumprod[prev]`, or `one` once `prev` is negative.
    fn alpha_prev(&self, prev: i64) -> Result<f32> {
        if prev >= 0 {
            self.schedule.alpha_at(prev)
        } else {
            Ok(1.0)
        }
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule
            .add_noise(original, noise, &self.timesteps, index)
    }

    /// diffusers' `DDPMScheduler.step`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let t = train_timestep(timestep)?;
        let prev_t = self.previous(t)?;
        let alpha_t = self.schedule.alpha_at(t)?;
        let alpha_prev = self.alpha_prev(prev_t)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let pred_original = alpha_x0(self.prediction, model_output, sample, alpha_t, self.clip)?;
        let original_coeff = (alpha_prev.sqrt() * current_beta) / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let prev = add(
            &mul(&pred_original, original_coeff)?,
            &mul(sample, sample_coeff)?,
        )?;
        if t <= 0 {
            return Ok(prev);
        }
        // _get_variance(t), clamped at 1e-20 before the optional log.
        let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
        let std = match self.variance {
            Variance::Small => variance.sqrt(),
            Variance::SmallLog => (0.5 * variance.ln()).exp(),
            Variance::Large => current_beta.sqrt(),
        };
        let fresh = noise.randn_like(model_output)?;
        add(&prev, &mul(&fresh, std)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;

    #[test]
    fn ddpm_config_errors() {
        for (cfg, field) in [
            (
                SchedulerConfig {
                    variance_type: Some("learned_range".into()),
                    ..Default::default()
                },
                "variance_type",
            ),
            (
                SchedulerConfig {
                    thresholding: Some(true),
                    ..Default::default()
                },
                "thresholding",
            ),
            (
                SchedulerConfig {
                    clip_sample_range: Some(f64::NAN),
                    ..Default::default()
                },
                "clip_sample_range",
            ),
        ] {
            assert_eq!(
                config_error_field(SchedulerKind::Ddpm, cfg).as_deref(),
                Some(field)
            );
        }
    }
}
