//! Prompt tokenisation as transformers' `XLMRobertaTokenizer` does it for AltDiffusion:
//! `<s>` + pieces + `</s>`, truncated to the max length (the content is cut, `</s>` kept), padded with
//! `<pad>`, and an attention mask of 1 on real tokens.
//!
//! Two backends, chosen by what the tokenizer folder holds:
//!
//! * `tokenizer.json` (the `tokenizers` crate), when present: what transformers' *fast* tokenizer does.
//! * otherwise `sentencepiece.bpe.model`, as the real BAAI repositories ship it, read by
//!   [`crate::sentencepiece`]: what the *slow* tokenizer (the one diffusers loads) does, exactly. Like
//!   transformers' `PreTrainedTokenizer.tokenize`, the text is first split on the added tokens
//!   (`<s>`, `</s>`, `<unk>`, `<pad>`, `<mask>`, with their lstrip / rstrip / single_word flags) and
//!   the pieces between them are encoded separately.
//!
//! The two agree except on a few inputs where the fast tokenizer's grapheme-wise normaliser differs
//! from sentencepiece (stacked combining accents, Hangul jamo, half-width voiced katakana; see
//! `tests/fixtures/README.md`). `tokenizer_config.json` (and, for old configs without
//! `added_tokens_decoder`, `special_tokens_map.json`) gives `model_max_length` and the special tokens;
//! a special token that is not in the vocabulary is an error.
//!
//! Truncation and padding are done here rather than by the `tokenizers` crate so that the dropped text
//! can be reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::TokenizerConfig;
use crate::error::{Error, Result};
use crate::sentencepiece::{XlmRobertaSentencePiece, MASK_TOKEN, SPACE_SYMBOL};

/// The fast tokenizer's file.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// The sentencepiece model file of XLM-R tokenizers.
pub const SENTENCEPIECE_MODEL: &str = "sentencepiece.bpe.model";

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

/// Which file the vocabulary came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `tokenizer.json`, through the `tokenizers` crate (transformers' fast tokenizer).
    TokenizerJson,
    /// `sentencepiece.bpe.model`, through [`crate::sentencepiece`] (transformers' slow tokenizer).
    SentencePiece,
}

/// A token the slow tokenizer matches in the text before sentencepiece sees it (transformers'
/// `AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    /// The literal text.
    pub content: String,
    /// Its id.
    pub id: u32,
    /// Whether it eats the whitespace on its left.
    pub lstrip: bool,
    /// Whether it eats the whitespace on its right.
    pub rstrip: bool,
    /// Whether it only matches as a whole word.
    pub single_word: bool,
    /// Whether it is a special token (dropped by [`PromptTokenizer::decode`]).
    pub special: bool,
}

/// The slow tokenizer: added tokens + sentencepiece.
struct SlowTokenizer {
    model: XlmRobertaSentencePiece,
    /// Matched in the text, longest first where several start at the same place.
    added: Vec<AddedToken>,
    /// `_added_tokens_encoder`: content -> id.
    added_ids: HashMap<String, u32>,
}

enum Inner {
    Json(Box<Tokenizer>),
    Slow(Box<SlowTokenizer>),
}

/// The model's tokenizer plus its special ids.
pub struct PromptTokenizer {
    inner: Inner,
    bos: u32,
    eos: u32,
    pad: u32,
    config: TokenizerConfig,
}

// ------------------------------------------------------------------------------------------------
// Special tokens from tokenizer_config.json / special_tokens_map.json
// ------------------------------------------------------------------------------------------------

/// A special token as a config names it, and where.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
    special: bool,
    /// The file that named it (None: transformers' default).
    file: Option<PathBuf>,
}

