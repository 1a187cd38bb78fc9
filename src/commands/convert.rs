//! `altdiff convert`: a diffusers-layout copy of a model with safetensors weights (f32, f16 or bf16)
//! and a `tokenizer.json`, which loads faster (memory-mapped weights, no sentencepiece conversion).
//!
//! The copy is assembled in a temporary folder beside the target and renamed into place at the end,
//! so an interrupted conversion never leaves a half-written model; an existing target is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::model::ModelFiles;
use crate::options::{ModelChoice, Precision};
use crate::weights::{load_all, Weights};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `rel` from `src` to `dst` if it exists; returns whether it did.
fn copy_if_present(src: &Path, dst: &Path, rel: &str) -> Result<bool> {
    let from = src.join(rel);
    if !from.is_file() {
        return Ok(false);
    }
    let to = dst.join(rel);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::copy(&from, &to).map_err(io(&to))?;
    Ok(true)
}

/// Reads every tensor of `weights`, cast to `dtype`, and writes them as one safetensors file.
fn convert_weights(weights: &Weights, dtype: DType, out: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = load_all(weights, &Device::Cpu)?
        .into_iter()
        .map(|(k, t)| {
            // Only floating-point tensors change precision (position ids and the like stay integers).
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)
            } else {
                Ok(t)
            };
            t.map(|t| (k, t))
        })
        .collect::<candle_core::Result<_>>()
        .context(|| format!("converting {}", weights.files[0].display()))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    candle_core::safetensors::save(&tensors, out).context(|| format!("writing {}", out.display()))
}

/// Writes `tokenizer/tokenizer.json` into `dst`: copied when the model has one, else built from
/// `sentencepiece.bpe.model` exactly as transformers' converter builds it.
fn write_tokenizer_json(src_tok: &Path, dst_tok: &Path) -> Result<()> {
    let target = dst_tok.join("tokenizer.json");
    if src_tok.join("tokenizer.json").is_file() {
        std::fs::copy(src_tok.join("tokenizer.json"), &target).map_err(io(&target))?;
        return Ok(());
    }
    let sp = crate::sentencepiece::XlmRobertaSentencePiece::load(
        &src_tok.join("sentencepiece.bpe.model"),
    )?;
    let tok = sp.to_tokenizers()?;
    tok.save(&target, true)
        .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", target.display())))
}

/// Converts `model` into the new directory `out`.
pub fn run(
    model: &ModelChoice,
    out: &Path,
    precision: Precision,
    progress: bool,
) -> Result<PathBuf> {
    if out.exists() {
        return Err(Error::usage(format!(
            "--out {} already exists; give a new directory (nothing is overwritten)",
            out.display()
        )));
    }
    let dtype = match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    };
    let fetched = super::fetch_model(model, crate::source::Scope::Generation, progress)?;
    let files = ModelFiles::from_dir(&fetched.root, model.variant.as_deref())?;
    // Validates the configs before spending minutes on weights.
    crate::model::ModelConfig::load(&files)?;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = parent.join(format!(".{name}.altdiff-convert-{}", std::process::id()));
    let result = (|| {
        let src = &fetched.root;
        for rel in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "unet/config.json",
            "vae/config.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer/sentencepiece.bpe.model",
        ] {
            copy_if_present(src, &tmp, rel)?;
        }
        std::fs::create_dir_all(tmp.join("tokenizer")).map_err(io(&tmp))?;
        write_tokenizer_json(&files.tokenizer_dir, &tmp.join("tokenizer"))?;
        for (weights, rel) in [
            (
                &files.text_encoder_weights,
                "text_encoder/model.safetensors",
            ),
            (
                &files.unet_weights,
                "unet/diffusion_pytorch_model.safetensors",
            ),
            (
                &files.vae_weights,
                "vae/diffusion_pytorch_model.safetensors",
            ),
        ] {
            tracing::info!("converting {rel}");
            convert_weights(weights, dtype, &tmp.join(rel))?;
        }
        std::fs::rename(&tmp, out).map_err(io(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    crate::term::note(&format!(
        "converted {} to {}",
        fetched.identity,
        out.display()
    ));
    println!("{}", out.display());
    Ok(out.to_path_buf())
}
