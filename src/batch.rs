//! Batch prompt files (`--prompt-file`): one job per line, in three formats detected line by line.
//!
//! [`parse`] takes the file's bytes and returns one entry per prompt line, in file order: a
//! [`Job`] (the prompt and the settings the line overrides) or a [`LineError`] naming the line.
//! A broken line never sinks the others, so a batch can run the good lines and report the bad
//! ones by number.
//!
//! # Lines
//!
//! - Lines are separated by `\n`; a `\r` before it (CRLF files) and any other surrounding
//!   whitespace are trimmed. Line numbers are 1-based and count every `\n`-separated line,
//!   skipped ones included, so they match what an editor shows.
//! - A UTF-8 byte-order mark at the start of the file is ignored. A UTF-16 byte-order mark makes
//!   the whole file one error on line 1 (save it as UTF-8).
//! - Each line must be UTF-8 on its own: a line that is not is an error for that line only, giving
//!   the byte offset of the first bad byte in the line and in the file.
//! - Blank lines and lines whose first non-blank character is `#` are skipped (no entry).
//! - Otherwise the first non-blank character picks the format:
//!   - `{`: a JSON Lines object (see [`JSON_KEYS`]);
//!   - `--`: a webui "prompts from file" command line (see [`WEBUI_OPTIONS`]);
//!   - anything else: plain text, the whole trimmed line is the prompt.
//!
//!   A prompt that itself starts with `#`, `{` or `--` therefore has to be written as a JSON line
//!   or with `--prompt "..."` (the JSON error for a line such as `{red|blue} car` says so).
//!
//! # JSON Lines
//!
//! The line must be exactly one JSON object (nothing after it). `prompt` is required and must be
//! a string with a non-blank character; it is kept verbatim. The other keys are optional, and
//! `null` means the same as leaving the key out:
//!
//! | key | type |
//! | --- | --- |
//! | `negative_prompt`, `lang`, `output` | string |
//! | `scheduler` (or `sampler`) | string, as written (any name [`crate::schedulers::SchedulerKind::parse`] takes) |
//! | `seed` | integer, 0 to 2^64 - 1 |
//! | `steps`, `width`, `height`, `num_images` | integer >= 0 |
//! | `guidance` (or `cfg_scale`) | number >= 0 |
//! | `init_image`, `mask` | string: a path, relative to the batch file's directory (the current one for stdin) |
//! | `strength` (or `denoising_strength`) | number, more than 0 to 1 |
//! | `prompt_syntax` | string: `plain` (the default for JSON lines) or `webui` |
//!
//! A wrong type, a negative or fractional number where an integer is expected, a key given twice
//! (including `guidance` with `cfg_scale`, or `scheduler` with `sampler`) and an unknown key (most
//! likely a typo; the message lists the known keys) are errors naming the key. Nesting deeper than
//! serde_json's recursion limit (128) is an error, not a stack overflow.
//!
//! # webui "prompts from file" lines
//!
//! The line is split into words with POSIX shell quoting, as Python's `shlex.split` does (which
//! is what AUTOMATIC1111's `scripts/prompts_from_file.py` uses): words are separated by spaces,
//! tabs, `\r` and `\n`; `'...'` is literal; inside `"..."` a backslash escapes only `"` and `\`
//! (otherwise it is kept); outside quotes a backslash escapes any character; quoted and unquoted
//! parts next to each other form one word; `""` is an empty word; `#` is an ordinary character.
//! An unterminated quote or a trailing backslash is an error giving the column.
//!
//! The words must then be `--option value` pairs. As in webui, the value is the next word
//! whatever it looks like, and `--prompt` / `--negative_prompt` also take the following words up
//! to the next word starting with `--`, joined by single spaces (`--prompt a red fox --steps 20`
//! gives the prompt `a red fox`). Options (`-` and `_` are interchangeable in names):
//!
//! | option | becomes |
//! | --- | --- |
//! | `--prompt TEXT` (required) | the prompt |
//! | `--negative_prompt TEXT` | `negative_prompt` |
//! | `--seed N` | `seed`; `-1` (webui's "random") means no override |
//! | `--steps N`, `--width N`, `--height N` | the same |
//! | `--cfg_scale F` | `guidance` |
//! | `--sampler_name NAME` | `scheduler`, as written |
//! | `--sampler_index NAME` | `scheduler`, as written; a number is an error (see below) |
//! | `--batch_size N`, `--n_iter N` | `num_images` = batch_size × n_iter (each 1 when absent) |
//! | `--outpath_samples DIR` | `output` |
//! | altdiff's own: `--lang`, `--guidance`, `--scheduler`, `--num_images`, `--output`, `--init_image`, `--mask`, `--strength` (or webui's API name `--denoising_strength`), `--prompt_syntax` | the same |
//!
//! Any other option is an error listing the supported ones, including webui's options that
//! altdiff cannot honour (`--sd_model`, `--styles`, `--subseed`, `--subseed_strength`,
//! `--seed_resize_from_h`, `--seed_resize_from_w`, `--restore_faces`, `--tiling`,
//! `--outpath_grids`, `--prompt_for_display`, `--do_not_save_samples`, `--do_not_save_grid`):
//! ignoring them would silently give other images or files than the line asks for.
//!
//! The prompts of these lines were written for webui, so they are read with webui's prompt syntax
//! (`(word:1.3)`, `BREAK`, 75-token chunks) unless the line's `--prompt_syntax` or the command
//! line's `--prompt-syntax` says otherwise.
//!
//! Differences from webui, on purpose:
//! - webui treats every line containing `--` anywhere as a command line and, when it does not
//!   parse, logs the error and falls back to using the whole line as a plain prompt. Here only a
//!   line *starting* with `--` is a command line, and one that does not parse is an error for
//!   that line (a file of such lines was meant as settings, and silently generating with the raw
//!   text as prompt would waste the run). A line with `--` in the middle is a plain prompt here,
//!   which is what webui ends up doing with it too (its first word must be an option).
//! - webui does not skip `#` lines; this parser does.
//! - webui splits lines on every separator Python's `str.splitlines` knows (lone `\r`, `\x0b`,
//!   `\x0c`, `\x1c`–`\x1e`, `\x85`, U+2028, U+2029); only `\n` separates lines here.
//! - webui takes the last value of a repeated option; here a repeated option is an error.
//! - webui maps `--sampler_name` through its sampler table (an unknown name becomes `None` and
//!   fails later); here the name is kept as written for the caller to check, with
//!   [`crate::schedulers::SchedulerKind::parse`] for webui's names.
//! - `--sampler_index N` is an index into webui's sampler list, whose order differs between webui
//!   versions; rather than guess, a number is an error asking for `--sampler_name`.
//! - `--seed -1` asks webui for a random seed; here it leaves the seed to the command line.
//! - Numbers use Rust's parsing, not Python's `int()` / `float()`: `1_000` is rejected, and
//!   `inf` / `nan` are rejected because they are not finite.
//! - Negative numbers are errors (webui passes them on).
//!
//! # What is left to the caller
//!
//! Values are only checked for their type and sign here. Ranges (steps 1 to 1000, sizes that are
//! multiples of 8, at least one image), scheduler and language names, output paths and prompt
//! contents (control characters and so on) are checked by the caller against its own tables,
//! the same way as for the command line.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// One prompt line of a batch file.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// 1-based line number in the file.
    pub line: usize,
    /// The prompt (never blank).
    pub prompt: String,
    /// The settings this line sets; `None` fields keep the command line's values.
    pub overrides: Overrides,
    /// Whether the line is a webui "prompts from file" line (whose prompts were written for
    /// webui's prompt syntax).
    pub webui_line: bool,
}

