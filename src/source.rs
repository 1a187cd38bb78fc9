//! Where a model comes from: a local directory or a Hugging Face hub repository.
//!
//! The only module that touches the network. Hub repositories are fetched with the hf-hub crate into
//! the standard hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; the
//! same `models--org--name/{blobs,refs,snapshots}` layout Python's `huggingface_hub` uses, so each
//! reuses the other's downloads). `HF_ENDPOINT` changes the server, `HF_TOKEN` (or the token file
//! `HF_HOME/token`) authenticates, and `HF_HUB_OFFLINE=1` resolves from the cache without any network.
//!
//! Only what text-to-image needs is fetched (never `safety_checker/` or `feature_extractor/`),
//! safetensors before `.bin`. hf-hub writes into `blobs/<etag>.part`, resumes it with a range request
//! and renames it only when complete; every file fetched here is then checked against its etag
//! (SHA-256 for LFS files, the git blob SHA-1 for small ones) before it is used.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::weights::{select_weight_names, shard_names};

/// The model used when `--model` is not given.
pub const DEFAULT_REPO: &str = "BAAI/AltDiffusion-m18";

/// The components whose weights generation loads.
const WEIGHT_COMPONENTS: [&str; 3] = ["text_encoder", "unet", "vae"];

/// What `--model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory in diffusers layout.
    Local(PathBuf),
    /// A hub repository at a revision (branch, tag, commit or `refs/pr/N`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// The revision.
        revision: String,
    },
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

/// Checks that `repo` has the shape of a hub repository id (`org/name`), without the network.
pub fn check_repo_id(repo: &str) -> Result<()> {
    if looks_like_repo_id(repo) {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "`{repo}` is not a hub repository id (expected org/name with letters, digits, `-`, `_` and `.`, e.g. BAAI/AltDiffusion-m18)"
        )))
    }
}

impl ModelSource {
    /// `--model` and `--revision`: an existing directory is local; `owner/name` is a hub repo;
    /// nothing means [`DEFAULT_REPO`]; anything else is an error (checked without the network).
    pub fn parse(model: Option<&str>, revision: Option<&str>) -> Result<Self> {
        let model = model.unwrap_or(DEFAULT_REPO);
        let path = Path::new(model);
        if !path.exists() && !looks_like_repo_id(model) {
            return Err(Error::Model {
                path: path.to_path_buf(),
                message: "model directory not found, and not a hub repository id either (org/name, e.g. BAAI/AltDiffusion-m18)".into(),
            });
        }
        if path.exists() {
            if let Some(r) = revision {
                return Err(Error::usage(format!(
                    "--revision {r} applies to hub repositories, but --model {model} is a local path"
                )));
            }
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        Ok(ModelSource::Hub {
            repo: model.to_string(),
            revision: revision.unwrap_or("main").to_string(),
        })
    }
}

/// Which model a run used, stored with its outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelIdentity {
    /// A local directory.
    Local(PathBuf),
    /// A hub repository resolved to a commit.
    Hub {
        /// `owner/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The commit it resolved to.
        commit: String,
    },
}

impl fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelIdentity::Local(p) => write!(f, "{}", p.display()),
            ModelIdentity::Hub { repo, commit, .. } => write!(f, "{repo}@{commit}"),
        }
    }
}

/// Hub settings, normally from the environment.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Server, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// The hub cache folder (holding `models--*`).
    pub cache_dir: PathBuf,
    /// Access token.
    pub token: Option<String>,
    /// Never touch the network.
    pub offline: bool,
    /// Show a progress bar per downloaded file.
    pub progress: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubSettings {
    /// Reads `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN` (or the token file) and
    /// `HF_HUB_OFFLINE` as `huggingface_hub` does.
    pub fn from_env(progress: bool) -> Self {
        let hf_home = env_nonempty("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let base = env_nonempty("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env_nonempty("HOME").map(|h| Path::new(&h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                base.join("huggingface")
            });
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            let path = env_nonempty("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = env_nonempty("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        Self {
            endpoint,
            cache_dir,
            token,
            offline,
            progress,
        }
    }
}

/// What to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything generation needs.
    Generation,
    /// Only the tokenizer files (`altdiff tokenize`).
    Tokenizer,
    /// Only the text encoder's config (`altdiff languages --model`).
    Config,
}

/// How to fetch a model.
#[derive(Debug, Clone, Copy)]
pub struct FetchOptions<'a> {
    /// Weight variant (`fp16`).
    pub variant: Option<&'a str>,
    /// Which files.
    pub scope: Scope,
    /// Re-check the checksums of files already in the cache (`altdiff download`).
    pub verify_all: bool,
}

