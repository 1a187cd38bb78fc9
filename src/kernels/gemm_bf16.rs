//! bf16 matrix multiply with f32 accumulation on the CPU: `C (f32) = A (bf16) x B (bf16) [+ C]`,
//! the building block of `--dtype bf16` on CPUs (candle 0.11's CPU backend widens bf16 matmuls to
//! f32 on every call).
//!
//! Owned here because no crate in candle's tree has one: gemm 0.19 does f16 (by converting to f32)
//! but not bf16, and oneDNN is not a Rust crate. Kernels, chosen at run time ([`Bf16Kernel::detect`]):
//! - **AMX** (Intel Sapphire Rapids and later, on Linux): `tdpbf16ps` on 16 x 16 tiles of C,
//!   a 32 x 32 block of C in four tile registers over k steps of 32 (the `amx` module). Used
//!   only where CPUID has AMX-TILE and AMX-BF16, Linux grants the tile state
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) and a self-test in a child process gets the exact
//!   product; `ALTDIFF_AMX=0` turns it off. Not yet run on AMX hardware: its tests there say
//!   whether it is right, and the self-test keeps a wrong or crashing kernel from being used.
//! - **AVX512-BF16** (Zen 4 / Zen 5, Intel Cooper Lake and Sapphire Rapids): `vdpbf16ps`, which
//!   multiplies pairs of bf16 and adds both products to f32 lanes. B is packed into panels of
//!   [`NR`] columns with each k-pair interleaved into one 32-bit word; A's k-pair words are
//!   broadcast to all lanes, read where they lie when A's rows are contiguous and k is even (else
//!   from panels of [`MR`] rows packed the same way), so one instruction does 16 columns x 2 k for
//!   one row; an 8 x 32 tile of C stays in 16 registers for a whole k block (a last panel of at
//!   most 8 columns in 256-bit registers, `W256`: m9's attention at width 40 ends in one, which
//!   `perf` put at 3.2 % of a bf16 m9 step; `attention_speed` min 172 -> 168 ms, on a noisy
//!   Zen 4). The threads split the columns (or, for a narrow product, the rows) in whole tiles.
//!   A B packed beforehand takes up
//!   to 192 k-pairs in one block (a 320-input layer in one pass, not 128 + 32), and a product
//!   into bf16 ([`gemm_bf16_packed_bf16`]) adds the bias and rounds in the tiles themselves; a
//!   GEGLU projection's B, packed with each panel's 16 value columns beside their 16 gate
//!   columns ([`PackedB::for_geglu`]), has its tiles write `value * gelu(gate)`
//!   ([`gemm_bf16_packed_geglu`]; the activation out of line in `store_geglu`, so that the other
//!   tiles' code is unchanged).
//! - **Portable**: A and B converted to f32, then gemm's f32 kernels (the AVX2 / AVX-512 / NEON
//!   sgemm it picks at run time). The same numbers up to f32 rounding order; bf16's memory saving
//!   without its speed.
//!
//! Every kernel is tested against an f64 product of the same bf16 values; the AMX block's packing,
//! addressing and edges are also tested everywhere through a scalar model of its tile instructions.

use half::bf16;

/// Rows of A per microkernel tile.
pub const MR: usize = 8;
/// Columns of B per microkernel tile (two 16-lane registers).
pub const NR: usize = 32;
/// k-pairs per packed block (256 values of k: an A panel is 4 KiB, a B panel 16 KiB, in L1).
const KC: usize = 128;
/// Rows of A per block.
const MC: usize = 128;
/// Columns of B per packed block (512 KiB of packed B for a full k block, in L2).
const NC: usize = 1024;

/// Which bf16 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `tdpbf16ps` on AMX tiles (with AVX512-BF16 for the products whose B is packed beforehand).
    Amx,
    /// `vdpbf16ps` (AVX512-BF16 with AVX-512F).
    Avx512Bf16,
    /// Convert to f32, then gemm's f32 kernels.
    Portable,
}

impl Bf16Kernel {
    /// The best kernel this CPU runs.
    pub fn detect() -> Self {
        if Bf16Kernel::Amx.supported() {
            Bf16Kernel::Amx
        } else if Bf16Kernel::Avx512Bf16.supported() {
            Bf16Kernel::Avx512Bf16
        } else {
            Bf16Kernel::Portable
        }
    }

    /// Whether this CPU (and OS) runs the kernel.
    pub fn supported(self) -> bool {
        match self {
            Bf16Kernel::Amx => Bf16Kernel::Avx512Bf16.supported() && amx::available(),
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512bf16")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Kernel::Avx512Bf16 => false,
            Bf16Kernel::Portable => true,
        }
    }

    /// A name for `-v` and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx (tdpbf16ps)",
            Bf16Kernel::Avx512Bf16 => "avx512-bf16 (vdpbf16ps)",
            Bf16Kernel::Portable => "portable (bf16 -> f32, f32 gemm)",
        }
    }
}

/// A strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Elements between two rows.
    pub rs: usize,
    /// Elements between two columns.
    pub cs: usize,
}

impl<'a, T: Copy> Matrix<'a, T> {
    /// A row-major view with `stride` elements between rows.
    pub fn rows(data: &'a [T], stride: usize) -> Self {
        Self {
            data,
            rs: stride,
            cs: 1,
        }
    }

    /// Element (i, j).
    #[inline]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }

    /// Whether a `rows` x `cols` matrix fits in `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `c = a x b` (`accumulate`: `c += a x b`) for `a` [m, k], `b` [k, n] (any strides) and `c`
/// [m, n] (row-major, row stride `ldc`), with `threads` threads (rayon) when the work is large
/// enough.
///
/// # Panics
/// When a view is too short for its shape (a caller's bug, not input-dependent).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    kernel: Bf16Kernel,
    (m, n, k): (usize, usize, usize),
    a: Matrix<'_, bf16>,
    b: Matrix<'_, bf16>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.holds(m, k), "A is too short");
    assert!(b.holds(k, n), "B is too short");
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C is too short");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: c holds m rows of ldc with n <= ldc columns (checked above).
    unsafe {
        gemm_bf16_raw(
            kernel,
            (m, n, k),
            a,
            b,
            c.as_mut_ptr(),
            ldc,
            accumulate,
            threads,
        )
    }
}

/// [`gemm_bf16`] writing through a raw pointer, for callers whose threads write disjoint blocks
/// of one output (a convolution's tiles).
///
/// # Safety
/// `c` points at m rows of `ldc >= n` f32 that nothing else reads or writes meanwhile; `a` holds
/// an m x k and `b` a k x n matrix; m, n and k are not zero.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_raw(
    kernel: Bf16Kernel,
    (m, n, k): (usize, usize, usize),
    a: Matrix<'_, bf16>,
    b: Matrix<'_, bf16>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Amx | Bf16Kernel::Avx512Bf16 if kernel.supported() => {
            let amx = kernel == Bf16Kernel::Amx;
            avx512::gemm((m, n, k), a, b, c, ldc, accumulate, threads, amx)
        }
        _ => portable((m, n, k), a, b, c, ldc, accumulate, threads),
    }
}

/// B laid out once for many products with the same right-hand side (attention's `k^T` and `v`,
/// shared by every block of query rows of a head): the AVX512-BF16 kernel's panels, or the values
/// widened to f32 for the portable kernel. Packing B per call cost attention as much as its
/// products.
pub struct PackedB {
    k: usize,
    n: usize,
    /// k-pairs per block of the panels ([`packed_kc`]).
    kc: usize,
    data: Packing,
    /// Made by [`PackedB::for_geglu`]: B's columns in GEGLU's order.
    geglu: bool,
}

/// k-pairs per block of a prepacked B with `kp` pairs: all of them up to one and a half
/// [`KC`] (a 320-input layer's 160 pairs: one pass of its tiles over k instead of 128 + 32, each
/// tile's partial sums stored and loaded once fewer; the panel of 160 pairs, 20 KiB, still fits
/// L1), else [`KC`].
fn packed_kc(kp: usize) -> usize {
    if kp <= KC + KC / 2 {
        kp.max(1)
    } else {
        KC
    }
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.data {
            Packing::Panels(_) => "panels",
            Packing::F32(_) => "f32",
        };
        write!(f, "PackedB {{ k: {}, n: {}, {how} }}", self.k, self.n)
    }
}

enum Packing {
    /// k-pair words in panels of [`NR`] columns, one block of `kc` pairs after another.
    Panels(Vec<u32>),
    /// Row-major k x n.
    F32(Vec<f32>),
}

