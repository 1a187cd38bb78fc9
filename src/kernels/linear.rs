//! Linear layers (PyTorch's `nn.Linear`: `y = x W^T + b`, weight `[out, in]`) with CPU kernels.
//!
//! candle 0.11 multiplies bf16 matrices on the CPU by widening both to f32 on every call, so
//! `--dtype bf16` would gain nothing in the transformer blocks; and for an f32 input [B, L, in] it
//! runs one gemm per batch row, each packing the whole weight again, then adds the bias in another
//! pass. Here, on the CPU, the input is one [B*L, in] matrix and one gemm starts from the bias: f32
//! through gemm's kernel, bf16 through [`super::gemm_bf16`] (bf16 products, f32 sums, the bias
//! added in f32, one rounding, as PyTorch's CPU autocast does). Other devices and dtypes use
//! candle-nn's `Linear`, which the tests use as the reference.
//!
//! On CPUs with AVX512-BF16 a bf16 layer packs W^T into the kernel's panels once, when it is
//! built, and keeps only the panels (as oneDNN's prepacked weights do): packing per call was 15 %
//! of the bf16 text encoder's time. The products are bit-identical to packing per call (tested).
//! Such a layer's tiles also add the bias and round their sums straight into the bf16 output
//! ([`super::gemm_bf16::gemm_bf16_packed_bf16`]): no f32 output is filled with the bias, summed
//! into and rounded in passes of its own, which had made m18's bf16 projections 16 % slower in the
//! UNet (1.73 -> 1.45 s a step, Zen 4, 2 threads); the same bits (tested).
//! A residual connection can join the bias as the products' starting value
//! ([`Linear::forward_add`]: a transformer block's branches, the text encoder's), so that it takes
//! no pass of its own (candle's bf16 add converted every value through a call that is not inlined:
//! with the head copies, 3-4 % of a bf16 UNet step) and bf16 rounds the sum once.
//! A transformer feed-forward's first layer is a [`GegluLinear`]: with packed weights, its tiles
//! also apply the GEGLU activation ([`super::gemm_bf16::gemm_bf16_packed_geglu`]).
//! The loader keeps no reference to the weight it handed over (`weights::var_builder`), so the
//! original is freed as soon as it is packed. AMX CPUs still pack per call (their tiles want
//! another padding).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::gemm_bf16::{
    gemm_bf16, gemm_bf16_packed_bf16, gemm_bf16_packed_geglu, Bf16Kernel, Matrix, PackedB, Start,
};

/// A linear layer with PyTorch's weight names (`weight` `[out, in]`, optional `bias` `[out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight `[out, in]` and bias; for the f32 CPU kernel the weight's square blocks are
    /// transposed in place (`blocks`), and only that kernel may read it.
    inner: candle_nn::Linear,
    /// The bias in f32 for the CPU kernels (bf16 adds it before rounding).
    bias_f32: Option<Vec<f32>>,
    /// f32 on the CPU: the side of the square blocks of the weight that were transposed at load.
    blocks: Option<usize>,
    /// bf16 on a CPU with AVX512-BF16: W^T in the kernel's panels, made once at load; `inner`
    /// then keeps an empty weight (the panels are the only copy).
    packed: Option<std::sync::Arc<PackedB>>,
}

/// The smallest block side worth transposing (smaller layers keep the strided read).
const MIN_BLOCK: usize = 64;

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
        let w = inner.weight();
        let fast = w.device().is_cpu() && matches!(w.dtype(), DType::BF16 | DType::F32);
        let bias_f32 = match inner.bias() {
            Some(b) if fast => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        // gemm reads W^T straight from W [out, in] only through a scalar transposing copy, which
        // took more time than the products for the text encoder's 77-row inputs (3x slower than a
        // row-major W^T, measured on its 1024 x 1024 and 1024 x 4096 layers). The transpose is made
        // once here, in place (a copy would double the layer's memory while loading): W is cut into
        // square blocks along its longer side, each transposed where it lies.
        let (n, k) = w.dims2()?;
        let side = n.min(k);
        let blocks = (fast
            && w.dtype() == DType::F32
            && w.is_contiguous()
            && side >= MIN_BLOCK
            && n.max(k) % side == 0)
            .then_some(side);
        if let Some(side) = blocks {
            w.inplace_op1(&TransposeBlocks { side })?;
        }
        let prepack = prepackable(w);
        Self::with(inner, bias_f32, blocks, prepack)
    }

    /// The layer, with a bf16 weight packed for the AVX512-BF16 kernel when `prepack` (the panels
    /// then replace the weight: packing per call cost 15 % of the bf16 text encoder's time).
    fn with(
        inner: candle_nn::Linear,
        bias_f32: Option<Vec<f32>>,
        blocks: Option<usize>,
        prepack: bool,
    ) -> Result<Self> {
        if !prepack {
            return Ok(Self {
                inner,
                bias_f32,
                blocks,
                packed: None,
            });
        }
        let (n, k) = inner.weight().dims2()?;
        let packed = packed_weight(inner.weight(), |wt| {
            PackedB::new(Bf16Kernel::Avx512Bf16, wt, (k, n))
        })?;
        Self::from_panels(inner, bias_f32, packed)
    }

    /// The layer through `packed` (its weight's panels), which replaces the weight.
    fn from_panels(
        inner: candle_nn::Linear,
        bias_f32: Option<Vec<f32>>,
        packed: PackedB,
    ) -> Result<Self> {
        let w = inner.weight();
        // The weight's shape without its values (the panels hold them).
        let empty = Tensor::zeros((w.dim(0)?, 0), DType::BF16, w.device())?;
        Ok(Self {
            inner: candle_nn::Linear::new(empty, inner.bias().cloned()),
            bias_f32,
            blocks: None,
            packed: Some(std::sync::Arc::new(packed)),
        })
    }
}

