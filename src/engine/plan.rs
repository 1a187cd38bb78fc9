//! Planning a generation run: every prompt (from flags, a batch file or an image's metadata) becomes
//! a [`Job`] with its settings, seed, language and output name, or a [`Failure`] naming its line;
//! consecutive jobs with the same settings are grouped into pipeline requests ([`group`]).
//!
//! Pure: no model, no terminal. Seeds follow diffusers: prompts given with `--prompt` (and no shard)
//! are one diffusers batch, one `torch.randn` over all images from `--seed`, as diffusers does with a
//! list of prompts; batch-file prompts are independent jobs: line i (global position) uses its own
//! `seed`, else `--seed + i`, so a shard or a resumed run draws exactly the noise the whole batch
//! would have.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::batch;
use crate::error::{Error, Result};
use crate::lang;
use crate::options::{GenerateOptions, InitSpec, Sampling, SeedChoice, DEFAULT_STRENGTH};
use crate::schedulers::SchedulerKind;
use crate::text::PromptSyntax;

/// One prompt to generate.
#[derive(Debug, Clone)]
pub struct Job {
    /// Global position among all prompts (flags first, then file entries, failed ones included).
    pub(crate) index: usize,
    /// Line in the prompt file.
    pub(crate) line: Option<usize>,
    pub(crate) prompt: String,
    pub(crate) sampling: Sampling,
    pub(crate) seed: u64,
    pub(crate) lang: Option<&'static lang::Language>,
    /// A batch line's output file, relative to the output directory (checked to stay inside it).
    pub(crate) output: Option<PathBuf>,
}

/// A prompt that could not be generated.
pub(crate) struct Failure {
    pub(crate) index: usize,
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn describe(&self) -> String {
        match self.line {
            Some(l) => format!("line {l}: {}", self.message),
            None => format!("prompt {}: {}", self.index + 1, self.message),
        }
    }
}

/// A random seed for a run without `--seed` (and a webui request's `seed: -1`).
pub(crate) fn random_seed() -> u64 {
    // Seeds are 32-bit in practice (PyTorch's mt19937 uses the low 32 bits).
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0xffff_ffff
}

fn read_prompt_file(path: &Path) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::input("--prompt-file", path, &e);
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(io)?;
        Ok(buf)
    } else if path.is_dir() {
        Err(io(std::io::ErrorKind::IsADirectory.into()))
    } else {
        std::fs::read(path).map_err(io)
    }
}

/// A batch line's init image or mask path: relative ones are taken from `dir` (the batch file's
/// directory).
fn line_path(dir: Option<&Path>, p: &str) -> PathBuf {
    match dir {
        Some(d) if Path::new(p).is_relative() => d.join(p),
        _ => PathBuf::from(p),
    }
}

/// A batch line's image-to-image input: its own `init_image` (with its `mask` and `strength`,
/// else the command line's `--strength`), else the command line's `--init-image` with the line's
/// `strength` and `mask` if it gives them.
fn line_init(
    base: Option<&InitSpec>,
    o: &batch::Overrides,
    dir: Option<&Path>,
    default_strength: Option<f64>,
) -> std::result::Result<Option<InitSpec>, String> {
    let mask = o.mask.as_deref().map(|m| line_path(dir, m));
    match (&o.init_image, base) {
        (Some(image), _) => Ok(Some(InitSpec {
            image: line_path(dir, image),
            mask,
            strength: o.strength.or(default_strength).unwrap_or(DEFAULT_STRENGTH),
        })),
        (None, Some(b)) => Ok(Some(InitSpec {
            image: b.image.clone(),
            mask: mask.or_else(|| b.mask.clone()),
            strength: o.strength.unwrap_or(b.strength),
        })),
        (None, None) if o.mask.is_some() || o.strength.is_some() => Err(
            "`mask` and `strength` need an init image (`init_image` on the line or --init-image)"
                .to_string(),
        ),
        (None, None) => Ok(None),
    }
}

