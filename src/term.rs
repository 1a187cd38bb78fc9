//! The terminal: the process's one set of progress bars, and every line meant for a person (image
//! paths on stdout, log lines and notes on stderr) printed through them, so a bar never overwrites
//! a line and no bar is left behind.
//!
//! Owns three decisions the rest of the code must not make on its own:
//! - **Bars** live in one [`indicatif::MultiProgress`] ([`bars`]), drawn on stderr only when stderr
//!   is a terminal and `--quiet` is off. Lines go through [`MultiProgress::suspend`]: the bars are
//!   cleared, the line is written to its own stream (stdout stays stdout, for pipes), the bars come
//!   back below it.
//! - **Colour** ([`colour_stderr`]): only on a terminal; `NO_COLOR` (any non-empty value) turns it
//!   off, `CLICOLOR_FORCE` (non-empty, not `0`) turns it on even in a pipe, as
//!   <https://no-color.org> and <https://bixense.com/clicolors> describe.
//! - **Quiet**: with `-q` only errors reach stderr ([`note`] prints nothing).
//!
//! [`init`] sets all of this up once, including the `tracing` subscriber whose writer is
//! [`LogWriter`]. Library code that never calls it still works (bars on a terminal, not quiet).
//!
//! Also owns the one-line form of clap's usage errors ([`one_line_usage_error`]): the README
//! promises one line per error.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressDrawTarget};

static BARS: OnceLock<MultiProgress> = OnceLock::new();
static QUIET: AtomicBool = AtomicBool::new(false);

/// Whether stderr is a terminal that bars can be drawn on.
fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// Whether log lines on stderr get ANSI colours: on a terminal unless `NO_COLOR` is set; anywhere
/// with `CLICOLOR_FORCE`.
pub fn colour_stderr() -> bool {
    colour_decision(
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("CLICOLOR_FORCE").as_deref(),
        stderr_is_terminal(),
    )
}

/// [`colour_stderr`] from its inputs.
fn colour_decision(
    no_color: Option<&std::ffi::OsStr>,
    force: Option<&std::ffi::OsStr>,
    terminal: bool,
) -> bool {
    if no_color.is_some_and(|v| !v.is_empty()) {
        return false;
    }
    if force.is_some_and(|v| !v.is_empty() && v != "0") {
        return true;
    }
    terminal
}

/// Sets up the terminal for one run of the binary: bars unless `quiet`, the log level from
/// `verbose` (`ALTDIFF_LOG` overrides it), colour as [`colour_stderr`] decides.
pub fn init(quiet: bool, verbose: u8) {
    QUIET.store(quiet, Ordering::Relaxed);
    let target = if quiet || !stderr_is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    // Before anything draws: `bars()` would otherwise pick the default target.
    let _ = BARS.set(MultiProgress::with_draw_target(target));
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ALTDIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("altdiff={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(colour_stderr())
        .with_target(false)
        .without_time()
        .try_init();
}

/// The process's progress bars: add every bar here.
pub fn bars() -> &'static MultiProgress {
    BARS.get_or_init(|| {
        MultiProgress::with_draw_target(if stderr_is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        })
    })
}

/// Whether bars are being drawn (stderr is a terminal and not `--quiet`).
pub fn showing_bars() -> bool {
    !bars().is_hidden()
}

/// Whether `--quiet` is on.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Writes `text` and a newline to stdout above the bars. A closed stdout is reported to the
/// caller (`BrokenPipe`) rather than panicking as `println!` would.
pub fn out_line(text: &str) -> std::io::Result<()> {
    bars().suspend(|| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()
    })
}

/// Writes `text` and a newline to stderr above the bars, whatever `--quiet` says (errors,
/// failure reports).
pub fn err_line(text: &str) {
    bars().suspend(|| {
        let _ = writeln!(std::io::stderr().lock(), "{text}");
    });
}

/// A note for the person at the terminal on stderr (the random seed, skipped prompts, the contact
/// sheet's path): silent with `--quiet`.
pub fn note(text: &str) {
    if !quiet() {
        err_line(text);
    }
}

/// The `tracing` writer: each formatted event is written to stderr in one piece above the bars.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// clap's rendering of a usage error (an `error:` line, indented details, `tip:` lines, the
/// usage line and "For more information, try '--help'.") as one line:
/// `error: ... (tip: ...); see 'altdiff generate --help'`. `subcommand` names the help to point
/// to when clap's text has no usage line.
pub fn one_line_usage_error(rendered: &str, subcommand: Option<&str>) -> String {
    let mut head = String::new();
    let mut details = Vec::new();
    let mut tips = Vec::new();
    let mut command = match subcommand {
        Some(s) => format!("altdiff {s}"),
        None => String::from("altdiff"),
    };
    for line in rendered.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("For more information") {
            continue;
        }
        if let Some(rest) = t.strip_prefix("error:") {
            head = rest.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("tip:") {
            tips.push(rest.trim().to_string());
        } else if let Some(rest) = t.strip_prefix("Usage:") {
            command = rest
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
        } else if !head.is_empty() {
            details.push(t.to_string());
        }
    }
    let mut out = format!("error: {}", head.trim_end_matches(':'));
    if !details.is_empty() {
        out.push_str(if head.ends_with(':') { ": " } else { " " });
        out.push_str(&details.join(", "));
    }
    if !tips.is_empty() {
        out.push_str(&format!(" (tip: {})", tips.join("; ")));
    }
    out.push_str(&format!("; see '{command} --help'"));
    out
}

/// Terminal columns of `s`, close enough for the native names: East Asian wide characters take two,
/// the combining marks of Thai, Devanagari, Arabic and Latin none.
pub fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| match u32::from(c) {
            0x300..=0x36F
            | 0x64B..=0x65F
            | 0x670
            | 0x900..=0x902
            | 0x93A
            | 0x93C
            | 0x941..=0x948
            | 0x94D
            | 0x951..=0x957
            | 0x962..=0x963
            | 0xE31
            | 0xE34..=0xE3A
            | 0xE47..=0xE4E => 0,
            0x1100..=0x115F
            | 0x2E80..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6
            | 0x20000..=0x3FFFD => 2,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_unless_forced() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert!(colour_decision(None, None, true));
        assert!(!colour_decision(None, None, false));
        assert!(!colour_decision(s("1"), None, true));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(colour_decision(s(""), None, true));
        assert!(colour_decision(None, s("1"), false));
        assert!(!colour_decision(None, s("0"), false));
        assert!(!colour_decision(s("1"), s("1"), false));
    }

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: unexpected argument '--step' found\n\n  tip: a similar argument exists: '--steps'\n\n\
                        Usage: altdiff generate --steps <STEPS> <--prompt <TEXT>|--prompt-file <FILE>>\n\n\
                        For more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(rendered, None),
            "error: unexpected argument '--step' found (tip: a similar argument exists: '--steps'); \
             see 'altdiff generate --help'"
        );
        let missing = "error: the following required arguments were not provided:\n  --out <DIR>\n  \
                       <TEXT>\n\nUsage: altdiff convert --out <DIR>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(missing, None),
            "error: the following required arguments were not provided: --out <DIR>, <TEXT>; \
             see 'altdiff convert --help'"
        );
        let no_usage =
            "error: invalid value '-64' for '--height <PX>': -64 must be a multiple of 8\n\n\
                        For more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(no_usage, Some("generate")),
            "error: invalid value '-64' for '--height <PX>': -64 must be a multiple of 8; \
             see 'altdiff generate --help'"
        );
    }
}
