//! diffusers' `UniPCMultistepScheduler`: UniPC (Zhao et al., a unified predictor-corrector), the
//! B(h) variants `bh2` (default) and `bh1`, data prediction (`predict_x0`, default) or noise
//! prediction, multistep of order 1 to 3 (`solver_order`, default 2), deterministic.
//!
//! Owned because candle-transformers has no UniPC; this follows diffusers 0.35.2 `set_timesteps`
//! (the same code as DPM-Solver's, shared in [`super::dpm::multistep_schedule`]),
//! `convert_model_output`, `multistep_uni_p_bh_update`, `multistep_uni_c_bh_update` and `step`
//! operation by operation, with float32 scalars as torch uses them. `torch.linalg.solve` (LAPACK's
//! LU with partial pivoting) is reproduced in float32 for the order 2 corrector and the order 3
//! predictor and corrector.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, div, mul, sub, Prediction};
use super::dpm::{alpha_sigma, lambda, multistep_schedule, x0_prediction, Multistep};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// The B(h) of the update formulas (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BhType {
    /// `B(h) = h` (`bh1`, recommended by the paper for unconditional sampling).
    Bh1,
    /// `B(h) = e^h - 1` (`bh2`, the default).
    Bh2,
}

/// diffusers' `UniPCMultistepScheduler`, set up for one run.
#[derive(Debug)]
pub struct UniPcScheduler {
    prediction: Prediction,
    predict_x0: bool,
    solver_order: usize,
    bh: BhType,
    lower_order_final: bool,
    /// Steps whose corrector is skipped (`disable_corrector`, step indices).
    disable_corrector: Vec<i64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: usize,
    /// The converted outputs of the last `solver_order` steps, newest last.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The sample the last predictor started from (`last_sample`), which the next corrector redoes.
    last_sample: Option<Tensor>,
    /// The order of the last predictor (`this_order`), which the next corrector uses.
    this_order: usize,
}

/// The scalars of one UniP or UniC update from sigma `s0` to sigma `t`, float32 as torch has them.
struct Coefficients {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    /// `expm1(hh)`, `hh` being `-h` for data prediction and `h` for noise prediction.
    h_phi_1: f32,
    /// `B(h)`.
    b_h: f32,
    /// `r_k` of each earlier output, then 1.
    rks: Vec<f32>,
    /// The right-hand side `b` of the order conditions.
    b: Vec<f32>,
}

impl Coefficients {
    /// `x_t_`, the first-order part of the update of `x` with the newest output `m0`.
    fn base(&self, predict_x0: bool, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        if predict_x0 {
            sub(
                &mul(x, self.sigma_t / self.sigma_s0)?,
                &mul(m0, self.alpha_t * self.h_phi_1)?,
            )
        } else {
            sub(
                &mul(x, self.alpha_t / self.alpha_s0)?,
                &mul(m0, self.sigma_t * self.h_phi_1)?,
            )
        }
    }

    /// `alpha_t * B_h` (data prediction) or `sigma_t * B_h`, the factor of the higher-order terms.
    fn res_scale(&self, predict_x0: bool) -> f32 {
        if predict_x0 {
            self.alpha_t * self.b_h
        } else {
            self.sigma_t * self.b_h
        }
    }

    /// `torch.linalg.solve(R, b)` on the first `n` order conditions (`R[p][k] = rks[k]^p`).
    fn rhos(&self, n: usize) -> Vec<f32> {
        let r: Vec<Vec<f32>> = (0..n)
            .map(|p| {
                self.rks[..n]
                    .iter()
                    .map(|&rk| (0..p).fold(1.0f32, |acc, _| acc * rk))
                    .collect()
            })
            .collect();
        let x = solve(r.clone(), self.b[..n].to_vec());
        if std::env::var("UNIPC_DBG").is_ok() {
            eprintln!("solve R {:?} b {:?} x {:?}", r, &self.b[..n], x);
        }
        x
    }
}

