//! Pictures that come in: init images and masks for image-to-image and inpainting. Reading them
//! (PNG, JPEG, WebP through the `image` crate, with a pixel limit checked before decoding) and what
//! diffusers' `VaeImageProcessor` does to them before the VAE sees them: Pillow's Lanczos resize
//! ([`resize`]), Pillow's grey conversion, `x / 255`, then `2x - 1` for images and a 0.5 threshold
//! for masks.
//!
//! What matches Pillow exactly: PNG decoding (lossless), the resize and the grey conversion, so
//! diffusers' latents are reproduced from a PNG at any size. What may not: JPEG and WebP decoders
//! differ in their last bits (Pillow uses libjpeg-turbo and libwebp), 16-bit images are reduced to
//! 8 bits by the `image` crate's rounding, and an alpha channel is dropped before resizing (as
//! Pillow's `convert("RGB")`; diffusers would resize RGBA premultiplied, then fail on 4 channels).

pub mod resize;

use std::io::Cursor;
use std::path::Path;

use crate::error::{Error, Result};

/// The most pixels an input picture may have (a 8192 x 8192 image, 192 MiB as RGB): larger ones
/// are refused from their header, before any decoding.
pub const MAX_PIXELS: u64 = 8192 * 8192;
/// The largest input file read (a compressed picture of [`MAX_PIXELS`] is far smaller).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// An 8-bit picture: `channels` (1 = grey, 3 = RGB) interleaved values per pixel, rows top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `width * height * channels` bytes.
    pub pixels: Vec<u8>,
}

impl Picture {
    /// A picture from its bytes; `None` unless the sizes agree and `channels` is 1 or 3.
    pub fn new(width: usize, height: usize, channels: usize, pixels: Vec<u8>) -> Option<Self> {
        let ok = matches!(channels, 1 | 3)
            && width > 0
            && height > 0
            && width.checked_mul(height)?.checked_mul(channels)? == pixels.len();
        ok.then_some(Self {
            width,
            height,
            channels,
            pixels,
        })
    }

    /// Pillow's `resize((width, height), Image.LANCZOS)`.
    pub fn resized(&self, width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            channels: self.channels,
            pixels: resize::lanczos_resize(
                &self.pixels,
                self.width,
                self.height,
                self.channels,
                width,
                height,
            ),
        }
    }

    /// Pillow's `convert("RGB")` of a grey or RGB picture.
    pub fn to_rgb(&self) -> Self {
        if self.channels == 3 {
            return self.clone();
        }
        Self {
            channels: 3,
            pixels: self.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            ..*self
        }
    }

    /// Pillow's `convert("L")`: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16` (ITU-R 601-2 luma).
    pub fn to_gray(&self) -> Self {
        if self.channels == 1 {
            return self.clone();
        }
        let pixels = self
            .pixels
            .chunks_exact(3)
            .map(|p| {
                let l = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
                ((l + 0x8000) >> 16) as u8
            })
            .collect();
        Self {
            channels: 1,
            pixels,
            ..*self
        }
    }

    /// `VaeImageProcessor`'s default size for it: width and height rounded down to a multiple of
    /// `factor` (`None` if that leaves nothing).
    pub fn default_size(&self, factor: usize) -> Option<(usize, usize)> {
        let (w, h) = (self.width / factor * factor, self.height / factor * factor);
        (w > 0 && h > 0).then_some((w, h))
    }
}

/// A picture read from a file, with what the metadata records about it.
#[derive(Debug, Clone)]
pub struct LoadedPicture {
    /// The decoded pixels (grey or RGB; alpha dropped).
    pub picture: Picture,
    /// SHA-256 of the file's bytes, lower-case hex.
    pub sha256: String,
    /// Whether the file had an alpha channel (dropped).
    pub had_alpha: bool,
}

/// Reads and decodes a picture; `what` names the flag in errors (`--init-image`, `--mask`). A
/// missing or unreadable file, an unknown or corrupt format, or more than [`MAX_PIXELS`] pixels is
/// a usage error (exit 2) naming the file.
pub fn load(what: &str, path: &Path) -> Result<LoadedPicture> {
    let bad = |reason: String| Error::usage(format!("{what} {}: {reason}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| Error::input(what, path, &e))?;
    if meta.is_dir() {
        return Err(bad("is a directory, not a file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad(format!(
            "{} bytes is larger than the {} MiB altdiff reads",
            meta.len(),
            MAX_FILE_BYTES >> 20
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::input(what, path, &e))?;
    let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    let picture = decode(&bytes).map_err(bad)?;
    Ok(LoadedPicture { sha256, ..picture })
}

/// Decodes picture bytes (the format guessed from them), refusing more than [`MAX_PIXELS`] pixels
/// from the header.
pub fn decode(bytes: &[u8]) -> std::result::Result<LoadedPicture, String> {
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err("not a picture altdiff can read (PNG, JPEG or WebP)".into());
    }
    let (w, h) = r
        .into_dimensions()
        .map_err(|e| format!("cannot read the picture: {e}"))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_PIXELS {
        return Err(format!(
            "{w}x{h} is {pixels} pixels, more than the {MAX_PIXELS} altdiff reads \
             (8192 x 8192); shrink it first"
        ));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(pixels * 16 + (64 << 20));
    r.limits(limits);
    let img = r
        .decode()
        .map_err(|e| format!("cannot decode the picture: {e}"))?;
    let had_alpha = img.color().has_alpha();
    let gray = !img.color().has_color();
    let (width, height) = (img.width() as usize, img.height() as usize);
    let picture = if gray {
        Picture::new(width, height, 1, img.into_luma8().into_raw())
    } else {
        Picture::new(width, height, 3, img.into_rgb8().into_raw())
    }
    .ok_or_else(|| "the decoded picture is empty".to_string())?;
    Ok(LoadedPicture {
        picture,
        sha256: String::new(),
        had_alpha,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_conversion_is_pillows() {
        let p = Picture::new(3, 1, 3, vec![255, 255, 255, 255, 0, 0, 10, 200, 30]).unwrap();
        // Pillow: Image.new("RGB", ...).convert("L") gives 255, 76, 124 for these.
        assert_eq!(p.to_gray().pixels, vec![255, 76, 124]);
        assert_eq!(p.to_gray().to_rgb().pixels[3..6], [76, 76, 76]);
    }

    #[test]
    fn default_size_rounds_down() {
        let p = Picture::new(70, 45, 1, vec![0; 70 * 45]).unwrap();
        assert_eq!(p.default_size(8), Some((64, 40)));
        let tiny = Picture::new(7, 45, 1, vec![0; 7 * 45]).unwrap();
        assert_eq!(tiny.default_size(8), None);
    }

    #[test]
    fn garbage_is_refused() {
        let e = decode(b"not an image at all").unwrap_err();
        assert!(e.contains("not a picture"), "{e}");
        // (Huge headers: tests/img2img.rs.)
    }
}
