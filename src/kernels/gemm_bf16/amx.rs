//! The AMX bf16 kernel: `tdpbf16ps` on Intel's tile registers (Sapphire Rapids and later).
//!
//! A 32 x 32 block of C lives in four 16 x 16 f32 tiles (`tmm0`-`tmm3`) for a whole k block; each k
//! step loads two 16-row tiles of A (`tmm4`, `tmm5`: 16 rows x 16 k-pairs) and two 16-column tiles
//! of B (`tmm6`, `tmm7`: 16 k-pairs x 16 columns) and does four `tdpbf16ps`, 32768 multiply-adds in
//! all. B's tiles are the AVX512-BF16 kernel's panels as they are (32 columns of k-pair words
//! per pair: the two column halves are 64 bytes apart with a 128-byte stride), padded with zero
//! pairs to a multiple of 16; A is packed per block into rows of k-pair words with the same
//! padding, and rows past the end are zero. Edge blocks of C go through a 32 x 32 buffer.
//!
//! Rust has no stable AMX intrinsics, so the instructions are `asm!` (the assembler knows them
//! whatever the target features). Linux hands out the tile data state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without it the first tile instruction
//! faults. [`available`] asks once, then runs [`block`] on a small product in a forked child and
//! compares it with the exact product, so that a kernel that faults or computes wrong (it was
//! written on machines without AMX) is never used: the parent falls back to AVX512-BF16.
//!
//! [`block`] with `EMULATE` runs the same packing, addressing and loop with a scalar model of the
//! four tile instructions it uses, so its tests check everything but the instructions themselves on
//! any CPU.

/// Rows of C per tile block (two tiles of 16).
pub(super) const MR: usize = 32;

