//! diffusers' `HeunDiscreteScheduler`: Heun's second-order method on the Euler sigma schedule, two
//! UNet evaluations per step (its timesteps repeat every entry but the first).
//!
//! Owned (candle-transformers has no Heun); it shares the Euler family's timesteps and sigmas
//! (`discrete_sigmas` in the Euler module) and follows diffusers 0.35.2 `set_timesteps` (sigmas and
//! timesteps interleaved: `s0, s1, s1, ..., s(n-1), s(n-1), 0`), `scale_model_input` and `step`
//! (first-order state stores the derivative, `dt` and the sample; the second-order state averages
//! the two derivatives) with float32 scalars as torch uses them.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, div, mul, sub, NoiseSchedule, Prediction};
use super::euler::{discrete_sigmas, predict_x0, sigma_steps_methods, DiscreteSigmas, SigmaSteps};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Result, TensorContext};

/// What the first half of a step leaves for the second.
#[derive(Debug)]
struct FirstOrder {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// diffusers' `HeunDiscreteScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct HeunScheduler {
    prediction: Prediction,
    clip: Option<f32>,
    steps: SigmaSteps,
    state: Option<FirstOrder>,
}

impl HeunScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `HeunDiscreteScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        // Heun's own class defaults for the betas (the other schedulers use 0.0001 .. 0.02); it has
        // no zero-SNR rescaling.
        let betas = SchedulerConfig {
            beta_start: cfg.beta_start.or(Some(0.00085)),
            beta_end: cfg.beta_end.or(Some(0.012)),
            ..cfg.clone()
        };
        let schedule = NoiseSchedule::from_config(&betas, path, false, false)?;
        // Heun's config has no sigma_min / sigma_max: Karras sigmas span the interpolated range.
        let DiscreteSigmas {
            timesteps,
            sigmas,
            leading,
        } = discrete_sigmas(cfg, path, &schedule, steps, (None, None))?;
        let clip = if cfg.clip_sample.unwrap_or(false) {
            Some(cfg.clip_sample_range.unwrap_or(1.0) as f32)
        } else {
            None
        };
        // [s0, s1, s1, ..., s(n-1), s(n-1), 0] and [t0, t1, t1, ..., t(n-1), t(n-1)].
        let mut all_sigmas = vec![sigmas[0]];
        for &s in &sigmas[1..] {
            all_sigmas.extend([s, s]);
        }
        all_sigmas.push(0.0);
        let mut all_t = vec![timesteps[0] as f64];
        for &t in &timesteps[1..] {
            all_t.extend([t as f64, t as f64]);
        }
        Ok(Self {
            prediction,
            clip,
            steps: SigmaSteps::new(all_t, all_sigmas, leading),
            state: None,
        })
    }
}

impl Scheduler for HeunScheduler {
    sigma_steps_methods!();

    fn order(&self) -> usize {
        2
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let i = self.steps.step_index;
        let first = self.state.is_none();
        let (sigma, sigma_next) = if first {
            (self.steps.sigma(i)?, self.steps.sigma(i + 1)?)
        } else {
            (self.steps.sigma(i.saturating_sub(1))?, self.steps.sigma(i)?)
        };
        let sigma_input = if first { sigma } else { sigma_next };
        let pred = predict_x0(self.prediction, model_output, sample, sigma_input)?;
        let pred = match self.clip {
            Some(r) => pred
                .clamp(-r, r)
                .context(|| "scheduler: clipping the predicted sample".into())?,
            None => pred,
        };
        self.steps.step_index += 1;
        match self.state.take() {
            None => {
                let derivative = div(&sub(sample, &pred)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = add(sample, &mul(&derivative, dt)?)?;
                self.state = Some(FirstOrder {
                    derivative,
                    dt,
                    sample: sample.clone(),
                });
                Ok(prev)
            }
            Some(FirstOrder {
                derivative: d1,
                dt,
                sample: s0,
            }) => {
                let d2 = div(&sub(sample, &pred)?, sigma_next)?;
                let derivative = div(&add(&d1, &d2)?, 2.0)?;
                add(&s0, &mul(&derivative, dt)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;

    #[test]
    fn heun_config_errors() {
        let cfg = SchedulerConfig {
            use_beta_sigmas: Some(true),
            ..Default::default()
        };
        assert_eq!(
            config_error_field(SchedulerKind::Heun, cfg).as_deref(),
            Some("use_beta_sigmas")
        );
    }
}
