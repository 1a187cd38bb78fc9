//! `altdiff serve` end to end: the real binary on a free loopback port with the tiny models, talked
//! to with a real HTTP client (ureq): webui's endpoints, a txt2img round trip that gives
//! `generate`'s pixels, img2img, auth, malformed and oversized bodies, caps, a full queue,
//! interrupt, a client that goes away, SIGTERM with requests in flight, and many clients at once.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_model("models/tiny-m18", extra)
    }

    fn start_model(model: &str, extra: &[&str]) -> Server {
        Self::start_env(model, extra, &[])
    }

    fn start_env(model: &str, extra: &[&str], vars: &[(&str, &str)]) -> Server {
        let model = fixture(model);
        let mut child = Command::new(env!("CARGO_BIN_EXE_altdiff"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--port",
                "0",
                "--device",
                "cpu",
            ])
            .args(extra)
            .envs(vars.iter().copied())
            .env("RAYON_NUM_THREADS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let base = loop {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "the server ended before listening"
            );
            if let Some(at) = line.find("http://") {
                break line[at..].trim().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        answer(ureq::get(&self.url(path)).call())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(
            ureq::post(&self.url(path))
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        )
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(resp) => {
            let status = resp.status();
            (status, json_of(resp))
        }
        Err(ureq::Error::Status(status, resp)) => (status, json_of(resp)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn json_of(resp: ureq::Response) -> Value {
    resp.into_string()
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn decode(b64: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap()
}

fn pixels_of_png(bytes: &[u8]) -> Vec<u8> {
    altdiff::picture::decode(bytes)
        .unwrap()
        .picture
        .to_rgb()
        .pixels
}

fn detail_field(v: &Value) -> String {
    v["detail"][0]["loc"][1]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// txt2img gives `generate`'s pixels for the same seed and settings, its PNG text parses with
/// webui's parser, the info JSON has webui's keys, and every read-only endpoint answers.
#[test]
fn txt2img_round_trip_and_endpoints() {
    let s = Server::start(&[]);
    let (status, r) = s.post(
        "/sdapi/v1/txt2img",
        &json!({
            "prompt": "un renard (roux:1.2) dans la neige", "negative_prompt": "flou",
            "steps": 3, "cfg_scale": 7, "width": 64, "height": 48, "seed": 1234,
            "sampler_name": "Euler a", "scheduler": "automatic", "batch_size": 2,
            "eta": 1.0, "s_noise": 1.0, "enable_hr": false, "styles": [], "override_settings": {},
            "alwayson_scripts": {}, "send_images": true, "save_images": false, "some_client_field": [1, 2],
        }),
    );
    assert_eq!(status, 200, "{r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 1234);
    assert_eq!(info["all_seeds"], json!([1234, 1235]));
    assert_eq!(info["infotexts"].as_array().unwrap().len(), 2);
    assert_eq!(
        r["parameters"]["prompt"],
        "un renard (roux:1.2) dans la neige"
    );
    let text = info["infotexts"][1].as_str().unwrap();
    let p = altdiff::metadata::infotext::parse(text);
    assert_eq!(p.prompt, "un renard (roux:1.2) dans la neige");
    for (k, v) in [
        ("Steps", "3"),
        ("Sampler", "Euler a"),
        ("Seed", "1235"),
        ("Size-1", "64"),
        ("Size-2", "48"),
        ("RNG", "CPU"),
    ] {
        assert_eq!(p.get(k), Some(v), "{k} in {text}");
    }
    // The second image is seed 1235's alone, as `generate --seed 1235` makes it.
    let dir = scratch("serve-roundtrip");
    let out = dir.join("g.png");
    ok(&generate(
        "models/tiny-m18",
        &[
            "--prompt",
            "un renard (roux:1.2) dans la neige",
            "--negative-prompt",
            "flou",
            "--prompt-syntax",
            "webui",
            "--steps",
            "3",
            "--guidance",
            "7",
            "--scheduler",
            "euler-a",
            "--seed",
            "1235",
            "--width",
            "64",
            "--height",
            "48",
            "--output",
            out.to_str().unwrap(),
        ],
    ));
    let served = decode(&images[1]);
    let file = std::fs::read(&out).unwrap();
    assert_eq!(pixels_of_png(&served), pixels_of_png(&file));
    // The PNG carries its metadata.
    let rec = altdiff::metadata::read_record_from(
        std::io::Cursor::new(&served),
        std::path::Path::new("x.png"),
    )
    .unwrap();
    assert_eq!(rec.seed(), Some(1235));

    let (st, samplers) = s.get("/sdapi/v1/samplers");
    assert_eq!(st, 200);
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    for n in [
        "PLMS", "DDIM", "Euler", "Euler a", "DPM++ 2M", "Heun", "LMS", "UniPC",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    let (st, sched) = s.get("/sdapi/v1/schedulers");
    assert_eq!(st, 200);
    assert!(sched
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["label"] == "Karras"));
    let (st, models) = s.get("/sdapi/v1/sd-models");
    assert_eq!(st, 200);
    assert_eq!(models[0]["title"], "tiny-m18");
    let (st, opts) = s.get("/sdapi/v1/options");
    assert_eq!(st, 200);
    assert_eq!(opts["sd_model_checkpoint"], "tiny-m18");
    assert_eq!(
        s.post(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": "tiny-m18"})
        )
        .0,
        200
    );
    let (st, bad) = s.post("/sdapi/v1/options", &json!({"CLIP_stop_at_last_layers": 2}));
    assert_eq!(st, 422);
    assert_eq!(detail_field(&bad), "CLIP_stop_at_last_layers");
    let (st, prog) = s.get("/sdapi/v1/progress");
    assert_eq!(st, 200);
    assert!(
        prog["progress"].is_number() && prog["state"]["job_count"].is_number(),
        "{prog}"
    );
    assert_eq!(s.get("/internal/ping").0, 200);
    assert_eq!(s.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    let (st, nf) = s.get("/sdapi/v1/nothing-here");
    assert_eq!((st, nf["detail"].as_str()), (404, Some("Not Found")));
    let page = ureq::get(&s.url("/"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("<form") && page.contains("/sdapi/v1/txt2img"));
}

/// `--output`: every image is also saved with its metadata, named by task and position.
#[test]
fn output_saves_every_image() {
    let dir = scratch("serve-output");
    let out = dir.join("saved");
    let s = Server::start(&["--output", out.to_str().unwrap()]);
    let (st, r) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 9, "batch_size": 2}),
    );
    assert_eq!(st, 200, "{r}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("00001-0-") && names[1].starts_with("00001-1-"),
        "{names:?}"
    );
    assert!(
        names[0].contains("-9-") && names[1].contains("-10-"),
        "{names:?}"
    );
    let rec = altdiff::metadata::read_record(&out.join(&names[1])).unwrap();
    assert_eq!(rec.seed(), Some(10));
    assert_eq!(
        decode(&r["images"][1]),
        std::fs::read(out.join(&names[1])).unwrap()
    );
    // Without send_images the answer has no images, but --output still gets the whole PNG.
    let (st, r) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 9,
                "send_images": false}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"], json!([]), "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 9, "{info}");
    let third = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("00002-0-")
        })
        .expect("the second task's image is saved");
    let rec = altdiff::metadata::read_record(&third).unwrap();
    assert_eq!(rec.seed(), Some(9));
    // The same pixels and text as the first task's first image (same seed and settings).
    assert_eq!(
        std::fs::read(&third).unwrap(),
        std::fs::read(out.join(&names[0])).unwrap()
    );
}

/// img2img with a base64 picture (and a mask), the denoising strength recorded.
#[test]
fn img2img_with_a_mask() {
    let s = Server::start(&[]);
    let pic = std::fs::read(fixture("img2img/pictures/fox-64.png")).unwrap();
    let mask = std::fs::read(fixture("img2img/pictures/mask-rect.png")).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (st, r) = s.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a fox", "init_images": [format!("data:image/png;base64,{}", b64(&pic))],
                "mask": b64(&mask), "denoising_strength": 0.6, "steps": 4, "width": 64, "height": 64,
                "seed": 3, "sampler_name": "DDIM"}),
    );
    assert_eq!(st, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.6);
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Denoising strength: 0.6"));
    assert!(
        r["parameters"]["init_images"].is_null(),
        "pictures are not echoed"
    );
    let (st, r) = s.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a", "init_images": ["%%%"]}),
    );
    assert_eq!((st, detail_field(&r).as_str()), (422, "init_images"));
    let (st, r) = s.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a", "init_images": [b64(b"not a picture")]}),
    );
    assert_eq!((st, detail_field(&r).as_str()), (422, "init_images"));
    let (st, r) = s.post("/sdapi/v1/img2img", &json!({"prompt": "a"}));
    assert_eq!((st, detail_field(&r).as_str()), (422, "init_images"));
    // send_images false and no --output: no images in the answer (none encoded), the info intact.
    let (st, r) = s.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a fox", "init_images": [b64(&pic)], "denoising_strength": 0.5,
                "steps": 2, "width": 64, "height": 64, "seed": 4, "send_images": false}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"], json!([]), "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        (info["seed"].clone(), info["all_seeds"].clone()),
        (json!(4), json!([4]))
    );
    assert!(
        info["infotexts"][0].as_str().unwrap().contains("Seed: 4"),
        "{info}"
    );
}