/// Whether the weight `w` is packed at load (by [`Linear`] and [`GegluLinear`]): bf16 on the CPU,
/// for the AVX512-BF16 kernel, and not the zero-strided placeholder of a shape check
/// (`weights::shape_checker`).
fn prepackable(w: &Tensor) -> bool {
    w.device().is_cpu()
        && w.dtype() == DType::BF16
        && w.is_contiguous()
        && Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16
}

/// `pack(W^T)` for a bf16 weight W [n, k] on the CPU, read where it lies (a copy would be one more
/// pass over fresh memory).
fn packed_weight<T>(w: &Tensor, pack: impl FnOnce(Matrix<'_, half::bf16>) -> T) -> Result<T> {
    let (_, k) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        candle_core::bail!("linear: a packed weight must be bf16 on the CPU");
    };
    // W^T: element (p, j) is w[j, p].
    Ok(pack(Matrix {
        data: super::contiguous(values, layout, "linear: the weight")?,
        rs: 1,
        cs: k,
    }))
}

/// diffusers' GEGLU projection (`ff.net.0.proj`, its outputs `[value, gate]`) with the activation:
/// `value * gelu(gate)`, the transformer feed-forward's first half. For bf16 on CPUs with
/// AVX512-BF16 the weight is packed once at load with each panel's value and gate columns side by
/// side, so the tiles apply GEGLU to their own sums ([`super::gemm_bf16::gemm_bf16_packed_geglu`]):
/// the projection's output, twice the activation's width, is never written and read back, and is
/// not rounded to bf16 on the way (PyTorch rounds it, so this is within a rounding of PyTorch's
/// result, and nearer the f32 one). Elsewhere the layer and [`super::geglu::geglu`] as two steps.
#[derive(Debug, Clone)]
pub struct GegluLinear {
    /// The projection; when `fused`, its panels are in GEGLU's column order (its bias in the
    /// layer's: the product reorders it, 2 x 1280 values a call at most), and only
    /// [`GegluLinear::forward`] may use it.
    linear: Linear,
    fused: bool,
}

/// Loads `weight` and `bias` of an `in_dim -> out_dim` GEGLU projection (`out_dim` = 2 x the
/// activation's width).
pub fn geglu_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<GegluLinear> {
    GegluLinear::new(candle_nn::linear(in_dim, out_dim, vb)?)
}

impl GegluLinear {
    /// Wraps candle-nn's layer.
    pub fn new(inner: candle_nn::Linear) -> Result<Self> {
        let w = inner.weight();
        let (n, k) = w.dims2()?;
        let packed = match prepackable(w) {
            true => packed_weight(w, |wt| {
                PackedB::for_geglu(Bf16Kernel::Avx512Bf16, wt, (k, n))
            })?,
            false => None,
        };
        let Some(packed) = packed else {
            return Ok(Self {
                linear: Linear::new(inner)?,
                fused: false,
            });
        };
        let bias_f32 = match inner.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            linear: Linear::from_panels(inner, bias_f32, packed)?,
            fused: true,
        })
    }

    /// Whether the tiles apply the activation (see the type).
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// `value * gelu(value's gate)` of the projection of `x` [.., in]: [.., out / 2].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.linear.packed {
            Some(packed) if self.fused => self.linear.forward_packed(x, packed, Output::Geglu),
            _ => super::geglu::geglu(&self.linear.forward(x)?),
        }
    }
}

/// Transposes, in place, the square `side` x `side` blocks of a row-major [n, k] matrix whose
/// longer dimension is a multiple of `side`: rows b*side.. (n > k) or columns b*side.. (n < k).
struct TransposeBlocks {
    side: usize,
}

