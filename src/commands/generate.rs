//! `altdiff generate`: the jobs and groups of `engine::plan` -> the pipeline, with each
//! group's noise -> PNGs with metadata, one path (or JSON line) per image on stdout; progress and
//! timings through [`crate::progress`], every printed line through [`crate::term`].
//!
//! The model loads once per run. A prompt that fails (a broken batch line, an invalid per-line value,
//! a failure while generating, a file that cannot be written) is reported and the others still run;
//! the run then exits with 1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::engine::init::Pictures;
use crate::engine::plan::{group, plan, Failure, Group, Job, Plan};
use crate::engine::session::{Fetched, Session};
use crate::error::{Error, Result, TensorContext};
use crate::lang;
use crate::metadata::{ImageRecord, InitRecord, NoiseRecord};
use crate::noise::{NoiseStreams, Segment};
use crate::options::{GenerateOptions, LoadPolicy, OutputTarget, SeedChoice};
use crate::output::{NameFields, NameTemplate};
use crate::pipeline::{Noise, RgbImage};
use crate::progress::{round3, RunProgress, Spinner};
use crate::term;

/// How a run ended when it got as far as generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every prompt was written (or skipped as existing).
    AllWritten,
    /// Some prompts failed; the others were written.
    SomeFailed,
    /// Ctrl-C stopped the run between steps; the finished images were kept.
    Interrupted,
}

/// Reads the `latents` tensor of a safetensors file.
fn read_latents(path: &Path) -> Result<Tensor> {
    let mut map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::usage(format!(
            "--latents {}: cannot read it as safetensors: {e}",
            path.display()
        ))
    })?;
    let names: Vec<String> = map.keys().cloned().collect();
    let t = map.remove("latents").ok_or_else(|| {
        Error::usage(format!(
            "--latents {}: no tensor named `latents` (found: {})",
            path.display(),
            names.join(", ")
        ))
    })?;
    if t.rank() != 4 {
        return Err(Error::usage(format!(
            "--latents {}: `latents` must be [B, 4, H/8, W/8], found {:?}",
            path.display(),
            t.dims()
        )));
    }
    t.to_dtype(DType::F32)
        .context(|| "reading --latents".into())
}

/// Peak resident memory of this process in bytes (Linux), for the timing summary.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Everything about one run that every group shares.
struct Run<'a> {
    opts: &'a GenerateOptions,
    session: &'a Session,
    template: NameTemplate,
    latents_file: Option<Tensor>,
    /// `--seed` (or the seed it stands for): the first batch-file line's seed, the step noise's
    /// seed with a latents file.
    base_seed: u64,
    /// The timings of the last group, for the summary.
    summary: std::cell::RefCell<Option<serde_json::Value>>,
    /// A random seed to report once the first batch is about to be generated (so it never comes
    /// before an error found while setting the batch up).
    seed_note: std::cell::Cell<Option<u64>>,
    /// The init images and masks read so far.
    pictures: Pictures,
}

