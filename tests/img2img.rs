//! Image-to-image and inpainting against diffusers (`tests/fixtures/img2img/`, written by
//! `tools/fixtures/img2img.py`): every case runs the binary with `--init-image` (`--mask`) and
//! `--seed` and compares the dumped tensors within |a-b| <= 1e-4 + 1e-3|b|; the VAE encoder alone
//! against `latent_dist.mean` / `.std`; the Lanczos resize and grey conversion byte for byte against
//! Pillow's.

mod common;

use altdiff::picture::{self, Picture};
use common::*;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("img2img/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let dir = scratch(&format!("img2img-{name}"));
    let dump = dir.join("dump.safetensors");
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let pic = |k: &str| fixture(&format!("img2img/pictures/{}", s(&case[k])));
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        fixture(&format!("models/{}", s(&case["model"])))
            .display()
            .to_string(),
        "--init-image".into(),
        pic("image").display().to_string(),
    ];
    if !case["mask"].is_null() {
        args.extend(["--mask".into(), pic("mask").display().to_string()]);
    }
    for p in case["prompts"].as_array().unwrap() {
        args.extend(["--prompt".into(), s(p)]);
    }
    for (flag, key) in [
        ("--negative-prompt", "negative_prompt"),
        ("--width", "width"),
        ("--height", "height"),
    ] {
        if !case[key].is_null() {
            args.extend([flag.into(), s(&case[key])]);
        }
    }
    for (flag, key) in [
        ("--strength", "strength"),
        ("--steps", "steps"),
        ("--guidance", "guidance"),
        ("--scheduler", "scheduler"),
        ("--num-images", "num_images"),
        ("--max-length", "max_length"),
        ("--seed", "seed"),
    ] {
        args.extend([flag.into(), s(&case[key])]);
    }
    args.extend([
        "--dump-tensors".into(),
        dump.display().to_string(),
        "--output".into(),
        dir.join("images").display().to_string(),
        "--device".into(),
        "cpu".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(&altdiff(&argv));
    let want = load(&fixture(&format!("img2img/{name}.safetensors")));
    let got = load(&dump);
    for key in [
        "init_image",
        "image_latents",
        "timesteps",
        "latents_init",
        "latents_final",
        "image",
    ] {
        assert_close(name, key, &got, &want);
    }
    let b = want["image"].dims()[0];
    assert_eq!(stdout.lines().count(), b, "{name}: one path per image");
    // The metadata records the inputs: webui's denoising strength and, in the JSON record, the
    // files' paths and SHA-256.
    let first = stdout.lines().next().unwrap();
    let rec = altdiff::metadata::read_record(std::path::Path::new(first)).unwrap();
    let init = rec.init.expect("an init record");
    assert_eq!(init.strength, case["strength"].as_f64().unwrap());
    assert_eq!(init.image, pic("image").display().to_string());
    assert_eq!(
        init.image_sha256,
        common::hub::sha256(&std::fs::read(pic("image")).unwrap())
    );
    assert_eq!(init.mask.is_some(), !case["mask"].is_null());
    let text = altdiff::metadata::read_png_text(std::path::Path::new(first)).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains(&format!("Denoising strength: {}", s(&case["strength"]))),
        "{params}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_recorded_case_has_a_test() {
    let src = include_str!("img2img.rs");
    for c in cases() {
        let n = c["name"].as_str().unwrap();
        assert!(
            src.contains(&format!("run_case(\"{n}\")")),
            "case {n} is not tested"
        );
    }
}

#[test]
fn lanczos_resize_and_grey_match_pillow_byte_for_byte() {
    let index: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("img2img/resize.json")).unwrap())
            .unwrap();
    let want = load(&fixture("img2img/resize.safetensors"));
    let bytes = |k: &str| -> Vec<u8> { want[k].flatten_all().unwrap().to_vec1::<u8>().unwrap() };
    assert!(index.len() >= 6);
    for e in &index {
        let src = fixture(&format!(
            "img2img/pictures/{}",
            e["source"].as_str().unwrap()
        ));
        let p = picture::load("--init-image", &src).unwrap().picture;
        let (w, h) = (
            e["width"].as_u64().unwrap() as usize,
            e["height"].as_u64().unwrap() as usize,
        );
        let got = p.resized(w, h);
        let key = e["key"].as_str().unwrap();
        assert_eq!(
            got.pixels,
            bytes(key),
            "{} {}x{} -> {w}x{h}",
            e["source"],
            p.width,
            p.height
        );
        if let Some(gray) = e["gray"].as_str() {
            assert_eq!(got.to_gray().pixels, bytes(gray), "grey of {key}");
        }
    }
}

