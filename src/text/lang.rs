//! Prompt languages: the language sets of AltDiffusion m9 and m18, `--lang` parsing, and detection of
//! a prompt's language.
//!
//! AltDiffusion's text encoder is XLM-R, which encodes text in any of its ~100 languages; the m9 and m18
//! models were trained on 9 and 18 of them (REFERENCE.md). The language therefore never changes how a
//! prompt is encoded: it is reported, written to file names and metadata, and checked so that the user
//! hears about a prompt in a language the model was not trained on, or a `--lang` that contradicts the
//! text.
//!
//! Since the language goes into file names and metadata, [`detect`] claims one only where the text
//! settles it and otherwise says nothing ([`LangDecision::code`] is then `und`, ISO 639's
//! "undetermined"); a wrong language is worse than none. The policy:
//!
//! - Mixed scripts: the longest run of one script decides, alone (`runs`: letters of one script
//!   with whatever is not a letter in between; hangul, kana and han are one group; a CJK character
//!   weighs 3 letters, about a syllable). `一只红狐狸, in snow: winter` is Chinese (15 against 12);
//!   runs of the same weight in two scripts are `und`, and so is a winning run that is weak by the
//!   rules below (`Katze, cat, 猫`: two Latin words).
//! - The script decides from one word where only one of the 18 writes it: hangul Korean, kana
//!   Japanese, Thai, Devanagari Hindi, Arabic script Arabic (unless it has Persian or Urdu letters),
//!   Cyrillic with і ї є ґ Ukrainian and with ы э ъ ё Russian (both: `und`); han with forms only
//!   Japanese uses is Japanese, with simplified forms Japanese does not use Chinese, else Chinese
//!   from 8 characters and `und` below (`猫`, `東京夜景` could be either).
//! - Latin script: one or two words only by letters only one of the 10 Latin-script languages
//!   writes (Polish ł, Turkish ı ğ ş, German ß ä, Spanish ñ, French œ, Vietnamese ơ ư đ ă and the
//!   tone-marked vowels), else `und` (`cat` and `Katze` are words, not evidence). Three words when
//!   the tells (words and spellings only one language uses) and `whatlang`, restricted to the 18,
//!   make a reliable decision; from four words also when the tells alone decide, or lead when the
//!   frequent words some languages share count too (`latin_claim`); an unreliable whatlang vote
//!   never decides alone.
//! - Cyrillic without telling letters: the telling words and endings (Russian `-ая`, `что`,
//!   Ukrainian `що`, `-ння`) with whatlang, claimed only when reliable.
//!
//! Measured with `cargo test --test languages -- --nocapture` (no model, no accelerator needed):
//! the 126-sentence corpus (tools/fixtures/corpus-18-languages.txt) 126/126 right, as before; the
//! short prompts (tools/fixtures/short-prompts.tsv, 13 to 18 per language) at 1, 2 and 3 words 32%,
//! 52% and 46% right (of 85, 97 and 95), the rest `und`, none wrong (before, on the first 72 of
//! each: 32, 20 and 12 wrong, `cat` Vietnamese, `Katze` Turkish); hangul, kana, Thai, Devanagari
//! and Arabic words all right; Latin-script languages mostly `und` below four words (46 of 46
//! four- and five-word prompts: 25 right, 21 `und`); 51 mixed prompts
//! (tools/fixtures/mixed-prompts.tsv) 24 right, 27 `und`, none wrong (before, on the first 42: 11
//! wrong). `whatlang` stays: on sentences it is right, and the tells
//! and rules above keep its guesses on short text out of the file names. [`check`] still compares
//! a `--lang` with the whole text's most likely language (`contradiction`), which warns only where
//! that language is reliable, in another script, or clearly ahead in a pairwise comparison.

use std::fmt;

use crate::config::TextEncoderConfig;
use crate::error::{Error, Result};

/// One language of AltDiffusion's training sets.
#[derive(Debug, PartialEq, Eq)]
pub struct Language {
    /// ISO 639-1 code (`fr`).
    pub code: &'static str,
    /// English name (`French`).
    pub english: &'static str,
    /// The language's name for itself, in its own script (`Français`).
    pub native: &'static str,
    /// One of AltDiffusion-m9's 9 languages.
    pub m9: bool,
    /// One of AltDiffusion-m18's 18 languages.
    pub m18: bool,
}

impl fmt::Display for Language {
    /// `fr (French)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code, self.english)
    }
}

const fn lang(
    code: &'static str,
    english: &'static str,
    native: &'static str,
    m9: bool,
) -> Language {
    Language {
        code,
        english,
        native,
        m9,
        m18: true,
    }
}

/// The union of both models' languages (m18's set, which contains m9's), in m18's order.
pub const LANGUAGES: &[Language] = &[
    lang("en", "English", "English", true),
    lang("zh", "Chinese", "中文", true),
    lang("ja", "Japanese", "日本語", true),
    lang("th", "Thai", "ไทย", false),
    lang("ko", "Korean", "한국어", true),
    lang("hi", "Hindi", "हिन्दी", false),
    lang("uk", "Ukrainian", "Українська", false),
    lang("ar", "Arabic", "العربية", true),
    lang("tr", "Turkish", "Türkçe", false),
    lang("vi", "Vietnamese", "Tiếng Việt", false),
    lang("pl", "Polish", "Polski", false),
    lang("nl", "Dutch", "Nederlands", false),
    lang("pt", "Portuguese", "Português", false),
    lang("it", "Italian", "Italiano", true),
    lang("es", "Spanish", "Español", true),
    lang("de", "German", "Deutsch", false),
    lang("fr", "French", "Français", true),
    lang("ru", "Russian", "Русский", true),
];

/// Other names accepted by [`parse`] (lowercase, `_` written `-`): ISO 639-2/B, 639-2/T and 639-3
/// codes, macrolanguage members and common names.
const ALIASES: &[(&str, &str)] = &[
    ("eng", "en"),
    ("zho", "zh"),
    ("chi", "zh"),
    ("cmn", "zh"),
    ("yue", "zh"),
    ("mandarin", "zh"),
    ("cantonese", "zh"),
    ("zh-hans", "zh"),
    ("zh-hant", "zh"),
    ("simplified chinese", "zh"),
    ("traditional chinese", "zh"),
    ("jpn", "ja"),
    ("jp", "ja"),
    ("tha", "th"),
    ("kor", "ko"),
    ("kr", "ko"),
    ("hin", "hi"),
    ("ukr", "uk"),
    ("ua", "uk"),
    ("ara", "ar"),
    ("arb", "ar"),
    ("tur", "tr"),
    ("vie", "vi"),
    ("pol", "pl"),
    ("nld", "nl"),
    ("dut", "nl"),
    ("flemish", "nl"),
    ("por", "pt"),
    ("brazilian portuguese", "pt"),
    ("ita", "it"),
    ("spa", "es"),
    ("castilian", "es"),
    ("deu", "de"),
    ("ger", "de"),
    ("fra", "fr"),
    ("fre", "fr"),
    ("rus", "ru"),
];

/// The language with this ISO 639-1 code (exact, lowercase), if it is one of the 18.
pub fn by_code(code: &str) -> Option<&'static Language> {
    LANGUAGES.iter().find(|l| l.code == code)
}