impl PackedB {
    /// (k, n): B's rows and columns.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Packs the k x n matrix `b` for `kernel`.
    ///
    /// # Panics
    /// When `b` is too short for its shape (a caller's bug).
    pub fn new(kernel: Bf16Kernel, b: Matrix<'_, bf16>, (k, n): (usize, usize)) -> Self {
        assert!(b.holds(k, n), "B is too short");
        let kc = packed_kc(k.div_ceil(2));
        let data = match kernel {
            #[cfg(target_arch = "x86_64")]
            // AMX CPUs multiply a packed B with the AVX512-BF16 kernel (one thread's many small
            // products: attention's blocks of query rows).
            Bf16Kernel::Amx | Bf16Kernel::Avx512Bf16 if Bf16Kernel::Avx512Bf16.supported() => {
                use rayon::prelude::*;
                let (kp, panels) = (k.div_ceil(2), n.div_ceil(NR));
                let mut words = vec![0u32; kp * panels * NR];
                // One k block per task (a layer's weights are packed at load).
                words
                    .par_chunks_mut(kc * panels * NR)
                    .enumerate()
                    .for_each(|(i, block)| {
                        let (pc, kc) = (i * kc, kc.min(kp - i * kc));
                        avx512::pack_b(b, k, (pc, kc, kc), 0, n, block);
                    });
                Packing::Panels(words)
            }
            _ => Packing::F32(dense(b, k, n)),
        };
        Self {
            k,
            n,
            kc,
            data,
            geglu: false,
        }
    }

    /// Packs the k x n matrix `b` of a GEGLU projection (its n outputs are `[value (n / 2), gate
    /// (n / 2)]`) for [`gemm_bf16_packed_geglu`]: the columns reordered so that each panel of
    /// [`NR`] holds 16 value columns and then the 16 gate columns of the same outputs (the
    /// AVX512-BF16 tile's two registers), which n / 2 must be a multiple of 16 for; None when
    /// it is not.
    ///
    /// # Panics
    /// When `b` is too short for its shape (a caller's bug).
    pub fn for_geglu(
        kernel: Bf16Kernel,
        b: Matrix<'_, bf16>,
        (k, n): (usize, usize),
    ) -> Option<Self> {
        if n == 0 || !n.is_multiple_of(2 * GEGLU_LANES) {
            return None;
        }
        assert!(b.holds(k, n), "B is too short");
        // The reordered B, column by column (column j' of it at j' k).
        let mut columns = Vec::with_capacity(k * n);
        for j in 0..n {
            let from = geglu_column(j, n / 2);
            columns.extend((0..k).map(|p| b.at(p, from)));
        }
        let reordered = Matrix {
            data: &columns,
            rs: 1,
            cs: k,
        };
        Some(Self {
            geglu: true,
            ..Self::new(kernel, reordered, (k, n))
        })
    }
}

/// Output columns per half of a GEGLU panel (a 512-bit register of f32).
const GEGLU_LANES: usize = 16;
const _: () = assert!(NR == 2 * GEGLU_LANES);

/// The column of a GEGLU projection (`h` value columns, then `h` gate columns) that column `j` of
/// its packed B ([`PackedB::for_geglu`]) holds: panel `j / 32` holds value columns 16 (j / 32)..
/// and then the gate columns of the same outputs.
fn geglu_column(j: usize, h: usize) -> usize {
    let (panel, lane) = (j / (2 * GEGLU_LANES), j % (2 * GEGLU_LANES));
    let out = panel * GEGLU_LANES + lane % GEGLU_LANES;
    if lane < GEGLU_LANES {
        out
    } else {
        h + out
    }
}

/// The packed product's (n, k), or None when it is empty (m or n zero); panics when `a` or the
/// output (`len` values, row stride `ld`) is too short for it (a caller's bug).
fn packed_dims(
    m: usize,
    a: Matrix<'_, bf16>,
    b: &PackedB,
    (len, ld): (usize, usize),
    what: &str,
) -> Option<(usize, usize)> {
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return None;
    }
    assert!(a.holds(m, k), "A is too short");
    assert!(ld >= n && len > (m - 1) * ld + n - 1, "{what} is too short");
    Some((n, k))
}

/// `c = a x b` (`accumulate`: `c += a x b`) for `a` [m, k] and a packed `b` [k, n], split between
/// `threads` threads (rayon) when the work is large enough: 1 for callers that run many small
/// products in parallel (attention's blocks of query rows), more for a layer's weight packed once
/// at load and multiplied by each call's activations.
///
/// # Panics
/// When `a` or `c` is too short for its shape (a caller's bug).
pub fn gemm_bf16_packed(
    m: usize,
    a: Matrix<'_, bf16>,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    let Some((n, k)) = packed_dims(m, a, b, (c.len(), ldc), "C") else {
        return;
    };
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    match &b.data {
        #[cfg(target_arch = "x86_64")]
        Packing::Panels(words) => {
            let source = avx512::Source::Packed(words, n.div_ceil(NR), b.kc);
            let cptr = crate::kernels::SendPtr(c.as_mut_ptr());
            let run = |&(i0, i1, j0, j1): &(usize, usize, usize, usize)| {
                // SAFETY: `c` holds m rows of ldc >= n (checked above) and is borrowed mutably;
                // the parts are disjoint blocks of it whose columns start at whole panels; the
                // panels were made by the AVX512-BF16 kernel, so this CPU has it.
                unsafe {
                    avx512::block(
                        (i0, i1),
                        (j0, j1),
                        k,
                        a,
                        source,
                        cptr.get(),
                        ldc,
                        accumulate,
                    )
                }
            };
            on_threads((m, n, k), threads, MR, run)
        }
        #[cfg(not(target_arch = "x86_64"))]
        Packing::Panels(_) => unreachable!("panels are only made on x86_64"),
        // SAFETY: `c` holds m rows of ldc >= n (checked above) and is borrowed mutably; b32 is
        // k x n.
        Packing::F32(b32) => unsafe {
            let a32 = dense(a, m, k);
            portable_f32(
                (m, n, k),
                &a32,
                b32,
                c.as_mut_ptr(),
                ldc,
                accumulate,
                threads,
            )
        },
    }
}

/// What the sums of [`gemm_bf16_packed_bf16`] start from: a bias (one f32 per column) plus a bf16
/// residual (m rows of n, e.g. a transformer block's input), each optional; with both, the sum
/// starts from `bias + residual` in f32, so a layer and its residual connection are rounded once.
#[derive(Clone, Copy, Default)]
pub struct Start<'a> {
    /// One value per output column.
    pub bias: Option<&'a [f32]>,
    /// One value per output, row-major with this row stride.
    pub residual: Option<(&'a [bf16], usize)>,
}

impl Start<'_> {
    /// The f32 C that [`gemm_bf16_packed`] sums into for these starting values (m x n).
    fn rows(&self, m: usize, n: usize) -> Vec<f32> {
        let mut c = match self.bias {
            Some(b) => b[..n].repeat(m),
            None => vec![0f32; m * n],
        };
        if let Some((r, ldr)) = self.residual {
            for (row, res) in c.chunks_exact_mut(n).zip(r.chunks(ldr)) {
                row.iter_mut().zip(res).for_each(|(c, r)| *c += r.to_f32());
            }
        }
        c
    }
}

/// `out = round(a x b + start)` into bf16 (row stride `ldo`) for `a` [m, k] and a packed `b` [k, n]:
/// a bf16 linear layer's whole output in one pass. The products are summed in f32 from the bias
/// (plus the residual: [`Start`]) as [`gemm_bf16_packed`] sums them into a C that holds them, and
/// each sum is rounded once as
/// `convert::round` rounds (the same bits as rounding that C, tested), but no f32 C of the
/// whole product is written or read again: a tile's sums go straight to bf16, and only a product
/// with several k blocks keeps its partial sums, one block of C at a time, in a buffer that stays
/// in L2. Filling C with the bias, and rounding it in another pass, had cost a 640 -> 5120 layer at
/// 2048 tokens 59 ms against its products' 32 (Zen 4, 2 threads). `out` may be uninitialised:
/// every one of its m x n values (and no other) is written.
///
/// # Panics
/// When `a`, `out`, the bias or the residual is too short for its shape (a caller's bug).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_packed_bf16(
    m: usize,
    a: Matrix<'_, bf16>,
    b: &PackedB,
    start: Start<'_>,
    out: &mut [std::mem::MaybeUninit<bf16>],
    ldo: usize,
    threads: usize,
) {
    let Some((n, k)) = packed_dims(m, a, b, (out.len(), ldo), "out") else {
        return;
    };
    assert!(
        start.bias.is_none_or(|b| b.len() >= n),
        "the bias is too short"
    );
    if let Some((r, ldr)) = start.residual {
        assert!(
            ldr >= n && r.len() >= (m - 1) * ldr + n,
            "the residual is too short"
        );
    }
    packed_into_bf16((m, n, k), a, b, start, (out, ldo, false), threads)
}