/// The special-token roles of `XLMRobertaTokenizer`, their defaults, and whether a plain string gets
/// lstrip (the tokenizer's `__init__` wraps a string `mask_token` in `AddedToken(lstrip=True)`).
const ROLES: [(&str, &str, bool); 7] = [
    ("bos_token", "<s>", false),
    ("eos_token", "</s>", false),
    ("unk_token", "<unk>", false),
    ("sep_token", "</s>", false),
    ("pad_token", "<pad>", false),
    ("cls_token", "<s>", false),
    ("mask_token", MASK_TOKEN, true),
];

fn read_json_value(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            file: path.to_path_buf(),
            source,
        })
}

/// A token given as a string or as an `AddedToken` object (`{"content": ..., "lstrip": ...}`).
fn token_spec(
    value: &Value,
    file: &Path,
    field: &str,
    string_lstrip: bool,
) -> Result<Option<TokenSpec>> {
    let flag = |obj: &serde_json::Map<String, Value>, key: &str, default: bool| match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::config(
            file,
            field,
            format!("`{key}` must be a boolean, not {v}"),
        )),
    };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenSpec {
            content: s.clone(),
            lstrip: string_lstrip,
            rstrip: false,
            single_word: false,
            special: true,
            file: Some(file.to_path_buf()),
        })),
        Value::Object(obj) => {
            let content = obj.get("content").and_then(Value::as_str).ok_or_else(|| {
                Error::config(file, field, "an added token needs a string `content`")
            })?;
            Ok(Some(TokenSpec {
                content: content.to_string(),
                lstrip: flag(obj, "lstrip", false)?,
                rstrip: flag(obj, "rstrip", false)?,
                single_word: flag(obj, "single_word", false)?,
                special: flag(obj, "special", true)?,
                file: Some(file.to_path_buf()),
            }))
        }
        v => Err(Error::config(
            file,
            field,
            format!("expected a token string or object, found {v}"),
        )),
    }
}

/// What the tokenizer folder's JSON files say about special tokens.
struct SpecialTokens {
    /// Role name -> token (None: the config sets the role to null).
    roles: Vec<(&'static str, Option<TokenSpec>)>,
    /// `added_tokens_decoder` of tokenizer_config.json: id -> token.
    decoder: Vec<(u32, TokenSpec)>,
}

impl SpecialTokens {
    /// Reads the special tokens as transformers' `from_pretrained` does: tokenizer_config.json, and
    /// for old configs without `added_tokens_decoder`, special_tokens_map.json on top.
    fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_json_value(&config_path)?;
        let mut roles: Vec<(&'static str, Option<TokenSpec>)> = ROLES
            .iter()
            .map(|&(role, default, lstrip)| {
                (
                    role,
                    Some(TokenSpec {
                        content: default.to_string(),
                        lstrip,
                        rstrip: false,
                        single_word: false,
                        special: true,
                        file: None,
                    }),
                )
            })
            .collect();
        let mut decoder = Vec::new();
        let mut has_decoder = false;
        if let Some(config) = &config {
            for (role, spec) in roles.iter_mut() {
                if let Some(v) = config.get(*role) {
                    let lstrip = *role == "mask_token";
                    *spec = token_spec(v, &config_path, role, lstrip)?;
                }
            }
            if let Some(dec) = config.get("added_tokens_decoder") {
                has_decoder = true;
                let obj = dec.as_object().ok_or_else(|| {
                    Error::config(&config_path, "added_tokens_decoder", "expected an object")
                })?;
                for (id, v) in obj {
                    let field = format!("added_tokens_decoder.{id}");
                    let id: u32 = id.parse().map_err(|_| {
                        Error::config(&config_path, &field, "the key must be a token id")
                    })?;
                    if let Some(spec) = token_spec(v, &config_path, &field, false)? {
                        decoder.push((id, spec));
                    }
                }
                decoder.sort_by_key(|(id, _)| *id);
            }
        }
        if !has_decoder {
            if let Some(map) = read_json_value(&map_path)? {
                for (role, spec) in roles.iter_mut() {
                    if let Some(v) = map.get(*role) {
                        let lstrip = *role == "mask_token";
                        *spec = token_spec(v, &map_path, role, lstrip)?;
                    }
                }
            }
        }
        Ok(Self { roles, decoder })
    }

