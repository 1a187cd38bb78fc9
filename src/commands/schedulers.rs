//! `altdiff schedulers`: the schedulers `--scheduler` accepts, one line each, or as JSON.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;

/// Prints `name  diffusers class  webui name  summary` per scheduler, or with `json` a JSON array
/// of `{"name", "class", "webui", "summary"}` objects. A closed stdout is not an error.
pub fn run(json: bool) -> Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match write(&mut out, json).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::Io {
            path: PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Writes what [`run`] prints to `out`.
pub fn write(out: &mut impl Write, json: bool) -> io::Result<()> {
    if json {
        let rows: Vec<serde_json::Value> = SchedulerKind::ALL
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": k.name(),
                    "class": k.class_name(),
                    "webui": k.webui_name(),
                    "summary": k.summary(),
                })
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(rows));
    }
    let width = |f: fn(&SchedulerKind) -> &str| SchedulerKind::ALL.iter().map(|k| f(k).len()).max();
    let name_w = width(|k| k.name()).unwrap_or(0);
    let class_w = width(|k| k.class_name()).unwrap_or(0);
    let webui_w = width(|k| k.webui_name()).unwrap_or(0);
    for k in SchedulerKind::ALL {
        writeln!(
            out,
            "{:<name_w$}  {:<class_w$}  {:<webui_w$}  {}",
            k.name(),
            k.class_name(),
            k.webui_name(),
            k.summary()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_scheduler_and_json() {
        let mut text = Vec::new();
        write(&mut text, false).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.lines().count(), SchedulerKind::ALL.len());
        assert!(text.contains("euler") && text.contains("EulerDiscreteScheduler"));
        let mut json = Vec::new();
        write(&mut json, true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "pndm",
                "ddim",
                "euler",
                "euler-a",
                "dpm++2m",
                "dpm++2m-karras",
                "heun",
                "lms",
                "unipc",
                "ddpm"
            ]
        );
        for n in names {
            assert!(SchedulerKind::parse(n).is_some());
        }
    }
}