impl Run<'_> {
    /// The file for image `image` of `job`.
    fn path(
        &self,
        job: &Job,
        image: usize,
        lang: &str,
        r: &crate::pipeline::Resolved,
        seed: &str,
    ) -> PathBuf {
        match &self.opts.output.target {
            OutputTarget::File(p) => p.clone(),
            OutputTarget::Dir(d) => match &job.output {
                Some(name) if job.sampling.num_images == 1 => d.join(name),
                Some(name) => {
                    let stem = name.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
                    d.join(name.with_file_name(format!("{stem}-{image}.png")))
                }
                None => d.join(self.template.render(&NameFields {
                    index: job.index,
                    image,
                    line: job.line.unwrap_or(0),
                    lang: lang.to_string(),
                    seed: seed.to_string(),
                    slug: crate::output::slug(&job.prompt, 48),
                    steps: job.sampling.steps,
                    scheduler: r.scheduler.name().to_string(),
                    width: r.width,
                    height: r.height,
                })),
            },
        }
    }

    /// Writes image `i` of `job` with its metadata and prints its path (or JSON line) on stdout.
    #[allow(clippy::too_many_arguments)]
    fn write_image(
        &self,
        job: &Job,
        i: usize,
        img: &RgbImage,
        record: &ImageRecord,
        code: &str,
        resolved: &crate::pipeline::Resolved,
        timings: &serde_json::Value,
    ) -> Result<()> {
        let opts = self.opts;
        let seed = record
            .seed()
            .map_or_else(|| "latents".to_string(), |s| s.to_string());
        let target = self.path(job, i, code, resolved, &seed);
        let inside = match (&opts.output.target, &job.output) {
            (OutputTarget::Dir(d), Some(_)) => crate::output::check_inside(d, &target),
            _ => Ok(()),
        };
        let result = inside
            .and_then(|()| record.chunks())
            .and_then(|chunks| {
                let refs: Vec<(&str, &str)> =
                    chunks.iter().map(|(k, v)| (*k, v.as_str())).collect();
                crate::output::encode_png(img, &refs)
            })
            .and_then(|bytes| {
                if opts.output.overwrite {
                    crate::output::write_replacing(&target, &bytes)
                } else {
                    crate::output::write_new_file(&target, &bytes)
                }
            });
        let path = result?;
        if path != target {
            tracing::warn!(
                "{} exists; wrote {} instead",
                target.display(),
                path.display()
            );
        }
        if opts.output.json {
            let line = serde_json::json!({
                "path": path,
                "prompt": job.prompt,
                "negative_prompt": job.sampling.negative_prompt,
                "lang": record.lang,
                "seed": record.seed(),
                "index": job.index,
                "image": i,
                "line": job.line,
                "steps": job.sampling.steps,
                "guidance": job.sampling.guidance,
                "scheduler": record.scheduler,
                "width": record.width,
                "height": record.height,
                "size": format!("{}x{}", record.width, record.height),
                "init_image": record.init.as_ref().map(|i| &i.image),
                "mask": record.init.as_ref().and_then(|i| i.mask.as_ref()),
                "strength": record.init.as_ref().map(|i| i.strength),
                "model": self.session.identity.to_string(),
                "timings": timings,
            });
            term::out_line(&line.to_string())
        } else {
            term::out_line(&path.display().to_string())
        }
        .map_err(|source| Error::Io {
            path: PathBuf::from("<stdout>"),
            source,
        })
    }

    /// The noise of a group (its generators and any given latents) and each image's record of it.
    fn noise(&self, group: &Group, shape: &[usize]) -> Result<(Noise, Vec<NoiseRecord>)> {
        let total_images: usize = group.jobs.iter().map(|j| j.sampling.num_images).sum();
        if let Some(t) = &self.latents_file {
            // diffusers' `latents=` with `generator=` for the step noise.
            let noise = Noise {
                latents: Some(t.clone()),
                generators: NoiseStreams::shared(self.base_seed, total_images),
            };
            return Ok((noise, vec![NoiseRecord::LatentsFile; total_images]));
        }
        if let Some(rec) = &self.opts.from_image {
            if let (NoiseRecord::Seed { seed, batch, index }, SeedChoice::Unset) =
                (&rec.noise, self.opts.seed)
            {
                // The image's own share of every draw of the generator it came from.
                if *batch > 4096 || shape[0] != 1 {
                    return Err(Error::usage(format!(
                        "--from-image: the image's noise record (image {index} of a batch of {batch}) is not valid"
                    )));
                }
                let segment = Segment::slice(*seed, *batch, *index)
                    .map_err(|e| Error::usage(format!("--from-image: {e}")))?;
                let noise = Noise {
                    latents: None,
                    generators: NoiseStreams::new(vec![segment]),
                };
                return Ok((noise, vec![rec.noise.clone()]));
            }
        }
        Ok(Session::seeded_noise(group, self.opts.per_image_seeds))
    }

    /// The seed in image `i` of `job`'s file name (`latents` with a latents file).
    fn name_seed(&self, job: &Job, i: usize) -> String {
        if self.latents_file.is_some() {
            "latents".to_string()
        } else if self.opts.per_image_seeds {
            job.seed.wrapping_add(i as u64).to_string()
        } else {
            job.seed.to_string()
        }
    }
}

