//! Reproducible noise: PyTorch's CPU generator (`torch.Generator().manual_seed(s)` + `torch.randn`),
//! bit for bit.
//!
//! mt19937 seeded with the low 32 bits of the seed, uniform floats from the low 24 bits of a 32-bit
//! draw, and `torch.randn`'s two normal paths for f32 (`normal_kernel` in ATen's
//! `native/cpu/DistributionTemplates.h`, PyTorch 2.8):
//!
//! * 16 or more elements: every element gets a uniform first, then Box-Muller runs on blocks of 16 (the
//!   first 8 against the next 8); when the size is not a multiple of 16 the last 16 are recomputed
//!   from 16 fresh uniforms. ATen's AVX2 kernel (`normal_fill_16_AVX2`) evaluates log, sin and cos
//!   with `log256_ps` / `sincos256_ps` of `avx_mathfun.h` (Cephes polynomials in f32), and the
//!   official x86-64 wheels are built by GCC, which contracts their multiply-adds into FMAs.
//!   [`TorchGenerator::randn`] replays exactly those operations, FMAs included, in scalar f32.
//! * Fewer than 16 elements: `at::normal_distribution<double>` per element: two 53-bit uniforms
//!   `u1`, `u2`, `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`, returns `r cos(theta)` and keeps
//!   `r sin(theta)` in the generator for the next small draw; rounded to f32.
//!
//! Which CPU kernel ATen runs: in PyTorch 2.8 the normal kernel has no AVX-512 variant (its
//! `DispatchStub` slot is empty), so on CPUs where `torch.backends.cpu.get_cpu_capability()` says
//! "AVX512" ATen runs the AVX2 kernel too; both give the numbers reproduced here. Only the
//! "DEFAULT" capability (CPUs without AVX2 + FMA, or `ATEN_CPU_CAPABILITY=default`) takes the scalar
//! `normal_fill` with the C library's `logf` / `sincosf` (and `theta` rounded from a double product),
//! whose values differ from the AVX2 kernel's by up to a few ulps of the radius (2e-6 at most in
//! 10^5 values); [`TorchGenerator::randn_no_avx`] reproduces that path (with glibc's functions,
//! which are what Rust's `f32::ln` / `sin` / `cos` call on Linux).
//! [`TorchGenerator::randn`] gives the AVX2 numbers on every CPU and architecture (PyTorch elsewhere,
//! e.g. on ARM64, runs the scalar kernel with its platform's libm). So `--seed S` gives the same
//! initial latents as diffusers with `generator=torch.Generator("cpu").manual_seed(S)` on x86-64, on
//! every backend.

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

    /// `at::uniform_real_distribution<float>(0, 1)`: a multiple of 2^-24 in [0, 1), exact in f32.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: a multiple of 2^-53 in [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, the path of tensors under 16 elements.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` in f32, flattened, as PyTorch computes it on x86-64 CPUs with
    /// AVX2 (ATen capability "AVX2" or "AVX512"; see the module documentation).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        self.randn_with(n, box_muller_avx2)
    }

    /// `torch.randn(n, generator=g)` as PyTorch computes it where ATen's CPU capability is
    /// "DEFAULT" (no AVX2): log, sin and cos from the C library instead of `avx_mathfun.h`. Equal
    /// to [`TorchGenerator::randn`] below 16 elements; above, values differ by a few ulps of the
    /// radius. Bit-exact where the C library is glibc, as PyTorch's Linux wheels use it.
    pub fn randn_no_avx(&mut self, n: usize) -> Vec<f32> {
        self.randn_with(n, box_muller_libm)
    }

    fn randn_with(&mut self, n: usize, box_muller: fn(&mut [f32])) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        box_muller(&mut data[..n - n % 16]);
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller(tail);
        }
        data
    }
}

/// `normal_fill_16_AVX2` (mean 0, std 1) on every block of 16 of `data` (whose length is a multiple
/// of 16), with hardware FMA where the CPU has it (the results are the same either way: an FMA is
/// one correctly rounded operation, which `f32::mul_add` computes in software otherwise).
fn box_muller_avx2(data: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked just above).
            unsafe { box_muller_avx2_fma(data) };
            return;
        }
    }
    box_muller_avx2_impl(data);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn box_muller_avx2_fma(data: &mut [f32]) {
    box_muller_avx2_impl(data)
}

#[inline(always)]
fn box_muller_avx2_impl(data: &mut [f32]) {
    for block in data.chunks_exact_mut(16) {
        let (first, second) = block.split_at_mut(8);
        for (a, b) in first.iter_mut().zip(second.iter_mut()) {
            (*a, *b) = normal_pair_avx2(*a, *b);
        }
    }
}