/// A model ready to load: a directory in diffusers layout and where it came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The directory (a hub snapshot for hub models).
    pub root: PathBuf,
    /// Where it came from.
    pub identity: ModelIdentity,
}

impl Fetched {
    fn hub(root: PathBuf, repo: &str, revision: &str, commit: String) -> Self {
        Fetched {
            root,
            identity: ModelIdentity::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
                commit,
            },
        }
    }
}

/// The files of a repository listing that generation needs, given the listing of one revision.
/// Sharded weights need their index read first: such components are returned as the index file and
/// resolved once the index is read. Errors list everything required that is absent.
pub fn needed_files(
    listing: &[String],
    variant: Option<&str>,
    scope: Scope,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    let mut need = Vec::new();
    let mut missing = Vec::new();
    let configs: &[&str] = match scope {
        Scope::Generation => &[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "unet/config.json",
            "vae/config.json",
        ],
        Scope::Tokenizer => &[],
        Scope::Config => &["text_encoder/config.json"],
    };
    let components: &[&str] = match scope {
        Scope::Generation => &WEIGHT_COMPONENTS,
        Scope::Tokenizer | Scope::Config => &[],
    };
    for &f in configs {
        if has(f) {
            need.push(f.to_string());
        } else {
            missing.push(f.to_string());
        }
    }
    for component in components {
        let prefix = format!("{component}/");
        let names: Vec<String> = listing
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|n| !n.contains('/'))
            .map(str::to_string)
            .collect();
        match select_weight_names(&names, variant) {
            Some((_, files)) => need.extend(files.into_iter().map(|f| format!("{prefix}{f}"))),
            None => missing.push(match variant {
                Some(v) => format!("{prefix}*.{v}.safetensors (or *.{v}.bin)"),
                None => format!("{prefix}*.safetensors (or *.bin)"),
            }),
        }
    }
    if scope != Scope::Config {
        let tok_files = [
            "tokenizer/tokenizer.json",
            "tokenizer/sentencepiece.bpe.model",
        ];
        let found: Vec<&str> = tok_files.iter().copied().filter(|f| has(f)).collect();
        if found.is_empty() {
            missing.push(
                "tokenizer/tokenizer.json (or tokenizer/sentencepiece.bpe.model)".to_string(),
            );
        }
        need.extend(found.iter().map(|f| f.to_string()));
        for f in [
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
        ] {
            if has(f) {
                need.push(f.to_string());
            }
        }
    }
    if missing.is_empty() {
        Ok(need)
    } else {
        Err(missing)
    }
}

/// Replaces each sharded-weights index in `files` by the index plus its shards, reading indexes
/// with `local` (which may download them).
fn expand_shards(
    files: Vec<String>,
    mut local: impl FnMut(&str) -> Result<PathBuf>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        if f.ends_with(".json") && f.contains(".index.") {
            let index = local(&f)?;
            let dir = f.rsplit_once('/').map_or("", |(d, _)| d).to_string();
            let shards = shard_names(&index)?;
            out.push(f);
            out.extend(shards.into_iter().map(|s| format!("{dir}/{s}")));
        } else {
            out.push(f);
        }
    }
    Ok(out)
}

/// `models--owner--name` under the cache.
fn repo_cache_dir(settings: &HubSettings, repo: &str) -> PathBuf {
    settings
        .cache_dir
        .join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Every file under `dir`, as `/`-separated relative paths.
fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel_name = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let p = e.path();
            if p.is_dir() {
                stack.push((p, rel_name));
            } else if p.is_file() {
                out.push(rel_name);
            }
        }
    }
    out.sort();
    out
}

