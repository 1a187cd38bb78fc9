//! Attention (`softmax(q k^T * scale) v`) for bf16 on the CPU, as PyTorch's CPU scaled-dot-product
//! attention computes it in bf16: the scores are bf16 products summed in f32, the softmax is f32,
//! the probabilities are rounded to bf16 for the product with `v`, which again sums in f32; the
//! output is rounded once.
//!
//! Each task is a block of [`ROWS`] query rows of one (batch, head): its scores (ROWS x M f32, in
//! L2) go from [`super::gemm_bf16`] through the softmax row kernel to the second product without
//! leaving the cache, and no score matrix larger than a block ever exists. The tasks run in
//! parallel, each product on one thread.
//!
//! Tested against the f32 attention of `models::attention` on the same values.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm_bf16::{gemm_bf16, Bf16Kernel, Matrix};

/// Query rows per task.
pub const ROWS: usize = 64;

/// softmax(q k^T * scale) v for bf16 `q` [.., N, D], `k` and `v` [.., M, D] with the same leading
/// dimensions, on the CPU; the result has `q`'s shape, in bf16.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = AttentionBf16 {
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// Whether [`attend`] takes these operands.
pub fn applies(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::BF16 && q.rank() >= 2
}

struct AttentionBf16 {
    scale: f32,
}

fn bf16_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [bf16]> {
    let CpuStorage::BF16(v) = s else {
        candle_core::bail!("attention: {what} must be bf16");
    };
    super::contiguous(v, l, &format!("attention: {what}"))
}

impl CustomOp3 for AttentionBf16 {
    fn name(&self) -> &'static str {
        "altdiff-attention-bf16"
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
        let (q, k, v) = (
            bf16_data(s1, l1, "q")?,
            bf16_data(s2, l2, "k")?,
            bf16_data(s3, l3, "v")?,
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
        let mut out = vec![bf16::ZERO; heads * n * d];
        let tasks: Vec<(usize, usize)> = (0..heads)
            .flat_map(|h| (0..n).step_by(ROWS).map(move |r| (h, r)))
            .collect();
        let dst = super::SendPtr(out.as_mut_ptr());
        let kernel = Bf16Kernel::detect();
        let scale = self.scale;
        tasks.into_par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::<bf16>::new(), Vec::<f32>::new()),
            |(scores, probs, acc), (h, r0)| {
                let rows = ROWS.min(n - r0);
                let qh = &q[(h * n + r0) * d..(h * n + r0 + rows) * d];
                let kh = &k[h * m * d..(h + 1) * m * d];
                let vh = &v[h * m * d..(h + 1) * m * d];
                scores.resize(rows * m, 0.0);
                // scores = q k^T: k [M, D] read as its transpose (element (p, j) is k[j, p]).
                gemm_bf16(
                    kernel,
                    (rows, m, d),
                    Matrix::rows(qh, d),
                    Matrix {
                        data: kh,
                        rs: 1,
                        cs: d,
                    },
                    scores,
                    m,
                    false,
                    1,
                );
                for row in scores.chunks_mut(m) {
                    super::softmax::softmax_row(row, scale);
                }
                probs.clear();
                probs.extend(scores.iter().map(|&p| bf16::from_f32(p)));
                acc.resize(rows * d, 0.0);
                gemm_bf16(
                    kernel,
                    (rows, d, m),
                    Matrix::rows(probs, m),
                    Matrix::rows(vh, d),
                    acc,
                    d,
                    false,
                    1,
                );
                // SAFETY: rows [r0, r0 + rows) of head h are this task's alone, inside `out`.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add((h * n + r0) * d), rows * d)
                };
                for (o, a) in o.iter_mut().zip(acc.iter()) {
                    *o = bf16::from_f32(*a);
                }
            },
        );
        Ok((CpuStorage::BF16(out), l1.shape().clone()))
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
            let want =
                crate::models::attention::attend(&f32(&q), &f32(&k), &f32(&v), scale, 1 << 20)
                    .unwrap();
            let diff = crate::test_support::max_abs_diff(&f32(&got), &want);
            // |v| <= 1.5: the output is a convex combination of v, rounded to bf16 twice.
            assert!(diff < 0.02, "{b}x{h}x{n}x{m}x{d}: {diff}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = t(&[1, 2, 4, 8], 0.0);
        assert!(attend(&q, &t(&[1, 2, 4, 6], 0.0), &t(&[1, 2, 4, 6], 0.0), 1.0).is_err());
        assert!(attend(&q, &t(&[1, 3, 4, 8], 0.0), &t(&[1, 3, 4, 8], 0.0), 1.0).is_err());
    }
}