/// One lane of `normal_fill_16_AVX2`: uniforms `a` (-> radius) and `b` (-> angle) to
/// `(radius cos, radius sin)`. `_mm256_sqrt_ps` is correctly rounded like `f32::sqrt`; the final
/// `_mm256_fmadd_ps(n, std = 1, mean = 0)` is `n + 0` (which only turns -0 into +0).
#[inline(always)]
fn normal_pair_avx2(a: f32, b: f32) -> (f32, f32) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2 pi rounded to f32.
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    let radius = (-2.0 * log_avx(1.0 - a)).sqrt();
    let (sin, cos) = sincos_avx(TWO_PI * b);
    (radius * cos + 0.0, radius * sin + 0.0)
}

/// The constants of ATen's `avx_mathfun.h` (Cephes' `logf`, `sinf`, `cosf`), written as there: double
/// literals, rounded to f32 by `_mm256_set1_ps` (a test checks their bits against PyTorch's binary).
#[allow(clippy::excessive_precision)]
mod avx_mathfun {
    pub const MIN_NORM_POS: f32 = f32::MIN_POSITIVE;
    pub const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32; // 0.707106781186547524
    pub const P0: f32 = 7.0376836292E-2_f64 as f32;
    pub const P1: f32 = -1.1514610310E-1_f64 as f32;
    pub const P2: f32 = 1.1676998740E-1_f64 as f32;
    pub const P3: f32 = -1.2420140846E-1_f64 as f32;
    pub const P4: f32 = 1.4249322787E-1_f64 as f32;
    pub const P5: f32 = -1.6668057665E-1_f64 as f32;
    pub const P6: f32 = 2.0000714765E-1_f64 as f32;
    pub const P7: f32 = -2.4999993993E-1_f64 as f32;
    pub const P8: f32 = 3.3333331174E-1_f64 as f32;
    pub const Q1: f32 = -2.12194440e-4_f64 as f32;
    pub const Q2: f32 = 0.693359375_f64 as f32;
    pub const DP1: f32 = -0.78515625_f64 as f32;
    pub const DP2: f32 = -2.4187564849853515625e-4_f64 as f32;
    pub const DP3: f32 = -3.77489497744594108e-8_f64 as f32;
    pub const SINCOF_P0: f32 = -1.9515295891E-4_f64 as f32;
    pub const SINCOF_P1: f32 = 8.3321608736E-3_f64 as f32;
    pub const SINCOF_P2: f32 = -1.6666654611E-1_f64 as f32;
    pub const COSCOF_P0: f32 = 2.443315711809948E-005_f64 as f32;
    pub const COSCOF_P1: f32 = -1.388731625493765E-003_f64 as f32;
    pub const COSCOF_P2: f32 = 4.166664568298827E-002_f64 as f32;
    pub const FOPI: f32 = 1.27323954473516_f64 as f32; // 4 / pi
}
use avx_mathfun::*;

/// `log256_ps` of ATen's `avx_mathfun.h` for one lane, with the FMAs GCC forms when it compiles
/// the AVX2 kernel of PyTorch 2.8's wheels (read off its machine code). For `x <= 0` it returns
/// NaN like the original (`x` is in [2^-24, 1] here).
#[inline(always)]
fn log_avx(x: f32) -> f32 {
    let invalid = x <= 0.0;
    let x = if x > MIN_NORM_POS { x } else { MIN_NORM_POS }; // _mm256_max_ps(x, min_norm_pos)
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // The mantissa, with the exponent of 0.5: x in [0.5, 1).
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = P0.mul_add(x, P1);
    y = y.mul_add(x, P2);
    y = y.mul_add(x, P3);
    y = y.mul_add(x, P4);
    y = y.mul_add(x, P5);
    y = y.mul_add(x, P6);
    y = y.mul_add(x, P7);
    y = y.mul_add(x, P8);
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    let r = e.mul_add(Q2, x + y);
    if invalid {
        f32::NAN
    } else {
        r
    }
}