fn fetch_command(repo: &str, revision: &str) -> String {
    if revision == "main" {
        format!("altdiff download {repo}")
    } else {
        format!("altdiff download {repo} --revision {revision}")
    }
}

/// The two ways out when a hub model is not in the cache and cannot be downloaded now.
fn ways_out(repo: &str, revision: &str) -> String {
    format!(
        "run `{}` where the hub is reachable, or give a local model directory with --model DIR",
        fetch_command(repo, revision)
    )
}

/// Resolves a hub model from the cache alone; `Err` says what the cache lacks (one clause, for
/// the caller's message) and the folder looked in.
fn resolve_from_cache(
    repo: &str,
    revision: &str,
    opts: &FetchOptions,
    settings: &HubSettings,
) -> std::result::Result<Fetched, String> {
    let repo_dir = repo_cache_dir(settings, repo);
    let commit = if is_commit_hash(revision) {
        Some(revision.to_string())
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let lacks = |what: Vec<String>| {
        format!(
            "the cached copy ({}) lacks {}",
            repo_dir.display(),
            what.join(", ")
        )
    };
    let Some(commit) = commit else {
        return Err(format!(
            "revision {revision} is not in the hub cache ({})",
            settings.cache_dir.display()
        ));
    };
    let root = repo_dir.join("snapshots").join(&commit);
    let listing = list_tree(&root);
    let files = needed_files(&listing, opts.variant, opts.scope).map_err(lacks)?;
    let files = expand_shards(files, |f| Ok(root.join(f))).map_err(|e| e.to_string())?;
    let absent: Vec<String> = files
        .into_iter()
        .filter(|f| !root.join(f).is_file())
        .collect();
    if !absent.is_empty() {
        return Err(lacks(absent));
    }
    Ok(Fetched::hub(root, repo, revision, commit))
}

/// Resolves a hub model from the cache alone (`HF_HUB_OFFLINE`).
fn resolve_offline(
    repo: &str,
    revision: &str,
    opts: &FetchOptions,
    settings: &HubSettings,
) -> Result<Fetched> {
    resolve_from_cache(repo, revision, opts, settings).map_err(|missing| Error::Hub {
        repo: repo.to_string(),
        message: format!(
            "{missing}; HF_HUB_OFFLINE is set, so nothing can be downloaded: {}",
            ways_out(repo, revision)
        ),
    })
}

/// A one-line explanation of a hub error.
fn hub_error(err: ApiError, repo: &str, revision: &str, what: &str, endpoint: &str) -> Error {
    let message = match &err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(404, _) => format!("{what}: not found on {endpoint} (check the repository name and --revision {revision})"),
            ureq::Error::Status(401 | 403, _) => format!(
                "{what}: access denied by {endpoint}; the repository is gated or private: accept its terms on the hub and set HF_TOKEN (or log in with `huggingface-cli login`)"
            ),
            ureq::Error::Status(code, _) => format!("{what}: the hub answered HTTP {code}; try again later"),
            ureq::Error::Transport(t) => format!(
                "{what}: the connection to {endpoint} failed ({t}); run the same command again to resume"
            ),
        },
        ApiError::IoError(e) => format!(
            "{what}: the transfer was interrupted ({e}); run the same command again to resume it"
        ),
        other => format!("{what}: {other}"),
    };
    // The error already names the repository: drop the prefix when `what` is the repository itself.
    let message = match message.strip_prefix(&format!("{repo}: ")) {
        Some(rest) => rest.to_string(),
        None => message,
    };
    Error::Hub {
        repo: repo.to_string(),
        message,
    }
}

/// Hex SHA-256 of a file.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    digest_file(path, &ring::digest::SHA256, None)
}

/// Git's blob id (SHA-1 of `blob <len>\0` + content), the etag of non-LFS hub files.
fn git_sha1_file(path: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    digest_file(
        path,
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        Some(format!("blob {len}\0").into_bytes()),
    )
}