    fn role(&self, name: &str) -> Option<&TokenSpec> {
        self.roles
            .iter()
            .find(|(r, _)| *r == name)
            .and_then(|(_, s)| s.as_ref())
    }
}

// ------------------------------------------------------------------------------------------------
// The slow tokenizer's splitting on added tokens
// ------------------------------------------------------------------------------------------------

/// Python's `str.isspace` (what `str.strip` removes): Unicode White_Space plus U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl SlowTokenizer {
    fn added_id(&self, s: &str) -> Option<u32> {
        self.added_ids.get(s).copied()
    }

    /// transformers' `Trie.split`: the text cut before and after every added token, leftmost match
    /// first (the longest of those starting there), empty parts dropped.
    fn split(&self, text: &str) -> Vec<String> {
        let mut parts = Vec::new();
        let mut last = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let hit = self
                .added
                .iter()
                .filter(|t| rest.starts_with(t.content.as_str()))
                .map(|t| t.content.len())
                .max();
            match hit {
                Some(len) => {
                    if last < i {
                        parts.push(text[last..i].to_string());
                    }
                    parts.push(text[i..i + len].to_string());
                    i += len;
                    last = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if last < text.len() {
            parts.push(text[last..].to_string());
        }
        parts
    }

    /// `PreTrainedTokenizer.tokenize` + `convert_tokens_to_ids`: tokens and ids, no `<s>` / `</s>`.
    fn tokenize(&self, text: &str) -> Result<Vec<(String, u32)>> {
        let mut parts = self.split(text);
        for i in 0..parts.len() {
            let Some(tok) = self.added.iter().find(|t| t.content == parts[i]).cloned() else {
                continue;
            };
            // As in Python, the single_word tests look at the neighbours as they were before the
            // stripping.
            let left = i
                .checked_sub(1)
                .map(|j| parts[j].clone())
                .unwrap_or_default();
            let right = parts.get(i + 1).cloned().unwrap_or_default();
            if tok.rstrip && !right.is_empty() {
                parts[i + 1] = right.trim_start_matches(py_isspace).to_string();
            }
            if tok.lstrip && !left.is_empty() {
                parts[i - 1] = left.trim_end_matches(py_isspace).to_string();
            }
            if tok.single_word && !left.is_empty() && !left.ends_with(' ') {
                let t = std::mem::take(&mut parts[i]);
                parts[i - 1].push_str(&t);
            } else if tok.single_word && !right.is_empty() && !right.starts_with(' ') {
                let t = std::mem::take(&mut parts[i]);
                parts[i + 1].insert_str(0, &t);
            }
        }
        let mut out = Vec::new();
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            if let Some(id) = self.added_id(&part) {
                out.push((part, id));
                continue;
            }
            for (piece, id) in self.model.encode(&part)? {
                let id = self.added_id(&piece).unwrap_or(id);
                out.push((piece, id));
            }
        }
        Ok(out)
    }

    fn is_special_id(&self, id: u32) -> bool {
        self.added.iter().any(|t| t.special && t.id == id)
    }

    fn id_to_token(&self, id: u32) -> Option<&str> {
        self.added
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.content.as_str())
            .or_else(|| self.model.id_to_token(id))
    }

    /// `decode(ids, skip_special_tokens=True)` as the tokenizer.json backend does it: special tokens
    /// dropped, pieces joined, `'▁'` -> `' '`, the leading space removed.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::new();
        for &id in ids {
            if self.is_special_id(id) {
                continue;
            }
            let token = self.id_to_token(id).ok_or_else(|| {
                Error::Tokenizer(format!("cannot decode id {id}: not in the vocabulary"))
            })?;
            text.push_str(token);
        }
        let text = text.replace(SPACE_SYMBOL, " ");
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_string())
    }

    fn vocab_size(&self) -> usize {
        let beyond = self
            .added
            .iter()
            .filter(|t| t.id as usize >= self.model.vocab_size())
            .count();
        self.model.vocab_size() + beyond
    }
}

