//! Reproducible noise: PyTorch's CPU generator (`torch.Generator().manual_seed(s)` + `torch.randn`).
//!
//! mt19937 seeded with the low 32 bits of the seed, uniform floats from the low 24 bits of a 32-bit
//! draw, and `torch.randn`'s two normal paths for f32: tensors of 16 or more elements fill every
//! element with a uniform first and then apply Box-Muller to blocks of 16 (the first 8 against the next
//! 8), recomputing the last 16 from fresh uniforms when the size is not a multiple of 16; smaller tensors
//! draw doubles (53-bit uniforms) one Box-Muller pair at a time, caching the sine half.
//! So `--seed S` gives the same initial latents as diffusers with
//! `generator=torch.Generator("cpu").manual_seed(S)`, on every backend.

const N: usize = 624;
const M: usize = 397;

/// PyTorch's CPU random generator.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    next_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: N,
            next_normal: None,
        }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// One 32-bit draw (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// One 64-bit draw (`generator->random64()`: the first 32-bit draw is the high half).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    fn uniform_f32(&mut self) -> f32 {
        ((self.next_u32() & ((1 << 24) - 1)) as f64 * (1.0 / (1u64 << 24) as f64)) as f32
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (1.0 - u2).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` in f32, flattened.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for chunk in data.chunks_exact_mut(16) {
            box_muller_16(chunk);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// PyTorch's `normal_fill_16_AVX2` (the path x86-64 builds of PyTorch take) with mean 0 and std 1:
/// f32 throughout, `theta = f32(2 pi) * u2` in f32. PyTorch evaluates log / sin / cos with SLEEF's
/// 1-ulp vector functions where Rust uses the C library's, so single values can differ by an ulp to
/// three (the tests bound it at 4 ulps, about 5e-7 relative).
fn box_muller_16(data: &mut [f32]) {
    let two_pi = std::f32::consts::TAU;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = two_pi * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The C++ standard's check value: the 10000th output of mt19937 seeded with 5489.
        let mut g = TorchGenerator::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    /// Compares with `torch.randn` recorded by `tools/fixtures/rng.py`.
    #[test]
    fn randn_matches_pytorch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch_randn.json"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() > 50);
        let mut worst_ulps = 0u32;
        for case in cases {
            let seed = case["seed"].as_u64().unwrap();
            let n = case["n"].as_u64().unwrap() as usize;
            let mut g = TorchGenerator::new(seed);
            let mut got = g.randn(n);
            if let Some(then) = case["then"].as_u64() {
                got.extend(g.randn(then as usize));
            }
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let ulps = (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32;
                worst_ulps = worst_ulps.max(ulps);
                assert!(
                    ulps <= 4,
                    "seed {seed} n {n} [{i}]: {a} vs {b} ({ulps} ulps)"
                );
            }
        }
        eprintln!("worst difference from PyTorch: {worst_ulps} ulps");
    }
}
