//! `altdiff convert` and `altdiff tokenize` on the tiny models.

mod common;

use common::*;

fn m18_pndm_args(model: &str, dump: &str, out: &str) -> Vec<String> {
    let latents = fixture("reference/m18-pndm.safetensors");
    [
        "generate",
        "--model",
        model,
        "--prompt",
        "A photo of an astronaut riding a horse on the moon, highly detailed.",
        "--steps",
        "4",
        "--latents",
        latents.to_str().unwrap(),
        "--dump-tensors",
        dump,
        "--output",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_m18_pndm(
    model: &std::path::Path,
    dir: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let dump = dir.join(format!(
        "{}.safetensors",
        model.file_name().unwrap().to_string_lossy()
    ));
    let args = m18_pndm_args(
        model.to_str().unwrap(),
        dump.to_str().unwrap(),
        dir.join("img").to_str().unwrap(),
    );
    ok(&altdiff(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    load(&dump)
}

/// Converting the hub-layout model (.bin weights, sentencepiece-only tokenizer) gives safetensors and
/// a tokenizer.json, and the converted model generates exactly what the original does.
#[test]
fn convert_hub_layout_to_safetensors() {
    let dir = scratch("convert");
    let src = fixture("models/tiny-m18-hub");
    let src = if src.is_dir() {
        src
    } else {
        fixture("models/tiny-m18")
    };
    let out = dir.join("converted");
    let stdout = ok(&altdiff(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(stdout.trim(), out.display().to_string());
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let original = run_m18_pndm(&src, &dir);
    let converted = run_m18_pndm(&out, &dir);
    for key in [
        "input_ids",
        "prompt_embeds",
        "negative_prompt_embeds",
        "latents_final",
        "image",
    ] {
        let r = max_abs_diff(&converted[key], &original[key]);
        assert_eq!(
            r, 0.0,
            "{key}: the converted model must give identical results"
        );
    }
    // Never overwrite: a second conversion to the same place is refused and changes nothing.
    let before = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let again = altdiff(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(
        before,
        std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn convert_to_f16_halves_the_weights() {
    let dir = scratch("convert-f16");
    let src = fixture("models/tiny-m9");
    let out = dir.join("m9-f16");
    ok(&altdiff(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
    ]));
    let unet = load(&out.join("unet/diffusion_pytorch_model.safetensors"));
    assert!(unet.values().all(|t| t.dtype() == candle_core::DType::F16));
    let f32_size = std::fs::metadata(src.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .len();
    let f16_size = std::fs::metadata(out.join("unet/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .len();
    assert!(
        f16_size * 10 < f32_size * 6,
        "{f16_size} vs {f32_size} (the JSON header does not shrink)"
    );
    // It still generates (computing in f32 by default on the CPU).
    ok(&altdiff(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--steps",
        "1",
        "--seed",
        "1",
        "--output",
        dir.join("img").to_str().unwrap(),
    ]));
}

#[test]
fn tokenize_prints_ids_pieces_and_truncation() {
    let model = fixture("models/tiny-m18");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_ids.json")).unwrap())
            .unwrap();
    let case = cases
        .iter()
        .find(|c| {
            c["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("A red fox"))
        })
        .unwrap();
    let text = case["text"].as_str().unwrap();
    let out = ok(&altdiff(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--json",
        text,
    ]));
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["input_ids"], case["ids"]);
    assert_eq!(
        json["tokens"].as_array().unwrap().len(),
        case["ids"].as_array().unwrap().len()
    );
    assert_eq!(json["tokens"][0], "<s>");
    assert_eq!(json["truncated"], false);
    assert_eq!(json["max_length"], 77);

    let long = "a quiet lake in autumn ".repeat(20) + "purple elephants";
    let out = ok(&altdiff(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--max-length",
        "16",
        &long,
    ]));
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["input_ids"].as_array().unwrap().len(), 16);
    assert_eq!(json["input_ids"][15], 2, "</s> closes the kept ids");
    assert_eq!(json["truncated"], true);
    assert!(json["dropped"]
        .as_str()
        .unwrap()
        .ends_with("purple elephants"));
    assert!(json["length"].as_u64().unwrap() > 16);

    let plain = ok(&altdiff(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--max-length",
        "16",
        &long,
    ]));
    assert!(plain.contains("tokens of 16"), "{plain}");
    assert!(
        plain.contains("truncated:") && plain.contains("purple elephants"),
        "{plain}"
    );
}

/// `--variant fp16` picks `*.fp16.safetensors` beside the full-precision files, as diffusers'
/// `variant=` does; without it the plain files are used.
#[test]
fn variant_selects_fp16_weights() {
    let dir = scratch("variant");
    let src = fixture("models/tiny-m18");
    let half = dir.join("half");
    ok(&altdiff(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        half.to_str().unwrap(),
        "--dtype",
        "f16",
    ]));
    // A model folder holding both precisions.
    let both = dir.join("both");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    };
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        copy(&src.join(f), &both.join(f));
    }
    for (f, v) in [
        (
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
        ),
        (
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ),
        (
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ),
    ] {
        copy(&half.join(f), &both.join(v));
    }
    let plain = run_m18_pndm(&both, &dir);
    let reference = load(&fixture("reference/m18-pndm.safetensors"));
    assert_close("variant none", "image", &plain, &reference);
    let args = m18_pndm_args(
        both.to_str().unwrap(),
        dir.join("fp16.safetensors").to_str().unwrap(),
        dir.join("img16").to_str().unwrap(),
    );
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--variant", "fp16"]);
    ok(&altdiff(&args));
    let fp16 = load(&dir.join("fp16.safetensors"));
    let d = max_abs_diff(&fp16["image"], &plain["image"]);
    assert!(
        d > 0.0 && d < 0.05,
        "fp16 weights give a close but different image ({d})"
    );
    let out = altdiff(&[
        "generate",
        "--model",
        src.to_str().unwrap(),
        "--prompt",
        "a",
        "--variant",
        "fp16",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `fp16` variant weights"));
}
