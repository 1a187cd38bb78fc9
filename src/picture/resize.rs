//! Pillow's Lanczos resize (`Image.resize(size, Image.LANCZOS)` on 8-bit images), bit for bit.
//!
//! diffusers' `VaeImageProcessor` resizes init images and masks with it, so matching diffusers'
//! latents from an image that is not already at the output size means matching its bytes. Owned
//! here because no crate reproduces Pillow's arithmetic (the `image` crate's Lanczos filters in f32
//! and rounds differently): Pillow computes each output pixel's filter weights in f64 (support 3,
//! widened by the scale when shrinking), normalises them, converts them to fixed point with 22
//! fractional bits, and resizes in two passes, horizontal then vertical, each rounding to 8 bits
//! (`libImaging/Resample.c` of Pillow 13.0.0, the version the fixtures pin: `precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`,
//! `ImagingResampleInner`, whose pass order Pillow 13 changed).

/// Fractional bits of the fixed-point weights (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// The Lanczos filter's support (`LANCZOS.support`).
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// `lanczos_filter`: the sinc truncated by a sinc three times wider, on [-3, 3).
fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One pass's filter: for each output index, the first input index and the fixed-point weights
/// of the inputs from there on.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` samples to `out_size`.
fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; the values below zero are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = lanczos((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, out) in row.iter_mut().enumerate().take(n) {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            *out = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coefficients {
        bounds,
        ksize,
        weights,
    }
}

/// `clip8`: the fixed-point sum back to a byte (arithmetic shift, then clamp).
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along rows (`horizontal`) or columns: `src` is `w` x `h` x `channels`, the output
/// has `out` samples along the pass's axis and, across it, the `across` lines from `first` on.
#[allow(clippy::too_many_arguments)]
fn pass(
    src: &[u8],
    w: usize,
    channels: usize,
    c: &Coefficients,
    horizontal: bool,
    first: usize,
    across: usize,
) -> Vec<u8> {
    let out_len = c.bounds.len();
    let (ow, oh) = if horizontal {
        (out_len, across)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; ow * oh * channels];
    for oy in 0..oh {
        for ox in 0..ow {
            let (i, line) = if horizontal {
                (ox, oy + first)
            } else {
                (oy, ox)
            };
            let (start, n) = c.bounds[i];
            let k = &c.weights[i * c.ksize..][..n];
            for ch in 0..channels {
                let mut ss = 1i64 << (PRECISION_BITS - 1);
                for (j, &kj) in k.iter().enumerate() {
                    let at = if horizontal {
                        (line * w + start + j) * channels
                    } else {
                        ((start + j) * w + line) * channels
                    };
                    ss += i64::from(src[at + ch]) * i64::from(kj);
                }
                out[(oy * ow + ox) * channels + ch] = clip8(ss);
            }
        }
    }
    out
}

/// Resizes an 8-bit image of `channels` interleaved channels from `width` x `height` to
/// `out_width` x `out_height` as Pillow 13's `resize(..., Image.LANCZOS)` does for modes `L` and
/// `RGB` (a same-size resize returns a copy, as Pillow's does). Pillow runs the horizontal pass
/// first (over only the rows the vertical pass reads) unless the height shrinks by more than twice
/// as many pixels as the width does; the order changes the result through the rounding between
/// the passes. Panics if `pixels` is not `width * height * channels` bytes or a size is zero.
pub fn lanczos_resize(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    out_height: usize,
) -> Vec<u8> {
    assert_eq!(pixels.len(), width * height * channels, "image size");
    assert!(width > 0 && height > 0 && out_width > 0 && out_height > 0);
    let need_h = out_width != width;
    let need_v = out_height != height;
    let shrink_h = height as i64 - out_height as i64;
    let shrink_w = width as i64 - out_width as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > shrink_w * 2);
    let vert = coefficients(height, out_height);
    let horiz = coefficients(width, out_width);
    if horizontal_first {
        let mut img = pixels.to_vec();
        let mut vert = vert;
        if need_h {
            // Only the input rows the vertical pass reads go through the horizontal one.
            let first = vert.bounds[0].0;
            let last = vert.bounds[out_height - 1].0 + vert.bounds[out_height - 1].1;
            img = pass(pixels, width, channels, &horiz, true, first, last - first);
            for b in &mut vert.bounds {
                b.0 -= first;
            }
        }
        if need_v {
            let w = if need_h { out_width } else { width };
            img = pass(&img, w, channels, &vert, false, 0, 0);
        }
        img
    } else {
        let mut img = pass(pixels, width, channels, &vert, false, 0, 0);
        if need_h {
            img = pass(&img, width, channels, &horiz, true, 0, out_height);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let px: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(lanczos_resize(&px, 5, 4, 3, 5, 4), px);
    }

    #[test]
    fn a_flat_image_stays_flat_and_weights_sum_to_one() {
        let px = vec![200u8; 37 * 23];
        for (w, h) in [(16, 16), (74, 9), (5, 40)] {
            assert!(lanczos_resize(&px, 37, 23, 1, w, h)
                .iter()
                .all(|&v| v == 200));
        }
        for (i, o) in [(37, 16), (16, 37), (1000, 8)] {
            let c = coefficients(i, o);
            for xx in 0..o {
                let s: i64 = c.weights[xx * c.ksize..][..c.bounds[xx].1]
                    .iter()
                    .map(|&v| i64::from(v))
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                    "{i}->{o} {xx}: {s}"
                );
            }
        }
    }
}
