//! Samplers and seeds through the binary: every scheduler end to end, the step noise of stochastic
//! samplers (shared generator, per-image seeds, regeneration of one image of a batch), and the
//! scheduler flags (`--eta`, `--karras`, `--timestep-spacing`) recorded and restored.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::Value;

fn m18() -> String {
    fixture("models/tiny-m18").display().to_string()
}

/// `altdiff generate --model tiny-m18 --json --height 32 --width 32 <extra>`.
fn gen(extra: &[&str]) -> Output {
    let m = m18();
    let mut args = vec![
        "generate", "--model", &m, "--json", "--height", "32", "--width", "32",
    ];
    args.extend_from_slice(extra);
    altdiff(&args)
}

/// The JSON records printed on stdout (the run must have succeeded).
fn records(out: &Output) -> Vec<Value> {
    ok(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Generates `prompts` with `--seed`, `--steps`, `--scheduler` and `extra` into `out`; the records.
fn sample(
    prompts: &[&str],
    seed: u64,
    steps: u32,
    scheduler: &str,
    extra: &[&str],
    out: &Path,
) -> Vec<Value> {
    let (seed, steps) = (seed.to_string(), steps.to_string());
    let mut args: Vec<&str> = prompts.iter().flat_map(|p| ["--prompt", p]).collect();
    args.extend_from_slice(&["--seed", &seed, "--steps", &steps, "--scheduler", scheduler]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", out.to_str().unwrap()]);
    records(&gen(&args))
}

fn pixels(path: &str) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    r.next_frame(&mut buf).unwrap();
    buf
}

/// The altdiff record and webui parameters of an image.
fn info(path: &str) -> (Value, String) {
    let v: Value = serde_json::from_str(ok(&altdiff(&["info", "--json", path])).trim()).unwrap();
    (
        v["altdiff"].clone(),
        v["parameters"].as_str().unwrap().to_string(),
    )
}

fn path(rec: &Value) -> &str {
    rec["path"].as_str().unwrap()
}

#[test]
fn every_scheduler_runs_end_to_end() {
    let list: Value = serde_json::from_str(&ok(&altdiff(&["schedulers", "--json"]))).unwrap();
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in [
        "euler-a", "ddpm", "unipc", "pndm", "ddim", "euler", "dpm++2m", "heun", "lms",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} is listed");
    }
    let dir = scratch("every-scheduler");
    let mut images = Vec::new();
    for name in &names {
        let recs = sample(&["un renard roux"], 4, 3, name, &[], &dir);
        assert_eq!(recs.len(), 1, "{name}");
        assert_eq!(recs[0]["scheduler"], name.as_str());
        let (rec, params) = info(path(&recs[0]));
        assert_eq!(rec["scheduler"], name.as_str());
        let sampler = match name.as_str() {
            "euler-a" => "Euler a",
            "ddpm" => "DDPM",
            "unipc" => "UniPC",
            "pndm" => "PLMS",
            _ => "",
        };
        assert!(params.contains(&format!("Sampler: {sampler}")), "{params}");
        images.push(pixels(path(&recs[0])));
    }
    // Different samplers give different images from the same seed.
    for (i, a) in images.iter().enumerate() {
        for (j, b) in images.iter().enumerate().skip(i + 1) {
            assert_ne!(a, b, "{} and {} gave the same pixels", names[i], names[j]);
        }
    }
}

#[test]
fn stochastic_image_of_a_batch_regenerates_alone() {
    // euler-a draws fresh noise every step from the batch's one generator; an image's metadata names
    // its share of every draw, so --from-image gives the same pixels without the rest of the batch.
    let dir = scratch("euler-a-batch");
    let two = ["un renard roux", "a lighthouse"];
    let recs = sample(&two, 21, 3, "euler-a", &["--num-images", "2"], &dir);
    assert_eq!(recs.len(), 4);
    let third = path(&recs[2]);
    let (rec, _) = info(third);
    assert_eq!(
        rec["noise"],
        serde_json::json!({"kind": "seed", "seed": 21, "batch": 4, "index": 2})
    );
    let again = scratch("euler-a-batch-again");
    let regen = records(&altdiff(&[
        "generate",
        "--from-image",
        third,
        "--json",
        "--output",
        again.join("x.png").to_str().unwrap(),
    ]));
    assert_eq!(pixels(third), pixels(path(&regen[0])), "identical pixels");
    // The step noise matters: the same initial noise with other step noise (a batch of 1 from the
    // same seed draws different noise after the first image's share) gives another image.
    let alone = sample(&two[..1], 21, 3, "euler-a", &[], &again);
    assert_ne!(pixels(path(&recs[0])), pixels(path(&alone[0])));
}

#[test]
fn per_image_seeds_make_each_image_its_own_run() {
    let dir = scratch("per-image-seeds");
    let two = ["un renard roux", "a lighthouse"];
    let images = ["--num-images", "2"];
    let recs = sample(
        &two,
        100,
        2,
        "ddpm",
        &[&images[..], &["--per-image-seeds"]].concat(),
        &dir,
    );
    assert_eq!(recs.len(), 4);
    let seeds: Vec<u64> = recs.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [100, 101, 102, 103]);
    let (rec, params) = info(path(&recs[3]));
    assert_eq!(
        rec["noise"],
        serde_json::json!({"kind": "seed", "seed": 103, "batch": 1, "index": 0})
    );
    assert!(params.contains("Seed: 103,"), "{params}");
    // Image 4 (second prompt, second image) is exactly `--seed 103` for that prompt alone.
    let alone = scratch("per-image-seeds-alone");
    let one = sample(&two[1..], 103, 2, "ddpm", &[], &alone);
    assert_eq!(pixels(path(&recs[3])), pixels(path(&one[0])));
    // Without --per-image-seeds the batch shares one generator: other noise, other images.
    let shared = sample(&two, 100, 2, "ddpm", &images, &alone);
    assert_eq!(shared[3]["seed"], 100);
    assert_ne!(pixels(path(&recs[3])), pixels(path(&shared[3])));
}