/// `torch.linalg.solve(a, b)` for UniPC's small systems: LAPACK's `sgesv` in float32 (LU with
/// partial pivoting, the column below each pivot scaled by its reciprocal, then the two triangular
/// solves).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for k in 0..n {
        // isamax: the first row holding the largest magnitude.
        let p = (k..n).fold(k, |p, i| if a[i][k].abs() > a[p][k].abs() { i } else { p });
        a.swap(k, p);
        b.swap(k, p);
        let r = 1.0 / a[k][k];
        for i in k + 1..n {
            a[i][k] *= r;
            for j in k + 1..n {
                a[i][j] -= a[i][k] * a[k][j];
            }
        }
    }
    for k in 0..n {
        for i in k + 1..n {
            b[i] -= b[k] * a[i][k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    b
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: `sum_k rhos[k] * d1s[k]`.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut terms = rhos.iter().zip(d1s).map(|(&rho, d)| mul(d, rho));
    let first = terms
        .next()
        .ok_or_else(|| Error::usage("UniPC: no earlier model output"))??;
    terms.try_fold(first, |acc, term| add(&acc, &term?))
}

impl UniPcScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `UniPCMultistepScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let unsupported =
            |field: &str, what: String| -> Result<Self> { Err(Error::config(path, field, what)) };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return unsupported(
                "solver_order",
                format!("{solver_order} is not supported by altdiff's UniPC (supported: 1, 2, 3)"),
            );
        }
        let bh = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => BhType::Bh1,
            // diffusers maps the DPM-Solver / DEIS names to bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => BhType::Bh2,
            other => {
                return unsupported(
                    "solver_type",
                    format!("`{other}` is not supported (supported: bh1, bh2)"),
                )
            }
        };
        if cfg.solver_p.is_some() {
            return unsupported(
                "solver_p",
                "another scheduler as the predictor is not supported by altdiff's UniPC \
                 (supported: null)"
                    .into(),
            );
        }
        Multistep::UniPc.reject_enabled(path, &[("thresholding", cfg.thresholding)])?;
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        let predict_x0 = cfg.predict_x0.unwrap_or(true);
        let lower_order_final = cfg.lower_order_final.unwrap_or(true);
        let schedule = multistep_schedule(cfg, path, steps, Multistep::UniPc)?;
        if schedule.final_zero {
            // The last step to sigma 0 divides by an infinite lambda: diffusers returns NaN or
            // infinity there for these settings.
            let broken = if bh == BhType::Bh1 {
                Some(("solver_type", "bh1"))
            } else if !predict_x0 {
                Some(("predict_x0", "false"))
            } else if !lower_order_final && solver_order > 1 {
                Some(("lower_order_final", "false"))
            } else {
                None
            };
            if let Some((field, value)) = broken {
                return unsupported(
                    field,
                    format!(
                        "{value} with final_sigmas_type `zero` makes diffusers' UniPC end in NaN or \
                         infinite values; use final_sigmas_type `sigma_min`"
                    ),
                );
            }
        }
        let step_index = schedule.start_index();
        Ok(Self {
            prediction,
            predict_x0,
            solver_order,
            bh,
            lower_order_final,
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            timesteps: schedule.timesteps.into_iter().map(|t| t as f64).collect(),
            sigmas: schedule.sigmas,
            step_index,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        Multistep::UniPc.sigma(&self.sigmas, i)
    }

    /// The `k`-th newest stored model output (`model_outputs[-(k + 1)]`).
    fn output(&self, k: usize) -> Result<&Tensor> {
        self.model_outputs
            .len()
            .checked_sub(k + 1)
            .and_then(|i| self.model_outputs[i].as_ref())
            .ok_or_else(|| Error::usage("UniPC: an earlier model output is missing"))
    }

    /// `convert_model_output`: the x0 prediction, or with `predict_x0 = false` the noise.
    fn convert(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        if self.predict_x0 {
            return x0_prediction(self.prediction, model_output, sample, sigma);
        }
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            Prediction::Epsilon => Ok(model_output.clone()),
            Prediction::Sample => div(&sub(sample, &mul(model_output, alpha_t)?)?, sigma_t),
            Prediction::Velocity => add(&mul(model_output, alpha_t)?, &mul(sample, sigma_t)?),
        }
    }

    /// The update's scalars from sigma `s0` to sigma `t`, with the earlier outputs at the sigmas
    /// `earlier` (newest first); the update's order is one more than their number.
    fn coefficients(&self, t: usize, s0: usize, earlier: &[usize]) -> Result<Coefficients> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(t)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(s0)?);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::with_capacity(earlier.len() + 1);
        for &si in earlier {
            let (alpha_si, sigma_si) = alpha_sigma(self.sigma(si)?);
            rks.push((lambda(alpha_si, sigma_si) - lambda_s0) / h);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.bh {
            BhType::Bh1 => hh,
            BhType::Bh2 => hh.exp_m1(),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i = 1u64;
        let mut b = Vec::with_capacity(rks.len());
        for i in 1..=rks.len() as u64 {
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i + 1;
            // `1 / factorial_i` is a Python float, rounded to float32 by torch.
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        if std::env::var("UNIPC_DBG").is_ok() {
            eprintln!(
                "COEF t={t} s0={s0} h={:e} hphi1={:e} bh={:e} rks={:?} b={:?}",
                h, h_phi_1, b_h, rks, b
            );
        }
        Ok(Coefficients {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            rks,
            b,
        })
    }

    /// `D1s`: `(m_k - m0) / r_k` for the outputs stored before `m0` (the newest one), newest first.
    fn differences(&self, c: &Coefficients, m0: &Tensor) -> Result<Vec<Tensor>> {
        (0..c.rks.len() - 1)
            .map(|k| div(&sub(self.output(k + 1)?, m0)?, c.rks[k]))
            .collect()
    }

    /// `multistep_uni_p_bh_update`: the predictor from the current sample to the next sigma.
    fn predictor(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let earlier: Vec<usize> = (1..order).map(|k| i - k).collect();
        let c = self.coefficients(i + 1, i, &earlier)?;
        let m0 = self.output(0)?;
        let x_t = c.base(self.predict_x0, x, m0)?;
        if order == 1 {
            // `x_t_ - alpha_t * B_h * 0`.
            return Ok(x_t);
        }
        let d1s = self.differences(&c, m0)?;
        let rhos_p = if order == 2 {
            vec![0.5]
        } else {
            c.rhos(order - 1)
        };
        let pred_res = weighted_sum(&rhos_p, &d1s)?;
        sub(&x_t, &mul(&pred_res, c.res_scale(self.predict_x0))?)
    }

    /// `multistep_uni_c_bh_update`: the corrector redoing the last predictor from `last_sample`
    /// with the converted output `model_t` at its result.
    fn corrector(&self, model_t: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let earlier: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let c = self.coefficients(i, i - 1, &earlier)?;
        let m0 = self.output(0)?;
        let x_t = c.base(self.predict_x0, last_sample, m0)?;
        let rhos_c = if order == 1 { vec![0.5] } else { c.rhos(order) };
        let d1_t = mul(&sub(model_t, m0)?, rhos_c[order - 1])?;
        let res = if order == 1 {
            // `0 + rhos_c[-1] * D1_t`.
            d1_t
        } else {
            let d1s = self.differences(&c, m0)?;
            add(&weighted_sum(&rhos_c[..order - 1], &d1s)?, &d1_t)?
        };
        sub(&x_t, &mul(&res, c.res_scale(self.predict_x0))?)
    }
}

impl Scheduler for UniPcScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let i = self.step_index;
        let n = self.timesteps.len();
        if i >= n {
            return Err(Error::usage(format!(
                "UniPC: step {} of a {n}-step schedule",
                i + 1
            )));
        }
        let converted = self.convert(model_output, sample)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i as i64 - 1));
        let sample = match &self.last_sample {
            Some(last) if use_corrector => self.corrector(&converted, last, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.rotate_left(1);
        if let Some(newest) = self.model_outputs.last_mut() {
            *newest = Some(converted);
        }
        let order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;

    #[test]
    fn unipc_config_errors() {
        let sigma_min = || SchedulerConfig {
            final_sigmas_type: Some("sigma_min".into()),
            ..Default::default()
        };
        let cases = [
            (
                SchedulerConfig {
                    solver_order: Some(4),
                    ..Default::default()
                },
                "solver_order",
            ),
            (
                SchedulerConfig {
                    solver_type: Some("rk4".into()),
                    ..sigma_min()
                },
                "solver_type",
            ),
            (
                SchedulerConfig {
                    solver_p: Some(
                        serde_json::json!({"_class_name": "DPMSolverMultistepScheduler"}),
                    ),
                    ..Default::default()
                },
                "solver_p",
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
                    use_exponential_sigmas: Some(true),
                    ..Default::default()
                },
                "use_exponential_sigmas",
            ),
            (
                SchedulerConfig {
                    use_flow_sigmas: Some(true),
                    ..Default::default()
                },
                "use_flow_sigmas",
            ),
            (
                SchedulerConfig {
                    prediction_type: Some("flow_prediction".into()),
                    ..Default::default()
                },
                "prediction_type",
            ),
            (
                SchedulerConfig {
                    final_sigmas_type: Some("sigma_max".into()),
                    ..Default::default()
                },
                "final_sigmas_type",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: Some("karras".into()),
                    ..Default::default()
                },
                "timestep_spacing",
            ),
            // NaN / infinity at the last step to sigma 0 in diffusers.
            (
                SchedulerConfig {
                    solver_type: Some("bh1".into()),
                    ..Default::default()
                },
                "solver_type",
            ),
            (
                SchedulerConfig {
                    predict_x0: Some(false),
                    ..Default::default()
                },
                "predict_x0",
            ),
            (
                SchedulerConfig {
                    lower_order_final: Some(false),
                    ..Default::default()
                },
                "lower_order_final",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(
                config_error_field(SchedulerKind::UniPc, cfg).as_deref(),
                Some(field)
            );
        }
        // The same settings are fine when the schedule ends at sigma_min, as is order 1 without
        // lower_order_final.
        for cfg in [
            SchedulerConfig {
                solver_type: Some("bh1".into()),
                predict_x0: Some(false),
                lower_order_final: Some(false),
                ..sigma_min()
            },
            SchedulerConfig {
                solver_order: Some(1),
                lower_order_final: Some(false),
                ..Default::default()
            },
            SchedulerConfig {
                solver_type: Some("midpoint".into()),
                disable_corrector: Some(vec![0, 3]),
                ..Default::default()
            },
        ] {
            assert_eq!(config_error_field(SchedulerKind::UniPc, cfg), None);
        }
    }

    #[test]
    fn solve_matches_lapack_pivoting() {
        // Row 2 pivots first: [[1, 1], [-2, 1]] x = [3, 0] has x = [1, 2].
        let x = solve(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]);
        assert_eq!(x, vec![1.0, 2.0]);
        let x = solve(
            vec![
                vec![1.0, 1.0, 1.0],
                vec![-1.0, -2.0, 1.0],
                vec![1.0, 4.0, 1.0],
            ],
            vec![6.0, -2.0, 12.0],
        );
        for (g, w) in x.iter().zip([1.0f32, 2.0, 3.0]) {
            assert!((g - w).abs() < 1e-6, "{x:?}");
        }
    }
}