/// The comma-separated list of valid codes, for messages.
pub fn valid_codes() -> String {
    LANGUAGES
        .iter()
        .map(|l| l.code)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a `--lang` value: an ISO 639-1 code in any case (`fr`, `FR`), an English or native name
/// (`french`, `Français`), a 3-letter ISO 639-2/3 code (`fra`, `fre`, `cmn`) or a BCP 47 tag whose
/// language part is one of those (`zh-CN`, `zh_Hans`, `pt-BR`, `en-US`).
///
/// Anything else is a usage error naming the input and listing the valid codes.
pub fn parse(s: &str) -> Result<&'static Language> {
    let key = s.trim().to_lowercase().replace('_', "-");
    lookup(&key)
        .or_else(|| {
            // A BCP 47 tag: the language subtag comes first (`pt-br`, `zh-hans-cn`).
            let primary = key.split('-').next().unwrap_or_default();
            (primary.len() != key.len() && !primary.is_empty())
                .then(|| lookup(primary))
                .flatten()
        })
        .ok_or_else(|| {
            Error::usage(format!(
                "unknown language `{}` (valid codes: {}; English names such as `french` work too)",
                s.trim(),
                valid_codes()
            ))
        })
}

fn lookup(key: &str) -> Option<&'static Language> {
    by_code(key)
        .or_else(|| {
            LANGUAGES
                .iter()
                .find(|l| l.english.to_lowercase() == key || l.native.to_lowercase() == key)
        })
        .or_else(|| {
            ALIASES
                .iter()
                .find(|(alias, _)| *alias == key)
                .and_then(|(_, code)| by_code(code))
        })
}

/// Which language set a model was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelLanguages {
    /// AltDiffusion-m9: en zh es fr ru ja ko ar it.
    M9,
    /// AltDiffusion-m18: en zh ja th ko hi uk ar tr vi pl nl pt it es de fr ru.
    M18,
}

impl ModelLanguages {
    /// m18 iff the text encoder has m18's pre-transformation (`has_pre_transformation`).
    pub fn from_text_encoder(cfg: &TextEncoderConfig) -> Self {
        if cfg.has_pre_transformation {
            Self::M18
        } else {
            Self::M9
        }
    }

    /// Whether the model was trained on `lang`.
    pub fn supports(&self, lang: &Language) -> bool {
        match self {
            Self::M9 => lang.m9,
            Self::M18 => lang.m18,
        }
    }

    /// `m9` or `m18`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::M9 => "m9",
            Self::M18 => "m18",
        }
    }

    /// The model's languages, in [`LANGUAGES`] order.
    pub fn languages(self) -> impl Iterator<Item = &'static Language> {
        LANGUAGES.iter().filter(move |l| self.supports(l))
    }

    /// The model's codes, comma-separated, for messages.
    pub fn codes(self) -> String {
        self.languages()
            .map(|l| l.code)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for ModelLanguages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ModelLanguages {
    type Err = String;

    /// `m9` / `m18` in any case, also as `AltDiffusion-m18` or `BAAI/AltDiffusion-m18`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let lower = s.trim().to_lowercase();
        let name = lower.strip_prefix("baai/").unwrap_or(&lower);
        let name = name.strip_prefix("altdiffusion-").unwrap_or(name);
        match name {
            "m9" => Ok(Self::M9),
            "m18" => Ok(Self::M18),
            _ => Err(format!("unknown model `{s}` (expected m9 or m18)")),
        }
    }
}

/// The outcome of [`detect`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// The language the text settles, among the 18 (see [`detect`]).
    pub language: &'static Language,
    /// 0 to 1.
    pub confidence: f64,
    /// Whether the text is clear enough to contradict a `--lang` (the script decides, or whatlang is
    /// confident, and little of the text is in another script).
    pub reliable: bool,
}

impl fmt::Display for Detection {
    /// `zh (Chinese), confidence 0.95` plus `, unreliable` when not reliable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, confidence {:.2}{}",
            self.language,
            self.confidence,
            if self.reliable { "" } else { ", unreliable" }
        )
    }
}

/// The writing systems that matter for the 18 languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Latin,
    Cyrillic,
    Arabic,
    Devanagari,
    Thai,
    Hangul,
    Kana,
    Han,
    Other,
}

fn script_of(c: char) -> Option<Script> {
    // Only letters (and the letter-like marks of Thai and Devanagari) count: digits, punctuation,
    // symbols and emoji say nothing about the language.
    if !c.is_alphabetic() {
        return None;
    }
    let u = u32::from(c);
    Some(match u {
        0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F | 0x1E00..=0x1EFF | 0xFF21..=0xFF5A => {
            Script::Latin
        }
        0x400..=0x52F | 0x1C80..=0x1C8F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Script::Cyrillic,
        0x600..=0x6FF | 0x750..=0x77F | 0x8A0..=0x8FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => {
            Script::Arabic
        }
        0x900..=0x97F | 0xA8E0..=0xA8FF => Script::Devanagari,
        0xE00..=0xE7F => Script::Thai,
        0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F | 0xAC00..=0xD7FF => Script::Hangul,
        0x3040..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F => Script::Kana,
        0x3005
        | 0x3007
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xF900..=0xFAFF
        | 0x20000..=0x3FFFF => Script::Han,
        _ => Script::Other,
    })
}

/// Kanji forms used in Japanese but in neither simplified nor traditional Chinese (Japanese
/// shinjitai, plus the iteration mark).
const JAPANESE_ONLY_HAN: &str = "々気広駅図売読続県変歳黒鉄関円辺団拡薬転戦塩営栄験険権帰価悪圧仏沢様単実対発検経緑涙顔満霊闘獣焼暁晩歩渋絵髪姫竜剣桜楽浜";

/// Simplified Chinese forms that Japanese writes differently (and traditional Chinese too).
const SIMPLIFIED_ONLY_HAN: &str = "们这个说时东车马鸟鱼风门见长龙爱头发红绿蓝书边张开关从对过还进远运问间题飞电脑场树桥员骑细节绘鸡晚际线两园脉宁灵详术缭绕轻岛鸭鹰鹤凤龟虾阳阴雾梦战剑枪宫丽华汉态银铁钟镜兰樱莲苹师么吗无实图窗满儿猎狮贝壳";

/// Letters counted per script; CJK characters count double in [`Counts::groups`], since one
/// character carries about what a short Latin word does.
#[derive(Debug, Default)]
struct Counts {
    latin: usize,
    cyrillic: usize,
    arabic: usize,
    devanagari: usize,
    thai: usize,
    hangul: usize,
    kana: usize,
    han: usize,
    other: usize,
    japanese_only_han: usize,
    simplified_only_han: usize,
}

impl Counts {
    fn of(text: &str) -> Self {
        let mut n = Self::default();
        for c in text.chars() {
            let Some(script) = script_of(c) else { continue };
            match script {
                Script::Latin => n.latin += 1,
                Script::Cyrillic => n.cyrillic += 1,
                Script::Arabic => n.arabic += 1,
                Script::Devanagari => n.devanagari += 1,
                Script::Thai => n.thai += 1,
                Script::Hangul => n.hangul += 1,
                Script::Kana => n.kana += 1,
                Script::Han => {
                    n.han += 1;
                    if JAPANESE_ONLY_HAN.contains(c) {
                        n.japanese_only_han += 1;
                    }
                    if SIMPLIFIED_ONLY_HAN.contains(c) {
                        n.simplified_only_han += 1;
                    }
                }
                Script::Other => n.other += 1,
            }
        }
        n
    }

    /// The weight of each script group: CJK (hangul, kana and han together) counts double.
    fn groups(&self) -> [(Script, usize); 7] {
        [
            (Script::Latin, self.latin),
            (Script::Cyrillic, self.cyrillic),
            (Script::Arabic, self.arabic),
            (Script::Devanagari, self.devanagari),
            (Script::Thai, self.thai),
            (Script::Han, 2 * (self.hangul + self.kana + self.han)),
            (Script::Other, self.other),
        ]
    }
}

/// Share of the text a detection's script must have to be reliable.
const RELIABLE_SCRIPT_SHARE: f64 = 0.7;

