//! The hub client against a loopback server that behaves like the Hugging Face hub (see
//! `common/hub.rs`): downloads into a temporary HF_HOME, offline reuse with the server stopped,
//! resumed transfers, errors, and the files that are never fetched.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::hub::{hf_home, HubServer, HubState, Revision};
use common::*;

const REPO: &str = "tiny/AltDiffusion-m18";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const PR_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// The folder laid out like the real hub repository (.bin weights, sentencepiece-only tokenizer)
/// when the fixture has it, else the safetensors tiny model.
fn hub_layout_model() -> PathBuf {
    let hub = fixture("models/tiny-m18-hub");
    if hub.is_dir() {
        hub
    } else {
        fixture("models/tiny-m18")
    }
}

/// A server with REPO at `main` (hub layout plus a safety checker and feature extractor nobody may
/// fetch) and at `refs/pr/1` (safetensors and .bin side by side).
fn server() -> HubServer {
    let extra: &[(&str, &[u8])] = &[
        ("safety_checker/config.json", b"{}"),
        (
            "safety_checker/pytorch_model.bin",
            b"not a model: must never be downloaded",
        ),
        ("feature_extractor/preprocessor_config.json", b"{}"),
        ("README.md", b"# tiny"),
    ];
    let main = Revision::from_dir(&hub_layout_model(), COMMIT, extra);
    // refs/pr/1 has safetensors and (junk) .bin weights side by side: the .bin must not be fetched.
    let mut pr_extra = extra.to_vec();
    pr_extra.push((
        "unet/diffusion_pytorch_model.bin",
        b"junk: safetensors must be preferred",
    ));
    let pr = Revision::from_dir(&fixture("models/tiny-m18"), PR_COMMIT, &pr_extra);
    let mut revs = HashMap::new();
    revs.insert("main".to_string(), main.clone());
    revs.insert(COMMIT.to_string(), main);
    revs.insert("refs/pr/1".to_string(), pr.clone());
    revs.insert(PR_COMMIT.to_string(), pr);
    let mut state = HubState::default();
    state.repos.insert(REPO.to_string(), revs.clone());
    state
        .repos
        .insert("gated/AltDiffusion-m18".to_string(), revs);
    state.gated.insert(
        "gated/AltDiffusion-m18".to_string(),
        "hf_secret".to_string(),
    );
    HubServer::start(state)
}

/// Runs the binary with a private hub environment.
fn run(home: &Path, endpoint: Option<&str>, offline: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_altdiff"));
    cmd.args(args)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("RUST_BACKTRACE", "1")
        .env("HF_ENDPOINT", endpoint.unwrap_or("http://127.0.0.1:9"));
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().unwrap()
}

fn snapshot(home: &Path, commit: &str) -> PathBuf {
    home.join("hub/models--tiny--AltDiffusion-m18/snapshots")
        .join(commit)
}

/// The m18-pndm reference case, run against `model`, compared with diffusers' tensors.
fn generate_matches_reference(
    home: &Path,
    endpoint: Option<&str>,
    offline: bool,
    model: &str,
    extra: &[&str],
) -> String {
    let dir = home.join("out");
    let dump = home.join("dump.safetensors");
    let reference = fixture("reference/m18-pndm.safetensors");
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "A photo of an astronaut riding a horse on the moon, highly detailed.",
        "--steps",
        "4",
        "--latents",
        reference.to_str().unwrap(),
        "--dump-tensors",
        dump.to_str().unwrap(),
        "--output",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run(home, endpoint, offline, &args);
    let stdout = ok(&out);
    let got = load(&dump);
    let want = load(&reference);
    for key in [
        "input_ids",
        "prompt_embeds",
        "negative_prompt_embeds",
        "latents_final",
        "image",
    ] {
        assert_close("hub m18-pndm", key, &got, &want);
    }
    std::fs::remove_file(&dump).unwrap();
    stdout.lines().next().unwrap().to_string()
}

