//! `altdiff serve`: the model loaded once, AUTOMATIC1111 webui's HTTP API (so webui's clients work
//! unchanged) and a web page, on axum / tokio.
//!
//! The HTTP side is async; generation is not (candle is synchronous and the pipeline is not
//! `Sync`), so one worker thread owns the loaded `engine::session::Session` and takes tasks in FIFO order
//! (`worker`). Requests wait in that queue up to `--max-queue` (then 503 with `Retry-After`); a
//! client that disconnects has its task dropped, or stopped at the next denoising step if it
//! runs; `/sdapi/v1/interrupt` stops the running task between steps. SIGINT / SIGTERM stop
//! accepting connections, abandon the running task at its next step, answer the queued ones with
//! 503 and exit 0; nothing is half-written (images go through the same write-then-rename as
//! `generate`'s).
//!
//! What a request means is `api`'s; authentication (`--api-auth`, `--token-file`) is checked
//! in constant time and never logged.

pub(crate) mod api;
pub(crate) mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::engine::session::{Fetched, Session};
use crate::error::{Error, Result};
use crate::options::{DeviceChoice, LoadPolicy, ModelChoice, Precision};
use api::{GenerateBody, Limits, Refusal};
use worker::{Shared, Task, TaskResult};

/// The largest request body (an img2img upload with its mask fits).
pub const MAX_BODY: usize = 50 << 20;

/// `altdiff serve`'s validated options.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model.
    pub model: ModelChoice,
    /// The device.
    pub device: DeviceChoice,
    /// The precision.
    pub dtype: Option<Precision>,
    /// When components are loaded and freed (`keep` by default: the server's point).
    pub load_policy: LoadPolicy,
    /// The address to bind.
    pub host: String,
    /// The port (0: any free one; the address is printed).
    pub port: u16,
    /// `--api-auth` users and passwords.
    pub users: Vec<(String, String)>,
    /// `--token-file` tokens.
    pub tokens: Vec<String>,
    /// Most requests waiting (not counting the running one).
    pub max_queue: usize,
    /// Caps on a request.
    pub limits: Limits,
    /// Also save every image here, as `generate` does.
    pub output: Option<PathBuf>,
    /// `Access-Control-Allow-Origin`.
    pub cors_origin: Option<String>,
    /// One JSON access-log line per request on stdout.
    pub json_log: bool,
}

/// `--api-auth USER:PASS[,USER:PASS]`.
pub fn parse_users(s: &str) -> Result<Vec<(String, String)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok((u.to_string(), p.to_string())),
            _ => Err(Error::usage(
                "--api-auth takes USER:PASS pairs separated by commas (a pair without its `:` or with an empty part was given)",
            )),
        })
        .collect()
}

/// The tokens of a `--token-file` (one per line; blank and `#` lines skipped).
pub fn read_tokens(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::input("--token-file", path, &e))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(Error::usage(format!(
            "--token-file {}: no token in it",
            path.display()
        )));
    }
    Ok(tokens)
}

/// What the model endpoints say about the loaded model.
#[derive(Debug, Clone)]
struct ModelInfo {
    title: String,
    hash: Option<String>,
    source: String,
}

#[derive(Clone)]
struct App {
    tx: mpsc::UnboundedSender<Task>,
    shared: Arc<Shared>,
    opts: Arc<ServeOptions>,
    model: Arc<ModelInfo>,
}

/// Equal in constant time (SHA-256 of both, then every byte compared).
fn same(a: &[u8], b: &[u8]) -> bool {
    let ha = ring::digest::digest(&ring::digest::SHA256, a);
    let hb = ring::digest::digest(&ring::digest::SHA256, b);
    ha.as_ref()
        .iter()
        .zip(hb.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn authorised(opts: &ServeOptions, headers: &HeaderMap) -> bool {
    if opts.users.is_empty() && opts.tokens.is_empty() {
        return true;
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(b) = value.strip_prefix("Basic ") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
            return false;
        };
        // Every pair is compared, so the time does not say which user matched.
        let mut ok = false;
        for (u, p) in &opts.users {
            let want = format!("{u}:{p}");
            ok |= same(want.as_bytes(), &decoded);
        }
        return ok;
    }
    if let Some(t) = value.strip_prefix("Bearer ") {
        let mut ok = false;
        for token in &opts.tokens {
            ok |= same(token.as_bytes(), t.trim().as_bytes());
        }
        return ok;
    }
    false
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/internal/ping" || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    if authorised(&app.opts, req.headers()) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(json!({"detail": "Incorrect username or password"})),
    )
        .into_response();
    if !app.opts.users.is_empty() {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"altdiff\""),
        );
    }
    r
}

