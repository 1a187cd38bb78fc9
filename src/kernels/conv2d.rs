//! 2-D convolution (diffusers' `nn.Conv2d`, groups = 1) with an im2col + gemm CPU kernel.
//!
//! candle 0.11's CPU conv2d copies the whole input to NHWC on one thread, then gathers each
//! 512-pixel im2col tile element by element and scatters the gemm result back the same way; that
//! data movement took more time than the multiplications themselves in a 512x512 generation.
//! Here the input stays NCHW: a tile of output rows is unfolded with contiguous row copies (one
//! task per input channel), and one gemm `W[co, ci*kh*kw] x col[ci*kh*kw, pixels]` writes straight
//! into the NCHW output, starting from the bias (and, for [`Conv2d::forward_add`], from the
//! residual as well). 1x1 stride-1 convolutions multiply the input in place, without a copy.
//!
//! bf16 (`--dtype bf16` on the CPU) runs the same tiles with bf16 im2col buffers and
//! [`super::gemm_bf16`] (bf16 products, f32 sums into the f32 output tile, one rounding to bf16 at
//! the end), as PyTorch's CPU autocast does for convolutions. Other devices, dtypes and grouped
//! convolutions use candle's own op, which the tests also use as the reference.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::winograd::Largest;
use super::{contiguous, SendPtr};

/// Floats in one im2col tile (8 MiB): stays in the last-level cache between the unfold and the gemm.
const TILE_ELEMS: usize = 1 << 21;

/// A convolution layer with diffusers' weight names (`weight` of shape `[co, ci, kh, kw]`, `bias` `[co]`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
    winograd: Largest,
}

impl Conv2d {
    /// Wraps loaded tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
            winograd: Largest::F2,
        }
    }

    /// Allows Winograd tiles up to `largest` for this layer (F(2x2) by default: its error is that
    /// of the direct sum, where F(4x4)'s measurably is not; see [`super::winograd`]).
    pub fn with_winograd(self, largest: Largest) -> Self {
        Self {
            winograd: largest,
            ..self
        }
    }

    /// Loads `weight` and `bias` of a square-kernel convolution.
    pub fn load(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let groups = config.groups.max(1);
        let weight = vb.get(
            (out_channels, in_channels / groups, kernel, kernel),
            "weight",
        )?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self::new(weight, Some(bias), config))
    }

    /// The convolution plus `residual` (same shape as the output), added as the gemm's starting
    /// value on the CPU fast path: diffusers' `input_tensor + conv2(hidden_states)`.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.fast(xs) && residual.dtype() == xs.dtype() {
            return self.run(xs, Some(residual));
        }
        self.forward(xs)? + residual
    }

    fn fast(&self, xs: &Tensor) -> bool {
        xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::BF16)
            && self.weight.dtype() == xs.dtype()
            && self.config.groups == 1
            && xs.rank() == 4
    }

    fn run(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let op = Conv2dOp {
            padding: self.config.padding,
            stride: self.config.stride,
            dilation: self.config.dilation,
            winograd: self.winograd,
            bias: match &self.bias {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => None,
            },
        };
        // The third operand is the residual, or an empty placeholder.
        let start = match residual {
            Some(r) => r.contiguous()?,
            None => Tensor::zeros(0, xs.dtype(), xs.device())?,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight.contiguous()?, &start, &op)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fast(xs) {
            return self.run(xs, None);
        }
        let c = &self.config;
        let ys = xs.conv2d(&self.weight, c.padding, c.stride, c.dilation, c.groups)?;
        match &self.bias {
            None => Ok(ys),
            Some(b) => ys.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        }
    }
}

struct Conv2dOp {
    padding: usize,
    stride: usize,
    dilation: usize,
    winograd: Largest,
    bias: Option<Vec<f32>>,
}

/// Shapes and hyper-parameters of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub b: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
    /// The largest Winograd tile the layer allows (3x3 stride-1 layers; bf16 only F(4x4)).
    pub winograd: Largest,
}

impl Geometry {
    fn out_len(
        n: usize,
        k: usize,
        padding: usize,
        stride: usize,
        dilation: usize,
    ) -> Option<usize> {
        let span = dilation * (k - 1) + 1;
        (n + 2 * padding)
            .checked_sub(span)
            .map(|d| d / stride.max(1) + 1)
    }