/// Applies a batch line's overrides to the command line's settings.
fn apply_overrides(
    base: &Sampling,
    o: &batch::Overrides,
    dir: Option<&Path>,
    default_strength: Option<f64>,
) -> std::result::Result<Sampling, String> {
    let scheduler = match &o.scheduler {
        None => base.scheduler,
        Some(name) => Some(SchedulerKind::parse(name).ok_or_else(|| {
            format!(
                "scheduler `{name}` is not supported (expected one of: {})",
                SchedulerKind::names()
            )
        })?),
    };
    let s = Sampling {
        negative_prompt: o
            .negative_prompt
            .clone()
            .or_else(|| base.negative_prompt.clone()),
        steps: o.steps.unwrap_or(base.steps),
        guidance: o.guidance.unwrap_or(base.guidance),
        scheduler,
        height: o.height.or(base.height),
        width: o.width.or(base.width),
        num_images: o.num_images.unwrap_or(base.num_images),
        max_length: base.max_length,
        schedule: base.schedule,
        init: line_init(base.init.as_ref(), o, dir, default_strength)?,
        prompt_syntax: base.prompt_syntax,
    };
    s.validate().map_err(|e| e.to_string())?;
    Ok(s)
}

/// Every prompt of a run, seeded, with the failures found while reading them.
pub(crate) struct Plan {
    /// The prompts to generate, in order.
    pub(crate) jobs: Vec<Job>,
    /// The batch-file lines that could not become jobs.
    pub(crate) failures: Vec<Failure>,
    /// `--seed`, or the seed it stands for (the image's with `--from-image`, 0 with `--latents`, a
    /// random one otherwise).
    pub(crate) base_seed: u64,
    /// Whether `base_seed` was picked at random (and so is reported).
    pub(crate) report_seed: bool,
    /// Whether the prompts are one diffusers batch with one generator (`--prompt`, no shard).
    pub(crate) shared_seed: bool,
}

/// Reads every prompt of the run (flags first, then the batch file) and gives each its seed.
pub(crate) fn plan(
    opts: &GenerateOptions,
    default_lang: Option<&'static lang::Language>,
) -> Result<Plan> {
    let (base_seed, report_seed) = match (opts.seed, &opts.from_image, &opts.latents) {
        (SeedChoice::Value(s), _, _) => (s, false),
        (SeedChoice::Random, _, _) | (SeedChoice::Unset, None, None) => (random_seed(), true),
        (SeedChoice::Unset, Some(rec), _) => (rec.seed().unwrap_or(0), false),
        (SeedChoice::Unset, None, Some(_)) => (0, false),
    };
    let mut jobs = Vec::new();
    let mut failures = Vec::new();
    for (i, p) in opts.prompts.iter().enumerate() {
        jobs.push(Job {
            index: i,
            line: None,
            prompt: p.clone(),
            sampling: opts.sampling.clone(),
            seed: base_seed.wrapping_add(i as u64),
            lang: default_lang,
            output: None,
        });
    }
    if let Some(file) = &opts.prompt_file {
        let bytes = read_prompt_file(file)?;
        let entries = batch::parse(&bytes);
        // Where a line's relative init_image / mask paths start (stdin: the current directory).
        let dir = (file != Path::new("-")).then(|| file.parent().unwrap_or(Path::new("")));
        if entries.is_empty() {
            return Err(Error::usage(format!(
                "--prompt-file {}: no prompts in it",
                file.display()
            )));
        }
        for (k, entry) in entries.into_iter().enumerate() {
            let index = opts.prompts.len() + k;
            let job = entry.map_err(|e| (e.line, e.message)).and_then(|j| {
                crate::options::check_prompt(&j.prompt).map_err(|m| (j.line, m))?;
                if let Some(neg) = j
                    .overrides
                    .negative_prompt
                    .as_deref()
                    .filter(|n| !n.trim().is_empty())
                {
                    crate::options::check_prompt(neg)
                        .map_err(|m| (j.line, format!("negative prompt: {m}")))?;
                }
                let mut sampling =
                    apply_overrides(&opts.sampling, &j.overrides, dir, opts.strength)
                        .map_err(|m| (j.line, m))?;
                sampling.prompt_syntax = match &j.overrides.prompt_syntax {
                    Some(name) => PromptSyntax::parse(name).ok_or_else(|| {
                        (
                            j.line,
                            format!("prompt_syntax `{name}` is not one of: plain, webui"),
                        )
                    })?,
                    None if j.webui_line && !opts.prompt_syntax_given => PromptSyntax::Webui,
                    None => opts.sampling.prompt_syntax,
                };
                if sampling.prompt_syntax == PromptSyntax::Webui {
                    let negative = sampling.negative_prompt.iter();
                    for text in std::iter::once(&j.prompt).chain(negative) {
                        crate::text::webui::check(text).map_err(|m| (j.line, m))?;
                    }
                }
                let output = j
                    .overrides
                    .output
                    .as_deref()
                    .map(crate::output::batch_output_name)
                    .transpose()
                    .map_err(|m| (j.line, m))?;
                let lang = match &j.overrides.lang {
                    Some(l) => Some(lang::parse(l).map_err(|e| (j.line, e.to_string()))?),
                    None => default_lang,
                };
                Ok(Job {
                    index,
                    line: Some(j.line),
                    prompt: j.prompt,
                    sampling,
                    seed: j
                        .overrides
                        .seed
                        .unwrap_or_else(|| base_seed.wrapping_add(index as u64)),
                    lang,
                    output,
                })
            });
            match job {
                Ok(job) => jobs.push(job),
                Err((line, message)) => failures.push(Failure {
                    index,
                    line: Some(line),
                    message,
                }),
            }
        }
    }
    if let Some(shard) = opts.shard {
        jobs.retain(|j| j.index % shard.count == shard.index);
        failures.retain(|f| f.index % shard.count == shard.index);
    }
    let shared_seed = opts.prompt_file.is_none() && opts.shard.is_none();
    if shared_seed {
        // One generator over the batch; with --per-image-seeds image i of the batch gets seed + i,
        // so a prompt's images start at seed + (images of the prompts before it).
        let mut offset = 0u64;
        for j in &mut jobs {
            j.seed = base_seed.wrapping_add(offset);
            if opts.per_image_seeds {
                offset += j.sampling.num_images as u64;
            }
        }
    }
    Ok(Plan {
        jobs,
        failures,
        base_seed,
        report_seed,
        shared_seed,
    })
}