#[test]
fn download_then_generate_offline_with_the_server_gone() {
    let mut hub = server();
    let home = hf_home("download");
    let out = run(&home, Some(&hub.url), false, &["download", REPO]);
    let stdout = ok(&out);
    assert_eq!(stdout.trim(), snapshot(&home, COMMIT).display().to_string());

    // Only what generation needs was fetched.
    let requested: Vec<String> = hub.requests().into_iter().map(|(p, _)| p).collect();
    assert!(
        requested.iter().all(|p| !p.contains("safety_checker")
            && !p.contains("feature_extractor")
            && !p.contains("README")),
        "{requested:?}"
    );
    // Python's cache layout: refs/main -> commit, snapshot files linking to blobs named by etag.
    let repo_dir = home.join("hub/models--tiny--AltDiffusion-m18");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let unet = std::fs::read_dir(snapshot(&home, COMMIT).join("unet"))
        .unwrap()
        .count();
    assert_eq!(unet, 2, "config and one weights file");
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(blobs.iter().all(|b| !b.ends_with(".part")), "{blobs:?}");

    hub.stop();
    let png = generate_matches_reference(&home, None, true, REPO, &[]);
    let info = ok(&run(&home, None, true, &["info", "--json", &png]));
    let record: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
    assert_eq!(
        record["altdiff"]["model"]["source"], REPO,
        "the model identity is stored with the image"
    );
    assert_eq!(record["altdiff"]["model"]["commit"], COMMIT);
    let params = record["parameters"].as_str().unwrap();
    assert!(params.contains(&format!("Model: {REPO},")), "{params}");
    assert!(
        params.contains(&format!("Model commit: {},", &COMMIT[..10])),
        "{params}"
    );
    // Without HF_HUB_OFFLINE and with no server, the cache is used after a warning.
    let out = run(
        &home,
        None,
        false,
        &["tokenize", "--model", REPO, "--json", "a fox"],
    );
    let json: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(json["input_ids"][0], 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn generate_fetches_on_first_use_and_prefers_safetensors() {
    let hub = server();
    let home = hf_home("first-use");
    generate_matches_reference(
        &home,
        Some(&hub.url),
        false,
        REPO,
        &["--revision", "refs/pr/1"],
    );
    let requested: Vec<String> = hub.requests().into_iter().map(|(p, _)| p).collect();
    assert!(
        requested
            .iter()
            .any(|p| p == "/api/models/tiny/AltDiffusion-m18/revision/refs%2Fpr%2F1"),
        "{requested:?}"
    );
    let snap = snapshot(&home, PR_COMMIT);
    assert!(snap
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(
        !snap.join("unet/diffusion_pytorch_model.bin").exists(),
        "safetensors preferred over .bin"
    );
    // A second run reuses the cache: no file transfers, only the revision lookup.
    let before = hub.requests().len();
    generate_matches_reference(
        &home,
        Some(&hub.url),
        false,
        REPO,
        &["--revision", "refs/pr/1"],
    );
    let new: Vec<String> = hub.requests()[before..]
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert!(new.iter().all(|p| p.starts_with("/api/")), "{new:?}");
}

#[test]
fn offline_without_the_files_names_them_and_the_command() {
    let home = hf_home("offline-empty");
    let out = run(
        &home,
        None,
        true,
        &["generate", "--model", REPO, "--prompt", "a fox"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not in the hub cache") && err.contains(&format!("altdiff download {REPO}")),
        "{err}"
    );

    // Partly cached: the missing files are named.
    let hub = server();
    ok(&run(&home, Some(&hub.url), false, &["download", REPO]));
    let snap = snapshot(&home, COMMIT);
    let unet_weights: Vec<PathBuf> = std::fs::read_dir(snap.join("unet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "json"))
        .collect();
    std::fs::remove_file(&unet_weights[0]).unwrap();
    let out = run(
        &home,
        None,
        true,
        &["generate", "--model", REPO, "--prompt", "a fox"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks unet/") && err.contains("altdiff download"),
        "{err}"
    );
    assert!(err.lines().count() <= 2, "{err}");
}

#[test]
fn unknown_repo_revision_and_gated_repo() {
    let hub = server();
    let home = hf_home("errors");
    let out = run(
        &home,
        Some(&hub.url),
        false,
        &["download", "tiny/no-such-model"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &home,
        Some(&hub.url),
        false,
        &["download", REPO, "--revision", "v9"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--revision v9"));
    let out = run(
        &home,
        Some(&hub.url),
        false,
        &["download", "gated/AltDiffusion-m18"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HF_TOKEN") && err.lines().count() == 1,
        "{err}"
    );
    // The token file under HF_HOME is used, as huggingface_hub does.
    std::fs::write(home.join("token"), "hf_secret\n").unwrap();
    ok(&run(
        &home,
        Some(&hub.url),
        false,
        &["download", "gated/AltDiffusion-m18"],
    ));
}

#[test]
fn server_errors_are_one_line_and_leave_no_partial_model() {
    let hub = server();
    let home = hf_home("server-error");
    for code in [500u16, 503] {
        hub.state.lock().unwrap().fail_with = Some(code);
        for args in [
            &["download", REPO][..],
            &["generate", "--model", REPO, "--prompt", "a"][..],
        ] {
            let out = run(&home, Some(&hub.url), false, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(
                err.contains(&format!("the hub answered HTTP {code}; try again later")),
                "{args:?}: {err}"
            );
            assert!(
                err.lines().count() <= 2 && !err.contains("panicked"),
                "{err}"
            );
        }
    }
    // Nothing half-fetched is left to be mistaken for a model; the next try works.
    hub.state.lock().unwrap().fail_with = None;
    let out = ok(&run(&home, Some(&hub.url), false, &["download", REPO]));
    assert!(std::path::Path::new(out.trim())
        .join("model_index.json")
        .exists());
}

#[test]
fn an_interrupted_download_is_never_used_and_resumes() {
    let hub = server();
    let home = hf_home("cut");
    let victim = "unet/diffusion_pytorch_model.bin";
    let victim = if hub_layout_model().ends_with("tiny-m18-hub") {
        victim
    } else {
        "unet/diffusion_pytorch_model.safetensors"
    };
    hub.state.lock().unwrap().cut_once = Some(victim.to_string());
    let out = run(&home, Some(&hub.url), false, &["download", REPO]);
    assert_ne!(out.status.code(), Some(0), "a cut transfer fails");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted") && err.contains("run the same command again"),
        "{err}"
    );
    assert!(
        !snapshot(&home, COMMIT).join(victim).exists(),
        "half a file is never linked into the snapshot"
    );
    let full_size = std::fs::metadata(hub_layout_model().join(victim))
        .unwrap()
        .len();
    let parts: Vec<u64> = std::fs::read_dir(home.join("hub/models--tiny--AltDiffusion-m18/blobs"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(parts.len(), 1, "the partial transfer is kept aside");
    assert!(parts[0] < full_size);

    let before = hub.requests().len();
    ok(&run(&home, Some(&hub.url), false, &["download", REPO]));
    let resumed = hub.requests()[before..].iter().any(|(p, r)| {
        p.starts_with("/cdn/") && r.as_deref() == Some(&format!("bytes={}-", parts[0]))
    });
    assert!(
        resumed,
        "the second run resumes with a range request: {:?}",
        &hub.requests()[before..]
    );
    let got = std::fs::read(snapshot(&home, COMMIT).join(victim)).unwrap();
    assert_eq!(got, std::fs::read(hub_layout_model().join(victim)).unwrap());
}

#[test]
fn hf_hub_cache_overrides_the_cache_folder() {
    let hub = server();
    let home = hf_home("hub-cache");
    let cache = home.join("elsewhere");
    let out = Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args([
            "tokenize",
            "--model",
            REPO,
            "--revision",
            "refs/pr/1",
            "--json",
            "un renard",
        ])
        .env("HF_HOME", &home)
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env("HF_ENDPOINT", &hub.url)
        .output()
        .unwrap();
    ok(&out);
    assert!(cache
        .join("models--tiny--AltDiffusion-m18/snapshots")
        .join(PR_COMMIT)
        .join("tokenizer")
        .is_dir());
    assert!(!home.join("hub").exists());
    let snap = cache
        .join("models--tiny--AltDiffusion-m18/snapshots")
        .join(PR_COMMIT);
    assert!(
        !snap.join("unet").exists(),
        "tokenize fetches only the tokenizer"
    );
}

/// No network and nothing cached: one message saying what is missing and both ways out, not
/// "set HF_HUB_OFFLINE" followed by a second error; `download` never suggests HF_HUB_OFFLINE;
/// a repository id of the wrong shape is refused before any request.
#[test]
fn unreachable_hub_with_an_empty_cache_says_what_to_do_once() {
    let home = hf_home("unreachable");
    let out = run(
        &home,
        None,
        false,
        &[
            "generate",
            "--model",
            REPO,
            "--prompt",
            "a fox",
            "--output",
            home.join("o").to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in [
        "not in the hub cache",
        "cannot be reached",
        &format!("`altdiff download {REPO}`"),
        "--model DIR",
    ] {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    assert!(!err.contains("HF_HUB_OFFLINE"), "{err}");
    // Following the advice offline (HF_HUB_OFFLINE=1) gives the same two ways out, not a new error.
    let out = run(
        &home,
        None,
        true,
        &["generate", "--model", REPO, "--prompt", "a fox"],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("`altdiff download {REPO}`")) && err.contains("--model DIR"),
        "{err}"
    );

    let out = run(&home, None, false, &["download", REPO]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach") && !err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    let hub = server();
    for bad in [
        "AltDiffusion-m18",
        "tiny/AltDiffusion-m18/unet",
        "tiny/Alt Diffusion",
    ] {
        let out = run(&home, Some(&hub.url), false, &["download", bad]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("is not a hub repository id"), "{err}");
    }
    assert!(
        hub.requests().is_empty(),
        "ids are checked without the network"
    );
}
