//! What a person sees: the binary run in a real pseudo-terminal, its output fed through a terminal
//! emulator (vt100) and the final screen read back; colour in pipes and logs; `--quiet`.

#![cfg(unix)]

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn m18() -> String {
    fixture("models/tiny-m18").display().to_string()
}

/// Runs the binary with `args` in a new pseudo-terminal of `rows` x `cols` (stdout and stderr both
/// on it, as in an interactive shell); returns everything it wrote and its exit code.
fn run_in_pty(args: &[&str], env: &[(&str, &str)], rows: u16, cols: u16) -> (Vec<u8>, i32) {
    let (mut master, mut slave) = (-1, -1);
    let mut size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into the given integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            // (mutable pointers: macOS declares them so, Linux takes const ones)
            std::ptr::null_mut(),
            std::ptr::addr_of_mut!(size),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned here alone.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_altdiff"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("ALTDIFF_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the binary starts");
    // The parent's copies of the terminal's far end must close, or reading never ends.
    drop(cmd);
    drop(slave);
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                // Linux says EIO once the last process holding the terminal is gone.
                Err(_) => break,
            }
        }
        all
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("altdiff did not finish in a terminal within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (reader.join().unwrap(), status.code().unwrap_or(-1))
}

/// The screen after `bytes`, one string per row with trailing spaces removed, trailing empty rows
/// dropped.
fn screen(bytes: &[u8], rows: u16, cols: u16) -> Vec<String> {
    let nz = |n: u16| std::num::NonZeroU16::new(n).expect("a terminal size");
    let mut parser = vt100::Parser::new(nz(rows), nz(cols), 0);
    parser.process(bytes);
    let mut lines: Vec<String> = parser
        .screen()
        .rows(0, cols)
        .map(|r| r.trim_end().to_string())
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

fn four_prompts(dir: &Path) -> String {
    let file = dir.join("four.txt");
    std::fs::write(
        &file,
        "un renard roux dans la neige\nein Fuchs im Schnee\n雪の中の赤い狐\na red fox in the snow\n",
    )
    .unwrap();
    file.display().to_string()
}

#[test]
fn paths_and_log_lines_stay_on_screen_and_no_bar_is_left() {
    let dir = scratch("pty-screen");
    let prompts = four_prompts(&dir);
    let out = dir.join("out");
    let (rows, cols) = (60, 120);
    let (raw, code) = run_in_pty(
        &[
            "generate",
            "-v",
            "--model",
            &m18(),
            "-f",
            &prompts,
            "--steps",
            "40",
            "--seed",
            "7",
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
        rows,
        cols,
    );
    let text = String::from_utf8_lossy(&raw);
    let lines = screen(&raw, rows, cols);
    let shown = lines.join("\n");
    assert_eq!(code, 0, "{shown}");
    // The bars were drawn while it ran (so this test sees what the person saw)...
    assert!(
        text.contains("prompts [") && text.contains("steps ["),
        "no progress bars were drawn: {text:?}"
    );
    // ...and none is left on the screen.
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("prompts [") || l.contains("steps [") || l.contains("ETA")),
        "a stale bar is left:\n{shown}"
    );
    // Every image path is on the screen, on a line of its own, in order.
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    written.sort();
    assert_eq!(written.len(), 4);
    let positions: Vec<usize> = written
        .iter()
        .map(|p| {
            lines
                .iter()
                .position(|l| l == p)
                .unwrap_or_else(|| panic!("{p} is not on the screen:\n{shown}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{shown}");
    // So is every -v line about the prompts, whole.
    for line in 1..=4 {
        let needle = format!("line {line}: detected language");
        assert!(
            lines.iter().any(|l| l.contains(&needle)),
            "`{needle}` is not on the screen:\n{shown}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO") && l.contains("timings (last batch)")),
        "{shown}"
    );
    // On a terminal the log levels are coloured.
    assert!(text.contains("\u{1b}[32m"), "{text:?}");
}

#[test]
fn no_color_is_honoured_on_a_terminal() {
    let dir = scratch("pty-nocolor");
    let out = dir.join("x.png");
    let (raw, code) = run_in_pty(
        &[
            "generate",
            "-v",
            "--model",
            &m18(),
            "-p",
            "un renard",
            "--steps",
            "2",
            "-s",
            "1",
            "-o",
            out.to_str().unwrap(),
        ],
        &[("NO_COLOR", "1")],
        40,
        100,
    );
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains("\u{1b}[3"),
        "colour despite NO_COLOR: {text:?}"
    );
}

/// A run that warns (the image exists, so another name is taken), with stderr captured.
fn warning_run(dir: &Path, env: &[(&str, &str)]) -> String {
    let target = dir.join("x.png");
    std::fs::write(&target, b"taken").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_altdiff"));
    cmd.args([
        "generate",
        "--model",
        &m18(),
        "-p",
        "un renard",
        "--steps",
        "1",
        "-s",
        "1",
        "-o",
        target.to_str().unwrap(),
    ])
    .env_remove("NO_COLOR")
    .env_remove("CLICOLOR_FORCE")
    .env_remove("ALTDIFF_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn no_colour_codes_in_pipes_and_logs_unless_forced() {
    let dir = scratch("colour-pipe");
    let err = warning_run(&dir, &[]);
    assert!(
        err.contains("WARN") && err.contains("exists; wrote"),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "escape codes in a pipe: {err:?}");
    let dir = scratch("colour-forced");
    let err = warning_run(&dir, &[("CLICOLOR_FORCE", "1")]);
    assert!(
        err.contains("\u{1b}[33m"),
        "CLICOLOR_FORCE gives colour: {err:?}"
    );
    let dir = scratch("colour-both");
    let err = warning_run(&dir, &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")]);
    assert!(!err.contains('\u{1b}'), "NO_COLOR wins: {err:?}");
}

/// `altdiff generate <flags> --model tiny-m18 -p "un renard" --steps 1 -o <dir>`, captured.
fn one_step(flags: &[&str], dir: &Path) -> std::process::Output {
    let mut args = vec!["generate"];
    args.extend_from_slice(flags);
    let m = m18();
    args.extend_from_slice(&["--model", &m, "-p", "un renard", "--steps", "1"]);
    args.extend_from_slice(&["-o", dir.to_str().unwrap()]);
    altdiff(&args)
}

#[test]
fn quiet_prints_only_paths_and_the_seed_never_precedes_an_error() {
    let dir = scratch("quiet");
    // No --seed: a random one, which -q does not report.
    let out = one_step(&["-q"], &dir);
    let stdout = ok(&out);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "-q printed something"
    );
    // Without -q the seed is reported...
    let out = one_step(&[], &dir);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("seed: "));
    // ...but not in front of an error found while setting the batch up: the model's own scheduler
    // (PNDM) has no Karras sigmas, which is known only once its config is read.
    let out = one_step(&["--karras"], &dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("--karras"),
        "{err}"
    );
}
