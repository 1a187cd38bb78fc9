//! altdiff: multilingual text-to-image with BAAI's AltDiffusion models (m9, m18) in Rust, producing
//! the same numbers as diffusers' `AltDiffusionPipeline`.
//!
//! Data flows left to right, each module knowing only those to its left:
//! `cli` -> `options` -> `model` (files, configs) -> `weights` -> `models` + `schedulers` + `tokenizer`
//! -> `pipeline` -> `output`. [`run`] is the entry point the binary calls.

#![deny(missing_docs)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod device;
pub mod error;
pub mod model;
pub mod models;
pub mod options;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod sentencepiece;
pub mod source;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod test_support;

pub use error::{Error, Result};

/// Runs a parsed command line.
pub fn run(cli: cli::Cli) -> Result<()> {
    let progress = !cli.quiet;
    match cli.command {
        cli::Command::Generate(args) => {
            let opts = args.into_options()?;
            commands::generate::run(&opts, progress).map(|_| ())
        }
        cli::Command::Download(a) => commands::download::run(
            &a.repo,
            a.revision.as_deref(),
            a.variant.as_deref(),
            progress,
        ),
        cli::Command::Convert(a) => {
            let model = a.model.into_choice()?;
            commands::convert::run(&model, &a.out, a.dtype, progress).map(|_| ())
        }
        cli::Command::Tokenize(a) => {
            let model = a.model.into_choice()?;
            commands::tokenize::run(&model, a.max_length, a.json, &a.text, progress)
        }
    }
}
