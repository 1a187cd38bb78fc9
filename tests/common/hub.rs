//! A loopback HTTP server that serves model folders the way the Hugging Face hub does, so the real
//! hub client can be tested without the network: `GET /api/models/{repo}/revision/{rev}` (repo info
//! with the commit and file list), `GET /{repo}/resolve/{rev}/{file}` answering small files directly
//! with `ETag` (the git blob id) and `X-Repo-Commit`, and large ("LFS") files with a 302 to an absolute
//! `/cdn/{sha256}` URL carrying `X-Linked-Etag`; range requests (206 + `Content-Range`); 404 for
//! unknown repos, revisions and files; 401 for gated repos without the right bearer token; and, on
//! request, a transfer cut off halfway.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One file of a served revision.
#[derive(Clone)]
pub struct ServedFile {
    pub bytes: Arc<Vec<u8>>,
    pub etag: String,
    pub lfs: bool,
}

/// A repository revision: its commit and files.
#[derive(Clone)]
pub struct Revision {
    pub commit: String,
    pub files: HashMap<String, ServedFile>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Git's blob id, which the hub uses as the ETag of non-LFS files.
pub fn git_blob_sha1(data: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(format!("blob {}\0", data.len()).as_bytes());
    ctx.update(data);
    hex(ctx.finish().as_ref())
}

pub fn sha256(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

impl Revision {
    /// Every file under `dir` (weights and the sentencepiece model as LFS files), plus `extra`
    /// files given by name.
    pub fn from_dir(dir: &Path, commit: &str, extra: &[(&str, &[u8])]) -> Self {
        let mut files = HashMap::new();
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((p, rel)) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if e.path().is_dir() {
                    stack.push((e.path(), r));
                } else {
                    let bytes = std::fs::read(e.path()).unwrap();
                    files.insert(r.clone(), Self::file(&r, bytes));
                }
            }
        }
        for (name, bytes) in extra {
            files.insert(name.to_string(), Self::file(name, bytes.to_vec()));
        }
        Revision {
            commit: commit.to_string(),
            files,
        }
    }

    fn file(name: &str, bytes: Vec<u8>) -> ServedFile {
        let lfs =
            name.ends_with(".bin") || name.ends_with(".safetensors") || name.ends_with(".model");
        let etag = if lfs {
            sha256(&bytes)
        } else {
            git_blob_sha1(&bytes)
        };
        ServedFile {
            bytes: Arc::new(bytes),
            etag,
            lfs,
        }
    }
}

/// What the server should do.
#[derive(Default)]
pub struct HubState {
    /// repo -> revision name (and commit) -> revision.
    pub repos: HashMap<String, HashMap<String, Revision>>,
    /// Repos that need `Authorization: Bearer <token>`.
    pub gated: HashMap<String, String>,
    /// Cut the next full transfer of this file (repo-relative name) off halfway.
    pub cut_once: Option<String>,
    /// Every request line seen, with its Range header.
    pub log: Vec<(String, Option<String>)>,
    /// Answer every request with this status (a server in trouble: 500, 503).
    pub fail_with: Option<u16>,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<HubState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

impl HubServer {
    pub fn start(state: HubState) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, base) = (state.clone(), stop.clone(), url.clone());
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, base) = (st.clone(), base.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &st, &base);
                });
            }
        });
        HubServer {
            url,
            state,
            stop,
            handle: Some(handle),
            addr,
        }
    }

    /// The paths requested so far.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    range: (usize, usize),
    cut: bool,
}

fn text(status: u16, body: &str) -> Response {
    let body = Arc::new(body.as_bytes().to_vec());
    let n = body.len();
    Response {
        status,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body,
        range: (0, n),
        cut: false,
    }
}

fn decode(s: &str) -> String {
    s.replace("%2F", "/").replace("%2f", "/")
}

/// Applies a `Range: bytes=a-b` header to `file`.
fn ranged(file: &ServedFile, range: Option<&str>, mut headers: Vec<(String, String)>) -> Response {
    let n = file.bytes.len();
    let spec = range.and_then(|r| r.strip_prefix("bytes="));
    let (status, start, end) = match spec.and_then(|s| s.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                n.saturating_sub(1)
            } else {
                b.parse().unwrap_or(n - 1)
            };
            if a >= n && n > 0 {
                return text(416, "range not satisfiable");
            }
            (206, a, (b + 1).min(n))
        }
        None => (200, 0, n),
    };
    if status == 206 {
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{n}", end.max(1) - 1),
        ));
    }
    Response {
        status,
        headers,
        body: file.bytes.clone(),
        range: (start, end),
        cut: false,
    }
}