// ------------------------------------------------------------------------------------------------
// PromptTokenizer
// ------------------------------------------------------------------------------------------------

impl PromptTokenizer {
    /// Loads the tokenizer folder: `tokenizer.json` when present, else `sentencepiece.bpe.model`;
    /// plus `tokenizer_config.json` (and `special_tokens_map.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        let json = dir.join(TOKENIZER_JSON);
        let spm = dir.join(SENTENCEPIECE_MODEL);
        let config = TokenizerConfig::load(&dir.join("tokenizer_config.json"))?;
        let specials = SpecialTokens::load(dir)?;
        if json.is_file() {
            Self::load_json(&json, config, &specials)
        } else if spm.is_file() {
            Self::load_sentencepiece(&spm, config, &specials)
        } else {
            Err(Error::Model {
                path: dir.to_path_buf(),
                message: format!(
                    "no tokenizer: neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL} is in the \
                     tokenizer folder"
                ),
            })
        }
    }

    /// The id of a special-token role; an error naming the config file and field if the token is
    /// not in the vocabulary.
    fn role_id(
        specials: &SpecialTokens,
        role: &str,
        vocab_file: &Path,
        lookup: impl Fn(&str) -> Option<u32>,
    ) -> Result<Option<u32>> {
        let Some(spec) = specials.role(role) else {
            return Ok(None);
        };
        match lookup(&spec.content) {
            Some(id) => Ok(Some(id)),
            None => {
                let message = format!(
                    "`{}` is not in the vocabulary of {}",
                    spec.content,
                    vocab_file.display()
                );
                Err(match &spec.file {
                    Some(file) => Error::config(file, role, message),
                    None => Error::Model {
                        path: vocab_file.to_path_buf(),
                        message: format!("the default {role} {message}"),
                    },
                })
            }
        }
    }

    /// The ids `<s>` (cls), `</s>` (sep) and `<pad>` of the encoding, checking every special token.
    fn special_ids(
        specials: &SpecialTokens,
        vocab_file: &Path,
        lookup: impl Fn(&str) -> Option<u32>,
    ) -> Result<(u32, u32, u32)> {
        let mut ids = HashMap::new();
        for (role, _, _) in ROLES {
            if let Some(id) = Self::role_id(specials, role, vocab_file, &lookup)? {
                ids.insert(role, id);
            }
        }
        let need = |role: &str| {
            ids.get(role).copied().ok_or_else(|| Error::Model {
                path: vocab_file.to_path_buf(),
                message: format!("the tokenizer config sets no {role}, which prompts need"),
            })
        };
        Ok((need("cls_token")?, need("sep_token")?, need("pad_token")?))
    }

    fn load_json(json: &Path, config: TokenizerConfig, specials: &SpecialTokens) -> Result<Self> {
        let mut inner = Tokenizer::from_file(json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let (bos, eos, pad) = Self::special_ids(specials, json, |t| inner.token_to_id(t))?;
        Ok(Self {
            inner: Inner::Json(Box::new(inner)),
            bos,
            eos,
            pad,
            config,
        })
    }

    fn load_sentencepiece(
        spm: &Path,
        config: TokenizerConfig,
        specials: &SpecialTokens,
    ) -> Result<Self> {
        let model = XlmRobertaSentencePiece::load(spm)?;
        // Added tokens: added_tokens_decoder (id as given), then the named special tokens it does not
        // list (their vocabulary ids).
        let mut added: Vec<AddedToken> = specials
            .decoder
            .iter()
            .map(|(id, s)| AddedToken {
                content: s.content.clone(),
                id: *id,
                lstrip: s.lstrip,
                rstrip: s.rstrip,
                single_word: s.single_word,
                special: s.special,
            })
            .collect();
        for (_, spec) in &specials.roles {
            let Some(spec) = spec else { continue };
            if added.iter().any(|t| t.content == spec.content) || !model.contains(&spec.content) {
                continue;
            }
            added.push(AddedToken {
                content: spec.content.clone(),
                id: model.token_to_id(&spec.content),
                lstrip: spec.lstrip,
                rstrip: spec.rstrip,
                single_word: spec.single_word,
                special: true,
            });
        }
        added.retain(|t| !t.content.is_empty());
        let added_ids: HashMap<String, u32> =
            added.iter().map(|t| (t.content.clone(), t.id)).collect();
        let lookup = |t: &str| {
            added_ids
                .get(t)
                .copied()
                .or_else(|| model.contains(t).then(|| model.token_to_id(t)))
        };
        let (bos, eos, pad) = Self::special_ids(specials, spm, lookup)?;
        Ok(Self {
            inner: Inner::Slow(Box::new(SlowTokenizer {
                model,
                added,
                added_ids,
            })),
            bos,
            eos,
            pad,
            config,
        })
    }

    /// Which file the vocabulary came from.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Json(_) => Backend::TokenizerJson,
            Inner::Slow(_) => Backend::SentencePiece,
        }
    }

    /// The tokenizer's `model_max_length`, if it sets a real one.
    pub fn model_max_length(&self) -> Option<usize> {
        self.config.max_length()
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id every encoding starts with (`cls_token`, `<s>`).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id every encoding ends with (`sep_token`, `</s>`).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// `len(tokenizer)`: the number of ids, added tokens included (the text encoder's vocab_size).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Json(t) => t.get_vocab_size(true),
            Inner::Slow(t) => t.vocab_size(),
        }
    }

    /// The pieces and ids of `text` without `<s>` / `</s>` (transformers' `tokenize` +
    /// `convert_tokens_to_ids`). With the sentencepiece backend, unknown text keeps its characters
    /// as the piece (id `<unk>`); added tokens in the text appear as themselves.
    pub fn pieces(&self, text: &str) -> Result<(Vec<String>, Vec<u32>)> {
        match &self.inner {
            Inner::Json(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
                Ok((enc.get_tokens().to_vec(), enc.get_ids().to_vec()))
            }
            Inner::Slow(t) => Ok(t.tokenize(text)?.into_iter().unzip()),
        }
    }

    /// The id of the vocabulary entry `token` itself, if there is one (transformers'
    /// `get_vocab().get(token)`; webui finds the comma token this way).
    pub fn vocab_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Json(t) => t.token_to_id(token),
            Inner::Slow(t) => t
                .added_ids
                .get(token)
                .copied()
                .or_else(|| t.model.contains(token).then(|| t.model.token_to_id(token))),
        }
    }

    /// The ids of `text` without `<s>` / `</s>`.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.pieces(text)?.1)
    }

    /// Text of `ids`, special tokens (`<s>`, `<unk>`, `<mask>`, ...) left out, `'▁'` as spaces.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Json(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Inner::Slow(t) => t.decode(ids),
        }
    }

    /// Tokenises, truncates and pads `text` to `max_length` (at least 2: `<s>` and `</s>`).
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Tokenized> {
        if max_length < 2 {
            return Err(Error::usage(format!(
                "max length {max_length} is too small: it must hold <s> and </s>"
            )));
        }
        let content = self.ids(text)?;
        let room = max_length - 2;
        let dropped = if content.len() > room {
            Some(self.decode(&content[room..])?.trim().to_string())
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

    fn fixtures() -> PathBuf {
        crate::test_support::fixture("")
    }

    /// tokenizer.json backend.
    fn tiny() -> PromptTokenizer {
        PromptTokenizer::load(&fixtures().join("models/tiny-m18/tokenizer")).unwrap()
    }

    /// sentencepiece backend: the hub layout has no tokenizer.json.
    fn tiny_hub() -> PromptTokenizer {
        PromptTokenizer::load(&fixtures().join("models/tiny-m18-hub/tokenizer")).unwrap()
    }

    fn cases() -> Vec<(String, Vec<u32>, Vec<u32>)> {
        crate::test_support::tokenizer_cases()
    }

    /// A scratch tokenizer folder holding the tiny sentencepiece model and `files`.
    fn scratch(name: &str, files: &[(&str, &str)], with_model: bool) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "altdiff-tokenizer-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if with_model {
            std::fs::copy(
                fixtures().join("models/tiny-m18-hub/tokenizer/sentencepiece.bpe.model"),
                dir.join(SENTENCEPIECE_MODEL),
            )
            .unwrap();
        }
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn backends_follow_the_files() {
        assert_eq!(tiny().backend(), Backend::TokenizerJson);
        let hub = tiny_hub();
        assert_eq!(hub.backend(), Backend::SentencePiece);
        assert_eq!(hub.model_max_length(), Some(77));
        assert_eq!((hub.bos_id(), hub.eos_id(), hub.pad_id()), (0, 2, 1));
        assert_eq!(hub.vocab_size(), 1002);
        assert_eq!(tiny().vocab_size(), 1002);
    }

    /// Ids from transformers' fast tokenizer (the same tokenizer.json) for every recorded text: the
    /// slow ids where they agree, `fast_ids` where the fast tokenizer differs.
    #[test]
    fn tokenizer_json_ids_equal_transformers_fast() {
        let cases = cases();
        assert!(cases.len() > 200);
        let tok = tiny();
        for (text, _, fast) in cases {
            let got = tok.encode(&text, fast.len()).unwrap();
            assert_eq!(got.ids, fast, "{text:?}");
            assert!(got.mask.iter().all(|&m| m == 1));
            assert_eq!(got.dropped, None);
        }
    }

    /// The sentencepiece backend gives exactly transformers' slow `XLMRobertaTokenizer` ids
    /// (`tok(text)["input_ids"]`) for every recorded text, no exceptions.
    #[test]
    fn sentencepiece_ids_equal_transformers_slow() {
        let cases = cases();
        assert!(cases.len() > 200);
        let tok = tiny_hub();
        let mut differ_from_fast = 0;
        for (text, slow, fast) in cases {
            let got = tok.encode(&text, slow.len()).unwrap();
            assert_eq!(got.ids, slow, "{text:?}");
            assert!(got.mask.iter().all(|&m| m == 1));
            assert_eq!(got.dropped, None);
            differ_from_fast += usize::from(slow != fast);
        }
        assert_eq!(differ_from_fast, 6);
    }

    /// Truncation and padding give the same `Tokenized` (dropped text included) with both backends
    /// wherever the slow and fast ids agree.
    #[test]
    fn backends_agree_on_truncation_and_padding() {
        let (json, spm) = (tiny(), tiny_hub());
        let mut truncated = 0;
        for (text, slow, fast) in cases() {
            if slow != fast {
                continue;
            }
            for max_length in [2, 3, 5, 16, 77, slow.len(), slow.len() + 3] {
                let a = json.encode(&text, max_length).unwrap();
                let b = spm.encode(&text, max_length).unwrap();
                assert_eq!(a, b, "{text:?} {max_length}");
                truncated += usize::from(a.dropped.is_some());
            }
            assert_eq!(
                json.decode(&slow).unwrap(),
                spm.decode(&slow).unwrap(),
                "{text:?}"
            );
        }
        assert!(truncated > 300, "{truncated}");
    }

    #[test]
    fn pads_truncates_and_reports_dropped_text() {
        for tok in [tiny(), tiny_hub()] {
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

    #[test]
    fn slow_tokenizer_splits_on_special_tokens() {
        let tok = tiny_hub();
        let (pieces, ids) = tok.pieces("a   <mask>  b").unwrap();
        assert_eq!(pieces, ["▁a", "<mask>", "▁b"]);
        assert_eq!(ids, [27, 1001, 54]);
        let (pieces, ids) = tok.pieces("a<s>b QQ").unwrap();
        assert_eq!(pieces, ["▁a", "<s>", "▁b", "▁", "QQ"]);
        assert_eq!(ids[..3], [27, 0, 54]);
        assert_eq!(ids[4], 3, "unknown text keeps its characters, id <unk>");
        // <s> and <unk> are special: left out, as by the tokenizer.json backend.
        assert_eq!(tok.decode(&ids).unwrap(), "a b ");
        assert_eq!(tiny().decode(&ids).unwrap(), "a b ");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = scratch("empty", &[], false);
        let err = PromptTokenizer::load(&dir).err().unwrap().to_string();
        assert!(
            err.contains(TOKENIZER_JSON) && err.contains(SENTENCEPIECE_MODEL),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn config_special_tokens_are_checked() {
        // A bos token absent from the vocabulary: an error naming the file and the field.
        let dir = scratch(
            "bad-bos",
            &[(
                "tokenizer_config.json",
                r#"{"bos_token": "[BOS]", "model_max_length": 77}"#,
            )],
            true,
        );
        let err = PromptTokenizer::load(&dir).err().unwrap();
        assert!(
            matches!(&err, Error::Config { field, .. } if field == "bos_token"),
            "{err}"
        );
        assert!(err.to_string().contains("[BOS]"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
        // special_tokens_map.json (read for configs without added_tokens_decoder) is checked too.
        let dir = scratch(
            "bad-pad",
            &[
                ("tokenizer_config.json", r#"{"model_max_length": 512}"#),
                (
                    "special_tokens_map.json",
                    r#"{"pad_token": {"content": "[PAD]"}}"#,
                ),
            ],
            true,
        );
        let err = PromptTokenizer::load(&dir).err().unwrap().to_string();
        assert!(err.contains("pad_token") && err.contains("[PAD]"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
        // A legacy config (no added_tokens_decoder; mask as an AddedToken dict) works like the
        // current one, and model_max_length is honoured.
        let dir = scratch(
            "legacy",
            &[(
                "tokenizer_config.json",
                r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>",
                    "mask_token": {"content": "<mask>", "lstrip": true, "rstrip": false,
                                   "normalized": true, "single_word": false,
                                   "__type": "AddedToken"},
                    "model_max_length": 512, "tokenizer_class": "XLMRobertaTokenizer"}"#,
            )],
            true,
        );
        let legacy = PromptTokenizer::load(&dir).unwrap();
        assert_eq!(legacy.model_max_length(), Some(512));
        let hub = tiny_hub();
        for text in ["a   <mask>  b", "x <unk> y <pad> z", "<s>a</s>"] {
            assert_eq!(
                legacy.ids(text).unwrap(),
                hub.ids(text).unwrap(),
                "{text:?}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
        // No config at all: the defaults.
        let dir = scratch("no-config", &[], true);
        let bare = PromptTokenizer::load(&dir).unwrap();
        assert_eq!(bare.model_max_length(), None);
        assert_eq!(bare.ids("a <mask>").unwrap(), hub.ids("a <mask>").unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn python_whitespace() {
        for c in [
            '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{1c}', '\u{1f}', ' ', '\u{85}', '\u{a0}',
        ] {
            assert!(py_isspace(c), "{c:?}");
        }
        for c in [
            '\u{1680}', '\u{2000}', '\u{200a}', '\u{2028}', '\u{202f}', '\u{205f}', '\u{3000}',
        ] {
            assert!(py_isspace(c), "{c:?}");
        }
        for c in ['\u{200b}', '\u{180e}', '\u{feff}', 'a', '\u{0}', '\u{1b}'] {
            assert!(!py_isspace(c), "{c:?}");
        }
    }
}