/// The language of `text` among the 18, claimed only where the evidence settles it; `None`
/// (reported as `und`, undetermined) otherwise. The policy, in the module header: the longest run
/// of one script decides (`runs`); a script only one of the 18 uses is claimed from one word;
/// Latin-script text from three words on, when the tells and whatlang clearly agree; one or two
/// Latin words only by letters only one of the 10 Latin-script languages writes.
///
/// `None` too for text without letters (digits, punctuation, emoji) or in a script none of the 18
/// uses (Greek, Hebrew, ...).
pub fn detect(text: &str) -> Option<Detection> {
    let runs = runs(text);
    let total: usize = runs.iter().map(|r| r.weight).sum();
    let best = runs.iter().max_by_key(|r| r.weight)?;
    // Two runs of the same length in different scripts: no majority, and nothing to choose by.
    if runs
        .iter()
        .any(|r| r.weight == best.weight && r.group != best.group)
    {
        return None;
    }
    let (code, confidence, reliable) = claim_run(best)?;
    let share = best.weight as f64 / total as f64;
    Some(Detection {
        language: by_code(code)?,
        confidence: confidence * share,
        reliable: reliable && share >= RELIABLE_SCRIPT_SHARE,
    })
}

/// What one CJK character (han, kana or hangul) weighs against one letter of an alphabet when runs
/// are compared: a CJK character is a syllable, and often a word, where an English word averages
/// about five letters and a Chinese word under two characters.
const CJK_WEIGHT: usize = 3;

/// A stretch of text whose letters are all of one script group (hangul, kana and han are one
/// group: Japanese mixes kana and kanji, Korean may use hanja): from its first letter to its last,
/// with whatever is not a letter in between (spaces, punctuation, digits, emoji, `(word:1.3)`
/// brackets); a letter of another group starts the next run.
#[derive(Debug)]
struct Run<'a> {
    group: Script,
    text: &'a str,
    /// Its letters, each CJK character counted [`CJK_WEIGHT`] times.
    weight: usize,
}

fn group_of(script: Script) -> Script {
    match script {
        Script::Hangul | Script::Kana | Script::Han => Script::Han,
        s => s,
    }
}

/// The runs of `text`, in order.
fn runs(text: &str) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    // (group, first byte, end byte, weight) of the run being read.
    let mut current: Option<(Script, usize, usize, usize)> = None;
    fn close<'a>(
        runs: &mut Vec<Run<'a>>,
        text: &'a str,
        (group, start, end, weight): (Script, usize, usize, usize),
    ) {
        runs.push(Run {
            group,
            text: &text[start..end],
            weight,
        });
    }
    for (i, c) in text.char_indices() {
        let Some(script) = script_of(c) else { continue };
        let group = group_of(script);
        let weight = if group == Script::Han { CJK_WEIGHT } else { 1 };
        let end = i + c.len_utf8();
        match current.as_mut() {
            Some(run) if run.0 == group => {
                run.2 = end;
                run.3 += weight;
            }
            _ => {
                if let Some(run) = current.take() {
                    close(&mut runs, text, run);
                }
                current = Some((group, i, end, weight));
            }
        }
    }
    if let Some(run) = current {
        close(&mut runs, text, run);
    }
    runs
}

/// The words of a run: its stretches of letters (`guarda-chuva` and `l'orage` are two).
fn word_count(text: &str) -> usize {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .count()
}

/// Latin-script text needs this many words before its language is claimed from words: one or
/// two words are too few for the tells or whatlang (`cat` looks Vietnamese to whatlang, `Katze`
/// Turkish).
const LATIN_MIN_WORDS: usize = 3;

/// Letters that only one of the 10 Latin-script languages among the 18 writes; enough to claim
/// one or two words. (Portuguese ã and õ are Vietnamese letters too; ç, ö, ü and the acute and
/// grave accents are shared.)
const UNIQUE_LATIN_LETTERS: &[(&str, &str)] = &[
    ("pl", "łąęśźżćńŁĄĘŚŹŻĆŃ"),
    ("tr", "ğışĞİŞ"),
    ("de", "ßäÄẞ"),
    ("es", "ñÑ¿¡"),
    ("fr", "œŒ"),
    ("vi", "ơưđăƠƯĐĂ"),
];

