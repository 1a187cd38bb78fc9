//! The `altdiff` binary: parse arguments, set up the terminal and logging, call the library, map
//! errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: altdiff::alloc::Allocator = altdiff::alloc::Allocator;

fn main() -> ExitCode {
    let cli = match altdiff::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // Help and version (and help shown for a bare `altdiff`) print as clap prints them.
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // The subcommand whose --help to point to: the first argument that names one.
            let command = <altdiff::cli::Cli as clap::CommandFactory>::command();
            let names: Vec<String> = command
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            let subcommand = std::env::args().skip(1).find(|a| names.contains(a));
            eprintln!(
                "{}",
                altdiff::term::one_line_usage_error(&e.render().to_string(), subcommand.as_deref())
            );
            return ExitCode::from(2);
        }
    };
    altdiff::term::init(cli.quiet, cli.verbose);
    let verbose = cli.verbose > 0;
    altdiff::signals::install();
    match altdiff::run(cli) {
        Ok(altdiff::Outcome::Success) => ExitCode::SUCCESS,
        Ok(altdiff::Outcome::PartialFailure) => ExitCode::from(1),
        Ok(altdiff::Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            let err = anyhow::Error::new(e);
            let line = if verbose {
                format!("error: {err:?}")
            } else {
                format!("error: {err}")
            };
            altdiff::term::err_line(&line);
            let code = err
                .downcast_ref::<altdiff::Error>()
                .map_or(1, altdiff::Error::exit_code);
            ExitCode::from(code as u8)
        }
    }
}
