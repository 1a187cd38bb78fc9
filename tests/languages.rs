//! Languages: detection over the 18-language corpus, `--lang` parsing and the warnings of
//! [`altdiff::lang::check`], through the library.

use std::collections::BTreeMap;

use altdiff::lang::{self, LangSource, ModelLanguages, LANGUAGES};
use altdiff::Error;

/// `(lang, sentence)` pairs of `tools/fixtures/corpus-18-languages.txt`.
fn corpus() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/fixtures/corpus-18-languages.txt"
    );
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (lang, sentence) = l.split_once('\t').unwrap();
            (lang.to_string(), sentence.to_string())
        })
        .collect()
}

#[test]
fn detects_every_sentence_of_all_18_languages() {
    let corpus = corpus();
    // lang -> (correct, total, failures)
    let mut per_lang: BTreeMap<&str, (usize, usize, Vec<String>)> = BTreeMap::new();
    for (want, sentence) in &corpus {
        let entry = per_lang.entry(want.as_str()).or_default();
        entry.1 += 1;
        match lang::detect(sentence) {
            Some(d) if d.language.code == want => entry.0 += 1,
            other => entry.2.push(format!(
                "{want}: {sentence:?} -> {}",
                other.map_or("none".to_string(), |d| d.to_string())
            )),
        }
    }
    let codes: Vec<&str> = per_lang.keys().copied().collect();
    let mut all: Vec<&str> = LANGUAGES.iter().map(|l| l.code).collect();
    all.sort_unstable();
    assert_eq!(codes, all, "the corpus covers all 18 languages");
    let mut report = String::new();
    let mut failures = Vec::new();
    for (code, (ok, total, failed)) in &per_lang {
        report.push_str(&format!("{code} {ok}/{total}  "));
        failures.extend(failed.iter().cloned());
    }
    eprintln!("detection accuracy: {report}");
    assert!(failures.is_empty(), "misdetected:\n{}", failures.join("\n"));
}

#[test]
fn reliable_detections_are_right() {
    // `reliable` is what may contradict a --lang: it must never be wrong. Report how many are.
    let mut reliable = 0;
    let corpus = corpus();
    for (want, sentence) in &corpus {
        let d = lang::detect(sentence).unwrap();
        if d.reliable {
            reliable += 1;
            assert_eq!(d.language.code, want, "{sentence}");
        }
    }
    eprintln!("reliable detections: {reliable}/{}", corpus.len());
}

/// Close languages that a short prompt may not tell apart when compared only with each other.
const CLOSE: &[&[&str]] = &[&["es", "it", "pt", "fr"], &["de", "nl"], &["ru", "uk"]];

#[test]
fn wrong_langs_on_the_corpus_are_contradicted() {
    // For each sentence in language L and each of the 17 other languages X, `--lang X` should warn
    // that the prompt looks like L. It must for X in another script or another language family;
    // between close languages (Spanish and Italian...) a short prompt may leave it silent rather
    // than risk a false warning.
    let mut missed = Vec::new();
    let mut pairs = 0;
    for (want, sentence) in corpus() {
        for other in LANGUAGES.iter().filter(|l| l.code != want) {
            pairs += 1;
            let decision = lang::check(Some(other), &sentence, ModelLanguages::M18);
            let contradicted = decision
                .warnings
                .iter()
                .any(|w| w.contains(&format!("looks like {want} (")));
            if !contradicted {
                missed.push((other.code, want.clone(), sentence.clone()));
            }
        }
    }
    eprintln!("contradictions found: {}/{pairs}", pairs - missed.len());
    for (asked, want, sentence) in &missed {
        eprintln!("  not contradicted: --lang {asked} with {want} {sentence:?}");
    }
    let far: Vec<_> = missed
        .iter()
        .filter(|(asked, want, _)| {
            !CLOSE
                .iter()
                .any(|group| group.contains(asked) && group.contains(&want.as_str()))
        })
        .collect();
    assert!(far.is_empty(), "not contradicted: {far:#?}");
    assert!(
        missed.len() * 100 <= pairs,
        "{} of {pairs} missed",
        missed.len()
    );
}

#[test]
fn parses_every_code_and_english_name() {
    for l in LANGUAGES {
        for input in [
            l.code.to_string(),
            l.code.to_uppercase(),
            l.english.to_string(),
            l.english.to_lowercase(),
            l.english.to_uppercase(),
        ] {
            let got = lang::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.code, l.code, "{input}");
        }
    }
    assert_eq!(lang::parse("french").unwrap().code, "fr");
    assert_eq!(lang::parse("French").unwrap().code, "fr");
    assert_eq!(lang::parse("zh_CN").unwrap().code, "zh");
    assert_eq!(lang::parse("pt-BR").unwrap().code, "pt");
}

