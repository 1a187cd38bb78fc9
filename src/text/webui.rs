//! webui's prompt syntax and conditioning, as AUTOMATIC1111 webui computes it for AltDiffusion's
//! XLM-R text encoder:
//!
//! * [`parse_attention`]: `modules/prompt_parser.py` `parse_prompt_attention`: `(x)` x1.1,
//!   `[x]` /1.1, `(x:1.3)`, nesting multiplies, unbalanced brackets close at the end, `\(` `\)`
//!   `\[` `\]` `\\` escapes, `BREAK` (a word of its own, in capitals), runs of equal weight merged.
//! * [`chunks`]: `modules/sd_hijack_clip.py` `tokenize_line`: each fragment tokenised on its own
//!   without special tokens, 75 tokens per chunk (a comma among the last 20 tokens moves what
//!   follows it to the next chunk, webui's default "comma padding backtrack" of 20), `BREAK`
//!   starts a new chunk, each chunk `<s>` + 75 tokens (padded with `</s>`) + `</s>`; then
//!   `process_tokens` (`sd_hijack_xlmr.py`, whose pad differs from `</s>`): everything after the
//!   first `</s>` becomes `<pad>`, and the attention mask is `ids != <pad>`.
//! * [`emphasis`]: `modules/sd_emphasis.py` "Original": the encoder's output (the projection, the
//!   same `prompt_embeds` diffusers uses) multiplied by each token's weight, then scaled back to
//!   the chunk's original mean.
//!
//! Not supported (an error naming it, rather than a silently different image): prompt editing
//! `[a:b:0.5]` and alternation `[a|b]`, which webui resolves per step before this parser runs;
//! textual-inversion embeddings and extra networks (`<lora:...>`), which AltDiffusion models do
//! not have.
//!
//! Owned here: this is webui's algorithm, not a library; the fixture generator runs the same
//! algorithm in Python (`tools/fixtures/webui_prompts.py`) and the tests compare.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use regex::Regex;

use crate::error::{Error, Result};

/// Tokens per chunk between `<s>` and `</s>` (webui's `chunk_length`).
pub const CHUNK: usize = 75;
/// A chunk with its `<s>` and `</s>`.
pub const CHUNK_TOKENS: usize = CHUNK + 2;
/// webui's default `comma_padding_backtrack`.
pub const COMMA_BACKTRACK: usize = 20;

/// `re_attention`, with Python's `\s` (which includes U+001C..U+001F) spelled out.
fn re_attention() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|",
            r":[\s\x1c-\x1f]*([+-]?[.\d]+)[\s\x1c-\x1f]*\)|",
            r"\)|\]|[^\\()\[\]:]+|:"
        ))
        .expect("a valid regular expression")
    })
}

fn re_break() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"[\s\x1c-\x1f]*\bBREAK\b[\s\x1c-\x1f]*").expect("a valid regular expression")
    })
}

/// The weight webui gives a `BREAK` marker.
const BREAK_WEIGHT: f64 = -1.0;

/// `parse_prompt_attention`: the prompt as (text, weight) fragments; `("BREAK", -1.0)` marks a
/// `BREAK`. An emphasis weight that is not a number (`(x:1.2.3)`) is an error (webui fails on it
/// too).
pub fn parse_attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, start: usize, m: f64| {
        for r in res.iter_mut().skip(start) {
            r.1 *= m;
        }
    };
    for m in re_attention().captures_iter(text) {
        let whole = &m[0];
        let weight = m.get(1).map(|w| w.as_str());
        if let Some(rest) = whole.strip_prefix('\\') {
            res.push((rest.to_string(), 1.0));
        } else if whole == "(" {
            round.push(res.len());
        } else if whole == "[" {
            square.push(res.len());
        } else if let (Some(w), false) = (weight, round.is_empty()) {
            let value: f64 = w.parse().map_err(|_| {
                Error::usage(format!(
                    "webui prompt syntax: `{whole}`: `{w}` is not a number (write the weight as in (word:1.3))"
                ))
            })?;
            let start = round.pop().unwrap_or(0);
            multiply(&mut res, start, value);
        } else if whole == ")" && !round.is_empty() {
            let start = round.pop().unwrap_or(0);
            multiply(&mut res, start, 1.1);
        } else if whole == "]" && !square.is_empty() {
            let start = square.pop().unwrap_or(0);
            multiply(&mut res, start, 1.0 / 1.1);
        } else {
            for (i, part) in re_break().split(whole).enumerate() {
                if i > 0 {
                    res.push(("BREAK".into(), BREAK_WEIGHT));
                }
                res.push((part.to_string(), 1.0));
            }
        }
    }
    for start in round {
        multiply(&mut res, start, 1.1);
    }
    for start in square {
        multiply(&mut res, start, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// Prompt editing (`[a:b:0.5]`, `[a:0.5]`, `[a::0.5]`) and alternation (`[a|b]`), which webui
/// resolves before [`parse_attention`] and altdiff does not: the first such construct, if any.
pub fn unsupported_construct(text: &str) -> Option<String> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"(?:^|[^\\])(\[[^\[\]]*(?::[\s]*[+-]?(?:\d+\.?\d*|\.\d+)[\s]*|\|[^\[\]]*)\])")
            .expect("a valid regular expression")
    });
    re.captures(text).map(|c| c[1].to_string())
}

