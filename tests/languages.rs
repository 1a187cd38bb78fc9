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
