//! `npc-agent`: see `npc-agent --help`.
use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::{Context as _, Result};
use npc_agent::{
    cli::{Cli, Command, LogFormat},
    dump, run,
};
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

fn main() -> ExitCode {
    // Bad arguments: clap prints what is wrong and exits with status 2 (0 for --help).
    let cli = Cli::parse_args();
    let format = cli.global.log_format;
    if let Err(error) = init_tracing(format) {
        eprintln!("npc-agent: {error:#}");
        return ExitCode::FAILURE;
    }
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let error = chain(&error);
            match format {
                LogFormat::Text => eprintln!("npc-agent: error: {error}"),
                LogFormat::Json => tracing::error!(error, "exiting"),
            }
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    let bpffs = cli.global.bpffs.clone();
    let state_dir = cli.global.state_dir.clone();
    let format = cli.global.log_format;
    match cli.into_command() {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(run::run(args.into_options(bpffs, state_dir))),
        Command::Dump(args) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut warn = |message: &str| match format {
                LogFormat::Text => eprintln!("npc-agent: warning: {message}"),
                LogFormat::Json => tracing::warn!("{message}"),
            };
            dump::run(&bpffs, &state_dir, args.map, args.json, &mut out, &mut warn)
        }
        Command::Cleanup => {
            let removed = run::cleanup(&bpffs)?;
            for path in &removed {
                println!("removed {}", path.display());
            }
            if removed.is_empty() {
                println!("nothing to remove under {}", bpffs.display());
            } else {
                println!(
                    "removed {} entries under {}",
                    removed.len(),
                    bpffs.display()
                );
            }
            Ok(())
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (default: info).
fn init_tracing(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|e| anyhow::anyhow!("invalid RUST_LOG: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("initializing logging: {e}"))
}

/// The error and its causes, `: `-separated like `{:#}`, without the causes that an error's own
/// message already includes (some errors append their source to their message).
fn chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !previous.is_empty() && previous.contains(&message) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&message);
        previous = message;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug)]
    struct Verbose(std::io::Error);

    impl std::fmt::Display for Verbose {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "map error: {}", self.0)
        }
    }

    impl std::error::Error for Verbose {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn chain_skips_repeated_causes() {
        let error = anyhow::Error::new(Verbose(std::io::Error::other("boom"))).context("loading");
        assert_eq!(chain(&error), "loading: map error: boom");
        let error = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain(&error), format!("{error:#}"));
    }
}