/// `sincos256_ps` of ATen's `avx_mathfun.h` for one lane (Cephes `sinf` / `cosf`, no special
/// handling of huge arguments), with the FMAs of PyTorch 2.8's AVX2 kernel. Returns `(sin, cos)`.
#[inline(always)]
fn sincos_avx(x: f32) -> (f32, f32) {
    let mut sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    // `_mm256_cvttps_epi32` (truncation; `x` < 2 pi here), then j = (j + 1) & ~1.
    let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let sine_poly_for_sin = j & 2 == 0;
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    // Extended precision modular arithmetic: x = ((x - y DP1) - y DP2) - y DP3.
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);

    let z = x * x;
    // Cosine polynomial (0 <= x <= pi/4).
    let mut c = COSCOF_P0.mul_add(z, COSCOF_P1);
    c = c.mul_add(z, COSCOF_P2);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    // Sine polynomial.
    let mut s = SINCOF_P0.mul_add(z, SINCOF_P1);
    s = s.mul_add(z, SINCOF_P2);
    s *= z;
    s = s.mul_add(x, x);

    // The selection as the original does it, with masks, subtractions and additions (which matter
    // only for the sign of a zero).
    let (ysin2, ysin1) = if sine_poly_for_sin {
        (s, 0.0)
    } else {
        (0.0, c)
    };
    let sin = ysin2 + ysin1;
    let cos = (s - ysin2) + (c - ysin1);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// ATen's scalar `normal_fill_16<float>` (mean 0, std 1) on every block of 16 of `data`: `logf`,
