//! Fused attention (`softmax(q k^T * scale) v`) on the CPU, in f32 and in bf16.
//!
//! Each task is a block of query rows of one (batch, head): its scores (rows x M f32, in L2) go from
//! the first product through the softmax row kernel to the second product without leaving the
//! cache, and no score matrix larger than a block ever exists. The tasks run in parallel, each
//! product on one thread. Unfused, the scores of m18's 64x64 self-attention (4096 x 4096 per head)
//! were written, read, written and read again through memory.
//!
//! f32 (the default) is diffusers' attention with the products in gemm's f32 kernel; bf16 computes
//! it as PyTorch's CPU scaled-dot-product attention does in bf16: the scores are bf16 products
//! summed in f32, the exponentials are f32 and rounded to bf16 for the product with `v`, which
//! again sums in f32 and is divided by the exponentials' f32 sum; the output is rounded once.
//!
//! Tested against the plain (unfused) attention of `models::attention` on the same values.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm_bf16::{gemm_bf16_packed, Bf16Kernel, Matrix, PackedB};

/// Query rows per task (bf16; f32 scores take twice the cache per row, so half as many).
pub const ROWS: usize = 64;

/// softmax(q k^T * scale) v for f32 or bf16 `q` [.., N, D], `k` and `v` [.., M, D] with the same
/// leading dimensions and dtype, on the CPU; the result has `q`'s shape and dtype.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = FusedAttention {
        scale: scale as f32,
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
    /// `k` and `v`, each m x d.
    fn head<'a>(k: &'a [Self], v: &'a [Self], dims: (usize, usize)) -> Self::Head<'a>;
    /// `scores` (rows x m) = q (rows x d) k^T.
    fn scores(dims: (usize, usize, usize), q: &[Self], head: &Self::Head<'_>, scores: &mut [f32]);
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
    fn store(acc: &[f32], out: &mut [Self]);
    fn storage(out: Vec<Self>) -> CpuStorage;
}

/// An f32 head: `k` and `v` where they lie (gemm packs its own panels).
struct F32Head<'a> {
    k: &'a [f32],
    v: &'a [f32],
}