/// Runs `altdiff generate`.
pub fn run(opts: &GenerateOptions, progress: bool) -> Result<Outcome> {
    let template = NameTemplate::parse(&opts.output.name_template)?;
    let default_lang = opts.lang.as_deref().map(lang::parse).transpose()?;
    if opts.latents.is_some() && (opts.prompt_file.is_some() || opts.shard.is_some()) {
        return Err(Error::usage(
            "--latents works with --prompt only (one batch), not with --prompt-file or --shard",
        ));
    }
    let Plan {
        jobs,
        mut failures,
        base_seed,
        report_seed,
        shared_seed,
    } = plan(opts, default_lang)?;

    // An output that cannot be written, or a command-line init image or mask that cannot be read,
    // is found now, before the model loads.
    crate::output::check_target(&opts.output.target)?;
    let pictures = Pictures::default();
    if let Some(spec) = &opts.sampling.init {
        let (_, now) = pictures.init(spec)?;
        check_recorded_init(opts, &now);
    }
    let device = crate::device::open(opts.device)?;
    let dtype = crate::device::dtype(opts.dtype, &device)?;
    let fetched = Fetched::fetch(&opts.model, progress)?;
    let latents_file = opts.latents.as_deref().map(read_latents).transpose()?;
    tracing::info!(
        "loading {} on {:?} in {:?}",
        fetched.identity,
        device,
        dtype
    );
    if device.is_cuda() {
        tracing::info!(
            "{}",
            crate::models::attention::describe_cuda_attention(dtype)
        );
    }
    if device.is_cpu() {
        tracing::info!("{}", crate::kernels::describe_cpu_kernels());
        if dtype == DType::F32 {
            if let Some(hint) = crate::kernels::bf16_hint() {
                tracing::info!("{hint}");
            }
        }
    }
    let spinner = Spinner::start(format!("loading {}", fetched.identity));
    let total_jobs = jobs.len();
    // Every prompt of the run: those to generate and those that failed while reading them.
    let total_prompts = total_jobs + failures.len();
    let groups = group(jobs, opts.batch_size, shared_seed);
    let policy = match opts.load_policy {
        LoadPolicy::Auto if groups.len() <= 1 => LoadPolicy::PerStage,
        LoadPolicy::Auto => LoadPolicy::Keep,
        p => p,
    };
    let session = fetched.load(&device, dtype, policy, opts.model.variant.clone());
    drop(spinner);
    let session = session?;
    let run = Run {
        opts,
        session: &session,
        template,
        latents_file,
        base_seed,
        summary: std::cell::RefCell::new(None),
        seed_note: std::cell::Cell::new(report_seed.then_some(base_seed)),
        pictures,
    };

    if opts.dump_tensors.is_some() && groups.len() > 1 {
        return Err(Error::usage(
            "--dump-tensors needs a single batch (use --prompt, not --prompt-file)",
        ));
    }
    let mut bars = RunProgress::new(total_jobs);
    let mut written = 0usize;
    // Images are kept in memory only for a contact sheet.
    let mut grid = opts.output.grid.then(Vec::new);
    let mut skipped = 0usize;
    // Prompts finished (written, skipped or failed), for the summary of an interruption.
    let mut finished = 0usize;
    let mut interrupted = false;
    for group in groups {
        if crate::signals::requested() {
            interrupted = true;
            break;
        }
        let jobs_in_group = group.jobs.len();
        match run_group(
            &run,
            group,
            &mut bars,
            &mut written,
            &mut grid,
            &mut skipped,
        ) {
            Ok(unwritten) => {
                finished += jobs_in_group;
                failures.extend(unwritten.into_iter().map(|(j, e)| Failure {
                    index: j.index,
                    line: j.line,
                    message: e.to_string(),
                }));
            }
            Err(failed) if matches!(failed.1, Error::Interrupted) => {
                interrupted = true;
                break;
            }
            Err(failed) => {
                finished += jobs_in_group;
                let (jobs, e) = *failed;
                // A usage or configuration problem applies to the whole run: stop as before any work.
                if written == 0
                    && failures.is_empty()
                    && e.exit_code() == 2
                    && opts.prompt_file.is_none()
                {
                    return Err(e);
                }
                for j in jobs {
                    failures.push(Failure {
                        index: j.index,
                        line: j.line,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    drop(bars);
    if let Some(t) = run.summary.borrow().as_ref() {
        let get = |k: &str| t.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        tracing::info!(
            "timings (last batch): load {:.2} s, text encoding {:.2} s, UNet step min {:.2} s / median {:.2} s, \
             denoising {:.2} s, VAE decode {:.2} s, total {:.2} s; peak RSS {}",
            get("load_s"),
            get("encode_s"),
            get("unet_step_min_s"),
            get("unet_step_median_s"),
            get("denoise_s"),
            get("decode_s"),
            get("total_s") + session.load_s,
            peak_rss().map_or_else(|| "unknown".to_string(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)),
        );
    }
    if let Some(images) = grid.filter(|g| !g.is_empty()) {
        write_grid(opts, &images)?;
    }
    if skipped > 0 {
        term::note(&format!("skipped {skipped} prompt(s) whose images exist"));
    }
    if interrupted {
        term::err_line(&format!(
            "interrupted: {written} image(s) written, {} of {total_jobs} prompt(s) not done; \
             the image in progress was abandoned. Run the same command with --skip-existing to finish.",
            total_jobs - finished
        ));
        for f in &failures {
            term::err_line(&format!("  failed: {}", f.describe()));
        }
        return Ok(Outcome::Interrupted);
    }
    if failures.is_empty() {
        return Ok(Outcome::AllWritten);
    }
    failures.sort_by_key(|f| f.index);
    term::err_line(&format!(
        "{} of {} prompt(s) failed; the other images were written:",
        failures.len(),
        total_prompts
    ));
    for f in &failures {
        term::err_line(&format!("  {}", f.describe()));
    }
    Ok(Outcome::SomeFailed)
}

/// A group's failure: the jobs it sank and why.
/// Ok: the prompts whose files could not be written (the others were).
type GroupResult = std::result::Result<Vec<(Job, Error)>, Box<(Vec<Job>, Error)>>;

/// Generates one group and writes its images; on failure returns the group's jobs and the error.
fn run_group(
    run: &Run,
    group: Group,
    bars: &mut RunProgress,
    written: &mut usize,
    grid: &mut Option<Vec<RgbImage>>,
    skipped: &mut usize,
) -> GroupResult {
    let opts = run.opts;
    let sampling = group.jobs[0].sampling.clone();
    let (init, init_record) = match sampling.init.as_ref().map(|s| run.pictures.init(s)) {
        None => (None, None),
        Some(Ok((init, record))) => (Some(init), Some(record)),
        Some(Err(e)) => return Err(Box::new((group.jobs, e))),
    };
    let resolved = match run.session.resolve(&group.jobs[0], init.as_ref()) {
        Ok(r) => r,
        Err(e) => return Err(Box::new((group.jobs, e))),
    };
    if let (Some(resized), Some(rec)) = (resolved.resized, &init_record) {
        let to = format!("{}x{}", resolved.width, resolved.height);
        if let Some((w, h)) = resized.image {
            term::note(&format!(
                "init image {}: {w}x{h} resized to {to} (Lanczos, as diffusers does)",
                rec.image
            ));
        }
        if let (Some((w, h)), Some(mask)) = (resized.mask, &rec.mask) {
            term::note(&format!(
                "mask {mask}: {w}x{h} resized to {to}, the image's size (Lanczos, as diffusers does)"
            ));
        }
    }
    // Languages (for names, metadata and warnings) and the files each job would write.
    let mut langs = Vec::new();
    let mut keep = Vec::new();
    // With a shared seed the prompts' noise depends on the whole batch: existing images are not
    // skipped from it (only from writing) unless every one of them exists.
    let mut exists = Vec::new();
    let decisions = run.session.languages(&group.jobs);
    for (job, decision) in group.jobs.into_iter().zip(decisions) {
        for w in &decision.warnings {
            tracing::warn!("{}: {w}", job_name(&job));
        }
        if decision.source == lang::LangSource::Detected {
            tracing::info!("{}: detected language {}", job_name(&job), decision.code());
        }
        let code = decision.code();
        let all_exist = (0..job.sampling.num_images).all(|i| {
            run.path(&job, i, code, &resolved, &run.name_seed(&job, i))
                .exists()
        });
        if opts.output.skip_existing && all_exist && !group.shared_seed {
            *skipped += 1;
            bars.jobs_done(1);
            continue;
        }
        exists.push(opts.output.skip_existing && all_exist);
        langs.push(code);
        keep.push(job);
    }
    if keep.is_empty() {
        return Ok(Vec::new());
    }
    if exists.iter().all(|e| *e) {
        *skipped += keep.len();
        bars.jobs_done(keep.len());
        return Ok(Vec::new());
    }
    let group = Group {
        jobs: keep,
        shared_seed: group.shared_seed,
    };
    let f = run.session.pipeline.vae_scale_factor();
    let images: usize = group.jobs.iter().map(|j| j.sampling.num_images).sum();
    let shape = [
        images,
        run.session.pipeline.config().unet.in_channels,
        resolved.height / f,
        resolved.width / f,
    ];
    let (noise, records) = match run.noise(&group, &shape) {
        Ok(n) => n,
        Err(e) => return Err(Box::new((group.jobs, e))),
    };
    if let Some(seed) = run.seed_note.take() {
        term::note(&format!("seed: {seed}"));
    }
    bars.timings.reset();
    // A group's prompts share `sampling` (and so their number of images).
    let init = init.zip(init_record);
    let out = match run.session.generate(
        &group.jobs,
        &langs,
        noise,
        &records,
        init,
        opts.dump_tensors.is_some(),
        bars,
    ) {
        Ok(o) => o,
        Err(e) => return Err(Box::new((group.jobs, e))),
    };
    bars.timings.close_stage();
    let mut timings = bars.timings.to_json();
    if let Some(t) = timings.as_object_mut() {
        // Start-up loading plus this batch's own component loads (per-stage loading).
        let staged = t.get("load_s").and_then(|v| v.as_f64()).unwrap_or(0.0);
        t.insert("load_s".into(), round3(run.session.load_s + staged));
    }
    *run.summary.borrow_mut() = Some(timings.clone());
    for (p, dropped) in &out.truncated {
        tracing::warn!(
            "{} is longer than {} tokens; dropped: \"{dropped}\"",
            job_name(&group.jobs[*p]),
            out.resolved.max_length
        );
    }
    // A file that cannot be written fails its own prompt; the group's other prompts go on.
    let mut failed: Vec<(Job, Error)> = Vec::new();
    for (j, (job, code)) in group.jobs.iter().zip(&langs).enumerate() {
        if exists[j] {
            *skipped += 1;
            bars.jobs_done(1);
            continue;
        }
        for m in out.made.iter().filter(|m| m.job == j) {
            if let Err(e) = run.write_image(
                job,
                m.image,
                &m.rgb,
                &m.record,
                code,
                &out.resolved,
                &timings,
            ) {
                failed.push((job.clone(), e));
                break;
            }
            *written += 1;
            if let Some(grid) = grid.as_mut() {
                grid.push(m.rgb.clone());
            }
        }
        bars.jobs_done(1);
    }
    if let Some(dump) = &opts.dump_tensors {
        if let Err(e) = dump_tensors(dump, out.tensors) {
            return Err(Box::new((group.jobs, e)));
        }
    }
    Ok(failed)
}

/// `--from-image` of an image-to-image result: a warning when the init image or mask recorded in it
/// is not the file it was made from any more (the result will differ).
fn check_recorded_init(opts: &GenerateOptions, now: &InitRecord) {
    let Some(rec) = opts.from_image.as_ref().and_then(|r| r.init.as_ref()) else {
        return;
    };
    if now.image_sha256 != rec.image_sha256 {
        tracing::warn!(
            "--from-image: the init image {} is not the file the image was made from (SHA-256 {} \
             recorded, {} now); the result will differ",
            now.image,
            rec.image_sha256,
            now.image_sha256
        );
    }
    if let (Some(was), Some(is)) = (&rec.mask_sha256, &now.mask_sha256) {
        if was != is {
            tracing::warn!(
                "--from-image: the mask {} is not the file the image was made from; the result will differ",
                now.mask.as_deref().unwrap_or_default()
            );
        }
    }
}

fn job_name(job: &Job) -> String {
    match job.line {
        Some(l) => format!("line {l}"),
        None => format!("prompt {}", job.index + 1),
    }
}

fn dump_tensors(dump: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()
        .context(|| "collecting the tensors to dump".into())?;
    let tmp = dump.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dump).map_err(|source| Error::Io {
        path: dump.to_path_buf(),
        source,
    })
}

/// A contact sheet of every image written, in a square-ish grid, as `grid.png` beside them.
fn write_grid(opts: &GenerateOptions, images: &[RgbImage]) -> Result<()> {
    let n = images.len();
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let cw = images.iter().map(|i| i.width).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height).max().unwrap_or(0);
    let (w, h) = (cols * cw, rows * ch);
    let mut pixels = vec![0u8; w * h * 3];
    for (k, img) in images.iter().enumerate() {
        let (x0, y0) = ((k % cols) * cw, (k / cols) * ch);
        for y in 0..img.height {
            let src = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
            let start = ((y0 + y) * w + x0) * 3;
            pixels[start..start + src.len()].copy_from_slice(src);
        }
    }
    let grid = RgbImage {
        width: w,
        height: h,
        pixels,
    };
    let dir = match &opts.output.target {
        OutputTarget::Dir(d) => d.clone(),
        OutputTarget::File(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let bytes = crate::output::encode_png(&grid, &[])?;
    let target = dir.join("grid.png");
    let path = if opts.output.overwrite {
        crate::output::write_replacing(&target, &bytes)?
    } else {
        crate::output::write_new_file(&target, &bytes)?
    };
    term::note(&format!("contact sheet: {}", path.display()));
    Ok(())
}
