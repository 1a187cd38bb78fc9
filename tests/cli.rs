//! The binary as a user meets it: the offline demo, seeds, outputs, warnings and errors.

mod common;

use common::*;

const M9: &str = "models/tiny-m9";
const M18: &str = "models/tiny-m18";

fn model(rel: &str) -> String {
    fixture(rel).display().to_string()
}

/// `altdiff generate --model <model> <extra...>`.
fn gen(model: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["generate", "--model", model];
    args.extend_from_slice(extra);
    altdiff(&args)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a usage/config failure: exit 2, a short message containing `needle`, no panic, nothing on stdout.
fn assert_fails(out: &std::process::Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(
        err.lines().count() <= 4,
        "a short message, not {} lines: {err}",
        err.lines().count()
    );
    assert!(
        out.stdout.is_empty(),
        "stdout must stay clean: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn png_text(path: &str) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect()
}

#[test]
fn offline_demo_writes_a_png_with_parameters() {
    let dir = scratch("demo");
    let out = gen(
        &model(M18),
        &[
            "--prompt",
            "un renard roux dans la neige",
            "--seed",
            "42",
            "--steps",
            "3",
            "--output",
            dir.to_str().unwrap(),
        ],
    );
    let stdout = ok(&out);
    let path = stdout.trim();
    assert!(
        path.ends_with(".png") && path.contains("42") && path.contains("un-renard-roux"),
        "{path}"
    );
    let text = png_text(path);
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with("un renard roux dans la neige\n"),
        "{params}"
    );
    assert!(
        params.contains("Steps: 3, Sampler: PLMS, Schedule type: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny-m18"),
        "{params}"
    );
}

#[test]
fn seed_gives_pytorchs_initial_noise() {
    // tiny-m9 at 64x64 has 1x4x8x8 = 256 latents: torch.randn(256) with manual_seed(42).
    let dir = scratch("seed");
    let dump = dir.join("t.safetensors");
    ok(&gen(
        &model(M9),
        &[
            "--prompt",
            "a fox",
            "--seed",
            "42",
            "--steps",
            "1",
            "--dump-tensors",
            dump.to_str().unwrap(),
            "--output",
            dir.join("img").to_str().unwrap(),
        ],
    ));
    let got = load(&dump)["latents_init"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("torch_randn.json")).unwrap())
            .unwrap();
    let case = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["seed"] == 42 && c["n"] == 256 && c.get("then").is_none())
        .unwrap();
    let want: Vec<f32> = case["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn same_seed_same_image_and_nothing_overwritten() {
    let dir = scratch("twice");
    let file = dir.join("fox.png");
    let args = |_: ()| {
        vec![
            "generate".to_string(),
            "--model".into(),
            model(M9),
            "--prompt".into(),
            "a fox".into(),
            "--seed".into(),
            "7".into(),
            "--steps".into(),
            "2".into(),
            "--output".into(),
            file.display().to_string(),
        ]
    };
    let a = args(());
    let first = ok(&altdiff(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let second = ok(&altdiff(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(first.trim(), file.display().to_string());
    assert_eq!(
        second.trim(),
        dir.join("fox-1.png").display().to_string(),
        "the existing file is kept"
    );
    let a = std::fs::read(&file).unwrap();
    let b = std::fs::read(dir.join("fox-1.png")).unwrap();
    assert_eq!(a, b, "the same seed gives the same PNG");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
}

#[test]
fn random_seed_is_reported() {
    let dir = scratch("random-seed");
    let out = gen(
        &model(M9),
        &[
            "--prompt",
            "a fox",
            "--steps",
            "1",
            "--output",
            dir.to_str().unwrap(),
        ],
    );
    ok(&out);
    let err = stderr(&out);
    let seed: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("seed: "))
        .unwrap_or_else(|| panic!("no seed line in {err}"))
        .trim()
        .parse()
        .unwrap();
    assert!(seed <= u32::MAX as u64);
}

#[test]
fn long_prompt_warns_with_the_dropped_words() {
    let dir = scratch("long");
    let prompt = format!("{} purple elephants", "a quiet lake in autumn, ".repeat(12));
    let out = gen(
        &model(M18),
        &[
            "--prompt",
            &prompt,
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            dir.to_str().unwrap(),
        ],
    );
    ok(&out);
    let err = stderr(&out);
    assert!(err.contains("longer than 77 tokens"), "{err}");
    assert!(err.contains("purple elephants"), "{err}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let dir = scratch("usage");
    let m = model(M9);
    let o = dir.to_str().unwrap();
    let base = ["generate", "--model", m.as_str(), "--prompt", "a fox"];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        if !extra.contains(&"--output") {
            a.extend_from_slice(&["--output", o]);
        }
        altdiff(&a)
    };
    assert_fails(
        &run(&["--height", "60"]),
        "--height 60 must be a multiple of 8",
    );
    assert_fails(&run(&["--steps", "0"]), "--steps 0 is out of range");
    assert_fails(
        &run(&["--guidance", "NaN"]),
        "--guidance NaN must be a finite number",
    );
    assert_fails(&run(&["--guidance", "-1"]), "must be a finite number >= 0");
    assert_fails(
        &run(&["--scheduler", "euler-x"]),
        "unknown scheduler `euler-x`",
    );
    assert_fails(
        &run(&["--max-length", "600"]),
        "--max-length 600 is out of range",
    );
    assert_fails(&run(&["--device", "tpu"]), "unknown device `tpu`");
    assert_fails(&run(&["--dtype", "f64"]), "f64");
    let one = dir.join("one.png");
    assert_fails(
        &run(&["--num-images", "2", "--output", one.to_str().unwrap()]),
        "names one file but this run makes 2 images",
    );
    #[cfg(not(feature = "cuda"))]
    assert_fails(&run(&["--device", "cuda"]), "--features cuda");
    #[cfg(not(feature = "metal"))]
    assert_fails(&run(&["--device", "metal"]), "--features metal");
    assert_fails(&run(&["--steps", "1001"]), "--steps 1001 is out of range");
    assert_fails(
        &run(&["--width", "4104"]),
        "--width 4104 must be a multiple of 8 between 8 and 4096",
    );
    assert_fails(&run(&["--lang", "klingon"]), "klingon");
    assert_fails(
        &run(&["--prompt", "a\u{7}b"]),
        "prompt 2 contains the control character U+0007 at character 2",
    );
    assert_fails(
        &run(&["--negative-prompt", "\u{1b}[0m"]),
        "--negative-prompt contains the control character U+001B",
    );
    assert_fails(&gen(m.as_str(), &["--prompt", "  "]), "prompt 1 is empty");
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "no file written on errors"
    );
}

#[test]
fn latents_file_is_checked() {
    let dir = scratch("latents");
    // The m9-pndm reference holds 1x4x8x8 latents; two prompts need 2x4x8x8.
    let latents = fixture("reference/m9-pndm.safetensors");
    let out = gen(
        &model(M9),
        &[
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--latents",
            latents.to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
        ],
    );
    assert_fails(
        &out,
        "--latents has shape [1, 4, 8, 8] but this run needs [2, 4, 8, 8]",
    );
    let not_latents = fixture("models/tiny-m9/vae/diffusion_pytorch_model.safetensors");
    let out = gen(
        &model(M9),
        &[
            "--prompt",
            "a",
            "--latents",
            not_latents.to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
        ],
    );
    assert_fails(&out, "no tensor named `latents`");
}

/// Copies a tiny model so a test can break it.
fn copy_model(rel: &str, name: &str) -> std::path::PathBuf {
    fn copy(src: &std::path::Path, dst: &std::path::Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let to = dst.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to);
            } else {
                std::fs::copy(e.path(), to).unwrap();
            }
        }
    }
    let dst = scratch(name).join("model");
    copy(&fixture(rel), &dst);
    dst
}

