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

/// The default file-name template.
pub const DEFAULT_TEMPLATE: &str = "{index:05}-{image}-{lang}-{seed}-{slug}.png";

/// The values a file-name template can use.
#[derive(Debug, Clone, Default)]
pub struct NameFields {
    /// Global position of the prompt (0-based, the same whatever the shard).
    pub index: usize,
    /// Image number within the prompt (0-based).
    pub image: usize,
    /// Line of the prompt file (0 for `--prompt`).
    pub line: usize,
    /// Language code.
    pub lang: String,
    /// Seed (or `latents`).
    pub seed: String,
    /// Slug of the prompt.
    pub slug: String,
    /// Steps.
    pub steps: usize,
    /// Scheduler name.
    pub scheduler: String,
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
}

/// A parsed `--name-template`: literal text and `{field}` / `{field:05}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field {
        name: String,
        width: usize,
        zero: bool,
    },
}

const FIELDS: [&str; 10] = [
    "index",
    "image",
    "line",
    "lang",
    "seed",
    "slug",
    "steps",
    "scheduler",
    "width",
    "height",
];

impl NameTemplate {
    /// Parses a template; unknown fields and unbalanced braces are usage errors.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |m: String| Error::usage(format!("--name-template {template:?}: {m}"));
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("a `{` is not closed".into()))?
                + open;
            let spec = &rest[open + 1..close];
            let (name, fmt) = spec.split_once(':').unwrap_or((spec, ""));
            if !FIELDS.contains(&name) {
                return Err(bad(format!(
                    "unknown field `{name}` (known: {})",
                    FIELDS.join(", ")
                )));
            }
            let zero = fmt.starts_with('0');
            let width = if fmt.is_empty() {
                0
            } else {
                fmt.parse::<usize>()
                    .ok()
                    .filter(|w| *w <= 32)
                    .ok_or_else(|| bad(format!("`{spec}`: the format must be a width like 05")))?
            };
            parts.push(Part::Field {
                name: name.to_string(),
                width,
                zero,
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(bad("a `}` has no `{`".into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let t = NameTemplate { parts };
        if t.parts
            .iter()
            .any(|p| matches!(p, Part::Text(x) if x.contains('/') || x.contains('\\')))
        {
            return Err(bad("file names cannot contain path separators".into()));
        }
        Ok(t)
    }

    /// The file name for `f` (`.png` appended when the template has no extension).
    pub fn render(&self, f: &NameFields) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field { name, width, zero } => {
                    let v = match name.as_str() {
                        "index" => f.index.to_string(),
                        "image" => f.image.to_string(),
                        "line" => f.line.to_string(),
                        "lang" => f.lang.clone(),
                        "seed" => f.seed.clone(),
                        "slug" => f.slug.clone(),
                        "steps" => f.steps.to_string(),
                        "scheduler" => f.scheduler.clone(),
                        "width" => f.width.to_string(),
                        _ => f.height.to_string(),
                    };
                    let pad = width.saturating_sub(v.chars().count());
                    if *zero && v.chars().all(|c| c.is_ascii_digit()) {
                        out.push_str(&"0".repeat(pad));
                    }
                    out.push_str(&v);
                }
            }
        }
        let out: String = out
            .chars()
            .map(|c| {
                if c == '/' || c == '\\' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        if out.to_ascii_lowercase().ends_with(".png") {
            out
        } else {
            out + ".png"
        }
    }
}

/// The most bytes a slug takes in a file name (most file systems allow 255 bytes a name; Thai or
/// Devanagari take three bytes a character and more than one character a letter).
pub const MAX_SLUG_BYTES: usize = 120;

/// A filesystem-safe, length-capped form of `prompt` that keeps its own script: letters and digits
/// are kept with the combining marks that belong to them (Thai vowels and tones, Devanagari
/// matras, Arabic harakat, accents), since whole grapheme clusters are kept or dropped, never cut;
/// every run of anything else (spaces, punctuation, emoji) becomes one `-`. At most `max_chars`
/// clusters and [`MAX_SLUG_BYTES`] bytes.
pub fn slug(prompt: &str, max_chars: usize) -> String {
    use unicode_segmentation::UnicodeSegmentation;
    let mut out = String::new();
    let mut clusters = 0;
    let mut dash = false;
    for g in prompt.graphemes(true) {
        if g.chars().next().is_some_and(char::is_alphanumeric) {
            if out.len() + g.len() > MAX_SLUG_BYTES {
                break;
            }
            // Only letters, digits and marks: a cluster with a zero-width joiner or a variation
            // selector in it keeps just those.
            out.extend(g.chars().filter(|c| c.is_alphanumeric() || is_mark(*c)));
            clusters += 1;
            dash = false;
        } else if !dash && !out.is_empty() {
            out.push('-');
            clusters += 1;
            dash = true;
        }
        if clusters >= max_chars {
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

/// Whether `c` is a combining mark (general categories Mn, Mc, Me), for the scripts the models
/// cover: the combining blocks, and the marks of Arabic, Devanagari, Bengali, Thai, Hangul jamo
/// fillers and Japanese kana.
fn is_mark(c: char) -> bool {
    matches!(u32::from(c),
        0x0300..=0x036F | 0x0483..=0x0489 | 0x0591..=0x05C7 | 0x0610..=0x061A | 0x064B..=0x065F
        | 0x0670 | 0x06D6..=0x06ED | 0x0900..=0x0903 | 0x093A..=0x094F | 0x0951..=0x0957
        | 0x0962..=0x0963 | 0x0981..=0x0983 | 0x09BC..=0x09D7 | 0x0E31 | 0x0E34..=0x0E3A
        | 0x0E47..=0x0E4E | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x302A..=0x302F
        | 0x3099..=0x309A | 0xFE20..=0xFE2F)
}

/// Checks a batch line's `output` file name, which is relative to the output directory: not
/// absolute, no `..` (nor, for Windows' sake, a drive or a backslash), not empty, a `.png` name or
/// none (`.png` is then appended). A shared prompt file must not be able to write outside the
/// directory the user chose; [`check_inside`] checks symlinks when the file is written.
pub fn batch_output_name(name: &str) -> std::result::Result<PathBuf, String> {
    let bad = |why: &str| Err(format!("output `{name}`: {why}"));
    if name.trim().is_empty() {
        return bad("the file name is empty");
    }
    if name.chars().any(char::is_control) {
        return bad("the file name contains a control character");
    }
    if name.contains('\\') {
        return bad("use `/` between folders, not `\\`");
    }
    let path = Path::new(name);
    if path.is_absolute() || name.starts_with('/') || name.contains(':') {
        return bad(
            "must be a path relative to the output directory (--output), not an absolute path",
        );
    }
    use std::path::Component;
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return bad("must stay inside the output directory (--output): `..` is not allowed");
    }
    if name.ends_with('/') {
        return bad("names a folder, not a file");
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(path.to_path_buf()),
        Some(e) if crate::options::OTHER_IMAGE_EXTENSIONS.contains(&e) => {
            bad("altdiff writes PNG images only; use a .png name")
        }
        _ => Ok(PathBuf::from(format!("{name}.png"))),
    }
}

/// Checks that `target`, a file to be written under `dir`, really stays inside `dir` once symlinks
/// are followed: its nearest existing folder must resolve to a place inside `dir`'s. (A name that
/// exists as a symlink itself is safe: it is never written through, see [`write_new_file`] and
/// [`write_replacing`].)
pub fn check_inside(dir: &Path, target: &Path) -> Result<()> {
    let Ok(root) = std::fs::canonicalize(dir) else {
        // The output directory does not exist yet, so nothing inside it can be a symlink.
        return Ok(());
    };
    let mut existing = parent_dir(target);
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p.to_path_buf(),
            _ => return Ok(()),
        }
    }
    let resolved = std::fs::canonicalize(&existing).map_err(io_err(&existing))?;
    if resolved.starts_with(&root) {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "{}: {} leads outside the output directory {} (to {}); not writing there",
            target.display(),
            existing.display(),
            dir.display(),
            resolved.display()
        )))
    }
}