/// Basic and Bearer credentials; ping needs none; a wrong one is 401.
#[test]
fn auth_basic_and_bearer() {
    let dir = scratch("serve-auth");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# tokens\ns3cret-token\n").unwrap();
    let s = Server::start(&[
        "--api-auth",
        "alice:pw1,bob:pw2",
        "--token-file",
        tokens.to_str().unwrap(),
    ]);
    let url = s.url("/sdapi/v1/sd-models");
    let (st, body) = answer(ureq::get(&url).call());
    assert_eq!(st, 401);
    assert_eq!(body["detail"], "Incorrect username or password");
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    assert_eq!(
        answer(
            ureq::get(&url)
                .set("Authorization", &basic("bob", "pw2"))
                .call()
        )
        .0,
        200
    );
    assert_eq!(
        answer(
            ureq::get(&url)
                .set("Authorization", &basic("bob", "pw1"))
                .call()
        )
        .0,
        401
    );
    assert_eq!(
        answer(
            ureq::get(&url)
                .set("Authorization", "Bearer s3cret-token")
                .call()
        )
        .0,
        200
    );
    assert_eq!(
        answer(ureq::get(&url).set("Authorization", "Bearer wrong").call()).0,
        401
    );
    assert_eq!(answer(ureq::get(&s.url("/")).call()).0, 401);
    assert_eq!(s.get("/internal/ping").0, 200);
}

