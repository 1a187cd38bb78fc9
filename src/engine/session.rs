//! A loaded model and the generation of one group of jobs, as every front end drives it: the
//! `generate` command (flags and batch files) writes the images it gets back to files, `serve`
//! sends them over HTTP. Owns loading (fetching the model, the pipeline on its device), each job's
//! language, each group's seeded noise, the pipeline call and each image's metadata record; knows
//! nothing of files, names or terminals.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::engine::plan::{Group, Job};
use crate::error::Result;
use crate::lang::{self, LangDecision, ModelLanguages};
use crate::metadata::{ImageRecord, InitRecord, ModelRecord, NoiseRecord};
use crate::model::ModelFiles;
use crate::noise::{NoiseStreams, Segment};
use crate::options::{LoadPolicy, ModelChoice};
use crate::pipeline::{Init, Noise, Pipeline, Progress, Request, Resolved, RgbImage};
use crate::source::ModelIdentity;

/// A model loaded on its device, with what every image's record says about it.
pub struct Session {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Where the model came from (local directory or hub repository and commit).
    pub identity: ModelIdentity,
    /// The languages the model was trained on.
    pub model_langs: ModelLanguages,
    /// The model's `scheduler_config.json`, as each record stores it.
    pub scheduler_config: serde_json::Value,
    /// Compute precision.
    pub dtype: DType,
    /// The weight variant.
    pub variant: Option<String>,
    /// Seconds spent loading at start-up.
    pub load_s: f64,
}

/// The files of a model, fetched but not loaded (so that what is left to check can be checked
/// before the weights are read).
pub struct Fetched {
    /// The model's files.
    pub files: ModelFiles,
    /// Where they came from.
    pub identity: ModelIdentity,
}

impl Fetched {
    /// Finds (and on the hub, downloads) the model's files.
    pub fn fetch(model: &ModelChoice, progress: bool) -> Result<Self> {
        let fetched =
            crate::commands::fetch_model(model, crate::source::Scope::Generation, progress)?;
        let files = ModelFiles::from_dir(&fetched.root, model.variant.as_deref())?;
        Ok(Self {
            files,
            identity: fetched.identity,
        })
    }

    /// Loads the pipeline on `device` in `dtype`.
    pub fn load(
        self,
        device: &Device,
        dtype: DType,
        policy: LoadPolicy,
        variant: Option<String>,
    ) -> Result<Session> {
        let started = Instant::now();
        let pipeline = Pipeline::load(&self.files, device, dtype, policy)?;
        let scheduler_config =
            crate::config::read_json::<serde_json::Value>(&self.files.scheduler_config)?.0;
        Ok(Session {
            model_langs: ModelLanguages::from_text_encoder(&pipeline.config().text_encoder),
            pipeline,
            identity: self.identity,
            scheduler_config,
            dtype,
            variant,
            load_s: started.elapsed().as_secs_f64(),
        })
    }
}

/// One image of a group: which job and which of its images, the pixels and the record.
pub struct Made {
    /// Position of the job in the group.
    pub job: usize,
    /// Which of the job's images.
    pub image: usize,
    /// The pixels.
    pub rgb: RgbImage,
    /// The metadata.
    pub record: ImageRecord,
}

/// What generating a group gave.
pub struct GroupOutput {
    /// Every image, jobs in order, a job's images adjacent.
    pub made: Vec<Made>,
    /// Prompts that were cut, as (job position, dropped text).
    pub truncated: Vec<(usize, String)>,
    /// The settings used.
    pub resolved: Resolved,
    /// `--dump-tensors`' intermediates, when asked for.
    pub tensors: Vec<(String, Tensor)>,
}

impl Session {
    /// The language of each job (given or detected) with its warnings.
    pub fn languages(&self, jobs: &[Job]) -> Vec<LangDecision> {
        jobs.iter()
            .map(|j| lang::check(j.lang, &j.prompt, self.model_langs))
            .collect()
    }

    /// The settings a group resolves to (size, scheduler, token length), before anything runs.
    pub fn resolve(&self, job: &Job, init: Option<&Init>) -> Result<Resolved> {
        self.pipeline.resolve(&Request {
            prompts: vec![job.prompt.clone()],
            sampling: job.sampling.clone(),
            noise: Noise::seeded(0, 1),
            keep_tensors: false,
            init: init.cloned(),
        })
    }