fn edit_json(path: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn model_problems_name_the_file_and_field() {
    let gen = |m: &std::path::Path| {
        let out_dir = m.parent().unwrap().join("out");
        gen(
            m.to_str().unwrap(),
            &[
                "--prompt",
                "a",
                "--seed",
                "1",
                "--steps",
                "1",
                "--output",
                out_dir.to_str().unwrap(),
            ],
        )
    };
    let missing = scratch("nomodel").join("nope");
    assert_fails(&gen(&missing), "model directory not found");

    let m = copy_model(M9, "unsupported");
    edit_json(&m.join("unet/config.json"), |v| {
        v["resnet_time_scale_shift"] = "scale_shift".into()
    });
    let out = gen(&m);
    assert_fails(&out, "unet/config.json: field `resnet_time_scale_shift`");

    let m = copy_model(M9, "heads");
    edit_json(&m.join("unet/config.json"), |v| {
        v["attention_head_dim"] = serde_json::json!([3, 4])
    });
    assert_fails(
        &gen(&m),
        "field `attention_head_dim`: has 2 entries but the model has 3 blocks",
    );

    let m = copy_model(M18, "mismatch");
    edit_json(&m.join("text_encoder/config.json"), |v| {
        v["project_dim"] = 40.into()
    });
    assert_fails(
        &gen(&m),
        "the text encoder outputs 40 features but the UNet's cross_attention_dim is 48",
    );

    let m = copy_model(M9, "badjson");
    std::fs::write(m.join("vae/config.json"), "{ not json").unwrap();
    assert_fails(&gen(&m), "vae/config.json: invalid JSON");

    let m = copy_model(M9, "noweights");
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_fails(&gen(&m), "no weights (*.safetensors or *.bin) found");

    let m = copy_model(M9, "truncated");
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&gen(&m), "has the wrong size (truncated?)");
    std::fs::write(&w, &bytes[..4]).unwrap();
    assert_fails(&gen(&m), "not a valid safetensors file (too short)");

    let m = copy_model(M9, "notokenizer");
    std::fs::remove_dir_all(m.join("tokenizer")).unwrap();
    assert_fails(&gen(&m), "the model has no `tokenizer` folder");

    let m = copy_model(M9, "nounet");
    std::fs::remove_dir_all(m.join("unet")).unwrap();
    assert_fails(&gen(&m), "the model has no `unet` folder");

    // The hub's .bin weights, truncated or overwritten: a model error naming the file.
    type BinEdit = fn(&[u8]) -> Vec<u8>;
    let edits: [(&str, BinEdit); 2] = [
        ("bin-truncated", |b: &[u8]| b[..b.len() / 3].to_vec()),
        ("bin-garbage", |b: &[u8]| {
            b.iter().map(|x| x ^ 0x5a).collect()
        }),
    ];
    for (name, edit) in edits {
        let m = copy_model("models/tiny-m18-hub", name);
        let w = m.join("unet/diffusion_pytorch_model.bin");
        std::fs::write(&w, edit(&std::fs::read(&w).unwrap())).unwrap();
        assert_fails(
            &gen(&m),
            "unet/diffusion_pytorch_model.bin: cannot read it as PyTorch weights",
        );
    }

    let m = copy_model(M9, "scheduler");
    edit_json(&m.join("scheduler/scheduler_config.json"), |v| {
        v["beta_schedule"] = "cosine-ish".into()
    });
    assert_fails(&gen(&m), "field `beta_schedule`");
}

