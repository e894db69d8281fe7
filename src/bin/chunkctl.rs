//! `chunkctl`: the admin CLI (cluster status, copysets, volumes, health).

use std::process::ExitCode;

use clap::Parser;

/// Administers a chunkserver cluster.
#[derive(Parser, Debug)]
#[command(name = "chunkctl", version)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("chunkctl: no admin command is built yet (they come with the client library)");
    ExitCode::FAILURE
}
