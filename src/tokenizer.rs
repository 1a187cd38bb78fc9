//! Prompt tokenisation as transformers' `XLMRobertaTokenizer` does it for AltDiffusion:
//! `<s>` + pieces + `</s>`, truncated to the max length (the content is cut, `</s>` kept), padded with
//! `<pad>`, and an attention mask of 1 on real tokens.
//!
//! The vocabulary comes from `tokenizer/tokenizer.json` (the `tokenizers` crate). Truncation and padding
//! are done here rather than by the `tokenizers` crate so that the dropped text can be reported.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::TokenizerConfig;
use crate::error::{Error, Result};

/// One prompt, tokenised and padded.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// `max_length` ids.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<u32>,
    /// The text that did not fit, if any.
    pub dropped: Option<String>,
}

/// The model's tokenizer plus its special ids.
pub struct PromptTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    config: TokenizerConfig,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json` and `dir/tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::Model {
                path: json,
                message: "missing (altdiff needs tokenizer.json in the tokenizer folder)".into(),
            });
        }
        let mut inner = Tokenizer::from_file(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let config = TokenizerConfig::load(&dir.join("tokenizer_config.json"))?;
        let special = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| Error::Model {
                path: json.clone(),
                message: format!("the vocabulary has no `{tok}` token"),
            })
        };
        Ok(Self {
            bos: special("<s>")?,
            eos: special("</s>")?,
            pad: special("<pad>")?,
            config,
            inner,
        })
    }

    /// The tokenizer's `model_max_length`, if it sets a real one.
    pub fn model_max_length(&self) -> Option<usize> {
        self.config.max_length()
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The pieces and ids of `text` without special tokens.
    pub fn pieces(&self, text: &str) -> Result<(Vec<String>, Vec<u32>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok((enc.get_tokens().to_vec(), enc.get_ids().to_vec()))
    }

    /// Tokenises, truncates and pads `text` to `max_length` (at least 2: `<s>` and `</s>`).
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Tokenized> {
        if max_length < 2 {
            return Err(Error::usage(format!(
                "max length {max_length} is too small: it must hold <s> and </s>"
            )));
        }
        let (_, content) = self.pieces(text)?;
        let room = max_length - 2;
        let dropped = if content.len() > room {
            let text = self
                .inner
                .decode(&content[room..], true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            Some(text.trim().to_string())
        } else {
            None
        };
        let mut ids = Vec::with_capacity(max_length);
        ids.push(self.bos);
        ids.extend(content.iter().take(room));
        ids.push(self.eos);
        let real = ids.len();
        ids.resize(max_length, self.pad);
        let mut mask = vec![1u32; real];
        mask.resize(max_length, 0);
        Ok(Tokenized { ids, mask, dropped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PromptTokenizer {
        PromptTokenizer::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-m18/tokenizer"),
        )
        .unwrap()
    }

    /// Ids from transformers' slow `XLMRobertaTokenizer`, recorded by `tools/fixtures/generate.py`
    /// for every corpus sentence (18 languages) and edge cases. Where transformers' own fast tokenizer
    /// (the same tokenizer.json) disagrees with the slow one, the record carries `fast_ids` and
    /// tokenizer.json can only reproduce those: one case, stacked combining accents, which
    /// sentencepiece composes and the Precompiled normaliser leaves as one grapheme.
    #[test]
    fn ids_equal_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tokenizer_ids.json"
        );
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() > 100);
        let tok = tiny();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let key = if case.get("fast_ids").is_some() {
                "fast_ids"
            } else {
                "ids"
            };
            let want: Vec<u32> = case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text, want.len()).unwrap();
            assert_eq!(got.ids, want, "{text:?}");
            assert!(got.mask.iter().all(|&m| m == 1));
            assert_eq!(got.dropped, None);
        }
    }

    #[test]
    fn pads_truncates_and_reports_dropped_text() {
        let tok = tiny();
        let t = tok.encode("", 5).unwrap();
        assert_eq!(t.ids, vec![0, 2, 1, 1, 1]);
        assert_eq!(t.mask, vec![1, 1, 0, 0, 0]);
        let full = tok.encode("a red fox in the snow", 64).unwrap();
        let n = full.mask.iter().sum::<u32>() as usize;
        let cut = tok.encode("a red fox in the snow", n - 2).unwrap();
        assert_eq!(cut.ids.len(), n - 2);
        assert_eq!(*cut.ids.last().unwrap(), 2, "</s> is kept");
        assert_eq!(cut.ids[..n - 3], full.ids[..n - 3]);
        let dropped = cut.dropped.unwrap();
        assert!("a red fox in the snow".ends_with(&dropped), "{dropped:?}");
        assert!(tok.encode("x", 1).is_err());
    }
}
