//! `chunkserver`: the daemon, `chunkserver demo`, and `chunkserver check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::Duration;

use std::rc::Rc;

use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::config::{Backend, ByteSize, Config};
use dataplane::demo::DemoOptions;
use dataplane::ids::CopysetId;
use dataplane::nbd::{Exports, NbdConfig};
use dataplane::shard::ShutdownSignal;
use dataplane::volume::{Volume, VolumeSpec};

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
    /// Serve volumes of a running cluster over NBD until SIGTERM or SIGINT.
    Nbd {
        /// A chunkserver configuration whose `[cluster]` lists the nodes.
        #[arg(long)]
        config: PathBuf,
        /// Where the NBD server listens.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: std::net::SocketAddr,
        /// A volume of the volume table by NAME, or NAME:COPYSET:SIZE (size with a suffix, such
        /// as 1GiB) to create it in the table first when it is not there; repeatable. Missing
        /// copysets are created on the first three nodes.
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// Serve Prometheus metrics of the exports (`chunkserver_nbd_requests_total` by
        /// volume, operation and result) at `http://ADDR/metrics`.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Seconds one NBD request may wait for the cluster (leader elections, a restarting
        /// node, a recovery), retries included, before it fails with EIO.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        io_timeout: u64,
    },
    /// Start a three-replica cluster on loopback from the embedded configuration, write and
    /// read back a region, run a short benchmark, and stop.
    Demo {
        /// Where the chunks live: `mem`, `uring` for files in a temporary folder, or `spdk` for
        /// SPDK malloc bdevs in the no-huge mode (a binary built with --features spdk).
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
        Command::Nbd {
            config,
            listen,
            volumes,
            metrics,
            io_timeout,
        } => nbd(
            &config,
            listen,
            &volumes,
            metrics,
            Duration::from_secs(io_timeout),
        ),
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

/// A volume named on the command line: a name, or what to create.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VolumeArg {
    /// Open it from the volume table.
    Existing(String),
    /// Export a snapshot of it, read-only, as `VOLUME@SNAPSHOT`.
    Snapshot { volume: String, snapshot: String },
    /// Create it in the table unless it is there with this layout and size: on one copyset,
    /// or (no copyset) striped over the pool.
    Wanted {
        name: String,
        copyset: Option<CopysetId>,
        size: u64,
    },
}

fn parse_size(text: &str, size: &str) -> Result<u64, String> {
    let size = size
        .parse::<ByteSize>()
        .map_err(|e| format!("--volume `{text}`: {e}"))?
        .bytes();
    if size == 0 || size % dataplane::volume::PAGE != 0 {
        return Err(format!(
            "--volume `{text}`: the size must be a non-zero multiple of 4 KiB"
        ));
    }
    Ok(size)
}

fn parse_volume(text: &str) -> Result<VolumeArg, String> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts[..] {
        [name] => match name.split_once('@') {
            Some((volume, snapshot)) => Ok(VolumeArg::Snapshot {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            }),
            None => Ok(VolumeArg::Existing(name.to_string())),
        },
        [name, size] => Ok(VolumeArg::Wanted {
            name: name.to_string(),
            copyset: None,
            size: parse_size(text, size)?,
        }),
        [name, copyset, size] => {
            let copyset: u64 = copyset
                .parse()
                .map_err(|_| format!("--volume `{text}`: `{copyset}` is not a copyset id"))?;
            Ok(VolumeArg::Wanted {
                name: name.to_string(),
                copyset: Some(CopysetId(copyset)),
                size: parse_size(text, size)?,
            })
        }
        _ => Err(format!(
            "--volume `{text}`: expected NAME, NAME@SNAPSHOT (read-only), NAME:SIZE (striped \
             over the pool) or NAME:COPYSET:SIZE"
        )),
    }
}