/// diffusers' GEGLU of a bf16 projection, `out = round(value * gelu(gate))` with `[value, gate] =
/// a x b + bias` for `a` [m, k] and `b` packed by [`PackedB::for_geglu`] (n columns: out has n /
/// 2, row stride `ldo`), `bias` in B's original column order. With the AVX512-BF16 panels each
/// tile holds the value and gate sums of the same 16 outputs and applies the activation to them
/// in registers (`avx512::store_geglu`): the projection's n-wide output is never written, read back
/// and rounded on the way, as the separate pass ([`super::geglu::geglu`]) needs. The sums are
/// [`gemm_bf16_packed_bf16`]'s, the activation [`super::geglu`]'s (the same bits in f32), and
/// there is one rounding where the separate pass has two. `out` may be uninitialised: every one
/// of its m x n / 2 values (and no other) is written.
///
/// # Panics
/// When `b` was not packed by [`PackedB::for_geglu`], or `a`, `out` or the bias is too short
/// (a caller's bug).
pub fn gemm_bf16_packed_geglu(
    m: usize,
    a: Matrix<'_, bf16>,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: &mut [std::mem::MaybeUninit<bf16>],
    ldo: usize,
    threads: usize,
) {
    assert!(b.geglu, "B is not packed for GEGLU");
    let (k, n) = b.dims();
    let h = n / 2;
    if m == 0 || h == 0 {
        return;
    }
    assert!(a.holds(m, k), "A is too short");
    assert!(
        ldo >= h && out.len() > (m - 1) * ldo + h - 1,
        "out is too short"
    );
    assert!(bias.is_none_or(|b| b.len() >= n), "the bias is too short");
    // The bias in B's (reordered) column order.
    let bias: Option<Vec<f32>> = bias.map(|b| (0..n).map(|j| b[geglu_column(j, h)]).collect());
    let start = Start {
        bias: bias.as_deref(),
        residual: None,
    };
    packed_into_bf16((m, n, k), a, b, start, (out, ldo, true), threads)
}

/// The product of [`gemm_bf16_packed_bf16`] (and, with `geglu`, of [`gemm_bf16_packed_geglu`])
/// once its caller has checked the operands: `out` holds m rows of ldo >= n (`geglu`: n / 2),
/// the bias n values and the residual m rows of n.
fn packed_into_bf16(
    (m, n, k): (usize, usize, usize),
    a: Matrix<'_, bf16>,
    b: &PackedB,
    start: Start<'_>,
    (out, ldo, geglu): (&mut [std::mem::MaybeUninit<bf16>], usize, bool),
    threads: usize,
) {
    match &b.data {
        #[cfg(target_arch = "x86_64")]
        Packing::Panels(words) if k > 0 => {
            let panels = (words.as_slice(), n.div_ceil(NR), b.kc);
            let optr = crate::kernels::SendPtr(out.as_mut_ptr().cast::<bf16>());
            let run = |&(i0, i1, j0, j1): &(usize, usize, usize, usize)| {
                // SAFETY: `out` holds m rows of ldo >= n (geglu: n / 2) and is borrowed mutably;
                // the parts are disjoint blocks of it whose columns start at whole panels (geglu:
                // outputs j0 / 2 .. j1 / 2); the panels were made by the AVX512-BF16 kernel, so
                // this CPU has it; the bias holds n values and the residual m rows of n (all
                // checked by the caller).
                unsafe {
                    avx512::block_bf16(
                        (i0, i1),
                        (j0, j1),
                        k,
                        a,
                        panels,
                        start,
                        (optr.get(), ldo, geglu),
                    )
                }
            };
            on_threads((m, n, k), threads, MR, run)
        }
        _ => {
            // The f32 C the packed product sums into, from the bias and residual, then rounded
            // (or its GEGLU, rounded).
            let mut c = start.rows(m, n);
            let accumulate = start.bias.is_some() || start.residual.is_some();
            gemm_bf16_packed(m, a, b, &mut c, n, accumulate, threads);
            let width = if geglu { n / 2 } else { n };
            let mut activated = vec![0f32; if geglu { width } else { 0 }];
            for (sums, dst) in c.chunks_exact(n).zip(out.chunks_mut(ldo)) {
                let row = if geglu {
                    for (panel, pair) in sums.chunks_exact(2 * GEGLU_LANES).enumerate() {
                        let (value, gate) = pair.split_at(GEGLU_LANES);
                        let o = &mut activated[panel * GEGLU_LANES..][..GEGLU_LANES];
                        for ((o, v), g) in o.iter_mut().zip(value).zip(gate) {
                            *o = v * super::geglu::gelu(*g);
                        }
                    }
                    &activated[..]
                } else {
                    sums
                };
                super::convert::round_into_uninit(row, &mut dst[..width]);
            }
        }
    }
}

/// Runs `work` on the blocks (rows i0..i1, columns j0..j1) of an m x n product split between
/// `threads` in whole tiles: the columns (whole panels of [`NR`]) when there are enough column
/// tiles, else the rows (`mr` at a time, so a tall, narrow product does not leave its work on few
/// tiles); in parallel when there are several blocks and enough work.
fn on_threads(
    (m, n, k): (usize, usize, usize),
    threads: usize,
    mr: usize,
    work: impl Fn(&(usize, usize, usize, usize)) + Send + Sync,
) {
    use rayon::prelude::*;
    let threads = threads.max(1);
    let col_tiles = n.div_ceil(NR);
    let blocks: Vec<(usize, usize, usize, usize)> = if col_tiles >= 2 * threads || m <= mr {
        let per = col_tiles.div_ceil(threads.min(col_tiles)) * NR;
        (0..n)
            .step_by(per)
            .map(|j0| (0, m, j0, (j0 + per).min(n)))
            .collect()
    } else {
        let row_tiles = m.div_ceil(mr);
        let per = row_tiles.div_ceil(threads.min(row_tiles)) * mr;
        (0..m)
            .step_by(per)
            .map(|i0| (i0, (i0 + per).min(m), 0, n))
            .collect()
    };
    if blocks.len() > 1 && (m * n * k) >= (1 << 18) {
        blocks.par_iter().for_each(work);
    } else {
        blocks.iter().for_each(work);
    }
}

/// The portable kernel: both operands to f32, then gemm's f32 kernels.
///
/// # Safety
/// As [`gemm_bf16_raw`].
unsafe fn portable(
    (m, n, k): (usize, usize, usize),
    a: Matrix<'_, bf16>,
    b: Matrix<'_, bf16>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    let (a32, b32) = (dense(a, m, k), dense(b, k, n));
    portable_f32((m, n, k), &a32, &b32, c, ldc, accumulate, threads)
}

/// `x` (rows x cols, any strides) as a row-major f32 matrix.
fn dense(x: Matrix<'_, bf16>, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend((0..cols).map(|j| x.at(i, j).to_f32()));
    }
    out
}

