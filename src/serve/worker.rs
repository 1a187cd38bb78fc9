//! The one generation thread: it owns the loaded model ([`Session`], which is not `Sync`: candle
//! and the pipeline are synchronous), takes tasks in FIFO order and answers each on its own
//! channel. Progress goes to [`Shared`] for `/sdapi/v1/progress`; a task stops between denoising
//! steps when `/interrupt` is called, its client goes away or the server shuts down.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::engine::plan::{Group, Job};
use crate::engine::session::Session;
use crate::error::Error;
use crate::metadata::{ImageRecord, InitRecord};
use crate::pipeline::{Init, Progress};

/// What one request asks the worker for: its jobs run one after the other (webui's `n_iter`
/// batches), each with its own images (webui's `batch_size`).
pub struct Task {
    /// The jobs; each job's seed is its first image's, the others follow (seed + i).
    pub jobs: Vec<Job>,
    /// Image-to-image input.
    pub init: Option<(Init, InitRecord)>,
    /// Set when the client went away.
    pub cancel: Arc<AtomicBool>,
    /// The task's id (access log, progress).
    pub id: u64,
    /// Whether the answer carries the images (webui's `send_images`); without it and without
    /// `--output` no PNG is encoded.
    pub send_images: bool,
    /// Where the answer goes.
    pub reply: oneshot::Sender<TaskResult>,
}

/// A finished image: PNG bytes with their metadata, and the record.
pub struct Image {
    /// The task it belongs to.
    pub task: u64,
    /// Its position among the task's images.
    pub index: usize,
    /// The PNG file (empty when neither the answer nor `--output` wants it).
    pub png: Vec<u8>,
    /// Its metadata.
    pub record: ImageRecord,
}

/// A task's outcome.
pub enum TaskResult {
    /// The images (fewer than asked for when interrupted).
    Done {
        /// The images, in order.
        images: Vec<Image>,
        /// Whether `/interrupt` stopped it.
        interrupted: bool,
    },
    /// The task failed (a bad value found late, a numeric failure): the message, and whether it
    /// was the request's fault (422) or the server's (500).
    Failed {
        /// One line.
        message: String,
        /// 422 rather than 500.
        client_error: bool,
    },
    /// The server is shutting down: not run.
    ShuttingDown,
}

/// webui's progress state.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Jobs of the running task.
    pub job_count: usize,
    /// Jobs of it done.
    pub job_no: usize,
    /// Denoising step of the running job.
    pub sampling_step: usize,
    /// Its steps.
    pub sampling_steps: usize,
    /// When the running task started.
    pub started: Option<Instant>,
    /// When it started, as webui's `job_timestamp` (YYYYmmddHHMMSS, UTC).
    pub job_timestamp: String,
    /// Whether `/interrupt` stopped the last task.
    pub interrupted: bool,
    /// The running task's id.
    pub task: Option<u64>,
}

/// What the HTTP side and the worker share.
#[derive(Default)]
pub struct Shared {
    /// Progress.
    pub state: Mutex<State>,
    /// `/interrupt` was called for the running task.
    pub interrupt: AtomicBool,
    /// Tasks waiting (not running).
    pub queued: AtomicUsize,
    /// Stop: answer what is queued with 503 and abandon the running task.
    pub shutting_down: AtomicBool,
    /// Task ids.
    pub next_id: AtomicU64,
}

impl Shared {
    /// Locks the progress state (a panic while it was held does not make it unusable).
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reports steps to [`Shared`] and stops when asked.
struct TaskProgress<'a> {
    shared: &'a Shared,
    cancel: &'a AtomicBool,
}

impl Progress for TaskProgress<'_> {
    fn step(&mut self, done: usize, total: usize) {
        let mut s = self.shared.state();
        s.sampling_step = done;
        s.sampling_steps = total;
    }
    fn cancelled(&self) -> bool {
        if crate::signals::requested() {
            self.shared.shutting_down.store(true, Ordering::SeqCst);
        }
        self.shared.interrupt.load(Ordering::SeqCst)
            || self.shared.shutting_down.load(Ordering::SeqCst)
            || self.cancel.load(Ordering::SeqCst)
            || crate::signals::requested()
    }
}

