//! diffusers' `UniPCMultistepScheduler`: UniPC (Zhao et al., a unified predictor-corrector), the
//! B(h) variants `bh2` (default) and `bh1`, data prediction (`predict_x0`, default) or noise
//! prediction, multistep of order 1 to 3 (`solver_order`, default 2), `disable_corrector`,
//! deterministic.
//!
//! Owned because candle-transformers has no UniPC; this follows diffusers 0.35.2 `set_timesteps`
//! (the same code as DPM-Solver's, shared in `dpm::multistep_schedule`),
//! `convert_model_output`, `multistep_uni_p_bh_update`, `multistep_uni_c_bh_update` and `step`
//! operation by operation, with float32 scalars as torch computes them: `log` and `expm1` as MKL
//! gives them (the float64 results rounded), `torch.linalg.solve` as MKL's LAPACK solves the order
//! conditions (see `solve`). Settings with which diffusers ends in NaN or infinity (`bh1`,
//! `predict_x0 = false`, or `lower_order_final = false` with a final sigma of zero) are config errors.

use std::path::Path;

use candle_core::Tensor;

use super::common::{add, div, mul, sub, Prediction};
use super::dpm::{
    alpha_sigma, lambda, multistep_methods, multistep_schedule, x0_prediction, Multistep,
};
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

    /// `torch.linalg.solve(R, b)` on the first `n` order conditions (`R[p][k] = rks[k]^p`): all of
    /// them (the corrector's `R`, a contiguous tensor) or all but the last (the order 3 predictor's
    /// `R[:-1, :-1]`, a strided view, which torch solves another way).
    fn rhos(&self, n: usize) -> Vec<f32> {
        let r = (0..n)
            .map(|p| {
                self.rks[..n]
                    .iter()
                    .map(|&rk| (0..p).fold(1.0f32, |acc, _| acc * rk))
                    .collect()
            })
            .collect();
        solve(r, &self.b[..n], n == self.rks.len())
    }
}

/// LAPACK's `getrf` on a matrix of at most 3 rows as MKL computes it: partial pivoting (the first
/// row of largest magnitude), the first column's multipliers scaled by the pivot's reciprocal, later
/// ones divided by it, the trailing updates fused multiply-adds. Returns `L \ U` and the pivots.
fn lu_factor(mut m: Vec<Vec<f32>>) -> (Vec<Vec<f32>>, Vec<usize>) {
    let n = m.len();
    let mut pivots = Vec::with_capacity(n);
    for k in 0..n {
        let p = (k..n).fold(k, |p, i| if m[i][k].abs() > m[p][k].abs() { i } else { p });
        pivots.push(p);
        m.swap(k, p);
        let reciprocal = 1.0 / m[k][k];
        for i in k + 1..n {
            m[i][k] = if k == 0 {
                m[i][k] * reciprocal
            } else {
                m[i][k] / m[k][k]
            };
            for j in k + 1..n {
                m[i][j] = (-m[i][k]).mul_add(m[k][j], m[i][j]);
            }
        }
    }
    (m, pivots)
}

/// `torch.linalg.solve(a, b)` for UniPC's systems (at most 3 equations), bit for bit as torch 2.8
/// with MKL computes it on x86 (checked against it on thousands of such systems). A contiguous `a`
/// is factored transposed (`a^T = P L U`: the row-major data read column-major) and solved with
/// `getrs('T')`: `U^T y = b`, `L^T z = y`, then the interchanges in reverse. A strided view (2
/// equations at most) is factored as it is and solved with `getrs('N')`. MKL's triangular solves
/// fuse a single product into the subtraction, add two products unfused (`U^T`) or fused onto the
/// later one (`L^T`), and multiply by the diagonal's reciprocal.
fn solve(a: Vec<Vec<f32>>, b: &[f32], contiguous: bool) -> Vec<f32> {
    let n = b.len();
    let mut x = b.to_vec();
    if contiguous {
        let transposed = (0..n).map(|i| (0..n).map(|j| a[j][i]).collect()).collect();
        let (m, pivots) = lu_factor(transposed);
        for i in 0..n {
            let t = match i {
                0 => x[0],
                1 => (-m[0][1]).mul_add(x[0], x[1]),
                _ => x[i] - (m[0][i] * x[0] + m[1][i] * x[1]),
            };
            x[i] = t * (1.0 / m[i][i]);
        }
        for i in (0..n.saturating_sub(1)).rev() {
            x[i] = if i + 2 < n {
                x[i] - m[i + 1][i].mul_add(x[i + 1], m[i + 2][i] * x[i + 2])
            } else {
                (-m[i + 1][i]).mul_add(x[i + 1], x[i])
            };
        }
        for (k, &p) in pivots.iter().enumerate().rev() {
            x.swap(k, p);
        }
    } else {
        let (m, pivots) = lu_factor(a);
        for (k, &p) in pivots.iter().enumerate() {
            x.swap(k, p);
        }
        for i in 1..n {
            x[i] = (-m[i][i - 1]).mul_add(x[i - 1], x[i]);
        }
        for i in (0..n).rev() {
            let t = if i + 1 < n {
                (-m[i][i + 1]).mul_add(x[i + 1], x[i])
            } else {
                x[i]
            };
            x[i] = t * (1.0 / m[i][i]);
        }
    }
    x
}

