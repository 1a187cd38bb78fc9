//! diffusers' `DDIMScheduler`, selectable instead of the checkpoint's PNDM: deterministic with
//! eta 0 (the default), with `--eta` > 0 adding `std_dev_t * noise` each step, the noise drawn from
//! the run's generator as diffusers' `step(..., eta=eta, generator=generator)` draws it.
//!
//! Owned rather than candle-transformers' DDIM because that one computes its timesteps differently
//! from diffusers (no `timestep_spacing`, different offsets and rounding); this follows diffusers
//! 0.35.2 `set_timesteps` and `step` operation by operation, with float32 scalars as torch uses.

use std::path::Path;

use candle_core::Tensor;

use super::common::{
    add, alpha_x0, clip_range, div, mul, sub, train_timestep, NoiseSchedule, Prediction, Spacing,
};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// diffusers' `DDIMScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct DdimScheduler {
    pub(super) schedule: NoiseSchedule,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    /// The weight of the noise added per step (diffusers' `eta`).
    eta: f32,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `DDIMScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        if cfg.thresholding.unwrap_or(false) {
            return Err(Error::config(
                path,
                "thresholding",
                "dynamic thresholding is not supported by altdiff's DDIM (supported: false)",
            ));
        }
        let schedule = NoiseSchedule::from_config(cfg, path, true, true)?;
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        let spacing = Spacing::parse(cfg, path)?;
        let clip = clip_range(cfg, path)?;
        schedule.check_steps(steps)?;
        let mut ts = spacing.timesteps(schedule.train_steps, steps, cfg.steps_offset.unwrap_or(0));
        ts.reverse();
        Ok(Self {
            step_ratio: schedule.step_ratio(steps),
            schedule,
            prediction,
            clip,
            eta: 0.0,
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
        })
    }

    /// Sets `eta`, the weight of the step noise (0: deterministic).
    pub fn with_eta(mut self, eta: f32) -> Self {
        self.eta = eta;
        self
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule
            .add_noise(original, noise, &self.timesteps, index)
    }

    /// diffusers' `DDIMScheduler.step` with `use_clipped_model_output = False`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let t = train_timestep(timestep)?;
        let prev_t = t - self.step_ratio;
        let alpha_t = self.schedule.alpha_at(t)?;
        let alpha_prev = self.schedule.alpha_prev(prev_t)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;

        // The noise estimate comes from the unclipped x0, as diffusers computes it first.
        let pred_epsilon = match self.prediction {
            Prediction::Epsilon => model_output.clone(),
            Prediction::Sample => div(
                &sub(sample, &mul(model_output, alpha_t.sqrt())?)?,
                beta_t.sqrt(),
            )?,
            Prediction::Velocity => add(
                &mul(model_output, alpha_t.sqrt())?,
                &mul(sample, beta_t.sqrt())?,
            )?,
        };
        let pred_original = alpha_x0(self.prediction, model_output, sample, alpha_t, self.clip)?;

        // _get_variance; with eta = 0 the deviation is zero and the direction coefficient reduces to
        // sqrt(1 - alpha_prev), bit for bit as in diffusers.
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction = mul(
            &pred_epsilon,
            (1.0 - alpha_prev - std_dev_t * std_dev_t).sqrt(),
        )?;
        let prev = add(&mul(&pred_original, alpha_prev.sqrt())?, &direction)?;
        if self.eta > 0.0 {
            // variance_noise = randn_tensor(model_output.shape, generator=generator)
            let variance_noise = noise.randn_like(model_output)?;
            add(&prev, &mul(&variance_noise, std_dev_t)?)
        } else {
            Ok(prev)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TensorContext;

    #[test]
    fn ddim_config_errors() {
        let path = Path::new("scheduler/scheduler_config.json");
        let field_of = |cfg: SchedulerConfig| match DdimScheduler::new(&cfg, path, 5) {
            Err(Error::Config { field, file, .. }) => {
                assert_eq!(file, path);
                Some(field)
            }
            _ => None,
        };
        let thresholding = SchedulerConfig {
            thresholding: Some(true),
            ..Default::default()
        };
        assert_eq!(field_of(thresholding).as_deref(), Some("thresholding"));
        let prediction = SchedulerConfig {
            prediction_type: Some("flow".into()),
            ..Default::default()
        };
        assert_eq!(field_of(prediction).as_deref(), Some("prediction_type"));
        let range = SchedulerConfig {
            clip_sample_range: Some(-1.0),
            ..Default::default()
        };
        assert_eq!(field_of(range).as_deref(), Some("clip_sample_range"));
        let spacing = SchedulerConfig {
            timestep_spacing: Some("karras".into()),
            ..Default::default()
        };
        assert_eq!(field_of(spacing).as_deref(), Some("timestep_spacing"));
        // Off or absent thresholding, and PNDM's skip_prk_steps, are fine for DDIM.
        let fine = SchedulerConfig {
            thresholding: Some(false),
            skip_prk_steps: Some(false),
            ..Default::default()
        };
        assert_eq!(field_of(fine), None);
    }

    #[test]
    fn ddim_step_count_errors() {
        let path = Path::new("scheduler_config.json");
        let cfg = SchedulerConfig::default();
        assert!(matches!(
            DdimScheduler::new(&cfg, path, 0),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            DdimScheduler::new(&cfg, path, 1001),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn ddim_rejects_fractional_timestep() -> Result<()> {
        let mut s = DdimScheduler::new(&SchedulerConfig::default(), Path::new("c.json"), 5)?;
        let x = Tensor::zeros((1, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
            .context(|| "zeros".into())?;
        assert!(matches!(
            s.step(&x, 800.5, &x, &mut super::super::NoNoise),
            Err(Error::Usage(_))
        ));
        Ok(())
    }
}