/// The portable kernel's product of the widened operands (row-major m x k and k x n).
///
/// # Safety
/// As [`gemm_bf16_raw`] for `c`; `a32` and `b32` hold m x k and k x n values.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_f32(
    (m, n, k): (usize, usize, usize),
    a32: &[f32],
    b32: &[f32],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    debug_assert!(a32.len() >= m * k && b32.len() >= k * n);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: a32 is m x k (row stride k), b32 is k x n (row stride n), c holds m rows of ldc
    // with n <= ldc columns used (the caller's promise).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a32.as_ptr(),
            1,
            k as isize,
            b32.as_ptr(),
            1,
            n as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{bf16, Matrix, KC, MC, MR, NC, NR};
    use crate::kernels::lanes;

    /// Where a block's B panels come from.
    #[derive(Clone, Copy)]
    pub(super) enum Source<'a> {
        /// Packed by the block, one (k block, column block) at a time.
        Pack(Matrix<'a, bf16>),
        /// Packed beforehand ([`super::PackedB`]): the words, the number of column panels and the
        /// k-pairs per block.
        Packed(&'a [u32], usize, usize),
    }
    use std::arch::x86_64::*;

    /// The blocks of C, split between `threads`, each through [`block`] (or, with `amx`, the AMX
    /// kernel's [`super::amx::block`]).
    ///
    /// # Safety
    /// As [`super::gemm_bf16_raw`], on a CPU with AVX512-BF16 (and, with `amx`, usable AMX tiles).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        (m, n, k): (usize, usize, usize),
        a: Matrix<'_, bf16>,
        b: Matrix<'_, bf16>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        threads: usize,
        amx: bool,
    ) {
        let cptr = crate::kernels::SendPtr(c);
        let mr = if amx { super::amx::MR } else { MR };
        let work = |&(i0, i1, j0, j1): &(usize, usize, usize, usize)| {
            // SAFETY: this block writes only rows [i0, i1) x columns [j0, j1) of C, inside `c`
            // (checked by the caller); the other blocks are disjoint from it; the caller checked
            // the CPU's features.
            unsafe {
                if amx {
                    super::amx::block::<false>(
                        (i0, i1),
                        (j0, j1),
                        k,
                        a,
                        b,
                        cptr.get(),
                        ldc,
                        accumulate,
                    )
                } else {
                    let b = Source::Pack(b);
                    block((i0, i1), (j0, j1), k, a, b, cptr.get(), ldc, accumulate)
                }
            }
        };
        super::on_threads((m, n, k), threads, mr, work)
    }

    /// C[i0..i1, j0..j1] (+)= A[i0..i1, :] x B[:, j0..j1], blocked; B packed (here or
    /// beforehand), A packed too unless its rows are contiguous with an even k (then each k-pair
    /// word is read where it lies).
    ///
    /// # Safety
    /// `c` points at a matrix of row stride ldc whose block [i0, i1) x [j0, j1) this call alone
    /// writes; prepacked panels cover k x j1 of B with j0 a multiple of NR; the CPU has
    /// AVX512-BF16.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        k: usize,
        a: Matrix<'_, bf16>,
        b: Source<'_>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let kp = k.div_ceil(2);
        let kcb = match b {
            Source::Pack(_) => KC,
            Source::Packed(_, _, kc) => kc,
        };
        let mut bpack = match b {
            Source::Pack(_) => vec![0u32; KC * NC.min((j1 - j0).div_ceil(NR) * NR)],
            Source::Packed(..) => Vec::new(),
        };
        let mut rows_of_a = RowsOfA::new(a, k, kcb);
        let m = i1 - i0;
        for jc in (j0..j1).step_by(NC) {
            let nc = NC.min(j1 - jc);
            for pc in (0..kp).step_by(kcb) {
                let kc = kcb.min(kp - pc);
                // This (k block, column block)'s panels: panel p at p * NR * kc.
                let panels = match b {
                    Source::Pack(b) => {
                        pack_b(b, k, (pc, kc, kc), jc, nc, &mut bpack);
                        bpack.as_ptr()
                    }
                    Source::Packed(words, total, _) => {
                        debug_assert!(words.len() >= (pc + kc) * total * NR);
                        words.as_ptr().add(pc * total * NR + jc * kc)
                    }
                };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    rows_of_a.pack(i0 + ic, mc, pc, kc);
                    let add = accumulate || pc > 0;
                    for ir in (0..mc).step_by(MR) {
                        let rows = MR.min(mc - ir);
                        let (arows, astep) = rows_of_a.tile(i0 + ic, ir, rows, pc, kc);
                        for jr in (0..nc).step_by(NR) {
                            let cols = NR.min(nc - jr);
                            let bp = panels.add(jr * kc);
                            let cp = c.add((i0 + ic + ir) * ldc + jc + jr);
                            let base = if add { Base::Rows(cp, ldc) } else { Base::Zero };
                            let dst = Dst::F32(cp, ldc);
                            tile_for(kc, (&arows, astep), bp, (base, dst), rows, cols);
                        }
                    }
                }
            }
        }
    }

    /// Columns of C per block of [`block_bf16`]: its partial sums (MC x NCF f32, 256 KiB) and a
    /// k block of B's panels (at most 192 pairs x NCF words, 384 KiB) share L2.
    const NCF: usize = 512;

    /// out[i0..i1, j0..j1] = round(A[i0..i1, :] x B[:, j0..j1] + start[i0..i1, j0..j1]) for
    /// prepacked panels (words, column panels, k-pairs per block): each block of C (MC x NCF)
    /// takes all its k blocks in turn, the partial sums of all but the last in a buffer of one
    /// block, the last block's tiles adding them and rounding once into `out`. The sums are
    /// those of [`block`] into a C that starts from the bias plus the residual, in the same order.
    /// With `geglu` (B from [`super::PackedB::for_geglu`], no residual) each panel's two halves
    /// are the value and gate sums of 16 outputs, and `out` gets their GEGLU: columns j0 / 2 ..
    /// j1 / 2.
    ///
    /// # Safety
    /// `out` points at a bf16 matrix of row stride ldo whose block [i0, i1) x [j0, j1) (with
    /// `geglu`: [j0 / 2, j1 / 2), and j1 a multiple of NR) this call alone writes; the panels
    /// cover k x j1 of B with j0 a multiple of NR; the bias holds j1 values and the residual i1
    /// rows of j1; the CPU has AVX512-BF16.
    pub(super) unsafe fn block_bf16(
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        k: usize,
        a: Matrix<'_, bf16>,
        (words, total, kcb): (&[u32], usize, usize),
        start: super::Start<'_>,
        (out, ldo, geglu): (*mut bf16, usize, bool),
    ) {
        let kp = k.div_ceil(2);
        debug_assert!(words.len() >= kp * total * NR);
        PARTIAL.with_borrow_mut(|partial| {
            if kp > kcb && partial.len() < MC * NCF {
                partial.resize(MC * NCF, 0.0);
            }
            let mut rows_of_a = RowsOfA::new(a, k, kcb);
            let m = i1 - i0;
            for jc in (j0..j1).step_by(NCF) {
                let nc = NCF.min(j1 - jc);
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    for pc in (0..kp).step_by(kcb) {
                        let kc = kcb.min(kp - pc);
                        let (first, last) = (pc == 0, pc + kc == kp);
                        let panels = words.as_ptr().add(pc * total * NR + jc * kc);
                        rows_of_a.pack(i0 + ic, mc, pc, kc);
                        for ir in (0..mc).step_by(MR) {
                            let rows = MR.min(mc - ir);
                            let (arows, astep) = rows_of_a.tile(i0 + ic, ir, rows, pc, kc);
                            for jr in (0..nc).step_by(NR) {
                                let cols = NR.min(nc - jr);
                                let bp = panels.add(jr * kc);
                                // (Used only when there are several k blocks, and then in bounds.)
                                let part = partial.as_mut_ptr().wrapping_add(ir * NCF + jr);
                                let bias = start.bias.map(|b| b.as_ptr().add(jc + jr));
                                let base = match (bias, start.residual) {
                                    _ if !first => Base::Rows(part, NCF),
                                    (bias, Some((r, ldr))) => {
                                        let at = (i0 + ic + ir) * ldr + jc + jr;
                                        Base::RowAndResidual(bias, r.as_ptr().add(at), ldr)
                                    }
                                    (Some(b), None) => Base::Row(b),
                                    (None, None) => Base::Zero,
                                };
                                let row = (i0 + ic + ir) * ldo;
                                let dst = if last && geglu {
                                    // Panel (jc + jr) / NR: outputs 16 per panel.
                                    Dst::Geglu(out.add(row + (jc + jr) / 2), ldo)
                                } else if last {
                                    Dst::Bf16(out.add(row + jc + jr), ldo)
                                } else {
                                    Dst::F32(part, NCF)
                                };
                                tile_for(kc, (&arows, astep), bp, (base, dst), rows, cols);
                            }
                        }
                    }
                }
            }
        })
    }

    thread_local! {
        /// [`block_bf16`]'s partial sums (MC x NCF f32), kept by each thread between calls: a
        /// fresh zeroed 256 KiB buffer a call was 64 page faults a call and thread (no value is
        /// read before the first k block writes it, so a reused one needs no clearing).
        static PARTIAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A's rows as the tiles read them: k-pair words where A lies (its rows contiguous with an
    /// even k), else packed one block of rows and k at a time into panels of MR rows.
    struct RowsOfA<'a> {
        a: Matrix<'a, bf16>,
        k: usize,
        direct: bool,
        packed: Vec<u32>,
        /// What rows past the end read.
        zeros: Vec<u32>,
    }

    impl<'a> RowsOfA<'a> {
        /// For k blocks of at most `kcb` pairs.
        fn new(a: Matrix<'a, bf16>, k: usize, kcb: usize) -> Self {
            let direct = a.cs == 1 && k.is_multiple_of(2);
            Self {
                a,
                k,
                direct,
                packed: if direct {
                    Vec::new()
                } else {
                    vec![0; kcb * MC]
                },
                zeros: vec![0; kcb],
            }
        }

        /// Readies rows [i0, i0 + mc) x k-pairs [pc, pc + kc) (packs them unless direct).
        fn pack(&mut self, i0: usize, mc: usize, pc: usize, kc: usize) {
            if !self.direct {
                pack_a(self.a, self.k, i0, mc, pc, kc, &mut self.packed);
            }
        }

        /// The k-pair words of the tile of `rows` rows from row ir of the block readied at row
        /// i0 (pairs pc..pc + kc): one word apart where A lies, MR apart in a packed panel; rows
        /// past the end read zeros.
        ///
        /// # Safety
        /// The block was readied with [`Self::pack`] for these i0, pc and kc, and holds row
        /// ir + rows.
        unsafe fn tile(
            &self,
            i0: usize,
            ir: usize,
            rows: usize,
            pc: usize,
            kc: usize,
        ) -> ([*const u32; MR], usize) {
            if self.direct {
                let mut p = [self.zeros.as_ptr(); MR];
                for (r, row) in p.iter_mut().enumerate().take(rows) {
                    let at = (i0 + ir + r) * self.a.rs + 2 * pc;
                    *row = self.a.data.as_ptr().add(at).cast::<u32>();
                }
                (p, 1)
            } else {
                let base = self.packed.as_ptr().add(ir * kc);
                (std::array::from_fn(|r| base.add(r)), MR)
            }
        }
    }

    /// The k-pair word of A row `i` (pair `p`): element 2p in the low half, 2p + 1 (or zero past
    /// k) in the high.
    #[inline]
    pub(super) fn a_pair(a: Matrix<'_, bf16>, k: usize, i: usize, p: usize) -> u32 {
        let lo = a.at(i, 2 * p).to_bits() as u32;
        let hi = if 2 * p + 1 < k {
            a.at(i, 2 * p + 1).to_bits() as u32
        } else {
            0
        };
        lo | (hi << 16)
    }

    /// Packs rows [i0, i0 + mc) x k-pairs [p0, p0 + kc) of A into panels of MR rows: panel r holds,
    /// for each pair, MR words (zero for rows past the end).
    fn pack_a(
        a: Matrix<'_, bf16>,
        k: usize,
        i0: usize,
        mc: usize,
        p0: usize,
        kc: usize,
        out: &mut [u32],
    ) {
        for (panel, ir) in (0..mc).step_by(MR).enumerate() {
            let dst = &mut out[panel * MR * kc..(panel + 1) * MR * kc];
            for p in 0..kc {
                for r in 0..MR {
                    dst[p * MR + r] = if ir + r < mc {
                        a_pair(a, k, i0 + ir + r, p0 + p)
                    } else {
                        0
                    };
                }
            }
        }
    }

    /// `dst[j] = lo[j] | hi[j] << 16` (hi: 0 without `hi`) for a panel's NR columns: one k-pair's
    /// words, 16 at a time.
    ///
    /// # Safety
    /// `lo` (and `hi`) point at NR readable values, `dst` at NR writable words; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn interleave(lo: *const bf16, hi: Option<*const bf16>, dst: *mut u32) {
        for h in 0..NR / 16 {
            let l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.add(16 * h).cast()));
            let w = match hi {
                Some(hi) => {
                    let hv = _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.add(16 * h).cast()));
                    _mm512_or_si512(l, _mm512_slli_epi32::<16>(hv))
                }
                None => l,
            };
            _mm512_storeu_si512(dst.add(16 * h).cast(), w);
        }
    }

    /// Packs k-pairs [p0, p0 + kc) x columns [j0, j0 + nc) of B into panels of NR columns: panel c
    /// holds, for each pair, NR words (B[2p, j] low, B[2p + 1, j] high; zero past the ends), then
    /// zero words for pairs kc..kcp (`kcp` >= kc: the panel's length in pairs).
    pub(super) fn pack_b(
        b: Matrix<'_, bf16>,
        k: usize,
        (p0, kc, kcp): (usize, usize, usize),
        j0: usize,
        nc: usize,
        out: &mut [u32],
    ) {
        debug_assert!(kcp >= kc);
        for panel in 0..nc.div_ceil(NR) {
            out[panel * NR * kcp + kc * NR..(panel + 1) * NR * kcp].fill(0);
        }
        let bits = |v: &bf16| v.to_bits() as u32;
        if b.cs == 1 {
            // Rows of B are contiguous (an im2col matrix): read each pair of rows once, in
            // order, and deal its words out to the panels.
            for p in 0..kc {
                let k0 = 2 * (p0 + p);
                let r0 = &b.data[k0 * b.rs + j0..][..nc];
                let r1 = (k0 + 1 < k).then(|| &b.data[(k0 + 1) * b.rs + j0..][..nc]);
                for (panel, jr) in (0..nc).step_by(NR).enumerate() {
                    let cols = NR.min(nc - jr);
                    let d = &mut out[panel * NR * kcp + p * NR..][..NR];
                    if cols == NR {
                        let hi = r1.map(|r1| r1[jr..jr + NR].as_ptr());
                        // SAFETY: r0 (and r1) hold NR values from jr and d holds NR words
                        // (sliced just above); this module runs only on CPUs with AVX512-BF16,
                        // which have AVX-512F.
                        unsafe { interleave(r0[jr..jr + NR].as_ptr(), hi, d.as_mut_ptr()) };
                        continue;
                    }
                    let lo = &r0[jr..jr + cols];
                    match r1 {
                        Some(r1) => {
                            for ((word, lo), hi) in d.iter_mut().zip(lo).zip(&r1[jr..jr + cols]) {
                                *word = bits(lo) | (bits(hi) << 16);
                            }
                        }
                        None => {
                            for (word, lo) in d.iter_mut().zip(lo) {
                                *word = bits(lo);
                            }
                        }
                    }
                    d[cols..].fill(0);
                }
            }
            return;
        }
        for (panel, jr) in (0..nc).step_by(NR).enumerate() {
            let cols = NR.min(nc - jr);
            let dst = &mut out[panel * NR * kcp..][..NR * kc];
            if b.rs == 1 && k.is_multiple_of(2) {
                // B is a transposed row-major matrix (a linear layer's W^T): column j's k-pairs
                // are adjacent bf16 in W's row j, so each word is read as it lies.
                for j in 0..cols {
                    let col = &b.data[(j0 + jr + j) * b.cs + 2 * p0..][..2 * kc];
                    for (p, pair) in col.chunks_exact(2).enumerate() {
                        dst[p * NR + j] = bits(&pair[0]) | (bits(&pair[1]) << 16);
                    }
                }
                for p in 0..kc {
                    dst[p * NR + cols..(p + 1) * NR].fill(0);
                }
                continue;
            }
            for p in 0..kc {
                let k0 = 2 * (p0 + p);
                let d = &mut dst[p * NR..(p + 1) * NR];
                for (j, word) in d.iter_mut().enumerate().take(cols) {
                    let col = j0 + jr + j;
                    let lo = bits(&b.at(k0, col));
                    let hi = if k0 + 1 < k {
                        bits(&b.at(k0 + 1, col))
                    } else {
                        0
                    };
                    *word = lo | (hi << 16);
                }
                d[cols..].fill(0);
            }
        }
    }

    /// [`tile`] as wide as `cols` needs: one 256-bit register (at most 8 columns), one 512-bit
    /// register (16) or two.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline(always)]
    unsafe fn tile_for(
        kc: usize,
        (arows, astep): (&[*const u32; MR], usize),
        bp: *const u32,
        store: (Base, Dst),
        rows: usize,
        cols: usize,
    ) {
        if cols <= W256::LANES {
            tile::<W256, 1>(kc, arows, astep, bp, store, rows, cols);
        } else if cols <= W512::LANES {
            tile::<W512, 1>(kc, arows, astep, bp, store, rows, cols);
        } else {
            tile::<W512, 2>(kc, arows, astep, bp, store, rows, cols);
        }
    }

    /// What a tile's sums start from.
    #[derive(Clone, Copy)]
    pub(super) enum Base {
        /// Nothing: the sums are the results.
        Zero,
        /// One f32 per column, from the tile's first (a bias).
        Row(*const f32),
        /// The tile's f32 rows (the sums so far, or C to add to) with this row stride.
        Rows(*const f32, usize),
        /// One f32 per column (a bias, or none) plus the tile's bf16 rows with this row stride
        /// (a residual), added in f32 before the sums.
        RowAndResidual(Option<*const f32>, *const bf16, usize),
    }

    /// Where a tile's results go.
    #[derive(Clone, Copy)]
    pub(super) enum Dst {
        /// f32 rows with this row stride.
        F32(*mut f32, usize),
        /// bf16 rows with this row stride, each value rounded once as
        /// [`crate::kernels::convert::round`] rounds.
        Bf16(*mut bf16, usize),
        /// A whole panel's value (first register) and gate (second) sums of 16 outputs, whose
        /// GEGLU `value * gelu(gate)` goes to these 16 bf16 values a row (this row stride),
        /// rounded once.
        Geglu(*mut bf16, usize),
    }

    /// `v` rounded to bf16 as [`crate::kernels::convert::round`] rounds (nearest, ties to even;
    /// NaN made quiet), the 16 results in one 256-bit word.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round16(v: __m512) -> __m256i {
        let b = _mm512_castps_si512(v);
        let high = _mm512_srli_epi32::<16>(b);
        let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        let magnitude = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
    }

    /// The registers a tile's k loop runs in: 512 bits (16 columns each) or 256 bits (8).
    ///
    /// # Safety
    /// Each method needs AVX512-BF16 (with AVX-512BW and VL); `load` reads `LANES` words.
    pub(super) trait Width {
        /// Columns per register.
        const LANES: usize;
        /// A register of f32 sums.
        type Sums: Copy;
        /// A register of bf16 pairs.
        type Pairs: Copy;
        unsafe fn zero() -> Self::Sums;
        unsafe fn load(p: *const u32) -> Self::Pairs;
        unsafe fn splat(word: u32) -> Self::Pairs;
        unsafe fn dot(sums: Self::Sums, a: Self::Pairs, b: Self::Pairs) -> Self::Sums;
        /// The sums as 16 lanes (the upper ones zero where there are 8), for [`store`].
        unsafe fn wide(sums: Self::Sums) -> __m512;
    }

    /// 16 columns per register.
    pub(super) struct W512;
    /// 8 columns per register: for a last panel of at most 8 columns (m9's attention at width
    /// 40 ends in one). On cores that split 512-bit operations in two (Zen 4) the 256-bit
    /// `vdpbf16ps` costs half as much, and the 16-lane tile did twice the work needed there.
    pub(super) struct W256;

    impl Width for W512 {
        const LANES: usize = 16;
        type Sums = __m512;
        type Pairs = __m512bh;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn load(p: *const u32) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn splat(word: u32) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word as i32))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn dot(sums: __m512, a: __m512bh, b: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(sums, a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn wide(sums: __m512) -> __m512 {
            sums
        }
    }

    impl Width for W256 {
        const LANES: usize = 8;
        type Sums = __m256;
        type Pairs = __m256bh;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn load(p: *const u32) -> __m256bh {
            std::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(p.cast()))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn splat(word: u32) -> __m256bh {
            std::mem::transmute::<__m256i, __m256bh>(_mm256_set1_epi32(word as i32))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn dot(sums: __m256, a: __m256bh, b: __m256bh) -> __m256 {
            _mm256_dpbf16_ps(sums, a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
        unsafe fn wide(sums: __m256) -> __m512 {
            _mm512_zextps256_ps512(sums)
        }
    }

    /// One MR x (H registers of `W::LANES` columns) tile of C over `kc` k-pairs (512 bits, H =
    /// 2: a whole panel; H = 1: its first 16 columns, for a last panel that has no more; 256
    /// bits, H = 1: its first 8): `rows` x `cols` of it are real (the rest is zero padding);
    /// each result is the sum plus its `base`, stored to `dst`. The products and sums of a
    /// column are the same, in the same order, at either width.
    ///
    /// # Safety
    /// Each `arows[r]` points at kc k-pair words `astep` words apart (possibly unaligned), `bp` at
    /// kc x NR words; the base and the destination hold `rows` rows of `cols <= W::LANES H`
    /// values (a `Row` base: `cols`) with their row strides; the CPU has AVX512-BF16 (with
    /// AVX-512BW and VL).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn tile<W: Width, const H: usize>(
        kc: usize,
        arows: &[*const u32; MR],
        astep: usize,
        bp: *const u32,
        (base, dst): (Base, Dst),
        rows: usize,
        cols: usize,
    ) {
        debug_assert!(cols <= W::LANES * H && 16 * H <= NR);
        let mut acc = [[W::zero(); H]; MR];
        for p in 0..kc {
            let b: [W::Pairs; H] = std::array::from_fn(|h| W::load(bp.add(p * NR + W::LANES * h)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = W::splat(arows[r].add(p * astep).read_unaligned());
                for (acc, b) in acc_r.iter_mut().zip(&b) {
                    *acc = W::dot(*acc, av, *b);
                }
            }
        }
        // (Loops, not `array::map`: LLVM left that out of line, a call with a copy through the
        // stack per tile, which made short k loops such as attention's much slower.)
        let mut wide = [[_mm512_setzero_ps(); H]; MR];
        for (wide, acc) in wide.iter_mut().zip(&acc) {
            for (wide, acc) in wide.iter_mut().zip(acc) {
                *wide = W::wide(*acc);
            }
        }
        if let Dst::Geglu(o, ldo) = dst {
            debug_assert!(cols == 16 * H);
            return store_geglu(&wide, base, (o, ldo), rows);
        }
        store::<H>(&wide, (base, dst), rows, cols);
    }

    /// Stores a tile's sums `acc` (see [`tile`]): kept out of line, so that the k loop keeps
    /// the sums in registers (with the stores inlined, LLVM wrote every sum back to the stack
    /// on every k-pair).
    ///
    /// # Safety
    /// As [`tile`] for the base and the destination.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store<const H: usize>(
        acc: &[[__m512; H]; MR],
        (base, dst): (Base, Dst),
        rows: usize,
        cols: usize,
    ) {
        // bf16 values (16, as 256 bits) widened to f32.
        let widen =
            |v: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)));
        if rows == MR && cols == 16 * H {
            // A whole tile: no masks, and each kind of store in a loop of its own.
            let base_at = |r: usize, h: usize| match base {
                Base::Zero => None,
                Base::Row(b) => Some(_mm512_loadu_ps(b.add(16 * h))),
                Base::Rows(c, ldc) => Some(_mm512_loadu_ps(c.add(r * ldc + 16 * h))),
                Base::RowAndResidual(b, res, ldr) => {
                    let res = widen(_mm256_loadu_si256(res.add(r * ldr + 16 * h).cast()));
                    Some(match b {
                        Some(b) => _mm512_add_ps(_mm512_loadu_ps(b.add(16 * h)), res),
                        None => res,
                    })
                }
            };
            match dst {
                Dst::F32(c, ldc) => {
                    for (r, acc_r) in acc.iter().enumerate() {
                        for (h, sum) in acc_r.iter().enumerate() {
                            let v = match base_at(r, h) {
                                Some(b) => _mm512_add_ps(*sum, b),
                                None => *sum,
                            };
                            _mm512_storeu_ps(c.add(r * ldc + 16 * h), v);
                        }
                    }
                }
                Dst::Bf16(o, ldo) => {
                    for (r, acc_r) in acc.iter().enumerate() {
                        for (h, sum) in acc_r.iter().enumerate() {
                            let v = match base_at(r, h) {
                                Some(b) => _mm512_add_ps(*sum, b),
                                None => *sum,
                            };
                            _mm256_storeu_si256(o.add(r * ldo + 16 * h).cast(), round16(v));
                        }
                    }
                }
                // (Taken by `store_geglu` in `tile`.)
                Dst::Geglu(..) => {}
            }
            return;
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (h, sum) in acc_r.iter().enumerate() {
                let c0 = 16 * h;
                if c0 >= cols {
                    break;
                }
                let mask = lanes(cols - c0);
                let v = match base {
                    Base::Zero => *sum,
                    Base::Row(b) => _mm512_add_ps(*sum, _mm512_maskz_loadu_ps(mask, b.add(c0))),
                    Base::Rows(c, ldc) => {
                        _mm512_add_ps(*sum, _mm512_maskz_loadu_ps(mask, c.add(r * ldc + c0)))
                    }
                    Base::RowAndResidual(b, res, ldr) => {
                        let at = res.add(r * ldr + c0).cast();
                        let res = widen(_mm256_maskz_loadu_epi16(mask, at));
                        let base = match b {
                            Some(b) => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, b.add(c0)), res),
                            None => res,
                        };
                        _mm512_add_ps(*sum, base)
                    }
                };
                match dst {
                    Dst::F32(c, ldc) => _mm512_mask_storeu_ps(c.add(r * ldc + c0), mask, v),
                    Dst::Bf16(o, ldo) => {
                        _mm256_mask_storeu_epi16(o.add(r * ldo + c0).cast(), mask, round16(v))
                    }
                    // (Taken by `store_geglu` in `tile`.)
                    Dst::Geglu(..) => {}
                }
            }
        }
    }

    /// [`store`] for a [`Dst::Geglu`] tile (a whole panel: `H` = 2): each row's
    /// `value * gelu(gate)` of its value (first) and gate (second) sums, each plus its base,
    /// rounded, to 16 bf16 values. Out of line, so that the activation's code and constants do not
    /// crowd the k loop of the tiles that store plainly (inlined there it made them slower).
    ///
    /// # Safety
    /// As [`tile`] for the base (32 values a row) and the destination (`rows` rows of 16 values).
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store_geglu<const H: usize>(
        acc: &[[__m512; H]; MR],
        base: Base,
        (o, ldo): (*mut bf16, usize),
        rows: usize,
    ) {
        debug_assert!(H == 2, "a GEGLU tile is a whole panel");
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let [mut value, mut gate] = [acc_r[0], acc_r[H - 1]];
            for (h, sum) in [&mut value, &mut gate].into_iter().enumerate() {
                let b = match base {
                    Base::Zero => continue,
                    Base::Row(b) => _mm512_loadu_ps(b.add(16 * h)),
                    Base::Rows(c, ldc) => _mm512_loadu_ps(c.add(r * ldc + 16 * h)),
                    Base::RowAndResidual(b, res, ldr) => {
                        let res = _mm256_loadu_si256(res.add(r * ldr + 16 * h).cast());
                        let res = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                            _mm512_cvtepu16_epi32(res),
                        ));
                        match b {
                            Some(b) => _mm512_add_ps(_mm512_loadu_ps(b.add(16 * h)), res),
                            None => res,
                        }
                    }
                };
                *sum = _mm512_add_ps(*sum, b);
            }
            let y = _mm512_mul_ps(value, crate::kernels::geglu::avx512::gelu16(gate));
            _mm256_storeu_si256(o.add(r * ldo).cast(), round16(y));
        }
    }
}