/// The directory `target` goes in (`.` for a bare file name).
fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `dir` can be made and written in, without creating it: a probe file is created
/// (and removed at once) in `dir` or, when `dir` does not exist yet, in its nearest existing
/// ancestor, which must be a directory. So an output problem is found before any work.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    let bad = |e: std::io::Error| {
        Error::usage(format!(
            "--output {}: cannot write there: {e}",
            dir.display()
        ))
    };
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(bad(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a directory", existing.display()),
        )));
    }
    let probe = existing.join(format!(".altdiff-{}-probe.tmp", std::process::id()));
    let written = std::fs::File::create(&probe).map_err(bad);
    let _ = std::fs::remove_file(&probe);
    written.map(drop)
}

/// Checks the output target: its directory (or the file's) can be created and written.
pub fn check_target(target: &crate::options::OutputTarget) -> Result<()> {
    match target {
        crate::options::OutputTarget::Dir(d) => check_writable_dir(d),
        crate::options::OutputTarget::File(f) => check_writable_dir(&parent_dir(f)),
    }
}

/// Writes `bytes` to a temporary file next to `target` (synced to disk), hands its path to `place`,
/// and removes the temporary file whatever happened, so a failed or interrupted write (a full
/// disk) never leaves a partial file. I/O errors name `target`.
fn via_temp(
    target: &Path,
    bytes: &[u8],
    place: impl FnOnce(&Path, &Path) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let dir = parent_dir(target);
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
        let mut f = std::fs::File::create(&tmp).map_err(io_err(target))?;
        f.write_all(bytes).map_err(io_err(target))?;
        f.sync_all().map_err(io_err(target))?;
        drop(f);
        place(&tmp, &dir)
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Writes `bytes` to `target` through a temporary file and a rename, replacing what was there.
pub fn write_replacing(target: &Path, bytes: &[u8]) -> Result<PathBuf> {
    via_temp(target, bytes, |tmp, _| {
        std::fs::rename(tmp, target).map_err(io_err(target))?;
        Ok(target.to_path_buf())
    })
}

/// Writes `bytes` to `dir/name`, or to `dir/stem-N.ext` for the first free N when the name is taken.
/// Returns the path written.
pub fn write_new_file(target: &Path, bytes: &[u8]) -> Result<PathBuf> {
    via_temp(target, bytes, |tmp, dir| {
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
            match std::fs::hard_link(tmp, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(_) if !candidate.exists() => {
                    // File systems without hard links: rename, having just checked the name is free.
                    std::fs::rename(tmp, &candidate).map_err(io_err(&candidate))?;
                    return Ok(candidate);
                }
                Err(_) => continue,
            }
        }
        Err(Error::Io {
            path: target.to_path_buf(),
            source: std::io::Error::other("no free file name"),
        })
    })
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
    fn slugs_keep_combining_marks_with_their_letters() {
        // Thai: vowel and tone marks (Mn) stay on their consonants.
        assert_eq!(slug("สุนัขจิ้งจอก ในหิมะ", 48), "สุนัขจิ้งจอก-ในหิมะ");
        // Devanagari: the matras (Mc) and virama.
        assert_eq!(slug("लोमड़ी बर्फ़ में", 48), "लोमड़ी-बर्फ़-में");
        // Arabic with harakat.
        assert_eq!(slug("ثَعْلَبٌ أَحْمَر", 48), "ثَعْلَبٌ-أَحْمَر");
        // Hangul, precomposed and as conjoining jamo.
        assert_eq!(slug("붉은 여우", 48), "붉은-여우");
        assert_eq!(
            slug("\u{1112}\u{1161}\u{11AB} x", 48),
            "\u{1112}\u{1161}\u{11AB}-x"
        );
        // Decomposed accents.
        assert_eq!(slug("cafe\u{301} au lait", 48), "cafe\u{301}-au-lait");
        // Emoji (with ZWJ sequences and skin tones) are separators, never half kept.
        assert_eq!(slug("🦊 fox 👩🏽‍🚀 moon ❤️", 48), "fox-moon");
        // The cap counts clusters, so no letter loses its marks at the end.
        assert_eq!(slug("สุนัขจิ้งจอก", 3), "สุนัข");
        // And a long Devanagari prompt stays within a file name's bytes.
        let long = slug(&"लोमड़ी ".repeat(40), 48);
        assert!(long.len() <= MAX_SLUG_BYTES, "{} bytes", long.len());
        assert!(!long.ends_with('-'));
    }

    #[test]
    fn templates_render_and_reject_unknown_fields() {
        let t = NameTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        let f = NameFields {
            index: 7,
            image: 1,
            lang: "zh".into(),
            seed: "42".into(),
            slug: slug("一只在雪地里的红狐狸", 48),
            ..Default::default()
        };
        assert_eq!(t.render(&f), "00007-1-zh-42-一只在雪地里的红狐狸.png");
        assert_eq!(
            NameTemplate::parse("{seed}_{index:3}").unwrap().render(&f),
            "42_7.png"
        );
        assert!(NameTemplate::parse("{nope}").is_err());
        assert!(NameTemplate::parse("{index").is_err());
        assert!(NameTemplate::parse("a/{index}").is_err());
    }

    #[test]
    fn batch_output_names_stay_inside() {
        assert_eq!(
            batch_output_name("fox.png").unwrap(),
            PathBuf::from("fox.png")
        );
        assert_eq!(
            batch_output_name("a/fox").unwrap(),
            PathBuf::from("a/fox.png")
        );
        assert_eq!(
            batch_output_name("a/b/Fox.PNG").unwrap(),
            PathBuf::from("a/b/Fox.PNG")
        );
        for bad in [
            "../../escape.png",
            "a/../../x.png",
            "a/..",
            "/tmp/abs.png",
            "C:/x.png",
            "..\\x.png",
            "",
            " ",
            "dir/",
            "x.jpg",
            "a\u{7}b.png",
        ] {
            assert!(batch_output_name(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(batch_output_name("../x.png")
            .unwrap_err()
            .contains("inside the output directory"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_folders_that_leave_the_output_are_refused() {
        let base = std::env::temp_dir().join(format!("altdiff-inside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (out, elsewhere) = (base.join("out"), base.join("elsewhere"));
        std::fs::create_dir_all(out.join("real")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, out.join("link")).unwrap();
        std::os::unix::fs::symlink(out.join("real"), out.join("inner")).unwrap();
        assert!(check_inside(&out, &out.join("x.png")).is_ok());
        assert!(check_inside(&out, &out.join("real/new/x.png")).is_ok());
        assert!(check_inside(&out, &out.join("inner/x.png")).is_ok());
        let e = check_inside(&out, &out.join("link/x.png")).unwrap_err();
        assert!(
            e.to_string().contains("outside the output directory"),
            "{e}"
        );
        assert!(check_inside(&out, &out.join("link/deeper/x.png")).is_err());
        // A directory that does not exist yet has no symlinks in it.
        assert!(check_inside(&base.join("new"), &base.join("new/a/x.png")).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
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
