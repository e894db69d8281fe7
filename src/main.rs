//! `chunkserver`: the daemon, `chunkserver demo`, and `chunkserver check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::Duration;

use dataplane::config::{Backend, Config};
use dataplane::demo::DemoOptions;
use dataplane::shard::ShutdownSignal;

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
    /// Run a chunkserver from its configuration file until SIGTERM or SIGINT.
    Run {
        /// The TOML file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a three-replica cluster on loopback from the embedded configuration, write and
    /// read back a region, run a short benchmark, and stop.
    Demo {
        /// Where the chunks live: `mem`, or `uring` for files in a temporary folder.
        #[arg(long, default_value = "mem")]
        backend: String,
        /// Seconds per benchmark phase.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run { config } => run(&config),
        Command::Demo { backend, seconds } => demo(&backend, seconds),
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

fn run(file: &Path) -> ExitCode {
    let (config, resolved) = match Config::load(file) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    dataplane::logging::init(&config.log.level, config.log.format == "json");
    let shutdown = ShutdownSignal::new();
    if let Err(error) = shutdown.install_signal_handlers() {
        eprintln!("error: cannot install signal handlers: {error}");
        return ExitCode::FAILURE;
    }
    tracing::info!(node = config.node.id, cores = ?resolved.cores, "chunkserver starting");
    match dataplane::server::run_node(&config, &resolved.cores, &shutdown) {
        Ok(()) => {
            tracing::info!(node = config.node.id, "chunkserver stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn demo(backend: &str, seconds: u64) -> ExitCode {
    dataplane::logging::init("warn", false);
    let backend = match backend {
        "mem" => Backend::Mem,
        "uring" => Backend::Uring,
        other => {
            eprintln!("error: --backend `{other}`: expected mem or uring");
            return ExitCode::FAILURE;
        }
    };
    let data_dir = std::env::temp_dir().join(format!("chunkserver-demo-{}", std::process::id()));
    let options = DemoOptions {
        configs: DEMO_CONFIGS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
        backend,
        data_dir: data_dir.clone(),
        region_bytes: 8 << 20,
        phase: Duration::from_secs(seconds.clamp(1, 60)),
    };
    println!(
        "demo: three chunkservers on 127.0.0.1 (peer ports 7110/7120/7130, client ports \
         7210/7220/7230), {backend} backend, one copyset replicated on all three"
    );
    let report = dataplane::demo::run(&options);
    // The files of the uring backend are the demo's own; nothing else lives there.
    let _ = std::fs::remove_dir_all(&data_dir);
    match report {
        Ok(report) => {
            println!(
                "demo: wrote and read back {} MiB through the cluster; copyset leader is node {}",
                report.verified_bytes >> 20,
                report.leader
            );
            println!(
                "demo: {:<20} {:>10} {:>10} {:>10} {:>10}",
                "phase", "ops", "IOPS", "p50", "p99"
            );
            for phase in &report.phases {
                println!(
                    "demo: {:<20} {:>10} {:>10.0} {:>10.1?} {:>10.1?}",
                    phase.name, phase.ops, phase.iops, phase.p50, phase.p99
                );
            }
            println!("demo: done; all three nodes stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}