/// Malformed, oversized and capped requests are 4xx and the server keeps serving.
#[test]
fn bad_requests_are_4xx_and_the_server_keeps_serving() {
    let s = Server::start(&[
        "--max-pixels",
        "16384",
        "--max-steps",
        "20",
        "--max-batch",
        "2",
    ]);
    let raw = |body: &str| answer(ureq::post(&s.url("/sdapi/v1/txt2img")).send_string(body));
    assert_eq!(raw("{not json").0, 422);
    assert_eq!(raw("[]").0, 422);
    assert_eq!(raw("").0, 422);
    let (st, r) = raw(r#"{"prompt": "a", "steps": "many"}"#);
    assert_eq!((st, detail_field(&r).as_str()), (422, "steps"));
    for (body, field) in [
        (json!({"prompt": "a", "width": 256, "height": 256}), "width"),
        (json!({"prompt": "a", "steps": 21}), "steps"),
        (
            json!({"prompt": "a", "batch_size": 2, "n_iter": 2}),
            "batch_size",
        ),
        (json!({"prompt": "a", "enable_hr": true}), "enable_hr"),
        (
            json!({"prompt": "a", "sampler_name": "DPM++ SDE"}),
            "sampler_name",
        ),
        (json!({"prompt": ""}), "prompt"),
    ] {
        let mut body = body;
        if body.get("width").is_none() {
            body["width"] = json!(64);
            body["height"] = json!(64);
        }
        if body.get("steps").is_none() {
            body["steps"] = json!(2);
        }
        let (st, r) = s.post("/sdapi/v1/txt2img", &body);
        assert_eq!(st, 422, "{body}");
        assert_eq!(detail_field(&r), field, "{body}: {r}");
        let msg = r["detail"][0]["msg"].as_str().unwrap();
        if field == "width" {
            assert!(msg.contains("--max-pixels"), "{msg}");
        }
    }
    // More than the 50 MB body limit.
    let big = format!(r#"{{"prompt": "a", "x": "{}"}}"#, "a".repeat(51 << 20));
    let st = match ureq::post(&s.url("/sdapi/v1/txt2img")).send_string(&big) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(_) => 413, // the server may close the connection while the body is still being sent
    };
    assert_eq!(st, 413);
    let (st, _) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "still serving", "steps": 2, "width": 64, "height": 64}),
    );
    assert_eq!(st, 200);
}

