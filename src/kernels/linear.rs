//! Linear layers (PyTorch's `nn.Linear`: `y = x W^T + b`, weight `[out, in]`) with a bf16 CPU path.
//!
//! candle 0.11 multiplies bf16 matrices on the CPU by widening both to f32 on every call, so
//! `--dtype bf16` would gain nothing in the transformer blocks. Here a bf16 input on the CPU goes
//! through [`super::gemm_bf16`] (bf16 products, f32 sums, the bias added in f32, one rounding), as
//! PyTorch's CPU autocast does; everything else (f32, GPUs) is candle-nn's `Linear`, which the tests
//! use as the reference.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::gemm_bf16::{gemm_bf16, Bf16Kernel, Matrix};

/// A linear layer with PyTorch's weight names (`weight` `[out, in]`, optional `bias` `[out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The bias in f32 for the bf16 kernel (added before rounding).
    bias_f32: Option<Vec<f32>>,
}

/// Loads `weight` and `bias` of an `in_dim -> out_dim` layer.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// Loads `weight` of an `in_dim -> out_dim` layer without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear_no_bias(in_dim, out_dim, vb)?)
}

impl Linear {
    /// Wraps candle-nn's layer.
    pub fn new(inner: candle_nn::Linear) -> Result<Self> {
        let fast = inner.weight().device().is_cpu() && inner.weight().dtype() == DType::BF16;
        let bias_f32 = match inner.bias() {
            Some(b) if fast => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self { inner, bias_f32 })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        if !(x.device().is_cpu() && x.dtype() == DType::BF16 && w.dtype() == DType::BF16) {
            return self.inner.forward(x);
        }
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            return self.inner.forward(x);
        };
        let m: usize = lead.iter().product();
        let op = LinearBf16 {
            bias: self.bias_f32.clone(),
        };
        let y = x
            .reshape((m, k))?
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &op)?;
        let mut shape = lead.to_vec();
        shape.push(w.dim(0)?);
        y.reshape(shape)
    }
}

/// `x [m, k] x w^T [k, n] + bias` for bf16 `x` and `w [n, k]`, into bf16.
struct LinearBf16 {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "altdiff-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(w)) = (s1, s2) else {
            candle_core::bail!("linear: the bf16 kernel takes bf16 input and weight");
        };
        let x = super::contiguous(x, l1, "linear: the input")?;
        let w = super::contiguous(w, l2, "linear: the weight")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: input has {k} features, the weight expects {wk}");
        }
        let mut out = match &self.bias {
            Some(b) if b.len() == n => b.repeat(m),
            Some(b) => candle_core::bail!("linear: bias of {} for {n} outputs", b.len()),
            None => vec![0f32; m * n],
        };
        gemm_bf16(
            Bf16Kernel::detect(),
            (m, n, k),
            Matrix::rows(x, k),
            // W^T: element (p, j) is w[j, p].
            Matrix {
                data: w,
                rs: 1,
                cs: k,
            },
            &mut out,
            n,
            self.bias.is_some(),
            candle_core::utils::get_num_threads(),
        );
        let out: Vec<half::bf16> = out.into_iter().map(half::bf16::from_f32).collect();
        Ok((CpuStorage::BF16(out), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(shape: &[usize], phase: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.61 + phase).sin() * 1.3) + 0.05)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The bf16 path against candle-nn's layer on the same bf16 values computed in f32.
    #[test]
    fn bf16_linear_matches_the_f32_product_of_the_same_values() {
        for (shape, out, bias) in [
            (vec![5, 7], 3, true),
            (vec![2, 77, 64], 96, true),
            (vec![2, 3, 10, 33], 40, false),
        ] {
            let k = *shape.last().unwrap();
            let x = tensor(&shape, 0.3).to_dtype(DType::BF16).unwrap();
            let w = tensor(&[out, k], 1.1).to_dtype(DType::BF16).unwrap();
            let b = bias.then(|| tensor(&[out], 2.0).to_dtype(DType::BF16).unwrap());
            let got = Linear::new(candle_nn::Linear::new(w.clone(), b.clone()))
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = candle_nn::Linear::new(f32(&w), b.as_ref().map(f32))
                .forward(&f32(&x))
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (
                f32(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (g, w) in got.iter().zip(&want) {
                // One bf16 rounding of the result (8 bits of mantissa) plus f32 sums.
                assert!(
                    (g - w).abs() <= 4e-3 * w.abs() + 1e-3 * k as f32 * 1e-2,
                    "{g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn f32_goes_through_candle_nn() {
        let x = tensor(&[4, 6], 0.0);
        let w = tensor(&[3, 6], 0.5);
        let ours = Linear::new(candle_nn::Linear::new(w.clone(), None))
            .unwrap()
            .forward(&x)
            .unwrap();
        let theirs = candle_nn::Linear::new(w, None).forward(&x).unwrap();
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}