/// `sincosf` of the C library, `theta = (float)(2 pi (double) * u2)`, no FMA (the DEFAULT
/// capability is compiled for baseline x86-64).
fn box_muller_libm(data: &mut [f32]) {
    const TWO_PI: f64 = 2.0 * std::f64::consts::PI;
    for block in data.chunks_exact_mut(16) {
        let (first, second) = block.split_at_mut(8);
        for (a, b) in first.iter_mut().zip(second.iter_mut()) {
            let radius = (-2.0 * (1.0 - *a).ln()).sqrt();
            let theta = (TWO_PI * *b as f64) as f32;
            let (sin, cos) = theta.sin_cos();
            (*a, *b) = (radius * cos + 0.0, radius * sin + 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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

    /// The f32 constants as they sit in PyTorch 2.8.0's `libtorch_cpu.so` (x86-64 wheel), read from
    /// the memory operands of the AVX2 `normal_kernel`.
    #[test]
    fn avx_mathfun_constants_match_pytorch_binary() {
        let want: [(f32, u32); 24] = [
            (MIN_NORM_POS, 0x0080_0000),
            (SQRTHF, 0x3f35_04f3),
            (P0, 0x3d90_21bb),
            (P1, 0xbdeb_d1b8),
            (P2, 0x3def_251a),
            (P3, 0xbdfe_5d4f),
            (P4, 0x3e11_e9bf),
            (P5, 0xbe2a_ae50),
            (P6, 0x3e4c_ceac),
            (P7, 0xbe7f_fffc),
            (P8, 0x3eaa_aaaa),
            (Q1, 0xb95e_8083),
            (Q2, 0x3f31_8000),
            (DP1, 0xbf49_0000),
            (DP2, 0xb97d_a000),
            (DP3, 0xb322_2169),
            (SINCOF_P0, 0xb94c_a1f9),
            (SINCOF_P1, 0x3c08_839e),
            (SINCOF_P2, 0xbe2a_aaa3),
            (COSCOF_P0, 0x37cc_f5ce),
            (COSCOF_P1, 0xbab6_061a),
            (COSCOF_P2, 0x3d2a_aaa5),
            (FOPI, 0x3fa2_f983),
            ((2.0 * std::f64::consts::PI) as f32, 0x40c9_0fdb),
        ];
        for (i, (c, bits)) in want.iter().enumerate() {
            assert_eq!(c.to_bits(), *bits, "constant {i}: {c}");
        }
    }

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch_randn.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn f32s(v: &Value) -> Vec<f32> {
        let f = |x: &Value| x.as_f64().unwrap() as f32;
        v.as_array().unwrap().iter().map(f).collect()
    }

    /// Distance in units in the last place (adjacent floats are 1 apart, +0 and -0 are 0 apart).
    fn ulps(a: f32, b: f32) -> u64 {
        let key = |x: f32| {
            let i = x.to_bits() as i32;
            (if i < 0 { i32::MIN - i } else { i }) as i64
        };
        (key(a) - key(b)).unsigned_abs()
    }

    /// Every value of the small cases, bit for bit (AVX2 kernel; sizes 1 to 1000).
    #[test]
    fn randn_matches_pytorch_values() {
        let json = fixture();
        assert_eq!(json["cpu_capability"], "AVX2");
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() > 50);
        let mut report = Vec::new();
        for case in cases {
            let seed = case["seed"].as_u64().unwrap();
            let n = case["n"].as_u64().unwrap() as usize;
            let mut g = TorchGenerator::new(seed);
            let mut got = g.randn(n);
            if let Some(then) = case["then"].as_u64() {
                got.extend(g.randn(then as usize));
            }
            let want = f32s(&case["values"]);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                if a.to_bits() != b.to_bits() {
                    report.push(format!(
                        "seed {seed} n {n} [{i}]: {a} vs {b} ({} ulps)",
                        ulps(*a, *b)
                    ));
                }
            }
        }
        assert!(
            report.is_empty(),
            "{} values differ:\n{}",
            report.len(),
            report.join("\n")
        );
    }

    /// Checks one `hashed` record: SHA-256 of the little-endian f32 bytes, and the sampled values
    /// (which say where and by how many ulps a mismatch is).
    fn check_hashed(
        case: &Value,
        randn: fn(&mut TorchGenerator, usize) -> Vec<f32>,
    ) -> Option<String> {
        let seed = case["seed"].as_u64().unwrap();
        let sizes: Vec<usize> = case["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_u64().unwrap() as usize)
            .collect();
        let mut g = TorchGenerator::new(seed);
        let got: Vec<f32> = sizes.iter().flat_map(|&k| randn(&mut g, k)).collect();
        assert_eq!(got.len() as u64, case["count"].as_u64().unwrap());
        let bytes: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();

        let step = case["step"].as_u64().unwrap() as usize;
        let sampled = f32s(&case["every_step"]);
        let last = f32s(&case["last"]);
        assert_eq!(sampled.len(), got.len().div_ceil(step));
        let positions = (0..sampled.len()).map(|k| k * step);
        let wanted = positions
            .zip(sampled)
            .chain((got.len() - last.len()..got.len()).zip(last));
        let (mut differ, mut worst, mut checked) = (Vec::new(), 0, 0);
        for (i, b) in wanted {
            let a = got[i];
            checked += 1;
            if a.to_bits() != b.to_bits() {
                worst = worst.max(ulps(a, b));
                if differ.len() < 8 {
                    differ.push(format!("[{i}] {a} vs {b} ({} ulps)", ulps(a, b)));
                }
            }
        }
        if hex == case["sha256"].as_str().unwrap() && differ.is_empty() {
            return None;
        }
        let sha = if hex == case["sha256"].as_str().unwrap() {
            "equal"
        } else {
            "differs"
        };
        Some(if differ.is_empty() {
            format!("seed {seed} sizes {sizes:?}: sha256 {sha}; none of {checked} sampled values differs")
        } else {
            format!(
                "seed {seed} sizes {sizes:?}: sha256 {sha}; of {checked} sampled values, worst {worst} ulps: {}",
                differ.join(", ")
            )
        })
    }

    /// About 2 million values (sizes 7 to 262144, several seeds, and mixed small / large calls on
    /// one generator), bit for bit with PyTorch's AVX2 kernel (also what "AVX512" CPUs run).
    #[test]
    fn randn_matches_pytorch_hashed() {
        let json = fixture();
        let cases = json["hashed"].as_array().unwrap();
        assert!(cases.len() >= 50);
        let total: u64 = cases.iter().map(|c| c["count"].as_u64().unwrap()).sum();
        assert!(total > 1_000_000);
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|c| check_hashed(c, TorchGenerator::randn))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The DEFAULT-capability path against PyTorch run with `ATEN_CPU_CAPABILITY=default`: exact
    /// where Rust's `f32::ln` / `sin` / `cos` are glibc's `logf` / `sinf` / `cosf`, as PyTorch's.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn randn_no_avx_matches_pytorch_default_capability() {
        let json = fixture();
        assert_eq!(json["no_avx"]["cpu_capability"], "NO AVX");
        let cases = json["no_avx"]["hashed"].as_array().unwrap();
        assert!(!cases.is_empty());
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|c| check_hashed(c, TorchGenerator::randn_no_avx))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The two kernels take the same uniforms and differ only in how log / sin / cos are rounded:
    /// by a few ulps of the radius (values near zero, where `cos` or `sin` is tiny, differ by many
    /// of their own ulps but by as little in absolute terms).
    #[test]
    fn randn_no_avx_is_close_to_randn() {
        let a = TorchGenerator::new(3).randn(100_003);
        let b = TorchGenerator::new(3).randn_no_avx(100_003);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        eprintln!("largest difference {worst:e}");
        assert!(worst > 0.0 && worst < 4e-6, "{worst}");
        assert_eq!(
            TorchGenerator::new(3).randn(15),
            TorchGenerator::new(3).randn_no_avx(15)
        );
    }
}