fn slow_request(n_iter: usize) -> Value {
    json!({"prompt": "a slow fox", "steps": 150, "width": 256, "height": 256, "seed": 1, "n_iter": n_iter, "sampler_name": "Euler"})
}

fn wait_for_step(s: &Server) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let (_, p) = s.get("/sdapi/v1/progress");
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
            && p["state"]["job_count"].as_u64().unwrap_or(0) > 0
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the task never started");
}

/// A full queue answers 503 with Retry-After; `/interrupt` stops the running task between steps
/// (it answers with the images done so far); a client that goes away has its task stopped.
#[test]
fn queue_interrupt_and_disconnect() {
    let s = Server::start(&[
        "--max-queue",
        "1",
        "--max-pixels",
        "70000",
        "--max-steps",
        "150",
    ]);
    let url = s.url("/sdapi/v1/txt2img");
    let body = slow_request(3).to_string();
    let running = {
        let (url, body) = (url.clone(), body.clone());
        std::thread::spawn(move || answer(ureq::post(&url).send_string(&body)))
    };
    wait_for_step(&s);
    let queued = {
        let url = url.clone();
        let b = json!({"prompt": "queued", "steps": 2, "width": 64, "height": 64}).to_string();
        std::thread::spawn(move || answer(ureq::post(&url).send_string(&b)))
    };
    std::thread::sleep(Duration::from_millis(300));
    let full = ureq::post(&url).send_string(
        &json!({"prompt": "one too many", "steps": 2, "width": 64, "height": 64}).to_string(),
    );
    match full {
        Err(ureq::Error::Status(503, r)) => assert_eq!(r.header("Retry-After"), Some("5")),
        other => panic!("expected 503, got {:?}", other.map(|r| r.status())),
    }
    let started = Instant::now();
    assert_eq!(s.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    let (st, r) = running.join().unwrap();
    assert_eq!(st, 200);
    assert!(
        r["images"].as_array().unwrap().len() < 3,
        "interrupted early"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped between steps"
    );
    let (st, r) = queued.join().unwrap();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 1);

    // A client that gives up: its task stops at the next step and the server is free again.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(1500))
        .build();
    let gone = agent.post(&url).send_string(&body);
    assert!(gone.is_err(), "the client timed out");
    // The task needs about 21 s (3 x 150 steps); idle well before that means it was stopped.
    let until = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, p) = s.get("/sdapi/v1/progress");
        if p["current_task"].is_null() {
            break;
        }
        assert!(
            Instant::now() < until,
            "the abandoned task kept running: {p}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM with a request running and others queued: they get 503 (or their connection closes),
/// nothing hangs, exit code 0.
#[cfg(unix)]
#[test]
fn sigterm_with_requests_in_flight() {
    let mut s = Server::start(&["--max-pixels", "70000", "--max-steps", "150"]);
    let url = s.url("/sdapi/v1/txt2img");
    let body = slow_request(2).to_string();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || match ureq::post(&url).send_string(&body) {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(c, _)) => c,
                Err(_) => 0,
            })
        })
        .collect();
    wait_for_step(&s);
    std::thread::sleep(Duration::from_millis(200));
    unsafe { libc::kill(s.pid(), libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    // The running one is abandoned at its next step, the queued ones are not run: none of them
    // got images (a request that had finished would have; none had, each takes ~14 s).
    for c in clients {
        let code = c.join().unwrap();
        assert!(code == 503 || code == 0, "{code}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped between steps"
    );
}

/// 40 clients x 3 requests against a queue of 8: every request ends in 200 or 503, none hangs,
/// and the server's memory stays bounded.
#[cfg(target_os = "linux")]
#[test]
fn many_clients_at_once() {
    let s = Server::start(&["--max-queue", "8"]);
    let rss = |pid: i32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    // Warm up once so the first measurement includes the loaded model.
    assert_eq!(
        s.post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "warm", "steps": 2, "width": 64, "height": 64})
        )
        .0,
        200
    );
    let before = rss(s.pid());
    let url = s.url("/sdapi/v1/txt2img");
    let started = Instant::now();
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
                (0..3)
                    .map(|k| {
                        let b = json!({"prompt": format!("fox {i} {k}"), "steps": 2, "width": 64, "height": 64, "seed": i * 3 + k});
                        match agent.post(&url).send_string(&b.to_string()) {
                            Ok(r) => r.status(),
                            Err(ureq::Error::Status(c, _)) => c,
                            Err(e) => panic!("client {i}: {e}"),
                        }
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for c in clients {
        for code in c.join().unwrap() {
            *counts.entry(code).or_insert(0) += 1;
        }
    }
    eprintln!(
        "statuses: {counts:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(counts.values().sum::<i32>(), 120);
    assert!(counts.keys().all(|c| *c == 200 || *c == 503), "{counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) >= 9, "{counts:?}");
    let after = rss(s.pid());
    assert!(
        after < before + (256 << 20),
        "RSS grew from {before} to {after}"
    );
    assert_eq!(
        s.post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "after", "steps": 2, "width": 64, "height": 64})
        )
        .0,
        200
    );
}

