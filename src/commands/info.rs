//! `altdiff info`: the generation parameters stored in a PNG.

use std::path::Path;

use crate::error::Result;
use crate::metadata::{read_png_text, PARAMETERS_KEY, RECORD_KEY};

/// Prints webui's `parameters` text and altdiff's record of `image` (`--json`: one object with
/// `parameters`, `altdiff` and any other text chunks).
pub fn run(image: &Path, json: bool) -> Result<()> {
    let chunks = read_png_text(image)?;
    if json {
        let mut obj = serde_json::Map::new();
        for (k, v) in &chunks {
            let value = if k == RECORD_KEY {
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))
            } else {
                serde_json::Value::String(v.clone())
            };
            obj.insert(k.clone(), value);
        }
        println!("{}", serde_json::Value::Object(obj));
        return Ok(());
    }
    if chunks.is_empty() {
        println!("{}: no generation parameters stored", image.display());
        return Ok(());
    }
    if let Some((_, p)) = chunks.iter().find(|(k, _)| k == PARAMETERS_KEY) {
        println!("{p}");
    }
    if let Some((_, r)) = chunks.iter().find(|(k, _)| k == RECORD_KEY) {
        let pretty = serde_json::from_str::<serde_json::Value>(r)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| r.clone());
        println!("\n{RECORD_KEY}:\n{pretty}");
    }
    for (k, v) in chunks
        .iter()
        .filter(|(k, _)| k != PARAMETERS_KEY && k != RECORD_KEY)
    {
        println!("\n{k}:\n{v}");
    }
    Ok(())
}
