//! diffusers' `PNDMScheduler` (AltDiffusion's own scheduler): Runge-Kutta warm-up (`step_prk`) unless
//! `skip_prk_steps`, then pseudo linear multistep (`step_plms`) with `_get_prev_sample`.
//!
//! Owned because candle has no PNDM. It follows diffusers 0.35.2 operation by operation, including
//! its quirks: with `skip_prk_steps` the second timestep is repeated (N steps give N + 1 UNet calls,
//! e.g. 801, 601, 601, 401, 201, 1), and the call with `counter == 1` redoes the first step from the
//! first sample with the average of the first two model outputs; the timestep handed to `step` (not
//! the scheduler's own list) decides the previous timestep, as in diffusers.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, div, mul, sub, train_timestep, NoiseSchedule, Prediction, Spacing};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// The order of PNDM's Runge-Kutta warm-up (`pndm_order`).
const PNDM_ORDER: usize = 4;

/// diffusers' `PNDMScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct PndmScheduler {
    pub(super) schedule: NoiseSchedule,
    prediction: Prediction,
    skip_prk_steps: bool,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    /// The Runge-Kutta timesteps (empty with `skip_prk_steps`).
    prk_timesteps: Vec<i64>,
    /// Every timestep, Runge-Kutta ones first.
    timesteps: Vec<f64>,
    counter: usize,
    /// The last (up to four) model outputs the multistep formula combines.
    ets: Vec<Tensor>,
    /// The Runge-Kutta weighted sum so far (diffusers' `cur_model_output`, `None` for its 0).
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `PNDMScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg, path, false, false)?;
        let prediction =
            Prediction::parse(cfg, path, &[Prediction::Epsilon, Prediction::Velocity])?;
        let spacing = Spacing::parse(cfg, path)?;
        let skip_prk_steps = cfg.skip_prk_steps.unwrap_or(false);
        schedule.check_steps(steps)?;
        let base = spacing.timesteps(schedule.train_steps, steps, cfg.steps_offset.unwrap_or(0));
        let (prk_timesteps, plms_timesteps) = if skip_prk_steps {
            // concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1]: the second-largest timestep twice.
            let mut plms = base.clone();
            if base.len() >= 2 {
                plms.insert(base.len() - 1, base[base.len() - 2]);
            }
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if base.len() < PNDM_ORDER {
                return Err(Error::config(
                    path,
                    "skip_prk_steps",
                    format!(
                        "false (Runge-Kutta warm-up) needs at least {PNDM_ORDER} inference steps, got {steps}"
                    ),
                ));
            }
            let half = schedule.step_ratio(steps) / 2;
            // t[-4:].repeat(2) + tile([0, half], 4), then [:-1].repeat(2)[1:-1][::-1].
            let pairs: Vec<i64> = base[base.len() - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len() - (PNDM_ORDER - 1)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .map(|&t| t as f64)
            .collect();
        Ok(Self {
            step_ratio: schedule.step_ratio(steps),
            schedule,
            prediction,
            skip_prk_steps,
            prk_timesteps,
            timesteps,
            counter: 0,
            ets: Vec::with_capacity(PNDM_ORDER),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// diffusers' `step_prk`: one of the four Runge-Kutta evaluations per warm-up step.
    fn step_prk(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let weighted = |w: f32, acc: &Option<Tensor>| -> Result<Tensor> {
            let term = mul(model_output, w)?;
            match acc {
                Some(acc) => add(acc, &term),
                None => Ok(term),
            }
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(weighted((1.0f64 / 6.0) as f32, &self.cur_model_output)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(weighted((1.0f64 / 3.0) as f32, &self.cur_model_output)?);
                model_output.clone()
            }
            _ => {
                let combined = weighted((1.0f64 / 6.0) as f32, &self.cur_model_output)?;
                self.cur_model_output = None;
                combined
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// diffusers' `step_plms`: the linear multistep update over the last four model outputs.
    fn step_plms(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::usage(
                "PNDM: the multistep phase needs the Runge-Kutta warm-up to have run first",
            ));
        }
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let mut sample = sample.clone();
        let e = &self.ets;
        let n = e.len();
        let model_output = match n {
            1 if self.counter == 0 => {
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 if self.counter == 1 => {
                // The repeated timestep: redo the first step from the first sample.
                if let Some(first) = self.cur_sample.take() {
                    sample = first;
                }
                div(&add(model_output, &e[0])?, 2.0)?
            }
            2 => div(&sub(&mul(&e[1], 3.0)?, &e[0])?, 2.0)?,
            3 => {
                let s = sub(&mul(&e[2], 23.0)?, &mul(&e[1], 16.0)?)?;
                div(&add(&s, &mul(&e[0], 5.0)?)?, 12.0)?
            }
            4 => {
                let s = sub(&mul(&e[3], 55.0)?, &mul(&e[2], 59.0)?)?;
                let s = sub(&add(&s, &mul(&e[1], 37.0)?)?, &mul(&e[0], 9.0)?)?;
                mul(&s, (1.0f64 / 24.0) as f32)?
            }
            _ => {
                return Err(Error::usage(format!(
                    "PNDM: step called out of order (counter {}, {n} stored outputs)",
                    self.counter
                )))
            }
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper), scalars in float32.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_t = self.schedule.alpha_at(timestep)?;
        let alpha_prev = self.schedule.alpha_prev(prev_timestep)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let model_output = match self.prediction {
            Prediction::Velocity => add(
                &mul(model_output, alpha_t.sqrt())?,
                &mul(sample, beta_t.sqrt())?,
            )?,
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let update = div(&mul(&model_output, alpha_prev - alpha_t)?, denom)?;
        sub(&mul(sample, sample_coeff)?, &update)
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule
            .add_noise(original, noise, &self.timesteps, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let t = train_timestep(timestep)?;
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pndm_altdiffusion_timesteps() -> Result<()> {
        let cfg = SchedulerConfig {
            beta_schedule: Some("scaled_linear".into()),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            skip_prk_steps: Some(true),
            steps_offset: Some(1),
            ..Default::default()
        };
        let s = PndmScheduler::new(&cfg, Path::new("scheduler_config.json"), 5)?;
        assert_eq!(s.timesteps(), &[801.0, 601.0, 601.0, 401.0, 201.0, 1.0]);
        Ok(())
    }

    #[test]
    fn pndm_config_errors() {
        let path = Path::new("scheduler/scheduler_config.json");
        let field_of =
            |cfg: SchedulerConfig, steps: usize| match PndmScheduler::new(&cfg, path, steps) {
                Err(Error::Config { field, file, .. }) => {
                    assert_eq!(file, path);
                    Some(field)
                }
                _ => None,
            };
        let prk = SchedulerConfig {
            skip_prk_steps: Some(false),
            ..Default::default()
        };
        assert_eq!(field_of(prk.clone(), 3).as_deref(), Some("skip_prk_steps"));
        assert_eq!(field_of(prk, 4), None);
        let sample = SchedulerConfig {
            prediction_type: Some("sample".into()),
            ..Default::default()
        };
        assert_eq!(field_of(sample, 5).as_deref(), Some("prediction_type"));
        let schedule = SchedulerConfig {
            beta_schedule: Some("sigmoid".into()),
            ..Default::default()
        };
        assert_eq!(field_of(schedule, 5).as_deref(), Some("beta_schedule"));
        let spacing = SchedulerConfig {
            timestep_spacing: Some("middle".into()),
            ..Default::default()
        };
        assert_eq!(field_of(spacing, 5).as_deref(), Some("timestep_spacing"));
        let betas = SchedulerConfig {
            trained_betas: Some(vec![0.01; 10]),
            ..Default::default()
        };
        assert_eq!(field_of(betas, 5).as_deref(), Some("trained_betas"));
        // PNDM has no thresholding / zero-SNR options: diffusers ignores the keys, and so does altdiff.
        let ignored = SchedulerConfig {
            thresholding: Some(true),
            rescale_betas_zero_snr: Some(true),
            ..Default::default()
        };
        assert_eq!(field_of(ignored, 5), None);
    }

    #[test]
    fn pndm_step_count_errors() {
        let path = Path::new("scheduler_config.json");
        let cfg = SchedulerConfig::default();
        assert!(matches!(
            PndmScheduler::new(&cfg, path, 0),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            PndmScheduler::new(&cfg, path, 1001),
            Err(Error::Usage(_))
        ));
        assert!(PndmScheduler::new(&cfg, path, 1000).is_ok());
    }
}