/// The per-generation settings a batch line can override; `None` keeps the command line's value.
///
/// Strings are as written in the file: the caller checks scheduler and language names against its
/// own tables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Overrides {
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// Language code or name.
    pub lang: Option<String>,
    /// Seed.
    pub seed: Option<u64>,
    /// Inference steps.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (finite, >= 0).
    pub guidance: Option<f64>,
    /// Scheduler or webui sampler name, as written; see [`crate::schedulers::SchedulerKind::parse`].
    pub scheduler: Option<String>,
    /// Image width in pixels.
    pub width: Option<usize>,
    /// Image height in pixels.
    pub height: Option<usize>,
    /// Images for this prompt.
    pub num_images: Option<usize>,
    /// Output file or directory.
    pub output: Option<String>,
    /// Image-to-image: the init image's path (relative paths are taken from the batch file's
    /// directory).
    pub init_image: Option<String>,
    /// Inpainting: the mask's path (as `init_image`).
    pub mask: Option<String>,
    /// Image-to-image strength, more than 0 to 1.
    pub strength: Option<f64>,
    /// `plain` or `webui`, as written.
    pub prompt_syntax: Option<String>,
}

impl Overrides {
    /// Whether the line overrides nothing (it only gives a prompt).
    pub fn is_empty(&self) -> bool {
        self == &Overrides::default()
    }
}

