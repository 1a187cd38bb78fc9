//! The UNet's `Transformer2DModel` (GroupNorm, projection in, `BasicTransformerBlock`s, projection out).
//!
//! Owned rather than taken from candle-transformers because its GEGLU feed-forward uses the tanh
//! approximation of GELU where diffusers uses the exact erf form, which moves outputs well past the
//! parity tolerance. Attention scores and softmax are computed in f32 whatever the model dtype
//! (diffusers' `upcast_attention` / `upcast_softmax` behaviour, and safe in f16); bf16 on the CPU
//! sums its bf16 products in f32 in [`crate::kernels::attention`], as PyTorch does.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::layer_norm::{layer_norm, LayerNorm};
use crate::kernels::linear::{geglu_linear, linear, linear_no_bias, GegluLinear, Linear};
use crate::kernels::tokens::tokens_to_map_add;
use crate::kernels::GroupNorm;

/// Multi-head attention with diffusers' `Attention` weights (`to_q`, `to_k`, `to_v`, `to_out.0`).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// [B, L, C] -> [B, heads, L, C / heads], in f32 (scores in f32 whatever the model dtype) but
    /// for bf16 on the CPU, whose attention kernel sums its bf16 products in f32 itself.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        let heads = xs
            .reshape((b, l, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()?;
        if crate::kernels::attention::applies(&heads) {
            Ok(heads)
        } else {
            heads.to_dtype(DType::F32)
        }
    }

    /// Attends from `xs` [B, N, C] to `context` [B, M, Cc] (or to itself when `None`), plus
    /// `residual` (`xs`'s shape: the block's input), which the output projection adds as it
    /// writes ([`Linear::forward_add`]).
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let context = context.unwrap_or(xs);
        let (b, n, _) = xs.dims3()?;
        #[cfg(feature = "flash-attn")]
        if flash::applies(xs) {
            // [B, L, H, D] is the layout FlashAttention takes: no transposes, no upcast.
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                let (b, l, c) = t.dims3()?;
                t.reshape((b, l, self.heads, c / self.heads))
            };
            let out = flash::attend_bnhd(
                &split(self.to_q.forward(xs)?)?,
                &split(self.to_k.forward(context)?)?,
                &split(self.to_v.forward(context)?)?,
                self.scale,
            )?;
            return self.to_out.forward_add(&out.reshape((b, n, ()))?, residual);
        }
        let q = self.to_q.forward(xs)?;
        if crate::kernels::attention::applies(&q) {
            // The heads read and written where they lie in the tokens' features.
            let (k, v) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
            let out = crate::kernels::attention::attend_tokens(&q, &k, &v, self.heads, self.scale)?;
            return self.to_out.forward_add(&out, residual);
        }
        let q = self.split_heads(&q)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = attend(&q, &k, &v, self.scale, MAX_SCORE_ELEMENTS)?
            .transpose(1, 2)?
            .reshape((b, n, ()))?
            .to_dtype(dtype)?;
        self.to_out.forward_add(&out, residual)
    }
}

/// The largest score matrix materialised at once (f32 elements: 32 MiB, and as much again for the
/// softmax). Self-attention at 512 px has 4096 x 4096 scores per head (671 MB with guidance for
/// m18's first blocks), at 1024 px sixteen times that, so queries are processed in blocks of rows
/// that fit; blocks of a few hundred rows keep the matmuls efficient.
pub(crate) const MAX_SCORE_ELEMENTS: usize = 8 << 20;

/// FlashAttention-2 from candle-flash-attn (the `flash-attn` feature): f16 and bf16 tensors on a
/// CUDA device of compute capability 8.0 or later, head widths that are multiples of 8 up to 512
/// (the UNet's 40 / 80 / 160 and the VAE's 512). Scores never exist in memory; the softmax runs in
/// f32 inside the kernel, as diffusers' fp16 SDPA does. `ALTDIFF_FLASH_ATTN=0` turns it off (e.g.
/// for an older GPU in a build that has it), and the blocked attention is used instead.
#[cfg(feature = "flash-attn")]
pub(crate) mod flash {
    use candle_core::{DType, Tensor};

    /// False when `ALTDIFF_FLASH_ATTN=0` (read once).
    pub(crate) fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("ALTDIFF_FLASH_ATTN").map_or(true, |v| v.trim() != "0"))
    }

    /// Whether FlashAttention takes `xs`.
    pub(crate) fn applies(xs: &Tensor) -> bool {
        enabled() && xs.device().is_cuda() && matches!(xs.dtype(), DType::F16 | DType::BF16)
    }

    /// softmax(q k^T * scale) v for q [B, N, H, D], k and v [B, M, H, D] (FlashAttention's own
    /// layout, the projections' output reshaped), not causal.
    pub(crate) fn attend_bnhd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        candle_flash_attn::flash_attn(q, k, v, scale as f32, false)
    }

    /// [`super::attend`]'s contract, [B, H, N, D] in and out.
    pub(crate) fn attend(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let bnhd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
        attend_bnhd(&bnhd(q)?, &bnhd(k)?, &bnhd(v)?, scale)?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// The attention a CUDA device runs in `dtype`, for `generate -v`.
#[cfg_attr(not(feature = "flash-attn"), allow(unused_variables))]
pub fn describe_cuda_attention(dtype: DType) -> &'static str {
    #[cfg(feature = "flash-attn")]
    if flash::enabled() && matches!(dtype, DType::F16 | DType::BF16) {
        return "attention: FlashAttention-2 (candle-flash-attn; ALTDIFF_FLASH_ATTN=0 turns it off)";
    }
    "attention: scores and softmax in f32 with candle's matmul, in blocks of query rows (build with \
     --features flash-attn for FlashAttention-2 in f16 / bf16)"
}