pub(crate) mod amx;

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in (-2, 2), rounded to bf16.
    fn values(n: usize, seed: u64) -> Vec<bf16> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
            })
            .collect()
    }

    /// A [m, k] and B [k, n] stored both ways: A row-major (row stride k + 3) or transposed ([k,
    /// m], row stride m + 1); B row-major ([k, n], stride n + 5) or transposed ([n, k], stride
    /// k + 1).
    struct Operands {
        a_rows: Vec<bf16>,
        a_cols: Vec<bf16>,
        b_rows: Vec<bf16>,
        b_cols: Vec<bf16>,
        dims: (usize, usize, usize),
    }

    impl Operands {
        fn new((m, n, k): (usize, usize, usize), seed: u64) -> Self {
            Self {
                a_rows: values(m * (k + 3), seed + 1 + m as u64),
                a_cols: values(k * (m + 1), seed + 2 + m as u64),
                b_rows: values(k * (n + 5), seed + 7 + n as u64),
                b_cols: values(n * (k + 1), seed + 8 + n as u64),
                dims: (m, n, k),
            }
        }

        /// A row-major and transposed.
        fn a(&self) -> [Matrix<'_, bf16>; 2] {
            let (m, _, k) = self.dims;
            views((&self.a_rows, k + 3), (&self.a_cols, m + 1))
        }

        /// B row-major and transposed.
        fn b(&self) -> [Matrix<'_, bf16>; 2] {
            let (_, n, k) = self.dims;
            views((&self.b_rows, n + 5), (&self.b_cols, k + 1))
        }
    }

    /// A matrix stored row-major (values, row stride) and stored transposed (values, column
    /// stride).
    fn views<'a>(
        (rows, rs): (&'a [bf16], usize),
        (cols, cs): (&'a [bf16], usize),
    ) -> [Matrix<'a, bf16>; 2] {
        let transposed = Matrix {
            data: cols,
            rs: 1,
            cs,
        };
        [Matrix::rows(rows, rs), transposed]
    }

    /// Checks `kernel` on an m x k by k x n product (strided views, each operand row-major or
    /// transposed, accumulate or not) against the f64 product of the same bf16 values.
    fn check(kernel: Bf16Kernel, m: usize, n: usize, k: usize, threads: usize) {
        check_impl(kernel, m, n, k, threads, false)
    }

    /// [`check`], or with `model` the AMX block through its scalar model of the tile instructions
    /// (on one thread; B is not prepacked there).
    fn check_impl(kernel: Bf16Kernel, m: usize, n: usize, k: usize, threads: usize, model: bool) {
        let ldc = n + 2;
        let operands = Operands::new((m, n, k), 0);
        let (a_views, b_views) = (operands.a(), operands.b());
        for (a, b) in [
            (a_views[0], b_views[0]),
            (a_views[1], b_views[1]),
            (a_views[0], b_views[1]),
        ] {
            // B packed per call, and packed once beforehand ([`PackedB`], on the same threads).
            let packed = PackedB::new(kernel, b, (k, n));
            for (accumulate, prepacked) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                if model && prepacked {
                    continue;
                }
                let start: Vec<f32> = values(m * ldc, 99).iter().map(|v| v.to_f32()).collect();
                let mut c = start.clone();
                if model {
                    // SAFETY: c holds m rows of ldc >= n; a is m x k and b k x n.
                    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                    unsafe {
                        amx::block::<true>((0, m), (0, n), k, a, b, c.as_mut_ptr(), ldc, accumulate)
                    };
                } else if prepacked {
                    gemm_bf16_packed(m, a, &packed, &mut c, ldc, accumulate, threads);
                } else {
                    gemm_bf16(kernel, (m, n, k), a, b, &mut c, ldc, accumulate, threads);
                }
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut size) = (0f64, 0f64);
                        for p in 0..k {
                            let t = a.at(i, p).to_f64() * b.at(p, j).to_f64();
                            exact += t;
                            size += t.abs();
                        }
                        if accumulate {
                            exact += start[i * ldc + j] as f64;
                            size += (start[i * ldc + j] as f64).abs();
                        }
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - exact).abs() <= 4e-6 * size + 1e-6,
                            "{kernel:?} {m}x{n}x{k} (a.cs {}, b.cs {}, accumulate {accumulate}, prepacked {prepacked}) at ({i}, {j}): {got} vs {exact}",
                            a.cs,
                            b.cs
                        );
                    }
                    // Columns past n are never written.
                    for j in n..ldc {
                        assert_eq!(c[i * ldc + j], start[i * ldc + j], "column {j} written");
                    }
                }
            }
        }
    }

    // Last panels of every width class: 1-8 columns (256-bit registers, `W256`), 9-16 (one
    // register), 17-32.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 1, 1),
        (3, 5, 7),
        (10, 45, 19),
        (8, 32, 2),
        (9, 33, 3),
        (17, 65, 257),
        (64, 100, 300),
        (130, 40, 520),
        (5, 1030, 33),
        (40, 2100, 64),
    ];

    #[test]
    fn portable_kernel_matches_the_exact_product() {
        for (m, n, k) in SHAPES {
            check(Bf16Kernel::Portable, m, n, k, 2);
        }
    }

    #[test]
    fn avx512_bf16_kernel_matches_the_exact_product() {
        if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
            eprintln!("skipped: this CPU lacks AVX512-BF16 (avx512bf16); only the portable kernel is tested");
            return;
        }
        for (m, n, k) in SHAPES {
            for threads in [1, 2, 3] {
                check(Bf16Kernel::Avx512Bf16, m, n, k, threads);
            }
        }
    }

    #[test]
    fn amx_kernel_matches_the_exact_product() {
        if !Bf16Kernel::Amx.supported() {
            eprintln!(
                "skipped: no usable AMX here (needs AMX-TILE and AMX-BF16 (amx_tile, amx_bf16), \
                 AVX512-BF16 and Linux's tile state); its scalar model is tested instead"
            );
            return;
        }
        for (m, n, k) in SHAPES {
            for threads in [1, 2, 3] {
                check(Bf16Kernel::Amx, m, n, k, threads);
            }
        }
    }

    /// The AMX block's packing, addressing, edges and accumulation on any CPU, with the tile
    /// instructions replaced by their scalar model.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn amx_block_model_matches_the_exact_product() {
        for (m, n, k) in SHAPES {
            check_impl(Bf16Kernel::Amx, m, n, k, 1, true);
        }
    }

    /// The bf16 output is, bit for bit, the rounding of the f32 product summed from the bias and
    /// residual (what a linear layer computed before: C = bias (+ residual), the packed product
    /// added, then rounded):
    /// edges in every dimension, one k block and several, several blocks of rows and of columns,
    /// A read where it lies and packed, B row-major and transposed, 1-3 threads, and values that
    /// make infinities and NaN.
    #[test]
    fn bf16_output_is_the_rounded_f32_product() {
        let mut shapes = SHAPES.to_vec();
        shapes.extend([(300, 700, 600), (130, 520, 384), (9, 40, 320), (16, 48, 2)]);
        for kernel in [Bf16Kernel::Portable, Bf16Kernel::detect()] {
            for &(m, n, k) in &shapes {
                let mut operands = Operands::new((m, n, k), 10 + k as u64);
                if m > 2 && k > 2 {
                    // A huge value (its products overflow to infinity) and a NaN.
                    operands.a_rows[k + 3] = bf16::MAX;
                    operands.a_rows[2 * (k + 3) + 1] = bf16::NAN;
                }
                let (a_views, b_views) = (operands.a(), operands.b());
                let bias: Vec<f32> = values(n, 15).iter().map(|v| v.to_f32() * 3.0).collect();
                // A residual with a row stride wider than n.
                let residual = values(m * (n + 1), 16);
                let residual = (&residual[..], n + 1);
                let starts = [
                    (Some(&bias[..]), None, 1),
                    (None, None, 2),
                    (Some(&bias[..]), None, 3),
                    (Some(&bias[..]), Some(residual), 2),
                    (None, Some(residual), 1),
                ];
                for (a, b) in [(a_views[0], b_views[1]), (a_views[1], b_views[0])] {
                    let packed = PackedB::new(kernel, b, (k, n));
                    for (bias, residual, threads) in starts {
                        let start = Start { bias, residual };
                        let mut c = start.rows(m, n);
                        let accumulate = bias.is_some() || residual.is_some();
                        gemm_bf16_packed(m, a, &packed, &mut c, n, accumulate, threads);
                        let ldo = n + 3;
                        let sentinel = bf16::from_f32(-7.0);
                        let mut out = vec![std::mem::MaybeUninit::new(sentinel); m * ldo];
                        gemm_bf16_packed_bf16(m, a, &packed, start, &mut out, ldo, threads);
                        // SAFETY: every value was initialised (the sentinel) before the call.
                        let out: Vec<bf16> = out
                            .into_iter()
                            .map(|v| unsafe { v.assume_init() })
                            .collect();
                        for i in 0..m {
                            for j in 0..n {
                                let want = crate::kernels::convert::round(c[i * n + j]);
                                assert_eq!(
                                    out[i * ldo + j].to_bits(),
                                    want.to_bits(),
                                    "{kernel:?} {m}x{n}x{k} (a.cs {}, bias {}, residual {}, {threads} threads) at ({i}, {j}): {} vs {want}",
                                    a.cs,
                                    bias.is_some(),
                                    residual.is_some(),
                                    out[i * ldo + j]
                                );
                            }
                            for j in n..ldo {
                                assert_eq!(out[i * ldo + j], sentinel, "column {j} written");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tiles' rounding to bf16 is `convert::round`'s, bit for bit, on every class of value:
    /// ties both ways, denormals, infinities, quiet and signalling NaN with payloads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_rounding_is_round() {
        if Bf16Kernel::detect() == Bf16Kernel::Portable {
            eprintln!(
                "skipped: this CPU lacks AVX512-BF16 (avx512bf16), whose tiles round this way"
            );
            return;
        }
        let mut bits: Vec<u32> = vec![
            0x3F80_8000,
            0x3F81_8000,
            0xBF80_8000,
            0x3F80_7FFF,
            0x3F80_8001,
            0x0000_0001,
            0x8000_8000,
            0x007F_FFFF,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0xFFC0_0000,
            0x7F80_0001,
            0x7FBF_FFFF,
            0xFF80_FFFF,
            0x7FFF_FFFF,
            0x0000_0000,
            0x8000_0000,
        ];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        bits.extend((0..4000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u32
        }));
        bits.resize(bits.len().next_multiple_of(16), 0x3F80_8000);
        for chunk in bits.chunks_exact(16) {
            let v: Vec<f32> = chunk.iter().map(|&b| f32::from_bits(b)).collect();
            let mut got = [0u16; 16];
            // SAFETY: this CPU has AVX512-BF16, hence AVX-512F; v holds 16 values, got 16.
            unsafe {
                use std::arch::x86_64::*;
                let r = avx512::round16(_mm512_loadu_ps(v.as_ptr()));
                _mm256_storeu_si256(got.as_mut_ptr().cast(), r);
            }
            for (g, v) in got.iter().zip(&v) {
                let want = crate::kernels::convert::round(*v).to_bits();
                assert_eq!(*g, want, "{:#010x}", v.to_bits());
            }
        }
    }

    /// The GEGLU product is the plain product (from the bias, into f32) followed by
    /// `round(value * gelu(gate))`, bit for bit: rows of part of a tile and several row blocks,
    /// k odd, one and several k blocks, the columns split between threads and not, with and
    /// without a bias, into a wider output whose other values are left alone.
    #[test]
    fn geglu_product_is_the_product_then_geglu() {
        let kernels = [Bf16Kernel::Portable, Bf16Kernel::detect()];
        for (m, k, h) in [
            (1, 2, 16),
            (7, 33, 16),
            (130, 320, 48),
            (20, 640, 64),
            (9, 0, 16),
        ] {
            let n = 2 * h;
            let a = values(m * k, 3 + m as u64);
            let b = values(k * n, 5 + k as u64);
            let bias: Vec<f32> = values(n, 11).iter().map(|v| v.to_f32()).collect();
            let (a, b) = (Matrix::rows(&a, k), Matrix::rows(&b, n));
            for (kernel, threads, with_bias) in kernels
                .into_iter()
                .flat_map(|kn| [(kn, 1, true), (kn, 2, true), (kn, 2, false)])
            {
                let bias = with_bias.then_some(&bias[..]);
                let mut c = Start {
                    bias,
                    residual: None,
                }
                .rows(m, n);
                let plain = PackedB::new(kernel, b, (k, n));
                gemm_bf16_packed(m, a, &plain, &mut c, n, bias.is_some(), threads);
                let packed = PackedB::for_geglu(kernel, b, (k, n)).unwrap();
                let ldo = h + 3;
                let sentinel = bf16::from_f32(-7.0);
                let mut out = vec![std::mem::MaybeUninit::new(sentinel); m * ldo];
                gemm_bf16_packed_geglu(m, a, &packed, bias, &mut out, ldo, threads);
                for (i, row) in out.chunks(ldo).enumerate() {
                    // SAFETY: every value was initialised (the sentinel, or written over).
                    let row: Vec<bf16> = row.iter().map(|v| unsafe { v.assume_init() }).collect();
                    for j in 0..h {
                        let (v, g) = (c[i * n + j], c[i * n + h + j]);
                        let want = crate::kernels::convert::round(v * super::super::geglu::gelu(g));
                        let what = format!("{kernel:?} {m}x{k}x{n} t{threads} ({i}, {j})");
                        assert_eq!(row[j].to_bits(), want.to_bits(), "{what}");
                    }
                    assert!(
                        row[h..].iter().all(|&v| v == sentinel),
                        "{kernel:?} {m}x{k}"
                    );
                }
            }
        }
        // Half-widths that are not a multiple of 16 have no GEGLU panels.
        let b = values(4 * 48, 1);
        assert!(PackedB::for_geglu(Bf16Kernel::detect(), Matrix::rows(&b, 48), (4, 48)).is_none());
        assert!(PackedB::for_geglu(Bf16Kernel::detect(), Matrix::rows(&b, 0), (4, 0)).is_none());
    }

    #[test]
    fn zero_k_clears_or_keeps_c() {
        for kernel in [Bf16Kernel::Portable, Bf16Kernel::detect()] {
            let mut c = vec![1.5f32; 6];
            for (accumulate, want) in [(true, 1.5), (false, 0.0)] {
                let (a, b) = (Matrix::rows(&[], 0), Matrix::rows(&[], 3));
                gemm_bf16(kernel, (2, 3, 0), a, b, &mut c, 3, accumulate, 1);
                assert_eq!(c, [want; 6], "accumulate {accumulate}");
                c.fill(1.5);
                gemm_bf16_packed(
                    2,
                    a,
                    &PackedB::new(kernel, b, (0, 3)),
                    &mut c,
                    3,
                    accumulate,
                    1,
                );
                assert_eq!(c, [want; 6], "prepacked, accumulate {accumulate}");
                c.fill(1.5);
            }
        }
    }

    /// GFLOP/s of the bf16 kernels and of gemm's f32 sgemm on the UNet's shapes, side by side
    /// (`cargo test --release --lib bf16_gemm_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn bf16_gemm_speed() {
        let threads = candle_core::utils::get_num_threads();
        // (what, m, n, k) of m18 at 512x512: a 3x3 conv at 64x64 (320 channels), at 16x16 (1280),
        // one im2col tile of the VAE decoder's 512-channel 128x128 convs, a transformer
        // projection, attention scores and values.
        let shapes = [
            ("conv3x3 320ch 64x64", 320, 4096, 2880),
            ("conv3x3 1280ch 16x16", 1280, 256, 11520),
            ("VAE conv3x3 512ch, 3 rows", 512, 384, 4608),
            ("linear 4096x320x1280", 4096, 1280, 320),
            ("attn QK^T 4096x4096x64", 4096, 4096, 64),
            ("attn PV 4096x64x4096", 4096, 64, 4096),
        ];
        println!("kernel: {}, {threads} threads", Bf16Kernel::detect().name());
        for (what, m, n, k) in shapes {
            let a = values(m * k, 3);
            let b = values(k * n, 5);
            let mut c = vec![0f32; m * n];
            let time = |f: &mut dyn FnMut()| crate::test_support::best_time(5, f);
            let flop = 2.0 * (m * n * k) as f64;
            let kernel = Bf16Kernel::detect();
            let t_bf16 = time(&mut || {
                gemm_bf16(
                    kernel,
                    (m, n, k),
                    Matrix::rows(&a, k),
                    Matrix::rows(&b, n),
                    &mut c,
                    n,
                    false,
                    threads,
                )
            });
            let (a32, b32): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|v| v.to_f32()).collect(),
                b.iter().map(|v| v.to_f32()).collect(),
            );
            let t_f32 = time(&mut || unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a32.as_ptr(),
                    1,
                    k as isize,
                    b32.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    crate::kernels::parallelism(),
                )
            });
            println!(
                "{what:28} bf16 {:7.1} GFLOP/s  f32 sgemm {:7.1} GFLOP/s  bf16/f32 time {:.2}x",
                flop / t_bf16 / 1e9,
                flop / t_f32 / 1e9,
                t_bf16 / t_f32
            );
        }
    }
}