    /// Output height and width, `None` when the kernel is larger than the padded input.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let oh = Self::out_len(self.h, self.kh, self.padding, self.stride, self.dilation)?;
        let ow = Self::out_len(self.w, self.kw, self.padding, self.stride, self.dilation)?;
        Some((oh, ow))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "altdiff-conv2d"
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
        let (b, ci, h, wd) = l1.shape().dims4()?;
        let (co, wci, kh, kw) = l2.shape().dims4()?;
        if wci != ci {
            candle_core::bail!("conv2d: input has {ci} channels, the weight expects {wci}");
        }
        let g = Geometry {
            b,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            padding: self.padding,
            stride: self.stride,
            dilation: self.dilation,
            winograd: self.winograd,
        };
        let Some((oh, ow)) = g.out_hw() else {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than the padded {h}x{wd} input");
        };
        // The residual (same dtype as the input), or nothing.
        let has_residual = l3.shape().elem_count() != 0;
        if has_residual && l3.shape().dims() != [b, co, oh, ow] {
            candle_core::bail!(
                "conv2d: residual {:?} does not match the output {:?}",
                l3.shape(),
                (b, co, oh, ow)
            );
        }
        let bias = self.bias.as_deref();
        let shape = Shape::from((b, co, oh, ow));
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (x, w) = (
                    contiguous(x, l1, "conv2d: the input")?,
                    contiguous(w, l2, "conv2d: the weight")?,
                );
                let residual = match s3 {
                    _ if !has_residual => None,
                    CpuStorage::F32(v) => Some(contiguous(v, l3, "conv2d: the residual")?),
                    _ => candle_core::bail!("conv2d: the residual must be f32 like the input"),
                };
                let out = conv2d(x, w, bias, residual, &g, TILE_ELEMS);
                Ok((CpuStorage::F32(out), shape))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                // bf16 products, f32 sums (each output tile stays f32), one rounding at the end.
                let (x, w) = (
                    contiguous(x, l1, "conv2d: the input")?,
                    contiguous(w, l2, "conv2d: the weight")?,
                );
                let residual = match s3 {
                    _ if !has_residual => None,
                    CpuStorage::BF16(v) => Some(contiguous(v, l3, "conv2d: the residual")?),
                    _ => candle_core::bail!("conv2d: the residual must be bf16 like the input"),
                };
                let mode = super::winograd::Mode::get();
                let out = conv2d_bf16(x, w, bias, residual, &g, TILE_ELEMS, mode);
                Ok((CpuStorage::BF16(out), shape))
            }
            _ => candle_core::bail!("conv2d: input and weight must both be f32 or both bf16"),
        }
    }
}

/// The element types the kernel takes (f32 and bf16): each supplies the tile's gemm into the f32
/// output, and may pick another algorithm for the whole convolution.
pub(crate) trait Element: Copy + Default + Send + Sync + Sized {
    /// `out` (bias + residual when `read_dst`, else zeros) `+= conv(x, w)`: im2col, unless the
    /// element type has a better kernel for this geometry.
    fn accumulate(
        x: &[Self],
        w: &[Self],
        out: &mut [f32],
        g: &Geometry,
        tile_elems: usize,
        read_dst: bool,
    ) {
        im2col_conv(x, w, out, g, tile_elems, read_dst);
    }

    /// `dst` (co x n, row stride `ldc`) = `dst` (if `read_dst`) + `w` (co x kk, row-major) x `rhs`
    /// (kk x n, row stride `rhs_rs`).
    ///
    /// # Safety
    /// `dst` is valid for those co rows and written by nobody else meanwhile; `rhs` points at kk
    /// rows of `rhs_rs` elements (the last with at least n).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        dims: (usize, usize, usize),
        dst: *mut f32,
        ldc: usize,
        read_dst: bool,
        w: &[Self],
        rhs: *const Self,
        rhs_rs: usize,
        par: gemm::Parallelism,
    );
}

