//! webui compatibility (`tests/fixtures/webui/`, written by `tools/fixtures/webui.py` from webui's
//! algorithm): its prompt syntax parsed and chunked token for token, its conditioning and the
//! diffusers run on it matched within |a-b| <= 1e-4 + 1e-3|b|, its infotext parser ported
//! exactly, altdiff's PNG text read back by that parser for every scheduler, and a PNG written as
//! webui writes it regenerated with `--from-image`.

mod common;

use std::path::Path;

use altdiff::metadata::{self, infotext};
use altdiff::text::webui;
use altdiff::tokenizer::PromptTokenizer;
use common::*;
use serde_json::Value;

fn json(rel: &str) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn s(v: &Value) -> String {
    text(v)
}

/// A weight written as Python's repr (serde_json's float parsing may be off by one ulp).
fn exact(v: &Value) -> f64 {
    v.as_str().unwrap().parse().unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Fragments and chunks of every text, with both tokenizer backends (tokenizer.json and the hub
/// layout's sentencepiece model), equal to webui's algorithm's.
#[test]
fn parses_and_chunks_as_webui() {
    let texts = json("webui/prompts.json");
    assert!(texts.len() >= 20);
    for dir in ["models/tiny-m18/tokenizer", "models/tiny-m18-hub/tokenizer"] {
        let tok = PromptTokenizer::load(&fixture(dir)).unwrap();
        let ids = webui::SpecialIds {
            bos: tok.bos_id(),
            eos: tok.eos_id(),
            pad: tok.pad_id(),
            comma: tok.vocab_id(","),
        };
        assert!(ids.comma.is_some(), "{dir}: the comma piece");
        let mut chunk_counts = Vec::new();
        for t in &texts {
            let text = s(&t["text"]);
            let parsed = webui::parse_attention(&text);
            if t["error"] == true {
                assert!(parsed.is_err(), "{text:?} must be an error, as in webui");
                continue;
            }
            let parsed = parsed.unwrap();
            let want: Vec<(String, f64)> = t["parsed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (s(&p[0]), exact(&p[1])))
                .collect();
            assert_eq!(parsed, want, "{text:?}: fragments");
            let chunks = webui::chunks(&parsed, |f| tok.ids(f), ids).unwrap();
            let want = t["chunks"].as_array().unwrap();
            assert_eq!(chunks.len(), want.len(), "{text:?}: chunk count");
            for (k, (c, w)) in chunks.iter().zip(want).enumerate() {
                assert_eq!(c.ids, u32s(&w["ids"]), "{text:?}: chunk {k} ids");
                assert_eq!(c.mask, u32s(&w["mask"]), "{text:?}: chunk {k} mask");
                let m: Vec<f64> = w["multipliers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(exact)
                    .collect();
                assert_eq!(c.multipliers, m, "{text:?}: chunk {k} multipliers");
            }
            chunk_counts.push(chunks.len());
        }
        assert!(chunk_counts.contains(&3), "a 3-chunk text is covered");
    }
}

fn run_case(case: &Value) {
    let name = s(&case["name"]);
    let dir = scratch(&format!("webui-{name}"));
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        fixture(&format!("models/{}", s(&case["model"])))
            .display()
            .to_string(),
        "--prompt-syntax".into(),
        "webui".into(),
        "--width".into(),
        "64".into(),
        "--height".into(),
        "64".into(),
    ];
    for p in case["prompts"].as_array().unwrap() {
        args.extend(["--prompt".into(), s(p)]);
    }
    args.extend(case_flags(
        case,
        &[
            ("--negative-prompt", "negative_prompt"),
            ("--steps", "steps"),
            ("--guidance", "guidance"),
            ("--scheduler", "scheduler"),
            ("--seed", "seed"),
        ],
    ));
    let (_, got) = run_dumped(args, &dir);
    let want = load(&fixture(&format!("webui/{name}.safetensors")));
    let mut keys = vec!["prompt_embeds", "latents_final", "image"];
    if want.contains_key("negative_prompt_embeds") {
        keys.push("negative_prompt_embeds");
    } else {
        assert!(!got.contains_key("negative_prompt_embeds"), "{name}");
    }
    for key in keys {
        assert_close(&name, key, &got, &want);
    }
}

/// webui's conditioning on both tiny models (emphasis, nested and unbalanced brackets, escapes,
/// BREAK, three chunks with commas near the boundary, prompt and negative prompt of different
/// chunk counts, two prompts of different lengths, no guidance) and diffusers' run on it.
#[test]
fn conditioning_and_images_match_webui_and_diffusers() {
    let cases = json("webui/cases.json");
    assert!(cases.len() >= 8);
    for case in &cases {
        run_case(case);
    }
    let models: Vec<String> = cases.iter().map(|c| s(&c["model"])).collect();
    assert!(models.contains(&"tiny-m9".into()) && models.contains(&"tiny-m18".into()));
}

/// The port of `parse_generation_parameters` reads what webui's own line logic and regular
/// expression read.
#[test]
fn infotext_parser_is_webuis() {
    for t in json("webui/infotext.json") {
        let text = s(&t["text"]);
        let got = infotext::parse(&text);
        assert_eq!(got.prompt, s(&t["prompt"]), "{text:?}: prompt");
        assert_eq!(
            got.negative_prompt,
            s(&t["negative_prompt"]),
            "{text:?}: negative prompt"
        );
        let want: Vec<(String, String)> = t["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (s(&p[0]), s(&p[1])))
            .collect();
        assert_eq!(got.params, want, "{text:?}: parameters");
    }
}

/// For every scheduler: the PNG altdiff writes, read with the port of webui's parser, gives back
/// the prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed and size used, and
/// reading the same PNG back as webui settings names the same scheduler.
#[test]
fn webui_reads_altdiff_png_text_for_every_scheduler() {
    let dir = scratch("webui-roundtrip");
    let prompt = "un renard (roux:1.2), dans la neige: hiver";
    let negative = "flou, \"laid\"";
    for (kind, sampler, schedule) in [
        ("pndm", "PLMS", "DDIM"),
        ("ddim", "DDIM", "DDIM"),
        ("euler", "Euler", "Uniform"),
        ("euler-a", "Euler a", "Uniform"),
        ("dpm++2m", "DPM++ 2M", "Uniform"),
        ("dpm++2m-karras", "DPM++ 2M", "Karras"),
        ("heun", "Heun", "Uniform"),
        ("lms", "LMS", "Uniform"),
        ("unipc", "UniPC", "Uniform"),
        ("ddpm", "DDPM", "DDIM"),
    ] {
        let out = dir.join(format!("{kind}.png"));
        ok(&generate(
            "models/tiny-m18",
            &[
                "--prompt",
                prompt,
                "--negative-prompt",
                negative,
                "--steps",
                "2",
                "--guidance",
                "6",
                "--scheduler",
                kind,
                "--seed",
                "4242",
                "--width",
                "64",
                "--height",
                "48",
                "--output",
                out.to_str().unwrap(),
                "--overwrite",
            ],
        ));
        let chunks = metadata::read_png_text(&out).unwrap();
        let text = &chunks
            .iter()
            .find(|(k, _)| k == metadata::PARAMETERS_KEY)
            .unwrap()
            .1;
        let p = infotext::parse(text);
        assert_eq!(p.prompt, prompt, "{kind}: {text}");
        assert_eq!(p.negative_prompt, negative, "{kind}");
        for (key, value) in [
            ("Steps", "2"),
            ("Sampler", sampler),
            ("Schedule type", schedule),
            ("CFG scale", "6.0"),
            ("Seed", "4242"),
            ("Size-1", "64"),
            ("Size-2", "48"),
            ("RNG", "CPU"),
            ("Model", "tiny-m18"),
            ("Emphasis", "None"),
            ("Prompt syntax", "plain"),
        ] {
            assert_eq!(p.get(key), Some(value), "{kind}: {key} in {text}");
        }
        assert!(
            !text.contains(&*fixture("").display().to_string()),
            "{text}"
        );
        // Read back as a webui PNG (the altdiff record dropped): the same scheduler.
        let imported = metadata::webui::import(&p, Path::new("x.png"));
        if kind == "ddpm" {
            // webui has no DDPM sampler.
            assert!(imported.is_err());
            continue;
        }
        let imported = imported.unwrap();
        assert_eq!(imported.record.scheduler, kind, "{text}");
        assert_eq!(imported.record.seed(), Some(4242));
        assert_eq!(
            imported.record.prompt_syntax,
            altdiff::text::PromptSyntax::Plain
        );
    }
}

/// A PNG with webui's `parameters` text only (tEXt, as webui's Pillow writes ASCII text).
fn webui_png(path: &Path, parameters: &str) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 8, 8);
    enc.set_color(png::ColorType::Rgb);
    enc.add_text_chunk("parameters".into(), parameters.into())
        .unwrap();
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[128u8; 8 * 8 * 3]).unwrap();
}

fn image_bytes(path: &Path) -> Vec<u8> {
    let img = altdiff::picture::load("image", path).unwrap();
    img.picture.to_rgb().pixels
}

/// `--from-image` on a webui PNG: its prompt (webui syntax), sampler and schedule, CFG, seed and
/// size, the same pixels as the flags spelled out; keys altdiff cannot honour are warnings naming
/// them; an unknown sampler is an error naming it; `altdiff info` shows the text.
#[test]
fn regenerates_a_png_made_by_webui() {
    let dir = scratch("webui-from-image");
    let model = fixture("models/tiny-m9");
    let model = model.to_str().unwrap();
    let src = dir.join("webui.png");
    webui_png(
        &src,
        "a (red:1.3) fox, [snow]\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 77, Size: 64x48, Model hash: 0123abcd, Model: v1-5, Clip skip: 2, ADetailer model: face_yolov8n.pt, RNG: CPU, Version: v1.10.1",
    );
    let a = dir.join("a.png");
    let out = altdiff(&[
        "generate",
        "--model",
        model,
        "--from-image",
        src.to_str().unwrap(),
        "--output",
        a.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Clip skip: 2"), "{stderr}");
    assert!(stderr.contains("ADetailer model"), "{stderr}");
    assert!(!stderr.contains("RNG"), "{stderr}");
    let b = dir.join("b.png");
    ok(&altdiff(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "a (red:1.3) fox, [snow]",
        "--negative-prompt",
        "blurry",
        "--prompt-syntax",
        "webui",
        "--steps",
        "3",
        "--scheduler",
        "dpm++2m-karras",
        "--guidance",
        "7",
        "--seed",
        "77",
        "--width",
        "64",
        "--height",
        "48",
        "--output",
        b.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    assert_eq!(image_bytes(&a), image_bytes(&b));
    let rec = metadata::read_record(&a).unwrap();
    assert_eq!(rec.prompt_syntax, altdiff::text::PromptSyntax::Webui);
    assert_eq!(rec.scheduler, "dpm++2m-karras");
    // Plain syntax is a different conditioning.
    let c = dir.join("c.png");
    ok(&altdiff(&[
        "generate",
        "--model",
        model,
        "--from-image",
        src.to_str().unwrap(),
        "--prompt-syntax",
        "plain",
        "--output",
        c.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    assert_ne!(image_bytes(&a), image_bytes(&c));

    let bad = dir.join("bad.png");
    webui_png(
        &bad,
        "a fox\nSteps: 3, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Size: 64x64",
    );
    let out = altdiff(&[
        "generate",
        "--model",
        model,
        "--from-image",
        bad.to_str().unwrap(),
        "--output",
        dir.join("bad-out").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`DPM++ SDE`"), "{stderr}");
    assert!(!dir.join("bad-out").exists());

    let info = ok(&altdiff(&["info", src.to_str().unwrap()]));
    assert!(
        info.contains("Sampler: DPM++ 2M, Schedule type: Karras"),
        "{info}"
    );
    assert!(
        info.contains("altdiff --from-image reads: --prompt-syntax webui --scheduler dpm++2m-karras --steps 3 --guidance 7 --width 64 --height 48 --seed 77"),
        "{info}"
    );
    assert!(
        info.contains("note: ") && info.contains("Clip skip: 2"),
        "{info}"
    );
    let bad_info = ok(&altdiff(&["info", bad.to_str().unwrap()]));
    assert!(
        bad_info.contains("cannot regenerate it") && bad_info.contains("`DPM++ SDE`"),
        "{bad_info}"
    );
}

/// webui-style batch lines read their prompts with webui's syntax; JSON lines with plain unless
/// they say `prompt_syntax`; a bad `prompt_syntax` fails its line only.
#[test]
fn batch_lines_choose_their_prompt_syntax() {
    let dir = scratch("webui-batch");
    let file = dir.join("batch.txt");
    std::fs::write(
        &file,
        "--prompt \"a (red:1.3) fox\" --seed 5 --steps 2\n\
         {\"prompt\": \"a (red:1.3) fox\", \"seed\": 5, \"steps\": 2}\n\
         {\"prompt\": \"a (red:1.3) fox\", \"seed\": 5, \"steps\": 2, \"prompt_syntax\": \"webui\"}\n\
         {\"prompt\": \"x\", \"prompt_syntax\": \"fancy\"}\n\
         --prompt \"a [cat|dog]\" --seed 1\n",
    )
    .unwrap();
    let model = fixture("models/tiny-m18");
    let out = altdiff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        file.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        dir.join("out").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(1), "one line failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 4") && stderr.contains("fancy"),
        "{stderr}"
    );
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    let syntax: Vec<_> = paths
        .iter()
        .map(|p| metadata::read_record(Path::new(p)).unwrap().prompt_syntax)
        .collect();
    use altdiff::text::PromptSyntax::*;
    assert_eq!(syntax, vec![Webui, Plain, Webui]);
    let px: Vec<Vec<u8>> = paths.iter().map(|p| image_bytes(Path::new(p))).collect();
    assert_eq!(px[0], px[2]);
    assert_ne!(px[0], px[1]);
}

/// `altdiff tokenize --prompt-syntax webui` shows the chunks the pipeline encodes; `--max-length`
/// with webui's syntax is a usage error (it has no length limit).
#[test]
fn tokenize_shows_webui_chunks_and_max_length_is_plain_only() {
    let model = fixture("models/tiny-m18");
    let model = model.to_str().unwrap();
    let out = ok(&altdiff(&[
        "tokenize",
        "--model",
        model,
        "--prompt-syntax",
        "webui",
        "--json",
        "a (red:1.5) fox BREAK snow",
    ]));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["chunks"].as_array().unwrap().len(), 2);
    assert_eq!(v["length"], 154);
    assert_eq!(v["fragments"][1][1], 1.5);
    let weights = v["chunks"][0]["weights"].as_array().unwrap();
    assert!(weights.iter().any(|w| w == 1.5), "{weights:?}");
    assert_eq!(v["chunks"][0]["tokens"][0], "<s>");
    let text = ok(&altdiff(&[
        "tokenize",
        "--model",
        model,
        "--prompt-syntax",
        "webui",
        "a (red:1.5) fox",
    ]));
    assert!(
        text.contains("1 chunk(s): the UNet attends over 77 tokens"),
        "{text}"
    );
    for args in [
        vec![
            "tokenize",
            "--model",
            model,
            "--prompt-syntax",
            "webui",
            "--max-length",
            "100",
            "x",
        ],
        vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "x",
            "--prompt-syntax",
            "webui",
            "--max-length",
            "100",
        ],
        vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "a [cat:dog:0.5]",
            "--prompt-syntax",
            "webui",
            "--steps",
            "1",
        ],
        vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "(a:1.2.3)",
            "--prompt-syntax",
            "webui",
            "--steps",
            "1",
        ],
    ] {
        let out = altdiff(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}