/// Serves the exports' metrics (and a `/status` naming them) at `address` until `shutdown`.
fn serve_nbd_metrics(
    address: std::net::SocketAddr,
    registry: &Rc<dataplane::metrics::Registry>,
    shutdown: &ShutdownSignal,
) -> Result<(), String> {
    let listener =
        dataplane::metrics::http::bind(address).map_err(|e| format!("--metrics {address}: {e}"))?;
    let (scraped, reported) = (Rc::clone(registry), Rc::clone(registry));
    let pages = dataplane::metrics::http::Pages {
        metrics: Box::new(move || {
            let text = scraped.snapshot().render();
            Box::pin(async move { text })
        }),
        status: Box::new(move || {
            let series = reported.snapshot().render().lines().count();
            Box::pin(async move { format!("{{\"role\":\"nbd\",\"metric_lines\":{series}}}") })
        }),
        fault: None,
        tokens: None,
    };
    println!("nbd: metrics on http://{address}/metrics");
    glommio::spawn_local(dataplane::metrics::http::serve(
        listener,
        Rc::new(pages),
        shutdown.clone(),
    ))
    .detach();
    Ok(())
}

/// Snapshot `snapshot` of `volume`, as a read-only export named `VOLUME@SNAPSHOT`.
async fn open_snapshot(
    client: &Rc<Client>,
    volume: &str,
    snapshot: &str,
) -> Result<(String, Volume), String> {
    let what = format!("--volume {volume}@{snapshot}");
    let spec = dataplane::volume::find_volume(client, volume)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let view = dataplane::volume::snapshot::snapshot_view(client, &spec, snapshot)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let name = format!("{volume}@{snapshot}");
    println!(
        "nbd: snapshot {name} ({} bytes, sequence number {}), read-only",
        spec.size, view.seq
    );
    Ok((name, Volume::of_snapshot(spec, Rc::clone(client), view)))
}

/// Opens (or creates) a volume of the table.
async fn open_volume(
    client: &Client,
    config: &Config,
    peers: &[u64],
    wanted: &VolumeArg,
) -> Result<VolumeSpec, String> {
    use dataplane::volume::pool::{create_striped_volume, ensure_pool, PoolSettings};
    use dataplane::volume::{create_volume, find_volume, VolumeError};
    use dataplane::volume_table::{TableError, VolumeLayout};
    let (name, copyset, size) = match wanted {
        VolumeArg::Snapshot { volume, .. } => {
            return Err(format!("--volume {volume}@…: a snapshot opens read-only"))
        }
        VolumeArg::Existing(name) => {
            return find_volume(client, name)
                .await
                .map_err(|e| format!("--volume {name}: {e}"))
        }
        VolumeArg::Wanted {
            name,
            copyset,
            size,
        } => (name, copyset, size),
    };
    let created = match copyset {
        Some(copyset) => {
            client
                .create_copyset(*copyset, peers)
                .await
                .map_err(|e| e.to_string())?;
            create_volume(client, name, *size, *copyset).await
        }
        None => {
            ensure_pool(client, &PoolSettings::for_cluster(client, config).await)
                .await
                .map_err(|e| format!("--volume {name}: the pool: {e}"))?;
            let segment = config
                .placement
                .segment_bytes(config.storage.chunk_size.bytes());
            create_striped_volume(client, name, *size, segment).await
        }
    };
    match created {
        Ok(record) => Ok(record),
        Err(VolumeError::Table(TableError::Exists(_))) => {
            let record = find_volume(client, name).await.map_err(|e| e.to_string())?;
            let same_layout = match (record.layout, copyset) {
                (VolumeLayout::Single { copyset: on, .. }, Some(wanted)) => on == *wanted,
                (VolumeLayout::Striped { .. }, None) => true,
                _ => false,
            };
            if !same_layout || record.size != *size {
                return Err(format!(
                    "--volume {name}: it exists with {} bytes, {}",
                    record.size, record.layout
                ));
            }
            Ok(record)
        }
        Err(error) => Err(format!("--volume {name}: {error}")),
    }
}