fn handle(
    state: &Mutex<HubState>,
    base: &str,
    path: &str,
    auth: Option<&str>,
    range: Option<&str>,
) -> Response {
    let mut st = state.lock().unwrap();
    st.log.push((path.to_string(), range.map(str::to_string)));
    if let Some(code) = st.fail_with {
        return text(code, "internal error");
    }
    let authorised = |st: &HubState, repo: &str| match st.gated.get(repo) {
        None => true,
        Some(token) => auth == Some(&format!("Bearer {token}")),
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {owner}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() != 4 || parts[2] != "revision" {
            return text(404, "not found");
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        if !st.repos.contains_key(&repo) {
            return text(404, "Repository not found");
        }
        if !authorised(&st, &repo) {
            return text(401, "Access to this repository is restricted");
        }
        let Some(rev) = st.repos[&repo].get(&decode(parts[3])) else {
            return text(404, "Revision not found");
        };
        let siblings: Vec<serde_json::Value> = rev
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body =
            serde_json::json!({ "id": repo, "sha": rev.commit, "siblings": siblings }).to_string();
        let mut r = text(200, &body);
        r.headers = vec![("Content-Type".into(), "application/json".into())];
        return r;
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let found = st
            .repos
            .values()
            .flat_map(|revs| revs.values())
            .flat_map(|r| r.files.iter())
            .find(|(_, f)| f.etag == sha)
            .map(|(name, f)| (name.clone(), f.clone()));
        let Some((name, file)) = found else {
            return text(404, "no such object");
        };
        let mut r = ranged(&file, range, vec![("ETag".into(), format!("\"{sha}\""))]);
        let full = r.range.0 == 0 && r.range.1 - r.range.0 > 1;
        if full && st.cut_once.as_deref() == Some(name.as_str()) {
            st.cut_once = None;
            r.cut = true;
        }
        return r;
    }
    // /{owner}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return text(404, "not found");
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    if !st.repos.contains_key(&repo) {
        return text(404, "Repository not found");
    }
    if !authorised(&st, &repo) {
        return text(401, "Access to this repository is restricted");
    }
    let rev_name = decode(parts[3]);
    let Some(rev) = st.repos[&repo].get(&rev_name).cloned() else {
        return text(404, "Revision not found");
    };
    let file_name = parts[4];
    let Some(file) = rev.files.get(file_name) else {
        return text(404, "Entry not found");
    };
    let commit = ("X-Repo-Commit".to_string(), rev.commit.clone());
    if rev_name != rev.commit && file_name == "model_index.json" {
        // A relative redirect, as the hub sends for renamed repos: the client must follow it.
        return Response {
            status: 307,
            headers: vec![
                (
                    "Location".into(),
                    format!("/{repo}/resolve/{}/{file_name}", rev.commit),
                ),
                commit,
            ],
            body: Arc::new(Vec::new()),
            range: (0, 0),
            cut: false,
        };
    }
    if file.lfs {
        return Response {
            status: 302,
            headers: vec![
                ("Location".into(), format!("{base}/cdn/{}", file.etag)),
                ("X-Linked-Etag".into(), format!("\"{}\"", file.etag)),
                ("X-Linked-Size".into(), file.bytes.len().to_string()),
                commit,
            ],
            body: Arc::new(Vec::new()),
            range: (0, 0),
            cut: false,
        };
    }
    ranged(
        file,
        range,
        vec![("ETag".into(), format!("\"{}\"", file.etag)), commit],
    )
}

fn serve(conn: TcpStream, state: &Mutex<HubState>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut auth = None;
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "range" => range = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let r = handle(state, base, &path, auth.as_deref(), range.as_deref());
    let body = &r.body[r.range.0..r.range.1];
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let mut out = conn;
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        body.len()
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if r.cut {
        out.write_all(&body[..body.len() / 2])?;
        out.flush()?;
        // Drop the connection mid-body.
        return out.shutdown(std::net::Shutdown::Both);
    }
    out.write_all(body)?;
    out.flush()?;
    out.shutdown(std::net::Shutdown::Write)
}

/// A fresh HF_HOME for one test.
pub fn hf_home(name: &str) -> PathBuf {
    super::scratch(&format!("hf-{name}"))
}