/// A batch line that could not be read; the other lines are not affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for LineError {}

/// The keys a JSON line may have.
pub const JSON_KEYS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "lang",
    "seed",
    "steps",
    "guidance",
    "cfg_scale",
    "scheduler",
    "sampler",
    "width",
    "height",
    "num_images",
    "output",
    "init_image",
    "mask",
    "strength",
    "denoising_strength",
    "prompt_syntax",
];

/// The options a webui line may have (with `-` and `_` interchangeable).
pub const WEBUI_OPTIONS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "sampler_name",
    "sampler_index",
    "width",
    "height",
    "batch_size",
    "n_iter",
    "outpath_samples",
    "lang",
    "guidance",
    "scheduler",
    "num_images",
    "output",
    "init_image",
    "mask",
    "strength",
    "denoising_strength",
    "prompt_syntax",
];

/// webui's "prompts from file" options that altdiff knows but cannot honour.
const WEBUI_UNSUPPORTED: &[&str] = &[
    "sd_model",
    "outpath_grids",
    "prompt_for_display",
    "styles",
    "subseed",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
];

/// The most characters of file content quoted in an error message.
const QUOTE_MAX: usize = 40;

/// Parses a batch prompt file: one entry per prompt line, in order (see the module documentation
/// for the rules). Never panics; time and memory are linear in the input's size.
pub fn parse(input: &[u8]) -> Vec<Result<Job, LineError>> {
    if input.starts_with(&[0xFF, 0xFE]) || input.starts_with(&[0xFE, 0xFF]) {
        return vec![Err(LineError {
            line: 1,
            message: "the file is UTF-16 (it starts with a UTF-16 byte-order mark); \
                      save it as UTF-8"
                .to_string(),
        })];
    }
    let bom = if input.starts_with(&[0xEF, 0xBB, 0xBF]) {
        3
    } else {
        0
    };
    let body = input.get(bom..).unwrap_or_default();
    let mut out = Vec::new();
    let mut start = bom;
    for (index, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let file_offset = start;
        start += raw.len() + 1;
        match std::str::from_utf8(raw) {
            Ok(text) => {
                if let Some(entry) = parse_line(text, line) {
                    out.push(entry);
                }
            }
            Err(e) => {
                let first = raw
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .copied()
                    .unwrap_or(b'#');
                if first == b'#' {
                    continue;
                }
                let at = e.valid_up_to();
                let byte = raw.get(at).copied().unwrap_or(0);
                out.push(Err(LineError {
                    line,
                    message: format!(
                        "invalid UTF-8: byte 0x{byte:02X} at offset {at} of the line \
                         (offset {} in the file); save the file as UTF-8",
                        file_offset + at
                    ),
                }));
            }
        }
    }
    out
}

/// One line: `None` for a blank or comment line.
fn parse_line(raw: &str, line: usize) -> Option<Result<Job, LineError>> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let lead = raw.len() - raw.trim_start().len();
    let lead_chars = raw.get(..lead).map_or(0, |s| s.chars().count());
    let parsed = if text.starts_with('{') {
        parse_json(text, lead_chars)
    } else if text.starts_with("--") {
        parse_webui(text, lead_chars)
    } else {
        Ok((text.to_string(), Overrides::default()))
    };
    Some(
        parsed
            .map(|(prompt, overrides)| Job {
                line,
                prompt,
                overrides,
                webui_line: text.starts_with("--"),
            })
            .map_err(|message| LineError { line, message }),
    )
}

// ---------------------------------------------------------------------------------------------
// JSON Lines
// ---------------------------------------------------------------------------------------------

/// A JSON object's entries in order, duplicates kept (serde_json's `Map` would drop them).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Value>()?;
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