#[test]
fn scheduler_flags_are_recorded_and_restored() {
    let dir = scratch("scheduler-flags");
    let run = |scheduler: &str, extra: &[&str], name: &str| {
        let recs = sample(&["un renard roux"], 8, 3, scheduler, extra, &dir.join(name));
        path(&recs[0]).to_string()
    };
    let eta = run(
        "ddim",
        &["--eta", "0.5", "--timestep-spacing", "trailing"],
        "eta.png",
    );
    let (rec, params) = info(&eta);
    assert_eq!(rec["eta"], 0.5);
    assert_eq!(rec["timestep_spacing"], "trailing");
    assert_eq!(rec["scheduler_config"]["timestep_spacing"], "trailing");
    assert!(params.contains("Schedule type: SGM Uniform,"), "{params}");
    assert!(params.contains("Eta DDIM: 0.5"), "{params}");
    let plain = run("ddim", &[], "plain.png");
    let (rec_plain, _) = info(&plain);
    assert!(rec_plain.get("eta").is_none() && rec_plain.get("karras").is_none());
    assert_ne!(
        pixels(&eta),
        pixels(&plain),
        "eta and spacing change the image"
    );
    let regen = records(&altdiff(&[
        "generate",
        "--from-image",
        &eta,
        "--json",
        "--output",
        dir.join("eta-again.png").to_str().unwrap(),
    ]));
    assert_eq!(
        pixels(&eta),
        pixels(path(&regen[0])),
        "--from-image restores eta"
    );

    let karras = run("euler", &["--karras"], "karras.png");
    let (rec, params) = info(&karras);
    assert_eq!(rec["karras"], true);
    assert_eq!(rec["scheduler_config"]["use_karras_sigmas"], true);
    assert!(params.contains("Schedule type: Karras"), "{params}");
    let euler = run("euler", &[], "euler.png");
    assert_ne!(pixels(&karras), pixels(&euler));
    // dpm++2m --karras is dpm++2m-karras.
    let a = run("dpm++2m", &["--karras"], "dpm-k.png");
    let b = run("dpm++2m-karras", &[], "dpmk.png");
    assert_eq!(pixels(&a), pixels(&b));
}

#[test]
fn scheduler_flags_that_do_not_apply_are_usage_errors() {
    let dir = scratch("scheduler-flag-errors");
    let o = dir.to_str().unwrap();
    let fails = |extra: &[&str], needle: &str| {
        let mut args = vec!["--prompt", "a fox", "--output", o];
        args.extend_from_slice(extra);
        let out = gen(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty());
    };
    fails(
        &["--scheduler", "euler", "--eta", "0.5"],
        "--eta applies to the ddim scheduler only",
    );
    // The model's own scheduler (PNDM) is checked once the model is read.
    fails(
        &["--eta", "0.5"],
        "--eta applies to the ddim scheduler only, not pndm",
    );
    fails(
        &["--scheduler", "ddim", "--eta", "1.5"],
        "--eta 1.5 must be between 0 and 1",
    );
    fails(
        &["--scheduler", "ddim", "--eta", "NaN"],
        "must be between 0 and 1",
    );
    fails(&["--scheduler", "pndm", "--karras"], "--karras applies to");
    fails(&["--scheduler", "euler-a", "--karras"], "not euler-a");
    fails(&["--timestep-spacing", "karras"], "karras");
    fails(
        &["--per-image-seeds", "--latents", "x.safetensors"],
        "--per-image-seeds and --latents",
    );
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing written"
    );
}