#[test]
fn unknown_codes_are_usage_errors_listing_the_valid_ones() {
    for bad in ["xx", "swedish", "sv", "klingon", "e"] {
        let err = lang::parse(bad).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{bad}: {err:?}");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains(bad), "{msg}");
        for l in LANGUAGES {
            assert!(msg.contains(l.code), "{msg} lacks {}", l.code);
        }
    }
}

#[test]
fn m9_with_thai_warns_that_xlmr_still_encodes_it() {
    let th = lang::parse("th").unwrap();
    let decision = lang::check(Some(th), "แมวสองตัวนอนหลับบนม้านั่งไม้ในสวน", ModelLanguages::M9);
    assert_eq!(decision.language.map(|l| l.code), Some("th"));
    assert_eq!(decision.source, LangSource::Requested);
    assert_eq!(decision.warnings.len(), 1, "{:?}", decision.warnings);
    assert!(decision.warnings[0].contains("XLM-R still encodes it"));
    // m18 was trained on Thai: no warning.
    let decision = lang::check(Some(th), "แมวสองตัวนอนหลับบนม้านั่งไม้ในสวน", ModelLanguages::M18);
    assert!(decision.warnings.is_empty(), "{:?}", decision.warnings);
}

#[test]
fn lang_fr_with_a_chinese_prompt_warns() {
    let fr = lang::parse("fr").unwrap();
    for model in [ModelLanguages::M9, ModelLanguages::M18] {
        let decision = lang::check(Some(fr), "两只猫睡在花园里的木凳上。", model);
        assert_eq!(decision.code(), "fr", "--lang wins");
        assert_eq!(decision.detection.map(|d| d.language.code), Some("zh"));
        assert_eq!(decision.warnings.len(), 1, "{:?}", decision.warnings);
        assert!(decision.warnings[0].contains("--lang fr"));
        assert!(decision.warnings[0].contains("zh (Chinese)"));
    }
    // The matching language: silence.
    let zh = lang::parse("zh").unwrap();
    let decision = lang::check(Some(zh), "两只猫睡在花园里的木凳上。", ModelLanguages::M9);
    assert!(decision.warnings.is_empty(), "{:?}", decision.warnings);
}

#[test]
fn without_lang_the_detected_language_is_used() {
    for (want, sentence) in corpus() {
        let decision = lang::check(None, &sentence, ModelLanguages::M18);
        assert_eq!(decision.source, LangSource::Detected);
        assert_eq!(decision.code(), want, "{sentence}");
        assert!(decision.warnings.is_empty(), "{:?}", decision.warnings);
    }
    let decision = lang::check(None, "🦊 1234", ModelLanguages::M18);
    assert_eq!(decision.source, LangSource::Unknown);
    assert_eq!(decision.language, None);
}