fn parse_json(text: &str, lead_chars: usize) -> Result<(String, Overrides), String> {
    let Entries(entries) = serde_json::from_str::<Entries>(text).map_err(|e| {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => message.get(..i).unwrap_or(&message).to_string(),
            None => message,
        };
        // serde_json's columns count bytes; report characters like an editor does.
        let byte = e.column().saturating_sub(1);
        let col = lead_chars
            + text
                .get(..byte.min(text.len()))
                .map_or(byte, |s| s.chars().count())
            + 1;
        // `{red|blue} car` (dynamic-prompts syntax) is a prompt, not broken JSON: say how to
        // write it.
        let after = text.get(1..).unwrap_or_default().trim_start();
        let hint = if after.starts_with('"') || after.starts_with('}') {
            ""
        } else {
            "; a line starting with `{` is read as JSON, so write a prompt that starts with `{` \
             as {\"prompt\": \"...\"}"
        };
        format!(
            "invalid JSON at column {col}: {}{hint}",
            clip(&message, 200)
        )
    })?;

    let mut prompt: Option<String> = None;
    let mut o = Overrides::default();
    let mut seen: Vec<(&'static str, &'static str)> = Vec::new();
    for (key, value) in &entries {
        let Some(canonical) = JSON_KEYS.iter().copied().find(|k| *k == key.as_str()) else {
            return Err(format!(
                "unknown key `{}`{} (known keys: {})",
                clip(key, QUOTE_MAX),
                suggestion(key, JSON_KEYS, ""),
                JSON_KEYS.join(", ")
            ));
        };
        let slot = match canonical {
            "cfg_scale" => "guidance",
            "sampler" => "scheduler",
            "denoising_strength" => "strength",
            k => k,
        };
        if let Some(&(_, earlier)) = seen.iter().find(|(s, _)| *s == slot) {
            return Err(if earlier == canonical {
                format!("key `{canonical}` given twice")
            } else {
                format!(
                    "keys `{earlier}` and `{canonical}` are the same setting (give one of them)"
                )
            });
        }
        seen.push((slot, canonical));
        match canonical {
            "prompt" => match value {
                Value::String(s) if !s.trim().is_empty() => prompt = Some(s.clone()),
                Value::String(_) => return Err("`prompt` is empty".to_string()),
                other => {
                    return Err(format!(
                        "`prompt` must be a non-empty string, found {}",
                        describe(other)
                    ))
                }
            },
            "negative_prompt" => o.negative_prompt = json_string(canonical, value)?,
            "lang" => o.lang = json_string(canonical, value)?,
            "output" => o.output = json_string(canonical, value)?,
            "scheduler" | "sampler" => o.scheduler = json_string(canonical, value)?,
            "seed" => o.seed = json_u64(canonical, value)?,
            "steps" => o.steps = json_usize(canonical, value)?,
            "width" => o.width = json_usize(canonical, value)?,
            "height" => o.height = json_usize(canonical, value)?,
            "num_images" => o.num_images = json_usize(canonical, value)?,
            "guidance" | "cfg_scale" => o.guidance = json_f64(canonical, value)?,
            "init_image" => o.init_image = json_string(canonical, value)?,
            "mask" => o.mask = json_string(canonical, value)?,
            "strength" | "denoising_strength" => o.strength = json_f64(canonical, value)?,
            "prompt_syntax" => o.prompt_syntax = json_string(canonical, value)?,
            _ => {}
        }
    }
    match prompt {
        Some(p) => Ok((p, o)),
        None => Err("missing `prompt`".to_string()),
    }
}

fn json_string(key: &str, value: &Value) -> Result<Option<String>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(format!(
            "`{key}` must be a string, found {}",
            describe(other)
        )),
    }
}

fn json_u64(key: &str, value: &Value) -> Result<Option<u64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if n.as_f64().is_some_and(|f| f < 0.0) {
                Err(format!("`{key}` must not be negative, found {n}"))
            } else {
                Err(format!(
                    "`{key}` must be a whole number from 0 to {}, found {n}",
                    u64::MAX
                ))
            }
        }
        other => Err(format!(
            "`{key}` must be a non-negative integer, found {}",
            describe(other)
        )),
    }
}

fn json_usize(key: &str, value: &Value) -> Result<Option<usize>, String> {
    match json_u64(key, value)? {
        None => Ok(None),
        Some(u) => usize::try_from(u)
            .map(Some)
            .map_err(|_| format!("`{key}` is too large, found {u}")),
    }
}