fn digest_file(
    path: &Path,
    alg: &'static ring::digest::Algorithm,
    prefix: Option<Vec<u8>>,
) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(alg);
    if let Some(p) = prefix {
        ctx.update(&p);
    }
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks a cached file against its blob name (the etag); `Ok(false)` when it does not match.
/// Files whose etag is neither a SHA-256 nor a SHA-1 cannot be checked and pass.
pub fn verify_cached_file(snapshot_file: &Path) -> std::io::Result<bool> {
    let blob = std::fs::canonicalize(snapshot_file)?;
    let etag = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let hex = etag.chars().all(|c| c.is_ascii_hexdigit());
    Ok(match etag.len() {
        64 if hex => sha256_file(&blob)? == etag,
        40 if hex => git_sha1_file(&blob)? == etag,
        _ => true,
    })
}

/// Removes a corrupt cached file (its snapshot link and blob) so the next run fetches it again.
fn evict(snapshot_file: &Path) {
    if let Ok(blob) = std::fs::canonicalize(snapshot_file) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(snapshot_file);
}

/// Fetches a hub model: lists the revision, downloads what is missing from the cache, verifies it.
fn resolve_online(
    repo: &str,
    revision: &str,
    opts: &FetchOptions,
    settings: &HubSettings,
) -> Result<Fetched> {
    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .build()
        .map_err(|e| hub_error(e, repo, revision, repo, &settings.endpoint))?;
    let api_repo: ApiRepo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = match api_repo.info() {
        Ok(info) => info,
        Err(ApiError::RequestError(e)) if matches!(e.as_ref(), ureq::Error::Transport(_)) => {
            // ureq says `URL: Connection Failed: Connect error: Connection refused (os error 111)`:
            // the last part is the reason.
            let text = e.to_string();
            let t = text.rsplit(": ").next().unwrap_or(&text).to_string();
            if opts.verify_all {
                // `altdiff download` is asked to check with the hub: the cache cannot stand in.
                return Err(Error::Hub {
                    repo: repo.to_string(),
                    message: format!(
                        "cannot reach {} ({t}); `altdiff download` needs the hub: check the network connection (or HF_ENDPOINT for a mirror)",
                        settings.endpoint
                    ),
                });
            }
            // No network: use the cache, as huggingface_hub does; else one message with both ways out.
            return match resolve_from_cache(repo, revision, opts, settings) {
                Ok(cached) => {
                    tracing::warn!(
                        "cannot reach {}; using the cached {}",
                        settings.endpoint,
                        cached.identity
                    );
                    Ok(cached)
                }
                Err(missing) => Err(Error::Hub {
                    repo: repo.to_string(),
                    message: format!(
                        "{missing}, and {} cannot be reached ({t}): {}",
                        settings.endpoint,
                        ways_out(repo, revision)
                    ),
                }),
            };
        }
        Err(e) => return Err(hub_error(e, repo, revision, repo, &settings.endpoint)),
    };
    let commit = info.sha.clone();
    let repo_dir = repo_cache_dir(settings, repo);
    let root = repo_dir.join("snapshots").join(&commit);
    let listing: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let files = needed_files(&listing, opts.variant, opts.scope).map_err(|missing| Error::Hub {
        repo: repo.to_string(),
        message: format!(
            "revision {revision} ({commit}) lacks {}",
            missing.join(", ")
        ),
    })?;

    let mut fetch = |file: &str| -> Result<PathBuf> {
        let local = root.join(file);
        if local.is_file() {
            if opts.verify_all
                && !verify_cached_file(&local).map_err(|source| Error::Io {
                    path: local.clone(),
                    source,
                })?
            {
                tracing::warn!(
                    "{} does not match its checksum; downloading it again",
                    local.display()
                );
                evict(&local);
            } else {
                return Ok(local);
            }
        }
        let what = format!("{repo}/{file}");
        let path = api_repo
            .download(file)
            .map_err(|e| hub_error(e, repo, revision, &what, &settings.endpoint))?;
        if !verify_cached_file(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })? {
            evict(&path);
            return Err(Error::Hub {
                repo: repo.to_string(),
                message: format!("{file} was corrupted in transfer (checksum mismatch); it was removed, run the command again"),
            });
        }
        Ok(path)
    };
    let files = expand_shards(files, &mut fetch)?;
    for f in &files {
        fetch(f)?;
    }
    // The revision now points at this commit for offline use, whether or not anything was downloaded.
    Cache::new(settings.cache_dir.clone())
        .repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
        .create_ref(&commit)
        .map_err(|source| Error::Io {
            path: repo_dir.join("refs"),
            source,
        })?;
    Ok(Fetched::hub(root, repo, revision, commit))
}