/// [`parse_attention`] of a prompt webui's syntax can read: prompt editing and alternation, which
/// altdiff does not support, are a usage error naming the construct.
pub fn parse_checked(text: &str) -> Result<Vec<(String, f64)>> {
    if let Some(c) = unsupported_construct(text) {
        return Err(Error::usage(format!(
            "webui prompt syntax: prompt editing and alternation (`{c}`) are not supported"
        )));
    }
    parse_attention(text)
}

/// Whether webui's syntax can read `text` ([`parse_checked`]); the message says what is wrong.
pub fn check(text: &str) -> std::result::Result<(), String> {
    parse_checked(text).map(|_| ()).map_err(|e| match e {
        Error::Usage(m) => m,
        e => e.to_string(),
    })
}

/// The ids webui's chunking needs.
#[derive(Debug, Clone, Copy)]
pub struct SpecialIds {
    /// `<s>`.
    pub bos: u32,
    /// `</s>`.
    pub eos: u32,
    /// `<pad>`.
    pub pad: u32,
    /// The vocabulary's `,` piece, if it has one.
    pub comma: Option<u32>,
}

/// One 77-token chunk as the text encoder gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// `<s>`, tokens, `</s>`, `<pad>`s ([`CHUNK_TOKENS`]).
    pub ids: Vec<u32>,
    /// 1 where `ids` is not `<pad>`.
    pub mask: Vec<u32>,
    /// Each token's weight.
    pub multipliers: Vec<f64>,
}

/// `tokenize_line` + `process_tokens`' padding: the chunks of a parsed prompt. `tokenize` gives
/// a fragment's ids without special tokens.
pub fn chunks(
    parsed: &[(String, f64)],
    mut tokenize: impl FnMut(&str) -> Result<Vec<u32>>,
    ids: SpecialIds,
) -> Result<Vec<Chunk>> {
    struct Building {
        tokens: Vec<u32>,
        multipliers: Vec<f64>,
    }
    let mut out: Vec<(Vec<u32>, Vec<f64>)> = Vec::new();
    let mut chunk = Building {
        tokens: Vec::new(),
        multipliers: Vec::new(),
    };
    let mut last_comma: Option<usize> = None;
    let next_chunk = |chunk: &mut Building,
                      out: &mut Vec<(Vec<u32>, Vec<f64>)>,
                      last_comma: &mut Option<usize>| {
        let mut tokens = Vec::with_capacity(CHUNK_TOKENS);
        let mut mults = Vec::with_capacity(CHUNK_TOKENS);
        tokens.push(ids.bos);
        mults.push(1.0);
        tokens.append(&mut chunk.tokens);
        mults.append(&mut chunk.multipliers);
        while tokens.len() < CHUNK + 1 {
            tokens.push(ids.eos);
            mults.push(1.0);
        }
        tokens.push(ids.eos);
        mults.push(1.0);
        *last_comma = None;
        out.push((tokens, mults));
    };
    for (text, weight) in parsed {
        let tokens = tokenize(text)?;
        if text == "BREAK" && *weight == BREAK_WEIGHT {
            next_chunk(&mut chunk, &mut out, &mut last_comma);
            continue;
        }
        for &token in &tokens {
            if Some(token) == ids.comma {
                last_comma = Some(chunk.tokens.len());
            } else if let Some(comma) = last_comma.filter(|&c| {
                chunk.tokens.len() == CHUNK && chunk.tokens.len() - c <= COMMA_BACKTRACK
            }) {
                let at = comma + 1;
                let moved_tokens = chunk.tokens.split_off(at);
                let moved_mults = chunk.multipliers.split_off(at);
                next_chunk(&mut chunk, &mut out, &mut last_comma);
                chunk.tokens = moved_tokens;
                chunk.multipliers = moved_mults;
            }
            if chunk.tokens.len() == CHUNK {
                next_chunk(&mut chunk, &mut out, &mut last_comma);
            }
            chunk.tokens.push(token);
            chunk.multipliers.push(*weight);
        }
    }
    if !chunk.tokens.is_empty() || out.is_empty() {
        next_chunk(&mut chunk, &mut out, &mut last_comma);
    }
    Ok(out
        .into_iter()
        .map(|(mut tokens, multipliers)| {
            // process_tokens: after the first `</s>`, `<pad>`.
            if let Some(end) = tokens.iter().position(|&t| t == ids.eos) {
                for t in tokens.iter_mut().skip(end + 1) {
                    *t = ids.pad;
                }
            }
            let mask = tokens.iter().map(|&t| u32::from(t != ids.pad)).collect();
            Chunk {
                ids: tokens,
                mask,
                multipliers,
            }
        })
        .collect())
}

