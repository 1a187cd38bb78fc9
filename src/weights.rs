//! Finding and opening a component's weight files, behind one `VarBuilder` factory.
//!
//! `*.safetensors` files are memory-mapped. A component folder may hold one file
//! (`model.safetensors`, `diffusion_pytorch_model.safetensors`) or shards listed in a
//! `*.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result, TensorContext};

/// The weight files of one component folder (`text_encoder/`, `unet/`, `vae/`).
pub fn find_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    // Variant files (`*.fp16.safetensors`) are only used when asked for.
    let is_plain = |n: &str| n.ends_with(".safetensors") && n.matches('.').count() == 1;
    if let Some(index) = names
        .iter()
        .find(|n| n.ends_with(".safetensors.index.json") && n.matches('.').count() == 3)
    {
        return shards_from_index(&dir.join(index));
    }
    let plain: Vec<PathBuf> = names
        .iter()
        .filter(|n| is_plain(n))
        .map(|n| dir.join(n))
        .collect();
    if !plain.is_empty() {
        return Ok(plain);
    }
    let message = if names.iter().any(|n| n.ends_with(".bin")) {
        "holds only PyTorch .bin weights, which this version of altdiff cannot read yet; \
         convert them to .safetensors"
            .to_string()
    } else {
        "no .safetensors weights found".to_string()
    };
    Err(Error::Model {
        path: dir.to_path_buf(),
        message,
    })
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let (value, _): (serde_json::Value, _) = crate::config::read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "weight_map", "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Model {
            path: missing.clone(),
            message: format!("listed in {} but missing", index.display()),
        });
    }
    Ok(files)
}

/// Memory-maps `files` into a `VarBuilder` that yields tensors of `dtype` on `device`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are mapped read-only; like every mmap-based loader we assume they are not
    // truncated or rewritten while altdiff runs.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.context(|| {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        format!("cannot read weights {}", names.join(", "))
    })
}
