//! `chunkserver`: the daemon, `chunkserver demo`, and `chunkserver check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dataplane::config::Config;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CHUNKSERVER_GIT_COMMIT"),
    ")\nbackends: ",
    env!("CHUNKSERVER_BACKENDS"),
    "\nhost at build time: ",
    env!("CHUNKSERVER_HOST_PROBE"),
);

/// The three-node loopback cluster that `chunkserver demo` runs, embedded in the binary.
const DEMO_CONFIGS: [(&str, &str); 3] = [
    (
        "configs/demo/node1.toml",
        include_str!("../configs/demo/node1.toml"),
    ),
    (
        "configs/demo/node2.toml",
        include_str!("../configs/demo/node2.toml"),
    ),
    (
        "configs/demo/node3.toml",
        include_str!("../configs/demo/node3.toml"),
    ),
];

/// A replicated chunk-storage dataplane: thread-per-core shards, raft per copyset.
#[derive(Parser, Debug)]
#[command(name = "chunkserver", version = VERSION, long_version = VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file against this host without starting anything.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Start a three-replica cluster on loopback from the embedded configuration.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Demo => demo(),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok((config, resolved)) => {
            println!(
                "{}: ok: node {}, {} shard(s) on cores {:?}, {} device(s), peer {}",
                file.display(),
                config.node.id,
                resolved.cores.len(),
                resolved.cores,
                config.devices.len(),
                config.listen.peer
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> ExitCode {
    dataplane::logging::init("info", false);
    let host = dataplane::config::HostTopology::detect();
    for (name, text) in DEMO_CONFIGS {
        let file = Path::new(name);
        let checked =
            Config::parse(file, text).and_then(|c| c.validate(file, &host).map(|r| (c, r)));
        match checked {
            Ok((config, resolved)) => println!(
                "demo node {}: {} shard(s) on cores {:?}, peer {}, {} {} device(s)",
                config.node.id,
                resolved.cores.len(),
                resolved.cores,
                config.listen.peer,
                config.devices.len(),
                config
                    .devices
                    .first()
                    .map(|d| d.backend.to_string())
                    .unwrap_or_default(),
            ),
            Err(error) => {
                eprintln!("error: embedded demo configuration: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "The demo configuration is valid. Starting the cluster needs the chunkserver \
         (shards, copysets, services), which is not built yet; this binary can check \
         configurations (`chunkserver check-config FILE`)."
    );
    ExitCode::SUCCESS
}
