//! Helpers shared by the unit tests (fixture paths, recorded tokenizer cases, tensor differences and
//! the timing of the ignored speed tests).

use std::path::PathBuf;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// `(text, slow ids, ids expected from tokenizer.json)` of every record of tokenizer_ids.json: the
/// slow ids are transformers' `XLMRobertaTokenizer`'s; records where its fast tokenizer differs carry
/// `fast_ids`.
pub fn tokenizer_cases() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixture("tokenizer_ids.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    cases
        .iter()
        .map(|c| {
            let slow = ids(&c["ids"]);
            let fast = c.get("fast_ids").map_or_else(|| slow.clone(), ids);
            (c["text"].as_str().unwrap().to_string(), slow, fast)
        })
        .collect()
}

/// A CPU tensor of `shape` holding `amp * sin(0.377 i + phase)` (i the flat index): smooth, signed
/// values with no two neighbours alike.
pub fn sine(shape: &[usize], phase: f32, amp: f32) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.377 + phase).sin() * amp)
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// Every value of `t` as f32, in order (for exact comparisons).
pub fn flat_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The largest |a - b| of two tensors of the same shape, as f32.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The shortest wall time in seconds of `runs` calls of `f` after one warm-up call: the speed tests
/// run on shared VMs, where the best run is the one least disturbed by the host.
pub fn best_time(runs: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..runs.max(1))
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
