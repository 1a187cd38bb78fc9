//! The subcommands: each turns validated options into work, using the library's modules.

pub mod convert;
pub mod download;
pub mod generate;
pub mod info;
pub mod languages;
pub mod schedulers;
pub mod tokenize;

use crate::error::Result;
use crate::options::ModelChoice;
use crate::source::{self, FetchOptions, Fetched, HubSettings, Scope};

/// Makes the chosen model's files for `scope` available locally (downloading from the hub if needed).
pub fn fetch_model(choice: &ModelChoice, scope: Scope, progress: bool) -> Result<Fetched> {
    let settings = HubSettings::from_env(progress);
    let opts = FetchOptions {
        variant: choice.variant.as_deref(),
        scope,
        verify_all: false,
    };
    let fetched = source::fetch(&choice.source, &opts, &settings)?;
    tracing::info!("model: {}", fetched.identity);
    Ok(fetched)
}
