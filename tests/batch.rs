//! The CLI as scripts use it: batch files (three formats, stdin), per-line overrides, languages,
//! metadata round trips, file naming, resuming, JSON output, exit codes, shards, completions.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn m18() -> String {
    fixture("models/tiny-m18").display().to_string()
}

/// `altdiff generate --model tiny-m18 --steps 1 --json <extra>` with `stdin` piped in.
fn gen_json(extra: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_altdiff"));
    cmd.args(["generate", "--model", &m18(), "--json"])
        .args(extra);
    if !extra.contains(&"--steps") && !extra.contains(&"--from-image") {
        cmd.args(["--steps", "1"]);
    }
    cmd.env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// The JSON objects printed on stdout, one per image.
fn records(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
        })
        .collect()
}

fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn three_formats_stdin_and_per_line_overrides() {
    let dir = scratch("formats");
    let file = b"# a comment\n\
a red fox in the snow\n\
\n\
{\"prompt\": \"ein Fuchs im Schnee\", \"seed\": 7, \"steps\": 2, \"width\": 32, \"lang\": \"de\"}\n\
--prompt \"un renard roux dans la neige\" --negative_prompt \"flou\" --cfg_scale 3 --seed 9 --sampler_name DDIM --height 32\n";
    let out = gen_json(
        &[
            "--prompt-file",
            "-",
            "--seed",
            "100",
            "--output",
            dir.to_str().unwrap(),
        ],
        Some(file),
    );
    ok(&out);
    let recs = records(&out);
    assert_eq!(recs.len(), 3, "{}", stderr(&out));
    // Plain line: the command line's settings, seed = --seed + its global position (0).
    assert_eq!(recs[0]["prompt"], "a red fox in the snow");
    assert_eq!(recs[0]["line"], 2);
    assert_eq!(recs[0]["seed"], 100);
    assert_eq!(recs[0]["steps"], 1);
    assert_eq!(
        (recs[0]["width"].as_u64(), recs[0]["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(recs[0]["lang"], "en");
    // JSON line.
    assert_eq!(recs[1]["line"], 4);
    assert_eq!(recs[1]["seed"], 7);
    assert_eq!(recs[1]["steps"], 2);
    assert_eq!(recs[1]["width"], 32);
    assert_eq!(recs[1]["lang"], "de");
    // webui line.
    assert_eq!(recs[2]["line"], 5);
    assert_eq!(recs[2]["negative_prompt"], "flou");
    assert_eq!(recs[2]["guidance"], 3.0);
    assert_eq!(recs[2]["scheduler"], "ddim");
    assert_eq!(recs[2]["height"], 32);
    assert_eq!(recs[2]["lang"], "fr");
    for r in &recs {
        let p = r["path"].as_str().unwrap();
        assert!(Path::new(p).is_file(), "{p}");
        let t = &r["timings"];
        for k in [
            "load_s",
            "encode_s",
            "denoise_s",
            "decode_s",
            "unet_step_min_s",
            "unet_step_median_s",
            "total_s",
        ] {
            assert!(
                t[k].as_f64().is_some_and(|v| v >= 0.0),
                "timing {k} missing: {t}"
            );
        }
        assert!(
            t["denoise_s"].as_f64() >= t["unet_step_min_s"].as_f64(),
            "{t}"
        );
        assert!(t["total_s"].as_f64() >= t["denoise_s"].as_f64(), "{t}");
    }
    // The same file read from disk gives the same images (names and bytes).
    let dir2 = scratch("formats-file");
    let path = write(&dir2, "prompts.txt", file);
    let verbose = gen_json(
        &[
            "--prompt",
            "a fox",
            "-v",
            "--seed",
            "1",
            "--output",
            dir2.join("v").to_str().unwrap(),
        ],
        None,
    );
    let err = stderr(&verbose);
    assert!(
        err.contains("timings (last batch): load")
            && err.contains("UNet step min")
            && err.contains("peak RSS"),
        "{err}"
    );
    let out2 = gen_json(
        &[
            "--prompt-file",
            path.to_str().unwrap(),
            "--seed",
            "100",
            "--output",
            dir2.join("o").to_str().unwrap(),
        ],
        None,
    );
    let recs2 = records(&out2);
    for (a, b) in recs.iter().zip(&recs2) {
        let (pa, pb) = (
            Path::new(a["path"].as_str().unwrap()),
            Path::new(b["path"].as_str().unwrap()),
        );
        assert_eq!(pa.file_name(), pb.file_name());
        assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
    }
}

#[test]
fn a_broken_line_fails_alone_with_exit_1_and_a_summary() {
    let dir = scratch("broken");
    let mut file = b"a quiet lake\n{\"prompt\": \"x\", \"stepz\": 3}\n".to_vec();
    file.extend_from_slice(b"caf\xe9 au lait\n");
    file.extend_from_slice(b"{\"prompt\": \"y\", \"steps\": 0}\n--prompt \"un phare\" --sampler_name \"Euler-Z\"\nlast one\n");
    let p = write(&dir, "b.txt", &file);
    let out = gen_json(
        &[
            "--prompt-file",
            p.to_str().unwrap(),
            "--seed",
            "1",
            "--output",
            dir.join("o").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = records(&out);
    let lines: Vec<u64> = recs.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![1, 6], "the good lines are still written");
    let err = stderr(&out);
    assert!(err.contains("4 of 6 prompt(s) failed"), "{err}");
    for needle in [
        "line 2:",
        "stepz",
        "line 3:",
        "UTF-8",
        "line 4:",
        "--steps 0",
        "line 5:",
        "Euler-Z",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    assert!(!err.contains("panicked"));
}

#[test]
fn usage_errors_exit_2_before_any_work() {
    let dir = scratch("usage2");
    let out = gen_json(
        &[
            "--prompt",
            "a fox",
            "--lang",
            "klingon",
            "--output",
            dir.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("klingon") && err.contains("fr") && err.contains("zh"),
        "lists valid codes: {err}"
    );
    let out = gen_json(&["--prompt", "a", "--shard", "2/2"], None);
    assert_eq!(out.status.code(), Some(2));
    let out = gen_json(&["--prompt", "a", "--name-template", "{nope}.png"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown field `nope`"));
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
}

#[test]
fn languages_are_detected_checked_and_recorded() {
    let dir = scratch("langs");
    let out = gen_json(
        &[
            "--prompt",
            "一只在雪地里的红狐狸",
            "--prompt",
            "Красная лиса сидит в снегу",
            "--seed",
            "3",
            "--output",
            dir.to_str().unwrap(),
        ],
        None,
    );
    let recs = records(&out);
    assert_eq!(recs[0]["lang"], "zh");
    assert_eq!(recs[1]["lang"], "ru");
    assert!(
        recs[0]["path"]
            .as_str()
            .unwrap()
            .contains("-zh-3-一只在雪地里的红狐狸"),
        "{}",
        recs[0]["path"]
    );
    // A contradicting --lang is kept but warned about; m9 has no Thai: a warning, not an error.
    let out = gen_json(
        &[
            "--prompt",
            "一只在雪地里的红狐狸",
            "--lang",
            "french",
            "--seed",
            "3",
            "--output",
            dir.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(records(&out)[0]["lang"], "fr");
    assert!(stderr(&out).contains("looks like"), "{}", stderr(&out));
    let m9 = fixture("models/tiny-m9");
    let out = Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args([
            "generate",
            "--model",
            m9.to_str().unwrap(),
            "--prompt",
            "สุนัขจิ้งจอกสีแดง",
            "--lang",
            "th",
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    ok(&out);
    assert!(
        stderr(&out).contains("not one of AltDiffusion-m9"),
        "{}",
        stderr(&out)
    );

    let table = ok(&altdiff(&["languages", "--json"]));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&table).unwrap();
    assert_eq!(rows.len(), 18);
    let m9_table = ok(&altdiff(&["languages", "--model", m9.to_str().unwrap()]));
    assert!(m9_table.contains("fr") && m9_table.contains("French"));
}

#[test]
fn metadata_round_trip_and_from_image_gives_identical_pixels() {
    let dir = scratch("meta");
    let out = gen_json(
        &[
            "--prompt",
            "un renard roux dans la neige",
            "--prompt",
            "a lighthouse",
            "--num-images",
            "2",
            "--negative-prompt",
            "blurry",
            "--seed",
            "11",
            "--steps",
            "2",
            "--output",
            dir.to_str().unwrap(),
        ],
        None,
    );
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    // Image 3 of 4 (second prompt, first image) of a diffusers batch.
    let third = recs[2]["path"].as_str().unwrap();
    let info: serde_json::Value =
        serde_json::from_str(ok(&altdiff(&["info", "--json", third])).trim()).unwrap();
    let rec = &info["altdiff"];
    assert_eq!(rec["prompt"], "a lighthouse");
    assert_eq!(rec["negative_prompt"], "blurry");
    assert_eq!(
        rec["noise"],
        serde_json::json!({"kind": "seed", "seed": 11, "batch": 4, "index": 2})
    );
    assert_eq!(rec["steps"], 2);
    assert_eq!(rec["scheduler"], "pndm");
    assert_eq!(rec["scheduler_config"]["beta_schedule"], "scaled_linear");
    assert_eq!(rec["max_length"], 77);
    assert!(rec["altdiff"].as_str().is_some());
    let params = info["parameters"].as_str().unwrap();
    assert!(params.starts_with("a lighthouse\nNegative prompt: blurry\nSteps: 2, Sampler: PLMS, Schedule type: DDIM, CFG scale: 7.5, Seed: 11, Size: 64x64"), "{params}");
    let plain = ok(&altdiff(&["info", third]));
    assert!(plain.contains("Negative prompt: blurry"));

    let again = scratch("meta-again");
    let out = gen_json(
        &[
            "--from-image",
            third,
            "--output",
            again.join("x.png").to_str().unwrap(),
        ],
        None,
    );
    let regenerated = records(&out);
    assert_eq!(regenerated.len(), 1);
    let decode = |p: &str| {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(
        decode(third),
        decode(regenerated[0]["path"].as_str().unwrap()),
        "identical pixels"
    );
    // Flags override the image's settings.
    let out = gen_json(
        &[
            "--from-image",
            third,
            "--steps",
            "1",
            "--output",
            again.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(records(&out)[0]["steps"], 1);
}

#[test]
fn names_never_overwrite_skip_existing_resumes_and_overwrite_replaces() {
    let dir = scratch("names");
    let file = write(
        &dir,
        "p.txt",
        "un renard roux\n一只在雪地里的红狐狸\nمنارة في عاصفة\n".as_bytes(),
    );
    let out_dir = dir.join("out");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "--prompt-file",
            file.to_str().unwrap(),
            "--seed",
            "5",
            "--output",
            out_dir.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        gen_json(&a.iter().map(String::as_str).collect::<Vec<_>>(), None)
    };
    let first = records(&run(&[]));
    let names: Vec<String> = first
        .iter()
        .map(|r| {
            Path::new(r["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // Three Latin words without a clear decision: `und`, undetermined, rather than a guess.
    assert_eq!(names[0], "00000-0-und-5-un-renard-roux.png");
    assert_eq!(names[1], "00001-0-zh-6-一只在雪地里的红狐狸.png");
    assert_eq!(names[2], "00002-0-ar-7-منارة-في-عاصفة.png");
    // Again: nothing overwritten, the next free names are used.
    let second = records(&run(&[]));
    assert!(second[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("un-renard-roux-1.png"));
    // Resume: delete one image; --skip-existing regenerates only that one.
    std::fs::remove_file(first[1]["path"].as_str().unwrap()).unwrap();
    let out = run(&["--skip-existing"]);
    let resumed = records(&out);
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["path"], first[1]["path"]);
    assert!(stderr(&out).contains("skipped 2"));
    // --overwrite replaces in place.
    let before = std::fs::metadata(first[0]["path"].as_str().unwrap())
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let over = records(&run(&["--overwrite", "--steps", "2"]));
    assert_eq!(over[0]["path"], first[0]["path"]);
    assert!(
        std::fs::metadata(first[0]["path"].as_str().unwrap())
            .unwrap()
            .modified()
            .unwrap()
            > before
    );
    let tmp: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty());
}

#[test]
fn shards_split_a_batch_disjointly_with_the_same_names_and_pixels() {
    let dir = scratch("shards");
    let lines: Vec<String> = (0..7).map(|i| format!("a fox number {i}")).collect();
    let file = write(&dir, "p.txt", lines.join("\n").as_bytes());
    let run = |out: &Path, shard: Option<&str>| {
        let mut a = vec![
            "--prompt-file",
            file.to_str().unwrap(),
            "--seed",
            "40",
            "--output",
            out.to_str().unwrap(),
        ];
        if let Some(s) = shard {
            a.extend(["--shard", s]);
        }
        let recs = records(&gen_json(&a, None));
        recs.into_iter()
            .map(|r| {
                let p = PathBuf::from(r["path"].as_str().unwrap());
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect::<BTreeMap<String, Vec<u8>>>()
    };
    let whole = run(&dir.join("whole"), None);
    let s0 = run(&dir.join("s0"), Some("0/3"));
    let s1 = run(&dir.join("s1"), Some("1/3"));
    let s2 = run(&dir.join("s2"), Some("2/3"));
    assert_eq!(s0.len() + s1.len() + s2.len(), whole.len());
    let mut union = BTreeMap::new();
    for s in [&s0, &s1, &s2] {
        for (k, v) in s.iter() {
            assert!(
                union.insert(k.clone(), v.clone()).is_none(),
                "{k} in two shards"
            );
        }
    }
    assert_eq!(union, whole, "same names and bytes as the whole batch");
    assert!(s1
        .keys()
        .all(|k| k.starts_with("00001") || k.starts_with("00004")));
}

#[test]
fn batch_size_groups_prompts_without_changing_images() {
    let dir = scratch("batch-size");
    let file = write(&dir, "p.txt", b"one fox\ntwo foxes\nthree foxes\n");
    let one = records(&gen_json(
        &[
            "--prompt-file",
            file.to_str().unwrap(),
            "--seed",
            "2",
            "--output",
            dir.join("a").to_str().unwrap(),
        ],
        None,
    ));
    let three = records(&gen_json(
        &[
            "--prompt-file",
            file.to_str().unwrap(),
            "--seed",
            "2",
            "--batch-size",
            "3",
            "--output",
            dir.join("b").to_str().unwrap(),
        ],
        None,
    ));
    for (a, b) in one.iter().zip(&three) {
        let (pa, pb) = (a["path"].as_str().unwrap(), b["path"].as_str().unwrap());
        let (ia, ib) = (load_png_pixels(pa), load_png_pixels(pb));
        let diff = ia
            .iter()
            .zip(&ib)
            .map(|(x, y)| (*x as i32 - *y as i32).abs())
            .max()
            .unwrap();
        assert!(
            diff <= 1,
            "batched and single images differ by {diff} levels"
        );
    }
}

fn load_png_pixels(p: &str) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    r.next_frame(&mut buf).unwrap();
    buf
}

#[test]
fn grid_and_completions() {
    let dir = scratch("grid");
    ok(&gen_json(
        &[
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--prompt",
            "c",
            "--seed",
            "1",
            "--grid",
            "--output",
            dir.to_str().unwrap(),
        ],
        None,
    ));
    let grid = dir.join("grid.png");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&grid).unwrap()));
    let info = dec.read_info().unwrap().info().clone();
    assert_eq!(
        (info.width, info.height),
        (128, 128),
        "3 images of 64x64 in a 2x2 sheet"
    );
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let out = ok(&altdiff(&["completions", shell]));
        assert!(
            out.contains("altdiff") && out.contains("prompt-file"),
            "{shell}"
        );
    }
}

/// Every long flag of `generate --help` appears in the README's flag table, and the other way round.
#[test]
fn readme_flag_reference_matches_help() {
    let help = ok(&altdiff(&["generate", "--help"]));
    let flags_in = |text: &str, table_only: bool| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !table_only || l.starts_with("| `--") || l.starts_with("| `-"))
            .flat_map(|l| {
                l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .filter(|w| w.starts_with("--") && w.len() > 2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## `altdiff generate`")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let documented = flags_in(section, true);
    let mut offered = flags_in(&help, false);
    offered.retain(|f| f != "--help" && f != "--version");
    let missing: Vec<_> = offered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&offered).collect();
    assert!(
        missing.is_empty(),
        "flags in --help but not in the README table: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "flags in the README table that --help does not have: {stale:?}"
    );
}

/// Every language of the models, detected from a corpus sentence through the binary.
#[test]
fn detection_through_the_binary_covers_all_18_languages() {
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/corpus-18-languages.txt"),
    )
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut lines = Vec::new();
    let mut expected = Vec::new();
    for l in corpus.lines().filter(|l| !l.starts_with('#')) {
        if let Some((lang, sentence)) = l.split_once('\t') {
            if seen.insert(lang.to_string()) {
                lines.push(
                    serde_json::json!({"prompt": sentence, "steps": 1, "width": 16, "height": 16})
                        .to_string(),
                );
                expected.push(lang.to_string());
            }
        }
    }
    assert_eq!(expected.len(), 18);
    let dir = scratch("all-langs");
    let out = gen_json(
        &[
            "--prompt-file",
            "-",
            "--seed",
            "1",
            "--batch-size",
            "18",
            "--output",
            dir.to_str().unwrap(),
        ],
        Some(lines.join("\n").as_bytes()),
    );
    ok(&out);
    let got: Vec<String> = records(&out)
        .iter()
        .map(|r| r["lang"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(got, expected);
}

/// `--skip-existing` with `--prompt` batches (one shared randn): the noise needs the whole batch, so it
/// is regenerated, but only the missing image is written; with everything present nothing runs.
#[test]
fn skip_existing_with_a_shared_seed_batch() {
    let dir = scratch("skip-shared");
    let args = [
        "--prompt",
        "one fox",
        "--prompt",
        "two foxes",
        "--seed",
        "9",
        "--output",
        dir.to_str().unwrap(),
    ];
    let first = records(&gen_json(&args, None));
    let gone = first[1]["path"].as_str().unwrap();
    let bytes = std::fs::read(gone).unwrap();
    std::fs::remove_file(gone).unwrap();
    let mut with_skip = args.to_vec();
    with_skip.push("--skip-existing");
    let again = records(&gen_json(&with_skip, None));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["path"], first[1]["path"]);
    assert_eq!(
        std::fs::read(gone).unwrap(),
        bytes,
        "the same image as in the whole batch"
    );
    let out = gen_json(&with_skip, None);
    assert!(records(&out).is_empty());
    assert!(stderr(&out).contains("skipped 2"));
}

/// A shared prompt file cannot write outside the output directory: absolute paths, `..` and
/// symlinked folders that lead out fail their own line (with its number); the other lines run,
/// and nothing appears outside.
#[cfg(unix)]
#[test]
fn batch_output_paths_cannot_escape_the_output_directory() {
    let dir = scratch("escape");
    let brk = dir.join("base/brk");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&brk).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, brk.join("link")).unwrap();
    let abs = outside.join("abs.png");
    let lines = format!(
        "{{\"prompt\":\"a\",\"output\":\"../../escape.png\"}}\n\
         {{\"prompt\":\"b\",\"output\":\"{}\"}}\n\
         {{\"prompt\":\"c\",\"output\":\"link/x.png\"}}\n\
         {{\"prompt\":\"d\",\"output\":\"sub/deeper/good\"}}\n\
         --prompt e --outpath_samples ../webui.png\n\
         {{\"prompt\":\"f\",\"output\":\"plain.png\"}}\n",
        abs.display()
    );
    let prompts = write(&dir, "p.txt", lines.as_bytes());
    let out = gen_json(
        &["-f", prompts.to_str().unwrap(), "-o", brk.to_str().unwrap()],
        None,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for line in [1, 2, 3, 5] {
        assert!(
            err.contains(&format!("line {line}: ")),
            "line {line} not reported: {err}"
        );
    }
    assert!(err.contains("4 of 6 prompt(s) failed"), "{err}");
    assert!(err.contains("`..` is not allowed"), "{err}");
    assert!(err.contains("not an absolute path"), "{err}");
    assert!(err.contains("leads outside the output directory"), "{err}");
    let written: Vec<String> = records(&out)
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        written,
        [
            brk.join("sub/deeper/good.png").display().to_string(),
            brk.join("plain.png").display().to_string()
        ]
    );
    // Nothing outside brk/: not beside it, not at the absolute path, not through the link.
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    assert!(!dir.join("escape.png").exists() && !dir.join("base/escape.png").exists());
    assert!(!dir.join("base/webui.png").exists());
}
