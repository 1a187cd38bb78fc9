//! altdiff: multilingual text-to-image with BAAI's AltDiffusion models (m9, m18) in Rust, producing
//! the same numbers as diffusers' `AltDiffusionPipeline`.
//!
//! Data flows left to right, each module knowing only those to its left:
//! `cli` -> `options` -> `model` (files, configs) -> `weights` -> `models` + `schedulers` + `tokenizer`
//! -> `pipeline` -> `output`. [`run`] is the entry point the binary calls.

#![deny(missing_docs)]

pub mod alloc;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod metadata;
pub mod model;
pub mod models;
pub mod noise;
pub mod options;
pub mod output;
pub mod picture;
pub mod pipeline;
pub mod progress;
pub mod rng;
pub mod schedulers;
pub mod serve;
pub mod signals;
pub mod source;
pub mod term;
pub mod text;
// Their historical paths (`altdiff::tokenizer`, ...), now under `text/`.
pub use text::{lang, sentencepiece, tokenizer};
pub mod weights;

#[cfg(test)]
mod test_support;

pub use error::{Error, Result};

/// How a command ended, when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was done.
    Success,
    /// Part of the work failed (some prompts of a batch); the rest was done. Exit code 1.
    PartialFailure,
    /// Ctrl-C stopped the work; what was finished is kept. Exit code 130.
    Interrupted,
}

/// Runs a parsed command line.
pub fn run(cli: cli::Cli) -> Result<Outcome> {
    let progress = !cli.quiet;
    let done = |r: Result<()>| r.map(|()| Outcome::Success);
    match cli.command {
        cli::Command::Generate(args) => {
            let opts = args.into_options()?;
            Ok(match commands::generate::run(&opts, progress)? {
                commands::generate::Outcome::AllWritten => Outcome::Success,
                commands::generate::Outcome::SomeFailed => Outcome::PartialFailure,
                commands::generate::Outcome::Interrupted => Outcome::Interrupted,
            })
        }
        cli::Command::Download(a) => done(commands::download::run(
            &a.repo,
            a.revision.as_deref(),
            a.variant.as_deref(),
            progress,
        )),
        cli::Command::Convert(a) => {
            let model = a.model.into_choice()?;
            done(commands::convert::run(&model, &a.out, a.dtype, progress).map(|_| ()))
        }
        cli::Command::Info(a) => Ok(match commands::info::run(&a.images, a.json)? {
            commands::info::Found::Parameters => Outcome::Success,
            commands::info::Found::Nothing => Outcome::PartialFailure,
        }),
        cli::Command::Languages(a) => {
            let model = a
                .model
                .as_deref()
                .map(|m| commands::languages::model_languages(m, progress))
                .transpose()?;
            done(commands::languages::run(model, a.json))
        }
        cli::Command::Schedulers(a) => done(commands::schedulers::run(a.json)),
        cli::Command::Serve(a) => done(serve::run(a.into_options()?, progress)),
        cli::Command::Completions(a) => {
            let mut cmd = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(a.shell, &mut cmd, "altdiff", &mut std::io::stdout());
            Ok(Outcome::Success)
        }
        cli::Command::Tokenize(a) => {
            let model = a.model.into_choice()?;
            if a.prompt_syntax == text::PromptSyntax::Webui {
                if a.max_length.is_some() {
                    return Err(Error::usage(
                        "--max-length applies to --prompt-syntax plain only: webui's syntax has no length limit (75-token chunks)",
                    ));
                }
                return done(commands::tokenize::run_webui(
                    &model, a.json, &a.text, progress,
                ));
            }
            done(commands::tokenize::run(
                &model,
                a.max_length,
                a.json,
                &a.text,
                progress,
            ))
        }
    }
}
