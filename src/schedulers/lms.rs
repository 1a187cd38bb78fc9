//! diffusers' `LMSDiscreteScheduler`: linear multistep (order 4, as diffusers' pipelines call it)
//! on the Euler family's sigma schedule.
//!
//! Owned (candle-transformers has no LMS). diffusers integrates each Lagrange basis polynomial over
//! `[sigma_i, sigma_i+1]` with `scipy.integrate.quad`; the integrand is a polynomial of degree at
//! most 3, which a 3-point Gauss-Legendre rule integrates exactly, so the coefficients here are that
//! integral in f64 (quad evaluates the integrand with float32 tensor arithmetic: the two agree to
//! about 1e-7 relative). Everything else (timesteps, sigmas, scaling, the x0 prediction) is the
//! Euler family's ([`super::euler`]), checked against diffusers 0.35.2.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, div, mul, sub, NoiseSchedule, Prediction};
use super::euler::{discrete_sigmas, predict_x0, sigma_steps_methods, SigmaSteps};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// diffusers' default `order` argument of `LMSDiscreteScheduler.step`.
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`, set up for one run of `steps` inference steps.
#[derive(Debug)]
pub struct LmsScheduler {
    prediction: Prediction,
    steps: SigmaSteps,
    /// The derivatives of the last `ORDER` steps, oldest first.
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `LMSDiscreteScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        let schedule = NoiseSchedule::from_config(cfg, path, false, false)?;
        // LMS's Karras range is the interpolated one (it reads no sigma_min / sigma_max).
        let schedule_sigmas = discrete_sigmas(cfg, path, &schedule, steps, (None, None))?;
        Ok(Self {
            prediction,
            steps: schedule_sigmas.into_steps(0.0),
            derivatives: Vec::with_capacity(ORDER),
        })
    }

    /// `get_lms_coefficient(order, t, j)`: the integral over `[sigma_t, sigma_t+1]` of the Lagrange
    /// basis polynomial of node `t - j` on the nodes `sigma_t, ..., sigma_t-order+1`.
    fn coefficient(&self, order: usize, t: usize, j: usize) -> Result<f64> {
        let s = |i: usize| self.steps.sigma(i).map(f64::from);
        let basis = |tau: f64| -> Result<f64> {
            let mut prod = 1.0;
            for k in (0..order).filter(|&k| k != j) {
                prod *= (tau - s(t - k)?) / (s(t - j)? - s(t - k)?);
            }
            Ok(prod)
        };
        // 3-point Gauss-Legendre on [a, b]: exact up to degree 5.
        let (a, b) = (s(t)?, s(t + 1)?);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (3.0f64 / 5.0).sqrt();
        let sum = 5.0 / 9.0 * basis(mid - half * x)?
            + 8.0 / 9.0 * basis(mid)?
            + 5.0 / 9.0 * basis(mid + half * x)?;
        Ok(half * sum)
    }
}

impl Scheduler for LmsScheduler {
    sigma_steps_methods!();

    /// diffusers' `LMSDiscreteScheduler.step` with `order = 4`.
    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let i = self.steps.step_index;
        let sigma = self.steps.sigma(i)?;
        let pred = predict_x0(self.prediction, model_output, sample, sigma)?;
        self.derivatives.push(div(&sub(sample, &pred)?, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        // sample + sum(coeff_j * derivative_j), newest derivative first; torch multiplies by the
        // coefficient as a float32 scalar.
        let mut sum: Option<Tensor> = None;
        for (j, d) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = mul(d, self.coefficient(order, i, j)? as f32)?;
            sum = Some(match sum {
                Some(s) => add(&s, &term)?,
                None => term,
            });
        }
        self.steps.step_index += 1;
        match sum {
            Some(s) => add(sample, &s),
            None => Ok(sample.clone()),
        }
    }
}