/// softmax(q k^T * scale) v for q [B, H, N, D], k and v [B, H, M, D]: the fused CPU kernel for f32
/// and bf16 on the CPU (its blocks of query rows bound the scores' memory), FlashAttention for
/// f16 / bf16 on CUDA in a `flash-attn` build, else [`attend_blocked`].
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_elements: usize,
) -> candle_core::Result<Tensor> {
    if crate::kernels::attention::applies(q) {
        return crate::kernels::attention::attend(q, k, v, scale);
    }
    #[cfg(feature = "flash-attn")]
    if flash::applies(q) {
        return flash::attend(q, k, v, scale);
    }
    attend_blocked(q, k, v, scale, max_elements)
}

/// [`attend`] with candle's ops, in blocks of query rows so that at most `max_elements` scores
/// exist at a time. Each row's softmax only involves its own scores, so blocking changes nothing
/// but the memory used. Other devices run this, and the CPU kernel's tests compare with it.
pub(crate) fn attend_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_elements: usize,
) -> candle_core::Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    // K^T made contiguous once: gemm packs it faster than the transposed view (about 10 %).
    let kt = k.t()?.contiguous()?;
    let rows = (max_elements / (b * h * m).max(1)).max(1);
    let block = |q: &Tensor| -> candle_core::Result<Tensor> {
        crate::kernels::softmax_scaled_last_dim(q.matmul(&kt)?, scale)?.matmul(v)
    };
    if rows >= n {
        return block(q);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        parts.push(block(&q.narrow(2, start, len)?.contiguous()?)?);
        start += len;
    }
    Tensor::cat(&parts, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;
    use candle_core::Device;

    /// The chunked feed-forward gives the one-pass numbers.
    #[test]
    fn chunked_feed_forward_matches_one_pass() {
        let dev = Device::Cpu;
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("net.0.proj.weight", (32, 4)),
                ("net.0.proj.bias", (32, 1)),
                ("net.2.weight", (4, 16)),
                ("net.2.bias", (4, 1)),
            ]
            .into_iter()
            .map(|(name, (r, c))| {
                let t = Tensor::randn(0f32, 0.5, (r, c), &dev).unwrap();
                let t = if c == 1 { t.squeeze(1).unwrap() } else { t };
                (name.to_string(), t)
            })
            .collect(),
            DType::F32,
            &dev,
        );
        let ff = FeedForward::new(vb, 4).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (2, 37, 4), &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (2, 37, 4), &dev).unwrap();
        // The plain feed-forward, then the residual added by candle.
        let plain = ff
            .proj_out
            .forward(&ff.proj_in.forward(&xs).unwrap())
            .unwrap();
        let want = (&plain + &residual).unwrap();
        for max in [1, 2, 10, 37, 74, 1000] {
            let got = ff.forward_chunked_add(&xs, &residual, max).unwrap();
            assert_eq!(got.dims(), [2, 37, 4]);
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "max tokens {max}: {d}");
        }
    }

    /// Blocked attention gives the plain op's numbers.
    #[test]
    fn blocked_attention_matches_plain() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev).unwrap();
        let plain = {
            let s = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
            candle_nn::ops::softmax_last_dim(&s)
                .unwrap()
                .matmul(&v)
                .unwrap()
        };
        for max in [1, 2 * 3 * 29 * 5, 2 * 3 * 29 * 36, usize::MAX] {
            let blocked = attend_blocked(&q, &k, &v, 0.3, max).unwrap();
            let d = max_abs_diff(&blocked, &plain);
            assert!(d < 1e-6, "max elements {max}: {d}");
        }
    }

    /// FlashAttention (f16 and bf16 on a CUDA device) against the blocked attention in f32 on the
    /// same inputs, for the UNet's head widths (cross- and self-attention) and the VAE's one head of
    /// 512. Needs a GPU: without one it says so and passes (built by `.ci/flash-attn-check --full`).
    #[cfg(feature = "flash-attn")]
    #[test]
    fn flash_attention_matches_blocked() {
        let dev = match Device::new_cuda(0) {
            Ok(dev) => dev,
            Err(e) => {
                eprintln!("skipped: no CUDA device ({e})");
                return;
            }
        };
        for (h, n, m, d) in [
            (8, 300, 77, 40),
            (8, 256, 256, 80),
            (8, 64, 77, 160),
            (1, 256, 256, 512),
        ] {
            let q = Tensor::randn(0f32, 1.0, (2, h, n, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, h, m, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, h, m, d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let reference = attend_blocked(&q, &k, &v, scale, MAX_SCORE_ELEMENTS).unwrap();
            for (dtype, tolerance) in [(DType::F16, 4e-3f32), (DType::BF16, 3e-2)] {
                let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (q, k, v) = (cast(&q), cast(&k), cast(&v));
                assert!(flash::applies(&q));
                let flash = attend(&q, &k, &v, scale, MAX_SCORE_ELEMENTS)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                // The inputs' own rounding moves the reference by about as much.
                let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let rounded =
                    attend_blocked(&wide(&q), &wide(&k), &wide(&v), scale, MAX_SCORE_ELEMENTS)
                        .unwrap();
                let diff = max_abs_diff(&flash, &reference);
                let own = max_abs_diff(&rounded, &reference);
                assert!(
                    diff < tolerance.max(2.0 * own),
                    "{dtype:?} h {h} n {n} m {m} d {d}: {diff} (rounded inputs: {own})"
                );
            }
        }
    }
}

/// diffusers' `GEGLU` + output linear (`ff.net.0.proj`, `ff.net.2`), with exact GELU.
struct FeedForward {
    proj_in: GegluLinear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: geglu_linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

/// Tokens (over the batch) that go through the feed-forward at once. Its hidden layer is 8x the
/// model width (GEGLU), 84 MB for m18's first blocks at 512 px with guidance when done in one go;
/// tokens are independent, so chunks of the sequence (diffusers' `enable_forward_chunking`) give the
/// same numbers with a quarter of that memory at the peak.
const FF_CHUNK_TOKENS: usize = 2048;

impl FeedForward {
    /// The feed-forward of the tokens `xs` [T, C] plus `residual` (the same shape).
    fn forward_chunk(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.proj_out
            .forward_add(&self.proj_in.forward(xs)?, residual)
    }

    /// `ff(xs) + residual` for `xs` [B, N, C], at most `max_tokens` tokens at a time: the tokens
    /// of all images taken as one list, whose chunks are contiguous rows of `xs` and `residual`.
    fn forward_chunked_add(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        max_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let rows = b * n;
        let (xs, residual) = (xs.reshape((rows, c))?, residual.reshape((rows, c))?);
        let per_chunk = max_tokens.max(1);
        let mut parts = Vec::with_capacity(rows.div_ceil(per_chunk));
        let mut start = 0;
        while start < rows {
            let len = per_chunk.min(rows - start);
            let (x, r) = (xs.narrow(0, start, len)?, residual.narrow(0, start, len)?);
            parts.push(self.forward_chunk(&x, &r)?);
            start += len;
        }
        let ys = match &parts[..] {
            [one] => one.clone(),
            _ => Tensor::cat(&parts, 0)?,
        };
        ys.reshape((b, n, ()))
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        // Each residual connection is added by the projection that ends its branch.
        let xs = self.attn1.forward_add(&self.norm1.forward(xs)?, None, xs)?;
        let xs = self
            .attn2
            .forward_add(&self.norm2.forward(&xs)?, Some(context), &xs)?;
        self.ff
            .forward_chunked_add(&self.norm3.forward(&xs)?, &xs, FF_CHUNK_TOKENS)
    }
}

/// Settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    /// Channels of the feature map (= inner dim).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Stacked transformer blocks.
    pub depth: usize,
    /// Text feature size.
    pub context_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear (SD 2.x) or 1x1 conv (SD 1.x) projections.
    pub use_linear_projection: bool,
}

/// diffusers' `Transformer2DModel` for continuous inputs.
///
/// Both kinds of projection run on the tokens [B, H*W, C]: SD 1.x's 1x1 convolutions on the
/// feature map are the same sums as a linear layer with their [C, C] weight on the tokens (only
/// the order of the additions may differ). The tokens come straight out of the GroupNorm
/// ([`GroupNorm::forward_tokens`]) and go back into the feature map with the residual added in
/// one pass ([`tokens_to_map_add`]): the permuted copies in between were candle's one-thread
/// strided copies of the whole feature map.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    /// Loads `attentions.N` of a UNet block.
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        let proj = |name: &str| -> candle_core::Result<Linear> {
            let vb = vb.pp(name);
            if cfg.use_linear_projection {
                return linear(c, c, vb);
            }
            // The 1x1 convolution's [C, C, 1, 1] weight as a linear layer's [C, C] (a view).
            let weight = vb.get((c, c, 1, 1), "weight")?.squeeze(3)?.squeeze(2)?;
            Linear::new(candle_nn::Linear::new(weight, Some(vb.get(c, "bias")?)))
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    cfg.heads,
                    cfg.context_dim,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// `xs` [B, C, H, W], `context` [B, M, Cc].
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let mut tokens = self.proj_in.forward(&self.norm.forward_tokens(xs)?)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        tokens_to_map_add(&self.proj_out.forward(&tokens)?, xs)
    }
}
