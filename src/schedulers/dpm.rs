//! diffusers' `DPMSolverMultistepScheduler` as webui's "DPM++ 2M": `algorithm_type = dpmsolver++`,
//! deterministic, multistep of order 1 or 2 (`solver_order`, default 2), `midpoint` or `heun`
//! second-order formula.
//!
//! Owned because candle-transformers' DPM-Solver++ computes its timesteps and lambdas its own way;
//! this follows diffusers 0.35.2 `set_timesteps`, `convert_model_output`,
//! `dpm_solver_first_order_update`, `multistep_dpm_solver_second_order_update` and `step` operation
//! by operation, with float32 scalars as torch uses them (the lambdas `log(alpha) - log(sigma)` of
//! each step's sigmas, the final step to sigma 0 taken as a first-order step).

use std::path::Path;

use candle_core::Tensor;

use super::common::{
    add, div, karras_sigmas, mul, numpy_linspace, sigma_to_t, sub, NoiseSchedule, Prediction,
    Spacing,
};
use super::{Scheduler, StepNoise};
use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// The second-order formula (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// diffusers' `DPMSolverMultistepScheduler` (dpmsolver++), set up for one run.
#[derive(Debug)]
pub struct DpmSolverScheduler {
    prediction: Prediction,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: usize,
    /// The converted outputs (x0 predictions) of the last `solver_order` steps, newest last.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of a sigma: `1 / sqrt(sigma^2 + 1)` and `sigma * alpha_t`, in f32.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `log(alpha) - log(sigma)` (infinite for sigma 0, as torch gives). torch's float32 `log` is MKL's,
/// nearly always the correctly rounded value, which the float64 log rounded to float32 matches far
/// more often than glibc's `logf` does.
pub(super) fn lambda(alpha: f32, sigma: f32) -> f32 {
    ((alpha as f64).ln() as f32) - ((sigma as f64).ln() as f32)
}

/// `convert_model_output` of the data-prediction solvers (dpmsolver++, UniPC with `predict_x0`):
/// the x0 prediction from the model output at `sigma`.
pub(super) fn x0_prediction(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha, sigma) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => div(&sub(sample, &mul(model_output, sigma)?)?, alpha),
        Prediction::Sample => Ok(model_output.clone()),
        Prediction::Velocity => sub(&mul(sample, alpha)?, &mul(model_output, sigma)?),
    }
}

/// The `Scheduler` accessors of the multistep solvers (DPM-Solver, UniPC): their `timesteps` and
/// `sigmas` fields, the start (`step_index`) and `add_noise`.
macro_rules! multistep_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn sigmas(&self) -> Option<&[f32]> {
            Some(&self.sigmas)
        }

        fn begin_at(&mut self, index: usize) {
            self.step_index = index;
        }

        /// `alpha_t * original + sigma_t * noise` at evaluation `index` (`_sigma_to_alpha_sigma_t`).
        fn add_noise(
            &self,
            original: &candle_core::Tensor,
            noise: &candle_core::Tensor,
            index: usize,
        ) -> crate::error::Result<candle_core::Tensor> {
            let sigma = self.sigma(index)?;
            let (alpha_t, sigma_t) = $crate::schedulers::dpm::alpha_sigma(sigma);
            $crate::schedulers::common::add(
                &$crate::schedulers::common::mul(original, alpha_t)?,
                &$crate::schedulers::common::mul(noise, sigma_t)?,
            )
        }
    };
}
pub(super) use multistep_methods;

/// The multistep solver classes whose `set_timesteps` is the same code in diffusers
/// (`DPMSolverMultistepScheduler`, `UniPCMultistepScheduler`), for what differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Multistep {
    DpmSolver,
    UniPc,
}

impl Multistep {
    /// The class as error messages name it.
    fn name(self) -> &'static str {
        match self {
            Multistep::DpmSolver => "DPM-Solver",
            Multistep::UniPc => "UniPC",
        }
    }

    /// Sigma `i` of `sigmas` (one per timestep, then the final one), or a usage error past the end.
    pub(super) fn sigma(self, sigmas: &[f32], i: usize) -> Result<f32> {
        sigmas.get(i).copied().ok_or_else(|| {
            Error::usage(format!(
                "{}: step {} of a {}-step schedule",
                self.name(),
                i + 1,
                sigmas.len().saturating_sub(1)
            ))
        })
    }

    /// A config error naming the first of `flags` that is true (altdiff implements none of them).
    pub(super) fn reject_enabled(self, path: &Path, flags: &[(&str, Option<bool>)]) -> Result<()> {
        match flags.iter().find(|(_, on)| on.unwrap_or(false)) {
            Some((field, _)) => Err(Error::config(
                path,
                *field,
                format!(
                    "not supported by altdiff's {} (supported: false)",
                    self.name()
                ),
            )),
            None => Ok(()),
        }
    }
}