impl candle_core::InplaceOp1 for TransposeBlocks {
    fn name(&self) -> &'static str {
        "altdiff-transpose-blocks"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (n, k) = layout.shape().dims2()?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("linear: only f32 weights are transposed");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("linear: the weight must be contiguous");
        };
        let s = self.side;
        // A weight that is a private map of its file (`alloc::mapped`) is transposed into fresh
        // memory instead: writing the map would copy each page on its first write, one fault and
        // one TLB-flush interrupt to the other cores per 4 KiB (measured: slower than the copy
        // the map saved).
        if crate::alloc::mapped::is_mapped(data.as_ptr().cast()) {
            if start == 0 && end == data.len() {
                *data = transposed(data, (n, k), s);
                return Ok(());
            }
            *data = data.to_vec();
        }
        let w = &mut data[start..end];
        // Block b starts at `origin(b)`; its rows are `k` apart.
        let origin = |b: usize| if n >= k { b * s * k } else { b * s };
        let ptr = super::SendPtr(w.as_mut_ptr());
        const TILE: usize = 32;
        let tiles = s.div_ceil(TILE);
        // One task per (block, tile row): tile (ti, tj >= ti) is swapped with tile (tj, ti), so the
        // tasks touch disjoint elements.
        (0..n.max(k) / s * tiles).into_par_iter().for_each(|task| {
            let (b, ti) = (task / tiles, task % tiles);
            let base = origin(b);
            for tj in ti..tiles {
                for i in ti * TILE..((ti + 1) * TILE).min(s) {
                    let j0 = if ti == tj { i + 1 } else { tj * TILE };
                    for j in j0..((tj + 1) * TILE).min(s) {
                        // SAFETY: (i, j) and (j, i) lie in block b (inside w), and only this task
                        // touches tile (ti, tj) and its mirror (tj, ti).
                        unsafe {
                            std::ptr::swap(
                                ptr.get().add(base + i * k + j),
                                ptr.get().add(base + j * k + i),
                            );
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// `w` (row-major [n, k]) with its `s` x `s` blocks transposed, as [`TransposeBlocks`] does in
/// place, written into a fresh buffer (write-only: its pages are never read before written).
///
/// When `s` is a multiple of 16 (every layer of the models), the copy goes by 16 x 16 tiles: 16
/// source lines read into a local tile, 16 output lines written from it. The element-by-element
/// copy it replaced (16 output rows a task, one value of each per source line) was 40-50 % of
/// the f32 load time (`perf`, m9 on the Zen 4 machine, 2026-12-07): a compare and branch per value
/// and every value stored alone.
fn transposed(w: &[f32], (n, k): (usize, usize), s: usize) -> Vec<f32> {
    // 16 output rows per task: each source read is then one cache line of 16 values.
    const ROWS: usize = 16;
    // Element (r, c) lies in block b at (i, j) and comes from (j, i) there: its source index is
    // column(c) + row(r). Both parts are worked out once per column and once per row (a division
    // per element took most of the f32 load time).
    let wide = n < k;
    let column: Vec<usize> = (0..k)
        .map(|c| if wide { c / s * s + c % s * k } else { c * k })
        .collect();
    let row = |r: usize| if wide { r } else { r / s * s * k + r % s };
    // With 16 | s a tile never straddles two blocks, so inside one, row(r0 + i) = row(r0) + i and
    // column(c0 + j) = column(c0) + j k (and n and k are multiples of 16 too).
    let tiled = s.is_multiple_of(ROWS);
    // Tiled, a task writes 64 output rows in 64 x 64 squares (its last may have fewer rows): each
    // square reads 64 source lines of 256 bytes, not 16 lines of 64 bytes (each line on its own
    // page, so the prefetchers had nothing to follow).
    let task_rows = if tiled { 4 * ROWS } else { ROWS };
    let fill = |out: &mut [std::mem::MaybeUninit<f32>]| {
        out.par_chunks_mut(task_rows * k)
            .enumerate()
            .for_each(|(t, rows)| {
                if tiled {
                    let mut tile = [[0f32; ROWS]; ROWS];
                    for c1 in (0..k).step_by(task_rows) {
                        for (g, rows) in rows.chunks_mut(ROWS * k).enumerate() {
                            let r0 = row(t * task_rows + g * ROWS);
                            for c0 in (c1..k.min(c1 + task_rows)).step_by(ROWS) {
                                // tile[j] = the source line of output column c0 + j, rows r0.. r0 + 16.
                                for (j, line) in tile.iter_mut().enumerate() {
                                    let at = column[c0] + j * k + r0;
                                    line.copy_from_slice(&w[at..at + ROWS]);
                                }
                                for (i, out) in rows.chunks_exact_mut(k).enumerate() {
                                    for (j, o) in out[c0..c0 + ROWS].iter_mut().enumerate() {
                                        o.write(tile[j][i]);
                                    }
                                }
                            }
                        }
                    }
                    return;
                }
                let mut at = [0usize; ROWS];
                let nr = rows.len() / k;
                for (dr, at) in at.iter_mut().enumerate().take(nr) {
                    *at = row(t * ROWS + dr);
                }
                for (c, &col) in column.iter().enumerate() {
                    for (dr, &at) in at.iter().enumerate().take(nr) {
                        rows[dr * k + c].write(w[col + at]);
                    }
                }
            })
    };
    // SAFETY: the chunks cover the output, and each task writes all nr x k elements of its chunk
    // (tiled: its rows are a multiple of 16, since 16 | n, and the tiles cover its k columns,
    // since 16 | k).
    unsafe { super::convert::filled(w.len(), fill) }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }
}

/// A residual's values where they lie (contiguous, on the CPU).
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl Linear {
    /// `self.forward(x) + residual` (`residual` shaped as the output: a transformer block's
    /// input). On the CPU kernels the residual joins the bias as the products' starting value:
    /// no pass of its own, and in bf16 one rounding of `products + bias + residual` where
    /// diffusers rounds the layer's output and then the sum (so within a rounding of it; f32:
    /// the same sum in another order, within an ulp).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let fused = x.device().is_cpu()
            && residual.device().is_cpu()
            && residual.dtype() == x.dtype()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
            && x.dims().split_last().map(|(_, lead)| lead)
                == residual.dims().split_last().map(|(_, lead)| lead)
            && residual.dims().last() == Some(&self.out_dim()?)
            && (self.packed.is_some() || self.inner.weight().dtype() == x.dtype());
        if !fused {
            return self.forward(x)? + residual;
        }
        let residual = residual.contiguous()?;
        let (storage, layout) = residual.storage_and_layout();
        let values = match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                Values::F32(super::contiguous(v, layout, "linear: the residual")?)
            }
            candle_core::Storage::Cpu(CpuStorage::BF16(v)) => {
                Values::Bf16(super::contiguous(v, layout, "linear: the residual")?)
            }
            _ => candle_core::bail!("linear: the residual must be f32 or bf16 on the CPU"),
        };
        self.run(x, Some(values))
    }

    /// The number of outputs.
    fn out_dim(&self) -> Result<usize> {
        match &self.packed {
            Some(p) => Ok(p.dims().1),
            None => self.inner.weight().dim(0),
        }
    }

    /// The layer, plus `residual` (the output's shape and dtype, checked by the caller) when given.
    fn run(&self, x: &Tensor, residual: Option<Values<'_>>) -> Result<Tensor> {
        if let Some(packed) = &self.packed {
            return self.forward_packed(x, packed, Output::Linear(residual));
        }
        let w = self.inner.weight();
        let kernel = x.device().is_cpu()
            && x.dtype() == w.dtype()
            && matches!(w.dtype(), DType::BF16 | DType::F32);
        if !kernel && self.blocks.is_some() {
            candle_core::bail!(
                "linear: this layer's weights are laid out for f32 on the CPU, not {:?} on {:?}",
                x.dtype(),
                x.device()
            );
        }
        let dims = x.dims().to_vec();
        let (true, Some((&k, lead))) = (kernel, dims.split_last()) else {
            if residual.is_some() {
                // forward_add fuses only where the kernel runs (checked there).
                candle_core::bail!("linear: a residual for a layer without its CPU kernel");
            }
            return self.inner.forward(x);
        };
        let m: usize = lead.iter().product();
        let op = LinearOp {
            bias: self.bias_f32.as_deref(),
            blocks: self.blocks,
            residual,
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

/// What a packed layer's products become.
#[derive(Clone, Copy)]
enum Output<'a> {
    /// The layer's outputs, plus the residual when given.
    Linear(Option<Values<'a>>),
    /// Their GEGLU (a [`GegluLinear`]'s panels): half as many.
    Geglu,
}

impl Linear {
    /// The bf16 layer through its packed weight (bf16 input on the CPU only).
    fn forward_packed(&self, x: &Tensor, packed: &PackedB, output: Output<'_>) -> Result<Tensor> {
        let (k, n) = packed.dims();
        if !x.device().is_cpu() || x.dtype() != DType::BF16 {
            candle_core::bail!(
                "linear: this layer's weights are packed for bf16 on the CPU, not {:?} on {:?}",
                x.dtype(),
                x.device()
            );
        }
        let dims = x.dims().to_vec();
        match dims.split_last() {
            Some((&xk, lead)) if xk == k => {
                let m: usize = lead.iter().product();
                let (residual, geglu) = match output {
                    Output::Linear(None) => (None, false),
                    Output::Linear(Some(Values::Bf16(r))) => (Some(r), false),
                    Output::Linear(Some(Values::F32(_))) => {
                        candle_core::bail!("linear: an f32 residual for bf16")
                    }
                    Output::Geglu => (None, true),
                };
                let op = PackedLinearOp {
                    bias: self.bias_f32.as_deref(),
                    residual,
                    packed,
                    geglu,
                };
                let y = x.reshape((m, k))?.contiguous()?.apply_op1_no_bwd(&op)?;
                let mut shape = lead.to_vec();
                shape.push(if geglu { n / 2 } else { n });
                y.reshape(shape)
            }
            _ => candle_core::bail!("linear: input {dims:?} for a layer of {k} inputs"),
        }
    }
}

/// `x [m, k] x W^T + bias (+ residual [m, n])` for a bf16 `x` and a packed W^T [k, n], into bf16;
/// with `geglu` (a [`GegluLinear`]'s panels, no residual), its GEGLU [m, n / 2].
struct PackedLinearOp<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [half::bf16]>,
    packed: &'a PackedB,
    geglu: bool,
}

impl candle_core::CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "altdiff-linear-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let n = self.packed.dims().1;
        let CpuStorage::BF16(x) = s else {
            candle_core::bail!("linear: the input must be bf16 for a packed weight");
        };
        let x = super::contiguous(x, l, "linear: the input")?;
        if let Some(b) = self.bias.filter(|b| b.len() != n) {
            candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
        }
        if let Some(r) = self.residual.filter(|r| r.len() != m * n) {
            candle_core::bail!("linear: residual of {} for {m} x {n} outputs", r.len());
        }
        let threads = candle_core::utils::get_num_threads();
        if self.geglu {
            let h = n / 2;
            // SAFETY: the product writes every one of the m x h values (rows of h, ldo = h).
            let out = unsafe {
                super::convert::filled(m * h, |out| {
                    let a = Matrix::rows(x, k);
                    gemm_bf16_packed_geglu(m, a, self.packed, self.bias, out, h, threads)
                })
            };
            return Ok((CpuStorage::BF16(out), Shape::from((m, h))));
        }
        let start = Start {
            bias: self.bias,
            residual: self.residual.map(|r| (r, n)),
        };
        // SAFETY: the product writes every one of the m x n values (rows of n, ldo = n).
        let out = unsafe {
            super::convert::filled(m * n, |out| {
                gemm_bf16_packed_bf16(m, Matrix::rows(x, k), self.packed, start, out, n, threads)
            })
        };
        Ok((CpuStorage::BF16(out), Shape::from((m, n))))
    }
}

/// m rows of the bias (or zeros), plus the residual, the products' starting value.
fn initial_output(
    bias: Option<&[f32]>,
    residual: Option<Values<'_>>,
    m: usize,
    n: usize,
) -> Result<Vec<f32>> {
    let mut out = match bias {
        Some(b) if b.len() == n => b.repeat(m),
        Some(b) => candle_core::bail!("linear: bias of {} for {n} outputs", b.len()),
        None => vec![0f32; m * n],
    };
    // (Two plain loops: they vectorise, where one through a `dyn Iterator` made a call a value.)
    match residual {
        None => {}
        Some(Values::F32(r)) if r.len() == m * n => {
            out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
        }
        Some(Values::Bf16(r)) if r.len() == m * n => {
            out.iter_mut().zip(r).for_each(|(o, r)| *o += r.to_f32());
        }
        Some(_) => candle_core::bail!("linear: the residual does not hold {m} x {n} outputs"),
    }
    Ok(out)
}

/// `x [m, k] x w^T [k, n] + bias (+ residual [m, n])` for `x` and `w [n, k]` both f32 or both
/// bf16, into that dtype.
struct LinearOp<'a> {
    bias: Option<&'a [f32]>,
    /// The f32 weight's square blocks are transposed (see [`Linear::new`]).
    blocks: Option<usize>,
    residual: Option<Values<'a>>,
}

impl CustomOp2 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "altdiff-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: input has {k} features, the weight expects {wk}");
        }
        let mut out = initial_output(self.bias, self.residual, m, n)?;
        let start = self.bias.is_some() || self.residual.is_some();
        let (x, w) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (x, w),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let x = super::contiguous(x, l1, "linear: the input")?;
                let w = super::contiguous(w, l2, "linear: the weight")?;
                self.bf16((m, n, k), x, w, &mut out);
                let out = super::convert::to_bf16(&out);
                return Ok((CpuStorage::BF16(out), Shape::from((m, n))));
            }
            _ => candle_core::bail!("linear: input and weight must both be f32 or both bf16"),
        };
        let x = super::contiguous(x, l1, "linear: the input")?;
        let w = super::contiguous(w, l2, "linear: the weight")?;
        // Each product: (columns, depth, output column offset, input column offset, rhs offset,
        // rhs (row stride, column stride)).
        type Part = (usize, usize, usize, usize, usize, (usize, usize));
        let parts: Vec<Part> = match self.blocks {
            // W^T's element (p, j) is w[j * k + p].
            None => vec![(n, k, 0, 0, 0, (1, k))],
            // Output columns b*s..: block b (rows b*s.. of w) holds their W^T, row-major.
            Some(s) if n >= k => (0..n / s)
                .map(|b| (s, k, b * s, 0, b * s * k, (s, 1)))
                .collect(),
            // Input columns b*s..: block b (columns b*s.. of w) holds their rows of W^T.
            Some(s) => (0..k / s)
                .map(|b| (n, s, 0, b * s, b * s, (k, 1)))
                .collect(),
        };
        for (i, &(cols, depth, o, xo, wo, strides)) in parts.iter().enumerate() {
            let accumulate = start || i > 0;
            let (dst, x, w) = (&mut out[o..], &x[xo..], &w[wo..]);
            let par = super::parallelism();
            super::sgemm(
                (m, cols, depth),
                dst,
                n,
                accumulate,
                x,
                (k, 1),
                w,
                strides,
                par,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl LinearOp<'_> {
    fn bf16(
        &self,
        (m, n, k): (usize, usize, usize),
        x: &[half::bf16],
        w: &[half::bf16],
        out: &mut [f32],
    ) {
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
            out,
            n,
            self.bias.is_some() || self.residual.is_some(),
            candle_core::utils::get_num_threads(),
        );
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
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = candle_nn::Linear::new(f32(&w), b.as_ref().map(f32))
                .forward(&f32(&x))
                .unwrap();
            let bias_f32 = b.as_ref().map(|b| f32(b).to_vec1::<f32>().unwrap());
            // The weight packed at load (on CPUs with AVX512-BF16) and packed per call.
            let packable = Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16;
            let mut layers = vec![(
                false,
                Linear::with(
                    candle_nn::Linear::new(w.clone(), b.clone()),
                    bias_f32.clone(),
                    None,
                    false,
                )
                .unwrap(),
            )];
            if packable {
                let packed = Linear::with(
                    candle_nn::Linear::new(w.clone(), b.clone()),
                    bias_f32,
                    None,
                    true,
                )
                .unwrap();
                assert!(packed.packed.is_some() && packed.inner.weight().elem_count() == 0);
                layers.push((true, packed));
            } else {
                eprintln!("packed weights not tested: this CPU lacks AVX512-BF16 (avx512bf16)");
            }
            for (prepacked, layer) in &layers {
                let got = layer.forward(&x).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                assert_eq!(got.dims(), want.dims());
                let (got, want) = (
                    f32(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (g, w) in got.iter().zip(&want) {
                    // One bf16 rounding of the result (8 bits of mantissa) plus f32 sums.
                    assert!(
                        (g - w).abs() <= 4e-3 * w.abs() + 1e-3 * k as f32 * 1e-2,
                        "{g} vs {w} (prepacked {prepacked})"
                    );
                }
            }
            // The same bits either way: the same kernel, products and sums.
            if let [(_, per_call), (_, packed)] = &layers[..] {
                let bits = |l: &Linear| {
                    l.forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<half::bf16>()
                        .unwrap()
                };
                assert_eq!(bits(per_call), bits(packed));
            }
            // A packed layer refuses f32 input with an error, not a panic.
            if let Some((_, packed)) = layers.get(1) {
                assert!(packed.forward(&f32(&x)).is_err());
            }
        }
    }

    /// The GEGLU projection: in f32 the layer and then GEGLU; in bf16 with AVX512-BF16 (an even
    /// number of 16-output halves) the fused tiles, within one bf16 rounding of the f32 result
    /// of the same values and of the layer-then-GEGLU path (which rounds twice); otherwise that
    /// path itself. Tokens in one and in two leading dimensions.
    #[test]
    fn geglu_projection_matches_the_layer_then_geglu() {
        let fusable = Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16;
        if !fusable {
            eprintln!("fused GEGLU not tested: this CPU lacks AVX512-BF16 (avx512bf16)");
        }
        for (shape, out, bias) in [
            (vec![2, 37, 64], 64, true),
            (vec![21, 40], 128, false),
            (vec![3, 24], 48, true),
        ] {
            let k = *shape.last().unwrap();
            let x = tensor(&shape, 0.3).to_dtype(DType::BF16).unwrap();
            let w = tensor(&[out, k], 1.1).to_dtype(DType::BF16).unwrap();
            let b = bias.then(|| tensor(&[out], 2.0).to_dtype(DType::BF16).unwrap());
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let flat = |t: &Tensor| f32(t).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Fresh weights for each layer: the f32 kernel transposes its weight in place.
            let layer = |dtype| {
                let t = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_dtype(dtype).unwrap();
                candle_nn::Linear::new(t(&w), b.as_ref().map(t))
            };
            // f32: exactly the layer, then GEGLU.
            let geglu32 = GegluLinear::new(layer(DType::F32)).unwrap();
            assert!(!geglu32.fused());
            let layer32 = Linear::new(layer(DType::F32)).unwrap();
            let want = super::super::geglu::geglu(&layer32.forward(&f32(&x)).unwrap()).unwrap();
            let got = geglu32.forward(&f32(&x)).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(flat(&got), flat(&want), "f32 {shape:?} -> {out}");
            // bf16.
            let two_steps = super::super::geglu::geglu(
                &Linear::new(layer(DType::BF16))
                    .unwrap()
                    .forward(&x)
                    .unwrap(),
            )
            .unwrap();
            let geglu = GegluLinear::new(layer(DType::BF16)).unwrap();
            assert_eq!(
                geglu.fused(),
                fusable && out % 32 == 0,
                "{shape:?} -> {out}"
            );
            let got = geglu.forward(&x).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            assert_eq!(got.dims(), want.dims());
            let (got, two_steps) = (flat(&got), flat(&two_steps));
            if !geglu.fused() {
                assert_eq!(got, two_steps, "{shape:?} -> {out}");
                continue;
            }
            let (mut fused_error, mut two_step_error) = (0.0, 0.0);
            for ((g, t), w) in got.iter().zip(&two_steps).zip(flat(&want)) {
                // One rounding (2^-8 relative) of the result, and the f32 sums' order.
                assert!(
                    (g - w).abs() <= 4e-3 * w.abs() + 1e-4,
                    "{g} vs f32 {w} ({out})"
                );
                fused_error += (g - w).abs();
                two_step_error += (t - w).abs();
            }
            // The two-step path also rounds the projection (value and gate) first: it is no
            // nearer the f32 result.
            assert!(
                fused_error <= two_step_error,
                "{fused_error} > {two_step_error}"
            );
            // Its panels are for bf16 on the CPU: f32 input is an error, not a panic.
            assert!(geglu.forward(&f32(&x)).is_err());
        }
    }

    /// The out-of-place transposition (for weights that are file maps) writes what the in-place
    /// one leaves, along the rows, along the columns and with a row count that is not a multiple
    /// of its task size; by tiles (16 | side: one block, several along the rows or the columns)
    /// and value by value.
    #[test]
    fn transposed_copy_matches_the_in_place_transposition() {
        let (tiled, by_value) = ([(96, 288), (320, 80), (48, 48)], [(200, 100), (100, 300)]);
        for (n, k) in [(64, 64), (70, 70)]
            .into_iter()
            .chain(tiled)
            .chain(by_value)
        {
            let side = n.min(k);
            let w = tensor(&[n, k], 0.3);
            let src = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let in_place = w.copy().unwrap();
            in_place.inplace_op1(&TransposeBlocks { side }).unwrap();
            let want = in_place.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(transposed(&src, (n, k), side), want, "{n}x{k}");
            // Transposing twice gives the matrix back.
            assert_eq!(transposed(&want, (n, k), side), src, "{n}x{k}");
        }
    }

    /// The f32 kernel against candle-nn's layer: the same products, summed in gemm's order.
    #[test]
    fn f32_linear_matches_candle_nn() {
        // Strided W^T (small or indivisible) and square blocks: one, along the rows, along the
        // columns, with a tile that does not divide the side.
        for (shape, out, bias) in [
            (vec![4, 6], 3, false),
            (vec![2, 77, 64], 96, true),
            (vec![2, 3, 10, 33], 40, true),
            (vec![2, 7, 64], 64, true),
            (vec![5, 96], 288, true),
            (vec![3, 2, 256], 64, false),
            (vec![9, 70], 140, true),
        ] {
            let k = *shape.last().unwrap();
            let x = tensor(&shape, 0.0);
            let w = tensor(&[out, k], 0.5);
            let b = bias.then(|| tensor(&[out], 2.0));
            // The reference first: the layer rearranges its own copy of the weight in place.
            let theirs = candle_nn::Linear::new(w.copy().unwrap(), b.clone())
                .forward(&x)
                .unwrap();
            let ours = Linear::new(candle_nn::Linear::new(w, b))
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!((ours.dtype(), ours.dims()), (DType::F32, theirs.dims()));
            let d = crate::test_support::max_abs_diff(&ours, &theirs);
            assert!(d < 1e-5 * k as f32, "{shape:?} -> {out}: {d}");
        }
    }

    /// `forward_add` is the layer plus the residual: f32 within an ulp-level reordering of
    /// candle's `layer(x) + residual`; bf16 the one rounding of the f32 sum (packed and per-call
    /// weights alike, the same bits), so within one bf16 step of rounding the layer and then the
    /// sum; a residual of another shape falls back to candle's add, and so to its error.
    #[test]
    fn forward_add_adds_the_residual_in_the_products() {
        for (shape, out, bias) in [
            (vec![5, 7], 3, true),
            (vec![2, 77, 64], 96, true),
            (vec![2, 3, 10, 33], 40, false),
            (vec![9, 70], 140, true),
        ] {
            let k = *shape.last().unwrap();
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = out;
            let (x, w) = (tensor(&shape, 0.3), tensor(&[out, k], 1.1));
            let b = bias.then(|| tensor(&[out], 2.0));
            let residual = (tensor(&out_shape, 0.7) * 4.0).unwrap();
            // f32: against candle-nn's layer and candle's add.
            let plain = candle_nn::Linear::new(w.copy().unwrap(), b.clone());
            let want = (plain.forward(&x).unwrap() + &residual).unwrap();
            let ours = Linear::new(candle_nn::Linear::new(w.copy().unwrap(), b.clone())).unwrap();
            let got = ours.forward_add(&x, &residual).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::test_support::max_abs_diff(&got, &want);
            assert!(d < 1e-5 * k as f32, "f32 {shape:?} -> {out}: {d}");
            // A residual of another shape is candle's error, not a panic.
            assert!(ours.forward_add(&x, &tensor(&[out + 1], 0.0)).is_err());
            // bf16: per-call and (with AVX512-BF16) packed weights.
            let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let (x, w, residual) = (bf(&x), bf(&w), bf(&residual));
            let b = b.map(|b| bf(&b));
            let bias_f32 = b
                .as_ref()
                .map(|b| b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap());
            let mut layers = vec![Linear::with(
                candle_nn::Linear::new(w.clone(), b.clone()),
                bias_f32.clone(),
                None,
                false,
            )
            .unwrap()];
            if Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16 {
                let packed = candle_nn::Linear::new(w.clone(), b.clone());
                layers.push(Linear::with(packed, bias_f32, None, true).unwrap());
            }
            let f32s = |t: &Tensor| {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            // Rounded twice, as diffusers does in bf16: within a rounding of each term.
            let layer = f32s(&layers[0].forward(&x).unwrap());
            let twice = f32s(&(layers[0].forward(&x).unwrap() + &residual).unwrap());
            let terms: Vec<f32> = layer
                .iter()
                .zip(f32s(&residual))
                .map(|(a, b)| a.abs() + b.abs())
                .collect();
            let bits: Vec<Vec<f32>> = layers
                .iter()
                .map(|l| f32s(&l.forward_add(&x, &residual).unwrap()))
                .collect();
            for got in &bits {
                assert_eq!(
                    got, &bits[0],
                    "{shape:?} -> {out}: packed and per call differ"
                );
                for ((g, t), s) in got.iter().zip(&twice).zip(&terms) {
                    assert!((g - t).abs() <= 2f32.powi(-7) * s, "{g} vs {t}");
                }
            }
            // The same layer without the fusing (a residual copied to another layout first).
            let strided = residual.t().unwrap().contiguous().unwrap().t().unwrap();
            if strided.rank() == 2 {
                assert_eq!(f32s(&layers[0].forward_add(&x, &strided).unwrap()), bits[0]);
            }
        }
    }

    /// GFLOP/s of m18's bf16 transformer projections at 512x512 with guidance through the whole
    /// layer (bias, products, rounding) and through the product alone
    /// (`cargo test --release --lib linear_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn linear_speed() {
        use crate::kernels::gemm_bf16::gemm_bf16_packed;
        let kernel = Bf16Kernel::detect();
        println!("kernel: {}", kernel.name());
        // (tokens, in, out): attention projections and the feed-forward at 64x64, 32x32, 16x16.
        for (m, k, n) in [
            (8192, 320, 320),
            (2048, 320, 2560),
            (2048, 1280, 320),
            (2048, 640, 640),
            (2048, 640, 5120),
            (2048, 2560, 640),
            (512, 1280, 1280),
            (512, 1280, 10240),
            (512, 5120, 1280),
        ] {
            let x = tensor(&[m, k], 0.3).to_dtype(DType::BF16).unwrap();
            let w = tensor(&[n, k], 1.1).to_dtype(DType::BF16).unwrap();
            let b = tensor(&[n], 2.0).to_dtype(DType::BF16).unwrap();
            let layer = Linear::new(candle_nn::Linear::new(w.clone(), Some(b))).unwrap();
            let flop = 2.0 * (m * n * k) as f64;
            let t_layer = crate::test_support::best_time(5, &mut || {
                drop(layer.forward(&x).unwrap());
            });
            let packed = PackedB::new(
                kernel,
                Matrix {
                    data: &w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                    rs: 1,
                    cs: k,
                },
                (k, n),
            );
            let xs = x.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
            let mut c = vec![0f32; m * n];
            let threads = candle_core::utils::get_num_threads();
            let t_gemm = crate::test_support::best_time(5, &mut || {
                gemm_bf16_packed(m, Matrix::rows(&xs, k), &packed, &mut c, n, false, threads)
            });
            println!(
                "{m:5} x {k:5} -> {n:5}: layer {:6.2} ms {:6.1} GFLOP/s, product {:6.2} ms {:6.1} GFLOP/s",
                t_layer * 1e3,
                flop / t_layer / 1e9,
                t_gemm * 1e3,
                flop / t_gemm / 1e9
            );
        }
    }
}