/// `--cors-origin`: the API's answers (and the preflight) carry the CORS headers.
#[test]
fn cors_origin_headers() {
    let s = Server::start(&["--cors-origin", "http://app.example"]);
    let r = ureq::get(&s.url("/sdapi/v1/samplers")).call().unwrap();
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("http://app.example")
    );
    let pre = ureq::request("OPTIONS", &s.url("/sdapi/v1/txt2img"))
        .call()
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(
        pre.header("Access-Control-Allow-Origin"),
        Some("http://app.example")
    );
    assert!(pre
        .header("Access-Control-Allow-Headers")
        .unwrap_or("")
        .contains("content-type"));
    let plain = Server::start(&[]);
    let r = ureq::get(&plain.url("/sdapi/v1/samplers")).call().unwrap();
    assert_eq!(r.header("Access-Control-Allow-Origin"), None);
}

/// Listening on a non-loopback address without credentials is a warning.
#[test]
fn an_open_address_without_auth_is_a_warning() {
    let model = fixture("models/tiny-m18");
    let mut child = Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("listening on http://") {
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("without --api-auth or --token-file"),
        "{seen}"
    );
}

/// A job that panics is a 500 for that request; the server keeps serving.
#[test]
fn a_panicking_job_is_a_500_and_the_server_keeps_serving() {
    let s = Server::start_env(
        "models/tiny-m18",
        &[],
        &[("ALTDIFF_SERVE_PANIC_ON", "boom")],
    );
    let small = |p: &str| json!({"prompt": p, "steps": 2, "width": 64, "height": 64});
    let (st, r) = s.post("/sdapi/v1/txt2img", &small("boom"));
    assert_eq!(st, 500, "{r}");
    assert!(r["errors"].as_str().unwrap().contains("panicked"), "{r}");
    assert_eq!(s.post("/sdapi/v1/txt2img", &small("fine")).0, 200);
    let (_, p) = s.get("/sdapi/v1/progress");
    assert!(p["current_task"].is_null(), "{p}");
}