/// The one Latin-script language whose own letters `text` has, if exactly one language's.
fn unique_latin_letters(text: &str) -> Option<&'static str> {
    let mut found = UNIQUE_LATIN_LETTERS.iter().filter_map(|(code, letters)| {
        let vietnamese =
            *code == "vi" && text.chars().any(|c| ('\u{1EA0}'..='\u{1EF9}').contains(&c));
        (vietnamese || text.chars().any(|c| letters.contains(c))).then_some(*code)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// From this many words on, Latin-script text whose tells and whatlang do not make a reliable
/// decision may still be claimed by [`latin_claim`]'s two checks.
const LATIN_SETTLED_WORDS: usize = 4;

/// Latin-script text of at least [`LATIN_MIN_WORDS`] words: the decision of [`detect_latin`] when
/// reliable. From [`LATIN_SETTLED_WORDS`] words on, also when its own tells alone decide (two
/// points or more, twice any other's), or when, counting the frequent words it shares with some
/// others, it has two points or more and more than any other (Spanish `una` and `en` together are
/// neither Italian nor Portuguese nor French). Three words that whatlang
/// guesses without a tell are not claimed: such guesses were wrong on about a third of the
/// measured three-word prompts (`cozy wooden cabin` is German to it).
fn latin_claim(text: &str) -> Option<(&'static str, f64, bool)> {
    let (code, confidence, reliable) = detect_latin(text, None)?;
    if reliable {
        return Some((code, confidence, reliable));
    }
    if word_count(text) < LATIN_SETTLED_WORDS {
        return None;
    }
    let tells: Vec<&Tells> = LATIN_TELLS.iter().collect();
    let points = |shared: bool| {
        let scores = tell_scores(text, &tells, shared);
        let own = scores
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0.0, |(_, s)| *s);
        let others = scores
            .iter()
            .filter(|(c, _)| *c != code)
            .map(|(_, s)| *s)
            .fold(0.0, f64::max);
        (own, others)
    };
    let (own, others) = points(false);
    let tells_decide = own >= 2.0 && own >= 2.0 * others;
    // Counting the shared words too, more points than each other language; whatlang's unreliable
    // vote breaks no tie here (`un caballero con armadura` is Italian to it, `hello world studio
    // ghibli` Dutch).
    let (own, others) = points(true);
    let ahead_with_shared_words = own >= 2.0 && own > others;
    (tells_decide || ahead_with_shared_words).then_some((code, confidence, false))
}

/// Arabic-script letters of Persian and Urdu that Arabic does not write: such text is not Arabic.
const NOT_ARABIC_LETTERS: &str = "پچژگکیےٹڈڑںہھۀ";

/// The language a run settles, with confidence and reliability; `None` when it does not.
fn claim_run(run: &Run<'_>) -> Option<(&'static str, f64, bool)> {
    let counts = Counts::of(run.text);
    match run.group {
        Script::Han => {
            let (code, confidence, reliable) = detect_cjk(&counts)?;
            // Hangul and kana are claimed from one character; han alone only with forms one of
            // Chinese and Japanese does not use, or when long (see `detect_cjk`).
            (counts.hangul > 0 || counts.kana > 0 || reliable)
                .then_some((code, confidence, reliable))
        }
        Script::Thai => (counts.thai >= 2).then_some(("th", 1.0, true)),
        Script::Devanagari => (counts.devanagari >= 2).then_some(("hi", 1.0, true)),
        Script::Arabic => (counts.arabic >= 2
            && !run.text.chars().any(|c| NOT_ARABIC_LETTERS.contains(c)))
        .then_some(("ar", 1.0, true)),
        Script::Cyrillic => {
            let uk = run.text.chars().any(|c| "іїєґІЇЄҐ".contains(c));
            let ru = run.text.chars().any(|c| "ыэъёЫЭЪЁ".contains(c));
            match (uk, ru) {
                // Letters only one of the two writes: that one, from one word.
                (true, false) => Some(("uk", 1.0, true)),
                (false, true) => Some(("ru", 1.0, true)),
                (true, true) => None,
                (false, false) => detect_cyrillic(run.text, &counts).filter(|d| d.2),
            }
        }
        Script::Latin => {
            if word_count(run.text) < LATIN_MIN_WORDS {
                return unique_latin_letters(run.text).map(|code| (code, 0.9, false));
            }
            latin_claim(run.text)
        }
        _ => None,
    }
}

/// A detection with the script group it was decided in and that group's share of the text.
struct Analysis {
    detection: Detection,
    script: Script,
    share: f64,
}

fn analyse(text: &str) -> Option<Analysis> {
    let counts = Counts::of(text);
    let groups = counts.groups();
    let total: usize = groups.iter().map(|(_, n)| n).sum();
    // The first of the largest groups, in the order above.
    let (script, weight) =
        groups.iter().copied().fold(
            (Script::Other, 0),
            |best, g| if g.1 > best.1 { g } else { best },
        );
    if weight == 0 {
        return None;
    }
    let share = weight as f64 / total as f64;
    let (code, confidence, reliable) = match script {
        Script::Han => detect_cjk(&counts)?,
        Script::Thai => by_script("th", counts.thai),
        Script::Devanagari => by_script("hi", counts.devanagari),
        Script::Arabic => by_script("ar", counts.arabic),
        Script::Cyrillic => detect_cyrillic(text, &counts)?,
        Script::Latin => detect_latin(text, None)?,
        _ => return None,
    };
    Some(Analysis {
        detection: Detection {
            language: by_code(code)?,
            confidence: confidence * share,
            reliable: reliable && share >= RELIABLE_SCRIPT_SHARE,
        },
        script,
        share,
    })
}

/// The script group a language is written in (CJK languages all in [`Script::Han`]'s group).
fn script_group(lang: &Language) -> Script {
    match lang.code {
        "zh" | "ja" | "ko" => Script::Han,
        "ru" | "uk" => Script::Cyrillic,
        "ar" => Script::Arabic,
        "hi" => Script::Devanagari,
        "th" => Script::Thai,
        _ => Script::Latin,
    }
}

/// What the text looks like if it is clearly not in `requested`: a reliable detection of another
/// language; or text mostly in a script `requested` is not written in (even when which language
/// of that script is unsure, say Japanese or Chinese for kanji alone); or, between two languages
/// of the Latin script, the other one winning clearly when only those two are compared (Spanish
/// and Italian may be hard to tell apart on a short prompt, but either is clearly not English).
fn contradiction(text: &str, requested: &'static Language) -> Option<Detection> {
    let a = analyse(text)?;
    let d = a.detection;
    if d.language == requested {
        return None;
    }
    if d.reliable {
        return Some(d);
    }
    if a.share < RELIABLE_SCRIPT_SHARE {
        return None;
    }
    let group = script_group(requested);
    if group != a.script || (requested.code == "ko" && a.script == Script::Han) {
        // Korean is written in hangul, which lost to han or kana.
        return Some(d);
    }
    if a.script != Script::Latin {
        return None;
    }
    let (code, confidence, reliable) =
        detect_latin(text, Some(&[requested.code, d.language.code]))?;
    (reliable && code == d.language.code).then_some(Detection {
        confidence: confidence * a.share,
        reliable,
        ..d
    })
}

/// A script only one of the 18 languages uses: certain, given two letters.
fn by_script(code: &'static str, letters: usize) -> (&'static str, f64, bool) {
    if letters >= 2 {
        (code, 1.0, true)
    } else {
        (code, 0.5, false)
    }
}

/// Hangul means Korean and kana Japanese; han alone is Chinese unless it uses Japanese-only forms.
/// Japanese written in kanji only (`東京夜景`) cannot be told from Chinese, so short han-only text
/// without telling forms is not reliable.
fn detect_cjk(n: &Counts) -> Option<(&'static str, f64, bool)> {
    let cjk = (n.hangul + n.kana + n.han) as f64;
    Some(if n.hangul > 0 && n.hangul >= n.kana {
        let (_, c, r) = by_script("ko", n.hangul);
        ("ko", c * (n.hangul as f64 / cjk).max(0.5), r)
    } else if n.kana > 0 {
        // One kana in a long run of kanji (a particle) is already Japanese; Chinese never uses it.
        if n.kana >= 2 || n.kana as f64 >= 0.1 * cjk {
            ("ja", 1.0, true)
        } else {
            ("ja", 0.7, false)
        }
    } else if n.han == 0 {
        return None;
    } else if n.japanese_only_han > n.simplified_only_han {
        let reliable = n.japanese_only_han >= 2 && n.simplified_only_han == 0;
        ("ja", if reliable { 0.9 } else { 0.6 }, reliable)
    } else if n.simplified_only_han > 0 {
        ("zh", 1.0, true)
    } else if n.han >= 8 && n.japanese_only_han == 0 {
        ("zh", 0.8, true)
    } else {
        ("zh", 0.6, false)
    })
}

/// What tells one language from the others of its script: letters only it uses (two points each),
/// short words only it uses and spellings typical of it (one point each; a spelling ending in `$`
/// only at the end of a word). `also` are frequent words it shares with some of the others: they
/// count only when two languages are compared, where they often tell those two apart (Spanish
/// `una` against Portuguese `uma`).
struct Tells {
    code: &'static str,
    letters: &'static str,
    words: &'static [&'static str],
    spellings: &'static [&'static str],
    also: &'static [&'static str],
}

const CYRILLIC_TELLS: &[Tells] = &[
    Tells {
        code: "uk",
        letters: "іїєґІЇЄҐ",
        words: &["та", "що", "як", "дуже", "з", "й", "це", "або", "його"],
        spellings: &["ння$"],
        also: &[],
    },
    Tells {
        code: "ru",
        letters: "ыэъёЫЭЪЁ",
        words: &[
            "и",
            "с",
            "со",
            "что",
            "как",
            "это",
            "очень",
            "из",
            "или",
            "его",
        ],
        // Long adjective endings: Ukrainian writes `червона`, `синє`, Russian `красная`, `синее`.
        spellings: &["ой$", "ие$", "ия$", "ии$", "ая$", "яя$", "ое$", "ее$"],
        also: &[],
    },
];

/// Ukrainian writes і, ї or є in about one letter in 14, Russian ы, э, ъ or ё in about one in 45:
/// text with neither is Russian by this log-likelihood ratio per letter.
const RUSSIAN_LOG_ODDS_PER_LETTER_WITHOUT_TELLS: f64 = 0.05;

/// Cyrillic: the letters and words above decide, with whatlang's vote added. Without any of them,
/// whatlang when it is sure, else Russian with the confidence its missing letters give (whatlang
/// leans to Ukrainian on short Russian text without telling letters).
fn detect_cyrillic(text: &str, n: &Counts) -> Option<(&'static str, f64, bool)> {
    let tells: Vec<&Tells> = CYRILLIC_TELLS.iter().collect();
    let scores = tell_scores(text, &tells, false);
    let vote = whatlang_vote(
        text,
        Script::Cyrillic,
        &[whatlang::Lang::Rus, whatlang::Lang::Ukr],
    );
    let with_tells: Vec<&str> = scores
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|(c, _)| *c)
        .collect();
    if let [only] = with_tells[..] {
        // Only one of the two has telling letters or words: it, unless whatlang is sure otherwise.
        let (code, confidence, reliable) = decide(scores, vote)?;
        return Some((
            code,
            confidence,
            reliable || (code == only && n.cyrillic >= 4),
        ));
    }
    if !with_tells.is_empty() {
        return decide(scores, vote);
    }
    match vote {
        Some(v) if v.2 => Some(v),
        _ => {
            let odds = (RUSSIAN_LOG_ODDS_PER_LETTER_WITHOUT_TELLS * n.cyrillic as f64).exp();
            let confidence = odds / (1.0 + odds);
            let whatlang = vote.filter(|v| v.0 == "ru").map_or(0.0, |v| v.1);
            Some(("ru", confidence.max(whatlang), false))
        }
    }
}