/// What a multistep solver's `set_timesteps` computes: the integer timesteps, one sigma per
/// timestep then the final sigma (float32), and whether that final sigma is zero.
#[derive(Debug)]
pub(super) struct MultistepSchedule {
    pub timesteps: Vec<i64>,
    pub sigmas: Vec<f32>,
    pub final_zero: bool,
}

impl MultistepSchedule {
    /// diffusers' `index_for_timestep` for the first timestep: its second occurrence if it repeats.
    pub fn start_index(&self) -> usize {
        let first = self.timesteps.first();
        usize::from(self.timesteps.iter().filter(|&t| Some(t) == first).count() > 1)
    }
}

/// The noise schedule (with the zero-SNR rescale) and `set_timesteps(steps)` of `class`, as diffusers
/// 0.35.2 computes them: `timestep_spacing` (default `linspace`) over the training timesteps, the
/// training sigmas at them or, with `use_karras_sigmas`, Karras sigmas over the training table's
/// range and the timesteps `_sigma_to_t` gives for them, then the final sigma (`final_sigmas_type`).
/// Where the classes differ: DPM-Solver leaves Karras timesteps unrounded for `squaredcos_cap_v2`
/// and its `sigma_min` final sigma is always the training table's smallest; UniPC always rounds and
/// ends a Karras schedule on its last Karras sigma. Checks the step count and rejects the sigma
/// schedules altdiff does not implement.
pub(super) fn multistep_schedule(
    cfg: &SchedulerConfig,
    path: &Path,
    steps: usize,
    class: Multistep,
) -> Result<MultistepSchedule> {
    class.reject_enabled(
        path,
        &[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
            ("use_dynamic_shifting", cfg.use_dynamic_shifting),
        ],
    )?;
    let unsupported = |field: &str, what: String| Err(Error::config(path, field, what));
    let mut schedule = NoiseSchedule::from_config(cfg, path, false, true)?;
    schedule.pin_zero_snr_end(cfg);
    schedule.check_steps(steps)?;
    let train = schedule.train_steps;
    let timesteps: Vec<i64> = match cfg.timestep_spacing.as_deref().unwrap_or("linspace") {
        "linspace" => {
            let mut t: Vec<i64> = numpy_linspace(0.0, (train - 1) as f64, steps + 1)
                .into_iter()
                .rev()
                .map(|v| v.round_ties_even() as i64)
                .collect();
            t.pop();
            t
        }
        "leading" => {
            let ratio = (train / (steps + 1)) as i64;
            let offset = cfg.steps_offset.unwrap_or(0) as i64;
            (1..=steps as i64)
                .rev()
                .map(|i| i * ratio + offset)
                .collect()
        }
        "trailing" => Spacing::Trailing
            .timesteps(train, steps, 0)
            .into_iter()
            .rev()
            .collect(),
        other => {
            return unsupported(
                "timestep_spacing",
                format!("`{other}` is not supported (supported: linspace, leading, trailing)"),
            )
        }
    };
    let final_zero = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => true,
        "sigma_min" => false,
        other => {
            return unsupported(
                "final_sigmas_type",
                format!("`{other}` is not supported (supported: zero, sigma_min)"),
            )
        }
    };
    let ac = &schedule.alphas_cumprod;
    let train_sigmas: Vec<f32> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    let mut sigma_min = train_sigmas[0];
    let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if cfg.use_karras_sigmas.unwrap_or(false) {
        // Neither class has sigma_min / sigma_max in its config (diffusers ignores them): the range
        // is the training table's.
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        let karras = karras_sigmas(
            train_sigmas[0] as f64,
            train_sigmas[train - 1] as f64,
            steps,
        );
        let round =
            class == Multistep::UniPc || cfg.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
        let t = karras
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                // torch's `.to(int64)` truncates what numpy's `round()` left.
                (if round { t.round_ties_even() } else { t }) as i64
            })
            .collect();
        let karras: Vec<f32> = karras.into_iter().map(|s| s as f32).collect();
        if class == Multistep::UniPc {
            sigma_min = karras[karras.len() - 1];
        }
        (t, karras)
    } else {
        // np.interp at integer timesteps is the table entry (below 0: the first one).
        let s = timesteps
            .iter()
            .map(|&t| train_sigmas[t.clamp(0, train as i64 - 1) as usize])
            .collect();
        (timesteps, s)
    };
    sigmas.push(if final_zero { 0.0 } else { sigma_min });
    Ok(MultistepSchedule {
        timesteps,
        sigmas,
        final_zero,
    })
}

