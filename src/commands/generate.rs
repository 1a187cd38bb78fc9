//! `altdiff generate`: options -> model -> pipeline request -> images on disk (and tensors on request).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::model::ModelFiles;
use crate::options::{GenerateOptions, OutputTarget};
use crate::pipeline::{Noise, Pipeline, Progress, Request};

/// Reports progress as log lines.
struct LogProgress;

impl Progress for LogProgress {
    fn stage(&mut self, name: &str) {
        tracing::info!("{name}");
    }
    fn step(&mut self, done: usize, total: usize) {
        tracing::debug!("step {done}/{total}");
    }
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

fn random_seed() -> u64 {
    // Seeds are 32-bit in practice (PyTorch's mt19937 uses the low 32 bits).
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0xffff_ffff
}

/// Runs `altdiff generate`; returns the paths written.
pub fn run(opts: &GenerateOptions, progress: bool) -> Result<Vec<PathBuf>> {
    let device = crate::device::open(opts.device)?;
    let dtype = crate::device::dtype(opts.dtype, &device)?;
    let fetched = super::fetch_model(&opts.model, crate::source::Scope::Generation, progress)?;
    let files = ModelFiles::from_dir(&fetched.root, opts.model.variant.as_deref())?;
    let noise = match (&opts.latents, opts.seed) {
        (Some(path), _) => Noise::Latents(read_latents(path)?),
        (None, Some(seed)) => Noise::Seed(seed),
        (None, None) => {
            let seed = random_seed();
            eprintln!("seed: {seed}");
            Noise::Seed(seed)
        }
    };
    let seed = match noise {
        Noise::Seed(s) => Some(s),
        Noise::Latents(_) => None,
    };
    tracing::info!(
        "loading {} on {:?} in {:?}",
        fetched.identity,
        device,
        dtype
    );
    let pipeline = Pipeline::load(&files, &device, dtype)?;
    let request = Request {
        prompts: opts.prompts.clone(),
        sampling: opts.sampling.clone(),
        noise,
        keep_tensors: opts.dump_tensors.is_some(),
    };
    let out = pipeline.generate(&request, &mut LogProgress)?;
    for (i, dropped) in &out.truncated {
        tracing::warn!(
            "prompt {} is longer than {} tokens; dropped: \"{dropped}\"",
            i + 1,
            out.resolved.max_length
        );
    }

    let mut written = Vec::with_capacity(out.images.len());
    let model_name = fetched.identity.to_string();
    for (k, img) in out.images.iter().enumerate() {
        let prompt = &opts.prompts[k / opts.sampling.num_images];
        let mut params = prompt.clone();
        if let Some(neg) = &opts.sampling.negative_prompt {
            params.push_str(&format!("\nNegative prompt: {neg}"));
        }
        params.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Max length: {}",
            opts.sampling.steps,
            out.resolved.scheduler.name(),
            opts.sampling.guidance,
            seed.map_or_else(|| "latents file".into(), |s| s.to_string()),
            img.width,
            img.height,
            model_name,
            out.resolved.max_length
        ));
        let bytes = crate::output::encode_png(img, &[("parameters", &params)])?;
        let target = match &opts.output {
            OutputTarget::File(p) => p.clone(),
            OutputTarget::Dir(d) => {
                let seed_part = seed.map_or_else(|| "latents".into(), |s| s.to_string());
                d.join(format!(
                    "{k:05}-{seed_part}-{}.png",
                    crate::output::slug(prompt, 48)
                ))
            }
        };
        let path = crate::output::write_new_file(&target, &bytes)?;
        if path != target {
            tracing::warn!(
                "{} exists; wrote {} instead",
                target.display(),
                path.display()
            );
        }
        println!("{}", path.display());
        written.push(path);
    }

    if let Some(dump) = &opts.dump_tensors {
        let map: HashMap<String, Tensor> = out
            .tensors
            .into_iter()
            .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()
            .context(|| "collecting the tensors to dump".into())?;
        let tmp = dump.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&map, &tmp)
            .context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dump).map_err(|source| Error::Io {
            path: dump.clone(),
            source,
        })?;
    }
    Ok(written)
}
