//! Fused attention (`softmax(q k^T * scale) v`) on the CPU, in f32 and in bf16.
//!
//! Each task is a block of query rows of one (batch, head): its scores (rows x M f32, in L2) go from
//! the first product through the softmax row kernel to the second product without leaving the
//! cache, and no score matrix larger than a block ever exists. The tasks run in parallel, each
//! product on one thread. Unfused, the scores of m18's 64x64 self-attention (4096 x 4096 per head)
//! were written, read, written and read again through memory.
//!
//! f32 (the default) is diffusers' attention. With AVX-512 its two products run this module's own
//! kernels (`avx512`): `k^T` packed once per head, `q k^T` and `p v` in register tiles that read q
//! and `v` where they lie; gemm's sgemm packed both operands again for every block of query rows,
//! which cost a quarter of the attention (the portable path, which every CPU without AVX-512 runs,
//! still uses it). The exponentials are left unnormalised and the product with `v` is divided by
//! each row's sum (one pass over the scores fewer). m18's 64x64 self-attention (2 x 8 heads, 4096 x
//! 4096, width 40) took 409 ms with sgemm and 287-304 ms with these kernels on a 2-vCPU Zen 4, where
//! each product alone runs at 87-92 % of the core's f32 peak (the rest is the softmax). bf16 computes
//! it as PyTorch's CPU scaled-dot-product attention does in bf16: the scores are bf16 products
//! summed in f32, the exponentials are f32 and rounded to bf16 for the product with `v`, which
//! again sums in f32 and is divided by the exponentials' f32 sum; the output is rounded once.
//!
//! The UNet's projections write each token's heads side by side ([B, N, H*D]); [`attend_tokens`]
//! reads and writes each head's rows there, one token stride apart, so no copy splits the heads
//! out or merges them back.
//!
//! Tested against the plain (unfused) attention of `models::attention` on the same values, this
//! CPU's kernels and the portable ones, on shapes whose widths and key counts end off the tiles.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm_bf16::{gemm_bf16_packed, Bf16Kernel, Matrix, PackedB};

/// Query rows per task (bf16; f32 scores take twice the cache per row, so half as many).
pub const ROWS: usize = 64;

/// softmax(q k^T * scale) v for f32 or bf16 `q` [.., N, D], `k` and `v` [.., M, D] with the same
/// leading dimensions and dtype, on the CPU; the result has `q`'s shape and dtype.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attend_with(q, k, v, scale, None, false)
}

/// [`attend`] for `heads` heads side by side in the features of the tokens, as the projections
/// write them: `q` [B, N, H*D], `k` and `v` [B, M, H*D], the result [B, N, H*D] (what the output
/// projection reads). Each head's rows are read and written where they lie (one row stride
/// apart), so no copy splits the heads out or merges them back (four passes over the tokens for
/// every attention, which were about 1.5 % of a UNet step).
pub fn attend_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    attend_with(q, k, v, scale, Some(heads), false)
}

/// [`attend`] (`heads`: [`attend_tokens`]) with the portable kernels when `portable` (the tests
/// run both on every machine).
fn attend_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    heads: Option<usize>,
    portable: bool,
) -> Result<Tensor> {
    let op = FusedAttention {
        scale: scale as f32,
        heads,
        portable,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// Whether [`attend`] takes these operands.
pub fn applies(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::BF16 | DType::F32) && q.rank() >= 2
}

struct FusedAttention {
    scale: f32,
    /// The heads side by side in the tokens' features ([`attend_tokens`]), or `None` for one
    /// head per leading index ([.., N, D]).
    heads: Option<usize>,
    /// gemm's sgemm for f32 and the portable bf16 kernel, whatever the CPU has.
    portable: bool,
}

/// Where the rows of each (image, head) of one operand lie: heads of `rows` rows of `d` values,
/// each head from `start(h)`, its rows `rs` apart.
#[derive(Clone, Copy, Debug)]
struct Heads {
    rows: usize,
    d: usize,
    /// Heads side by side in each token (`Some(H)`), or one after another.
    side_by_side: Option<usize>,
}

impl Heads {
    /// Elements between two rows of a head.
    fn rs(&self) -> usize {
        self.side_by_side.map_or(self.d, |h| h * self.d)
    }

    /// The first element of head `h`.
    fn start(&self, h: usize) -> usize {
        match self.side_by_side {
            None => h * self.rows * self.d,
            Some(per) => (h / per) * self.rows * per * self.d + (h % per) * self.d,
        }
    }

    /// Head `h`'s rows `r0..r0 + rows` of `data` (from the first's start to the last's end).
    fn rows_of<'a, T>(&self, data: &'a [T], h: usize, r0: usize, rows: usize) -> &'a [T] {
        if rows == 0 || self.d == 0 {
            return &[];
        }
        let from = self.start(h) + r0 * self.rs();
        &data[from..from + (rows - 1) * self.rs() + self.d]
    }
}