fn nbd(
    file: &Path,
    listen: std::net::SocketAddr,
    volumes: &[String],
    metrics: Option<std::net::SocketAddr>,
    io_timeout: Duration,
) -> ExitCode {
    let config = match std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))
        .and_then(|text| Config::parse(file, &text).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    dataplane::logging::init(&config.log.level, config.log.format == "json");
    let mut wanted = Vec::new();
    for text in volumes {
        match parse_volume(text) {
            Ok(volume) => wanted.push(volume),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let nodes: Vec<NodeAddress> = NodeAddress::from_config(&config)
        .into_iter()
        .filter(|_| !config.cluster.nodes.is_empty())
        .collect();
    if nodes.is_empty() {
        eprintln!(
            "error: {}: [cluster] lists no nodes to serve volumes from",
            file.display()
        );
        return ExitCode::FAILURE;
    }
    let shutdown = ShutdownSignal::new();
    if let Err(error) = shutdown.install_signal_handlers() {
        eprintln!("error: cannot install signal handlers: {error}");
        return ExitCode::FAILURE;
    }
    let net = config.net.clone();
    // The cluster secret claims the admin role (the export may create its volume and
    // copysets); a role key, its own.
    let auth = match dataplane::net::handshake::Auth::load(
        &config.auth,
        dataplane::net::auth::Role::Admin,
    ) {
        Ok(auth) => auth,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("nbd")
        .spawn(move || async move {
            let client_config = ClientConfig {
                deadline: io_timeout,
                net: net.clone(),
                auth: auth.clone(),
                ..ClientConfig::default()
            };
            let client = Rc::new(Client::new(&nodes, client_config));
            let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
            let peers = dataplane::volume::default_peers(&ids);
            dataplane::volume::ensure_metadata_copyset(&client, &peers)
                .await
                .map_err(|e| e.to_string())?;
            let registry = Rc::new(dataplane::metrics::Registry::new(&[]));
            let mut exports = Exports::new();
            for volume in &wanted {
                if let VolumeArg::Snapshot { volume, snapshot } = volume {
                    let (name, export) = open_snapshot(&client, volume, snapshot).await?;
                    exports.insert(&name, Rc::new(export.count_in(Rc::clone(&registry))));
                    continue;
                }
                let spec = open_volume(&client, &config, &peers, volume).await?;
                println!(
                    "nbd: volume {} ({} bytes), {}",
                    spec.name, spec.size, spec.layout
                );
                let name = spec.name.clone();
                let export = Volume::new(spec, Rc::clone(&client)).count_in(Rc::clone(&registry));
                exports.insert(&name, Rc::new(export));
            }
            if let Some(address) = metrics {
                serve_nbd_metrics(address, &registry, &shutdown)?;
            }
            let listener = dataplane::nbd::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
            println!("nbd: serving on nbd://{listen}/NAME until SIGTERM");
            dataplane::nbd::serve(listener, Rc::new(exports), NbdConfig::default(), shutdown)
                .await
                .map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())
        .and_then(|handle| {
            handle
                .join()
                .map_err(|_| "the NBD executor panicked".to_string())
        })
        .and_then(|r| r);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What `chunkserver demo` suggests trying next: the same three nodes as real processes, a
/// striped volume, its NBD export (docs/operations.md walks through each step).
const NEXT_STEPS: &str = "\
next: run the same three nodes yourself, each in its own terminal (docs/operations.md):
  chunkserver run --config configs/demo/node1.toml     # and node2.toml, node3.toml
  chunkctl --config configs/demo/node1.toml copyset create --id meta --peers 1,2,3
  chunkctl --config configs/demo/node1.toml volume create --name v --size 128MiB
  chunkserver nbd --config configs/demo/node1.toml --volume v --listen 127.0.0.1:10809
  qemu-img info nbd://127.0.0.1:10809/v                # or fio --ioengine=nbd
  chunkctl --config configs/demo/node1.toml status     # also: topology, pool, health
";

fn demo(backend: &str, seconds: u64) -> ExitCode {
    dataplane::logging::init("warn", false);
    let backend = match backend {
        "mem" => Backend::Mem,
        "uring" => Backend::Uring,
        "spdk" if cfg!(feature = "spdk") => Backend::Spdk,
        "spdk" => {
            eprintln!(
                "error: --backend spdk needs a binary built with --features spdk (and SPDK_DIR)"
            );
            return ExitCode::FAILURE;
        }
        other => {
            eprintln!("error: --backend `{other}`: expected mem, uring or spdk");
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
            print!("{}", NEXT_STEPS);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}