/// UTC now as webui's `job_timestamp`.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs tasks until the channel closes. `save` (with `--output`) writes each image and returns a
/// message for a failure.
pub fn run(
    session: Session,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Task>,
    save: Option<impl Fn(&Image) -> Result<(), String>>,
) {
    while let Some(task) = rx.blocking_recv() {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        if shared.shutting_down.load(Ordering::SeqCst) {
            let _ = task.reply.send(TaskResult::ShuttingDown);
            continue;
        }
        if task.cancel.load(Ordering::SeqCst) {
            continue;
        }
        let id = task.id;
        shared.interrupt.store(false, Ordering::SeqCst);
        {
            let mut s = shared.state();
            *s = State {
                job_count: task.jobs.len(),
                started: Some(Instant::now()),
                job_timestamp: timestamp(),
                task: Some(id),
                ..State::default()
            };
        }
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_task(&session, &shared, &task, save.as_ref())
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            tracing::error!("task {id} panicked: {what}");
            TaskResult::Failed {
                message: format!("internal error: the generation panicked ({what})"),
                client_error: false,
            }
        });
        {
            let mut s = shared.state();
            s.interrupted = matches!(
                result,
                TaskResult::Done {
                    interrupted: true,
                    ..
                }
            );
            s.started = None;
            s.task = None;
        }
        let _ = task.reply.send(result);
    }
}

fn run_task(
    session: &Session,
    shared: &Shared,
    task: &Task,
    save: Option<&impl Fn(&Image) -> Result<(), String>>,
) -> TaskResult {
    // Fault injection for the tests of the 500 path: `ALTDIFF_SERVE_PANIC_ON=PROMPT` makes a task
    // with that prompt panic, as a bug in a job would. Unreachable unless whoever starts the
    // server sets the variable; `run`'s catch_unwind turns it into that request's 500.
    if let Ok(p) = std::env::var("ALTDIFF_SERVE_PANIC_ON") {
        if task.jobs.iter().any(|j| j.prompt == p) {
            panic!("ALTDIFF_SERVE_PANIC_ON matched the prompt");
        }
    }
    let mut images = Vec::new();
    // PNGs only for an answer that carries them or for --output.
    let wanted = task.send_images || save.is_some();
    let mut progress = TaskProgress {
        shared,
        cancel: &task.cancel,
    };
    for (k, job) in task.jobs.iter().enumerate() {
        if progress.cancelled() {
            break;
        }
        {
            let mut s = shared.state();
            s.job_no = k;
            s.sampling_step = 0;
            s.sampling_steps = job.sampling.steps;
        }
        let group = Group {
            jobs: vec![job.clone()],
            shared_seed: false,
        };
        let langs: Vec<&str> = session
            .languages(&group.jobs)
            .iter()
            .map(|d| d.code())
            .collect();
        let (noise, records) = Session::seeded_noise(&group, true);
        let out = match session.generate(
            &group.jobs,
            &langs,
            noise,
            &records,
            task.init.clone(),
            false,
            &mut progress,
        ) {
            Ok(out) => out,
            Err(Error::Interrupted) => break,
            Err(e) => {
                return TaskResult::Failed {
                    client_error: e.exit_code() == 2,
                    message: e.to_string(),
                }
            }
        };
        for m in out.made {
            let png = if !wanted {
                Ok(Vec::new())
            } else {
                m.record.chunks().and_then(|chunks| {
                    let refs: Vec<(&str, &str)> =
                        chunks.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    crate::output::encode_png(&m.rgb, &refs)
                })
            };
            let png = match png {
                Ok(p) => p,
                Err(e) => {
                    return TaskResult::Failed {
                        message: e.to_string(),
                        client_error: false,
                    }
                }
            };
            let image = Image {
                task: task.id,
                index: images.len(),
                png,
                record: m.record,
            };
            if let Some(Err(m)) = save.map(|save| save(&image)) {
                return TaskResult::Failed {
                    message: m,
                    client_error: false,
                };
            }
            images.push(image);
        }
        shared.state().job_no = k + 1;
    }
    let interrupted = progress.cancelled();
    TaskResult::Done {
        images,
        interrupted,
    }
}
