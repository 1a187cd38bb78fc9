//! Library-level tests of the batch prompt file parser (`altdiff::batch`): each format, line
//! numbers, bad input, and property tests that no input panics.
//!
//! The long fuzz run is ignored by default; run it with
//! `cargo test --release --test batch_parse -- --ignored` (`BATCH_FUZZ_CASES=N` changes the
//! number of cases, 1,000,000 per generator by default).

use altdiff::batch::{parse, Job, LineError, Overrides, JSON_KEYS, WEBUI_OPTIONS};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Parses `input` and expects every entry to be a job.
fn jobs(input: &str) -> Vec<Job> {
    parse(input.as_bytes())
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("unexpected error: {e}")))
        .collect()
}

/// Parses a one-line file and expects one job.
fn job(line: &str) -> Job {
    let mut all = jobs(line);
    assert_eq!(all.len(), 1, "{line:?}");
    all.remove(0)
}

/// Parses a one-line file and expects one error on line 1; returns its message.
fn error(line: &str) -> String {
    let all = parse(line.as_bytes());
    assert_eq!(all.len(), 1, "{line:?}");
    match &all[0] {
        Ok(j) => panic!("expected an error for {line:?}, got {j:?}"),
        Err(e) => {
            assert_eq!(e.line, 1);
            e.message.clone()
        }
    }
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "{haystack:?} does not contain {n:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain text, comments, line handling
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_text_one_prompt_per_line() {
    let all = jobs("a red fox in the snow\n一只在雪地里的红狐狸\nun renard roux dans la neige\n");
    let prompts: Vec<_> = all.iter().map(|j| j.prompt.as_str()).collect();
    assert_eq!(
        prompts,
        [
            "a red fox in the snow",
            "一只在雪地里的红狐狸",
            "un renard roux dans la neige"
        ]
    );
    assert_eq!(all.iter().map(|j| j.line).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(all.iter().all(|j| j.overrides.is_empty()));
}

#[test]
fn blank_lines_and_comments_are_skipped_but_counted() {
    let input = "# a comment\n\n   \n\t\nfirst\n  # indented comment\n#{\"prompt\": \"x\"}\n--\u{20}x\n\nsecond";
    let all = parse(input.as_bytes());
    // `-- x` (line 8) is a webui line and an error; the rest are jobs or skipped.
    let lines: Vec<_> = all
        .iter()
        .map(|r| match r {
            Ok(j) => j.line,
            Err(e) => e.line,
        })
        .collect();
    assert_eq!(lines, [5, 8, 10]);
    assert_eq!(all[0].as_ref().map(|j| j.prompt.as_str()), Ok("first"));
    assert!(all[1].is_err());
    assert_eq!(all[2].as_ref().map(|j| j.prompt.as_str()), Ok("second"));
}

#[test]
fn empty_and_comment_only_files_give_nothing() {
    assert!(parse(b"").is_empty());
    assert!(parse(b"\n\n\r\n").is_empty());
    assert!(parse(b"# only\n# comments\n").is_empty());
    assert!(parse(b"\xEF\xBB\xBF").is_empty());
}

#[test]
fn crlf_bom_and_surrounding_whitespace() {
    let input = "\u{FEFF}first prompt  \r\n\r\n\t second prompt\t\r\n{\"prompt\": \"third\"}\r\n--prompt fourth --steps 5\r\n";
    let all = jobs(input);
    let got: Vec<_> = all.iter().map(|j| (j.line, j.prompt.as_str())).collect();
    assert_eq!(
        got,
        [
            (1, "first prompt"),
            (3, "second prompt"),
            (4, "third"),
            (5, "fourth")
        ]
    );
    assert_eq!(all[3].overrides.steps, Some(5));
}

#[test]
fn a_bom_before_json_or_a_comment_is_ignored() {
    assert_eq!(job("\u{FEFF}{\"prompt\": \"p\"}").prompt, "p");
    assert!(parse("\u{FEFF}# comment".as_bytes()).is_empty());
}

#[test]
fn a_utf16_file_is_one_clear_error() {
    for bom in [[0xFF, 0xFE], [0xFE, 0xFF]] {
        let mut input = bom.to_vec();
        input.extend("a\0 \0c\0a\0t\0\n\0".as_bytes());
        let all = parse(&input);
        assert_eq!(all.len(), 1);
        let e = all[0].as_ref().err().cloned().unwrap();
        assert_eq!(e.line, 1);
        assert_contains(&e.message, &["UTF-16", "UTF-8"]);
    }
}

#[test]
fn double_dash_inside_a_line_is_plain_text() {
    assert_eq!(
        job("a cat --steps 20").prompt,
        "a cat --steps 20",
        "webui falls back to a plain prompt here too"
    );
}

#[test]
fn invalid_utf8_on_line_3_leaves_the_other_lines() {
    let mut input = b"one\n{\"prompt\": \"two\", \"seed\": 2}\n".to_vec();
    let line3_offset = input.len();
    input.extend(b"caf\xE9 au lait\n--prompt four\n");
    let all = parse(&input);
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].as_ref().map(|j| j.prompt.as_str()), Ok("one"));
    assert_eq!(all[1].as_ref().map(|j| j.overrides.seed), Ok(Some(2)));
    let e = all[2].as_ref().err().cloned().unwrap();
    assert_eq!(e.line, 3);
    assert_contains(
        &e.message,
        &[
            "invalid UTF-8",
            "0xE9",
            "offset 3 of the line",
            &format!("offset {} in the file", line3_offset + 3),
        ],
    );
    assert_eq!(e.to_string(), format!("line 3: {}", e.message));
    assert_eq!(
        all[3].as_ref().map(|j| (j.line, j.prompt.as_str())),
        Ok((4, "four"))
    );
}