/// webui's "Original" emphasis on one chunk's encoder output `z` ([1, 77, D] or [77, D]):
/// `z * weights`, scaled so its mean is the unweighted mean again. f32, as webui computes it.
pub fn emphasis(z: &Tensor, multipliers: &[f64]) -> candle_core::Result<Tensor> {
    if multipliers.iter().all(|&m| m == 1.0) {
        return Ok(z.clone());
    }
    let z = z.to_dtype(DType::F32)?;
    let shape = z.dims().to_vec();
    let l = shape[shape.len() - 2];
    let mut wshape = vec![1usize; shape.len()];
    wshape[shape.len() - 2] = l;
    let weights: Vec<f32> = multipliers.iter().map(|&m| m as f32).collect();
    let weights = Tensor::from_vec(weights, wshape, z.device())?;
    let original_mean = mean(&z)?;
    let weighted = z.broadcast_mul(&weights)?;
    let new_mean = mean(&weighted)?;
    weighted.affine(f64::from(original_mean / new_mean), 0.0)
}

/// The mean of every element, accumulated in f64 and rounded to f32 (torch's `mean()` of an f32
/// tensor, to rounding).
fn mean(t: &Tensor) -> candle_core::Result<f32> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()? as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_attention(text).unwrap()
    }

    fn pairs(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(s, w)| (s.to_string(), *w)).collect()
    }

    /// webui's own doctest examples.
    #[test]
    fn parses_webui_doctests() {
        assert_eq!(parsed("normal text"), pairs(&[("normal text", 1.0)]));
        assert_eq!(
            parsed("an (important) word"),
            pairs(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parsed("(unbalanced"), pairs(&[("unbalanced", 1.1)]));
        assert_eq!(parsed(r"\(literal\]"), pairs(&[("(literal]", 1.0)]));
        assert_eq!(
            parsed("(unnecessary)(parens)"),
            pairs(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pairs(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
        assert_eq!(
            parsed("a BREAK b"),
            pairs(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(parsed(""), pairs(&[("", 1.0)]));
        assert_eq!(parsed("(a : 1.5 )"), pairs(&[("a ", 1.5)]));
        assert!(parse_attention("(a:1.2.3)").is_err());
    }

    #[test]
    fn finds_prompt_editing() {
        assert_eq!(
            unsupported_construct("a [cat:dog:0.5] x").as_deref(),
            Some("[cat:dog:0.5]")
        );
        assert_eq!(
            unsupported_construct("[cat|dog]").as_deref(),
            Some("[cat|dog]")
        );
        assert_eq!(
            unsupported_construct("[cat:10]").as_deref(),
            Some("[cat:10]")
        );
        assert_eq!(unsupported_construct("[cat] (dog:1.2) a: b"), None);
        assert_eq!(unsupported_construct(r"\[a:1]"), None);
    }

    #[test]
    fn chunks_at_75_with_comma_backtracking() {
        let ids = SpecialIds {
            bos: 0,
            eos: 2,
            pad: 1,
            comma: Some(5),
        };
        // Every word one token: 100 + word index; a comma (5) after word 60.
        let tokenize = |t: &str| -> Result<Vec<u32>> {
            Ok(t.split_whitespace()
                .map(|w| match w {
                    "," => 5,
                    w => 100 + w.parse::<u32>().unwrap_or(900),
                })
                .collect())
        };
        let words: Vec<String> = (0..80)
            .flat_map(|i| {
                let mut v = vec![i.to_string()];
                if i == 60 {
                    v.push(",".into());
                }
                v
            })
            .collect();
        let text = words.join(" ");
        let c = chunks(&[(text, 1.2)], tokenize, ids).unwrap();
        assert_eq!(c.len(), 2);
        // The first chunk ends at the comma (position 61 of the content), then `</s>` and pads.
        assert_eq!(c[0].ids[0], 0);
        assert_eq!(c[0].ids[62], 5);
        assert_eq!(c[0].ids[63], 2);
        assert!(c[0].ids[64..].iter().all(|&t| t == 1));
        assert_eq!(c[0].mask.iter().sum::<u32>(), 64);
        assert_eq!(c[1].ids[1], 161);
        assert_eq!(c[0].multipliers[1], 1.2);
        assert_eq!(c[0].multipliers[70], 1.0);
        assert!(c.iter().all(|c| c.ids.len() == CHUNK_TOKENS));
        // An empty prompt is one chunk: `<s>`, `</s>`, pads.
        let e = chunks(&[(String::new(), 1.0)], tokenize, ids).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(&e[0].ids[..3], &[0, 2, 1]);
        // BREAK starts a new chunk.
        let b = chunks(&parsed("1 BREAK 2"), tokenize, ids).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(&b[0].ids[..4], &[0, 101, 2, 1]);
        assert_eq!(&b[1].ids[..4], &[0, 102, 2, 1]);
    }

    #[test]
    fn emphasis_keeps_the_mean() {
        let z = Tensor::new(
            &[[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let out = emphasis(&z, &[1.0, 2.0, 1.0]).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let m: f32 = v.iter().sum::<f32>() / 6.0;
        assert!((m - 3.5).abs() < 1e-6, "{m}");
        // Weighted then rescaled by 21 / 28.
        assert!((v[2] - 6.0 * 0.75).abs() < 1e-6, "{v:?}");
        let same = emphasis(&z, &[1.0; 3]).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }
}