impl DpmSolverScheduler {
    /// Builds the scheduler from `scheduler_config.json` (path for errors) for `steps` steps, as
    /// `DPMSolverMultistepScheduler.from_config(cfg)` followed by `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let unsupported =
            |field: &str, what: String| -> Result<Self> { Err(Error::config(path, field, what)) };
        let algorithm = cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++");
        if algorithm != "dpmsolver++" {
            return unsupported(
                "algorithm_type",
                format!("`{algorithm}` is not supported by altdiff's DPM-Solver (supported: dpmsolver++)"),
            );
        }
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return unsupported(
                "solver_order",
                format!(
                    "{solver_order} is not supported by altdiff's DPM-Solver (supported: 1, 2)"
                ),
            );
        }
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the DEIS / UniPC names to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return unsupported(
                    "solver_type",
                    format!("`{other}` is not supported (supported: midpoint, heun)"),
                )
            }
        };
        Multistep::DpmSolver.reject_enabled(
            path,
            &[
                ("thresholding", cfg.thresholding),
                ("use_lu_lambdas", cfg.use_lu_lambdas),
            ],
        )?;
        if let Some(v) = cfg.lambda_min_clipped {
            if v.is_finite() {
                return unsupported(
                    "lambda_min_clipped",
                    format!("{v} is not supported by altdiff's DPM-Solver (supported: -inf)"),
                );
            }
        }
        if let Some(v @ ("learned" | "learned_range")) = cfg.variance_type.as_deref() {
            return unsupported(
                "variance_type",
                format!("`{v}` is not supported by altdiff's DPM-Solver (supported: none)"),
            );
        }
        let prediction = Prediction::parse(cfg, path, &Prediction::ALL)?;
        let schedule = multistep_schedule(cfg, path, steps, Multistep::DpmSolver)?;
        let step_index = schedule.start_index();
        Ok(Self {
            prediction,
            solver_order,
            solver_type,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_zero: schedule.final_zero,
            timesteps: schedule.timesteps.into_iter().map(|t| t as f64).collect(),
            sigmas: schedule.sigmas,
            step_index,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        Multistep::DpmSolver.sigma(&self.sigmas, i)
    }

    /// `convert_model_output`: the x0 prediction.
    fn convert(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma(self.step_index)?;
        x0_prediction(self.prediction, model_output, sample, sigma)
    }
}

impl Scheduler for DpmSolverScheduler {
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
        let lower_order_final = i + 1 == n
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;
        let x0 = self.convert(model_output, sample)?;
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(x0.clone());
        }

        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(i + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(i)?);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let first = self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = if first {
            // dpm_solver_first_order_update (dpmsolver++).
            sub(
                &mul(sample, sigma_t / sigma_s0)?,
                &mul(&x0, alpha_t * ((-h).exp() - 1.0))?,
            )?
        } else {
            // multistep_dpm_solver_second_order_update (dpmsolver++); solver_order is 2 here, so
            // `lower_order_second` changes nothing.
            let _ = lower_order_second;
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigma(i - 1)?);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let m1 = self.model_outputs[self.solver_order - 2]
                .as_ref()
                .ok_or_else(|| Error::usage("DPM-Solver: no previous model output"))?;
            let d1 = mul(&sub(&x0, m1)?, 1.0 / r0)?;
            let e = (-h).exp() - 1.0;
            let base = sub(&mul(sample, sigma_t / sigma_s0)?, &mul(&x0, alpha_t * e)?)?;
            match self.solver_type {
                SolverType::Midpoint => sub(&base, &mul(&d1, 0.5 * (alpha_t * e))?)?,
                SolverType::Heun => add(&base, &mul(&d1, alpha_t * (e / h + 1.0))?)?,
            }
        };
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
    fn dpm_config_errors() {
        let cases = [
            (
                SchedulerConfig {
                    algorithm_type: Some("sde-dpmsolver++".into()),
                    ..Default::default()
                },
                "algorithm_type",
            ),
            (
                SchedulerConfig {
                    solver_order: Some(3),
                    ..Default::default()
                },
                "solver_order",
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
                    lambda_min_clipped: Some(-5.1),
                    ..Default::default()
                },
                "lambda_min_clipped",
            ),
            (
                SchedulerConfig {
                    solver_type: Some("rk4".into()),
                    ..Default::default()
                },
                "solver_type",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(
                config_error_field(SchedulerKind::DpmPp2m, cfg).as_deref(),
                Some(field)
            );
        }
    }
}