const LATIN_TELLS: &[Tells] = &[
    Tells {
        code: "en",
        letters: "",
        words: &[
            "the", "of", "and", "with", "at", "from", "under", "during", "are", "this", "that",
            "by", "its", "his", "their", "into", "very", "on",
        ],
        spellings: &[],
        also: &["a", "in", "an", "as", "is", "over", "to"],
    },
    Tells {
        code: "fr",
        letters: "œŒ",
        words: &[
            "les", "des", "du", "une", "et", "avec", "dans", "sur", "au", "aux", "pour", "est",
            "très", "sous", "pendant", "cette", "ses", "leur", "où", "d", "qu", "ce",
        ],
        spellings: &[],
        also: &[
            "un", "la", "le", "en", "de", "l", "a", "à", "sa", "son", "ou", "que",
        ],
    },
    Tells {
        code: "it",
        letters: "",
        words: &[
            "il", "lo", "gli", "della", "delle", "dello", "degli", "dei", "di", "che", "nel",
            "nella", "nei", "nelle", "sul", "sulla", "sulle", "per", "molto", "alla", "all", "è",
            "questo", "questa", "dall", "dalla", "ed", "anche", "tra", "nell",
        ],
        spellings: &["cch", "cci", "zione", "zioni", "ggi"],
        also: &[
            "un", "una", "la", "le", "con", "al", "da", "su", "in", "a", "e", "o", "l", "non",
        ],
    },
    Tells {
        code: "es",
        letters: "ñÑ¿¡",
        words: &[
            "el", "los", "las", "del", "y", "muy", "está", "sus", "unos", "unas", "hay", "pero",
        ],
        spellings: &["ción"],
        also: &[
            "un", "una", "la", "en", "de", "con", "al", "lo", "por", "sobre", "durante", "entre",
            "como", "su", "se", "no", "a", "o", "que",
        ],
    },
    Tells {
        code: "pt",
        letters: "ãõÃÕ",
        words: &[
            "os", "um", "uma", "do", "dos", "em", "com", "ao", "aos", "num", "numa", "pelo",
            "pela", "muito", "é", "não",
        ],
        spellings: &["ção", "ções", "lh"],
        also: &[
            "a", "o", "as", "e", "de", "da", "na", "no", "por", "sobre", "durante", "entre",
            "como", "se", "sua", "das", "que",
        ],
    },
    Tells {
        code: "de",
        letters: "ßäÄ",
        words: &[
            "der", "das", "und", "ein", "eine", "einer", "eines", "einem", "einen", "mit", "im",
            "auf", "bei", "von", "zu", "ist", "sehr", "den", "dem", "nicht", "sich", "am", "vom",
            "zum", "zur",
        ],
        spellings: &[],
        also: &["in", "an", "die", "des", "so"],
    },
    Tells {
        code: "nl",
        letters: "",
        words: &[
            "het", "een", "van", "met", "op", "bij", "zeer", "zijn", "naar", "aan", "uit", "voor",
            "ook", "niet", "onder", "tijdens", "dat",
        ],
        spellings: &["ij"],
        also: &["de", "die", "in", "is", "en", "over", "te", "als"],
    },
    Tells {
        code: "tr",
        letters: "ğışĞİŞ",
        words: &[
            "bir", "ve", "ile", "bu", "çok", "için", "olan", "gibi", "iki",
        ],
        spellings: &[],
        also: &[],
    },
    Tells {
        code: "pl",
        letters: "łąęśźżćńŁĄĘŚŹŻĆŃ",
        words: &[
            "w", "z", "ze", "się", "jest", "bardzo", "oraz", "od", "przy", "pod", "podczas",
        ],
        spellings: &[],
        also: &["na", "i", "to", "o", "do", "a"],
    },
    Tells {
        // And every letter of Latin Extended Additional (ạ ả ấ ầ ẩ ... ỹ), see `tell_scores`.
        code: "vi",
        letters: "ơưđăƠƯĐĂ",
        words: &[
            "và", "của", "trên", "một", "với", "những", "các", "trong", "rất",
        ],
        spellings: &[],
        also: &[],
    },
];

/// The Latin-script languages among the 18, as whatlang names them.
const LATIN_LANGS: &[whatlang::Lang] = &[
    whatlang::Lang::Eng,
    whatlang::Lang::Tur,
    whatlang::Lang::Vie,
    whatlang::Lang::Pol,
    whatlang::Lang::Nld,
    whatlang::Lang::Por,
    whatlang::Lang::Ita,
    whatlang::Lang::Spa,
    whatlang::Lang::Deu,
    whatlang::Lang::Fra,
];

/// Latin script: whatlang's choice among the 10 Latin-script languages, checked against the tells
/// above (whatlang's trigrams alone confuse close languages on short prompts, such as Italian and
/// Spanish).
///
/// With `among`, only those languages compete.
fn detect_latin(text: &str, among: Option<&[&str]>) -> Option<(&'static str, f64, bool)> {
    let competes = |code: &str| among.is_none_or(|codes| codes.contains(&code));
    let langs: Vec<whatlang::Lang> = LATIN_LANGS
        .iter()
        .copied()
        .filter(|l| from_whatlang(*l).is_some_and(competes))
        .collect();
    let tells: Vec<&Tells> = LATIN_TELLS.iter().filter(|t| competes(t.code)).collect();
    let vote = whatlang_vote(text, Script::Latin, &langs);
    decide(tell_scores(text, &tells, among.is_some()), vote)
}

/// Points per language from `tells`, in `tells` order; `pairwise` adds the shared words.
fn tell_scores(text: &str, tells: &[&Tells], pairwise: bool) -> Vec<(&'static str, f64)> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .collect();
    tells
        .iter()
        .map(|t| {
            let mut points = 2 * text.chars().filter(|c| t.letters.contains(*c)).count();
            if t.code == "vi" {
                points += 2 * text
                    .chars()
                    .filter(|c| ('\u{1EA0}'..='\u{1EF9}').contains(c))
                    .count();
            }
            for w in &words {
                points += usize::from(t.words.contains(w));
                points += usize::from(pairwise && t.also.contains(w));
                for spelling in t.spellings {
                    points += match spelling.strip_suffix('$') {
                        Some(ending) => usize::from(w.ends_with(ending)),
                        None => w.matches(spelling).count(),
                    };
                }
            }
            (t.code, points as f64)
        })
        .collect()
}

/// How many points whatlang's choice gets: from 0.5 (a guess) to 3 (confident).
fn whatlang_points(confidence: f64) -> f64 {
    0.5 + 2.5 * confidence
}

/// Points a language needs, and how many times its runner-up's, to be reliable.
const RELIABLE_POINTS: f64 = 3.0;

