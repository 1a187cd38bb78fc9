//! The `altdiff` binary: parse arguments, set up logging, call the library, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: altdiff::alloc::Allocator = altdiff::alloc::Allocator;

fn main() -> ExitCode {
    let cli = altdiff::cli::Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ALTDIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("altdiff={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let verbose = cli.verbose > 0;
    altdiff::signals::install();
    match altdiff::run(cli) {
        Ok(altdiff::Outcome::Success) => ExitCode::SUCCESS,
        Ok(altdiff::Outcome::PartialFailure) => ExitCode::from(1),
        Ok(altdiff::Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            let err = anyhow::Error::new(e);
            if verbose {
                eprintln!("error: {err:?}");
            } else {
                eprintln!("error: {err}");
            }
            let code = err
                .downcast_ref::<altdiff::Error>()
                .map_or(1, altdiff::Error::exit_code);
            ExitCode::from(code as u8)
        }
    }
}