/// A model that cannot load fails at start-up with exit 2, before any port opens.
#[test]
fn a_broken_model_fails_at_start_up() {
    let dir = scratch("serve-broken");
    std::fs::create_dir_all(dir.join("empty-model")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_altdiff"))
        .args([
            "serve",
            "--model",
            dir.join("empty-model").to_str().unwrap(),
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("listening"), "{stderr}");
    let out = altdiff(&["serve", "--api-auth", "nocolon", "--port", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Starts chromedriver on a free port; the browser and its driver are Debian's `chromium` and
/// `chromium-driver`, which `.ci/install-browser` installs.
fn chromedriver() -> (Child, u16) {
    let path = std::env::var("ALTDIFF_CHROMEDRIVER")
        .ok()
        .into_iter()
        .chain(["/usr/bin/chromedriver".to_string(), "/usr/lib/chromium/chromedriver".to_string()])
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromedriver is not installed: run .ci/install-browser (Debian's chromium and chromium-driver)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while ureq::get(&format!("http://127.0.0.1:{port}/status"))
        .call()
        .is_err()
    {
        assert!(Instant::now() < until, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

/// The page in a real headless browser, driven by keyboard: type a prompt, press Generate with the
/// Enter key, wait for the image, read its parameters; a bad value shows the server's message.
#[test]
fn the_page_in_a_headless_browser() {
    use fantoccini::{ClientBuilder, Locator};
    let s = Server::start(&[]);
    let (mut driver, port) = chromedriver();
    let url = s.url("/");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async move {
        let mut caps = serde_json::Map::new();
        let binary = std::env::var("ALTDIFF_CHROME")
            .ok()
            .into_iter()
            .chain(["/usr/bin/chromium".to_string(), "/usr/bin/chromium-browser".to_string()])
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "/usr/bin/chromium".into());
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": binary, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        c.goto(&url).await?;
        // The samplers come from the API.
        c.wait()
            .for_element(Locator::Css("#sampler_name option"))
            .await?;
        c.find(Locator::Id("prompt"))
            .await?
            .send_keys("un renard roux dans la neige")
            .await?;
        for (id, v) in [("steps", "3"), ("width", "64"), ("height", "48"), ("seed", "77")] {
            let e = c.find(Locator::Id(id)).await?;
            e.clear().await?;
            e.send_keys(v).await?;
        }
        // Enter on the focused button (keyboard only).
        c.find(Locator::Id("generate"))
            .await?
            .send_keys("\u{E007}")
            .await?;
        let img = c.wait().for_element(Locator::Css("#results img")).await?;
        let src = img.attr("src").await?.unwrap_or_default();
        let params = c.find(Locator::Css("pre.parameters")).await?.text().await?;
        let download = c
            .find(Locator::LinkText("Download"))
            .await?
            .attr("download")
            .await?;
        // A refused value: the server's message is shown.
        let steps = c.find(Locator::Id("steps")).await?;
        steps.clear().await?;
        steps.send_keys("5000").await?;
        c.find(Locator::Id("generate")).await?.click().await?;
        let mut status = String::new();
        for _ in 0..100 {
            status = c.find(Locator::Id("status")).await?.text().await?;
            if status.starts_with("422") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.close().await?;
        Ok::<_, fantoccini::error::CmdError>((src, params, download, status))
    });
    let _ = driver.kill();
    let _ = driver.wait();
    let (src, params, download, status) = result.expect("the page works");
    assert!(src.starts_with("data:image/png;base64,"), "{src:.40}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(&src["data:image/png;base64,".len()..])
        .unwrap();
    let picture = altdiff::picture::decode(&png).unwrap().picture;
    assert_eq!((picture.width, picture.height), (64, 48));
    let p = altdiff::metadata::infotext::parse(&params);
    assert_eq!(p.prompt, "un renard roux dans la neige");
    assert_eq!(p.get("Steps"), Some("3"));
    assert_eq!(p.get("Seed"), Some("77"));
    assert_eq!(download.as_deref(), Some("altdiff-77.png"));
    assert!(
        status.starts_with("422") && status.contains("steps"),
        "{status}"
    );
}