/// Adds whatlang's vote to the tells' points and takes the best (whatlang's choice on a tie). The
/// outcome is reliable with enough points and a clear lead, or when whatlang is sure and agrees.
fn decide(
    mut scores: Vec<(&'static str, f64)>,
    vote: Option<(&'static str, f64, bool)>,
) -> Option<(&'static str, f64, bool)> {
    if let Some((code, confidence, _)) = vote {
        match scores.iter_mut().find(|(c, _)| *c == code) {
            Some((_, s)) => *s += whatlang_points(confidence),
            None => scores.push((code, whatlang_points(confidence))),
        }
    }
    // whatlang's choice first, so that it wins ties.
    scores.sort_by_key(|(c, _)| Some(*c) != vote.map(|v| v.0));
    let (best, s1) = scores
        .iter()
        .copied()
        .fold(("", 0.0), |b, (c, s)| if s > b.1 { (c, s) } else { b });
    if s1 <= 0.0 {
        return None;
    }
    let s2 = scores
        .iter()
        .filter(|(c, _)| *c != best)
        .map(|(_, s)| *s)
        .fold(0.0, f64::max);
    let mut confidence = (s1 - s2) / s1;
    let mut reliable = s1 >= RELIABLE_POINTS && s1 >= 2.0 * s2;
    if let Some((_, c, r)) = vote.filter(|v| v.0 == best) {
        confidence = confidence.max(c);
        reliable |= r;
    }
    Some((best, confidence, reliable))
}

/// Runs whatlang on the letters of `script` only (other letters become spaces, so that a Latin tag
/// in a Cyrillic prompt does not make whatlang look at the wrong script), allowing only `allowed`.
fn whatlang_vote(
    text: &str,
    script: Script,
    allowed: &[whatlang::Lang],
) -> Option<(&'static str, f64, bool)> {
    let filtered: String = text
        .chars()
        .map(|c| match script_of(c) {
            Some(s) if s == script => c,
            Some(_) => ' ',
            None if c.is_numeric() => ' ',
            None => c,
        })
        .collect();
    let info = whatlang::Detector::with_allowlist(allowed.to_vec()).detect(&filtered)?;
    let code = from_whatlang(info.lang())?;
    Some((code, info.confidence(), info.is_reliable()))
}

/// whatlang's ISO 639-3 codes to ours.
fn from_whatlang(lang: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang as W;
    Some(match lang {
        W::Eng => "en",
        W::Cmn => "zh",
        W::Jpn => "ja",
        W::Tha => "th",
        W::Kor => "ko",
        W::Hin => "hi",
        W::Ukr => "uk",
        W::Ara => "ar",
        W::Tur => "tr",
        W::Vie => "vi",
        W::Pol => "pl",
        W::Nld => "nl",
        W::Por => "pt",
        W::Ita => "it",
        W::Spa => "es",
        W::Deu => "de",
        W::Fra => "fr",
        W::Rus => "ru",
        _ => return None,
    })
}

/// Where the language of a prompt came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LangSource {
    /// `--lang` (or a batch line's `lang`).
    Requested,
    /// Detected from the prompt.
    Detected,
    /// Neither: no `--lang`, and the prompt gave no clue.
    Unknown,
}

/// The language to use for a prompt, and what the user should be told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct LangDecision {
    /// The requested language, else the detected one, else `None`.
    pub language: Option<&'static Language>,
    /// Where [`LangDecision::language`] came from.
    pub source: LangSource,
    /// What detection found (also run when a language was requested, to check it).
    pub detection: Option<Detection>,
    /// Messages for stderr (without a `warning:` prefix): a language outside the model's set, a
    /// `--lang` that contradicts the text.
    pub warnings: Vec<String>,
}

impl LangDecision {
    /// The code to put in file names and metadata (`und`, ISO 639's "undetermined", when none).
    pub fn code(&self) -> &'static str {
        self.language.map_or("und", |l| l.code)
    }
}