/// Whether the AMX kernel is usable: see the module documentation (read once; `ALTDIFF_AMX=0`
/// turns it off).
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("ALTDIFF_AMX").is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        imp::usable()
    })
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub(super) fn usable() -> bool {
        false
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
/// # Safety
/// Never called: AMX is only used on x86-64 Linux.
#[allow(clippy::too_many_arguments, dead_code)]
pub(super) unsafe fn block<const EMULATE: bool>(
    _: (usize, usize),
    _: (usize, usize),
    _: usize,
    _: super::Matrix<'_, half::bf16>,
    _: super::Matrix<'_, half::bf16>,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("AMX is only used on x86-64 Linux")
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) use imp::block;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    use super::super::avx512::{a_pair, pack_b};
    use super::super::{Matrix, KC, MC, NC, NR};
    use super::MR;
    use half::bf16;

    /// k-pairs per tile step (a 64-byte tile row of words).
    const KSTEP: usize = 16;

    /// CPUID.(EAX=7, ECX=0):EDX: AMX-BF16 (bit 22) and AMX-TILE (bit 24).
    fn cpu_has_amx() -> bool {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only when leaf 0 says it exists.
        unsafe {
            if __cpuid(0).eax < 7 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        }
    }

    /// Asks Linux for the tile data state (process-wide; `false` when refused or unknown).
    fn request_tile_state() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which xsave features the process
        // may use; it reads and writes no memory of ours.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    pub(super) fn usable() -> bool {
        cpu_has_amx() && request_tile_state() && self_test_in_child()
    }

    /// A product with ragged edges (rows, columns and k not multiples of the tiles, a k block and a
    /// tail) and an accumulating C, whose every buffer stays under 64 KiB.
    const TEST: (usize, usize, usize) = (37, 45, 300);

    /// The test product's inputs, C's start and its exact result.
    pub(super) fn test_case() -> (Vec<bf16>, Vec<bf16>, Vec<f32>, Vec<f64>) {
        let (m, n, k) = TEST;
        let val = |i: usize, s: usize| bf16::from_f32((((i * 37 + s) % 101) as f32 - 50.0) / 32.0);
        let a: Vec<bf16> = (0..m * k).map(|i| val(i, 3)).collect();
        let b: Vec<bf16> = (0..k * n).map(|i| val(i, 11)).collect();
        let c: Vec<f32> = (0..m * n).map(|i| val(i, 5).to_f32()).collect();
        let mut want = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * k + p].to_f64() * b[p * n + j].to_f64())
                    .sum();
                want[i * n + j] = c[i * n + j] as f64 + dot;
            }
        }
        (a, b, c, want)
    }

    /// Whether `c` is the test product: the values are multiples of 1/32 times 1/32 with sums
    /// far inside f32's exact range, so any correct kernel gets them exactly.
    pub(super) fn test_passes(c: &[f32], want: &[f64]) -> bool {
        c.len() == want.len() && c.iter().zip(want).all(|(g, w)| *g as f64 == *w)
    }

    /// Runs [`block`] on the test product in a forked child, which exits 0 when the result is
    /// exact: a fault or a wrong result there leaves this process on the AVX512-BF16 kernel.
    fn self_test_in_child() -> bool {
        let (m, n, k) = TEST;
        let (a, b, mut c, want) = test_case();
        in_child(move || {
            // SAFETY: c is m x n (row stride n), a m x k and b k x n; the caller checked CPUID and
            // got the tile state (a fault here ends only the child).
            unsafe {
                let (a, b) = (Matrix::rows(&a, k), Matrix::rows(&b, n));
                block::<false>((0, m), (0, n), k, a, b, c.as_mut_ptr(), n, true);
            }
            test_passes(&c, &want)
        })
    }

    /// Whether `check`, run in a forked child, returned true: false when it returned false, or the
    /// child crashed or could not be made. `check` must not take locks another thread may hold
    /// (the child has only the forking thread): small allocations are fine (glibc's malloc is
    /// fork-safe, and blocks under 64 KiB never reach the process allocator's own locks).
    pub(super) fn in_child(check: impl FnOnce() -> bool) -> bool {
        // SAFETY: the child runs `check` on its one thread and `_exit`s without unwinding, running
        // destructors or flushing anything of the parent's.
        unsafe {
            match libc::fork() {
                -1 => false,
                0 => {
                    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
                    libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 })
                }
                child => {
                    let mut status = 0;
                    loop {
                        let r = libc::waitpid(child, &mut status, 0);
                        if r == child {
                            break libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                        }
                        let interrupted = std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted;
                        if r == -1 && !interrupted {
                            break false;
                        }
                    }
                }
            }
        }
    }

    /// The tile configuration: palette 1, tiles 0-7 each 16 rows of 64 bytes.
    #[repr(C, align(64))]
    pub(super) struct TileConfig(pub(super) [u8; 64]);

    pub(super) fn tile_config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            // colsb (bytes per row) of tile t at 16 + 2t, little-endian; rows at 48 + t.
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        TileConfig(c)
    }

    /// Packs rows [i0, i0 + mc) x k-pairs [p0, p0 + kc) of A into rows of `kcp` words (zero for
    /// pairs past kc and rows mc..mcp).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pack_a(
        a: Matrix<'_, bf16>,
        k: usize,
        (i0, mc, mcp): (usize, usize, usize),
        (p0, kc, kcp): (usize, usize, usize),
        out: &mut [u32],
    ) {
        let bits = |v: &bf16| v.to_bits() as u32;
        for (r, row) in out[..mcp * kcp].chunks_exact_mut(kcp).enumerate() {
            if r >= mc {
                row.fill(0);
                continue;
            }
            if a.cs == 1 && 2 * (p0 + kc) <= k {
                let src = &a.data[(i0 + r) * a.rs + 2 * p0..][..2 * kc];
                for (w, pair) in row.iter_mut().zip(src.chunks_exact(2)) {
                    *w = bits(&pair[0]) | (bits(&pair[1]) << 16);
                }
            } else {
                for (p, w) in row[..kc].iter_mut().enumerate() {
                    *w = a_pair(a, k, i0 + r, p0 + p);
                }
            }
            row[kc..].fill(0);
        }
    }

    /// C[i0..i1, j0..j1] (+)= A[i0..i1, :] x B[:, j0..j1] on AMX tiles (`EMULATE`: the scalar model
    /// of the tile instructions, for tests on any CPU).
    ///
    /// # Safety
    /// `c` points at a matrix of row stride ldc whose block [i0, i1) x [j0, j1) this call alone
    /// writes; `a` holds rows i0..i1 of k values, `b` k rows of columns j0..j1; unless `EMULATE`,
    /// [`super::available`] is true (or this runs inside its self-test).
    #[allow(clippy::too_many_arguments)]
    pub(in super::super) unsafe fn block<const EMULATE: bool>(
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        k: usize,
        a: Matrix<'_, bf16>,
        b: Matrix<'_, bf16>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let kp = k.div_ceil(2);
        let m = i1 - i0;
        let ncap = NC.min((j1 - j0).div_ceil(NR) * NR);
        // KC is a multiple of KSTEP, so a padded k block still fits.
        let mut bpack = vec![0u32; KC * ncap];
        let mut apack = vec![0u32; MC.min(m).next_multiple_of(MR) * KC];
        let config = tile_config();
        if !EMULATE {
            // SAFETY: the caller promised usable tiles; the configuration is 64 valid bytes.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly))
            };
        }
        for jc in (j0..j1).step_by(NC) {
            let nc = NC.min(j1 - jc);
            for pc in (0..kp).step_by(KC) {
                let kc = KC.min(kp - pc);
                let kcp = kc.next_multiple_of(KSTEP);
                pack_b(b, k, (pc, kc, kcp), jc, nc, &mut bpack);
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let mcp = mc.next_multiple_of(MR);
                    pack_a(a, k, (i0 + ic, mc, mcp), (pc, kc, kcp), &mut apack);
                    let add = accumulate || pc > 0;
                    for ir in (0..mc).step_by(MR) {
                        let rows = MR.min(mc - ir);
                        for jr in (0..nc).step_by(NR) {
                            let cols = NR.min(nc - jr);
                            let t = Tile {
                                steps: kcp / KSTEP,
                                a: apack.as_ptr().add(ir * kcp),
                                a_stride: kcp * 4,
                                b: bpack.as_ptr().add(jr * kcp),
                                c: c.add((i0 + ic + ir) * ldc + jc + jr),
                                ldc,
                                rows,
                                cols,
                                add,
                            };
                            // SAFETY: A's 32 rows of kcp words and B's panel of kcp x NR words lie
                            // in the packs; C's rows x cols lie in this call's block.
                            unsafe { t.run::<EMULATE>() };
                        }
                    }
                }
            }
        }
        if !EMULATE {
            // SAFETY: releases this thread's tile state (configured above).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One 32 x 32 block of C over a k block.
    struct Tile {
        /// k steps of KSTEP pairs.
        steps: usize,
        /// A's first row (32 rows of words, `a_stride` bytes apart).
        a: *const u32,
        a_stride: usize,
        /// B's panel (NR words per pair).
        b: *const u32,
        /// C's first element, row stride `ldc` f32; `rows` x `cols` of the block are real.
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        /// Add to C instead of replacing it.
        add: bool,
    }

    impl Tile {
        /// # Safety
        /// As [`block`], for this tile's pointers.
        unsafe fn run<const EMULATE: bool>(&self) {
            let full = self.rows == MR && self.cols == NR;
            // C's block, or a copy of its real part (zeros elsewhere).
            let mut buf = [[0f32; NR]; MR];
            let (cp, cs) = if full {
                (self.c, self.ldc)
            } else {
                if self.add {
                    for (r, row) in buf.iter_mut().enumerate().take(self.rows) {
                        let src = std::slice::from_raw_parts(self.c.add(r * self.ldc), self.cols);
                        row[..self.cols].copy_from_slice(src);
                    }
                }
                (buf.as_mut_ptr().cast::<f32>(), NR)
            };
            let load = self.add || !full;
            let b_stride = NR * 4;
            // The four C tiles: rows 0-15 / 16-31, columns 0-15 / 16-31.
            let c_tiles = [cp, cp.add(16), cp.add(16 * cs), cp.add(16 * cs + 16)];
            if EMULATE {
                let mut acc = [[[0f32; 16]; 16]; 4];
                if load {
                    for (t, tile) in acc.iter_mut().enumerate() {
                        for (r, row) in tile.iter_mut().enumerate() {
                            let src = std::slice::from_raw_parts(c_tiles[t].add(r * cs), 16);
                            row.copy_from_slice(src);
                        }
                    }
                }
                let word = |base: *const u32, stride_bytes: usize, r: usize, q: usize| {
                    base.cast::<u8>()
                        .add(r * stride_bytes)
                        .cast::<u32>()
                        .add(q)
                        .read_unaligned()
                };
                let half =
                    |w: u32, hi: bool| f32::from_bits(if hi { w & 0xFFFF_0000 } else { w << 16 });
                for step in 0..self.steps {
                    let a0 = self.a.cast::<u8>().add(step * 64).cast::<u32>();
                    let a1 = a0.cast::<u8>().add(16 * self.a_stride).cast::<u32>();
                    let b0 = self
                        .b
                        .cast::<u8>()
                        .add(step * KSTEP * b_stride)
                        .cast::<u32>();
                    let b1 = b0.add(16);
                    // tdpbf16ps tmm(t), tmm(4 + t / 2), tmm(6 + t % 2).
                    for (t, tile) in acc.iter_mut().enumerate() {
                        let (at, bt) = ([a0, a1][t / 2], [b0, b1][t % 2]);
                        for (r, row) in tile.iter_mut().enumerate() {
                            for (j, out) in row.iter_mut().enumerate() {
                                let mut sum = *out;
                                for q in 0..KSTEP {
                                    let (aw, bw) =
                                        (word(at, self.a_stride, r, q), word(bt, b_stride, q, j));
                                    sum += half(aw, false) * half(bw, false)
                                        + half(aw, true) * half(bw, true);
                                }
                                *out = sum;
                            }
                        }
                    }
                }
                for (t, tile) in acc.iter().enumerate() {
                    for (r, row) in tile.iter().enumerate() {
                        std::slice::from_raw_parts_mut(c_tiles[t].add(r * cs), 16)
                            .copy_from_slice(row);
                    }
                }
            } else {
                let cs_bytes = cs * 4;
                // SAFETY: the tiles are configured (16 rows x 64 bytes); every load and store stays
                // inside C's block (or `buf`) and the packs, as the caller promised.
                unsafe {
                    if load {
                        asm!(
                            "tileloadd tmm0, [{c0} + {cs}*1]",
                            "tileloadd tmm1, [{c1} + {cs}*1]",
                            "tileloadd tmm2, [{c2} + {cs}*1]",
                            "tileloadd tmm3, [{c3} + {cs}*1]",
                            c0 = in(reg) c_tiles[0],
                            c1 = in(reg) c_tiles[1],
                            c2 = in(reg) c_tiles[2],
                            c3 = in(reg) c_tiles[3],
                            cs = in(reg) cs_bytes,
                            options(nostack, readonly),
                        );
                    } else {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem),
                        );
                    }
                    asm!(
                        "2:",
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "add {a0}, 64",
                        "add {a1}, 64",
                        "add {b0}, {bstep}",
                        "add {b1}, {bstep}",
                        "dec {n}",
                        "jnz 2b",
                        a0 = inout(reg) self.a => _,
                        a1 = inout(reg) self.a.cast::<u8>().add(16 * self.a_stride) => _,
                        b0 = inout(reg) self.b => _,
                        b1 = inout(reg) self.b.add(16) => _,
                        n = inout(reg) self.steps => _,
                        sa = in(reg) self.a_stride,
                        sb = in(reg) b_stride,
                        bstep = in(reg) KSTEP * b_stride,
                        options(nostack, readonly),
                    );
                    asm!(
                        "tilestored [{c0} + {cs}*1], tmm0",
                        "tilestored [{c1} + {cs}*1], tmm1",
                        "tilestored [{c2} + {cs}*1], tmm2",
                        "tilestored [{c3} + {cs}*1], tmm3",
                        c0 = in(reg) c_tiles[0],
                        c1 = in(reg) c_tiles[1],
                        c2 = in(reg) c_tiles[2],
                        c3 = in(reg) c_tiles[3],
                        cs = in(reg) cs_bytes,
                        options(nostack),
                    );
                }
            }
            if !full {
                for (r, row) in buf.iter().enumerate().take(self.rows) {
                    std::slice::from_raw_parts_mut(self.c.add(r * self.ldc), self.cols)
                        .copy_from_slice(&row[..self.cols]);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The tile configuration's bytes: palette 1, eight tiles of 16 rows x 64 bytes.
        #[test]
        fn tile_configuration_bytes() {
            let c = tile_config().0;
            assert_eq!(c[0], 1);
            assert!(c[1..16].iter().all(|&b| b == 0));
            for t in 0..8 {
                assert_eq!(u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]), 64);
                assert_eq!(c[48 + t], 16);
            }
            assert!(c[32..48].iter().all(|&b| b == 0) && c[56..].iter().all(|&b| b == 0));
            assert_eq!(std::mem::align_of::<TileConfig>(), 64);
        }

        /// The self-test's product through the scalar model is exact, and a wrong product is not.
        #[test]
        fn self_test_case_passes_the_model_and_fails_a_wrong_result() {
            let (m, n, k) = TEST;
            let (a, b, mut c, want) = test_case();
            // SAFETY: c is m x n (row stride n), a m x k and b k x n.
            unsafe {
                block::<true>(
                    (0, m),
                    (0, n),
                    k,
                    Matrix::rows(&a, k),
                    Matrix::rows(&b, n),
                    c.as_mut_ptr(),
                    n,
                    true,
                );
            }
            assert!(test_passes(&c, &want));
            c[m * n / 2] += 1.0 / 1024.0;
            assert!(!test_passes(&c, &want));
        }

        /// The self-test's harness: a child's answer, a wrong answer, a crash (the parent goes
        /// on), and the self-test's product through the model in a child.
        #[test]
        fn child_process_check() {
            assert!(in_child(|| true));
            assert!(!in_child(|| false));
            // SAFETY: a signal that kills (without a core dump) ends only the child.
            assert!(!in_child(|| unsafe { libc::raise(libc::SIGKILL) == 0 }));
            let (m, n, k) = TEST;
            let (a, b, mut c, want) = test_case();
            assert!(in_child(move || {
                // SAFETY: as in `self_test_in_child`, through the scalar model.
                unsafe {
                    let (a, b) = (Matrix::rows(&a, k), Matrix::rows(&b, n));
                    block::<true>((0, m), (0, n), k, a, b, c.as_mut_ptr(), n, true);
                }
                test_passes(&c, &want)
            }));
        }

        /// A rows pack: k-pair words, zero past kc and past the real rows; a transposed view and
        /// an odd k go through the pairwise path.
        #[test]
        fn pack_a_rows() {
            let vals: Vec<bf16> = (0..7 * 9).map(|i| bf16::from_f32(i as f32)).collect();
            for (a, k) in [
                (Matrix::rows(&vals, 9), 9),
                (
                    Matrix {
                        data: &vals,
                        rs: 1,
                        cs: 7,
                    },
                    9,
                ),
            ] {
                let mut out = vec![u32::MAX; 8 * 16];
                pack_a(a, k, (2, 3, 8), (1, 4, 16), &mut out);
                for r in 0..8 {
                    for p in 0..16 {
                        let w = out[r * 16 + p];
                        if r >= 3 || p >= 4 {
                            assert_eq!(w, 0, "row {r} pair {p}");
                            continue;
                        }
                        let lo = a.at(2 + r, 2 * (1 + p)).to_bits() as u32;
                        let hi = if 2 * (1 + p) + 1 < k {
                            a.at(2 + r, 2 * (1 + p) + 1).to_bits() as u32
                        } else {
                            0
                        };
                        assert_eq!(w, lo | hi << 16, "row {r} pair {p}");
                    }
                }
            }
        }
    }
}
