//! diffusers' `EulerAncestralDiscreteScheduler` (webui's "Euler a"): an Euler step down to
//! `sigma_down`, then fresh noise scaled by `sigma_up`, every step.
//!
//! Owned rather than candle-transformers' Euler-ancestral because that one draws its noise from
//! candle's own generator and builds its sigmas differently; this follows diffusers 0.35.2
//! `set_timesteps` (the Euler family's schedule, without Karras sigmas, which this class lacks) and
//! `step` operation by operation in float32, and draws the noise from the run's generator as
//! `randn_tensor(model_output.shape, generator=generator)` does, once per step including the last.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, mul, NoiseSchedule, Prediction};
use super::euler::{discrete_sigmas, euler_update, predict_x0, sigma_steps_methods, SigmaSteps};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// diffusers' `EulerAncestralDiscreteScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct EulerAncestralScheduler {
    prediction: Prediction,
    steps: SigmaSteps,
}

impl EulerAncestralScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `EulerAncestralDiscreteScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        // diffusers' step raises NotImplementedError for `sample`.
        let prediction =
            Prediction::parse(cfg, path, &[Prediction::Epsilon, Prediction::Velocity])?;
        let mut schedule = NoiseSchedule::from_config(cfg, path, false, true)?;
        schedule.pin_zero_snr_end(cfg);
        // The class has none of the alternative sigma schedules: from_config ignores those keys.
        let cfg = SchedulerConfig {
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            ..cfg.clone()
        };
        let sigmas = discrete_sigmas(&cfg, path, &schedule, steps, (None, None))?;
        Ok(Self {
            prediction,
            steps: sigmas.into_steps(0.0),
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    sigma_steps_methods!();

    /// diffusers' `EulerAncestralDiscreteScheduler.step`.
    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let (sigma_from, sigma_to) = self.steps.current()?;
        let pred_original = predict_x0(self.prediction, model_output, sample, sigma_from)?;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let prev = euler_update(sample, &pred_original, sigma_from, sigma_down)?;
        let fresh = noise.randn_like(model_output)?;
        self.steps.step_index += 1;
        add(&prev, &mul(&fresh, sigma_up)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;

    #[test]
    fn euler_a_config_errors_and_ignored_keys() {
        let sample = SchedulerConfig {
            prediction_type: Some("sample".into()),
            ..Default::default()
        };
        assert_eq!(
            config_error_field(SchedulerKind::EulerA, sample).as_deref(),
            Some("prediction_type")
        );
        // Keys of other classes are ignored, as from_config ignores them.
        let karras = SchedulerConfig {
            use_karras_sigmas: Some(true),
            use_beta_sigmas: Some(true),
            ..Default::default()
        };
        assert_eq!(config_error_field(SchedulerKind::EulerA, karras), None);
    }
}