impl Element for f32 {
    /// Winograd for the 3x3 stride-1 layers that are large enough ([`super::winograd::choose`]).
    fn accumulate(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        g: &Geometry,
        tile_elems: usize,
        read_dst: bool,
    ) {
        use super::winograd;
        match winograd::choose(g, winograd::Mode::get()) {
            Some(t) => winograd::accumulate(t, x, w, out, g),
            None => im2col_conv(x, w, out, g, tile_elems, read_dst),
        }
    }

    unsafe fn gemm(
        (co, n, kk): (usize, usize, usize),
        dst: *mut f32,
        ldc: usize,
        read_dst: bool,
        w: &[f32],
        rhs: *const f32,
        rhs_rs: usize,
        par: gemm::Parallelism,
    ) {
        if co == 0 || n == 0 || kk == 0 {
            return;
        }
        // SAFETY (the caller's promise): dst covers co rows of ldc with n columns, written by
        // nobody else meanwhile; rhs covers kk rows of rhs_rs with n columns.
        let dst = std::slice::from_raw_parts_mut(dst, (co - 1) * ldc + n);
        let rhs = std::slice::from_raw_parts(rhs, (kk - 1) * rhs_rs + n);
        super::sgemm(
            (co, n, kk),
            dst,
            ldc,
            read_dst,
            w,
            (kk, 1),
            rhs,
            (rhs_rs, 1),
            par,
        );
    }
}

impl Element for half::bf16 {
    unsafe fn gemm(
        (co, n, kk): (usize, usize, usize),
        dst: *mut f32,
        ldc: usize,
        read_dst: bool,
        w: &[half::bf16],
        rhs: *const half::bf16,
        rhs_rs: usize,
        par: gemm::Parallelism,
    ) {
        use super::gemm_bf16::{gemm_bf16_raw, Bf16Kernel, Matrix};
        if co == 0 || n == 0 || kk == 0 {
            return;
        }
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t,
            _ => 1,
        };
        let rhs = std::slice::from_raw_parts(rhs, (kk - 1) * rhs_rs + n);
        gemm_bf16_raw(
            Bf16Kernel::detect(),
            (co, n, kk),
            Matrix::rows(w, kk),
            Matrix::rows(rhs, rhs_rs),
            dst,
            ldc,
            read_dst,
            threads,
        );
    }
}

/// `out = residual + bias + conv(x, w)` for NCHW `x` and [co, ci, kh, kw] `w`, both contiguous,
/// in f32 (the products and sums in f32 whatever `T`). `tile_elems` bounds the im2col buffer
/// (tests make it small to cover the tiling).
pub(crate) fn conv2d<T: Element>(
    x: &[T],
    w: &[T],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    g: &Geometry,
    tile_elems: usize,
) -> Vec<f32> {
    let Some((oh, ow)) = g.out_hw() else {
        return Vec::new();
    };
    let mut out = initial_output(bias, residual, g.b * g.co, oh * ow);
    T::accumulate(
        x,
        w,
        &mut out,
        g,
        tile_elems,
        bias.is_some() || residual.is_some(),
    );
    out
}

/// `channels` planes of `plane` values, each `residual + bias[channel % bias.len()]` (either may be
/// absent). Every element is written once, in parallel, before anything reads it: the pages of a
/// fresh allocation are then faulted in by writes alone (a read first maps the shared zero page, and
/// the write after it faults a second time and flushes the other cores' TLBs: a fifth of a large
/// convolution's time when measured).
pub(crate) fn initial_output(
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    channels: usize,
    plane: usize,
) -> Vec<f32> {
    let n = channels * plane;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(i, ch)| {
            let v = bias.map_or(0.0, |b| b[i % b.len()]);
            match residual {
                Some(r) => {
                    for (o, r) in ch.iter_mut().zip(&r[i * plane..]) {
                        o.write(r + v);
                    }
                }
                None => ch.iter_mut().for_each(|o| {
                    o.write(v);
                }),
            }
        });
    // SAFETY: the loop above wrote all n elements (chunks of `plane` cover 0..n).
    unsafe { out.set_len(n) };
    out
}