#[test]
fn invalid_utf8_offsets_count_the_bom() {
    let all = parse(b"\xEF\xBB\xBFab\xFFc");
    let e = all[0].as_ref().err().cloned().unwrap();
    assert_contains(
        &e.message,
        &["offset 2 of the line", "offset 5 in the file"],
    );
}

#[test]
fn invalid_utf8_in_a_comment_line_is_skipped() {
    let all = parse(b"# caf\xE9\nok\n  # \xFF\xFE\n");
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].as_ref().map(|j| (j.line, j.prompt.as_str())),
        Ok((2, "ok"))
    );
}

#[test]
fn line_error_display() {
    let e = LineError {
        line: 42,
        message: "missing `prompt`".into(),
    };
    assert_eq!(e.to_string(), "line 42: missing `prompt`");
    let boxed: Box<dyn std::error::Error> = Box::new(e);
    assert_eq!(boxed.to_string(), "line 42: missing `prompt`");
}

// ---------------------------------------------------------------------------------------------
// JSON Lines
// ---------------------------------------------------------------------------------------------

#[test]
fn json_every_key() {
    let j = job(
        r#"{"prompt": "a fox", "negative_prompt": "blurry", "lang": "fr", "seed": 18446744073709551615, "steps": 25, "guidance": 6.5, "scheduler": "ddim", "width": 640, "height": 384, "num_images": 3, "output": "out/fox.png"}"#,
    );
    assert_eq!(j.line, 1);
    assert_eq!(j.prompt, "a fox");
    assert_eq!(
        j.overrides,
        Overrides {
            negative_prompt: Some("blurry".into()),
            lang: Some("fr".into()),
            seed: Some(u64::MAX),
            steps: Some(25),
            guidance: Some(6.5),
            scheduler: Some("ddim".into()),
            width: Some(640),
            height: Some(384),
            num_images: Some(3),
            output: Some("out/fox.png".into()),
            init_image: None,
            mask: None,
            strength: None,
            prompt_syntax: None,
        }
    );
    assert!(!j.overrides.is_empty());
    assert!(!j.webui_line);
}

