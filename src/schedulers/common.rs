//! What PNDM and DDIM share: the noise schedule (betas and `alphas_cumprod`), the inference timestep
//! spacing, config parsing, and the scalar-times-tensor helpers of the update formulas.
//!
//! Owned rather than taken from candle-transformers because candle has no PNDM and its DDIM rounds
//! the timesteps differently from diffusers. Everything here reproduces diffusers 0.35.2 bit for bit
//! where that is cheap: torch builds the betas with an FMA-contracted float32 `linspace` (x86 CPU
//! kernels are compiled with FMA), accumulates `cumprod` in float64 and rounds each entry to float32,
//! and numpy rounds the timesteps half-to-even after a float64 `arange` / `linspace`.

use std::path::Path;

use candle_core::Tensor;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result, TensorContext};

/// What the UNet predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    /// The noise (`epsilon`).
    Epsilon,
    /// The velocity (`v_prediction`).
    Velocity,
    /// The denoised sample (`sample`; DDIM only).
    Sample,
}

impl Prediction {
    /// All three, for the classes that accept every prediction type.
    pub(crate) const ALL: [Prediction; 3] = [
        Prediction::Epsilon,
        Prediction::Velocity,
        Prediction::Sample,
    ];

    /// Parses `prediction_type` (default `epsilon`); `allowed` lists what the calling class accepts.
    pub(crate) fn parse(
        cfg: &SchedulerConfig,
        path: &Path,
        allowed: &[Prediction],
    ) -> Result<Self> {
        let name = cfg.prediction_type.as_deref().unwrap_or("epsilon");
        let parsed = match name {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::Velocity),
            "sample" => Some(Prediction::Sample),
            _ => None,
        };
        match parsed {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                Err(Error::config(
                    path,
                    "prediction_type",
                    format!(
                        "`{name}` is not supported (supported: {})",
                        names.join(", ")
                    ),
                ))
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::Velocity => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// How the inference timesteps are spread over the training ones (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    /// `arange(0, n) * (T // n) + steps_offset`.
    Leading,
    /// `round(linspace(0, T - 1, n))`.
    Linspace,
    /// `round(arange(T, 0, -T / n)) - 1`.
    Trailing,
}

impl Spacing {
    /// Parses `timestep_spacing` (default `leading`).
    pub(crate) fn parse(cfg: &SchedulerConfig, path: &Path) -> Result<Self> {
        match cfg.timestep_spacing.as_deref().unwrap_or("leading") {
            "leading" => Ok(Spacing::Leading),
            "linspace" => Ok(Spacing::Linspace),
            "trailing" => Ok(Spacing::Trailing),
            other => Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{other}` is not supported (supported: leading, linspace, trailing)"),
            )),
        }
    }

    /// The inference timesteps in ascending order, as PNDM's `_timesteps` (DDIM reverses them).
    ///
    /// `trailing` follows numpy's float `arange` exactly, including its length `ceil(T / (T / n))`,
    /// which for some `n` (61, 103, ... for T = 1000) is `n + 1` and adds a timestep -1.
    pub(crate) fn timesteps(self, train: usize, steps: usize, steps_offset: usize) -> Vec<i64> {
        match self {
            Spacing::Leading => {
                let ratio = (train / steps) as i64;
                (0..steps as i64)
                    .map(|i| i * ratio + steps_offset as i64)
                    .collect()
            }
            Spacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .map(|v| v.round_ties_even() as i64)
                .collect(),
            Spacing::Trailing => {
                let mut t: Vec<i64> =
                    numpy_arange(train as f64, 0.0, -(train as f64 / steps as f64))
                        .into_iter()
                        .map(|v| v.round_ties_even() as i64 - 1)
                        .collect();
                t.reverse();
                t
            }
        }
    }
}

/// numpy's `linspace(start, stop, num)` for float64 (endpoint included, last value set to `stop`).
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// numpy's `arange(start, stop, step)` for float64: length `ceil((stop - start) / step)`, then
/// `start`, `start + step`, and `start + i * ((start + step) - start)` from the third value on.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// torch's float32 `linspace` on an x86 CPU: `start + step * i` for the first half and
/// `end - step * (n - 1 - i)` for the second, each a fused multiply-add, `step` computed in f32.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`), in f64 then f32.
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// torch's `cumprod` of a float32 tensor on the CPU: accumulated in f64, each entry rounded to f32.
fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 as torch computes it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (sqrt.first(), sqrt.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let scale = first / (first - last);
    for s in sqrt.iter_mut() {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    std::iter::once(bar[0])
        .chain(bar.windows(2).map(|w| w[1] / w[0]))
        .map(|a| 1.0 - a)
        .collect()
}

/// The training noise schedule of one scheduler instance.
#[derive(Debug, Clone)]
pub(crate) struct NoiseSchedule {
    /// `num_train_timesteps`.
    pub train_steps: usize,
    /// Cumulative products of `1 - beta`, as torch float32 values.
    pub alphas_cumprod: Vec<f32>,
    /// The alpha-cumprod used past the last step (`set_alpha_to_one`).
    pub final_alpha_cumprod: f32,
}

impl NoiseSchedule {
    /// Builds the schedule from the config with the class's `set_alpha_to_one` default; `zero_snr`
    /// says whether the class reads `rescale_betas_zero_snr` (DDIM does, PNDM ignores it).
    pub(crate) fn from_config(
        cfg: &SchedulerConfig,
        path: &Path,
        set_alpha_to_one_default: bool,
        zero_snr: bool,
    ) -> Result<Self> {
        // Also here, not only in SchedulerConfig::load: `build` is public and takes any config.
        cfg.check_ranges(path)?;
        let train_steps = cfg.num_train_timesteps.unwrap_or(1000);
        let mut betas = match (&cfg.trained_betas, cfg.beta_schedule.as_deref().unwrap_or("linear")) {
            (Some(b), _) if b.len() != train_steps => {
                return Err(Error::config(
                    path,
                    "trained_betas",
                    format!("has {} entries but num_train_timesteps is {train_steps}", b.len()),
                ))
            }
            (Some(b), _) => b.iter().map(|&b| b as f32).collect(),
            (None, "linear") => torch_linspace_f32(
                cfg.beta_start.unwrap_or(0.0001),
                cfg.beta_end.unwrap_or(0.02),
                train_steps,
            ),
            (None, "scaled_linear") => torch_linspace_f32(
                cfg.beta_start.unwrap_or(0.0001).sqrt(),
                cfg.beta_end.unwrap_or(0.02).sqrt(),
                train_steps,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            (None, "squaredcos_cap_v2") => squaredcos_cap_v2(train_steps),
            (None, other) => {
                return Err(Error::config(
                    path,
                    "beta_schedule",
                    format!("`{other}` is not supported (supported: linear, scaled_linear, squaredcos_cap_v2)"),
                ))
            }
        };
        if zero_snr && cfg.rescale_betas_zero_snr.unwrap_or(false) {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(set_alpha_to_one_default) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            train_steps,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// diffusers' sigma-based schedulers after a zero-SNR rescale set the last `alphas_cumprod` to
    /// 2^-24 ("close to 0 without being 0, so that the first sigma is not infinite").
    pub(crate) fn pin_zero_snr_end(&mut self, cfg: &SchedulerConfig) {
        if cfg.rescale_betas_zero_snr.unwrap_or(false) {
            if let Some(last) = self.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
    }

    /// `alphas_cumprod[t]` with Python's indexing: -1 is the last entry (the extra trailing
    /// timestep); anything else outside the table is an error, as torch's IndexError.
    pub(crate) fn alpha_at(&self, t: i64) -> Result<f32> {
        let n = self.alphas_cumprod.len() as i64;
        let idx = if t < 0 { t + n } else { t };
        if (0..n).contains(&idx) {
            Ok(self.alphas_cumprod[idx as usize])
        } else {
            Err(Error::usage(format!(
                "scheduler timestep {t} is outside the {n} training timesteps"
            )))
        }
    }

    /// `add_noise` of the alpha schedulers (DDIM, DDPM, PNDM) at evaluation `index` of `timesteps`:
    /// `sqrt(a) * original + sqrt(1 - a) * noise` with `a = alphas_cumprod[t]`, in float32 as torch
    /// computes it (`** 0.5` is a square root there).
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[f64],
        index: usize,
    ) -> Result<Tensor> {
        let t = timesteps.get(index).copied().ok_or_else(|| {
            Error::usage(format!(
                "scheduler: evaluation {} of a {}-evaluation schedule",
                index + 1,
                timesteps.len()
            ))
        })?;
        let a = self.alpha_at(train_timestep(t)?)?;
        add(&mul(original, a.sqrt())?, &mul(noise, (1.0 - a).sqrt())?)
    }

    /// `alphas_cumprod[prev]`, or `final_alpha_cumprod` once `prev` is negative.
    pub(crate) fn alpha_prev(&self, prev: i64) -> Result<f32> {
        if prev >= 0 {
            self.alpha_at(prev)
        } else {
            Ok(self.final_alpha_cumprod)
        }
    }

    /// Checks an inference step count against the schedule: zero, or more steps than training
    /// timesteps, is a usage error (diffusers' DDIM rejects the latter; PNDM would silently
    /// run a degenerate schedule).
    pub(crate) fn check_steps(&self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::usage(
                "the number of inference steps must be at least 1",
            ));
        }
        if steps > self.train_steps {
            return Err(Error::usage(format!(
                "{steps} inference steps is more than the scheduler's {} training timesteps",
                self.train_steps
            )));
        }
        Ok(())
    }

    /// `num_train_timesteps // num_inference_steps`, the distance to the previous timestep.
    pub(crate) fn step_ratio(&self, steps: usize) -> i64 {
        (self.train_steps / steps.max(1)) as i64
    }
}

/// Karras et al.'s sigmas (diffusers' `_convert_to_karras`, rho 7, float64): `n` values from
/// `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv = sigma_min.powf(1.0 / RHO);
    let max_inv = sigma_max.powf(1.0 / RHO);
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO))
        .collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep of `sigma`, interpolating
/// linearly in log-sigma between the two neighbouring entries of `log_sigmas` (float32, ascending).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(): the last index with log_sigmas[i] <= log_sigma (0 if none),
    // clipped so that a higher neighbour exists.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len().saturating_sub(2));
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    // `low - high` is a float32 subtraction in numpy (both are float32 scalars).
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `clip_sample_range` when `clip_sample` is on (DDIM's and DDPM's defaults: on, range 1).
pub(crate) fn clip_range(cfg: &SchedulerConfig, path: &Path) -> Result<Option<f32>> {
    if !cfg.clip_sample.unwrap_or(true) {
        return Ok(None);
    }
    let range = cfg.clip_sample_range.unwrap_or(1.0);
    if !(range.is_finite() && range >= 0.0) {
        return Err(Error::config(
            path,
            "clip_sample_range",
            format!("{range} is not a non-negative number"),
        ));
    }
    Ok(Some(range as f32))
}

/// The alpha-based schedulers' (DDIM, DDPM) predicted original sample from the model output at
/// `alpha_t` (`alphas_cumprod[t]`), clipped to `clip` when set.
pub(crate) fn alpha_x0(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    clip: Option<f32>,
) -> Result<Tensor> {
    let beta_t = 1.0 - alpha_t;
    let x0 = match prediction {
        Prediction::Epsilon => div(
            &sub(sample, &mul(model_output, beta_t.sqrt())?)?,
            alpha_t.sqrt(),
        )?,
        Prediction::Sample => model_output.clone(),
        Prediction::Velocity => sub(
            &mul(sample, alpha_t.sqrt())?,
            &mul(model_output, beta_t.sqrt())?,
        )?,
    };
    match clip {
        Some(r) => x0
            .clamp(-r, r)
            .context(|| "scheduler: clipping the predicted sample".into()),
        None => Ok(x0),
    }
}

/// Converts a timestep handed to `step` back to the integer training timestep it names.
pub(crate) fn train_timestep(t: f64) -> Result<i64> {
    if t.is_finite() && t.fract() == 0.0 && t.abs() < 1e15 {
        Ok(t as i64)
    } else {
        Err(Error::usage(format!(
            "scheduler timestep {t} is not an integer"
        )))
    }
}

/// `x * by` with a float32 scalar, as torch multiplies a float32 tensor by a float32 0-d tensor.
pub(crate) fn mul(x: &Tensor, by: f32) -> Result<Tensor> {
    x.affine(by as f64, 0.0)
        .context(|| "scheduler: scaling a tensor".into())
}

/// `x / by` with a float32 scalar, a true division as torch does it on the CPU.
pub(crate) fn div(x: &Tensor, by: f32) -> Result<Tensor> {
    let d = Tensor::new(by, x.device())
        .and_then(|d| d.to_dtype(x.dtype()))
        .and_then(|d| x.broadcast_div(&d));
    d.context(|| "scheduler: dividing a tensor".into())
}

/// `a + b` with a scheduler error context.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a + b).context(|| "scheduler: adding tensors".into())
}

/// `a - b` with a scheduler error context.
pub(crate) fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b).context(|| "scheduler: subtracting tensors".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_matches_numpy_extra_timestep() {
        // numpy: np.round(np.arange(1000, 0, -1000 / 61)) - 1 has 62 entries ending in -1.
        let t = Spacing::Trailing.timesteps(1000, 61, 0);
        assert_eq!(t.len(), 62);
        assert_eq!(t[0], -1);
        assert_eq!(t[61], 999);
        assert_eq!(
            Spacing::Trailing.timesteps(1000, 7, 0),
            vec![142, 285, 428, 570, 713, 856, 999]
        );
    }

    #[test]
    fn linspace_rounds_half_to_even() {
        // 999 / 6 * [1, 3, 5] = 166.5, 499.5, 832.5: numpy rounds them to 166, 500, 832.
        assert_eq!(
            Spacing::Linspace.timesteps(1000, 7, 1),
            vec![0, 166, 333, 500, 666, 832, 999]
        );
        assert_eq!(Spacing::Linspace.timesteps(1000, 1, 1), vec![0]);
    }

    #[test]
    fn python_negative_index_and_bounds() -> Result<()> {
        let s = NoiseSchedule::from_config(
            &SchedulerConfig::default(),
            Path::new("x.json"),
            false,
            false,
        )?;
        assert_eq!(s.alpha_at(-1)?, s.alphas_cumprod[999]);
        assert!(s.alpha_at(1000).is_err());
        assert!(s.alpha_at(-1001).is_err());
        assert_eq!(s.alpha_prev(-5)?, s.alphas_cumprod[0]);
        assert!(train_timestep(1.5).is_err());
        assert_eq!(train_timestep(801.0)?, 801);
        Ok(())
    }
}
