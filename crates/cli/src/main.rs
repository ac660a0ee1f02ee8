//! The `boxlite` command line: a thin layer over the `boxlite` library. Each group of commands
//! lives in its own module; this file only parses and dispatches.

#[macro_use]
mod output;
mod boxes;
mod images;
mod snapshots;
mod table;
mod terminal;
mod volumes;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "boxlite",
    version,
    about = "Run OCI images in lightweight virtual machines"
)]
struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "BOXLITE_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Images(images::ImageCommand),
    #[command(flatten)]
    Boxes(Box<boxes::BoxCommand>),
    #[command(flatten)]
    Snapshots(snapshots::SnapshotCommand),
    /// Manage named volumes.
    Volume {
        #[command(subcommand)]
        command: volumes::VolumeCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Images(cmd) => images::run(cmd),
        Command::Boxes(cmd) => boxes::run(*cmd),
        Command::Snapshots(cmd) => snapshots::run(cmd),
        Command::Volume { command } => volumes::run(command),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("boxlite: {}", error_chain(&err));
            ExitCode::from(125)
        }
    }
}

/// The whole cause chain on one line: `what failed: because: because`.
fn error_chain(err: &anyhow::Error) -> String {
    err.chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