    /// The noise of a group from its jobs' seeds and each image's record of it: one generator over
    /// the whole group when it shares a seed (diffusers' batch), else one per job; with
    /// `per_image_seeds` one per image, seeded seed + i.
    pub fn seeded_noise(group: &Group, per_image_seeds: bool) -> (Noise, Vec<NoiseRecord>) {
        let total: usize = group.jobs.iter().map(|j| j.sampling.num_images).sum();
        let calls: Vec<(u64, usize)> = if group.shared_seed && !per_image_seeds {
            vec![(group.jobs[0].seed, total)]
        } else {
            group
                .jobs
                .iter()
                .map(|j| (j.seed, j.sampling.num_images))
                .collect()
        };
        let mut segments = Vec::new();
        let mut records = Vec::new();
        for (seed, n) in calls {
            if per_image_seeds {
                for i in 0..n {
                    let s = seed.wrapping_add(i as u64);
                    segments.push(Segment::whole(s, 1));
                    records.push(NoiseRecord::Seed {
                        seed: s,
                        batch: 1,
                        index: 0,
                    });
                }
            } else {
                segments.push(Segment::whole(seed, n));
                records.extend((0..n).map(|index| NoiseRecord::Seed {
                    seed,
                    batch: n,
                    index,
                }));
            }
        }
        let noise = Noise {
            latents: None,
            generators: NoiseStreams::new(segments),
        };
        (noise, records)
    }

    /// The record of image `noise` of `job`.
    pub fn record(
        &self,
        job: &Job,
        r: &Resolved,
        noise: NoiseRecord,
        lang: Option<&str>,
        init: Option<&InitRecord>,
    ) -> ImageRecord {
        let (source, revision, commit) = match &self.identity {
            ModelIdentity::Local(p) => (p.display().to_string(), None, None),
            ModelIdentity::Hub {
                repo,
                revision,
                commit,
            } => (repo.clone(), Some(revision.clone()), Some(commit.clone())),
        };
        ImageRecord {
            altdiff: env!("CARGO_PKG_VERSION").to_string(),
            prompt: job.prompt.clone(),
            negative_prompt: job.sampling.negative_prompt.clone(),
            lang: lang.map(str::to_string),
            noise,
            steps: job.sampling.steps,
            guidance: job.sampling.guidance,
            scheduler: r.scheduler.name().to_string(),
            scheduler_config: {
                let mut c = self.scheduler_config.clone();
                job.sampling.schedule.apply_json(&mut c);
                c
            },
            eta: Some(job.sampling.schedule.eta).filter(|e| *e > 0.0),
            karras: job.sampling.schedule.karras,
            timestep_spacing: job
                .sampling
                .schedule
                .timestep_spacing
                .map(|s| s.name().to_string()),
            width: r.width,
            height: r.height,
            max_length: r.max_length,
            model: ModelRecord {
                source,
                revision,
                commit,
                variant: self.variant.clone(),
            },
            dtype: format!("{:?}", self.dtype).to_lowercase(),
            init: init.cloned(),
            prompt_syntax: job.sampling.prompt_syntax,
        }
    }

    /// Generates a group's images: its jobs share their settings (`jobs[0].sampling`); `langs`
    /// are their language codes (`und` for none), `records` each image's noise record.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        jobs: &[Job],
        langs: &[&str],
        noise: Noise,
        records: &[NoiseRecord],
        init: Option<(Init, InitRecord)>,
        keep_tensors: bool,
        progress: &mut dyn Progress,
    ) -> Result<GroupOutput> {
        let (init, init_record) = match init {
            Some((i, r)) => (Some(i), Some(r)),
            None => (None, None),
        };
        let request = Request {
            prompts: jobs.iter().map(|j| j.prompt.clone()).collect(),
            sampling: jobs[0].sampling.clone(),
            noise,
            keep_tensors,
            init,
        };
        let out = self.pipeline.generate(&request, progress)?;
        let mut made = Vec::with_capacity(out.images.len());
        let mut images = out.images.into_iter();
        let mut k = 0;
        for (j, (job, code)) in jobs.iter().zip(langs).enumerate() {
            for i in 0..job.sampling.num_images {
                let Some(rgb) = images.next() else { break };
                let record = self.record(
                    job,
                    &out.resolved,
                    records[k].clone(),
                    Some(*code).filter(|c| *c != "und"),
                    init_record.as_ref(),
                );
                k += 1;
                made.push(Made {
                    job: j,
                    image: i,
                    rgb,
                    record,
                });
            }
        }
        Ok(GroupOutput {
            made,
            truncated: out.truncated,
            resolved: out.resolved,
            tensors: out.tensors,
        })
    }
}