/// Makes a model available locally.
pub fn fetch(source: &ModelSource, opts: &FetchOptions, settings: &HubSettings) -> Result<Fetched> {
    match source {
        ModelSource::Local(path) => Ok(Fetched {
            root: path.clone(),
            identity: ModelIdentity::Local(
                std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
            ),
        }),
        ModelSource::Hub { repo, revision } if settings.offline => {
            resolve_offline(repo, revision, opts, settings)
        }
        ModelSource::Hub { repo, revision } => resolve_online(repo, revision, opts, settings),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse(None, None).unwrap(),
            ModelSource::Hub {
                repo: DEFAULT_REPO.into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse(Some("BAAI/AltDiffusion-m9"), Some("refs/pr/1")).unwrap(),
            ModelSource::Hub {
                repo: "BAAI/AltDiffusion-m9".into(),
                revision: "refs/pr/1".into()
            }
        );
        assert_eq!(
            ModelSource::parse(Some("/tmp"), None).unwrap(),
            ModelSource::Local("/tmp".into())
        );
        // Neither a directory nor a repository id: an error without any network.
        for bad in ["./models/x", "m10", "BAAI/Alt Diffusion", "a/b/c"] {
            let e = ModelSource::parse(Some(bad), None).unwrap_err().to_string();
            assert!(
                e.contains("model directory not found, and not a hub repository id"),
                "{e}"
            );
        }
        assert!(check_repo_id("BAAI/AltDiffusion-m18").is_ok());
        for bad in ["foo", "a/b/c", "/abs", "-x/y", "a/.y", "a b/c", ""] {
            assert!(check_repo_id(bad).is_err(), "{bad:?}");
        }
        assert!(ModelSource::parse(Some("/tmp"), Some("main")).is_err());
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../b"));
    }

    #[test]
    fn selects_what_generation_needs() {
        // The real BAAI/AltDiffusion-m18 main branch, abridged.
        let listing = s(&[
            ".gitattributes",
            "README.md",
            "m18.ckpt",
            "model_index.json",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json",
            "safety_checker/pytorch_model.bin",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin",
            "tokenizer/sentencepiece.bpe.model",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
        ]);
        let need = needed_files(&listing, None, Scope::Generation).unwrap();
        assert!(need
            .iter()
            .all(|f| !f.starts_with("safety_checker") && !f.starts_with("feature_extractor")));
        assert!(!need.contains(&"m18.ckpt".to_string()));
        assert!(need.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!need.contains(&"unet/diffusion_pytorch_model.bin".to_string()));
        assert!(need.contains(&"text_encoder/pytorch_model.bin".to_string()));
        assert!(need.contains(&"tokenizer/sentencepiece.bpe.model".to_string()));
        assert_eq!(need.len(), 11, "{need:?}");
        let tok = needed_files(&listing, None, Scope::Tokenizer).unwrap();
        assert!(tok.iter().all(|f| f.starts_with("tokenizer/")), "{tok:?}");
        let missing = needed_files(&s(&["model_index.json"]), None, Scope::Generation).unwrap_err();
        assert!(
            missing.iter().any(|m| m.starts_with("unet/")),
            "{missing:?}"
        );
        assert!(
            missing.iter().any(|m| m.starts_with("tokenizer/")),
            "{missing:?}"
        );
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = std::env::temp_dir().join(format!("altdiff-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x");
        std::fs::write(&f, b"hello\n").unwrap();
        assert_eq!(
            git_sha1_file(&f).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            sha256_file(&f).unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