#[test]
fn json_and_webui_init_image_keys() {
    let j = job(
        r#"{"prompt": "a fox", "init_image": "in/fox.png", "mask": "in/m.png", "strength": 0.6}"#,
    );
    assert_eq!(j.overrides.init_image.as_deref(), Some("in/fox.png"));
    assert_eq!(j.overrides.mask.as_deref(), Some("in/m.png"));
    assert_eq!(j.overrides.strength, Some(0.6));
    let j = job(r#"{"prompt": "a fox", "init_image": "a.png", "denoising_strength": 0.3}"#);
    assert_eq!(j.overrides.strength, Some(0.3));
    let e = error(r#"{"prompt": "a fox", "strength": 0.3, "denoising_strength": 0.3}"#);
    assert!(e.contains("same setting"), "{e}");
    let e = error(r#"{"prompt": "a fox", "strength": "high"}"#);
    assert!(e.contains("`strength` must be a number"), "{e}");
    let j =
        job("--prompt 'a fox' --init_image 'in/fox 1.png' --denoising_strength 0.45 --mask m.png");
    assert_eq!(j.overrides.init_image.as_deref(), Some("in/fox 1.png"));
    assert_eq!(j.overrides.strength, Some(0.45));
    assert_eq!(j.overrides.mask.as_deref(), Some("m.png"));
}

#[test]
fn json_aliases_and_integer_guidance() {
    let j = job(r#"{"cfg_scale": 7, "sampler": "DPM++ 2M Karras", "prompt": "p"}"#);
    assert_eq!(j.overrides.guidance, Some(7.0));
    assert_eq!(j.overrides.scheduler.as_deref(), Some("DPM++ 2M Karras"));
}

#[test]
fn json_null_means_no_override() {
    let j = job(
        r#"{"prompt": "p", "negative_prompt": null, "lang": null, "seed": null, "steps": null, "guidance": null, "scheduler": null, "width": null, "height": null, "num_images": null, "output": null}"#,
    );
    assert!(j.overrides.is_empty());
}

#[test]
fn json_prompt_is_verbatim() {
    let j = job(r#"{"prompt": "  \"quoted\" \\ tab\t é 🦊 # not a comment  "}"#);
    assert_eq!(j.prompt, "  \"quoted\" \\ tab\t é 🦊 # not a comment  ");
    assert_eq!(job(r##"{"prompt": "#1 {x} --y"}"##).prompt, "#1 {x} --y");
}

#[test]
fn json_prompt_required_and_non_empty() {
    assert_eq!(error(r#"{"seed": 1}"#), "missing `prompt`");
    assert_eq!(error("{}"), "missing `prompt`");
    assert_eq!(error(r#"{"prompt": ""}"#), "`prompt` is empty");
    assert_eq!(error(r#"{"prompt": " \t "}"#), "`prompt` is empty");
    assert_contains(
        &error(r#"{"prompt": null}"#),
        &["`prompt` must be a non-empty string", "null"],
    );
    assert_contains(
        &error(r#"{"prompt": ["a", "b"]}"#),
        &["`prompt`", "an array"],
    );
    assert_contains(&error(r#"{"prompt": 5}"#), &["`prompt`", "the number 5"]);
}

#[test]
fn json_type_errors_name_the_key() {
    let wrong: &[(&str, &str, &[&str])] = &[
        (
            "negative_prompt",
            "1",
            &["must be a string", "the number 1"],
        ),
        ("lang", "true", &["must be a string", "true"]),
        ("output", "{}", &["must be a string", "an object"]),
        ("scheduler", "[1]", &["must be a string", "an array"]),
        ("sampler", "2", &["must be a string"]),
        (
            "seed",
            "\"42\"",
            &["non-negative integer", "the string \"42\""],
        ),
        ("seed", "1.5", &["whole number", "1.5"]),
        ("steps", "\"20\"", &["non-negative integer"]),
        ("steps", "20.5", &["whole number"]),
        ("width", "false", &["non-negative integer", "false"]),
        ("height", "[]", &["non-negative integer", "an array"]),
        ("num_images", "\"two\"", &["non-negative integer"]),
        ("guidance", "\"7.5\"", &["must be a number", "the string"]),
        ("cfg_scale", "null", &[]),
    ];
    for (key, value, needles) in wrong {
        let line = format!(r#"{{"prompt": "p", "{key}": {value}}}"#);
        if needles.is_empty() {
            assert!(parse(line.as_bytes())[0].is_ok(), "{line}");
            continue;
        }
        let m = error(&line);
        assert_contains(&m, &[&format!("`{key}`")]);
        assert_contains(&m, needles);
    }
}

#[test]
fn json_negative_numbers_are_errors() {
    for key in [
        "seed",
        "steps",
        "width",
        "height",
        "num_images",
        "guidance",
        "cfg_scale",
    ] {
        let m = error(&format!(r#"{{"prompt": "p", "{key}": -3}}"#));
        assert_contains(&m, &[&format!("`{key}`"), "must not be negative", "-3"]);
    }
    let m = error(r#"{"prompt": "p", "guidance": -0.5}"#);
    assert_contains(&m, &["`guidance`", "negative"]);
}

#[test]
fn json_huge_numbers() {
    // Beyond u64: serde_json reads it as a float, which is not a valid seed.
    let m = error(r#"{"prompt": "p", "seed": 18446744073709551616}"#);
    assert_contains(&m, &["`seed`", "0 to 18446744073709551615"]);
    let m = error(r#"{"prompt": "p", "steps": 1e300}"#);
    assert_contains(&m, &["`steps`"]);
    // Beyond f64: serde_json refuses the line.
    let m = error(r#"{"prompt": "p", "guidance": 1e400}"#);
    assert_contains(&m, &["invalid JSON", "out of range"]);
    let j = job(r#"{"prompt": "p", "guidance": 1e300}"#);
    assert_eq!(j.overrides.guidance, Some(1e300));
}

#[test]
fn json_unknown_keys_list_the_known_ones() {
    let m = error(r#"{"prompt": "p", "setps": 20}"#);
    assert_contains(&m, &["unknown key `setps`", "did you mean `steps`?"]);
    for k in JSON_KEYS {
        assert!(m.contains(k), "{m} lacks {k}");
    }
    let m = error(r#"{"prompt": "p", "Prompt": "q"}"#);
    assert_contains(&m, &["unknown key `Prompt`", "did you mean `prompt`?"]);
    let m = error(r#"{"prompt": "p", "zzzzzzzzzzzz": 1}"#);
    assert!(!m.contains("did you mean"), "{m}");
    // A huge key is clipped in the message.
    let long = "k".repeat(100_000);
    let m = error(&format!(r#"{{"prompt": "p", "{long}": 1}}"#));
    assert!(m.len() < 1000, "{} bytes", m.len());
}

#[test]
fn json_repeated_keys_are_errors() {
    assert_contains(
        &error(r#"{"prompt": "p", "seed": 1, "seed": 2}"#),
        &["`seed` given twice"],
    );
    assert_contains(
        &error(r#"{"prompt": "p", "prompt": "q"}"#),
        &["`prompt` given twice"],
    );
    assert_contains(
        &error(r#"{"prompt": "p", "guidance": 1, "cfg_scale": 2}"#),
        &["keys `guidance` and `cfg_scale` are the same setting"],
    );
    assert_contains(
        &error(r#"{"prompt": "p", "sampler": "a", "scheduler": "b"}"#),
        &["keys `sampler` and `scheduler` are the same setting"],
    );
}

#[test]
fn broken_json_line_reports_its_column_and_the_others_continue() {
    let input = "first\n{\"prompt\": \"ok\"}\n  {\"prompt\": \"broken\", \"steps\": }\n{\"prompt\": \"fine\", \"steps\": 3}\n";
    let all = parse(input.as_bytes());
    assert_eq!(all.len(), 4);
    assert!(all[0].is_ok() && all[1].is_ok() && all[3].is_ok());
    let e = all[2].as_ref().err().cloned().unwrap();
    assert_eq!(e.line, 3);
    // Column counts the two leading spaces: `}` is character 33 of the raw line.
    assert_contains(&e.message, &["invalid JSON at column 33", "expected value"]);
    assert!(!e.message.contains("line 1"), "{}", e.message);
    assert_eq!(all[3].as_ref().map(|j| j.overrides.steps), Ok(Some(3)));
}

#[test]
fn a_prompt_starting_with_a_brace_gets_a_hint() {
    let m = error("{red|blue} car");
    assert_contains(&m, &["invalid JSON at column 2", r#"as {"prompt": "...""#]);
    assert_eq!(
        job(r#"{"prompt": "{red|blue} car"}"#).prompt,
        "{red|blue} car"
    );
    assert_eq!(job(r#"--prompt "{red|blue} car""#).prompt, "{red|blue} car");
    // Broken JSON that looks like JSON gets no hint.
    assert!(!error(r#"{"prompt": }"#).contains("a line starting with"));
}

#[test]
fn json_columns_count_characters() {
    let m = error(r#"{"prompt": "éééé", x}"#);
    assert_contains(&m, &["column 20"]);
}

#[test]
fn json_other_syntax_errors() {
    assert_contains(
        &error(r#"{"prompt": "p"} trailing"#),
        &["trailing characters"],
    );
    assert_contains(
        &error(r#"{"prompt": "p"}{"prompt": "q"}"#),
        &["trailing characters"],
    );
    assert_contains(&error(r#"{"prompt": "p""#), &["invalid JSON"]);
    assert_contains(&error(r#"{"prompt": "p",}"#), &["invalid JSON"]);
    assert_contains(&error(r#"{prompt: "p"}"#), &["key must be a string"]);
    assert_contains(&error(r#"{"prompt": "unterminated}"#), &["invalid JSON"]);
    assert_contains(&error("{\"prompt\": \"a\u{1}b\"}"), &["control character"]);
}

#[test]
fn json_deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [200, 100_000, 1_000_000] {
        let value = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let m = error(&format!(r#"{{"prompt": "p", "steps": {value}}}"#));
        assert_contains(&m, &["recursion limit"]);
        let m = error(&format!(
            r#"{{"prompt": "p", "x": {}}}"#,
            "{\"a\":".repeat(depth)
        ));
        assert_contains(&m, &["invalid JSON"]);
        assert_contains(&error(&"{".repeat(depth)), &["invalid JSON"]);
    }
    // Nesting within the limit in a known key is a type error.
    let m = error(r#"{"prompt": "p", "steps": [[[[1]]]]}"#);
    assert_contains(&m, &["`steps`", "an array"]);
}

// ---------------------------------------------------------------------------------------------
// webui "prompts from file" lines
// ---------------------------------------------------------------------------------------------

#[test]
fn webui_line_with_every_documented_option() {
    let j = job(
        r#"--prompt "a fox, highly detailed" --negative_prompt "blurry, lowres" --seed 42 --steps 30 --cfg_scale 6.5 --width 512 --height 768 --sampler_name "Euler a""#,
    );
    assert_eq!(j.prompt, "a fox, highly detailed");
    assert!(j.webui_line);
    assert_eq!(
        j.overrides,
        Overrides {
            negative_prompt: Some("blurry, lowres".into()),
            seed: Some(42),
            steps: Some(30),
            guidance: Some(6.5),
            scheduler: Some("Euler a".into()),
            width: Some(512),
            height: Some(768),
            ..Overrides::default()
        }
    );
}

#[test]
fn webui_unquoted_prompts_take_words_up_to_the_next_option() {
    let j = job("--prompt a red   fox --negative_prompt ugly blurry --steps 20");
    assert_eq!(j.prompt, "a red fox");
    assert_eq!(j.overrides.negative_prompt.as_deref(), Some("ugly blurry"));
    assert_eq!(j.overrides.steps, Some(20));
    // The first word is taken whatever it is, as webui does.
    assert_eq!(job("--prompt --not-an-option").prompt, "--not-an-option");
    assert_eq!(job("--prompt '--x' y").prompt, "--x y");
    // A word starting with `--` ends the prompt even when quoted (shlex drops the quotes).
    assert_contains(&error(r#"--prompt a "--b""#), &["unknown option `--b`"]);
}

#[test]
fn webui_quoting() {
    let cases: &[(&str, &str)] = &[
        (r#"--prompt "say \"hi\"""#, r#"say "hi""#),
        (r#"--prompt "back\\slash""#, r"back\slash"),
        (r#"--prompt "keep \n and \x""#, r"keep \n and \x"),
        (r"--prompt 'single \ stays \n'", r"single \ stays \n"),
        (r#"--prompt 'it"s'"#, r#"it"s"#),
        (r#"--prompt "it's""#, "it's"),
        (r"--prompt 'it'\''s'", "it's"),
        (r#"--prompt a"b c"d'e f'g"#, "ab cde fg"),
        (r"--prompt escaped\ space", "escaped space"),
        (r"--prompt \'x\'", "'x'"),
        (r#"--prompt "tab	inside""#, "tab\tinside"),
        (
            r##"--prompt "#hashtag" #not-a-comment"##,
            "#hashtag #not-a-comment",
        ),
        (r#"--prompt "" x"#, " x"),
        ("--prompt \"一只 红狐狸\"", "一只 红狐狸"),
    ];
    for (line, prompt) in cases {
        assert_eq!(job(line).prompt, *prompt, "{line}");
    }
    // An empty negative prompt is allowed.
    assert_eq!(
        job(r#"--prompt p --negative_prompt """#)
            .overrides
            .negative_prompt
            .as_deref(),
        Some("")
    );
}

#[test]
fn webui_quoting_errors() {
    assert_contains(
        &error(r#"--prompt "unterminated"#),
        &["unterminated \" quote opened at column 10"],
    );
    assert_contains(
        &error("--prompt 'unterminated"),
        &["unterminated ' quote opened at column 10"],
    );
    assert_contains(
        &error(r#"  --prompt "escaped at end\""#),
        &["unterminated \" quote opened at column 12"],
    );
    assert_contains(&error(r"--prompt x\"), &["backslash at column 11"]);
    assert_contains(&error(r#"--prompt """#), &["`--prompt` is empty"]);
    assert_contains(&error("--prompt '  '"), &["`--prompt` is empty"]);
}

#[test]
fn webui_option_errors() {
    assert_contains(&error("--prompt"), &["`--prompt` has no value"]);
    assert_contains(&error("--prompt p --steps"), &["`--steps` has no value"]);
    assert_contains(&error("--steps 20"), &["missing `--prompt`"]);
    assert_contains(
        &error(r#"--prompt "p" --steps 20 30"#),
        &["expected an option starting with `--`, found `30`"],
    );
    assert_contains(
        &error("--prompt p --steps twenty"),
        &["`--steps`", "`twenty`"],
    );
    assert_contains(&error("--prompt p --steps -5"), &["`--steps`", "negative"]);
    assert_contains(&error("--prompt p --width 1.5"), &["`--width`"]);
    assert_contains(
        &error("--prompt p --cfg_scale -2"),
        &["`--cfg_scale`", "negative"],
    );
    assert_contains(&error("--prompt p --cfg_scale inf"), &["finite"]);
    assert_contains(&error("--prompt p --cfg_scale nan"), &["finite"]);
    assert_contains(&error("--prompt p --cfg_scale high"), &["must be a number"]);
    assert_contains(
        &error("--prompt p --seed 1 --seed 2"),
        &["`--seed` given twice"],
    );
    assert_contains(&error("--prompt p --prompt q"), &["`--prompt` given twice"]);
    assert_contains(
        &error("--prompt p --sampler_name a --scheduler b"),
        &["options `--sampler_name` and `--scheduler` are the same setting"],
    );
    assert_contains(
        &error("--prompt p --cfg_scale 1 --guidance 2"),
        &[
            "options `--cfg_scale` and `--guidance` are the same setting",
            "give one of them",
        ],
    );
}

#[test]
fn webui_unknown_and_unsupported_options_list_the_supported_ones() {
    let m = error("--prompt p --setps 20");
    assert_contains(&m, &["unknown option `--setps`", "did you mean `--steps`?"]);
    for o in WEBUI_OPTIONS {
        assert!(m.contains(&format!("--{o}")), "{m} lacks --{o}");
    }
    for o in [
        "restore_faces",
        "tiling",
        "sd_model",
        "styles",
        "subseed",
        "do_not_save_grid",
    ] {
        let m = error(&format!("--prompt p --{o} true"));
        assert_contains(
            &m,
            &[
                &format!("webui option `--{o}` is not supported by altdiff"),
                "--sampler_name",
            ],
        );
    }
    assert_contains(
        &error("--prompt p --steps=20"),
        &["write `--steps VALUE` with a space"],
    );
}

#[test]
fn webui_seeds() {
    assert_eq!(job("--prompt p --seed 0").overrides.seed, Some(0));
    assert_eq!(
        job("--prompt p --seed 18446744073709551615").overrides.seed,
        Some(u64::MAX)
    );
    assert_eq!(job("--prompt p --seed -1").overrides.seed, None);
    assert_contains(
        &error("--prompt p --seed -2"),
        &["`--seed` must not be negative"],
    );
    assert_contains(
        &error("--prompt p --seed 18446744073709551616"),
        &["`--seed` must be from 0 to"],
    );
    assert_contains(
        &error(&format!("--prompt p --seed {}", "9".repeat(10_000))),
        &["`--seed` must be an integer"],
    );
    assert_contains(
        &error("--prompt p --seed 4.2"),
        &["`--seed` must be an integer"],
    );
}

#[test]
fn webui_samplers_batch_size_and_extensions() {
    let j = job(r#"--prompt p --sampler_index "DPM++ 2M Karras""#);
    assert_eq!(j.overrides.scheduler.as_deref(), Some("DPM++ 2M Karras"));
    assert_contains(
        &error("--prompt p --sampler_index 3"),
        &["--sampler_index 3", "--sampler_name"],
    );
    assert_contains(
        &error("--prompt p --sampler_name ddim --sampler_index pndm"),
        &["options `--sampler_name` and `--sampler_index` are the same setting"],
    );

    assert_eq!(
        job("--prompt p --batch_size 2").overrides.num_images,
        Some(2)
    );
    assert_eq!(job("--prompt p --n_iter 3").overrides.num_images, Some(3));
    assert_eq!(
        job("--prompt p --n_iter 3 --batch_size 2")
            .overrides
            .num_images,
        Some(6)
    );
    assert_contains(
        &error("--prompt p --n_iter 3 --num_images 2"),
        &["not both"],
    );
    assert_contains(
        &error(&format!(
            "--prompt p --n_iter {} --batch_size 2",
            usize::MAX
        )),
        &["too many images"],
    );

    let j = job("--prompt p --lang de --guidance 4 --scheduler pndm --num-images 2 --output out/ --negative-prompt n");
    assert_eq!(
        j.overrides,
        Overrides {
            negative_prompt: Some("n".into()),
            lang: Some("de".into()),
            guidance: Some(4.0),
            scheduler: Some("pndm".into()),
            num_images: Some(2),
            output: Some("out/".into()),
            ..Overrides::default()
        }
    );
    assert_eq!(
        job("--prompt p --outpath_samples dir")
            .overrides
            .output
            .as_deref(),
        Some("dir")
    );
}

// ---------------------------------------------------------------------------------------------
// Mixed files and samplers
// ---------------------------------------------------------------------------------------------

#[test]
fn mixed_formats_keep_order_and_line_numbers() {
    let input = "\
# batch for the docs
a lighthouse at dusk

{\"prompt\": \"ein Leuchtturm\", \"lang\": \"de\", \"seed\": 7}
--prompt \"un phare\" --steps 12
{\"prompt\": \"broken\", \"steps\": \"x\"}
--prompt 'unterminated
灯塔
--prompt p --bogus 1
{\"prompt\": \"last\", \"num_images\": 2}";
    let all = parse(input.as_bytes());
    let summary: Vec<_> = all
        .iter()
        .map(|r| match r {
            Ok(j) => (j.line, Ok(j.prompt.as_str())),
            Err(e) => (e.line, Err(())),
        })
        .collect();
    assert_eq!(
        summary,
        [
            (2, Ok("a lighthouse at dusk")),
            (4, Ok("ein Leuchtturm")),
            (5, Ok("un phare")),
            (6, Err(())),
            (7, Err(())),
            (8, Ok("灯塔")),
            (9, Err(())),
            (10, Ok("last")),
        ]
    );
    assert_eq!(all[1].as_ref().map(|j| j.overrides.seed), Ok(Some(7)));
    assert_eq!(all[2].as_ref().map(|j| j.overrides.steps), Ok(Some(12)));
    assert_eq!(all[7].as_ref().map(|j| j.overrides.num_images), Ok(Some(2)));
}

#[test]
fn scheduler_names_map_webui_names() {
    let table = [
        ("PLMS", Some("pndm")),
        ("PNDM", Some("pndm")),
        ("pndm", Some("pndm")),
        ("DDIM", Some("ddim")),
        ("Euler a", Some("euler-a")),
        ("  euler   A ", Some("euler-a")),
        ("euler_a", Some("euler-a")),
        ("k_euler_a", Some("euler-a")),
        ("Euler", Some("euler")),
        ("k_euler", Some("euler")),
        ("DPM++ 2M", Some("dpm++2m")),
        ("k_dpmpp_2m", Some("dpm++2m")),
        ("DPM++ 2M Karras", Some("dpm++2m-karras")),
        ("k_dpmpp_2m_ka", Some("dpm++2m-karras")),
        ("dpm++2m-karras", Some("dpm++2m-karras")),
        ("Heun", Some("heun")),
        ("LMS", Some("lms")),
        ("UniPC", Some("unipc")),
        ("DDPM", Some("ddpm")),
        ("DPM++ SDE Karras", None),
        ("Ünknown", None),
        ("", None),
    ];
    for (webui, ours) in table {
        assert_eq!(
            altdiff::schedulers::SchedulerKind::parse(webui).map(|k| k.name()),
            ours,
            "{webui:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_lines_do_not_panic_or_blow_up() {
    const MB: usize = 1 << 20;
    let inputs: Vec<Vec<u8>> = vec![
        vec![b'{'; MB],
        vec![b'"'; MB],
        vec![b'\\'; MB],
        vec![b'['; MB],
        vec![0u8; MB],
        vec![b'\n'; MB],
        vec![0xFF; MB],
        [b"--prompt \"".as_slice(), &vec![b'\\'; MB]].concat(),
        [b"--prompt '".as_slice(), &vec![b'x'; MB]].concat(),
        b"--prompt x ".repeat(MB / 11),
        b"--".repeat(MB / 2),
        [b"{\"prompt\": \"".as_slice(), &vec![b'a'; MB], b"\"}"].concat(),
        [
            b"{\"prompt\": \"p\", \"seed\": ".as_slice(),
            &vec![b'9'; MB],
            b"}",
        ]
        .concat(),
        [
            b"{\"prompt\": \"p\", \"guidance\": 0.".as_slice(),
            &vec![b'1'; MB],
            b"}",
        ]
        .concat(),
        b"a\0b\n{\"prompt\": \"\\u0000\"}\n--prompt \"\0\"\n".to_vec(),
    ];
    for input in &inputs {
        let start = std::time::Instant::now();
        let all = parse(input);
        assert!(all.len() <= input.len());
        for e in all.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                e.message.len() < 1000,
                "message of {} bytes",
                e.message.len()
            );
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?} took {:?}",
            input.get(..20),
            start.elapsed()
        );
    }
    // Long prompts come through whole.
    let long = "ä".repeat(MB);
    assert_eq!(job(&long).prompt.len(), long.len());
    assert_eq!(
        job(&format!(r#"{{"prompt": "{long}"}}"#)).prompt.len(),
        long.len()
    );
    // NUL bytes are not special here (the caller checks prompt contents).
    assert_eq!(job("a\0b").prompt, "a\0b");
    assert_eq!(job(r#"{"prompt": "a\u0000b"}"#).prompt, "a\0b");
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// Checks what holds for any input: no panic (the caller of this), one entry at most per line,
/// line numbers in range and strictly increasing, jobs with non-blank prompts.
fn check_invariants(input: &[u8]) -> Result<(), TestCaseError> {
    let all = parse(input);
    let line_count = input.iter().filter(|&&b| b == b'\n').count() + 1;
    let mut last = 0;
    for r in &all {
        let line = match r {
            Ok(j) => {
                prop_assert!(!j.prompt.trim().is_empty());
                if let Some(g) = j.overrides.guidance {
                    prop_assert!(g.is_finite() && g >= 0.0);
                }
                j.line
            }
            Err(e) => {
                prop_assert!(!e.message.is_empty());
                prop_assert!(
                    e.message.len() < 2000,
                    "message of {} bytes",
                    e.message.len()
                );
                let prefix = format!("line {}: ", e.line);
                prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
                e.line
            }
        };
        prop_assert!(
            line > last && line <= line_count,
            "line {line} after {last} of {line_count}"
        );
        last = line;
    }
    Ok(())
}

/// Bytes drawn mostly from the formats' syntax characters, so that the generators reach the
/// parsers' corners more often than uniform bytes do.
fn syntax_soup() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b"'",
        b"\\",
        b":",
        b",",
        b" ",
        b"\t",
        b"\n",
        b"\r\n",
        b"#",
        b"--",
        b"-",
        b"--prompt ",
        b"--seed ",
        b"--steps ",
        b"--cfg_scale ",
        b"--sampler_index ",
        b"--batch_size ",
        b"--n_iter ",
        b"\"prompt\"",
        b"\"seed\"",
        b"\"steps\"",
        b"\"guidance\"",
        b"\"cfg_scale\"",
        b"null",
        b"true",
        b"-1",
        b"0",
        b"1.5",
        b"1e400",
        b"18446744073709551616",
        b"a",
        b"\xC3\xA9",
        b"\xE4\xB8\x80",
        b"\xFF",
        b"\xC3",
        b"\0",
        b"\xEF\xBB\xBF",
        b"\\u0000",
        b"\\\"",
    ];
    proptest::collection::vec(proptest::sample::select(pieces), 0..64).prop_map(|v| v.concat())
}

/// Any text that is a plain-text prompt line as written.
fn plain_line() -> impl Strategy<Value = String> {
    "[^\n]{1,40}".prop_filter("a plain-text prompt line", |s| {
        let t = s.trim();
        !t.is_empty()
            && t == s
            && !t.starts_with('#')
            && !t.starts_with('{')
            && !t.starts_with("--")
            && !t.starts_with('\u{FEFF}')
    })
}

/// Quotes `s` for a POSIX shell (and so for shlex and webui).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An `Option` strategy that is `None` half of the time.
fn maybe<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    proptest::option::of(s)
}

fn overrides() -> impl Strategy<Value = Overrides> {
    let text = "[^\n\r]{0,12}";
    (
        (
            maybe(text),
            maybe("[a-z]{2}"),
            maybe(any::<u64>()),
            maybe(0usize..2000),
        ),
        (
            maybe((0u32..100_000).prop_map(|n| f64::from(n) / 100.0)),
            maybe(text),
            maybe(0usize..5000),
            maybe(0usize..5000),
            maybe(0usize..100),
            maybe(text),
        ),
        (
            maybe(text),
            maybe(text),
            maybe((1u32..=100).prop_map(|n| f64::from(n) / 100.0)),
            maybe(text),
        ),
    )
        .prop_map(
            |(
                (negative_prompt, lang, seed, steps),
                (guidance, scheduler, width, height, num_images, output),
                (init_image, mask, strength, prompt_syntax),
            )| {
                Overrides {
                    negative_prompt,
                    lang,
                    seed,
                    steps,
                    guidance,
                    scheduler,
                    width,
                    height,
                    num_images,
                    output,
                    init_image,
                    mask,
                    strength,
                    prompt_syntax,
                }
            },
        )
}

fn json_line(prompt: &str, o: &Overrides) -> String {
    let mut m = serde_json::Map::new();
    m.insert("prompt".into(), prompt.into());
    let mut put = |k: &str, v: serde_json::Value| {
        if !v.is_null() {
            m.insert(k.into(), v);
        }
    };
    put("negative_prompt", serde_json::json!(o.negative_prompt));
    put("lang", serde_json::json!(o.lang));
    put("seed", serde_json::json!(o.seed));
    put("steps", serde_json::json!(o.steps));
    put("guidance", serde_json::json!(o.guidance));
    put("scheduler", serde_json::json!(o.scheduler));
    put("width", serde_json::json!(o.width));
    put("height", serde_json::json!(o.height));
    put("num_images", serde_json::json!(o.num_images));
    put("output", serde_json::json!(o.output));
    put("init_image", serde_json::json!(o.init_image));
    put("mask", serde_json::json!(o.mask));
    put("strength", serde_json::json!(o.strength));
    put("prompt_syntax", serde_json::json!(o.prompt_syntax));
    serde_json::Value::Object(m).to_string()
}

fn webui_line(prompt: &str, o: &Overrides) -> String {
    let mut line = format!("--prompt {}", shell_quote(prompt));
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            line.push_str(&format!(" --{k} {}", shell_quote(&v)));
        }
    };
    put("negative_prompt", o.negative_prompt.clone());
    put("lang", o.lang.clone());
    put("seed", o.seed.map(|v| v.to_string()));
    put("steps", o.steps.map(|v| v.to_string()));
    put("cfg_scale", o.guidance.map(|v| v.to_string()));
    put("sampler_name", o.scheduler.clone());
    put("width", o.width.map(|v| v.to_string()));
    put("height", o.height.map(|v| v.to_string()));
    put("num_images", o.num_images.map(|v| v.to_string()));
    put("output", o.output.clone());
    put("init_image", o.init_image.clone());
    put("mask", o.mask.clone());
    put("denoising_strength", o.strength.map(|v| v.to_string()));
    put("prompt_syntax", o.prompt_syntax.clone());
    line
}

/// A prompt that survives as the value of a JSON or webui line.
fn any_prompt() -> impl Strategy<Value = String> {
    "[^\n\r]{1,30}".prop_filter("non-blank", |s| !s.trim().is_empty())
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&input)?;
    }

    #[test]
    fn syntax_soup_never_panics(input in syntax_soup()) {
        check_invariants(&input)?;
    }

    #[test]
    fn plain_lines_round_trip(
        lines in proptest::collection::vec(plain_line(), 1..8),
        crlf in any::<bool>(),
        bom in any::<bool>(),
    ) {
        let sep = if crlf { "\r\n" } else { "\n" };
        let text = format!("{}{}", if bom { "\u{FEFF}" } else { "" }, lines.join(sep));
        let all = jobs(&text);
        prop_assert_eq!(all.len(), lines.len());
        for (i, (j, l)) in all.iter().zip(&lines).enumerate() {
            prop_assert_eq!(j.line, i + 1);
            prop_assert_eq!(&j.prompt, l);
            prop_assert!(j.overrides.is_empty());
        }
    }

    #[test]
    fn json_lines_round_trip(prompt in any_prompt(), o in overrides()) {
        let j = job(&json_line(&prompt, &o));
        prop_assert_eq!(j.prompt, prompt);
        prop_assert_eq!(j.overrides, o);
    }

    #[test]
    fn webui_lines_round_trip(prompt in any_prompt(), o in overrides()) {
        // Every value is one quoted word, so it comes through exactly.
        let line = webui_line(&prompt, &o);
        let j = job(&line);
        prop_assert_eq!(j.prompt, prompt);
        prop_assert_eq!(j.overrides, o);
    }
}

/// The long fuzz run for issue 8, meant for release mode:
/// `cargo test --release --test batch_parse -- --ignored --nocapture`.
///
/// Each round runs `BATCH_FUZZ_CASES` cases (default 1,000,000) of each generator (arbitrary
/// bytes, syntax soup, JSON and webui round trips), each round with fresh random seeds. With
/// `BATCH_FUZZ_SECS=600` rounds repeat until ten minutes have passed; without it, one round.
/// A failure panics with the shrunk input.
#[test]
#[ignore = "long-running fuzz run; see the doc comment"]
fn fuzz_batch_parser_long() {
    let env = |name: &str| -> Option<u64> { std::env::var(name).ok()?.parse().ok() };
    let cases = env("BATCH_FUZZ_CASES").map_or(1_000_000, |n| n as u32);
    let budget = env("BATCH_FUZZ_SECS").map(std::time::Duration::from_secs);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let started = std::time::Instant::now();
    let mut rounds = 0u64;
    let mut times = [std::time::Duration::ZERO; 3];
    loop {
        let t = std::time::Instant::now();
        TestRunner::new(config.clone())
            .run(&proptest::collection::vec(any::<u8>(), 0..4096), |input| {
                check_invariants(&input)
            })
            .unwrap();
        times[0] += t.elapsed();
        let t = std::time::Instant::now();
        TestRunner::new(config.clone())
            .run(&syntax_soup(), |input| check_invariants(&input))
            .unwrap();
        times[1] += t.elapsed();
        let t = std::time::Instant::now();
        TestRunner::new(config.clone())
            .run(&(any_prompt(), overrides()), |(prompt, o)| {
                let j = job(&json_line(&prompt, &o));
                prop_assert_eq!(&j.prompt, &prompt);
                prop_assert_eq!(&j.overrides, &o);
                let j = job(&webui_line(&prompt, &o));
                prop_assert_eq!(j.prompt, prompt);
                prop_assert_eq!(j.overrides, o);
                Ok(())
            })
            .unwrap();
        times[2] += t.elapsed();
        rounds += 1;
        if budget.is_none_or(|b| started.elapsed() >= b) {
            break;
        }
    }
    eprintln!(
        "{rounds} round(s) of {cases} cases per generator in {:?}: arbitrary bytes {:?}, \
         syntax soup {:?}, JSON + webui round trips {:?}",
        started.elapsed(),
        times[0],
        times[1],
        times[2]
    );
}