/// The data lines of a fixture file, split at tabs.
fn fixture_rows(name: &str) -> Vec<Vec<String>> {
    let path = format!("{}/tools/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// Correct, undetermined and wrong detections.
#[derive(Default, Clone, Copy)]
struct Tally {
    correct: usize,
    und: usize,
    wrong: usize,
}

impl Tally {
    fn add(&mut self, claimed: Option<&str>, accepted: &[&str]) -> bool {
        match claimed {
            None => self.und += 1,
            Some(code) if accepted.contains(&code) => self.correct += 1,
            Some(_) => {
                self.wrong += 1;
                return false;
            }
        }
        true
    }

    fn total(&self) -> usize {
        self.correct + self.und + self.wrong
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |n: usize| 100.0 * n as f64 / self.total().max(1) as f64;
        write!(
            f,
            "{}/{} correct ({:.0}%), {} und ({:.0}%), {} wrong",
            self.correct,
            self.total(),
            pct(self.correct),
            self.und,
            pct(self.und),
            self.wrong
        )
    }
}

/// The code `lang::detect` claims, `None` for `und`.
fn claimed(text: &str) -> Option<&'static str> {
    lang::detect(text).map(|d| d.language.code)
}

#[test]
fn short_prompts_never_get_a_wrong_language() {
    let rows = fixture_rows("short-prompts.tsv");
    let mut by_len = [Tally::default(); 5];
    let mut by_lang: BTreeMap<String, Tally> = BTreeMap::new();
    let mut wrong = Vec::new();
    for row in &rows {
        let [want, words, prompt] = &row[..] else {
            panic!("bad line {row:?}")
        };
        let words: usize = words.parse().unwrap();
        assert!((1..=5).contains(&words), "{row:?}");
        assert!(lang::by_code(want).is_some(), "{row:?}");
        let got = claimed(prompt);
        by_len[words - 1].add(got, &[want]);
        if words > 3 {
            continue;
        }
        if !by_lang.entry(want.clone()).or_default().add(got, &[want]) {
            wrong.push(format!("{want}: {prompt:?} -> {:?}", lang::detect(prompt)));
        }
    }
    let wrong_longer = by_len[3].wrong + by_len[4].wrong;
    for (i, t) in by_len.iter().enumerate() {
        eprintln!("short prompts, {} word(s): {t}", i + 1);
    }
    for (code, t) in &by_lang {
        eprintln!("short prompts, {code}: {t}");
    }
    // The set covers each of the 18 languages with 1, 2 and 3 words.
    assert_eq!(by_lang.len(), LANGUAGES.len());
    assert!(by_lang.values().all(|t| t.total() >= 8));
    assert!(by_len[..3].iter().all(|t| t.total() >= 18 * 2));
    // Scripts that only one of the 18 writes: every word claimed.
    for code in ["th", "ko", "hi", "ar"] {
        assert_eq!(by_lang[code].correct, by_lang[code].total(), "{code}");
    }
    assert!(
        wrong.is_empty(),
        "wrong languages claimed:\n{}",
        wrong.join("\n")
    );
    assert_eq!(wrong_longer, 0, "wrong languages claimed on 4-5 words");
}

#[test]
fn mixed_prompts_never_get_a_wrong_language() {
    let rows = fixture_rows("mixed-prompts.tsv");
    let mut tally = Tally::default();
    let mut wrong = Vec::new();
    for row in &rows {
        let [accepted, prompt] = &row[..] else {
            panic!("bad line {row:?}")
        };
        let accepted: Vec<&str> = accepted.split('|').collect();
        assert!(
            accepted == ["und"] || accepted.iter().all(|c| lang::by_code(c).is_some()),
            "{row:?}"
        );
        if !tally.add(claimed(prompt), &accepted) {
            wrong.push(format!(
                "{accepted:?}: {prompt:?} -> {:?}",
                lang::detect(prompt)
            ));
        }
    }
    eprintln!("mixed prompts: {tally}");
    assert!(rows.len() >= 30);
    assert!(
        wrong.is_empty(),
        "wrong languages claimed:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn short_prompts_that_used_to_get_a_wrong_language() {
    // whatlang alone called these Vietnamese, Turkish and German.
    assert_eq!(claimed("cat"), None);
    assert_eq!(claimed("Katze"), None);
    assert_eq!(claimed("一只红狐狸, in snow: winter"), Some("zh"));
    for model in [ModelLanguages::M9, ModelLanguages::M18] {
        for text in ["cat", "Katze", "一只红狐狸, in snow: winter"] {
            let d = lang::check(None, text, model);
            assert!(
                !["vi", "tr", "de"].contains(&d.code()),
                "{text}: {}",
                d.code()
            );
        }
        let d = lang::check(None, "Katze", model);
        assert_eq!(d.code(), "und");
        assert_eq!(d.source, LangSource::Unknown);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }
}

#[test]
fn one_word_in_a_script_of_one_language_is_claimed() {
    for (want, word) in [
        ("th", "แมว"),
        ("ko", "고양이"),
        ("ja", "ねこ"),
        ("ja", "キツネ"),
        ("ar", "قطة"),
        ("hi", "बिल्ली"),
        ("uk", "кіт"),
        ("uk", "їжак"),
        ("uk", "Європа"),
        ("ru", "ёжик"),
        ("ru", "рыба"),
    ] {
        let d = lang::detect(word).unwrap_or_else(|| panic!("{word}: und"));
        assert_eq!(d.language.code, want, "{word}");
        assert!(d.reliable, "{word}");
    }
}

#[test]
fn a_weak_prompt_does_not_contradict_lang() {
    // `--lang` always wins; a prompt too short to tell adds no warning about another language.
    let de = lang::parse("de").unwrap();
    for text in ["Katze", "Katze im Schnee", "rote Rose"] {
        let d = lang::check(Some(de), text, ModelLanguages::M18);
        assert_eq!(d.code(), "de");
        assert!(d.warnings.is_empty(), "{text}: {:?}", d.warnings);
    }
    let en = lang::parse("en").unwrap();
    for text in ["cat", "Katze", "red fox", "gato negro"] {
        let d = lang::check(Some(en), text, ModelLanguages::M18);
        assert_eq!(d.code(), "en");
        assert!(d.warnings.is_empty(), "{text}: {:?}", d.warnings);
    }
}

#[test]
fn the_right_lang_is_never_contradicted_on_short_prompts() {
    let mut contradicted = Vec::new();
    for row in fixture_rows("short-prompts.tsv") {
        let (want, prompt) = (&row[0], &row[2]);
        let l = lang::parse(want).unwrap();
        let d = lang::check(Some(l), prompt, ModelLanguages::M18);
        if !d.warnings.is_empty() {
            contradicted.push(format!("--lang {want} {prompt:?}: {:?}", d.warnings));
        }
    }
    assert!(contradicted.is_empty(), "{}", contradicted.join("\n"));
}