/// The element-specific parts of a task: the two products into f32, the softmax, the store.
trait Element: Copy + Send + Sync + 'static {
    /// Query rows per task.
    const ROWS: usize;
    /// One head's `k` and `v` as the products read them (bf16: packed once for all its tasks).
    type Head<'a>: Send + Sync;
    /// Per-task scratch (bf16 keeps its rounded probabilities there).
    type Scratch: Default + Send;
    fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [Self]>;
    /// `k` and `v`, each m x d with rows `rs` apart, for the portable kernels or this CPU's best.
    fn head<'a>(
        k: &'a [Self],
        v: &'a [Self],
        dims: (usize, usize),
        rs: usize,
        portable: bool,
    ) -> Self::Head<'a>;
    /// `scores` (rows x m) = q (rows x d, rows `qrs` apart) k^T.
    fn scores(
        dims: (usize, usize, usize),
        q: (&[Self], usize),
        head: &Self::Head<'_>,
        scores: &mut [f32],
    );
    /// The softmax of every row of `scores` (rows of m), times `scale`.
    fn probabilities(scores: &mut [f32], m: usize, scale: f32, scratch: &mut Self::Scratch);
    /// `acc` (rows x d) = probabilities (rows x m) v.
    fn weighted(
        dims: (usize, usize, usize),
        probs: &[f32],
        head: &Self::Head<'_>,
        acc: &mut [f32],
        scratch: &mut Self::Scratch,
    );
    /// One row of the result, into its place in the not yet written output.
    fn store(acc: &[f32], out: &mut [std::mem::MaybeUninit<Self>]);
    fn storage(out: Vec<Self>) -> CpuStorage;
}

/// An f32 head: `k` and `v` where they lie, and with AVX-512 `k^T` packed once into the
/// kernel's panels (gemm would pack it again for every block of query rows: a quarter of the
/// attention's time when measured).
struct F32Head<'a> {
    k: &'a [f32],
    v: &'a [f32],
    /// Elements between two rows of `k` and of `v`.
    rs: usize,
    /// `k^T` in panels of [`avx512::NR`] keys (AVX-512 only).
    #[cfg(target_arch = "x86_64")]
    kt: Option<Vec<f32>>,
}

/// Whether the f32 attention runs this module's AVX-512 kernels (else gemm's sgemm).
pub fn f32_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return "avx512";
    }
    "sgemm"
}