#[test]
fn f16_and_bf16_stay_close_to_f32() {
    // f16 (the GPU default precision) and bf16 (`--dtype bf16` on CPUs with bf16 instructions),
    // run on the CPU: same pipeline, rounding-level differences only.
    let dir = scratch("f16");
    let dump = |dtype: &str| {
        let path = dir.join(format!("{dtype}.safetensors"));
        let out_dir = dir.join(dtype);
        ok(&gen(
            &model(M18),
            &[
                "--prompt",
                "un renard roux",
                "--seed",
                "3",
                "--steps",
                "3",
                "--dtype",
                dtype,
                "--dump-tensors",
                path.to_str().unwrap(),
                "--output",
                out_dir.to_str().unwrap(),
            ],
        ));
        load(&path)
    };
    let a = dump("f32");
    // bf16 keeps 8 bits of mantissa where f16 keeps 11: a looser bound.
    for (dtype, bound) in [("f16", 0.02), ("bf16", 0.05)] {
        let b = dump(dtype);
        let r = worst_ratio(&b["image"], &a["image"], bound, 0.0);
        assert!(
            r <= 1.0,
            "{dtype} image differs from f32 by more than {bound} (ratio {r})"
        );
        assert!(
            worst_ratio(&b["image"], &a["image"], 1e-7, 0.0) > 1.0,
            "{dtype} really ran in {dtype}"
        );
    }
}