async fn access_log(State(app): State<App>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    if app.opts.json_log {
        let task = r
            .headers()
            .get("x-altdiff-task")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let line = json!({
            "method": method,
            "path": path,
            "status": r.status().as_u16(),
            "duration_ms": (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            "task": task,
        });
        let _ = crate::term::out_line(&line.to_string());
    }
    r
}

/// `--cors-origin`: the headers that let pages from that origin call the API.
async fn cors(State(app): State<App>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    if let Some(v) = app
        .opts
        .cors_origin
        .as_deref()
        .and_then(|o| HeaderValue::from_str(o).ok())
    {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
    }
    r
}

fn refusal(r: Refusal) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
    (status, Json(r.body())).into_response()
}

fn unavailable(message: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"detail": message})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// Sets the task's cancel flag if the handler is dropped before the answer (the client left).
struct CancelOnDrop(Arc<AtomicBool>, bool);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

async fn generate(app: App, body: Bytes, img2img: bool) -> Response {
    let parsed = GenerateBody::parse(&body).and_then(|b| {
        let planned = b.plan(&app.opts.limits, img2img)?;
        Ok((b, planned))
    });
    let (req, planned) = match parsed {
        Ok(p) => p,
        Err(r) => return refusal(r),
    };
    if app.shared.shutting_down.load(Ordering::SeqCst) {
        return unavailable("the server is shutting down");
    }
    // The running task is not counted: up to --max-queue wait behind it.
    let queued = app.shared.queued.fetch_add(1, Ordering::SeqCst);
    if queued >= app.opts.max_queue {
        app.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return unavailable(&format!(
            "the queue is full ({} waiting); try again later",
            app.opts.max_queue
        ));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let mut guard = CancelOnDrop(cancel.clone(), true);
    let (reply, answer) = oneshot::channel();
    let seed = planned.seed;
    let task_id = app.shared.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    let task = Task {
        jobs: planned.jobs,
        init: planned.init,
        cancel,
        id: task_id,
        send_images: req.send_images,
        reply,
    };
    if app.tx.send(task).is_err() {
        app.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return unavailable("the server is shutting down");
    }
    let result = answer.await;
    guard.1 = false;
    let mut response = match result {
        Err(_) | Ok(TaskResult::ShuttingDown) => unavailable("the server is shutting down"),
        Ok(TaskResult::Done {
            interrupted: true, ..
        }) if app.shared.shutting_down.load(Ordering::SeqCst) || crate::signals::requested() => {
            unavailable("the server is shutting down")
        }
        Ok(TaskResult::Failed {
            message,
            client_error: true,
        }) => refusal(Refusal {
            status: 422,
            field: None,
            message,
        }),
        Ok(TaskResult::Failed { message, .. }) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "GenerationError", "detail": "", "body": "", "errors": message})),
        )
            .into_response(),
        Ok(TaskResult::Done { images, .. }) => {
            let info = info_json(&req, &images, seed, &app.model);
            let b64: Vec<String> = if req.send_images {
                images
                    .iter()
                    .map(|i| base64::engine::general_purpose::STANDARD.encode(&i.png))
                    .collect()
            } else {
                Vec::new()
            };
            Json(json!({
                "images": b64,
                "parameters": GenerateBody::echo(&body),
                "info": info.to_string(),
            }))
            .into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&task_id.to_string()) {
        response.headers_mut().insert("x-altdiff-task", v);
    }
    response
}

