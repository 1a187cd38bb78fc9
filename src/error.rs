//! The library's one error type.
//!
//! Every variant carries enough context (a file, a field, a tensor name, a step) for a one-line message
//! that tells the user what is wrong. The binary maps variants to exit codes through [`Error::exit_code`].

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in altdiff's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value or option combination that is not valid.
    #[error("{0}")]
    Usage(String),

    /// A file or directory could not be read or written.
    #[error("{}: {source}{}", path.display(), io_hint(source))]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file that does not parse.
    #[error("{}: invalid JSON: {source}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },

    /// A configuration value that altdiff does not support or that is inconsistent.
    #[error("{}: field `{field}`: {message}", file.display())]
    Config {
        /// The configuration file.
        file: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// Something is missing from a model directory.
    #[error("{}: {message}", path.display())]
    Model {
        /// The file or directory involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The model hub refused or failed a request.
    #[error("{repo}: {message}")]
    Hub {
        /// The repository.
        repo: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// The tokenizer could not be loaded or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A tensor operation failed; `context` says which step of the work it was.
    #[error("{context}: {source}{}", oom_hint(&source.to_string()))]
    Tensor {
        /// What altdiff was doing.
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },

    /// The sampler produced non-finite values.
    #[error("{0}")]
    Numerics(String),

    /// Ctrl-C (SIGINT) or SIGTERM asked the run to stop.
    #[error("interrupted")]
    Interrupted,
}

/// What to do about a full disk.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (free some space, then rerun with --skip-existing to finish the batch)"
        }
        _ => "",
    }
}

/// The advice given with an allocation failure.
pub const OOM_ADVICE: &str =
    "try a smaller --height / --width, fewer images at once (--num-images, \
     --batch-size 1), --load-policy per-stage, or --device cpu if a GPU ran out";

/// What to do when a device runs out of memory (CUDA's and Metal's errors come back as tensor
/// errors; the CPU's allocation failures are reported by the binary's allocator).
fn oom_hint(message: &str) -> String {
    let m = message.to_ascii_lowercase();
    if m.contains("out of memory") || m.contains("out_of_memory") || m.contains("outofmemory") {
        format!(" (out of memory: {OOM_ADVICE})")
    } else {
        String::new()
    }
}

impl Error {
    /// Shorthand for [`Error::Usage`].
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// An input file that cannot be read (a missing file, a directory, no permission): a problem
    /// found before any work, so exit code 2. `what` names where the path came from (a flag such
    /// as `--prompt-file`, or empty for a positional argument).
    pub fn input(what: &str, path: &std::path::Path, source: &std::io::Error) -> Self {
        let reason = match source.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::IsADirectory => "is a directory, not a file".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => source.to_string(),
        };
        let what = if what.is_empty() {
            String::new()
        } else {
            format!("{what} ")
        };
        Error::Usage(format!("{what}{}: {reason}", path.display()))
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The process exit code this error maps to: 2 for problems found before any work (usage,
    /// configuration, model files), 1 for failures while working, 130 for an interruption.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::Json { .. }
            | Error::Config { .. }
            | Error::Model { .. }
            | Error::Hub { .. }
            | Error::Tokenizer(_) => 2,
            Error::Io { .. } | Error::Tensor { .. } | Error::Numerics(_) => 1,
            Error::Interrupted => 130,
        }
    }
}

/// Adds context to candle results.
pub trait TensorContext<T> {
    /// Wraps a candle error with a description of what was being done.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> TensorContext<T> for std::result::Result<T, candle_core::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Tensor {
            context: what(),
            source: without_backtrace(source),
        })
    }
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set and prints it as part of
/// the message; a user-facing error stays one line, so drop it.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_says_what_to_do() {
        let e = Error::Io {
            path: PathBuf::from("out/x.png"),
            source: std::io::Error::from_raw_os_error(28),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("out/x.png: No space left on device"),
            "{msg}"
        );
        assert!(msg.contains("rerun with --skip-existing"), "{msg}");
        assert_eq!(e.exit_code(), 1);
        let other = Error::Io {
            path: PathBuf::from("x"),
            source: std::io::Error::from_raw_os_error(13),
        };
        assert!(!other.to_string().contains("--skip-existing"));
    }

    #[test]
    fn a_device_out_of_memory_gets_the_advice() {
        // How candle reports CUDA's and Metal's allocation failures.
        for text in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "Metal error Failed to create metal resource: Buffer (out of memory)",
        ] {
            let e = Error::Tensor {
                context: "denoising at timestep 981".into(),
                source: candle_core::Error::Msg(text.into()),
            };
            let msg = e.to_string();
            assert!(
                msg.contains("(out of memory: try a smaller --height / --width"),
                "{msg}"
            );
            assert_eq!(msg.lines().count(), 1);
        }
        let e = Error::Tensor {
            context: "x".into(),
            source: candle_core::Error::Msg("shape mismatch".into()),
        };
        assert!(!e.to_string().contains("out of memory"));
    }

    #[test]
    fn unreadable_inputs_name_the_flag_and_exit_2() {
        let e = Error::input(
            "--prompt-file",
            std::path::Path::new("/x.txt"),
            &std::io::Error::from_raw_os_error(2),
        );
        assert_eq!(e.to_string(), "--prompt-file /x.txt: no such file");
        assert_eq!(e.exit_code(), 2);
        let dir = std::fs::read(std::env::temp_dir()).unwrap_err();
        let e = Error::input("", std::env::temp_dir().as_path(), &dir);
        assert!(
            e.to_string().ends_with(": is a directory, not a file"),
            "{e}"
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Interrupted.exit_code(), 130);
        assert_eq!(Error::usage("x").exit_code(), 2);
        assert_eq!(Error::Numerics("x".into()).exit_code(), 1);
    }
}