/// `--load-policy keep` (all networks loaded at start-up), `per-stage` (each loaded for its stage
/// and freed after, reloaded for every batch) and `auto` give the same bytes, over a two-batch file.
#[test]
fn load_policies_give_identical_images() {
    let dir = scratch("load-policy");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "un renard roux dans la neige\n一只红狐狸\n").unwrap();
    let run = |policy: &str| -> Vec<Vec<u8>> {
        let out = dir.join(policy);
        ok(&gen(
            &model(M18),
            &[
                "--prompt-file",
                prompts.to_str().unwrap(),
                "--seed",
                "7",
                "--steps",
                "2",
                "--load-policy",
                policy,
                "--output",
                out.to_str().unwrap(),
            ],
        ));
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2, "{files:?}");
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    let keep = run("keep");
    assert_eq!(run("per-stage"), keep);
    assert_eq!(run("auto"), keep);
}

/// A tensor missing from (or misshapen in) the VAE, the last network to run, is found at start-up
/// under every load policy: exit 2 naming the tensor, before any denoising, no image written.
#[test]
fn broken_vae_tensors_fail_before_any_work() {
    type Tensors = std::collections::HashMap<String, candle_core::Tensor>;
    type Edit = fn(&mut Tensors);
    let cases: [(&str, Edit); 3] = [
        ("missing", |t| {
            t.remove("decoder.conv_out.weight");
        }),
        ("misshapen", |t| {
            let w = t["decoder.conv_in.bias"].narrow(0, 0, 3).unwrap();
            t.insert("decoder.conv_in.bias".into(), w);
        }),
        ("integer", |t| {
            let w = t["decoder.conv_in.bias"]
                .to_dtype(candle_core::DType::I64)
                .unwrap();
            t.insert("decoder.conv_in.bias".into(), w);
        }),
    ];
    for (name, edit) in cases {
        let m = copy_model(M9, &format!("vae-{name}"));
        let w = m.join("vae/diffusion_pytorch_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
        edit(&mut tensors);
        candle_core::safetensors::save(&tensors, &w).unwrap();
        for policy in ["auto", "per-stage", "keep"] {
            let out_dir = m.join(format!("out-{policy}"));
            let out = altdiff(&[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "a",
                "--seed",
                "1",
                "--steps",
                "1",
                "--load-policy",
                policy,
                "--output",
                out_dir.to_str().unwrap(),
                "-vv",
            ]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{name} {policy}: {err}");
            assert!(
                err.contains("cannot load the VAE"),
                "{name} {policy}: {err}"
            );
            let tensor = if name == "missing" {
                "decoder.conv_out.weight"
            } else {
                "decoder.conv_in.bias"
            };
            assert!(err.contains(tensor), "{name} {policy}: {err}");
            if name == "integer" {
                assert!(
                    err.contains("expected a floating-point tensor (f32, f16 or bf16), found i64"),
                    "{err}"
                );
            }
            assert!(
                !err.contains("step 1/1"),
                "{name} {policy}: work started: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out_dir.exists() || std::fs::read_dir(&out_dir).unwrap().count() == 0);
        }
    }
}

/// `--scheduler euler` runs end to end, is recorded in the PNG (webui's "Euler"), and a batch line's
/// `--sampler_name Euler` selects it; `altdiff schedulers` lists it.
#[test]
fn euler_scheduler_end_to_end() {
    let dir = scratch("euler");
    let out = dir.join("e.png");
    ok(&gen(
        &model(M18),
        &[
            "--prompt",
            "un renard roux",
            "--seed",
            "3",
            "--steps",
            "3",
            "--scheduler",
            "euler",
            "--output",
            out.to_str().unwrap(),
        ],
    ));
    let text = png_text(out.to_str().unwrap());
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Sampler: Euler,"), "{params}");
    let prompts = dir.join("p.txt");
    std::fs::write(
        &prompts,
        "--prompt \"un renard roux\" --sampler_name Euler\n",
    )
    .unwrap();
    let batch = dir.join("batch");
    let stdout = ok(&gen(
        &model(M18),
        &[
            "--prompt-file",
            prompts.to_str().unwrap(),
            "--seed",
            "3",
            "--steps",
            "3",
            "--json",
            "--output",
            batch.to_str().unwrap(),
        ],
    ));
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["scheduler"], "euler");
    let list = ok(&altdiff(&["schedulers"]));
    assert!(list.lines().any(|l| l.starts_with("euler ")), "{list}");
}

/// A one-step image of "un renard" from tiny-m18 into `out` (a file or directory), plus `extra`.
fn quick(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "-p",
        "un renard",
        "--steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    gen(&model(M18), &a)
}

/// Asserts exit 2 with exactly one line on stderr containing `needle`.
fn assert_one_line(out: &std::process::Output, needle: &str) {
    assert_fails(out, needle);
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "one line, not: {err}");
    assert!(err.starts_with("error: "), "{err}");
}

/// Input files that cannot be read, names that are not models, and clap's own errors: exit 2,
/// one line, naming the flag.
#[test]
fn newcomer_errors_are_one_line_with_exit_2() {
    let dir = scratch("newcomer");
    let o = dir.join("out");
    let o = o.to_str().unwrap();
    let m = model(M18);
    let g = |extra: &[&str]| {
        let mut a = vec!["--output", o];
        a.extend_from_slice(extra);
        gen(&m, &a)
    };
    assert_one_line(
        &g(&["-f", "/nonexistent/prompts.txt"]),
        "--prompt-file /nonexistent/prompts.txt: no such file",
    );
    assert_one_line(&g(&["-f", dir.to_str().unwrap()]), "--prompt-file");
    assert!(stderr(&g(&["-f", dir.to_str().unwrap()])).contains("is a directory"));
    assert_one_line(
        &g(&["--from-image", "/nonexistent.png"]),
        "--from-image /nonexistent.png: no such file",
    );
    assert_one_line(
        &altdiff(&["info", "/nonexistent.png"]),
        "/nonexistent.png: no such file",
    );
    let out = altdiff(&["languages", "--model", "m10"]);
    assert_one_line(&out, "--model m10");
    assert!(stderr(&out).contains("m9, m18"), "{}", stderr(&out));
    assert_one_line(
        &altdiff(&["languages", "--model", dir.to_str().unwrap()]),
        "not a model directory in diffusers layout",
    );
    // An image extension altdiff does not write is an error, not a directory name.
    let jpg = dir.join("out.jpg");
    assert_one_line(
        &gen(&m, &["-p", "x", "-o", jpg.to_str().unwrap()]),
        "PNG images only",
    );
    assert!(!jpg.exists(), "nothing is created");
    // clap's errors, on one line with the tip and where to read more.
    let out = g(&["-p", "x", "--step", "3"]);
    assert_one_line(&out, "unexpected argument '--step'");
    assert!(stderr(&out).contains("'--steps'") && stderr(&out).contains("altdiff generate --help"));
    assert_one_line(
        &g(&["-p", "x", "--height", "-64"]),
        "-64 must be a multiple of 8 between 8 and 4096",
    );
    assert_one_line(
        &g(&["-p", "x", "--steps", "-5"]),
        "must be at least 1, not -5",
    );
    assert_one_line(&g(&["-p", "x", "--seed", "-2"]), "or -1 for a random seed");
    assert_one_line(&altdiff(&["convert"]), "--out <DIR>");
    assert_one_line(
        &altdiff(&["download", "not-a-repo"]),
        "is not a hub repository id",
    );
    assert_one_line(
        &altdiff(&["generate", "-p", "x", "-m", "BAAI/Alt Diffusion", "-o", o]),
        "not a hub repository id",
    );
}

/// `--seed -1` is webui's "random": a fresh seed, reported and used.
#[test]
fn seed_minus_one_is_random() {
    let dir = scratch("seed-random");
    let mut seeds = Vec::new();
    for _ in 0..2 {
        let out = quick(&dir, &["--seed", "-1"]);
        let path = ok(&out);
        let err = stderr(&out);
        let seed = err
            .lines()
            .find_map(|l| l.strip_prefix("seed: "))
            .unwrap_or_else(|| panic!("no seed reported: {err}"))
            .to_string();
        assert!(path.contains(&format!("-{seed}-")), "{path} {seed}");
        seeds.push(seed);
    }
    assert_ne!(seeds[0], seeds[1]);
}

/// A PNG without parameters: said on stderr, exit 1. Several files: each under a heading (or one
/// JSON line each), the worst outcome decides the exit code.
#[test]
fn info_takes_several_files_and_says_when_one_has_no_parameters() {
    let dir = scratch("info-many");
    let good = dir.join("good.png");
    ok(&quick(&good, &["-s", "1"]));
    let bare = dir.join("bare.png");
    {
        let f = std::fs::File::create(&bare).unwrap();
        let mut enc = png::Encoder::new(f, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 0, 0]).unwrap();
    }
    let (g, b) = (good.to_str().unwrap(), bare.to_str().unwrap());
    let out = altdiff(&["info", b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no generation parameters stored"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    let out = altdiff(&["info", g, b]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        text.starts_with(&format!("==> {g} <==\nun renard\n")),
        "{text}"
    );
    assert!(!text.contains(b), "{text}");
    assert!(stderr(&out).contains(b));

    let out = altdiff(&["info", "--json", g, g]);
    let lines: Vec<serde_json::Value> = ok(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["path"], g);
    assert_eq!(lines[1]["altdiff"]["prompt"], "un renard");

    let out = altdiff(&["info", g, "/nonexistent.png"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("un renard"));
    assert!(stderr(&out).contains("/nonexistent.png: no such file"));
}

/// webui's names and spellings work on the command line as in batch files: one table.
#[test]
fn webui_scheduler_names_on_the_command_line() {
    let dir = scratch("webui-names");
    for (name, ours) in [
        ("Euler a", "euler-a"),
        ("euler_a", "euler-a"),
        ("plms", "pndm"),
        ("DPM++ 2M Karras", "dpm++2m-karras"),
    ] {
        let out = dir.join(format!("{}.png", ours));
        let _ = std::fs::remove_file(&out);
        ok(&quick(&out, &["-s", "1", "--scheduler", name]));
        let info: serde_json::Value =
            serde_json::from_str(ok(&altdiff(&["info", "--json", out.to_str().unwrap()])).trim())
                .unwrap();
        assert_eq!(info["altdiff"]["scheduler"], ours, "{name}");
    }
}

/// `--json` listings use one style: a single line holding one JSON array.
#[test]
fn json_listings_are_one_line_arrays() {
    for cmd in [["languages", "--json"], ["schedulers", "--json"]] {
        let text = ok(&altdiff(&cmd));
        assert_eq!(text.lines().count(), 1, "{cmd:?}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v.as_array().is_some_and(|a| a.len() >= 10), "{cmd:?}");
    }
}

/// The backticked field names (`[a-z_]+`) of the README sentence starting at `marker`, up to the
/// sentence's end (a backtick followed by `);` or `.`).
fn readme_fields(readme: &str, marker: &str) -> Vec<String> {
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README has no {marker:?}"));
    let rest = &readme[start + marker.len()..];
    let end = [rest.find("`);"), rest.find("`.")]
        .into_iter()
        .flatten()
        .min()
        .expect("the sentence ends");
    rest[..=end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// What the README says the tool prints is what it prints: the `--json` and `tokenize --json`
/// fields, and the size of the committed fixtures.
#[test]
fn readme_matches_what_the_tool_prints() {
    let readme = std::fs::read_to_string(fixture("../../README.md")).unwrap();
    let dir = scratch("readme-fields");
    let out = quick(&dir, &["-s", "1", "--json"]);
    let line: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    let mut printed: Vec<String> = line.as_object().unwrap().keys().cloned().collect();
    let mut documented = readme_fields(&readme, "one JSON object\nper image with the fields");
    printed.sort();
    documented.sort();
    assert_eq!(documented, printed, "generate --json fields");

    let out = altdiff(&["tokenize", "--model", &model(M18), "--json", "un renard"]);
    let obj: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    let mut printed: Vec<String> = obj.as_object().unwrap().keys().cloned().collect();
    let mut documented = readme_fields(&readme, "`--json` prints one object with the fields");
    printed.sort();
    documented.sort();
    assert_eq!(documented, printed, "tokenize --json fields");

    fn bytes(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    bytes(&e.path())
                } else {
                    e.metadata().unwrap().len()
                }
            })
            .sum()
    }
    let mb = bytes(&fixture("")) as f64 / 1e6;
    let said: f64 = readme
        .split("Committed fixtures total about ")
        .nth(1)
        .and_then(|r| r.split(" MB").next())
        .and_then(|n| n.parse().ok())
        .expect("the README gives the fixtures' size");
    assert!(
        (said - mb).abs() <= 1.0,
        "README says {said} MB, the fixtures are {mb:.1} MB"
    );
}