/// Decides a prompt's language for `model`: the requested one if any, else the detected one.
///
/// Warns when the language is outside the model's set (requested, or reliably detected) and when a
/// requested language contradicts a reliable detection.
pub fn check(
    requested: Option<&'static Language>,
    text: &str,
    model: ModelLanguages,
) -> LangDecision {
    let detection = detect(text);
    let mut warnings = Vec::new();
    let (language, source) = match (requested, detection) {
        (Some(req), _) => (Some(req), LangSource::Requested),
        (None, Some(d)) => (Some(d.language), LangSource::Detected),
        (None, None) => (None, LangSource::Unknown),
    };
    if let Some(req) = requested {
        if !model.supports(req) {
            warnings.push(format!(
                "--lang {req} is not one of AltDiffusion-{model}'s {} languages ({}); XLM-R still \
                 encodes it, but the model was not trained on it",
                model.languages().count(),
                model.codes()
            ));
        }
        if let Some(d) = contradiction(text, req) {
            warnings.push(format!(
                "--lang {req}, but the prompt looks like {} (confidence {:.2})",
                d.language, d.confidence
            ));
        }
    } else if let Some(d) = detection.filter(|d| d.reliable && !model.supports(d.language)) {
        warnings.push(format!(
            "the prompt looks like {}, which is not one of AltDiffusion-{model}'s {} languages ({}); \
             XLM-R still encodes it, but the model was not trained on it",
            d.language,
            model.languages().count(),
            model.codes()
        ));
    }
    LangDecision {
        language,
        source,
        detection,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> Option<&'static str> {
        detect(text).map(|d| d.language.code)
    }

    #[test]
    fn table_matches_the_reference_sets() {
        let m9: Vec<_> = LANGUAGES.iter().filter(|l| l.m9).map(|l| l.code).collect();
        let m18: Vec<_> = LANGUAGES.iter().filter(|l| l.m18).map(|l| l.code).collect();
        let mut want9 = vec!["en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it"];
        let mut got9 = m9.clone();
        want9.sort_unstable();
        got9.sort_unstable();
        assert_eq!(got9, want9);
        assert_eq!(
            m18,
            [
                "en", "zh", "ja", "th", "ko", "hi", "uk", "ar", "tr", "vi", "pl", "nl", "pt", "it",
                "es", "de", "fr", "ru"
            ]
        );
        for l in LANGUAGES {
            assert_eq!(l.code.len(), 2);
            assert!(!l.english.is_empty() && !l.native.is_empty());
        }
    }

    #[test]
    fn parse_accepts_codes_names_and_aliases() {
        for l in LANGUAGES {
            assert_eq!(parse(l.code).unwrap(), l);
            assert_eq!(parse(&l.code.to_uppercase()).unwrap(), l);
            assert_eq!(parse(l.english).unwrap(), l);
            assert_eq!(parse(&l.english.to_lowercase()).unwrap(), l);
            assert_eq!(parse(l.native).unwrap(), l);
        }
        for (input, want) in [
            ("chinese", "zh"),
            ("zh-cn", "zh"),
            ("zh_CN", "zh"),
            ("zh-Hans-CN", "zh"),
            ("cmn", "zh"),
            ("pt-br", "pt"),
            ("pt_BR", "pt"),
            ("en-US", "en"),
            ("fra", "fr"),
            ("fre", "fr"),
            ("ger", "de"),
            ("deu", "de"),
            ("dut", "nl"),
            (" French ", "fr"),
            ("français", "fr"),
            ("日本語", "ja"),
        ] {
            assert_eq!(parse(input).unwrap().code, want, "{input}");
        }
    }

    #[test]
    fn parse_rejects_unknown_with_the_valid_codes() {
        for bad in ["xx", "klingon", "", "-", "sv", "zz-cn"] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{bad}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{bad}`")), "{msg}");
            assert!(msg.contains(&valid_codes()), "{msg}");
        }
    }

    #[test]
    fn model_sets() {
        assert_eq!(ModelLanguages::M9.languages().count(), 9);
        assert_eq!(ModelLanguages::M18.languages().count(), 18);
        let th = parse("th").unwrap();
        assert!(!ModelLanguages::M9.supports(th));
        assert!(ModelLanguages::M18.supports(th));
        assert_eq!(ModelLanguages::M9.name(), "m9");
        assert_eq!(ModelLanguages::M18.to_string(), "m18");
        assert_eq!("M18".parse(), Ok(ModelLanguages::M18));
        assert_eq!("BAAI/AltDiffusion-m9".parse(), Ok(ModelLanguages::M9));
        assert!("m27".parse::<ModelLanguages>().is_err());
    }

    #[test]
    fn model_from_text_encoder_config() {
        let cfg = |pre: bool| -> TextEncoderConfig {
            serde_json::from_value(serde_json::json!({
                "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 16,
                "max_position_embeddings": 20, "has_pre_transformation": pre
            }))
            .unwrap()
        };
        assert_eq!(
            ModelLanguages::from_text_encoder(&cfg(true)),
            ModelLanguages::M18
        );
        assert_eq!(
            ModelLanguages::from_text_encoder(&cfg(false)),
            ModelLanguages::M9
        );
    }

    #[test]
    fn no_clue_gives_none() {
        for text in [
            "",
            "   ",
            "12345",
            "1920 × 1080",
            "🦊🌙✨",
            "!!! ... ???",
            "Ελληνικά γράμματα",
        ] {
            assert_eq!(code(text), None, "{text:?}");
        }
    }

    #[test]
    fn scripts_decide() {
        assert_eq!(code("สาวสวย"), Some("th"));
        assert_eq!(code("नीली टोपी"), Some("hi"));
        assert_eq!(code("قطة سوداء"), Some("ar"));
        assert_eq!(code("고양이"), Some("ko"));
        assert_eq!(code("ねこ"), Some("ja"));
        assert_eq!(code("桜の木の下"), Some("ja"));
        // One particle among kanji is Japanese.
        assert_eq!(code("宇宙飛行士の写真"), Some("ja"));
        // Kanji only, but with forms Chinese does not use.
        let d = detect("富士山桜絵").unwrap();
        assert_eq!(d.language.code, "ja");
        assert!(d.reliable);
        // Simplified forms are Chinese for sure.
        let d = detect("红狐狸").unwrap();
        assert_eq!(d.language.code, "zh");
        assert!(d.reliable);
        // Short kanji-only text could be either: undetermined.
        assert_eq!(code("東京夜景"), None);
        assert_eq!(code("猫"), None);
        // One hangul or kana character is enough; one Thai letter is not a word.
        assert_eq!(code("성"), Some("ko"));
        assert_eq!(code("ア"), Some("ja"));
        assert_eq!(code("ก"), None);
        // Arabic script with Persian or Urdu letters is not Arabic.
        assert_eq!(code("گربه سیاه"), None);
    }

    #[test]
    fn cyrillic_letters_decide() {
        assert_eq!(code("Дві кішки"), Some("uk"));
        assert_eq!(code("Рыжая лиса"), Some("ru"));
        assert_eq!(code("Їжак"), Some("uk"));
        // Russian long adjective endings; Ukrainian without і, ї, є or ґ could be either.
        assert_eq!(code("красная роза"), Some("ru"));
        assert_eq!(code("червона троянда"), None);
        assert_eq!(
            code("Съешь же ещё этих мягких французских булок"),
            Some("ru")
        );
    }

    #[test]
    fn mixed_scripts_follow_the_dominant_one() {
        // A Chinese prompt with Latin quality tags stays Chinese.
        assert_eq!(code("一只在雪地里的红狐狸，8k, HDR"), Some("zh"));
        // Digits and emoji are ignored.
        assert_eq!(code("2 рыжих кота 🐱🐱 спят на скамейке"), Some("ru"));
        // Without the letters only Russian or only Ukrainian writes, short Cyrillic is either.
        assert_eq!(code("2 кота 🐱🐱 спят на скамейке"), None);
        // The longest run decides: the han run (5 characters, weighing 15) over the Latin one
        // (12 letters).
        assert_eq!(code("一只红狐狸, in snow: winter"), Some("zh"));
        // The longest run is two Latin words: undetermined.
        assert_eq!(code("Katze, cat, 猫"), None);
        // The same weight in two scripts: no majority.
        assert_eq!(code("cat 猫"), None);
        // A half-and-half prompt is not reliable.
        let d = detect("a red fox, 一只红狐狸").unwrap();
        assert_eq!(d.language.code, "zh");
        assert!(!d.reliable);
    }

    #[test]
    fn runs_split_at_a_letter_of_another_script() {
        let r = runs("(一只猫:1.2), red fox, 8k, 고양이");
        let got: Vec<(&str, usize)> = r.iter().map(|r| (r.text, r.weight)).collect();
        // Hangul, kana and han are one group; what is not a letter stays inside a run.
        assert_eq!(got, [("一只猫", 9), ("red fox, 8k", 7), ("고양이", 9)]);
        assert!(runs("").is_empty());
        assert!(runs("12 🦊 !!").is_empty());
    }

    #[test]
    fn one_or_two_latin_words_only_by_their_own_letters() {
        for weak in [
            "cat",
            "Katze",
            "red fox",
            "gato negro",
            "chat noir",
            "kot",
            "mèo",
        ] {
            assert_eq!(code(weak), None, "{weak}");
        }
        assert_eq!(code("łódź"), Some("pl"));
        assert_eq!(code("gökkuşağı"), Some("tr"));
        assert_eq!(code("Straße"), Some("de"));
        assert_eq!(code("niña"), Some("es"));
        assert_eq!(code("rồng"), Some("vi"));
        // Letters of two languages: undetermined.
        assert_eq!(code("Straße Łódź"), None);
        // Not reliable enough to contradict a --lang.
        assert!(!detect("niña").unwrap().reliable);
    }

    #[test]
    fn any_text_is_safe() {
        let huge = "a red fox in the snow, 一只红狐狸, ".repeat(20_000);
        assert!(detect(&huge).is_some());
        // One long run that is not reliable goes through the pairwise comparisons.
        let _ = detect(&"gato negro ".repeat(50_000));
        let _ = check(by_code("ru"), &"лиса ".repeat(50_000), ModelLanguages::M18);
        for text in [
            "\u{0}",
            "\u{301}\u{301}",
            "ـــ",
            "\u{FEFF}",
            "a\u{200D}b",
            "🏳️‍🌈",
            "ﷺ",
            &"ꙮ".repeat(100),
        ] {
            let _ = detect(text);
            let _ = check(None, text, ModelLanguages::M18);
            let _ = check(by_code("en"), text, ModelLanguages::M9);
        }
    }

    #[test]
    fn latin_languages() {
        assert_eq!(code("A red fox sitting in the snow"), Some("en"));
        assert_eq!(code("Un renard roux assis dans la neige"), Some("fr"));
        assert_eq!(code("Ein roter Fuchs sitzt im Schnee"), Some("de"));
        assert_eq!(code("Hai con mèo ngủ trên băng ghế gỗ"), Some("vi"));
    }

    /// Prompts written apart from the corpus in tools/fixtures (which tests/languages.rs checks), so
    /// that the tells are not only fitted to it.
    const HELD_OUT: &[(&str, &str)] = &[
        ("en", "a cozy cabin in the woods, warm light, cinematic"),
        ("en", "cyberpunk samurai standing in the rain"),
        ("en", "portrait of an old fisherman, dramatic lighting"),
        ("en", "a castle floating above the clouds"),
        ("en", "children playing on the beach at sunset"),
        ("fr", "une forêt enchantée au clair de lune"),
        ("fr", "portrait d'un vieux pêcheur, éclairage dramatique"),
        ("fr", "un château flottant au-dessus des nuages"),
        ("fr", "des enfants jouant sur la plage au coucher du soleil"),
        ("fr", "chat noir sur un toit de Paris"),
        ("de", "eine gemütliche Hütte im Wald, warmes Licht"),
        (
            "de",
            "Porträt eines alten Fischers, dramatische Beleuchtung",
        ),
        ("de", "ein Schloss, das über den Wolken schwebt"),
        ("de", "Kinder spielen bei Sonnenuntergang am Strand"),
        ("de", "schwarze Katze auf einem Dach in Berlin"),
        ("es", "una cabaña acogedora en el bosque, luz cálida"),
        ("es", "retrato de un viejo pescador, iluminación dramática"),
        ("es", "un castillo flotando sobre las nubes"),
        ("es", "niños jugando en la playa al atardecer"),
        ("es", "gato negro en un tejado de Madrid"),
        ("it", "una baita accogliente nel bosco, luce calda"),
        (
            "it",
            "ritratto di un vecchio pescatore, illuminazione drammatica",
        ),
        ("it", "un castello che fluttua sopra le nuvole"),
        ("it", "bambini che giocano sulla spiaggia al tramonto"),
        ("it", "gatto nero su un tetto di Roma"),
        ("pt", "uma cabana aconchegante na floresta, luz quente"),
        ("pt", "retrato de um velho pescador, iluminação dramática"),
        ("pt", "um castelo flutuando sobre as nuvens"),
        ("pt", "crianças brincando na praia ao pôr do sol"),
        ("pt", "gato preto em um telhado de Lisboa"),
        ("nl", "een gezellige hut in het bos, warm licht"),
        ("nl", "portret van een oude visser, dramatische belichting"),
        ("nl", "een kasteel dat boven de wolken zweeft"),
        ("nl", "kinderen spelen op het strand bij zonsondergang"),
        ("nl", "zwarte kat op een dak in Amsterdam"),
        ("pl", "przytulna chatka w lesie, ciepłe światło"),
        ("pl", "portret starego rybaka, dramatyczne oświetlenie"),
        ("pl", "zamek unoszący się nad chmurami"),
        ("pl", "dzieci bawiące się na plaży o zachodzie słońca"),
        ("pl", "czarny kot na dachu w Krakowie"),
        ("tr", "ormanda sıcak bir kulübe, sıcak ışık"),
        ("tr", "yaşlı bir balıkçının portresi, dramatik aydınlatma"),
        ("tr", "bulutların üzerinde süzülen bir kale"),
        ("tr", "gün batımında sahilde oynayan çocuklar"),
        ("tr", "İstanbul'da bir çatıda kara kedi"),
        ("vi", "một căn nhà gỗ ấm cúng trong rừng"),
        ("vi", "chân dung ông lão đánh cá, ánh sáng kịch tính"),
        ("vi", "lâu đài bay lơ lửng trên mây"),
        ("vi", "trẻ em chơi đùa trên bãi biển lúc hoàng hôn"),
        ("vi", "mèo đen trên mái nhà ở Hà Nội"),
        ("ru", "уютная хижина в лесу, тёплый свет"),
        ("ru", "портрет старого рыбака, драматическое освещение"),
        ("ru", "замок, парящий над облаками"),
        ("ru", "дети играют на пляже на закате"),
        ("ru", "чёрный кот на крыше в Москве"),
        ("uk", "затишна хатинка в лісі, тепле світло"),
        ("uk", "портрет старого рибалки, драматичне освітлення"),
        ("uk", "замок, що ширяє над хмарами"),
        ("uk", "діти граються на пляжі на заході сонця"),
        ("uk", "чорний кіт на даху в Києві"),
        ("zh", "雪山上的古老寺庙，油画风格"),
        ("zh", "一个穿着红色连衣裙的女孩在雨中"),
        ("zh", "未来主义的城市，赛博朋克风格"),
        ("ja", "雪山の古いお寺、油絵風"),
        ("ja", "雨の中で赤いドレスを着た女の子"),
        ("ja", "サイバーパンクな未来都市"),
        ("ko", "눈 덮인 산 위의 오래된 절"),
        ("ko", "비 속에서 빨간 드레스를 입은 소녀"),
        ("th", "วัดเก่าบนภูเขาหิมะ"),
        ("th", "เด็กผู้หญิงใส่ชุดสีแดงท่ามกลางสายฝน"),
        ("hi", "बर्फीले पहाड़ पर एक पुराना मंदिर"),
        ("hi", "बारिश में लाल पोशाक पहने एक लड़की"),
        ("ar", "معبد قديم على جبل ثلجي"),
        ("ar", "فتاة ترتدي فستانا أحمر تحت المطر"),
    ];

    #[test]
    fn held_out_prompts_are_detected() {
        // Right, or undetermined where the policy refuses to guess: Cyrillic without a letter only
        // Russian or only Ukrainian writes and without the telling words (Ukrainian text of that
        // length lacks і, ї and є about one time in five, and whatlang leans Ukrainian), and Latin
        // text where only whatlang, unreliable, would break the tie between Spanish and French
        // (`en un ... de` are both).
        const UNDETERMINED: &[&str] = &[
            "замок, парящий над облаками",
            "дети играют на пляже на закате",
            "gato negro en un tejado de Madrid",
        ];
        let wrong: Vec<String> = HELD_OUT
            .iter()
            .filter(|(want, text)| match code(text) {
                None => !UNDETERMINED.contains(text),
                got => got != Some(*want),
            })
            .map(|(want, text)| format!("{want}: {text} -> {:?}", detect(text)))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        let reliable = HELD_OUT
            .iter()
            .filter(|(_, text)| detect(text).is_some_and(|d| d.reliable))
            .count();
        assert!(
            reliable * 10 >= HELD_OUT.len() * 8,
            "{reliable}/{}",
            HELD_OUT.len()
        );
    }

    #[test]
    fn check_warns_outside_the_model_set() {
        let th = parse("th").unwrap();
        let d = check(Some(th), "สาวสวย", ModelLanguages::M9);
        assert_eq!(d.language, Some(th));
        assert_eq!(d.source, LangSource::Requested);
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(d.warnings[0].contains("XLM-R still encodes it"));
        assert!(d.warnings[0].contains("m9"));
        let d = check(Some(th), "สาวสวย", ModelLanguages::M18);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        // Detected outside the set: warned too.
        let d = check(None, "สาวสวย", ModelLanguages::M9);
        assert_eq!(d.language, Some(th));
        assert_eq!(d.source, LangSource::Detected);
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn check_warns_on_contradiction() {
        let fr = parse("fr").unwrap();
        let d = check(Some(fr), "一只在月球上骑马的宇航员", ModelLanguages::M18);
        assert_eq!(d.language, Some(fr));
        assert_eq!(d.detection.map(|d| d.language.code), Some("zh"));
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(d.warnings[0].contains("zh (Chinese)"), "{}", d.warnings[0]);
        // An unreliable detection does not contradict.
        let zh = parse("zh").unwrap();
        let d = check(Some(zh), "東京夜景", ModelLanguages::M18);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn check_without_lang_reports_detection_or_none() {
        let d = check(None, "Un renard roux dans la neige", ModelLanguages::M9);
        assert_eq!(d.code(), "fr");
        assert_eq!(d.source, LangSource::Detected);
        // Too short to tell: undetermined, and no warning.
        let d = check(None, "renard roux", ModelLanguages::M9);
        assert_eq!(d.code(), "und");
        assert_eq!(d.source, LangSource::Unknown);
        assert!(d.warnings.is_empty());
        let d = check(None, "12345 🦊", ModelLanguages::M9);
        assert_eq!(d.language, None);
        assert_eq!(d.source, LangSource::Unknown);
        assert_eq!(d.code(), "und");
        assert!(d.warnings.is_empty());
    }
}