impl Element for f32 {
    const ROWS: usize = 32;
    type Head<'a> = F32Head<'a>;
    type Scratch = ();
    fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("attention: {what} must be f32 like q");
        };
        super::contiguous(v, l, &format!("attention: {what}"))
    }
    fn head<'a>(k: &'a [f32], v: &'a [f32], _: (usize, usize)) -> F32Head<'a> {
        F32Head { k, v }
    }
    fn scores((rows, m, d): (usize, usize, usize), q: &[f32], h: &F32Head, scores: &mut [f32]) {
        // k [M, D] read as its transpose: element (p, j) is k[j * d + p].
        let none = gemm::Parallelism::None;
        super::sgemm((rows, m, d), scores, m, false, q, (d, 1), h.k, (1, d), none);
    }
    fn probabilities(scores: &mut [f32], m: usize, scale: f32, _: &mut ()) {
        for row in scores.chunks_mut(m.max(1)) {
            super::softmax::softmax_row(row, scale);
        }
    }
    fn weighted(
        (rows, d, m): (usize, usize, usize),
        probs: &[f32],
        h: &F32Head,
        acc: &mut [f32],
        _: &mut (),
    ) {
        let none = gemm::Parallelism::None;
        super::sgemm(
            (rows, d, m),
            acc,
            d,
            false,
            probs,
            (m, 1),
            h.v,
            (d, 1),
            none,
        );
    }
    fn store(acc: &[f32], out: &mut [f32]) {
        out.copy_from_slice(acc);
    }
    fn storage(out: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(out)
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
    fn head(k: &[bf16], v: &[bf16], (m, d): (usize, usize)) -> Bf16Head {
        let kernel = Bf16Kernel::detect();
        // k [M, D] read as its transpose (element (p, j) is k[j, p]).
        let kt = Matrix {
            data: k,
            rs: 1,
            cs: d,
        };
        Bf16Head {
            kt: PackedB::new(kernel, kt, (d, m)),
            v: PackedB::new(kernel, Matrix::rows(v, d), (m, d)),
        }
    }
    fn scores((rows, m, d): (usize, usize, usize), q: &[bf16], h: &Bf16Head, scores: &mut [f32]) {
        gemm_bf16_packed(rows, Matrix::rows(q, d), &h.kt, scores, m, false);
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
        gemm_bf16_packed(rows, Matrix::rows(rounded, m), &h.v, acc, d, false);
        for (row, inv) in acc.chunks_mut(d.max(1)).zip(inv.iter()) {
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    fn store(acc: &[f32], out: &mut [bf16]) {
        super::convert::round_into(acc, out);
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
        {
            candle_core::bail!("attention: q {qd:?} and k, v {kd:?} do not match");
        }
        let (n, d) = (qd[rank - 2], qd[rank - 1]);
        let (m, kdim) = (kd[rank - 2], kd[rank - 1]);
        if kdim != d {
            candle_core::bail!("attention: q has {d} features, k {kdim}");
        }
        let heads: usize = qd[..rank - 2].iter().product();
        let mut out = vec![T::default(); heads * n * d];
        let packed: Vec<T::Head<'_>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let part = h * m * d..(h + 1) * m * d;
                T::head(&k[part.clone()], &v[part], (m, d))
            })
            .collect();
        let tasks: Vec<(usize, usize)> = (0..heads)
            .flat_map(|h| (0..n).step_by(T::ROWS).map(move |r| (h, r)))
            .collect();
        let dst = super::SendPtr(out.as_mut_ptr());
        let scale = self.scale;
        tasks.into_par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::<f32>::new(), T::Scratch::default()),
            |(scores, acc, scratch), (h, r0)| {
                let rows = T::ROWS.min(n - r0);
                let qh = &q[(h * n + r0) * d..(h * n + r0 + rows) * d];
                let head = &packed[h];
                scores.resize(rows * m, 0.0);
                T::scores((rows, m, d), qh, head, scores);
                T::probabilities(scores, m, scale, scratch);
                acc.resize(rows * d, 0.0);
                T::weighted((rows, d, m), scores, head, acc, scratch);
                // SAFETY: rows [r0, r0 + rows) of head h are this task's alone, inside `out`.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add((h * n + r0) * d), rows * d)
                };
                T::store(acc, o);
            },
        );
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
    use candle_core::Device;

    fn t(shape: &[usize], phase: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.377 + phase).sin() * 1.5)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// Against the f32 attention on the same bf16 values: within bf16 rounding of the
    /// probabilities and the output.
    #[test]
    fn matches_f32_attention_of_the_same_values() {
        for (b, h, n, m, d) in [(1, 1, 5, 7, 4), (2, 3, 130, 77, 64), (1, 2, 65, 200, 40)] {
            let (q, k, v) = (
                t(&[b, h, n, d], 0.1),
                t(&[b, h, m, d], 0.7),
                t(&[b, h, m, d], 1.9),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend(&q, &k, &v, scale).unwrap();
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

    /// f32: the same numbers as the unfused attention, up to the order of the sums.
    #[test]
    fn f32_matches_unfused_attention() {
        let f32 = |x: Tensor| x.to_dtype(DType::F32).unwrap();
        for (b, h, n, m, d) in [(1, 1, 5, 7, 4), (2, 3, 130, 77, 64), (1, 2, 65, 200, 40)] {
            let (q, k, v) = (
                f32(t(&[b, h, n, d], 0.1)),
                f32(t(&[b, h, m, d], 0.7)),
                f32(t(&[b, h, m, d], 1.9)),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend(&q, &k, &v, scale).unwrap();
            assert_eq!((got.dtype(), got.dims()), (DType::F32, q.dims()));
            let want =
                crate::models::attention::attend_blocked(&q, &k, &v, scale, 1 << 20).unwrap();
            let diff = crate::test_support::max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{b}x{h}x{n}x{m}x{d}: {diff}");
        }
        // Mixed dtypes are an error, not a reinterpretation.
        let q = f32(t(&[1, 1, 4, 8], 0.0));
        assert!(attend(&q, &t(&[1, 1, 4, 8], 0.0), &t(&[1, 1, 4, 8], 0.0), 1.0).is_err());
    }

    /// Time of m18's 64x64 self-attention with guidance (16 heads of 4096 x 4096, width 40) in
    /// bf16 and f32 (`cargo test --release --lib attention_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn attention_speed() {
        let (q, k, v) = (
            t(&[2, 8, 4096, 40], 0.1),
            t(&[2, 8, 4096, 40], 0.7),
            t(&[2, 8, 4096, 40], 1.9),
        );
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let (q32, k32, v32) = (f32(&q), f32(&k), f32(&v));
        let time = |f: &dyn Fn()| {
            f();
            let start = std::time::Instant::now();
            for _ in 0..3 {
                f();
            }
            start.elapsed().as_secs_f64() / 3.0
        };
        let scale = 1.0 / 40f64.sqrt();
        let bf = time(&|| drop(attend(&q, &k, &v, scale).unwrap()));
        let fl = time(&|| drop(attend(&q32, &k32, &v32, scale).unwrap()));
        println!(
            "self-attention 2x8x4096x4096x40: bf16 {:.1} ms, f32 {:.1} ms",
            bf * 1e3,
            fl * 1e3
        );
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = t(&[1, 2, 4, 8], 0.0);
        assert!(attend(&q, &t(&[1, 2, 4, 6], 0.0), &t(&[1, 2, 4, 6], 0.0), 1.0).is_err());
        assert!(attend(&q, &t(&[1, 3, 4, 8], 0.0), &t(&[1, 3, 4, 8], 0.0), 1.0).is_err());
    }
}
