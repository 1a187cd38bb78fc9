//! `altdiff info`: the generation parameters stored in PNGs (altdiff's record, webui's
//! `parameters` text and any other text chunks).
//!
//! Exit codes, for scripts that sort images: 0 when every file has parameters, 1 when one has
//! none (said on stderr), 2 when one cannot be read as a PNG (the others are still shown).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::metadata::{read_png_text, PARAMETERS_KEY, RECORD_KEY};
use crate::term;

/// Whether a file had generation parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// altdiff's record or webui's `parameters` text.
    Parameters,
    /// Neither (it may have other text chunks).
    Nothing,
}

/// Prints what each of `images` stores: webui's `parameters` text and altdiff's record, or with
/// `json` one JSON object per file and line (`path`, `parameters`, `altdiff` as an object, any
/// other text chunks as strings). With several files each text block starts with `==> path <==`.
///
/// `Ok(Found::Nothing)` when some file has no parameters; an unreadable file is an error (after
/// the others are printed, when there are several).
pub fn run(images: &[PathBuf], json: bool) -> Result<Found> {
    let mut found = Found::Parameters;
    let mut unreadable = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let chunks = match read_png_text(image) {
            Ok(c) => c,
            Err(e) if images.len() == 1 => return Err(e),
            Err(e) => {
                term::err_line(&format!("error: {e}"));
                unreadable.push(image.display().to_string());
                continue;
            }
        };
        let has_parameters = chunks
            .iter()
            .any(|(k, _)| k == RECORD_KEY || k == PARAMETERS_KEY);
        if !has_parameters {
            found = Found::Nothing;
            term::err_line(&format!(
                "{}: no generation parameters stored (neither altdiff's record nor webui's `parameters` text)",
                image.display()
            ));
            if !json {
                continue;
            }
        }
        let text = if json {
            to_json(image, &chunks).to_string()
        } else {
            let heading = if images.len() > 1 {
                format!(
                    "{}==> {} <==\n",
                    if i > 0 { "\n" } else { "" },
                    image.display()
                )
            } else {
                String::new()
            };
            heading + &to_text(&chunks)
        };
        term::out_line(&text).map_err(|source| Error::Io {
            path: PathBuf::from("<stdout>"),
            source,
        })?;
    }
    if !unreadable.is_empty() {
        return Err(Error::usage(format!(
            "{} of {} files could not be read: {}",
            unreadable.len(),
            images.len(),
            unreadable.join(", ")
        )));
    }
    Ok(found)
}

/// One JSON object: the path, then every text chunk (altdiff's record parsed).
fn to_json(image: &Path, chunks: &[(String, String)]) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for (k, v) in chunks {
        let value = if k == RECORD_KEY {
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))
        } else {
            serde_json::Value::String(v.clone())
        };
        obj.insert(k.clone(), value);
    }
    obj.insert("path".into(), image.display().to_string().into());
    serde_json::Value::Object(obj)
}

/// For a PNG with webui's text and no altdiff record: how `--from-image` reads it, as the flags
/// it amounts to, and what it cannot honour (or why it cannot be read).
fn webui_reading(chunks: &[(String, String)]) -> Option<String> {
    if chunks.iter().any(|(k, _)| k == RECORD_KEY) {
        return None;
    }
    let (_, text) = chunks.iter().find(|(k, _)| k == PARAMETERS_KEY)?;
    let info = crate::metadata::infotext::parse(text);
    let imported = match crate::metadata::webui::import(&info, Path::new("the image")) {
        Ok(i) => i,
        Err(e) => return Some(format!("altdiff --from-image: cannot regenerate it: {e}")),
    };
    let r = &imported.record;
    let mut flags = format!(
        "--prompt-syntax {} --scheduler {} --steps {} --guidance {} --width {} --height {}",
        r.prompt_syntax.name(),
        r.scheduler,
        r.steps,
        r.guidance,
        r.width,
        r.height
    );
    if let Some(seed) = r.seed() {
        flags.push_str(&format!(" --seed {seed}"));
    }
    if r.karras {
        flags.push_str(" --karras");
    }
    if let Some(s) = &r.timestep_spacing {
        flags.push_str(&format!(" --timestep-spacing {s}"));
    }
    if let Some(e) = r.eta {
        flags.push_str(&format!(" --eta {e}"));
    }
    if let Some(s) = imported.strength {
        flags.push_str(&format!(" (--strength {s} with --init-image)"));
    }
    let mut out = format!("altdiff --from-image reads: {flags}");
    for w in &imported.warnings {
        out.push_str(&format!("\n  note: {w}"));
    }
    Some(out)
}

/// webui's text, then altdiff's record pretty-printed, then the other chunks, each under its key.
fn to_text(chunks: &[(String, String)]) -> String {
    let mut blocks = Vec::new();
    if let Some((_, p)) = chunks.iter().find(|(k, _)| k == PARAMETERS_KEY) {
        blocks.push(p.clone());
    }
    if let Some(line) = webui_reading(chunks) {
        blocks.push(line);
    }
    if let Some((_, r)) = chunks.iter().find(|(k, _)| k == RECORD_KEY) {
        let pretty = serde_json::from_str::<serde_json::Value>(r)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| r.clone());
        blocks.push(format!("{RECORD_KEY}:\n{pretty}"));
    }
    for (k, v) in chunks
        .iter()
        .filter(|(k, _)| k != PARAMETERS_KEY && k != RECORD_KEY)
    {
        blocks.push(format!("{k}:\n{v}"));
    }
    blocks.join("\n\n")
}
