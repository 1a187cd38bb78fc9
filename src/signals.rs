//! Signals: Ctrl-C and a closed stdout.
//!
//! The first SIGINT (or SIGTERM) asks the run to stop at the next safe point (between denoising
//! steps, before decoding, between batches), so the image in progress is abandoned before any file
//! of it exists and the finished images stay; a second one ends the process at once. The handler
//! only stores to an atomic (async-signal-safe); [`requested`] is polled by the generation loop.
//!
//! SIGPIPE gets its default action back (Rust ignores it, which turns `altdiff ... --json | head`
//! into write errors): the process ends quietly when the reader goes away, as Unix tools do, and
//! since a path is printed only after its image is complete, no half-written file is left.
//!
//! Nothing is installed until [`install`] is called (the binary does, before running a command).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether an interruption was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks for an interruption, as a SIGINT does (for tests and embedders).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // Second signal: give up now, as the user insists (exit code 128 + signal number).
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the SIGINT / SIGTERM handlers and restores SIGPIPE's default action (Unix; elsewhere
/// Ctrl-C keeps its default effect).
pub fn install() {
    #[cfg(unix)]
    {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe;
        // SIG_DFL for SIGPIPE is the process's state before the Rust runtime changed it.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                libc::signal(sig, handler);
            }
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}