/// webui's `Processed.js()`, for the response's `info`.
fn info_json(req: &GenerateBody, images: &[worker::Image], seed: u64, model: &ModelInfo) -> Value {
    let first = images.first().map(|i| &i.record);
    let seeds: Vec<Option<u64>> = images.iter().map(|i| i.record.seed()).collect();
    let infotexts: Vec<String> = images.iter().map(|i| i.record.webui_parameters()).collect();
    let parsed = infotexts
        .first()
        .map(|t| crate::metadata::infotext::parse(t))
        .unwrap_or_default();
    json!({
        "prompt": first.map_or("", |r| r.prompt.as_str()),
        "all_prompts": images.iter().map(|i| &i.record.prompt).collect::<Vec<_>>(),
        "negative_prompt": first.and_then(|r| r.negative_prompt.clone()).unwrap_or_default(),
        "all_negative_prompts": images.iter().map(|i| i.record.negative_prompt.clone().unwrap_or_default()).collect::<Vec<_>>(),
        "seed": seed,
        "all_seeds": seeds,
        "subseed": seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": first.map(|r| r.width),
        "height": first.map(|r| r.height),
        "sampler_name": parsed.get("Sampler"),
        "cfg_scale": first.map(|r| r.guidance),
        "steps": first.map(|r| r.steps),
        "batch_size": req.batch_size(),
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model.title,
        "sd_model_hash": model.hash,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.and_then(|r| r.init.as_ref().map(|i| i.strength)),
        "extra_generation_params": {"Schedule type": parsed.get("Schedule type")},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": "",
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": format!("altdiff {}", env!("CARGO_PKG_VERSION")),
    })
}

async fn progress(State(app): State<App>) -> Json<Value> {
    let s = app.shared.state().clone();
    let steps_total = s.job_count.max(1) * s.sampling_steps.max(1);
    let done = s.job_no * s.sampling_steps + s.sampling_step;
    let fraction = if s.started.is_some() {
        (done as f64 / steps_total as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let eta = match s.started {
        Some(t) if fraction > 0.0 => {
            let elapsed = t.elapsed().as_secs_f64();
            elapsed / fraction - elapsed
        }
        _ => 0.0,
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": app.shared.interrupt.load(Ordering::SeqCst) || s.interrupted,
            "stopping_generation": false,
            "job": if s.started.is_some() { format!("task {}", s.task.unwrap_or(0)) } else { String::new() },
            "job_count": if s.started.is_some() { s.job_count } else { 0 },
            "job_timestamp": s.job_timestamp,
            "job_no": s.job_no,
            "sampling_step": s.sampling_step,
            "sampling_steps": s.sampling_steps,
            "queued": app.shared.queued.load(Ordering::SeqCst),
        },
        "current_image": null,
        "textinfo": null,
        "current_task": s.task.map(|t| t.to_string()),
    }))
}

async fn interrupt(State(app): State<App>) -> Json<Value> {
    if app.shared.state().started.is_some() {
        app.shared.interrupt.store(true, Ordering::SeqCst);
    }
    Json(json!({}))
}

async fn sd_models(State(app): State<App>) -> Json<Value> {
    Json(json!([{
        "title": app.model.title,
        "model_name": app.model.title,
        "hash": app.model.hash,
        "sha256": null,
        "filename": app.model.source,
        "config": null,
    }]))
}

fn options_json(app: &App) -> Value {
    json!({
        "sd_model_checkpoint": app.model.title,
        "sd_checkpoint_hash": app.model.hash,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "randn_source": "CPU",
        "emphasis": "Original",
        "comma_padding_backtrack": 20,
        "pad_cond_uncond": true,
        "sd_vae": "Automatic",
    })
}

async fn get_options(State(app): State<App>) -> Json<Value> {
    Json(options_json(&app))
}

/// Setting options: values equal to what the server does are accepted, others refused by name.
async fn set_options(State(app): State<App>, body: Bytes) -> Response {
    let Ok(Value::Object(asked)) = serde_json::from_slice::<Value>(&body) else {
        return refusal(Refusal {
            status: 422,
            field: None,
            message: "the body must be a JSON object of options".into(),
        });
    };
    let current = options_json(&app);
    for (k, v) in &asked {
        let same_value = current.get(k) == Some(v)
            || (k == "sd_model_checkpoint"
                && v.as_str().is_some_and(|s| s.starts_with(&app.model.title)));
        if !same_value {
            return refusal(Refusal::field(
                k,
                format!(
                    "this server cannot change `{k}` (it has {})",
                    current.get(k).unwrap_or(&Value::Null)
                ),
            ));
        }
    }
    Json(json!({})).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route(
            "/sdapi/v1/txt2img",
            post(|State(app): State<App>, body: Bytes| generate(app, body, false))
                .options(preflight),
        )
        .route(
            "/sdapi/v1/img2img",
            post(|State(app): State<App>, body: Bytes| generate(app, body, true))
                .options(preflight),
        )
        .route(
            "/sdapi/v1/samplers",
            get(|| async { Json(api::samplers()) }),
        )
        .route(
            "/sdapi/v1/schedulers",
            get(|| async { Json(api::schedulers()) }),
        )
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(interrupt))
        .route("/internal/ping", get(|| async { Json(json!({})) }))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn_with_state(app.clone(), cors))
        .layer(middleware::from_fn_with_state(app.clone(), access_log))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// Saves an image under `--output` with the default name template, as `generate` does.
