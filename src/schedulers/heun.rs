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
use super::euler::{discrete_sigmas, DiscreteSigmas};
use super::Scheduler;
use crate::config::SchedulerConfig;
use crate::error::{Error, Result, TensorContext};

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
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    leading: bool,
    step_index: usize,
    state: Option<FirstOrder>,
}

impl HeunScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `HeunDiscreteScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        for (field, on) in [
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ] {
            if on.unwrap_or(false) {
                return Err(Error::config(
                    path,
                    field,
                    "not supported by altdiff's Heun (supported: false)",
                ));
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
        // Heun's own class defaults for the betas (the other schedulers use 0.0001 .. 0.02); it has
        // no zero-SNR rescaling.
        let betas = SchedulerConfig {
            beta_start: cfg.beta_start.or(Some(0.00085)),
            beta_end: cfg.beta_end.or(Some(0.012)),
            ..cfg.clone()
        };
        let schedule = NoiseSchedule::from_config(&betas, path, false, false)?;
        schedule.check_steps(steps)?;
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
        let step_index = usize::from(all_t.iter().filter(|&&t| t == all_t[0]).count() > 1);
        Ok(Self {
            prediction,
            clip,
            timesteps: all_t,
            sigmas: all_sigmas,
            leading,
            step_index,
            state: None,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas.get(i).copied().ok_or_else(|| {
            Error::usage(format!(
                "Heun: step {} of a {}-evaluation schedule",
                i + 1,
                self.timesteps.len()
            ))
        })
    }
}

impl Scheduler for HeunScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        (if self.leading {
            (max * max + 1.0).sqrt()
        } else {
            max
        }) as f64
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: Tensor, _timestep: f64) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        div(&sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(&mut self, model_output: &Tensor, _timestep: f64, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let first = self.state.is_none();
        let (sigma, sigma_next) = if first {
            (self.sigma(i)?, self.sigma(i + 1)?)
        } else {
            (self.sigma(i.saturating_sub(1))?, self.sigma(i)?)
        };
        let sigma_input = if first { sigma } else { sigma_next };
        let pred = match self.prediction {
            Prediction::Epsilon => sub(sample, &mul(model_output, sigma_input)?)?,
            Prediction::Velocity => {
                let s2 = sigma_input * sigma_input + 1.0;
                add(
                    &mul(model_output, -sigma_input / s2.sqrt())?,
                    &div(sample, s2)?,
                )?
            }
            Prediction::Sample => model_output.clone(),
        };
        let pred = match self.clip {
            Some(r) => pred
                .clamp(-r, r)
                .context(|| "scheduler: clipping the predicted sample".into())?,
            None => pred,
        };
        self.step_index += 1;
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
    use super::super::tests::{check_sigma_case, fixture_cases};
    use super::*;

    #[test]
    fn heun_matches_diffusers() -> Result<()> {
        let cases = fixture_cases("heun");
        assert!(cases.len() >= 5, "fixture has too few Heun cases");
        for case in &cases {
            check_sigma_case(case)?;
        }
        Ok(())
    }

    #[test]
    fn heun_config_errors() {
        let path = Path::new("scheduler/scheduler_config.json");
        let cfg = SchedulerConfig {
            use_beta_sigmas: Some(true),
            ..Default::default()
        };
        assert!(matches!(
            HeunScheduler::new(&cfg, path, 5),
            Err(Error::Config { field, .. }) if field == "use_beta_sigmas"
        ));
        assert!(matches!(
            HeunScheduler::new(&SchedulerConfig::default(), path, 0),
            Err(Error::Usage(_))
        ));
    }
}
