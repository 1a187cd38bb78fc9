//! The subcommands: each turns validated options into work, using the library's modules.

pub mod convert;
pub mod download;
pub mod generate;
pub mod tokenize;

use crate::error::Result;
use crate::options::ModelChoice;
use crate::source::{self, Fetched, HubSettings};

/// Makes the chosen model available locally (downloading from the hub if needed).
pub fn fetch_model(choice: &ModelChoice, progress: bool) -> Result<Fetched> {
    let settings = HubSettings::from_env(progress);
    let fetched = source::fetch(&choice.source, choice.variant.as_deref(), &settings, false)?;
    tracing::info!("model: {}", fetched.identity);
    Ok(fetched)
}