/// `out += conv(x, w)` with the im2col kernel (`read_dst` false: `out` is overwritten).
pub(crate) fn im2col_conv<T: Element>(
    x: &[T],
    w: &[T],
    out: &mut [f32],
    g: &Geometry,
    tile_elems: usize,
    read_dst: bool,
) {
    let Some((oh, ow)) = g.out_hw() else {
        return;
    };
    let opx = oh * ow;
    let dst = SendPtr(out.as_mut_ptr());
    for_each_tile(
        x,
        g,
        tile_elems,
        false,
        |(bi, y0, r), rhs, rhs_rs, par, _| {
            // SAFETY: dst covers rows [0, co) x columns [y0*ow, y0*ow + r*ow) of image `bi` of `out`
            // (row stride opx), inside `out` and disjoint from every other tile's; the tile's rhs is
            // kk x n with row stride rhs_rs (`for_each_tile`'s promise).
            unsafe {
                T::gemm(
                    (g.co, r * ow, g.ci * g.kh * g.kw),
                    dst.get().add(bi * g.co * opx + y0 * ow),
                    opx,
                    read_dst,
                    w,
                    rhs,
                    rhs_rs,
                    par,
                );
            }
        },
    );
}

/// The bf16 convolution `residual + bias + conv(x, w)` rounded to bf16 tile by tile: each tile's
/// f32 sums go to a per-thread scratch tile and are rounded straight into the bf16 output, so no
/// f32 output as large as the bf16 one is ever made (for the VAE decoder's 512x512 layers that was
/// 134 MB of fresh memory per convolution, most of whose cost was the kernel clearing its pages).
/// `mode` picks Winograd or this kernel as `winograd::choose_bf16` does (`Mode::get()` but in the
/// benchmarks).
pub(crate) fn conv2d_bf16(
    x: &[half::bf16],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    residual: Option<&[half::bf16]>,
    g: &Geometry,
    tile_elems: usize,
    mode: super::winograd::Mode,
) -> Vec<half::bf16> {
    use super::convert::Value;
    use super::winograd;
    let Some((oh, ow)) = g.out_hw() else {
        return Vec::new();
    };
    if let Some(t) = winograd::choose_bf16(g, mode) {
        return winograd::conv_bf16(t, x, w, bias, residual, g, winograd::Fusion::Best);
    }
    let opx = oh * ow;
    let len = g.b * g.co * opx;
    let fill = |out: &mut [std::mem::MaybeUninit<half::bf16>]| {
        let dst = SendPtr(out.as_mut_ptr());
        for_each_tile(
            x,
            g,
            tile_elems,
            true,
            |(bi, y0, r), rhs, rhs_rs, par, tile| {
                let (n, p0) = (r * ow, y0 * ow);
                tile.clear();
                tile.reserve(g.co * n);
                for c in 0..g.co {
                    let b = bias.map_or(0.0, |b| b[c]);
                    match residual {
                        Some(res) => {
                            let at = (bi * g.co + c) * opx + p0;
                            tile.extend(res[at..at + n].iter().map(|v| v.get() + b));
                        }
                        None => tile.extend(std::iter::repeat_n(b, n)),
                    }
                }
                // SAFETY: `tile` holds co x n f32 (row stride n), this task's alone; rhs is kk x n
                // with row stride rhs_rs (`for_each_tile`'s promise).
                unsafe {
                    half::bf16::gemm(
                        (g.co, n, g.ci * g.kh * g.kw),
                        tile.as_mut_ptr(),
                        n,
                        true,
                        w,
                        rhs,
                        rhs_rs,
                        par,
                    );
                }
                for (c, row) in tile.chunks_exact(n).enumerate() {
                    // SAFETY: columns [p0, p0 + n) of channel c of image bi: this tile's alone, inside
                    // the output (b x co x opx).
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(dst.get().add((bi * g.co + c) * opx + p0), n)
                    };
                    super::convert::round_into_uninit(row, o);
                }
            },
        );
    };
    // SAFETY: the tiles cover every (image, channel, pixel) of the output once, and each writes
    // all of its co x n values.
    unsafe { super::convert::filled(len, fill) }
}

