//! `altdiff download`: fetch a hub model into the cache ahead of time and verify every file.

use crate::error::{Error, Result};
use crate::source::{self, FetchOptions, HubSettings, ModelSource, Scope};

/// Downloads `repo` at `revision` (or checks the cached copy) and prints the snapshot folder.
pub fn run(
    repo: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    progress: bool,
) -> Result<()> {
    source::check_repo_id(repo)?;
    let source = ModelSource::Hub {
        repo: repo.to_string(),
        revision: revision.unwrap_or("main").to_string(),
    };
    let settings = HubSettings::from_env(progress);
    if settings.offline {
        return Err(Error::usage(
            "HF_HUB_OFFLINE is set: `altdiff download` needs the network (unset it to download)",
        ));
    }
    let opts = FetchOptions {
        variant,
        scope: Scope::Generation,
        verify_all: true,
    };
    let fetched = source::fetch(&source, &opts, &settings)?;
    crate::term::note(&format!(
        "{} is ready in the cache ({})",
        fetched.identity,
        settings.cache_dir.display()
    ));
    println!("{}", fetched.root.display());
    Ok(())
}