fn json_f64(key: &str, value: &Value) -> Result<Option<f64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
            Some(f) if f < 0.0 => Err(format!("`{key}` must not be negative, found {n}")),
            _ => Err(format!("`{key}` must be a finite number, found {n}")),
        },
        other => Err(format!(
            "`{key}` must be a number, found {}",
            describe(other)
        )),
    }
}

/// A JSON value's type (and a short form of it) for messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{}\"", clip(s, QUOTE_MAX)),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// webui "prompts from file" lines
// ---------------------------------------------------------------------------------------------

/// Splits a line into words like Python's `shlex.split(line)` (POSIX mode, no comments).
/// `lead_chars` is added to reported columns.
fn split_words(text: &str, lead_chars: usize) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().enumerate().peekable();
    while let Some((i, c)) = chars.next() {
        let col = lead_chars + i + 1;
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, ch)) => word.push(ch),
                        None => return Err(format!("unterminated ' quote opened at column {col}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.peek() {
                            Some(&(_, q @ ('"' | '\\'))) => {
                                word.push(q);
                                chars.next();
                            }
                            _ => word.push('\\'),
                        },
                        Some((_, ch)) => word.push(ch),
                        None => {
                            return Err(format!("unterminated \" quote opened at column {col}"))
                        }
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some((_, ch)) => word.push(ch),
                    None => {
                        return Err(format!(
                            "the backslash at column {col} ends the line and escapes nothing"
                        ))
                    }
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn parse_webui(text: &str, lead_chars: usize) -> Result<(String, Overrides), String> {
    let words = split_words(text, lead_chars)?;
    let mut prompt: Option<String> = None;
    let mut o = Overrides::default();
    let mut batch_size: Option<usize> = None;
    let mut n_iter: Option<usize> = None;
    let mut seen: Vec<(&'static str, &'static str)> = Vec::new();
    let mut pos = 0;
    while let Some(word) = words.get(pos) {
        let Some(name) = word.strip_prefix("--") else {
            return Err(format!(
                "expected an option starting with `--`, found `{}` (quote values that contain spaces)",
                clip(word, QUOTE_MAX)
            ));
        };
        let normalized = name.replace('-', "_");
        let Some(option) = WEBUI_OPTIONS
            .iter()
            .copied()
            .find(|k| *k == normalized.as_str())
        else {
            let supported = WEBUI_OPTIONS
                .iter()
                .map(|k| format!("--{k}"))
                .collect::<Vec<_>>()
                .join(", ");
            if let Some(eq) = normalized.find('=') {
                let head = normalized.get(..eq).unwrap_or_default();
                if WEBUI_OPTIONS.contains(&head) {
                    return Err(format!(
                        "write `--{head} VALUE` with a space, not `--{}`",
                        clip(name, QUOTE_MAX)
                    ));
                }
            }
            if WEBUI_UNSUPPORTED.contains(&normalized.as_str()) {
                return Err(format!(
                    "webui option `--{normalized}` is not supported by altdiff (supported: {supported})"
                ));
            }
            return Err(format!(
                "unknown option `--{}`{} (supported: {supported})",
                clip(name, QUOTE_MAX),
                suggestion(&normalized, WEBUI_OPTIONS, "--")
            ));
        };
        let slot = match option {
            "cfg_scale" => "guidance",
            "sampler_name" | "sampler_index" => "scheduler",
            "outpath_samples" => "output",
            "denoising_strength" => "strength",
            k => k,
        };
        if let Some(&(_, earlier)) = seen.iter().find(|(s, _)| *s == slot) {
            return Err(if earlier == option {
                format!("option `--{option}` given twice")
            } else {
                format!(
                    "options `--{earlier}` and `--{option}` are the same setting (give one of them)"
                )
            });
        }
        seen.push((slot, option));
        let Some(value) = words.get(pos + 1) else {
            return Err(format!("option `--{option}` has no value"));
        };
        pos += 2;
        match option {
            "prompt" | "negative_prompt" => {
                let mut joined = value.clone();
                while let Some(more) = words.get(pos).filter(|w| !w.starts_with("--")) {
                    joined.push(' ');
                    joined.push_str(more);
                    pos += 1;
                }
                if option == "prompt" {
                    if joined.trim().is_empty() {
                        return Err("`--prompt` is empty".to_string());
                    }
                    prompt = Some(joined);
                } else {
                    o.negative_prompt = Some(joined);
                }
            }
            "seed" => {
                o.seed = match value.parse::<i128>() {
                    Ok(-1) => None,
                    Ok(n) if n < 0 => {
                        return Err(format!(
                            "`--seed` must not be negative (except -1, no override), found {n}"
                        ))
                    }
                    Ok(n) => Some(u64::try_from(n).map_err(|_| {
                        format!("`--seed` must be from 0 to {}, found {n}", u64::MAX)
                    })?),
                    Err(_) => {
                        return Err(format!(
                            "`--seed` must be an integer, found `{}`",
                            clip(value, QUOTE_MAX)
                        ))
                    }
                }
            }
            "steps" => o.steps = Some(word_usize(option, value)?),
            "width" => o.width = Some(word_usize(option, value)?),
            "height" => o.height = Some(word_usize(option, value)?),
            "num_images" => o.num_images = Some(word_usize(option, value)?),
            "batch_size" => batch_size = Some(word_usize(option, value)?),
            "n_iter" => n_iter = Some(word_usize(option, value)?),
            "cfg_scale" | "guidance" => o.guidance = Some(word_f64(option, value)?),
            "sampler_name" | "scheduler" => o.scheduler = Some(value.clone()),
            "sampler_index" => {
                if value.trim().parse::<i128>().is_ok() {
                    return Err(format!(
                        "`--sampler_index {}` is a position in webui's sampler list, which differs \
                         between webui versions; give the name with `--sampler_name`",
                        clip(value, QUOTE_MAX)
                    ));
                }
                o.scheduler = Some(value.clone());
            }
            "lang" => o.lang = Some(value.clone()),
            "output" | "outpath_samples" => o.output = Some(value.clone()),
            "init_image" => o.init_image = Some(value.clone()),
            "mask" => o.mask = Some(value.clone()),
            "strength" | "denoising_strength" => o.strength = Some(word_f64(option, value)?),
            "prompt_syntax" => o.prompt_syntax = Some(value.clone()),
            _ => {}
        }
    }
    if batch_size.is_some() || n_iter.is_some() {
        if o.num_images.is_some() {
            return Err(
                "give either `--num_images` or `--batch_size` / `--n_iter`, not both".to_string(),
            );
        }
        let b = batch_size.unwrap_or(1);
        let n = n_iter.unwrap_or(1);
        o.num_images = Some(b.checked_mul(n).ok_or_else(|| {
            format!("`--batch_size {b}` times `--n_iter {n}` is too many images")
        })?);
    }
    match prompt {
        Some(p) => Ok((p, o)),
        None => Err("missing `--prompt`".to_string()),
    }
}

fn word_usize(option: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) => Ok(n),
        Err(_)
            if value.starts_with('-')
                && value.get(1..).is_some_and(|r| r.parse::<u128>().is_ok()) =>
        {
            Err(format!(
                "`--{option}` must not be negative, found {}",
                clip(value, QUOTE_MAX)
            ))
        }
        Err(_) => Err(format!(
            "`--{option}` must be a non-negative integer, found `{}`",
            clip(value, QUOTE_MAX)
        )),
    }
}

fn word_f64(option: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f),
        Ok(f) if f < 0.0 => Err(format!(
            "`--{option}` must not be negative, found {}",
            clip(value, QUOTE_MAX)
        )),
        Ok(_) => Err(format!(
            "`--{option}` must be a finite number, found `{}`",
            clip(value, QUOTE_MAX)
        )),
        Err(_) => Err(format!(
            "`--{option}` must be a number, found `{}`",
            clip(value, QUOTE_MAX)
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Samplers and helpers
// ---------------------------------------------------------------------------------------------

/// At most `max` characters of `s`, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", s.get(..i).unwrap_or_default()),
        None => s.to_string(),
    }
}

/// ` (did you mean `{prefix}x`?)` when `word` is a close misspelling of one of `known`, else empty.
fn suggestion(word: &str, known: &[&str], prefix: &str) -> String {
    if word.chars().count() > 64 {
        return String::new();
    }
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!(" (did you mean `{prefix}{k}`?)"))
        .unwrap_or_default()
}

/// Levenshtein distance over characters (inputs are short: callers cap them).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            cur.push(sub.min(del).min(ins));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}
