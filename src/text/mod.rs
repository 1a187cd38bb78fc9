//! Prompt text: everything between the prompt a user typed and the text encoder's input.
//!
//! * [`tokenizer`] + [`sentencepiece`]: transformers' XLM-R tokenizers (fast and slow), exactly.
//! * [`lang`]: the 18 languages, `--lang`, and detection of a prompt's language.
//! * The prompt syntaxes:
//!
//! * [`PromptSyntax::Plain`]: diffusers' way, the text tokenised as it is (brackets are text),
//!   padded or cut to `--max-length` tokens ([`crate::tokenizer`]).
//! * [`PromptSyntax::Webui`]: AUTOMATIC1111 webui's, `(word:1.3)` emphasis and `BREAK`, any
//!   length in 75-token chunks ([`webui`]).

pub mod lang;
pub mod sentencepiece;
pub mod tokenizer;
pub mod webui;

use serde::{Deserialize, Serialize};

/// How prompts are read (`--prompt-syntax`, `prompt_syntax` in batch files and records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// diffusers: the text as it is, padded or truncated to `--max-length` tokens.
    #[default]
    Plain,
    /// webui: `(x)`, `(x:1.3)`, `[x]`, `\(` escapes and `BREAK`; 75-token chunks, no length limit.
    Webui,
}

impl PromptSyntax {
    /// The name (`plain`, `webui`).
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::Plain => "plain",
            PromptSyntax::Webui => "webui",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "plain" => Some(PromptSyntax::Plain),
            "webui" => Some(PromptSyntax::Webui),
            _ => None,
        }
    }
}