/// Runs `each(tile, rhs, rhs_rs, parallelism, scratch)` for every tile `(image, first output row,
/// rows)` of the im2col kernel, with `rhs` the tile's unfolded input (kk x rows*ow, row stride
/// `rhs_rs`; the input itself for a 1x1 stride-1 convolution) and a per-thread f32 scratch; tiles
/// run in parallel when there are enough of them, else one after another with parallel gemms.
/// `small`: also bound a 1x1 convolution's tiles by `tile_elems` output values (for callers that
/// keep a tile's output in the scratch).
fn for_each_tile<T, F>(x: &[T], g: &Geometry, tile_elems: usize, small: bool, each: F)
where
    T: Element,
    F: Fn((usize, usize, usize), *const T, usize, gemm::Parallelism, &mut Vec<f32>) + Sync,
{
    let Some((oh, ow)) = g.out_hw() else {
        return;
    };
    let kk = g.ci * g.kh * g.kw;
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    let threads = candle_core::utils::get_num_threads().max(1);
    let mut rows = if pointwise {
        oh.div_ceil(threads).max(1)
    } else {
        (tile_elems / (kk * ow).max(1)).clamp(1, oh.max(1))
    };
    if small {
        rows = rows.min((tile_elems / (g.co * ow).max(1)).max(1));
    }
    // (image, first output row, rows) of every tile.
    let tiles: Vec<(usize, usize, usize)> = (0..g.b)
        .flat_map(|bi| {
            (0..oh)
                .step_by(rows)
                .map(move |y0| (bi, y0, rows.min(oh - y0)))
        })
        .collect();
    let in_len = g.ci * g.h * g.w;
    // One tile: unfold (unless pointwise), then `each`.
    let run = |t: (usize, usize, usize),
               (col, scratch): &mut (Vec<T>, Vec<f32>),
               par: gemm::Parallelism| {
        let (bi, y0, r) = t;
        let xb = &x[bi * in_len..(bi + 1) * in_len];
        let n = r * ow;
        let (rhs, rhs_rs) = if pointwise {
            // n <= h*w - y0*ow: the tile's pixels lie inside the image.
            (xb[y0 * ow..].as_ptr(), g.h * g.w)
        } else {
            col.resize(kk * n, T::default());
            im2col(
                xb,
                &mut col[..kk * n],
                g,
                y0,
                r,
                ow,
                !matches!(par, gemm::Parallelism::None),
            );
            (col.as_ptr(), n)
        };
        each(t, rhs, rhs_rs, par, scratch);
    };
    if threads > 1 && tiles.len() >= 2 * threads {
        // Enough tiles: one tile per thread at a time, each gemm on one thread (a small output
        // channel count does not split well across threads inside one gemm).
        tiles.into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |state, t| run(t, state, gemm::Parallelism::None),
        );
    } else {
        let mut state = (Vec::new(), Vec::new());
        for t in tiles {
            run(t, &mut state, super::parallelism());
        }
    }
}

