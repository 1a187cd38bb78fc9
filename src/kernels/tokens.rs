//! A transformer's tokens [B, H*W, C] back into the UNet's feature map [B, C, H, W], with the
//! residual added in the same pass (the end of diffusers' `Transformer2DModel`:
//! `output.reshape(B, H, W, C).permute(0, 3, 1, 2) + residual`).
//!
//! candle makes the permuted view contiguous with its generic strided copy (one thread, one
//! element at a time, since no two neighbours of the output are neighbours in the input) and then
//! adds the residual in a second pass over fresh memory. Here each task takes a block of channels
//! of one image and moves it through a small tile in cache, on all threads, adding the residual as
//! it writes. The values are those of candle's ops: the f32 sum, or for bf16 the sum of the two
//! bf16 values in f32 rounded once (as half's `bf16 + bf16`). The way in (tokens from the feature
//! map) is fused into the GroupNorm that precedes it ([`super::GroupNorm::forward_tokens`]).
//! Other devices and dtypes use candle's ops, which the tests use as the reference.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::convert::{filled, Value};
use super::{vectorized, Vectorized};

/// Channels per task (their output rows are contiguous).
const CHANNELS: usize = 16;
/// Positions per tile: `CHANNELS` x `POSITIONS` values read as token rows, written as channel rows.
const POSITIONS: usize = 64;

/// `tokens` [B, H*W, C] as [B, C, H, W] plus `residual` [B, C, H, W].
pub fn tokens_to_map_add(tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = residual.dims4()?;
    if tokens.dims() != [b, h * w, c] {
        candle_core::bail!(
            "tokens_to_map_add: tokens {:?} for a feature map {:?}",
            tokens.dims(),
            residual.dims()
        );
    }
    let kernel = tokens.device().is_cpu()
        && residual.device().is_cpu()
        && tokens.dtype() == residual.dtype()
        && matches!(tokens.dtype(), DType::F32 | DType::BF16);
    if kernel {
        return tokens
            .contiguous()?
            .apply_op2_no_bwd(&residual.contiguous()?, &TokensToMapAdd);
    }
    tokens
        .reshape((b, h, w, c))?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        + residual
}

struct TokensToMapAdd;

/// One image's channels `c0..c0 + n` (rows of `spatial` in `out` and `residual`).
struct Block<'a, T> {
    /// The image's tokens [spatial, C].
    tokens: &'a [T],
    residual: &'a [T],
    out: &'a mut [MaybeUninit<T>],
    c0: usize,
    channels: usize,
    spatial: usize,
}

impl<T: Value> Vectorized for Block<'_, T> {
    #[inline(always)]
    fn run(self) {
        let n = self.out.len() / self.spatial.max(1);
        let mut tile = [[0f32; POSITIONS]; CHANNELS];
        for p0 in (0..self.spatial).step_by(POSITIONS) {
            let np = POSITIONS.min(self.spatial - p0);
            for j in 0..np {
                let token = &self.tokens[(p0 + j) * self.channels + self.c0..][..n];
                for (row, &v) in tile.iter_mut().zip(token) {
                    row[j] = v.get();
                }
            }
            for (i, row) in tile.iter().enumerate().take(n) {
                let at = i * self.spatial + p0;
                let out = &mut self.out[at..at + np];
                let residual = &self.residual[at..at + np];
                for ((o, &t), &r) in out.iter_mut().zip(row).zip(residual) {
                    o.write(T::put(t + r.get()));
                }
            }
        }
    }
}

fn run<T: Value>(tokens: &[T], residual: &[T], (b, c, spatial): (usize, usize, usize)) -> Vec<T> {
    let image = c * spatial;
    let fill = |out: &mut [MaybeUninit<T>]| {
        if image == 0 {
            return;
        }
        out.par_chunks_mut(image)
            .zip(residual.par_chunks(image))
            .zip(tokens.par_chunks(image))
            .for_each(|((out, residual), tokens)| {
                out.par_chunks_mut(CHANNELS * spatial)
                    .zip(residual.par_chunks(CHANNELS * spatial))
                    .enumerate()
                    .for_each(|(blk, (out, residual))| {
                        vectorized(Block {
                            tokens,
                            residual,
                            out,
                            c0: blk * CHANNELS,
                            channels: c,
                            spatial,
                        })
                    })
            })
    };
    // SAFETY: the images' chunks cover the output; each task writes every position of each of its
    // channel rows (the tiles cover 0..spatial).
    unsafe { filled(b * image, fill) }
}