#[test]
fn vae_encoder_matches_latent_dist() {
    let want = load(&fixture("img2img/vae-encoder.safetensors"));
    for model in ["tiny-m9", "tiny-m18"] {
        let dir = fixture(&format!("models/{model}/vae"));
        let cfg = altdiff::config::VaeConfig::load(&dir.join("config.json")).unwrap();
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("diffusion_pytorch_model.safetensors")],
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
        }
        .unwrap();
        let enc = altdiff::models::VaeEncoder::new(vb, &cfg).unwrap();
        for name in ["fox-64", "fox-80x48"] {
            let stem = format!("{model}/{name}");
            let dist = enc.encode(&want[&format!("{stem}/image")]).unwrap();
            let got = std::collections::HashMap::from([
                (format!("{stem}/mean"), dist.mean),
                (format!("{stem}/std"), dist.std),
            ]);
            for k in ["mean", "std"] {
                assert_close(&stem, &format!("{stem}/{k}"), &got, &want);
            }
        }
    }
}

/// A picture made in memory survives the PNG round trip and the default size rounds down.
#[test]
fn picture_helpers() {
    let p = Picture::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(p.resized(2, 1), p);
    assert!(Picture::new(2, 2, 3, vec![0; 5]).is_none());
    assert!(Picture::new(2, 2, 4, vec![0; 16]).is_none());
}

#[test]
fn m9_img2img_pndm() {
    run_case("m9-i2i-pndm-075");
}
#[test]
fn m18_img2img_ddim_strength_03_no_guidance() {
    run_case("m18-i2i-ddim-03-g1");
}
#[test]
fn m9_img2img_euler_ancestral_strength_1() {
    run_case("m9-i2i-euler-a-1");
}
#[test]
fn m18_img2img_dpmpp_2m_two_prompts_two_images() {
    run_case("m18-i2i-dpmpp2m-two-prompts-two-images");
}
#[test]
fn m18_img2img_euler_non_square() {
    run_case("m18-i2i-euler-nonsquare");
}
#[test]
fn m9_img2img_resized_to_a_multiple_of_8() {
    run_case("m9-i2i-ddim-resized");
}
#[test]
fn m18_img2img_resized_to_the_size_flags() {
    run_case("m18-i2i-lms-size-flags");
}
#[test]
fn m9_img2img_heun() {
    run_case("m9-i2i-heun-075");
}
#[test]
fn m18_img2img_unipc() {
    run_case("m18-i2i-unipc-075");
}
#[test]
fn m9_img2img_ddpm() {
    run_case("m9-i2i-ddpm-075");
}
#[test]
fn m18_img2img_dpmpp_2m_karras_strength_03() {
    run_case("m18-i2i-dpmpp2m-karras-03");
}
#[test]
fn m9_img2img_alpha_channel_dropped() {
    run_case("m9-i2i-euler-a-alpha");
}
#[test]
fn m18_inpaint_ddim_strength_09() {
    run_case("m18-inpaint-ddim-09");
}
#[test]
fn m9_inpaint_euler_ancestral_strength_1_resized_mask() {
    run_case("m9-inpaint-euler-a-1");
}
#[test]
fn m18_inpaint_euler_ancestral_strength_09() {
    run_case("m18-inpaint-euler-a-09");
}
#[test]
fn m9_inpaint_dpmpp_2m_two_images_no_guidance() {
    run_case("m9-inpaint-dpmpp2m-1-two-images");
}
