//! `altdiff languages`: the languages of AltDiffusion m9 and m18, as a table or as JSON.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::lang::{Language, ModelLanguages, LANGUAGES};
use crate::options::ModelChoice;
use crate::source::{ModelSource, Scope};
use crate::term::display_width;

/// The languages of `--model M`: `m9`, `m18` or the BAAI repository names decide without any
/// file; a model directory or another hub repository is asked through its text encoder config.
/// Anything else is a usage error listing what is accepted.
pub fn model_languages(model: &str, progress: bool) -> Result<ModelLanguages> {
    let path = std::path::Path::new(model);
    if !path.exists() {
        if let Ok(m) = model.parse::<ModelLanguages>() {
            return Ok(m);
        }
    }
    let source = match ModelSource::parse(Some(model), None) {
        Ok(ModelSource::Local(p)) if !p.is_dir() => None,
        Ok(s) => Some(s),
        Err(_) => None,
    }
    .ok_or_else(|| {
        Error::usage(format!(
            "--model {model}: not a model name (m9, m18), a model directory or a hub repository (org/name)"
        ))
    })?;
    let choice = ModelChoice {
        source,
        variant: None,
    };
    let fetched = super::fetch_model(&choice, Scope::Config, progress)?;
    let config = fetched.root.join("text_encoder/config.json");
    if !config.is_file() {
        return Err(Error::Model {
            path: fetched.root,
            message: "not a model directory in diffusers layout (no text_encoder/config.json)"
                .into(),
        });
    }
    let cfg = crate::config::TextEncoderConfig::load(&config)?;
    Ok(ModelLanguages::from_text_encoder(&cfg))
}

/// Prints the language table to stdout: code, English name, native name, m9, m18. With `model`,
/// only that model's languages. With `json`, a JSON array of
/// `{"code", "english", "native", "m9", "m18"}` objects on one line instead.
///
/// A closed stdout (`altdiff languages | head -3`) is not an error.
pub fn run(model: Option<ModelLanguages>, json: bool) -> Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match write(&mut out, model, json).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::Io {
            path: PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Writes what [`run`] prints to `out`.
pub fn write(out: &mut impl Write, model: Option<ModelLanguages>, json: bool) -> io::Result<()> {
    let rows: Vec<&'static Language> = LANGUAGES
        .iter()
        .filter(|l| model.is_none_or(|m| m.supports(l)))
        .collect();
    if json {
        let array: Vec<serde_json::Value> = rows
            .iter()
            .map(|l| {
                serde_json::json!({
                    "code": l.code,
                    "english": l.english,
                    "native": l.native,
                    "m9": l.m9,
                    "m18": l.m18,
                })
            })
            .collect();
        // One line, as every `--json` output of altdiff (schedulers, info, generate, tokenize).
        return writeln!(out, "{}", serde_json::Value::Array(array));
    }
    let header = ["code", "English", "native", "m9", "m18"];
    let yes_no = |b: bool| if b { "yes" } else { "-" };
    let table: Vec<[&str; 5]> = rows
        .iter()
        .map(|l| [l.code, l.english, l.native, yes_no(l.m9), yes_no(l.m18)])
        .collect();
    let mut widths = header.map(display_width);
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(cell));
        }
    }
    for row in std::iter::once(&header).chain(&table) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(w - display_width(cell) + 2));
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(model: Option<ModelLanguages>, json: bool) -> String {
        let mut buf = Vec::new();
        write(&mut buf, model, json).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn table_has_a_header_and_every_language() {
        let text = output(None, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 19);
        assert!(lines[0].starts_with("code"));
        assert!(lines[0].ends_with("m18"));
        assert!(text.contains("中文"));
        let fr = lines.iter().find(|l| l.starts_with("fr ")).unwrap();
        assert!(fr.contains("French") && fr.contains("Français"));
        assert_eq!(
            fr.split_whitespace().rev().take(2).collect::<Vec<_>>(),
            ["yes", "yes"]
        );
        let th = lines.iter().find(|l| l.starts_with("th ")).unwrap();
        assert_eq!(
            th.split_whitespace().rev().take(2).collect::<Vec<_>>(),
            ["yes", "-"]
        );
        // Columns line up: the m9 column starts at the same terminal column on every line.
        let col = |l: &str| display_width(&l[..l.rfind("  ").unwrap()]);
        assert!(lines.iter().all(|l| col(l) == col(lines[0])), "{text}");
    }

    #[test]
    fn model_filters() {
        assert_eq!(output(Some(ModelLanguages::M9), false).lines().count(), 10);
        assert_eq!(output(Some(ModelLanguages::M18), false).lines().count(), 19);
        assert!(!output(Some(ModelLanguages::M9), false).contains("Thai"));
    }

    #[test]
    fn json_is_an_array_of_objects() {
        let v: serde_json::Value = serde_json::from_str(&output(None, true)).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 18);
        assert_eq!(a[1]["code"], "zh");
        assert_eq!(a[1]["native"], "中文");
        assert_eq!(a[1]["m9"], true);
        let v: serde_json::Value =
            serde_json::from_str(&output(Some(ModelLanguages::M9), true)).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 9);
        assert!(v.as_array().unwrap().iter().all(|l| l["m9"] == true));
    }
}
