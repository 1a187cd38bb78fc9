//! Faults and interruptions through the real binary: Ctrl-C in a batch, a reader that goes away, a
//! full disk, outputs that cannot be written, running out of memory, NaN latents. Each test checks
//! the message, the exit code and the files left on disk.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;

fn m18() -> String {
    fixture("models/tiny-m18").display().to_string()
}

/// `altdiff generate --model tiny-m18 <args>` as a child process with piped stdout / stderr.
fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args(["generate", "--model", &m18()])
        .args(args)
        .env_remove("ALTDIFF_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the altdiff binary runs")
}

/// `altdiff generate --model tiny-m18 --prompt-file prompts <extra> --output out`.
fn batch(prompts: &Path, extra: &[&str], out: &Path) -> Child {
    let mut args = vec!["--prompt-file", prompts.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", out.to_str().unwrap()]);
    spawn(&args)
}

/// Waits for `child`; its output and stderr.
fn finish(child: Child) -> (Output, String) {
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    (out, err)
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The files in `dir`, sorted by name.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Asserts that every file in `dir` is a complete PNG and none is a temporary file.
fn only_complete_pngs(dir: &Path) -> usize {
    let names = files(dir);
    for n in &names {
        assert!(
            !n.ends_with(".tmp"),
            "temporary file left: {n} in {names:?}"
        );
        let dec = png::Decoder::new(BufReader::new(std::fs::File::open(dir.join(n)).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf)
            .unwrap_or_else(|e| panic!("{n} is not a complete PNG: {e}"));
    }
    names.len()
}

fn no_panic(err: &str) {
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
}

fn prompt_file(dir: &Path, lines: usize) -> PathBuf {
    let p = dir.join("prompts.txt");
    let text: String = (0..lines).map(|i| format!("prompt number {i}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn ctrl_c_abandons_the_image_in_progress_and_keeps_the_finished_ones() {
    let dir = scratch("sigint");
    let prompts = prompt_file(&dir, 4);
    let out_dir = dir.join("out");
    // 300 steps of the tiny model take a few seconds: the second prompt is mid-way when the signal comes.
    let ddim = ["--scheduler", "ddim", "--seed", "1"];
    let mut child = batch(
        &prompts,
        &[&ddim[..], &["--steps", "300"]].concat(),
        &out_dir,
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first image").unwrap();
    assert!(Path::new(&first).exists(), "{first}");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: 1 image(s) written, 3 of 4 prompt(s) not done"),
        "{err}"
    );
    assert!(err.contains("--skip-existing"), "{err}");
    no_panic(&err);
    assert!(
        lines.next().is_none(),
        "no path printed after the interruption"
    );
    assert_eq!(only_complete_pngs(&out_dir), 1);

    // --skip-existing finishes the batch: the first image is kept, the three others are made.
    let finishing = [&ddim[..], &["--steps", "2", "--skip-existing"]].concat();
    let (out, err) = finish(batch(&prompts, &finishing, &out_dir));
    assert!(out.status.success(), "{err}");
    assert_eq!(only_complete_pngs(&out_dir), 4);
}

#[test]
fn a_reader_that_goes_away_ends_the_run_quietly() {
    let dir = scratch("sigpipe");
    let prompts = prompt_file(&dir, 3);
    let out_dir = dir.join("out");
    let mut child = batch(&prompts, &["--steps", "1", "--json"], &out_dir);
    // `altdiff ... --json | head -1`: read one line, then close the pipe.
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(Path::new(rec["path"].as_str().unwrap()).exists());
    drop(reader);
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    // Ended by SIGPIPE as Unix tools are (the shell reports 141), or done before it noticed.
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
        "{:?}: {err}",
        out.status
    );
    assert!(!err.contains("error"), "quiet: {err}");
    no_panic(&err);
    only_complete_pngs(&out_dir);

    // The same for the listing commands.
    for args in [&["schedulers"][..], &["languages"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_altdiff"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr_of(&out);
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{args:?} {:?}: {err}",
            out.status
        );
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// A small tmpfs, unmounted when dropped (needs root, as CI and the development machines run).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_images_that_do_not_fit_and_keeps_the_others() {
    let dir = scratch("enospc");
    let prompts = prompt_file(&dir, 4);
    let mount = dir.join("small");
    // Each 64x64 image with its metadata is about 9-10 KB: two fit in 24 KiB, the others do not.
    let Some(fs) = Tmpfs::mount(&mount, "24k") else {
        panic!("cannot mount a tmpfs (this test needs root, as CI has)");
    };
    let out_dir = fs.0.join("out");
    let (out, err) = finish(batch(&prompts, &["--steps", "1"], &out_dir));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("free some space, then rerun with --skip-existing"),
        "{err}"
    );
    assert!(
        err.contains("prompt(s) failed; the other images were written"),
        "{err}"
    );
    no_panic(&err);
    let kept = only_complete_pngs(&out_dir);
    assert!((1..4).contains(&kept), "{kept} images fit: {err}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.lines().count(),
        kept,
        "a path printed per image written"
    );
}

#[test]
fn outputs_that_cannot_be_written_fail_before_any_work() {
    let dir = scratch("bad-output");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let through_file = file.join("out");
    let cases: Vec<(PathBuf, &str)> = vec![
        (through_file.clone(), "is not a directory"),
        (through_file.join("x.png"), "is not a directory"),
        (PathBuf::from("/proc/altdiff-out"), "cannot write there"),
    ];
    for (target, needle) in cases {
        let out = spawn(&[
            "--prompt",
            "a fox",
            "--steps",
            "1",
            "--output",
            target.to_str().unwrap(),
            "-v",
        ]);
        let (out, err) = finish(out);
        assert_eq!(out.status.code(), Some(2), "{target:?}: {err}");
        assert!(
            err.contains("cannot write there") && err.contains(needle),
            "{err}"
        );
        assert!(!err.contains("loading"), "no model was loaded: {err}");
        no_panic(&err);
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");

    // A read-only file system (where a mount is possible).
    let ro = dir.join("ro");
    if let Some(fs) = Tmpfs::mount(&ro, "64k") {
        let remount = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&fs.0)
            .status()
            .unwrap();
        assert!(remount.success());
        let out = spawn(&[
            "--prompt",
            "a fox",
            "--output",
            fs.0.join("out").to_str().unwrap(),
        ]);
        let (out, err) = finish(out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("Read-only file system"), "{err}");
    }
}

#[test]
fn running_out_of_memory_is_one_line_and_exit_1() {
    let dir = scratch("oom");
    let out_dir = dir.join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_altdiff"));
    cmd.args([
        "generate",
        "--model",
        &m18(),
        "--prompt",
        "a fox",
        "--steps",
        "1",
    ])
    .args([
        "--height", "512", "--width", "512", "--seed", "1", "--output",
    ])
    .arg(&out_dir)
    .env("RUST_BACKTRACE", "1")
    // Few threads and malloc arenas, so the address-space limit below is about the tensors.
    .env("RAYON_NUM_THREADS", "2")
    .env("MALLOC_ARENA_MAX", "2");
    // 80 MiB of address space: the tiny model loads (the run needs about 90 MiB at 512x512 on the
    // development machine), and the VAE decode's blocks (or, with less headroom, a block at load)
    // are refused. Either way: one line, exit 1, no image.
    // SAFETY: setrlimit is async-signal-safe and runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 80 << 20,
                rlim_max: 80 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
    let line = err
        .lines()
        .find(|l| l.starts_with("error: out of memory"))
        .unwrap_or_else(|| panic!("no out-of-memory line: {err}"));
    assert!(line.contains("try a smaller --height / --width"), "{line}");
    no_panic(&err);
    assert_eq!(only_complete_pngs(&out_dir), 0);
}

#[test]
fn nan_latents_name_the_step_and_write_nothing() {
    let dir = scratch("nan");
    let latents = dir.join("nan.safetensors");
    let mut values = vec![0.5f32; 4 * 8 * 8];
    values[17] = f32::NAN;
    let t = candle_core::Tensor::from_vec(values, (1, 4, 8, 8), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", t)]), &latents)
        .unwrap();
    let out_dir = dir.join("out");
    let out = spawn(&[
        "--prompt",
        "a fox",
        "--steps",
        "3",
        "--latents",
        latents.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ])
    .wait_with_output()
    .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the latents hold NaN or infinite values after denoising step 1 of"),
        "{err}"
    );
    assert!(err.contains("no image was written"), "{err}");
    no_panic(&err);
    assert_eq!(only_complete_pngs(&out_dir), 0);
}

#[test]
fn bad_prompt_lines_fail_alone_with_their_line_numbers() {
    let dir = scratch("bad-lines");
    let prompts = dir.join("prompts.txt");
    let mut bytes = b"a red fox\nbell \x07 inside\n\n".to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"broken json\"\n");
    bytes.extend_from_slice(b"caf\xe9 latin-1\n");
    bytes.extend_from_slice(b"{\"prompt\": \"   \"}\n");
    bytes.extend_from_slice(b"a lighthouse\n");
    std::fs::write(&prompts, bytes).unwrap();
    let out_dir = dir.join("out");
    let (out, err) = finish(batch(&prompts, &["--steps", "1"], &out_dir));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("4 of 6 prompt(s) failed"), "{err}");
    for needle in [
        "line 2: the prompt contains the control character U+0007 at character 6",
        "line 4:",
        "line 5:",
        "line 6:",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    assert!(err.contains("UTF-8"), "{err}");
    no_panic(&err);
    assert_eq!(
        only_complete_pngs(&out_dir),
        2,
        "lines 1 and 7 were written"
    );
}
