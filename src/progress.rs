//! Progress of a generation run, as the [`Progress`] the pipeline reports to: bars on a terminal
//! (prompts done, denoising steps; drawn through [`crate::term`] so printed lines stay above them,
//! and cleared when the run ends or fails) and the stage timings of the batch being generated
//! (reported in `--json` lines and by `-v`).
//!
//! Any front end can drive the same [`Timings`]; the bars are the terminal's.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::Progress;

/// Rounds seconds to milliseconds for JSON.
pub fn round3(x: f64) -> serde_json::Value {
    serde_json::json!((x * 1000.0).round() / 1000.0)
}

/// (min, median) of `v`.
fn min_median(v: &[f64]) -> Option<(f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    Some((*v.first()?, v[v.len() / 2]))
}

/// The stage timings of one batch: seconds per stage (`load`, `encode`, `denoise`, `decode`) and
/// per UNet step.
#[derive(Debug)]
pub struct Timings {
    started: Instant,
    current: Option<(String, Instant)>,
    stages: Vec<(String, f64)>,
    step_times: Vec<f64>,
    last_step: Instant,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            current: None,
            stages: Vec::new(),
            step_times: Vec::new(),
            last_step: Instant::now(),
        }
    }
}

impl Timings {
    /// Starts timing a new batch.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Ends the stage in progress.
    pub fn close_stage(&mut self) {
        if let Some((name, t)) = self.current.take() {
            self.stages.push((name, t.elapsed().as_secs_f64()));
        }
    }

    fn stage(&mut self, name: &str) {
        self.close_stage();
        self.current = Some((name.to_string(), Instant::now()));
        self.last_step = Instant::now();
    }

    fn step(&mut self) {
        let now = Instant::now();
        self.step_times.push((now - self.last_step).as_secs_f64());
        self.last_step = now;
    }

    /// The timings so far, in seconds: `encode_s`, `denoise_s`, `decode_s` (and `load_s` for
    /// per-stage loading), `unet_step_min_s`, `unet_step_median_s`, `total_s`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut sums: Vec<(&str, f64)> = Vec::new();
        for (name, t) in &self.stages {
            match sums.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += t,
                None => sums.push((name, *t)),
            }
        }
        for (name, t) in sums {
            out.insert(format!("{name}_s"), round3(t));
        }
        if let Some((min, median)) = min_median(&self.step_times) {
            out.insert("unet_step_min_s".into(), round3(min));
            out.insert("unet_step_median_s".into(), round3(median));
        }
        out.insert(
            "total_s".into(),
            round3(self.started.elapsed().as_secs_f64()),
        );
        serde_json::Value::Object(out)
    }
}

/// The bars of a generation run (none when stderr is not a terminal or with `--quiet`) and the
/// timings of its current batch. Dropping it clears the bars.
pub struct RunProgress {
    prompts: Option<ProgressBar>,
    steps: Option<ProgressBar>,
    /// The current batch's timings.
    pub timings: Timings,
}

impl RunProgress {
    /// Bars for a run of `total_jobs` prompts.
    pub fn new(total_jobs: usize) -> Self {
        let (prompts, steps) = if crate::term::showing_bars() {
            let style = ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bars = crate::term::bars();
            let p = bars.add(
                ProgressBar::new(total_jobs as u64)
                    .with_style(style.clone())
                    .with_prefix("prompts"),
            );
            let s = bars.add(ProgressBar::new(0).with_style(style).with_prefix("steps"));
            (Some(p), Some(s))
        } else {
            (None, None)
        };
        Self {
            prompts,
            steps,
            timings: Timings::default(),
        }
    }

    /// `n` more prompts are finished (written, skipped or failed).
    pub fn jobs_done(&self, n: usize) {
        if let Some(b) = &self.prompts {
            b.inc(n as u64);
        }
    }
}

impl Drop for RunProgress {
    fn drop(&mut self) {
        for b in [&self.prompts, &self.steps].into_iter().flatten() {
            b.finish_and_clear();
            crate::term::bars().remove(b);
        }
    }
}

impl Progress for RunProgress {
    fn cancelled(&self) -> bool {
        crate::signals::requested()
    }

    fn stage(&mut self, name: &str) {
        self.timings.stage(name);
        tracing::debug!("{name}");
    }

    fn step(&mut self, done: usize, total: usize) {
        self.timings.step();
        if let Some(s) = &self.steps {
            s.set_length(total as u64);
            s.set_position(done as u64);
        }
        tracing::debug!("step {done}/{total}");
    }
}

/// A spinner with `message` while something slow runs (loading the model), on the terminal's
/// bars; cleared when dropped.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// Starts spinning (nothing when bars are not shown).
    pub fn start(message: String) -> Self {
        Self(crate::term::showing_bars().then(|| {
            let sp = crate::term::bars().add(ProgressBar::new_spinner().with_message(message));
            sp.enable_steady_tick(std::time::Duration::from_millis(120));
            sp
        }))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(sp) = self.0.take() {
            sp.finish_and_clear();
            crate::term::bars().remove(&sp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_sum_stages_and_take_step_statistics() {
        let mut t = Timings::default();
        t.stage("encode");
        t.stage("denoise");
        for _ in 0..3 {
            t.step();
        }
        t.stage("encode");
        t.close_stage();
        let j = t.to_json();
        for key in [
            "encode_s",
            "denoise_s",
            "unet_step_min_s",
            "unet_step_median_s",
            "total_s",
        ] {
            assert!(j[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {j}");
        }
        assert!(j.get("decode_s").is_none());
        assert_eq!(min_median(&[3.0, 1.0, 2.0]), Some((1.0, 2.0)));
        assert_eq!(min_median(&[]), None);
    }
}
