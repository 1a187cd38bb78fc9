//! f32 <-> bf16 conversion of whole buffers on the CPU, for the bf16 kernels' inputs and outputs.
//!
//! The kernels compute in f32 and round once to bf16 at the end (a convolution's or linear
//! layer's output, attention's probabilities and output, GroupNorm's result). half's
//! `bf16::from_f32` branches on every value, so the compiler leaves it scalar, or four lanes wide
//! outside a `target_feature` function: that was 3-4 % of a bf16 UNet step. `round` is the
//! same function without the branch (bit-identical, NaN included; tested against half on
//! every class of input), run here through the crate's pulp dispatch at the CPU's full vector
//! width and, for large buffers, on all threads.

use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::{vectorized, Vectorized};

/// Values per parallel task (256 KiB of f32).
const CHUNK: usize = 1 << 16;

/// `x` rounded to the nearest bf16, ties to even; NaN stays NaN (made quiet), exactly as half's
/// `bf16::from_f32`, written without branches so that it vectorises.
#[inline(always)]
pub(crate) fn round(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    let bits = if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    };
    bf16::from_bits(bits as u16)
}

/// An element type the f32-computing kernels read and write (GEGLU, GroupNorm): f32 itself, or
/// bf16 widened on reading and rounded ([`round`]) on writing.
pub(crate) trait Value: Copy + Default + Send + Sync {
    /// Whether the values are bf16 (kernels that may multiply in bf16 ask).
    const BF16: bool = false;
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
    /// `src` as f32 values: itself for f32, else widened into `buf` (at least as long).
    #[inline(always)]
    fn widen<'b>(src: &'b [Self], buf: &'b mut [f32]) -> &'b [f32] {
        let buf = &mut buf[..src.len()];
        for (d, s) in buf.iter_mut().zip(src) {
            *d = s.get();
        }
        buf
    }
    /// 16 values from `p`, widened to f32 (AVX-512 kernels' loads).
    ///
    /// # Safety
    /// `p` points at 16 readable values (possibly unaligned); the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Value for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn widen<'b>(src: &'b [f32], _: &'b mut [f32]) -> &'b [f32] {
        src
    }
    #[inline(always)]
    fn put(v: f32) -> f32 {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Value for bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn put(v: f32) -> bf16 {
        round(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise: 16 bf16 are 256 bits; each widened by its place in the
        // high half of an f32, as `get` does.
        unsafe {
            let bits = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
        }
    }
}

/// Converts `src` into `dst` (the same length): rounds f32 to bf16, or widens bf16 to f32.
struct Convert<'a, S, D> {
    src: &'a [S],
    dst: &'a mut [MaybeUninit<D>],
}

impl<S: Value, D: Value> Vectorized for Convert<'_, S, D> {
    #[inline(always)]
    fn run(self) {
        for (d, s) in self.dst.iter_mut().zip(self.src) {
            d.write(D::put(s.get()));
        }
    }
}

/// Runs `task` over matching chunks of `src` and `dst`, in parallel when there are several.
fn chunked<S: Sync, D: Send>(
    src: &[S],
    dst: &mut [MaybeUninit<D>],
    task: impl Fn(&[S], &mut [MaybeUninit<D>]) + Sync,
) {
    assert_eq!(src.len(), dst.len(), "convert: lengths differ");
    if src.len() > CHUNK {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| task(s, d));
    } else {
        task(src, dst);
    }
}

/// A vector of `n` values whose every element `fill` writes (a fresh buffer's pages are then faulted
/// in by writes alone, without zeroing them first in user space).
///
/// # Safety
/// `fill` must write every element of the slice it is given (or panic).
pub(crate) unsafe fn filled<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all of the first n elements (the caller's promise).
    unsafe { out.set_len(n) };
    out
}

/// `src` rounded to bf16 (as half's `bf16::from_f32`).
pub fn to_bf16(src: &[f32]) -> Vec<bf16> {
    // SAFETY: `chunked` covers the whole slice (or panics) and `Convert` writes each element.
    unsafe {
        filled(src.len(), |dst| {
            chunked(src, dst, |src, dst| vectorized(Convert { src, dst }))
        })
    }
}

/// `src` rounded to bf16 into `dst`, which has the same length.
pub fn round_into(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: MaybeUninit<bf16> has bf16's layout, and only initialised values are written.
    let dst = unsafe { &mut *(dst as *mut [bf16] as *mut [MaybeUninit<bf16>]) };
    chunked(src, dst, |src, dst| vectorized(Convert { src, dst }))
}

/// `src` rounded to bf16 into the uninitialised `dst` (the same length), on this thread.
pub(crate) fn round_into_uninit(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len(), "convert: lengths differ");
    vectorized(Convert { src, dst })
}

/// `src` widened to f32 (exact).
pub fn to_f32(src: &[bf16]) -> Vec<f32> {
    // SAFETY: as in `to_bf16`.
    unsafe {
        filled(src.len(), |dst| {
            chunked(src, dst, |src, dst| vectorized(Convert { src, dst }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class of f32: zeros, subnormals, ties (even and odd), values that round up into the
    /// next binade or to infinity, infinities, NaNs with and without the quiet bit, both signs.
    fn specials() -> Vec<u32> {
        let mut v = vec![
            0x0000_0000,
            0x0000_0001,
            0x007F_FFFF,
            0x0080_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x3F80_7FFF,
            0x3FFF_FFFF,
            0x7F7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0x7F80_0001,
            0x7FC0_0000,
            0x7FFF_FFFF,
        ];
        let neg: Vec<u32> = v.iter().map(|b| b | 0x8000_0000).collect();
        v.extend(neg);
        v
    }

    #[test]
    fn round_is_halfs_from_f32_bit_for_bit() {
        let mut bits = specials();
        let mut x = 0x9E37_79B9u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
        }
        for &b in &bits {
            let v = f32::from_bits(b);
            assert_eq!(round(v).to_bits(), bf16::from_f32(v).to_bits(), "{b:#010x}");
        }
        // The buffer functions, serial and chunked in parallel, agree with the scalar one.
        let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let got = to_bf16(&values);
        let mut into = vec![bf16::ZERO; values.len()];
        round_into(&values, &mut into);
        for ((v, g), i) in values.iter().zip(&got).zip(&into) {
            assert_eq!(g.to_bits(), bf16::from_f32(*v).to_bits());
            assert_eq!(i.to_bits(), g.to_bits());
        }
        assert_eq!(to_bf16(&values[..5]).len(), 5);
    }

    #[test]
    fn widening_is_exact() {
        let values: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let wide = to_f32(&values);
        for (v, w) in values.iter().zip(&wide) {
            if v.is_nan() {
                // half also sets the quiet bit of a signalling NaN; here it stays as it was.
                assert!(w.is_nan());
            } else {
                assert_eq!(w.to_bits(), v.to_f32().to_bits());
            }
        }
        assert!(to_f32(&[]).is_empty());
    }
}