/// The images of one pipeline request.
pub struct Group {
    pub(crate) jobs: Vec<Job>,
    /// One randn over the whole group (diffusers' layout for a list of prompts).
    pub(crate) shared_seed: bool,
}

/// Consecutive jobs with the same settings, up to `batch_size` prompts each.
pub(crate) fn group(jobs: Vec<Job>, batch_size: usize, shared_seed: bool) -> Vec<Group> {
    if shared_seed {
        return vec![Group { jobs, shared_seed }];
    }
    let mut groups: Vec<Group> = Vec::new();
    for job in jobs {
        match groups.last_mut() {
            Some(g) if g.jobs.len() < batch_size && g.jobs[0].sampling == job.sampling => {
                g.jobs.push(job)
            }
            _ => groups.push(Group {
                jobs: vec![job],
                shared_seed,
            }),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn options(args: &[&str]) -> GenerateOptions {
        let mut argv = vec!["altdiff", "generate", "--model", "/"];
        argv.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(crate::cli::Command::Generate(a)) => a.into_options().expect("valid options"),
            other => panic!("not a generate command: {other:?}"),
        }
    }

    #[test]
    fn prompts_share_one_generator_and_per_image_seeds_count_images() {
        let p = plan(&options(&["-p", "a", "-p", "b", "--seed", "10"]), None).unwrap();
        assert!(p.shared_seed && !p.report_seed);
        assert_eq!(p.jobs.iter().map(|j| j.seed).collect::<Vec<_>>(), [10, 10]);
        let p = plan(
            &options(&[
                "-p",
                "a",
                "-p",
                "b",
                "--seed",
                "10",
                "--num-images",
                "3",
                "--per-image-seeds",
            ]),
            None,
        )
        .unwrap();
        // Image i of the batch has seed 10 + i: prompt b's images start at 13.
        assert_eq!(p.jobs.iter().map(|j| j.seed).collect::<Vec<_>>(), [10, 13]);
        let p = plan(&options(&["-p", "a", "--seed", "-1"]), None).unwrap();
        assert!(p.report_seed);
    }

    #[test]
    fn groups_take_consecutive_jobs_with_equal_settings() {
        let job = |index: usize, steps: usize| Job {
            index,
            line: Some(index + 1),
            prompt: format!("p{index}"),
            sampling: Sampling {
                steps,
                ..Sampling::default()
            },
            seed: index as u64,
            lang: None,
            output: None,
        };
        let jobs = vec![job(0, 5), job(1, 5), job(2, 5), job(3, 7), job(4, 5)];
        let sizes: Vec<Vec<usize>> = group(jobs.clone(), 2, false)
            .iter()
            .map(|g| g.jobs.iter().map(|j| j.index).collect())
            .collect();
        assert_eq!(sizes, [vec![0, 1], vec![2], vec![3], vec![4]]);
        let shared = group(jobs, 2, true);
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].jobs.len(), 5);
    }
}