fn save_to(
    dir: &std::path::Path,
    template: &crate::output::NameTemplate,
    image: &worker::Image,
) -> std::result::Result<(), String> {
    let r = &image.record;
    // {index} is the request's task id, {image} the image's place in its answer.
    let name = template.render(&crate::output::NameFields {
        index: image.task as usize,
        image: image.index,
        line: 0,
        lang: r.lang.clone().unwrap_or_else(|| "und".into()),
        seed: r.seed().map_or_else(|| "latents".into(), |s| s.to_string()),
        slug: crate::output::slug(&r.prompt, 48),
        steps: r.steps,
        scheduler: r.scheduler.clone(),
        width: r.width,
        height: r.height,
    });
    crate::output::write_new_file(&dir.join(name), &image.png)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs the server until SIGINT / SIGTERM.
pub fn run(opts: ServeOptions, progress: bool) -> Result<()> {
    // --output: every image saved under the default name template, as `generate` does.
    let output = match &opts.output {
        Some(dir) => {
            crate::output::check_target(&crate::options::OutputTarget::Dir(dir.clone()))?;
            let template = crate::output::NameTemplate::parse(crate::output::DEFAULT_TEMPLATE)?;
            Some((dir.clone(), template))
        }
        None => None,
    };
    let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (opts.host.as_str(), opts.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| {
            Error::usage(format!(
                "--host {}: not an address this machine has",
                opts.host
            ))
        })?;
    if !addr.ip().is_loopback() && opts.users.is_empty() && opts.tokens.is_empty() {
        tracing::warn!(
            "listening on {addr} without --api-auth or --token-file: anyone who can reach it can use it"
        );
    }
    // The model loads on the worker thread, which keeps it; the port opens once it has loaded.
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::unbounded_channel::<Task>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    let worker = {
        let shared = shared.clone();
        let opts = opts.clone();
        std::thread::Builder::new()
            .name("altdiff-worker".into())
            .spawn(move || {
                let loaded = (|| -> Result<Session> {
                    let device = crate::device::open(opts.device)?;
                    let dtype = crate::device::dtype(opts.dtype, &device)?;
                    let fetched = Fetched::fetch(&opts.model, progress)?;
                    fetched.load(&device, dtype, opts.load_policy, opts.model.variant.clone())
                })();
                let session = match loaded {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let (title, hash, source) = match &session.identity {
                    crate::source::ModelIdentity::Local(p) => (
                        p.file_name().map_or_else(
                            || p.display().to_string(),
                            |n| n.to_string_lossy().into_owned(),
                        ),
                        None,
                        p.display().to_string(),
                    ),
                    crate::source::ModelIdentity::Hub { repo, commit, .. } => (
                        repo.clone(),
                        Some(commit.chars().take(10).collect()),
                        repo.clone(),
                    ),
                };
                let _ = ready_tx.send(Ok(ModelInfo {
                    title,
                    hash,
                    source,
                }));
                let save = output.map(|(dir, template)| {
                    move |image: &worker::Image| save_to(&dir, &template, image)
                });
                worker::run(session, shared, rx, save);
            })
            .map_err(|e| Error::Numerics(format!("cannot start the worker thread: {e}")))?
    };
    let model = match ready_rx.recv() {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::Numerics(
                "the worker thread ended while loading".into(),
            ))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Numerics(format!("cannot start the HTTP runtime: {e}")))?;
    let app = App {
        tx,
        shared: shared.clone(),
        opts: Arc::new(opts),
        model: Arc::new(model),
    };
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::usage(format!("cannot listen on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::usage(format!("{addr}: {e}")))?;
        crate::term::err_line(&format!("altdiff serve: listening on http://{local}"));
        let shared = app.shared.clone();
        let stop = async move {
            while !crate::signals::requested() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            shared.shutting_down.store(true, Ordering::SeqCst);
            crate::term::err_line("altdiff serve: stopping (queued requests get 503)");
        };
        axum::serve(listener, router(app))
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| Error::Numerics(format!("the HTTP server failed: {e}")))
    });
    drop(runtime);
    // The router (and its task sender) is gone: the worker finishes its queue (with 503s) and ends.
    let _ = worker.join();
    served
}