/// torch's float32 `expm1` (MKL's, nearly always correctly rounded; glibc's `expm1f` is off by an
/// ulp about one time in ten).
fn expm1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
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
        let h_phi_1 = expm1(hh);
        let b_h = match self.bh {
            BhType::Bh1 => hh,
            BhType::Bh2 => expm1(hh),
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
    multistep_methods!();

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
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.step_index += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config_error_field;
    use super::super::SchedulerKind;
    use super::*;
    use serde_json::json;

    #[test]
    fn unipc_config_errors() {
        let config = |v: serde_json::Value| -> SchedulerConfig {
            serde_json::from_value(v).expect("scheduler config")
        };
        for (cfg, field) in [
            (json!({"solver_order": 4}), "solver_order"),
            (
                json!({"solver_type": "rk4", "final_sigmas_type": "sigma_min"}),
                "solver_type",
            ),
            (
                json!({"solver_p": {"_class_name": "DPMSolverMultistepScheduler"}}),
                "solver_p",
            ),
            (json!({"thresholding": true}), "thresholding"),
            (
                json!({"use_exponential_sigmas": true}),
                "use_exponential_sigmas",
            ),
            (json!({"use_flow_sigmas": true}), "use_flow_sigmas"),
            (
                json!({"prediction_type": "flow_prediction"}),
                "prediction_type",
            ),
            (
                json!({"final_sigmas_type": "sigma_max"}),
                "final_sigmas_type",
            ),
            (json!({"timestep_spacing": "karras"}), "timestep_spacing"),
            // NaN or infinity at the last step (to sigma 0) in diffusers.
            (json!({"solver_type": "bh1"}), "solver_type"),
            (json!({"predict_x0": false}), "predict_x0"),
            (json!({"lower_order_final": false}), "lower_order_final"),
        ] {
            assert_eq!(
                config_error_field(SchedulerKind::UniPc, config(cfg)).as_deref(),
                Some(field)
            );
        }
        // The same settings are fine when the schedule ends at sigma_min, as is order 1 without
        // lower_order_final; solver_p null is the default, and the DPM-Solver names mean bh2.
        for cfg in [
            json!({"solver_type": "bh1", "predict_x0": false, "lower_order_final": false,
                   "final_sigmas_type": "sigma_min"}),
            json!({"solver_order": 1, "lower_order_final": false}),
            json!({"solver_type": "midpoint", "disable_corrector": [0, 3], "solver_p": null}),
        ] {
            assert_eq!(config_error_field(SchedulerKind::UniPc, config(cfg)), None);
        }
    }

    #[test]
    fn solve_matches_torch() {
        // torch.linalg.solve on these (float32) systems, and on the strided view R[:-1, :-1].
        let r =
            |a: &[f32], b: &[f32]| -> Vec<Vec<f32>> { vec![vec![1.0; 3], a.to_vec(), b.to_vec()] };
        let x = solve(
            r(&[-1.0091947, -2.0216591, 1.0], &[1.018474, 4.0871058, 1.0]),
            &[0.51364625, 0.34705484, 0.26238173],
            true,
        );
        assert_eq!(x, [0.20718527, -0.08263147, 0.38909245]);
        let x = solve(
            vec![vec![1.0, 1.0], vec![-0.991861, -1.9928418]],
            &[0.5137583, 0.34716588],
            false,
        );
        assert_eq!(x, [1.3696615, -0.85590315]);
        // Row 2 pivots first: [[1, 1], [-2, 1]] x = [3, 0] has x = [1, 2].
        let x = solve(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], &[3.0, 0.0], true);
        assert_eq!(x, [1.0, 2.0]);
    }
}