impl CustomOp2 for TokensToMapAdd {
    fn name(&self) -> &'static str {
        "altdiff-tokens-to-map-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l2.shape().dims4()?;
        let dims = (b, c, h * w);
        let out = match (s1, s2) {
            (CpuStorage::F32(t), CpuStorage::F32(r)) => CpuStorage::F32(run(
                super::contiguous(t, l1, "tokens")?,
                super::contiguous(r, l2, "residual")?,
                dims,
            )),
            (CpuStorage::BF16(t), CpuStorage::BF16(r)) => CpuStorage::BF16(run(
                super::contiguous(t, l1, "tokens")?,
                super::contiguous(r, l2, "residual")?,
                dims,
            )),
            _ => candle_core::bail!("tokens_to_map_add: both f32 or both bf16"),
        };
        Ok((out, l2.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{flat_f32, sine};

    fn t(shape: &[usize], phase: f32) -> Tensor {
        sine(shape, phase, 3.0)
    }

    /// candle's permute, copy and add, on shapes whose channels and positions end off the tiles;
    /// f32 and bf16 give exactly candle's values.
    #[test]
    fn matches_candles_permute_and_add() {
        for (b, c, h, w) in [(2, 40, 9, 11), (1, 16, 8, 8), (2, 3, 1, 70), (1, 33, 13, 5)] {
            for dtype in [DType::F32, DType::BF16] {
                let tokens = t(&[b, h * w, c], 0.3).to_dtype(dtype).unwrap();
                let residual = t(&[b, c, h, w], 1.7).to_dtype(dtype).unwrap();
                let got = tokens_to_map_add(&tokens, &residual).unwrap();
                let want = (tokens
                    .reshape((b, h, w, c))
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    + &residual)
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dtype(), dtype);
                assert_eq!(flat_f32(&got), flat_f32(&want), "{b}x{c}x{h}x{w} {dtype:?}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let tokens = t(&[1, 12, 4], 0.0);
        assert!(tokens_to_map_add(&tokens, &t(&[1, 4, 3, 5], 0.0)).is_err());
        assert!(tokens_to_map_add(&tokens, &t(&[1, 3, 3, 4], 0.0)).is_err());
    }

    /// ms per call of the transformer's way in (GroupNorm to tokens) and way out (tokens to the
    /// feature map plus the residual), candle's ops against the kernels, on m18's 64x64 and
    /// 32x32 levels (`cargo test --release --lib tokens_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark, not a test"]
    fn tokens_speed() {
        use crate::kernels::GroupNorm;
        use candle_core::Module;
        for (c, hw) in [(320, 64), (640, 32)] {
            let x = t(&[2, c, hw, hw], 0.1);
            let tokens = t(&[2, hw * hw, c], 0.9);
            let norm = GroupNorm::new(t(&[c], 1.0), t(&[c], 2.0), 32, 1e-6).unwrap();
            let time = |f: &mut dyn FnMut()| 1e3 * crate::test_support::best_time(5, f);
            let candle_in = time(&mut || {
                let n = norm.forward(&x).unwrap();
                n.permute((0, 2, 3, 1))
                    .unwrap()
                    .reshape((2, hw * hw, c))
                    .unwrap();
            });
            let ours_in = time(&mut || {
                norm.forward_tokens(&x).unwrap();
            });
            let candle_out = time(&mut || {
                let m = tokens
                    .reshape((2, hw, hw, c))
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                (m + &x).unwrap();
            });
            let ours_out = time(&mut || {
                tokens_to_map_add(&tokens, &x).unwrap();
            });
            println!(
                "{c} ch {hw}x{hw}: in {candle_in:.1} -> {ours_in:.1} ms, out {candle_out:.1} -> {ours_out:.1} ms"
            );
        }
    }
}
