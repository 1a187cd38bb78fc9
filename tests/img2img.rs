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
    let s = text;
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
    args.extend(case_flags(
        &case,
        &[
            ("--negative-prompt", "negative_prompt"),
            ("--width", "width"),
            ("--height", "height"),
            ("--strength", "strength"),
            ("--steps", "steps"),
            ("--guidance", "guidance"),
            ("--scheduler", "scheduler"),
            ("--num-images", "num_images"),
            ("--max-length", "max_length"),
            ("--seed", "seed"),
        ],
    ));
    let (stdout, got) = run_dumped(args, &dir);
    let want = load(&fixture(&format!("img2img/{name}.safetensors")));
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
    // The encoder's distribution itself: one per init image, at the latents' size, std > 0.
    let (_, c, h, w) = want["image_latents"].dims4().unwrap();
    for key in ["image_latent_mean", "image_latent_std"] {
        assert_eq!(got[key].dims(), &[1, c, h, w], "{name}: {key} shape");
    }
    let min_std = got["image_latent_std"]
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap();
    assert!(min_std.to_scalar::<f32>().unwrap() > 0.0, "{name}: std > 0");
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

// ---------------------------------------------------------------------------------------------
// The command line: bad input, batch files, --from-image
// ---------------------------------------------------------------------------------------------

fn pictures(name: &str) -> String {
    fixture(&format!("img2img/pictures/{name}"))
        .display()
        .to_string()
}

/// `generate` on tiny-m18 with one quick step; `extra` adds flags.
fn quick(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = fixture("models/tiny-m18").display().to_string();
    let mut a = vec![
        "generate",
        "--model",
        model.as_str(),
        "-p",
        "un renard",
        "--steps",
        "4",
        "--seed",
        "7",
        "-o",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    altdiff(&a)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 2, one line naming `needle`, nothing written.
fn refused(dir: &std::path::Path, extra: &[&str], needle: &str) {
    let out_dir = dir.join("out");
    let out = quick(&out_dir, extra);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{extra:?}: exit code; stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{extra:?}: one line, not: {err}");
    assert!(
        err.contains(needle),
        "{extra:?}: expected {needle:?} in: {err}"
    );
    assert!(out.stdout.is_empty(), "{extra:?}");
    let written = std::fs::read_dir(&out_dir).map_or(0, |d| d.count());
    assert_eq!(written, 0, "{extra:?}: nothing written");
}

/// The signature, header and an empty data chunk of a grey PNG of `w` x `h` pixels.
fn huge_png_header(w: u32, h: u32) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[]);
    png
}