impl Element for f32 {
    const ROWS: usize = 32;
    type Head<'a> = F32Head<'a>;
    /// The reciprocals of the rows' sums of exponentials.
    type Scratch = Vec<f32>;
    fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("attention: {what} must be f32 like q");
        };
        super::contiguous(v, l, &format!("attention: {what}"))
    }
    fn head<'a>(
        k: &'a [f32],
        v: &'a [f32],
        (m, d): (usize, usize),
        rs: usize,
        portable: bool,
    ) -> F32Head<'a> {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (m, d, portable);
        F32Head {
            k,
            v,
            rs,
            #[cfg(target_arch = "x86_64")]
            kt: (!portable && avx512::available()).then(|| avx512::pack_kt(k, m, d, rs)),
        }
    }
    fn scores(
        (rows, m, d): (usize, usize, usize),
        (q, qrs): (&[f32], usize),
        h: &F32Head,
        scores: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Some(kt) = &h.kt {
            // SAFETY: kt was packed for this head's m x d keys on a CPU with AVX-512; q holds rows
            // of d, qrs apart, and scores rows x m values (the caller sized them).
            unsafe { avx512::scores((rows, m, d), (q, qrs), kt, scores) };
            return;
        }
        // k [M, D] read as its transpose: element (p, j) is k[j * rs + p].
        let none = gemm::Parallelism::None;
        let kt = (1, h.rs);
        super::sgemm((rows, m, d), scores, m, false, q, (qrs, 1), h.k, kt, none);
    }
    fn probabilities(scores: &mut [f32], m: usize, scale: f32, inv: &mut Vec<f32>) {
        // Unnormalised: the product with v is divided by each row's sum instead (one pass fewer
        // over the scores; the same numbers up to f32 rounding).
        inv.clear();
        for row in scores.chunks_mut(m.max(1)) {
            inv.push(super::softmax::softmax_row_unnormalised(row, scale));
        }
    }
    fn weighted(
        (rows, d, m): (usize, usize, usize),
        probs: &[f32],
        h: &F32Head,
        acc: &mut [f32],
        inv: &mut Vec<f32>,
    ) {
        value_product((rows, d, m), probs, h, acc);
        for (row, inv) in acc.chunks_mut(d.max(1)).zip(inv.iter()) {
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    fn store(acc: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        assert_eq!(acc.len(), out.len(), "attention: row lengths differ");
        for (o, &a) in out.iter_mut().zip(acc) {
            o.write(a);
        }
    }
    fn storage(out: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(out)
    }
}

/// `acc` (rows x d) = probs (rows x m) v (m x d) with this head's kernel.
fn value_product((rows, d, m): (usize, usize, usize), probs: &[f32], h: &F32Head, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if h.kt.is_some() {
        // SAFETY: the head was made on a CPU with AVX-512 (kt is Some); probs holds rows x m,
        // v m rows of d (rs apart) and acc rows x d values.
        unsafe { avx512::weighted((rows, m, d), probs, (h.v, h.rs), acc) };
        return;
    }
    let none = gemm::Parallelism::None;
    super::sgemm(
        (rows, d, m),
        acc,
        d,
        false,
        probs,
        (m, 1),
        h.v,
        (h.rs, 1),
        none,
    );
}

/// The f32 products of the attention with AVX-512F: `q k^T` from `k^T` packed once per head, and
/// `p v` reading `v` where it lies, each an 8-row tile of C in registers for its whole sum (gemm's
/// kernels repacked both operands for every block of query rows).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::kernels::lanes;
    use std::arch::x86_64::*;

    /// Keys per packed panel of `k^T` (two 16-lane registers).
    pub(super) const NR: usize = 32;
    /// Query rows per tile.
    const MR: usize = 8;
    /// Keys per block of the product with `v` (its rows stay in L1 for all the tiles of a task).
    const KB: usize = 256;

    /// Whether this CPU runs the kernels.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// `k^T` (k: m rows of d, `rs` apart) in panels of NR keys: panel t holds, for each feature
    /// p, the NR values k[t NR + j, p] (zero past m).
    pub(super) fn pack_kt(k: &[f32], m: usize, d: usize, rs: usize) -> Vec<f32> {
        let panels = m.div_ceil(NR);
        let mut out = vec![0f32; panels * d * NR];
        for (t, panel) in out.chunks_exact_mut(d * NR).enumerate() {
            for j in 0..NR.min(m - t * NR) {
                let key = &k[(t * NR + j) * rs..][..d];
                for (p, &v) in key.iter().enumerate() {
                    panel[p * NR + j] = v;
                }
            }
        }
        out
    }

    /// `scores` (rows x m) = q (rows x d, `qrs` apart) k^T, from the packed `kt`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` holds rows of d values `qrs` apart, `kt` the panels of m keys
    /// of width d, `scores` rows x m.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        (rows, m, d): (usize, usize, usize),
        (q, qrs): (&[f32], usize),
        kt: &[f32],
        scores: &mut [f32],
    ) {
        assert!(rows == 0 || q.len() >= (rows - 1) * qrs + d);
        assert!(scores.len() >= rows * m);
        assert!(kt.len() >= m.div_ceil(NR) * d * NR);
        let (q, s) = (q.as_ptr(), scores.as_mut_ptr());
        for (t, panel) in kt.chunks_exact(d * NR).take(m.div_ceil(NR)).enumerate() {
            let j0 = t * NR;
            let (m0, m1) = (lanes(m - j0), lanes((m - j0).saturating_sub(16)));
            for r0 in (0..rows).step_by(MR) {
                let n = MR.min(rows - r0);
                // Rows past the end repeat the last one (read, never stored).
                let qr: [*const f32; MR] =
                    std::array::from_fn(|r| q.add((r0 + r.min(n - 1)) * qrs));
                let mut acc = [[_mm512_setzero_ps(); 2]; MR];
                let b = panel.as_ptr();
                for p in 0..d {
                    let b0 = _mm512_loadu_ps(b.add(p * NR));
                    let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                    for (acc, qr) in acc.iter_mut().zip(&qr) {
                        let a = _mm512_set1_ps(*qr.add(p));
                        acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(n) {
                    let dst = s.add((r0 + r) * m + j0);
                    _mm512_mask_storeu_ps(dst, m0, acc[0]);
                    if m1 != 0 {
                        _mm512_mask_storeu_ps(dst.add(16), m1, acc[1]);
                    }
                }
            }
        }
    }

    /// `acc` (rows x d) = probs (rows x m) v (m rows of d, `vrs` apart).
    ///
    /// # Safety
    /// The CPU has AVX-512F and VL; `probs` holds rows x m values, `v` m rows of d `vrs` apart,
    /// `acc` rows x d.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn weighted(
        (rows, m, d): (usize, usize, usize),
        probs: &[f32],
        (v, vrs): (&[f32], usize),
        acc: &mut [f32],
    ) {
        assert!(probs.len() >= rows * m && acc.len() >= rows * d);
        assert!(m == 0 || v.len() >= (m - 1) * vrs + d);
        // Columns of the output in chunks of up to three 16-lane registers; a last chunk with 8
        // or fewer columns past its whole registers takes them in an 8-lane register (twice the
        // throughput of a 16-lane one on Zen 4: m18's width 40 is 16 + 16 + 8), one with 9 to 15
        // in one more (masked) 16-lane register.
        for c0 in (0..d).step_by(48) {
            let rest = (d - c0).min(48);
            let args = (rows, m, d, c0);
            let v = (v, vrs);
            match (rest / 16, rest % 16) {
                (0, _) if rest <= 8 => columns::<0, true>(args, probs, v, acc),
                (1, 1..=8) => columns::<1, true>(args, probs, v, acc),
                (2, 1..=8) => columns::<2, true>(args, probs, v, acc),
                _ => match rest.div_ceil(16) {
                    1 => columns::<1, false>(args, probs, v, acc),
                    2 => columns::<2, false>(args, probs, v, acc),
                    _ => columns::<3, false>(args, probs, v, acc),
                },
            }
        }
    }

    /// Columns [c0, c0 + 16 H (+ 8 with `HALF`)) (clipped to d) of `acc` = probs v, in blocks of
    /// KB keys.
    ///
    /// # Safety
    /// As [`weighted`].
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn columns<const H: usize, const HALF: bool>(
        (rows, m, d, c0): (usize, usize, usize, usize),
        probs: &[f32],
        (v, vrs): (&[f32], usize),
        acc: &mut [f32],
    ) {
        let masks: [__mmask16; H] = std::array::from_fn(|h| lanes((d - c0).saturating_sub(16 * h)));
        let half = lanes((d - c0).saturating_sub(16 * H).min(8)) as __mmask8;
        let (pp, vp, out) = (probs.as_ptr(), v.as_ptr().add(c0), acc.as_mut_ptr().add(c0));
        for k0 in (0..m).step_by(KB) {
            let k1 = (k0 + KB).min(m);
            for r0 in (0..rows).step_by(MR) {
                let n = MR.min(rows - r0);
                let pr: [*const f32; MR] = std::array::from_fn(|r| pp.add((r0 + r.min(n - 1)) * m));
                let mut sum = [[_mm512_setzero_ps(); H]; MR];
                let mut sum8 = [_mm256_setzero_ps(); MR];
                if k0 > 0 {
                    for r in 0..n {
                        let row = out.add((r0 + r) * d);
                        for (h, s) in sum[r].iter_mut().enumerate() {
                            *s = _mm512_maskz_loadu_ps(masks[h], row.add(16 * h));
                        }
                        if HALF {
                            sum8[r] = _mm256_maskz_loadu_ps(half, row.add(16 * H));
                        }
                    }
                }
                for p in k0..k1 {
                    let vrow = vp.add(p * vrs);
                    let b: [__m512; H] =
                        std::array::from_fn(|h| _mm512_maskz_loadu_ps(masks[h], vrow.add(16 * h)));
                    let b8 = if HALF {
                        _mm256_maskz_loadu_ps(half, vrow.add(16 * H))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for r in 0..MR {
                        let a = _mm512_set1_ps(*pr[r].add(p));
                        for (s, b) in sum[r].iter_mut().zip(&b) {
                            *s = _mm512_fmadd_ps(a, *b, *s);
                        }
                        if HALF {
                            let a8 = _mm512_castps512_ps256(a);
                            sum8[r] = _mm256_fmadd_ps(a8, b8, sum8[r]);
                        }
                    }
                }
                for r in 0..n {
                    let row = out.add((r0 + r) * d);
                    for (h, s) in sum[r].iter().enumerate() {
                        _mm512_mask_storeu_ps(row.add(16 * h), masks[h], *s);
                    }
                    if HALF {
                        _mm256_mask_storeu_ps(row.add(16 * H), half, sum8[r]);
                    }
                }
            }
        }
    }
}

/// A bf16 head: `k^T` and `v` packed for the bf16 kernel once, for all of the head's tasks.
struct Bf16Head {
    kt: PackedB,
    v: PackedB,
}

impl Element for bf16 {
    const ROWS: usize = ROWS;
    type Head<'a> = Bf16Head;
    /// The rows' unnormalised bf16 probabilities and the reciprocals of their sums.
    type Scratch = (Vec<bf16>, Vec<f32>);
    fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [bf16]> {
        let CpuStorage::BF16(v) = s else {
            candle_core::bail!("attention: {what} must be bf16 like q");
        };
        super::contiguous(v, l, &format!("attention: {what}"))
    }
    fn head(k: &[bf16], v: &[bf16], (m, d): (usize, usize), rs: usize, portable: bool) -> Bf16Head {
        let kernel = if portable {
            Bf16Kernel::Portable
        } else {
            Bf16Kernel::detect()
        };
        // k [M, D] read as its transpose (element (p, j) is k[j, p], rows rs apart).
        let kt = Matrix {
            data: k,
            rs: 1,
            cs: rs,
        };
        Bf16Head {
            kt: PackedB::new(kernel, kt, (d, m)),
            v: PackedB::new(kernel, Matrix::rows(v, rs), (m, d)),
        }
    }
    fn scores(
        (rows, m, _): (usize, usize, usize),
        (q, qrs): (&[bf16], usize),
        h: &Bf16Head,
        scores: &mut [f32],
    ) {
        gemm_bf16_packed(rows, Matrix::rows(q, qrs), &h.kt, scores, m, false, 1);
    }
    fn probabilities(scores: &mut [f32], m: usize, scale: f32, scratch: &mut Self::Scratch) {
        let (rounded, inv) = scratch;
        rounded.resize(scores.len(), bf16::ZERO);
        let m = m.max(1);
        inv.clear();
        for (row, out) in scores.chunks_mut(m).zip(rounded.chunks_mut(m)) {
            inv.push(super::softmax::softmax_row_bf16(row, scale, out));
        }
    }
    fn weighted(
        (rows, d, m): (usize, usize, usize),
        _: &[f32],
        h: &Bf16Head,
        acc: &mut [f32],
        (rounded, inv): &mut Self::Scratch,
    ) {
        gemm_bf16_packed(rows, Matrix::rows(rounded, m), &h.v, acc, d, false, 1);
        for (row, inv) in acc.chunks_mut(d.max(1)).zip(inv.iter()) {
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    fn store(acc: &[f32], out: &mut [std::mem::MaybeUninit<bf16>]) {
        super::convert::round_into_uninit(acc, out);
    }
    fn storage(out: Vec<bf16>) -> CpuStorage {
        CpuStorage::BF16(out)
    }
}

impl FusedAttention {
    fn run<T: Element + Default>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            T::data(s1, l1, "q")?,
            T::data(s2, l2, "k")?,
            T::data(s3, l3, "v")?,
        );
        let (qd, kd) = (l1.shape().dims(), l2.shape().dims());
        let rank = qd.len();
        if rank < 2
            || kd.len() != rank
            || l3.shape().dims() != kd
            || qd[..rank - 2] != kd[..rank - 2]
            || qd[rank - 1] != kd[rank - 1]
        {
            candle_core::bail!("attention: q {qd:?} and k, v {kd:?} do not match");
        }
        let (n, m, width) = (qd[rank - 2], kd[rank - 2], qd[rank - 1]);
        let lead: usize = qd[..rank - 2].iter().product();
        let (count, d) = match self.heads {
            None => (lead, width),
            Some(h) if h > 0 && width % h == 0 => (lead * h, width / h),
            Some(h) => {
                candle_core::bail!("attention: {width} features do not split into {h} heads")
            }
        };
        let side_by_side = self.heads;
        let (qh, kh) = (
            Heads {
                rows: n,
                d,
                side_by_side,
            },
            Heads {
                rows: m,
                d,
                side_by_side,
            },
        );
        let packed: Vec<T::Head<'_>> = (0..count)
            .into_par_iter()
            .map(|h| {
                let (k, v) = (kh.rows_of(k, h, 0, m), kh.rows_of(v, h, 0, m));
                T::head(k, v, (m, d), kh.rs(), self.portable)
            })
            .collect();
        let tasks: Vec<(usize, usize)> = (0..count)
            .flat_map(|h| (0..n).step_by(T::ROWS).map(move |r| (h, r)))
            .collect();
        let scale = self.scale;
        let run = |out: &mut [std::mem::MaybeUninit<T>]| {
            let dst = super::SendPtr(out.as_mut_ptr());
            tasks.into_par_iter().for_each_init(
                || (Vec::<f32>::new(), Vec::<f32>::new(), T::Scratch::default()),
                |(scores, acc, scratch), (h, r0)| {
                    let rows = T::ROWS.min(n - r0);
                    let qrows = (qh.rows_of(q, h, r0, rows), qh.rs());
                    let head = &packed[h];
                    scores.resize(rows * m, 0.0);
                    T::scores((rows, m, d), qrows, head, scores);
                    T::probabilities(scores, m, scale, scratch);
                    acc.resize(rows * d, 0.0);
                    T::weighted((rows, d, m), scores, head, acc, scratch);
                    for (r, acc) in acc.chunks_exact(d.max(1)).enumerate().take(rows) {
                        // SAFETY: row r0 + r of head h (d values from its start) is this task's
                        // alone, inside `out` (laid out as q).
                        let o = unsafe {
                            let at = qh.start(h) + (r0 + r) * qh.rs();
                            std::slice::from_raw_parts_mut(dst.get().add(at), d)
                        };
                        T::store(acc, o);
                    }
                },
            );
        };
        // SAFETY: the tasks store every row of every head (count heads x n rows x d values, laid
        // out as q: lead x n x width in all), so `run` writes each element; zeroing it first
        // was single-threaded time with the other thread idle.
        let out = unsafe { super::convert::filled(lead * n * width, run) };
        Ok((T::storage(out), l1.shape().clone()))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "altdiff-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let operands = ((s1, l1), (s2, l2), (s3, l3));
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(operands.0, operands.1, operands.2),
            CpuStorage::BF16(_) => self.run::<bf16>(operands.0, operands.1, operands.2),
            _ => candle_core::bail!("attention: q must be f32 or bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], phase: f32) -> Tensor {
        crate::test_support::sine(shape, phase, 1.5)
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// (batch, heads, queries, keys, width): m18's widths 40, 80 and 160, and widths that end in
    /// a partial register of 8 lanes or fewer (4, 24, 100) or of more (12, 28), with query and key
    /// counts off the kernels' tiles.
    const SHAPES: [(usize, usize, usize, usize, usize); 9] = [
        (1, 1, 5, 7, 4),
        (1, 1, 9, 40, 12),
        (1, 1, 9, 40, 28),
        (2, 3, 130, 77, 64),
        (1, 2, 65, 200, 40),
        (1, 2, 33, 300, 80),
        (1, 1, 17, 50, 160),
        (1, 1, 9, 40, 24),
        (1, 1, 41, 33, 100),
    ];

    /// Against the f32 attention on the same bf16 values: within bf16 rounding of the
    /// probabilities and the output, this CPU's kernel and the portable one.
    #[test]
    fn matches_f32_attention_of_the_same_values() {
        for ((b, h, n, m, d), portable) in SHAPES.into_iter().flat_map(|s| [(s, false), (s, true)])
        {
            let (q, k, v) = (
                t(&[b, h, n, d], 0.1),
                t(&[b, h, m, d], 0.7),
                t(&[b, h, m, d], 1.9),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend_with(&q, &k, &v, scale, None, portable).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            assert_eq!(got.dims(), q.dims());
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let want = crate::models::attention::attend_blocked(
                &f32(&q),
                &f32(&k),
                &f32(&v),
                scale,
                1 << 20,
            )
            .unwrap();
            let diff = crate::test_support::max_abs_diff(&f32(&got), &want);
            // |v| <= 1.5: the output is a convex combination of v, rounded to bf16 twice.
            assert!(diff < 0.02, "{b}x{h}x{n}x{m}x{d}: {diff}");
        }
    }

    /// f32, this CPU's kernels and the portable ones: the same numbers as the unfused attention,
    /// up to the order of the sums.
    #[test]
    fn f32_matches_unfused_attention() {
        let f32 = |x: Tensor| x.to_dtype(DType::F32).unwrap();
        println!("f32 attention kernel: {}", f32_kernel());
        for ((b, h, n, m, d), portable) in SHAPES.into_iter().flat_map(|s| [(s, false), (s, true)])
        {
            let (q, k, v) = (
                f32(t(&[b, h, n, d], 0.1)),
                f32(t(&[b, h, m, d], 0.7)),
                f32(t(&[b, h, m, d], 1.9)),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend_with(&q, &k, &v, scale, None, portable).unwrap();
            assert_eq!((got.dtype(), got.dims()), (DType::F32, q.dims()));
            let want =
                crate::models::attention::attend_blocked(&q, &k, &v, scale, 1 << 20).unwrap();
            let diff = crate::test_support::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "{b}x{h}x{n}x{m}x{d} portable {portable}: {diff}"
            );
        }
        // Mixed dtypes are an error, not a reinterpretation.
        let q = f32(t(&[1, 1, 4, 8], 0.0));
        assert!(attend(&q, &t(&[1, 1, 4, 8], 0.0), &t(&[1, 1, 4, 8], 0.0), 1.0).is_err());
    }

    /// Heads side by side in the tokens ([B, N, H*D]) give the values of the same heads split
    /// out ([B, H, N, D]): bit for bit with this CPU's kernels (the same operations on the same
    /// values), within f32 rounding with the portable ones; a width that does not split into the
    /// heads is an error.
    #[test]
    fn heads_in_the_tokens_are_the_split_heads() {
        for ((b, h, n, m, d), portable) in SHAPES.into_iter().flat_map(|s| [(s, false), (s, true)])
        {
            let tokens = |rows: usize, phase: f32| t(&[b, rows, h * d], phase);
            let split = |x: &Tensor, rows: usize| {
                x.reshape((b, rows, h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (tokens(n, 0.1), tokens(m, 0.7), tokens(m, 1.9));
            let scale = 1.0 / (d as f64).sqrt();
            for dtype in [DType::BF16, DType::F32] {
                let c = |x: &Tensor| x.to_dtype(dtype).unwrap();
                let (q, k, v) = (c(&q), c(&k), c(&v));
                let got = attend_with(&q, &k, &v, scale, Some(h), portable).unwrap();
                assert_eq!((got.dtype(), got.dims()), (dtype, q.dims()));
                let (qs, ks, vs) = (split(&q, n), split(&k, m), split(&v, m));
                let want = attend_with(&qs, &ks, &vs, scale, None, portable)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, n, h * d))
                    .unwrap();
                let f32s = |x: &Tensor| {
                    let x = x.to_dtype(DType::F32).unwrap();
                    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                let shape = (b, h, n, m, d);
                if portable && dtype == DType::F32 {
                    let diff = crate::test_support::max_abs_diff(&got, &want);
                    assert!(diff < 1e-6, "{shape:?} {dtype:?}: {diff}");
                } else {
                    assert_eq!(f32s(&got), f32s(&want), "{shape:?} {dtype:?} {portable}");
                }
            }
        }
        let x = t(&[1, 4, 10], 0.0);
        assert!(attend_tokens(&x, &x, &x, 3, 1.0).is_err());
        assert!(attend_tokens(&x, &x, &x, 0, 1.0).is_err());
    }

    /// Time of m18's and m9's 64x64 self-attention with guidance (4096 x 4096 per head) in bf16
    /// and f32 (`cargo test --release --lib attention_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn attention_speed() {
        let time = crate::test_support::best_time;
        // m18 (5 heads of 64 at 320 channels) and m9 (8 heads of 40).
        for (heads, d) in [(5, 64), (8, 40)] {
            let (q, k, v) = (
                t(&[2, heads, 4096, d], 0.1),
                t(&[2, heads, 4096, d], 0.7),
                t(&[2, heads, 4096, d], 1.9),
            );
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let (q32, k32, v32) = (f32(&q), f32(&k), f32(&v));
            let scale = 1.0 / (d as f64).sqrt();
            let bf = time(5, &mut || drop(attend(&q, &k, &v, scale).unwrap()));
            let fl = time(5, &mut || drop(attend(&q32, &k32, &v32, scale).unwrap()));
            println!(
                "self-attention 2x{heads}x4096x4096x{d}: bf16 {:.1} ms, f32 {:.1} ms",
                bf * 1e3,
                fl * 1e3
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = t(&[1, 2, 4, 8], 0.0);
        assert!(attend(&q, &t(&[1, 2, 4, 6], 0.0), &t(&[1, 2, 4, 6], 0.0), 1.0).is_err());
        assert!(attend(&q, &t(&[1, 3, 4, 8], 0.0), &t(&[1, 3, 4, 8], 0.0), 1.0).is_err());
    }
}
