//! webui's `parameters` text (its "infotext"): the prompt, `Negative prompt: ...`, then one line of
//! `Key: value` pairs. Written as AUTOMATIC1111 webui 1.9+ writes it (`modules/processing.py`
//! `create_infotext`: values holding `,` `:` or a newline quoted as JSON, the whole text stripped)
//! and read as it reads it (`modules/infotext_utils.py` `parse_generation_parameters`: its
//! `re_param` regular expression, the last line taken as the parameters only if it has three
//! pairs or more, every other line stripped, `Negative prompt:` starting the negative prompt,
//! `WxH` values split into `Key-1` / `Key-2`).
//!
//! Owned here (a few dozen lines) because no crate reads this format; [`parse`] is a line-by-line
//! port and is checked against the Python algorithm's output in `tests/fixtures/infotext.json`.
//! What the keys mean to altdiff (samplers, schedule types, keys it cannot honour) is
//! [`super::webui`]'s.

use std::sync::OnceLock;

use regex::Regex;

/// The text split as webui's parser splits it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Infotext {
    /// The prompt lines, each stripped, joined with `\n`.
    pub prompt: String,
    /// The negative prompt (`""` when none).
    pub negative_prompt: String,
    /// The `Key: value` pairs of the last line in order, values unquoted; `WxH` values are stored
    /// as `Key-1` = W and `Key-2` = H, as webui does. A key given twice keeps its last value.
    pub params: Vec<(String, String)>,
}

impl Infotext {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Python's `str.isspace`: Unicode whitespace plus the four ASCII separators U+001C..U+001F
/// (which Rust's `char::is_whitespace` leaves out).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// webui's `re_param`, with Python's `\s` (which includes U+001C..U+001F) spelled out.
fn re_param() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r#"[\s\x1c-\x1f]*(\w[\w \-/]+):[\s\x1c-\x1f]*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#)
            .expect("a valid regular expression")
    })
}

fn re_imagesize() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^(\d+)x(\d+)\n?$").expect("a valid regular expression"))
}

/// webui's `quote`: the value itself, or as a JSON string (non-ASCII kept) when it holds `,`, `:`
/// or a newline.
pub fn quote(value: &str) -> String {
    if value.contains([',', '\n', ':']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// webui's `unquote`: a JSON string's content, or the text itself when it is not one.
pub fn unquote(text: &str) -> String {
    if text.len() < 2 || !text.starts_with('"') || !text.ends_with('"') {
        return text.to_string();
    }
    serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_string())
}

/// The text webui's `create_infotext` writes for these values: `params` in order, each value
/// [`quote`]d, a pair whose key equals its value written as the key alone (webui's rule).
pub fn format(prompt: &str, negative_prompt: &str, params: &[(&str, String)]) -> String {
    let line: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            if k == v {
                k.to_string()
            } else {
                format!("{k}: {}", quote(v))
            }
        })
        .collect();
    let negative = if negative_prompt.is_empty() {
        String::new()
    } else {
        format!("\nNegative prompt: {negative_prompt}")
    };
    py_strip(&format!("{prompt}{negative}\n{}", line.join(", "))).to_string()
}

/// Reads a `parameters` text as webui's `parse_generation_parameters` does (without its
/// defaults for absent keys and its styles handling).
pub fn parse(text: &str) -> Infotext {
    let stripped = py_strip(text);
    let mut lines: Vec<&str> = stripped.split('\n').collect();
    let mut last = lines.pop().unwrap_or("");
    if re_param().captures_iter(last).count() < 3 {
        lines.push(last);
        last = "";
    }
    let mut out = Infotext::default();
    let mut done_with_prompt = false;
    for line in lines {
        let mut line = py_strip(line);
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            done_with_prompt = true;
            line = py_strip(rest);
        }
        let target = if done_with_prompt {
            &mut out.negative_prompt
        } else {
            &mut out.prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    for c in re_param().captures_iter(last) {
        let key = c[1].to_string();
        let mut value = c[2].to_string();
        // (An empty value raises in webui's loop, which then skips the pair.)
        if value.is_empty() {
            continue;
        }
        if value.starts_with('"') && value.ends_with('"') {
            value = unquote(&value);
        }
        let size = re_imagesize()
            .captures(&value)
            .map(|m| (m[1].to_string(), m[2].to_string()));
        match size {
            Some((w, h)) => {
                out.params.push((format!("{key}-1"), w));
                out.params.push((format!("{key}-2"), h));
            }
            None => out.params.push((key, value)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_as_webui() {
        assert_eq!(quote("DPM++ 2M"), "DPM++ 2M");
        assert_eq!(quote("a, b"), r#""a, b""#);
        assert_eq!(quote("x:y"), r#""x:y""#);
        assert_eq!(quote("say \"hi\"\nnow, 狐"), r#""say \"hi\"\nnow, 狐""#);
        assert_eq!(unquote(r#""a, b""#), "a, b");
        assert_eq!(unquote(r#""bad \q""#), r#""bad \q""#);
        assert_eq!(unquote("\""), "\"");
    }

    #[test]
    fn parses_webui_docstring_example() {
        let text = "girl with an artist's beret, ((eyeshadow)), (coquettish)\nNegative prompt: ugly, (((deformed))), [blurry]\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b";
        let p = parse(text);
        assert_eq!(
            p.prompt,
            "girl with an artist's beret, ((eyeshadow)), (coquettish)"
        );
        assert_eq!(p.negative_prompt, "ugly, (((deformed))), [blurry]");
        assert_eq!(p.get("Steps"), Some("20"));
        assert_eq!(p.get("Sampler"), Some("Euler a"));
        assert_eq!(p.get("Size-1"), Some("512"));
        assert_eq!(p.get("Size-2"), Some("512"));
        assert_eq!(p.get("Model hash"), Some("45dee52b"));
    }

    #[test]
    fn a_short_last_line_is_prompt() {
        let p = parse("a cat\nSteps: 20, Seed: 1");
        assert_eq!(p.prompt, "a cat\nSteps: 20, Seed: 1");
        assert!(p.params.is_empty());
    }

    #[test]
    fn round_trips_quoted_values() {
        let params = [
            ("Steps", "20".to_string()),
            ("Sampler", "DPM++ 2M".to_string()),
            ("Model", "my, model: v2".to_string()),
            ("Note", "line\nbreak \"q\"".to_string()),
        ];
        let text = format("狐狸, in snow: winter", "blurry", &params);
        let p = parse(&text);
        assert_eq!(p.prompt, "狐狸, in snow: winter");
        assert_eq!(p.negative_prompt, "blurry");
        for (k, v) in &params {
            assert_eq!(p.get(k), Some(v.as_str()), "{k}");
        }
    }
}
