//! Writing images: PNG with a text chunk of the generation parameters, written to a temporary file in
//! the target directory and then linked into place, so a crash never leaves half an image and an
//! existing file is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pipeline::RgbImage;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes `img` as PNG with `text` chunks (keyword, UTF-8 value).
pub fn encode_png(img: &RgbImage, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let enc_err = |e: png::EncodingError| Error::Io {
        path: PathBuf::from("<png>"),
        source: std::io::Error::other(e.to_string()),
    };
    {
        let mut enc = png::Encoder::new(&mut buf, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_itxt_chunk(k.to_string(), v.to_string())
                .map_err(enc_err)?;
        }
        let mut w = enc.write_header().map_err(enc_err)?;
        w.write_image_data(&img.pixels).map_err(enc_err)?;
        w.finish().map_err(enc_err)?;
    }
    Ok(buf)
}

/// A filesystem-safe, length-capped form of `prompt` that keeps its own script.
pub fn slug(prompt: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in prompt.chars() {
        if c.is_alphanumeric() {
            out.push(c);
            dash = false;
        } else if !dash && !out.is_empty() {
            out.push('-');
            dash = true;
        }
        if out.chars().count() >= max_chars {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "image".into()
    } else {
        out
    }
}

/// Writes `bytes` to `dir/name`, or to `dir/stem-N.ext` for the first free N when the name is taken.
/// Returns the path written.
pub fn write_new_file(target: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!(
        ".altdiff-{}-{}.tmp",
        std::process::id(),
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image")
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        let stem = target
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image");
        let ext = target.extension().and_then(|s| s.to_str()).unwrap_or("png");
        for n in 0..10_000 {
            let candidate = if n == 0 {
                target.to_path_buf()
            } else {
                dir.join(format!("{stem}-{n}.{ext}"))
            };
            // A hard link fails if the name exists: no check-then-write race.
            match std::fs::hard_link(&tmp, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(_) if !candidate.exists() => {
                    // File systems without hard links: rename, having just checked the name is free.
                    std::fs::rename(&tmp, &candidate).map_err(io_err(&candidate))?;
                    return Ok(candidate);
                }
                Err(_) => continue,
            }
        }
        Err(Error::Io {
            path: target.to_path_buf(),
            source: std::io::Error::other("no free file name"),
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_keeps_scripts_and_caps_length() {
        assert_eq!(
            slug("un renard roux, dans la neige!", 40),
            "un-renard-roux-dans-la-neige"
        );
        assert_eq!(slug("一只在雪地里的红狐狸", 4), "一只在雪");
        assert_eq!(slug("  ...  ", 10), "image");
    }

    #[test]
    fn never_overwrites() {
        let dir = std::env::temp_dir().join(format!("altdiff-out-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = write_new_file(&dir.join("x.png"), b"one").unwrap();
        let b = write_new_file(&dir.join("x.png"), b"two").unwrap();
        assert_eq!(a, dir.join("x.png"));
        assert_eq!(b, dir.join("x-1.png"));
        assert_eq!(std::fs::read(&a).unwrap(), b"one");
        assert_eq!(std::fs::read(&b).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