/// Unfolds output rows `y0 .. y0 + rows` of one image into `col` [ci*kh*kw, rows*ow].
fn im2col<T: Copy + Default + Send + Sync>(
    xb: &[T],
    col: &mut [T],
    g: &Geometry,
    y0: usize,
    rows: usize,
    ow: usize,
    parallel: bool,
) {
    let n = rows * ow;
    let plane = g.h * g.w;
    let channel = |(c, chunk): (usize, &mut [T])| {
        let xc = &xb[c * plane..(c + 1) * plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut chunk[(i * g.kw + j) * n..(i * g.kw + j + 1) * n];
                let off = (j * g.dilation) as isize - g.padding as isize;
                for t in 0..rows {
                    let dst = &mut row[t * ow..(t + 1) * ow];
                    let iy = ((y0 + t) * g.stride + i * g.dilation) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(T::default());
                        continue;
                    }
                    let src = &xc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride == 1 {
                        let lo = ((-off).max(0) as usize).min(ow);
                        let hi = ((g.w as isize - off).max(0) as usize).clamp(lo, ow);
                        dst[..lo].fill(T::default());
                        dst[lo..hi].copy_from_slice(
                            &src[(lo as isize + off) as usize..(hi as isize + off) as usize],
                        );
                        dst[hi..].fill(T::default());
                    } else {
                        for (x, v) in dst.iter_mut().enumerate() {
                            let ix = (x * g.stride) as isize + off;
                            *v = if ix >= 0 && ix < g.w as isize {
                                src[ix as usize]
                            } else {
                                T::default()
                            };
                        }
                    }
                }
            }
        }
    };
    if parallel {
        col.par_chunks_mut(g.kh * g.kw * n)
            .enumerate()
            .for_each(channel);
    } else {
        col.chunks_mut(g.kh * g.kw * n)
            .enumerate()
            .for_each(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;
    use candle_core::Device;

    fn values(n: usize, phase: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + phase).sin() * 1.7) + 0.1)
            .collect()
    }

    /// Candle's conv2d + bias (+ residual): the reference.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        g: &Geometry,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let y = x
            .conv2d(w, g.padding, g.stride, g.dilation, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, g.co, 1, 1)).unwrap())
            .unwrap();
        match residual {
            Some(r) => (y + r).unwrap(),
            None => y,
        }
    }

    fn check(g: Geometry, tile: usize, with_residual: bool) {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            values(g.b * g.ci * g.h * g.w, 0.3),
            (g.b, g.ci, g.h, g.w),
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(
            values(g.co * g.ci * g.kh * g.kw, 1.1),
            (g.co, g.ci, g.kh, g.kw),
            &dev,
        )
        .unwrap();
        let bias = Tensor::from_vec(values(g.co, 2.0), g.co, &dev).unwrap();
        let (oh, ow) = g.out_hw().unwrap();
        let res =
            Tensor::from_vec(values(g.b * g.co * oh * ow, 0.7), (g.b, g.co, oh, ow), &dev).unwrap();
        let residual = with_residual.then_some(&res);
        let want = reference(&x, &w, &bias, &g, residual);
        let got = conv2d(
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            Some(&bias.to_vec1::<f32>().unwrap()),
            residual
                .map(|r| r.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .as_deref(),
            &g,
            tile,
        );
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{g:?}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-5 * b.abs(),
                "{g:?} tile {tile} at {i}: {a} vs {b}"
            );
        }
    }

    fn geom(b: usize, ci: usize, h: usize, w: usize, co: usize, k: usize) -> Geometry {
        Geometry {
            b,
            ci,
            h,
            w,
            co,
            kh: k,
            kw: k,
            padding: k / 2,
            stride: 1,
            dilation: 1,
            winograd: Largest::F2,
        }
    }

    #[test]
    fn matches_candle_conv2d() {
        for tile in [TILE_ELEMS, 1, 50] {
            for residual in [false, true] {
                // UNet / VAE 3x3 same-padding convolutions, odd sizes, batch 2.
                check(geom(2, 3, 7, 5, 4, 3), tile, residual);
                check(geom(1, 8, 9, 12, 6, 3), tile, residual);
                // 1x1 (shortcut and post_quant_conv), with a non-square image.
                check(geom(2, 5, 6, 3, 7, 1), tile, residual);
                // Downsampler: 3x3, stride 2, padding 1, odd and even sizes.
                for (h, w) in [(8, 8), (7, 9)] {
                    check(
                        Geometry {
                            stride: 2,
                            ..geom(2, 4, h, w, 3, 3)
                        },
                        tile,
                        residual,
                    );
                }
                // No padding, dilation 2, a 1x1 kernel with padding.
                check(
                    Geometry {
                        padding: 0,
                        ..geom(1, 2, 6, 7, 3, 3)
                    },
                    tile,
                    residual,
                );
                check(
                    Geometry {
                        dilation: 2,
                        padding: 2,
                        ..geom(1, 3, 8, 6, 2, 3)
                    },
                    tile,
                    residual,
                );
                check(
                    Geometry {
                        padding: 1,
                        ..geom(1, 3, 4, 5, 2, 1)
                    },
                    tile,
                    residual,
                );
            }
        }
    }

    #[test]
    fn module_matches_candle_and_falls_back_for_groups() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(2 * 4 * 5 * 6, 0.0), (2, 4, 5, 6), &dev).unwrap();
        let w = Tensor::from_vec(values(6 * 4 * 9, 0.5), (6, 4, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(values(6, 0.9), 6, &dev).unwrap();
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(w.clone(), Some(b.clone()), cfg);
        let want = candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg)
            .forward(&x)
            .unwrap();
        let got = conv.forward(&x).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4);
        // A non-contiguous input (transposed twice back to NCHW order) and forward_add.
        let xt = x
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let got = conv.forward_add(&xt, &want).unwrap();
        assert!(max_abs_diff(&got, &(&want * 2.0).unwrap()) < 1e-4);
        // Grouped convolutions go to candle.
        let wg = Tensor::from_vec(values(6 * 2 * 9, 0.5), (6, 2, 3, 3), &dev).unwrap();
        let gcfg = Conv2dConfig { groups: 2, ..cfg };
        let got = Conv2d::new(wg.clone(), None, gcfg).forward(&x).unwrap();
        let want = candle_nn::Conv2d::new(wg, None, gcfg).forward(&x).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0);
    }

    #[test]
    fn kernel_larger_than_input_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 2, 2), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((1, 2, 5, 5), DType::F32, &dev).unwrap();
        let conv = Conv2d::new(w, None, Conv2dConfig::default());
        assert!(conv.forward(&x).is_err());
    }

    /// bf16 input and weight (`--dtype bf16`): bf16 products summed in f32, rounded once, against
    /// the f32 kernel on the same (bf16-rounded) values, with and without a residual, 3x3 and 1x1,
    /// strided.
    #[test]
    fn bf16_convolution_matches_f32_of_the_same_values() {
        let dev = Device::Cpu;
        // The 3x3 layer has 8 4x4 tiles, under `MIN_TILES_BF16_F4_PAIRED` (16): from there, with
        // AVX512-BF16, `auto` takes F(4x4) with bf16 products, which round the transformed values
        // (more than the one rounding checked here: `fused_matches_the_blocked_path` bounds them).
        for (ci, co, k, pad, stride, hw) in
            [(8, 6, 3, 1, 1, 7), (5, 7, 1, 0, 1, 6), (4, 3, 3, 1, 2, 11)]
        {
            let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let x =
                bf(Tensor::from_vec(values(2 * ci * hw * hw, 0.1), (2, ci, hw, hw), &dev).unwrap());
            let w =
                bf(Tensor::from_vec(values(co * ci * k * k, 0.9), (co, ci, k, k), &dev).unwrap());
            let b = bf(Tensor::from_vec(values(co, 2.0), co, &dev).unwrap());
            let config = Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            let conv = Conv2d::new(w.clone(), Some(b.clone()), config);
            let conv32 = Conv2d::new(f32(&w), Some(f32(&b)), config);
            let want = conv32.forward(&f32(&x)).unwrap();
            let n_out = want.elem_count();
            let res = bf(Tensor::from_vec(values(n_out, 1.3), want.dims(), &dev).unwrap());
            let with_res = (&want + f32(&res)).unwrap();
            let tiled = conv.forward_add(&x, &res).unwrap();
            // Tiles of a few output rows (several per image, each rounded on its own) give the
            // same bits as one tile per image.
            let (xs, ws, rs) = (
                x.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                res.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
            );
            let bias: Vec<f32> = f32(&b).to_vec1().unwrap();
            let g = Geometry {
                b: 2,
                ci,
                h: hw,
                w: hw,
                co,
                kh: k,
                kw: k,
                padding: pad,
                stride,
                dilation: 1,
                winograd: Largest::F2,
            };
            for tile in [1, 40, 1 << 20] {
                let mode = crate::kernels::winograd::Mode::get();
                let small = conv2d_bf16(&xs, &ws, Some(&bias), Some(&rs), &g, tile, mode);
                let whole = tiled
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap();
                assert_eq!(small, whole, "tile {tile} ({ci}->{co}, {k}x{k})");
            }
            for (got, want) in [(conv.forward(&x).unwrap(), want.clone()), (tiled, with_res)] {
                assert_eq!(got.dtype(), DType::BF16);
                let got = f32(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    // One bf16 rounding (2^-8 relative) plus f32 sums of up to ci*k*k products.
                    assert!(
                        (a - b).abs() <= 4e-3 * b.abs() + 1e-4,
                        "{a} vs {b} ({ci}->{co}, {k}x{k})"
                    );
                }
            }
        }
    }
}
