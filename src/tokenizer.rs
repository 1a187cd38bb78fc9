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
