//! Helpers shared by the integration tests: paths, running the binary, comparing tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/...`
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altdiff-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the real binary with `args`.
pub fn altdiff(args: &[&str]) -> Output {
    altdiff_with_env(args, &[])
}

/// Runs the binary with extra environment variables.
pub fn altdiff_with_env(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args(args)
        .envs(vars.iter().copied())
        .env_remove("ALTDIFF_LOG")
        // Errors must stay one line even when a user has backtraces switched on.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the altdiff binary runs")
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "altdiff failed ({:?}):\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Loads every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// |a - b| <= atol + rtol |b| elementwise; returns the worst ratio of |a - b| to the bound.
pub fn worst_ratio(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let (d, bound) = ((x - y).abs(), atol + rtol * y.abs());
            if x.is_nan() || y.is_nan() || (d > 0.0 && bound == 0.0) {
                f64::INFINITY
            } else if d == 0.0 {
                0.0
            } else {
                d / bound
            }
        })
        .fold(0.0, f64::max)
}

/// Asserts that `got[key]` matches `want[key]` within |a-b| <= 1e-4 + 1e-3|b|.
pub fn assert_close(
    case: &str,
    key: &str,
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
) {
    let g = got
        .get(key)
        .unwrap_or_else(|| panic!("{case}: altdiff did not dump `{key}`"));
    let w = want
        .get(key)
        .unwrap_or_else(|| panic!("{case}: reference has no `{key}`"));
    assert_eq!(g.dims(), w.dims(), "{case}: `{key}` shape");
    let r = worst_ratio(g, w, 1e-4, 1e-3);
    eprintln!("{case:28} {key:24} worst |a-b|/(1e-4+1e-3|b|) = {r:.4}");
    assert!(
        r <= 1.0,
        "{case}: `{key}` differs from diffusers (worst ratio {r:.3})"
    );
}
pub mod hub;

/// The CRC-32 of PNG chunks (ISO 3309, as zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The flags every parity run ends with: dump the tensors to `dump`, images into `dir/images`, on
/// the CPU.
pub fn dump_args(dump: &Path, dir: &Path) -> Vec<String> {
    vec![
        "--dump-tensors".into(),
        dump.display().to_string(),
        "--output".into(),
        dir.join("images").display().to_string(),
        "--device".into(),
        "cpu".into(),
    ]
}

/// The largest |a - b| (infinite if shapes differ or a NaN appears).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.dims() != b.dims() {
        return f64::INFINITY;
    }
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.iter().zip(&b).fold(0.0, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// A tensor's values as f64, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A JSON value as a command-line word (strings without their quotes).
pub fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `flag value` for each (flag, key) of a fixture case whose value is not null.
pub fn case_flags(case: &serde_json::Value, pairs: &[(&str, &str)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(_, key)| !case[*key].is_null())
        .flat_map(|(flag, key)| [flag.to_string(), text(&case[*key])])
        .collect()
}

/// `altdiff generate --model tests/fixtures/<model> --device cpu <args>`.
pub fn generate(model: &str, args: &[&str]) -> Output {
    let model = fixture(model);
    let mut all = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    all.extend_from_slice(args);
    altdiff(&all)
}

/// Runs the binary with `args` plus [`dump_args`] into `dir`; returns stdout and the dumped tensors.
pub fn run_dumped(mut args: Vec<String>, dir: &Path) -> (String, HashMap<String, Tensor>) {
    let dump = dir.join("dump.safetensors");
    args.extend(dump_args(&dump, dir));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(&altdiff(&argv));
    (stdout, load(&dump))
}