#[test]
fn bad_init_input_is_one_line_exit_2_and_nothing_written() {
    let dir = scratch("img2img-bad-input");
    let corrupt = dir.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let text = dir.join("notes.png");
    std::fs::write(&text, "hello").unwrap();
    // A PNG header claiming 60000 x 60000 pixels: refused before any decoding.
    let huge = dir.join("huge.png");
    std::fs::write(&huge, huge_png_header(60000, 60000)).unwrap();
    let fox = pictures("fox-64.png");
    let missing = dir.join("missing.png").display().to_string();
    let (c, t, h) = (
        corrupt.display().to_string(),
        text.display().to_string(),
        huge.display().to_string(),
    );
    refused(&dir, &["--init-image", &missing], "--init-image");
    refused(&dir, &["--init-image", &missing], "no such file");
    refused(&dir, &["--init-image", &c], "cannot");
    refused(&dir, &["--init-image", &t], "not a picture");
    refused(&dir, &["--init-image", &h], "more than");
    refused(&dir, &["--init-image", &fox, "--mask", &c], "--mask");
    refused(
        &dir,
        &["--init-image", &fox, "--strength", "1.5"],
        "--strength 1.5",
    );
    refused(
        &dir,
        &["--init-image", &fox, "--strength", "0"],
        "--strength 0",
    );
    refused(
        &dir,
        &["--init-image", &fox, "--strength", "-0.2"],
        "--strength -0.2",
    );
    refused(
        &dir,
        &["--init-image", &fox, "--strength", "0.2"],
        "leaves no denoising step",
    );
    refused(&dir, &["--mask", &fox], "--mask needs --init-image");
    refused(
        &dir,
        &["--strength", "0.5"],
        "--strength 0.5 needs --init-image",
    );
    let latents = fixture("reference/m18-pndm.safetensors")
        .display()
        .to_string();
    refused(
        &dir,
        &["--init-image", &fox, "--latents", &latents],
        "--latents",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resizing_is_said_and_other_formats_decode() {
    let dir = scratch("img2img-resize-note");
    // The mask (32x32) is resized to the image (64x64): said on stderr.
    let out = quick(
        &dir.join("a"),
        &[
            "--init-image",
            &pictures("fox-64.png"),
            "--mask",
            &pictures("mask-disc-32.png"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("32x32 resized to 64x64"),
        "{}",
        stderr(&out)
    );
    // A 70x45 image becomes 64x40 by default, and --width / --height resize it further.
    let out = quick(
        &dir.join("b"),
        &["--init-image", &pictures("fox-70x45.png")],
    );
    assert!(
        stderr(&out).contains("70x45 resized to 64x40"),
        "{}",
        stderr(&out)
    );
    let path = String::from_utf8(out.stdout).unwrap();
    let rec = altdiff::metadata::read_record(std::path::Path::new(path.trim())).unwrap();
    assert_eq!((rec.width, rec.height), (64, 40));
    // Lossless WebP decodes to the PNG's pixels; JPEG to nearly them.
    let png = picture::load("--init-image", &fixture("img2img/pictures/fox-64.png")).unwrap();
    let webp = picture::load("--init-image", &fixture("img2img/pictures/fox-64.webp")).unwrap();
    assert_eq!(webp.picture, png.picture);
    let jpeg = picture::load("--init-image", &fixture("img2img/pictures/fox-64.jpg")).unwrap();
    assert_eq!((jpeg.picture.width, jpeg.picture.height), (64, 64));
    let mean: f64 = jpeg
        .picture
        .pixels
        .iter()
        .zip(&png.picture.pixels)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
        .sum::<f64>()
        / png.picture.pixels.len() as f64;
    // (Lossy, chroma subsampled: a sanity check that the decoder gives this picture.)
    assert!(mean < 12.0, "JPEG mean deviation {mean}");
    let out = quick(&dir.join("c"), &["--init-image", &pictures("fox-64.jpg")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn batch_lines_and_from_image_regenerate_img2img() {
    let dir = scratch("img2img-batch");
    let pics = dir.join("pics");
    std::fs::create_dir_all(&pics).unwrap();
    std::fs::copy(fixture("img2img/pictures/fox-64.png"), pics.join("fox.png")).unwrap();
    std::fs::copy(
        fixture("img2img/pictures/mask-rect.png"),
        pics.join("mask.png"),
    )
    .unwrap();
    let batch = dir.join("batch.jsonl");
    std::fs::write(
        &batch,
        concat!(
            "{\"prompt\": \"a fox\", \"init_image\": \"pics/fox.png\", \"strength\": 0.5}\n",
            "{\"prompt\": \"a fox\", \"init_image\": \"pics/fox.png\", \"mask\": \"pics/mask.png\"}\n",
            "{\"prompt\": \"a fox\", \"init_image\": \"pics/nothing.png\"}\n",
            "--prompt 'a fox' --init_image pics/fox.png --denoising_strength 0.75\n",
            "{\"prompt\": \"a fox\", \"strength\": 0.5}\n",
        ),
    )
    .unwrap();
    let model = fixture("models/tiny-m9").display().to_string();
    let out_dir = dir.join("out");
    let out = altdiff(&[
        "generate",
        "--model",
        &model,
        "--prompt-file",
        batch.to_str().unwrap(),
        "--steps",
        "4",
        "--seed",
        "11",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "two lines fail: {err}");
    assert!(
        err.contains("line 3") && err.contains("nothing.png"),
        "{err}"
    );
    assert!(
        err.contains("line 5") && err.contains("need an init image"),
        "{err}"
    );
    let paths: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), 3, "{err}");
    let recs: Vec<_> = paths
        .iter()
        .map(|p| altdiff::metadata::read_record(std::path::Path::new(p)).unwrap())
        .collect();
    let inits: Vec<_> = recs.iter().map(|r| r.init.clone().unwrap()).collect();
    assert_eq!(inits[0].strength, 0.5);
    assert_eq!(inits[1].strength, 0.8, "the default");
    assert!(inits[1].mask.as_deref().unwrap().ends_with("mask.png"));
    assert_eq!(inits[2].strength, 0.75);
    assert!(
        inits[0].image.ends_with("pics/fox.png"),
        "{}",
        inits[0].image
    );

    // --from-image regenerates each, pixel for pixel (the inpainting one too).
    for (k, p) in paths.iter().enumerate() {
        let again = dir.join(format!("again-{k}.png"));
        let out = altdiff(&["generate", "--from-image", p, "-o", again.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let pixels = |f: &std::path::Path| {
            let picture = picture::load("--init-image", f).unwrap().picture;
            picture.pixels
        };
        assert_eq!(pixels(std::path::Path::new(p)), pixels(&again), "{p}");
    }
    // A changed init image is said (the result would differ).
    std::fs::copy(
        fixture("img2img/pictures/fox-80x48.png"),
        pics.join("fox.png"),
    )
    .unwrap();
    let out = altdiff(&[
        "generate",
        "--from-image",
        &paths[0],
        "-o",
        dir.join("changed.png").to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains("not the file the image was made from"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
